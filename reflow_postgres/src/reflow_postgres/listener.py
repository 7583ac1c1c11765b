"""Wake-ups from ``LISTEN``/``NOTIFY``: how idle workers learn of new work at once.

Statements that make a run claimable (create, hand back, requeue, an event
that wakes a waiting run) send ``NOTIFY`` on the schema's channel with the
payload ``0|<workflow>``; a sleep, a wait with a timeout, or the create of
a delayed run sends ``<milliseconds>|<workflow>``, the time until it falls
due by the server's clock (the hint format of :mod:`reflow_core.wakeups`). A :class:`Listener`
holds one dedicated connection per storage, outside the pool, and hands each
notification to the hub, which wakes the subscribers it concerns or arms a
timer.

Statements that end runs (a finish, a batched finish, a cancel and its
cascade, a failure) send *finish hints* on a second channel, ``reflow-done:``
and the schema: the ids of the runs they ended, one per line (the format of
:func:`reflow_core.wakeups.finish_payloads`; a batch sends one hint per
chunk of ids, not one per run). The connection listens to each channel only
while someone subscribes to it (:meth:`~reflow_core.wakeups.WakeupHub.channels_wanted`),
so workers that wait for no result never receive the finishes of the fleet.

Notifications are hints. The engine coalesces a burst of them into one claim
(its wake-up is an ``asyncio.Event``), and a worker with no free slot does not
claim at all. After a reconnect (the server restarted, the network dropped)
the listener subscribes again and wakes everyone once, since notifications
sent meanwhile are lost. A connection that stays silent is checked with a
``SELECT 1`` every ``liveness`` seconds, so a half-open one is noticed too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import psycopg
from psycopg import sql

from reflow_core.options import redact
from reflow_core.wakeups import WakeupHub

__all__ = ["Listener"]


class Listener(WakeupHub):
    """The ``LISTEN`` connection of one storage, shared by its subscribers."""

    health_check = "SELECT 1"
    """The query that checks a silent connection. Notifications that arrive
    while it runs are queued by psycopg (3.2.4 and later) for the next
    ``notifies()`` wait, so none is lost to it."""

    def __init__(
        self,
        *,
        conninfo: str,
        kwargs: Mapping[str, Any],
        channel: str,
        finish_channel: str,
        next_due: Callable[[list[str]], Awaitable[float | None]],
        secrets: Collection[str] = (),
        enabled: bool = True,
        liveness: float = 30.0,
    ) -> None:
        super().__init__(next_due=next_due, describe=repr(channel), enabled=enabled)
        self._conninfo = conninfo
        self._kwargs = {**kwargs, "autocommit": True}
        self._channel = channel
        self._finish_channel = finish_channel
        self._secrets = secrets
        self._liveness = liveness

    async def listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
        async with conn:
            wakes, finishes = self.channels_wanted()
            wanted = [self._channel] if wakes else []
            if finishes:
                wanted.append(self._finish_channel)
            for channel in wanted:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self.connected_now()
            while True:
                async for note in conn.notifies(timeout=self._liveness):
                    if note.channel == self._channel:
                        self.hint(note.payload)
                    elif note.channel == self._finish_channel:
                        self.finish_hint(note.payload)
                await conn.execute(self.health_check)

    def describe_error(self, exc: BaseException) -> str:
        return redact(f"{type(exc).__name__}: {exc}".strip(), self._secrets)
