"""The virtual clock a test engine and its storage share."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta

from reflow_core._durations import Duration, to_timedelta
from reflow_core.engine import Clock
from reflow_core.errors import ConfigError

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
"""Where a :class:`VirtualClock` starts unless told otherwise."""

NEVER = datetime.max.replace(tzinfo=UTC)
"""The deadline of a sleep too long for a datetime to hold."""


class VirtualClock(Clock):
    """A clock that moves only when told to.

    It is the engine's :class:`~reflow_core.engine.Clock` (``now()`` and an
    ``async sleep()`` that ends when virtual time reaches its deadline, not in
    real time) and, called with no arguments, a storage clock
    (``MemoryStorage(clock=clock)``). ``start`` must be timezone-aware; time
    is kept in UTC.

    Use it from the thread of the event loop that sleeps on it; storages may
    read it from any thread.
    """

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        self._now = aware(start, "start")
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._listeners: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        return f"<VirtualClock {self._now.isoformat()} sleepers={self.sleepers}>"

    def now(self) -> datetime:
        """The virtual time, aware UTC."""
        return self._now

    def __call__(self) -> datetime:
        """The virtual time: what a storage's ``clock=`` is called for."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has been moved ``seconds`` past the current
        virtual time. Zero or less only yields to the event loop."""
        if not seconds > 0:
            await asyncio.sleep(0)
            return
        try:
            deadline = self._now + timedelta(seconds=seconds)
        except (OverflowError, ValueError):  # too far for a datetime: never ends
            deadline = NEVER
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._order), future))
        for listener in self._listeners:
            if not listener.done():
                listener.set_result(None)
        self._listeners.clear()
        try:
            await future
        finally:
            future.cancel()  # a cancelled sleeper is dropped from the heap lazily

    def advance(self, duration: Duration) -> datetime:
        """Move the clock forward by ``duration`` (``"1h"``, seconds, a
        ``timedelta``), wake every sleeper whose deadline has passed, and
        return the new time."""
        delta = to_timedelta(duration, option="duration")
        try:
            target = self._now + delta
        except OverflowError:
            raise ConfigError(
                f"advancing by {duration!r} goes past the last datetime", option="duration"
            ) from None
        return self.advance_to(target)

    def advance_to(self, moment: datetime) -> datetime:
        """Move the clock forward to ``moment`` (aware), wake every sleeper
        whose deadline has passed, and return the new time. The clock never
        goes back: an earlier ``moment`` is a :class:`ConfigError`."""
        moment = not_before(moment, self._now)
        self._now = moment
        while self._sleepers and self._sleepers[0][0] <= moment:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        return self._now

    @property
    def next_deadline(self) -> datetime | None:
        """The earliest deadline of a pending :meth:`sleep`, if any."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    @property
    def sleepers(self) -> int:
        """How many :meth:`sleep` calls are waiting."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    def _sleeper_added(self) -> asyncio.Future[None]:
        """A future resolved by the next :meth:`sleep` call."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._listeners.append(future)
        return future


def aware(moment: datetime, option: str) -> datetime:
    """``moment`` in UTC; a :class:`ConfigError` naming ``option`` if it is
    not a timezone-aware datetime."""
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ConfigError(f"{option} must be a timezone-aware datetime", option=option)
    return moment.astimezone(UTC)


def not_before(moment: datetime, now: datetime) -> datetime:
    """``moment`` in UTC, checked as a time to move the clock to from ``now``:
    the clock never goes back."""
    moment = aware(moment, "moment")
    if moment < now:
        raise ConfigError(
            f"the virtual clock never goes back: it is {now.isoformat()}, "
            f"asked for {moment.isoformat()}",
            option="moment",
        )
    return moment
