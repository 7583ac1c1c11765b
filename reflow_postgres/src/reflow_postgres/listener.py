"""Wake-ups from ``LISTEN``/``NOTIFY``: how idle workers learn of new work at once.

Statements that make a run claimable (create, hand back, requeue, an event
that wakes a waiting run) send ``NOTIFY`` on the schema's channel with the
payload ``0|<workflow>``; a sleep, or a wait with a timeout, sends
``<milliseconds>|<workflow>``, the time until it falls due by the server's
clock. A :class:`Listener` holds one dedicated connection per storage,
outside the pool, and turns those into calls of each subscriber's ``wake``:

* at once for ready work of a subscribed workflow (an empty workflow, sent
  for names too long for a payload, wakes everyone);
* with a timer for work that falls due later. After a timer fires it asks the
  database for the next due time, so sleeps that began before this worker
  started are found too.

Notifications are hints. The engine coalesces a burst of them into one claim
(its wake-up is an ``asyncio.Event``), and a worker with no free slot does not
claim at all. After a reconnect (the server restarted, the network dropped)
the listener subscribes again and wakes everyone once, since notifications
sent meanwhile are lost; between reconnect attempts it backs off with jitter.
A connection that stays silent is checked with a ``SELECT 1`` every
``liveness`` seconds, so a half-open connection is noticed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["Listener"]

logger = logging.getLogger("reflow.postgres")

_MIN_TIMER = 0.002
"""Due times closer than this (seconds) wake at once."""
_MAX_BACKOFF = 5.0


def _redact(text: str, secrets: Collection[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class _Subscription:
    """One subscriber: its workflows and its ``wake``."""

    def __init__(
        self, listener: Listener, workflows: Collection[str], wake: Callable[[], None]
    ) -> None:
        self._listener = listener
        self.workflows = workflows
        self.wake = wake

    async def close(self) -> None:
        self._listener.unsubscribe(self)


class Listener:
    """The ``LISTEN`` connection of one storage, shared by its subscribers."""

    def __init__(
        self,
        *,
        conninfo: str,
        kwargs: Mapping[str, Any],
        channel: str,
        next_due: Callable[[list[str]], Awaitable[float | None]],
        secrets: Collection[str] = (),
        enabled: bool = True,
        liveness: float = 30.0,
    ) -> None:
        self._conninfo = conninfo
        self._kwargs = dict(kwargs)
        self._kwargs["autocommit"] = True
        self._channel = channel
        self._next_due = next_due
        self._secrets = secrets
        self._enabled = enabled
        self._liveness = liveness
        self._subs: list[_Subscription] = []
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._refreshing: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        """Set while the listening connection is up (for tests and health checks)."""
        self.reconnects = 0
        """How many times the connection was re-established."""

    async def subscribe(
        self, workflows: Collection[str], wake: Callable[[], None]
    ) -> _Subscription:
        sub = _Subscription(self, workflows, wake)
        self._subs.append(sub)
        if self._enabled and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(
                self._listen_forever(), name=f"reflow-listen-{self._channel}"
            )
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)
        if not self._subs:
            self._stop()

    async def close(self) -> None:
        self._subs.clear()
        task = self._task
        self._stop()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None
        self._disarm()
        self.connected.clear()

    # -- waking ------------------------------------------------------------------

    def _wake(self, workflow: str | None) -> None:
        for sub in list(self._subs):
            if workflow is None or workflow == "" or workflow in sub.workflows:
                sub.wake()

    def _workflows(self) -> list[str]:
        names: set[str] = set()
        for sub in self._subs:
            names.update(sub.workflows)
        return sorted(names)

    def _on_notify(self, payload: str) -> None:
        delay_ms, sep, workflow = payload.partition("|")
        if not sep or not delay_ms.isdigit():
            logger.debug("ignoring a malformed notification %r", payload[:100])
            return
        delay = int(delay_ms) / 1000
        if delay < _MIN_TIMER:
            self._wake(workflow)
        elif workflow == "" or any(workflow in sub.workflows for sub in self._subs):
            self._arm(delay)

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        if at >= self._timer_at - _MIN_TIMER:
            return
        self._disarm()
        self._timer_at = at
        self._timer = loop.call_at(at, self._fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = float("inf")

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._wake(None)
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        """Arm the timer for the next sleeping or waiting run known to the database."""
        workflows = self._workflows()
        if not workflows:
            return
        try:
            delay = await self._next_due(workflows)
        except Exception as exc:  # polling covers it; never kill the listener
            logger.debug("looking up the next due run failed: %s", exc)
            return
        if delay is not None:
            if delay < _MIN_TIMER:
                self._wake(None)
            else:
                self._arm(delay)

    # -- the connection ------------------------------------------------------------

    async def _listen_forever(self) -> None:
        backoff = 0.1
        first = True
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
            except (psycopg.Error, OSError) as exc:
                self._log_failure("connecting", exc, backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            try:
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    if not first:
                        self.reconnects += 1
                    first = False
                    self.connected.set()
                    backoff = 0.1
                    # Anything sent while we were not listening is lost: look now.
                    self._wake(None)
                    self._refresh_soon()
                    while True:
                        async for note in conn.notifies(timeout=self._liveness):
                            self._on_notify(note.payload)
                        await conn.execute("SELECT 1")
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                self._log_failure("listening", exc, backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def _log_failure(self, doing: str, exc: BaseException, backoff: float) -> None:
        logger.warning(
            "wake-up listener on %r failed while %s (%s); retrying in about %.1fs, "
            "polling meanwhile",
            self._channel,
            doing,
            _redact(f"{type(exc).__name__}: {exc}".strip(), self._secrets),
            backoff,
        )
