"""Adapters that break a promise about leases: fencing, lapses, and the clock they are judged by."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Literal, TypeVar

from reflow_core.adapter import (
    utcnow,
)
from reflow_core.memory import MemoryStorage, _Run
from reflow_core.storage import (
    Lease,
    RunRecord,
    StepRecord,
    WaitResult,
)

from ._common import _store


class NoFencing(MemoryStorage):
    """Breaks *a lapsed or superseded lease's writes are refused*: a fenced
    write only checks that the run is running, not under which epoch nor
    whether the lease has lapsed. (Cancelled and finished runs still refuse
    writes, because they are not running.)"""

    def _live(self, lease: Lease, now: datetime) -> _Run | None:
        entry = self._runs.get(lease.run_id)
        if entry is None or entry.record.status != "running":
            return None
        return entry


class ImmortalLeases(MemoryStorage):
    """Breaks *once a lease lapses the run can be reclaimed*: claims never
    take over a running run, however long ago its lease lapsed, as if the
    claim query forgot the lapsed-lease clause. The lapsed holder's writes are
    still refused, so such a run is stranded for good."""

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        if rec.status == "running":
            return None
        return super()._due(rec, now)


class SkewedNow(MemoryStorage):
    """Breaks *now() is the clock the storage judges by*: ``now()`` reports
    the local clock an hour fast, while leases, deadlines and due schedules
    follow the storage's own clock, as if ``now()`` read the application
    server's clock instead of the database's."""

    async def now(self) -> datetime:
        return await super().now() + timedelta(hours=1)


def no_fencing() -> MemoryStorage:
    return NoFencing(name=_store("no_fencing"))


def immortal_leases() -> MemoryStorage:
    return ImmortalLeases(name=_store("immortal_leases"))


def skewed_now() -> MemoryStorage:
    return SkewedNow(name=_store("skewed_now"))


_T = TypeVar("_T")


class SplitFence(MemoryStorage):
    """Breaks *a fenced write racing a cancel, requeue or reclaim lands before
    it or is refused*: every fenced write checks its lease, then yields (the
    write is a second round trip) and writes without checking again, so a
    cancel, requeue or reclaim that lands in between is overwritten while both
    sides report success."""

    _unchecked = False

    def _live(self, lease: Lease, now: datetime) -> _Run | None:
        if self._unchecked:
            return self._runs.get(lease.run_id)
        return super()._live(lease, now)

    async def _split(self, lease: Lease, write: Callable[[], Awaitable[_T]], refused: _T) -> _T:
        if super()._live(lease, self._clock()) is None:
            return refused
        await asyncio.sleep(0)
        self._unchecked = True
        try:
            return await write()  # runs to its end without yielding
        finally:
            self._unchecked = False

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        parent = super()
        return await self._split(lease, lambda: parent.heartbeat_run(lease, extend), False)

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        parent = super()
        return await self._split(lease, lambda: parent.save_step_result(lease, step, extend), False)

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        parent = super()
        return await self._split(
            lease,
            lambda: parent.finish_run(lease, status, output=output, error=error, step=step),
            False,
        )

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        parent = super()
        return await self._split(lease, lambda: parent.sleep_run(lease, step, duration), None)

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        parent = super()
        return await self._split(lease, lambda: parent.wait_run(lease, step, event, timeout), None)


def split_fence() -> MemoryStorage:
    return SplitFence(name=_store("split_fence"))


_LEASE_ENDS: dict[tuple[str, str], datetime] = {}
"""When each run's lease really ends in a :class:`LeasesLapseAtRandom` store,
by store and run id."""


_RANDOM = random.Random()  # not the module's generator, which Hypothesis seeds per example


class LeasesLapseAtRandom(MemoryStorage):
    """Breaks *a lease stays live for its whole length*: every claim or
    renewal reports the lease's end as asked, but the store lets the lease lapse
    after a random time under half a second, as a store that judges leases by a
    clock running at its own pace would. What the holder and other claimers see
    then depends on how fast the test runs: the same operations get other
    answers when they are repeated."""

    def _end_key(self, run_id: str) -> tuple[str, str]:
        return (str(self._name), run_id)

    def _update(self, entry: _Run, now: datetime, **changes: object) -> None:
        super()._update(entry, now, **changes)
        if isinstance(changes.get("lease_expires_at"), datetime):
            end = now + timedelta(seconds=_RANDOM.uniform(0.05, 0.45))
            _LEASE_ENDS[self._end_key(entry.record.id)] = end

    def _lapsed(self, rec: RunRecord, now: datetime) -> bool:
        end = _LEASE_ENDS.get(self._end_key(rec.id))
        return rec.lease_expires_at is not None and end is not None and end <= now

    def _live(self, lease: Lease, now: datetime) -> _Run | None:
        entry = super()._live(lease, now)
        if entry is not None and self._lapsed(entry.record, now):
            return None
        return entry

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        if rec.status == "running" and self._lapsed(rec, now):
            return (0, 0, rec.lease_expires_at or now)
        return super()._due(rec, now)


def leases_lapse_at_random() -> MemoryStorage:
    return LeasesLapseAtRandom(name=_store("leases_lapse_at_random"))


_FAST_BY = timedelta(seconds=0.45)
"""How far ahead the fast clock of ``fast_client_clock`` runs: one and a half
default short leases, so a lease of two short ones looks lapsed a third of
the way through."""


_fast_clock_made = [0]


def _fast_clock() -> datetime:
    return utcnow() + _FAST_BY


def fast_client_clock() -> MemoryStorage:
    """Breaks *a lease stays live for its whole length by the storage clock,
    whichever connection judges it*: every second storage object judges
    leases, deadlines and due schedules by a clock 0.45 s ahead of the
    store's, as if each worker judged by its own host's clock (one of them
    fast) instead of the database's. Its ``now()`` reads the same clock, so
    each storage object agrees with itself; only a lease one connection took
    and another judges shows the skew."""
    _fast_clock_made[0] += 1
    clock = _fast_clock if _fast_clock_made[0] % 2 else None
    return MemoryStorage(name=_store("fast_client_clock"), clock=clock)
