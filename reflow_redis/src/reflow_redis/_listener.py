"""Wake-ups from pub/sub: how idle workers learn of new work at once.

Scripts that make a run claimable publish ``0|<workflow>`` on the prefix's
``P:wake`` channel; a sleep, or a wait with a timeout, publishes
``<milliseconds>|<workflow>`` (the hint format of :mod:`reflow_core.wakeups`).
Scripts that end runs publish their ids on ``P:done`` (finish hints, the
format of :func:`reflow_core.wakeups.finish_payloads`), one message per
script and chunk, never one per run.

A :class:`_Listener` holds one subscription per storage, on a connection of
its own outside the pool, to the channels someone subscribed to (see
:meth:`~reflow_core.wakeups.WakeupHub.channels_wanted`: a worker that waits
for no result never receives the fleet's finishes), and hands each message
to the hub by its channel. A connection that stays silent is pinged every
``liveness`` seconds, so a half-open one is noticed too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection

import redis.asyncio as aioredis

from reflow_core.options import redact
from reflow_core.wakeups import WakeupHub


def _raise_if_cancelled() -> None:
    """Raise the cancellation of this task that a command swallowed.

    redis-py sends each command under :func:`asyncio.wait_for`, which on
    Python 3.11 returns normally when the send completes in the same turn
    of the loop as a cancellation, dropping it (the task still counts it).
    The listener would then wait for a message for up to ``liveness``
    seconds, and whoever stops it (a close, a restart for another channel)
    with it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Listener(WakeupHub):
    """The pub/sub subscription of one storage, shared by its subscribers."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        channel: str,
        finish_channel: str,
        next_due: Callable[[list[str]], Awaitable[float | None]],
        secrets: Collection[str],
        enabled: bool,
        liveness: float = 30.0,
    ) -> None:
        super().__init__(next_due=next_due, describe=repr(channel), enabled=enabled)
        self._client = client
        self._channel = channel
        self._finish_channel = finish_channel
        self._wake_name = channel.encode()
        self._finish_name = finish_channel.encode()
        self._secrets = secrets
        self._liveness = liveness

    async def listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            wakes, finishes = self.channels_wanted()
            channels = [self._channel] if wakes else []
            if finishes:
                channels.append(self._finish_channel)
            # The hub runs only while someone subscribes; should the last one
            # have left meanwhile, the wake channel keeps the connection valid.
            await pubsub.subscribe(*(channels or [self._channel]))
            _raise_if_cancelled()
            self.connected_now()
            while True:
                message = await pubsub.get_message(timeout=self._liveness)
                if message is None:
                    await pubsub.ping()  # a half-open connection fails here
                    _raise_if_cancelled()
                    continue
                data = message.get("data")
                if not isinstance(data, bytes):
                    continue
                channel = message.get("channel")
                if channel == self._wake_name:
                    self.hint(data.decode("utf-8", "replace"))
                elif channel == self._finish_name:
                    self.finish_hint(data.decode("utf-8", "replace"))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def describe_error(self, exc: BaseException) -> str:
        return redact(f"{type(exc).__name__}: {exc}", self._secrets)
