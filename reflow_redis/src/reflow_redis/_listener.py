"""Wake-ups from pub/sub: how idle workers learn of new work at once.

Scripts that make a run claimable publish ``0|<workflow>`` on the prefix's
``P:wake`` channel; a sleep, or a wait with a timeout, publishes
``<milliseconds>|<workflow>`` (the hint format of :mod:`reflow_core.wakeups`).
A :class:`_Listener` holds one subscription per storage, on a connection of
its own outside the pool, and hands each message to the hub. A connection
that stays silent is pinged every ``liveness`` seconds, so a half-open one is
noticed too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Collection

import redis.asyncio as aioredis

from reflow_core.options import redact
from reflow_core.wakeups import WakeupHub


class _Listener(WakeupHub):
    """The pub/sub subscription of one storage, shared by its subscribers."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        channel: str,
        next_due: Callable[[list[str]], Awaitable[float | None]],
        secrets: Collection[str],
        enabled: bool,
        liveness: float = 30.0,
    ) -> None:
        super().__init__(next_due=next_due, describe=repr(channel), enabled=enabled)
        self._client = client
        self._channel = channel
        self._secrets = secrets
        self._liveness = liveness

    async def listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            self.connected_now()
            while True:
                message = await pubsub.get_message(timeout=self._liveness)
                if message is None:
                    await pubsub.ping()  # a half-open connection fails here
                    continue
                data = message.get("data")
                if isinstance(data, bytes):
                    self.hint(data.decode("utf-8", "replace"))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def describe_error(self, exc: BaseException) -> str:
        return redact(f"{type(exc).__name__}: {exc}", self._secrets)
