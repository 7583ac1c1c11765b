"""The storage's clock: :meth:`~reflow_core.storage.Storage.now` reports the
*now* the storage judges by, so the engine can compute schedule slots on it.

Each check brackets an operation between two readings of ``now()``: whatever
*now* the operation used must lie between them (give or take the millisecond
the contract lets a store round to). A ``now()`` that reads another clock (the
local one, while the database's judges) fails these checks by the skew."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import ScheduleSpec, Storage

from ._util import claim_one, create

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestStorageClock"]

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
            run = await s.get_run(held.run.id)
            assert run is not None
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
