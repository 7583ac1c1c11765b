"""The storage's clock: :meth:`~reflow_core.storage.Storage.now` reports the
*now* the storage judges by, so the engine can compute schedule slots on it.

Each check brackets an operation between two readings of ``now()``: whatever
*now* the operation used must lie between them (give or take the millisecond
the contract lets a store round to). A ``now()`` that reads another clock (the
local one, while the database's judges) fails these checks by the skew."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import Lease, ScheduleSpec, Storage

from ._util import claim_one, create, read_run

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestLeaseClock", "TestStorageClock"]

_SLACK = timedelta(milliseconds=1)
"""Stored times keep at least milliseconds; a store may round either way."""
_NAP = timedelta(minutes=30)
_LATER = timedelta(minutes=10)


async def _now(s: Storage) -> datetime:
    value = await s.now()
    promise(
        isinstance(value, datetime) and value.utcoffset() == timedelta(0),
        P.STORAGE_CLOCK,
        f"now() returned {value!r}, not an aware UTC datetime",
    )
    return value


def _between(value: datetime | None, before: datetime, after: datetime, span: timedelta) -> str:
    """Empty if ``value`` is within ``[before + span, after + span]`` (with
    slack), else what is wrong."""
    if value is None:
        return "no time was set"
    low, high = before + span - _SLACK, after + span + _SLACK
    if low <= value <= high:
        return ""
    return (
        f"{value.isoformat()} is not within now() + {span} = [{(before + span).isoformat()}, "
        f"{(after + span).isoformat()}] (off by {min(value - low, value - high, key=abs)})"
    )


def _whole_ms(value: datetime) -> datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class TestStorageClock:
    def test_now_is_aware_utc_and_moves_forward(self, reflow: Harness) -> None:
        async def body(s: Storage) -> None:
            first = await _now(s)
            second = await _now(s)
            promise(
                second >= first - _SLACK,
                P.STORAGE_CLOCK,
                f"now() went back from {first.isoformat()} to {second.isoformat()}",
            )

        reflow.run(body)

    def test_a_lease_ends_at_now_plus_its_length(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            before = await _now(s)
            held = await claim_one(s, wf, reflow.long_lease)
            after = await _now(s)
            wrong = _between(held.run.lease_expires_at, before, after, reflow.long_lease)
            promise(not wrong, P.STORAGE_CLOCK, f"claimed lease_expires_at: {wrong}")
            before = await _now(s)
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            after = await _now(s)
            promise(beat, P.LIVE_LEASE_ACCEPTED, "heartbeat of a fresh lease refused")
            run = await read_run(s, held.run.id)
            wrong = _between(run.lease_expires_at, before, after, reflow.long_lease)
            promise(not wrong, P.STORAGE_CLOCK, f"lease_expires_at after a heartbeat: {wrong}")

        reflow.run(body)

    def test_a_sleep_or_wait_deadline_is_now_plus_its_duration(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await claim_one(s, wf)
            before = await _now(s)
            wake_at = await s.sleep_run(held.lease, "nap", _NAP)
            after = await _now(s)
            wrong = _between(wake_at, before, after, _NAP)
            promise(not wrong, P.STORAGE_CLOCK, f"sleep_run wake_at: {wrong}")
            await create(s, wf)
            held = await claim_one(s, wf)
            before = await _now(s)
            waited = await s.wait_run(held.lease, "approval", "approved", _NAP)
            after = await _now(s)
            promise(waited is not None, P.LIVE_LEASE_ACCEPTED, "wait with a fresh lease refused")
            assert waited is not None
            wrong = _between(waited.deadline, before, after, _NAP)
            promise(not wrong, P.STORAGE_CLOCK, f"wait_run deadline: {wrong}")

        reflow.run(body)

    @pytest.mark.reflow_area("schedules")
    def test_schedules_are_due_by_now(self, reflow: Harness) -> None:
        """A schedule whose slot is at or before a reading of ``now()`` is due
        from then on; one ten minutes after it is not (the engine fires slots
        it computes from ``now()``, and looks for them by ``due_schedules``)."""
        wf = reflow.unique()
        past, future = reflow.unique("sched"), reflow.unique("sched")

        async def body(s: Storage) -> None:
            now = _whole_ms(await _now(s))
            text = codec.encode(None)
            try:
                await s.upsert_schedule(ScheduleSpec(past, wf, text, "every:60000", now))
                await s.upsert_schedule(ScheduleSpec(future, wf, text, "every:60000", now + _LATER))
                due = {record.key for record in await s.due_schedules(10_000)}
                promise(
                    past in due,
                    P.STORAGE_CLOCK,
                    f"a schedule at now() ({now.isoformat()}) is not due",
                )
                promise(
                    future not in due,
                    P.STORAGE_CLOCK,
                    f"a schedule at now() + {_LATER} ({(now + _LATER).isoformat()}) is due",
                )
            finally:
                await s.delete_schedule(past)
                await s.delete_schedule(future)

        reflow.run(body)


_ROUNDING = 0.005
"""Seconds a lease may end early by rounding: stored times and the store's
*now* may each be rounded to the millisecond, either way."""
_TICKS = 12
"""Checks made across one lease, evenly spaced."""


async def _watch_lease(
    reflow: Harness, holder: Storage, other: Storage, names: tuple[str, str]
) -> None:
    """Claim runs on ``holder``, then, across their lease, try to take one
    from ``other`` and heartbeat the others once each, from ``other`` (with
    the lease read back through it) and from ``holder``.

    Times are the test's own monotonic clock. The claim began at ``a0``, so
    by a storage clock running at the right rate, whatever its offset from
    any other clock, the lease ends no sooner than ``a0`` plus its length: a
    call that *ended* before then was judged while the lease was live. Only
    such calls are held to the promise, so a slow machine can delay a check
    past that point (and make it prove nothing) but never fail it.
    """
    length = reflow.short_lease * 2
    span = length.total_seconds()
    taken, beaten = reflow.unique(), reflow.unique()
    beats = 2 * _TICKS
    await create(holder, taken)
    for i in range(beats):
        await create(holder, beaten, i)
    a0 = time.monotonic()
    claimed = await holder.claim_runs([taken, beaten], beats + 1, length)
    live_until = a0 + span - _ROUNDING
    promise(len(claimed) == beats + 1, P.CLAIM_LIMIT, f"claimed {len(claimed)} of {beats + 1}")
    target = next(c.run.id for c in claimed if c.run.workflow == taken)
    watching = True
    leases = [c.lease for c in claimed if c.run.workflow == beaten]
    held, by = names

    def late(ended: float) -> bool:
        return ended >= live_until

    async def beat(storage: Storage, lease: Lease, via: str) -> None:
        started = time.monotonic()
        accepted = await storage.heartbeat_run(lease, length)
        ended = time.monotonic()
        promise(
            accepted or late(ended),
            P.LIVE_LEASE_ACCEPTED,
            f"a heartbeat of run {lease.run_id} through connection {via}, sent "
            f"{started - a0:.3f} s and answered {ended - a0:.3f} s after connection {held} "
            f"began claiming it for {span} s, was refused",
        )

    for tick in range(1, _TICKS):
        await asyncio.sleep(max(0.0, a0 + span * tick / _TICKS - time.monotonic()))
        if late(time.monotonic()):
            break
        if watching:
            got = await other.claim_runs([taken], 1, length)
            ended = time.monotonic()
            promise(
                not got or late(ended),
                P.LEASE_LIVES_ITS_LENGTH,
                f"connection {by} claimed run {target} {ended - a0:.3f} s after "
                f"connection {held} began claiming it for {span} s",
            )
            watching = not got
        run = await read_run(other, leases[0].run_id)
        await beat(other, Lease(run.id, run.lease_epoch), by)
        await beat(holder, leases[1], held)
        del leases[:2]


class TestLeaseClock:
    def test_a_lease_stays_live_for_its_length_everywhere(self, reflow: Harness) -> None:
        """Every connection judges a lease by the storage's clock: one whose
        own clock runs ahead (a worker host's, read in place of the
        database's) takes a live lease, or refuses its heartbeat, early.

        Both connections take each side in turn, so a clock running ahead on
        either is caught."""

        async def body(a: Storage) -> None:
            b = await reflow.open()
            await _watch_lease(reflow, a, b, ("A", "B"))
            await _watch_lease(reflow, b, a, ("B", "A"))

        reflow.run(body)
