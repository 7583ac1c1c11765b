"""Schedules: registering, re-registering without resetting the cadence,
listing, finding the due ones, firing each slot exactly once, and pausing
and resuming.

Schedules are global to the store, so every test names its own keys and
looks only at them, and deletes them when it is done."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_core import codec
from reflow_core.storage import NewRun, RunRecord, ScheduleRecord, ScheduleSpec, Storage

from ._util import decoded

pytestmark = [pytest.mark.reflow_conformance, pytest.mark.reflow_area("schedules")]

__all__ = ["TestClaimSlot", "TestDueSchedules", "TestPauseSchedule", "TestUpsertSchedule"]

EVERY_MINUTE = "every:60"
EVERY_HOUR = "every:3600"
_FAR_PAST = datetime(1971, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC)
"""Due by any clock, and earlier than anything a scheduler writes."""
_EARLIEST = datetime(1970, 1, 3, 4, 5, 6, 789_000, tzinfo=UTC)
"""Earlier still: schedules due before any other test's."""


def _whole_ms(value: datetime) -> datetime:
    """``value`` cut to whole milliseconds, the precision the contract promises."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _future() -> datetime:
    """A time in whole milliseconds a day from now: not due during a test."""
    return _whole_ms(datetime.now(UTC) + timedelta(days=1))


async def _find(s: Storage, key: str) -> ScheduleRecord | None:
    found = [record for record in await s.list_schedules() if record.key == key]
    promise(len(found) <= 1, P.SCHEDULE_STORED, f"{len(found)} schedules with key {key!r}")
    return found[0] if found else None


def _stamps(record: ScheduleRecord | None) -> str:
    if record is None:
        return "(missing)"
    return f"{record.created_at.isoformat()}, {record.updated_at.isoformat()}"


def _differences(record: ScheduleRecord | None, spec: ScheduleSpec) -> list[str]:
    """How a stored schedule differs from ``spec`` (its input compared decoded)."""
    if record is None:
        return [f"schedule {spec.key!r} is missing"]
    found = []
    for name in ("key", "workflow", "recurrence", "next_run_at"):
        if getattr(record, name) != getattr(spec, name):
            found.append(f"{name}: {getattr(record, name)!r} != {getattr(spec, name)!r}")
    if decoded(record.input) != decoded(spec.input):
        found.append(f"input: {record.input!r} != {spec.input!r}")
    return found


def _slot_run(workflow: str, key: str, slot: datetime) -> NewRun:
    """The run firing ``slot`` of schedule ``key``, keyed by the slot as the engine does."""
    stamp = slot.isoformat()
    return NewRun(workflow, codec.encode({"slot": slot}), idempotency_key=f"{key}@{stamp}")


class TestUpsertSchedule:
    def test_upsert_creates_a_schedule(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        spec = ScheduleSpec(key, wf, codec.encode({"n": 1}), EVERY_MINUTE, _future())

        async def body(s: Storage) -> None:
            record = await s.upsert_schedule(spec)
            diff = _differences(record, spec)
            promise(not diff, P.SCHEDULE_STORED, "returned: " + "; ".join(diff))
            stamps = (record.created_at, record.updated_at)
            promise(
                all(stamp.utcoffset() == timedelta(0) for stamp in stamps),
                P.SCHEDULE_STORED,
                f"created_at/updated_at {stamps} are not aware UTC times",
            )
            other = await reflow.open()
            diff = _differences(await _find(other, key), spec)
            promise(not diff, P.SCHEDULE_STORED, "listed: " + "; ".join(diff))
            await s.delete_schedule(key)

        reflow.run(body)

    def test_same_recurrence_keeps_the_next_slot(self, reflow: Harness) -> None:
        key, wf, wf2 = reflow.unique("sched"), reflow.unique(), reflow.unique()
        first = ScheduleSpec(key, wf, codec.encode("first"), EVERY_MINUTE, _future())
        second = ScheduleSpec(
            key,
            wf2,
            codec.encode({"second": [1, 2]}),
            EVERY_MINUTE,
            first.next_run_at + timedelta(hours=5, milliseconds=7),
        )
        kept = ScheduleSpec(key, wf2, second.input, EVERY_MINUTE, first.next_run_at)

        async def body(s: Storage) -> None:
            made = await s.upsert_schedule(first)
            await asyncio.sleep(0.01)
            record = await s.upsert_schedule(second)
            diff = _differences(record, kept)
            promise(not diff, P.SCHEDULE_KEEP_CADENCE, "returned: " + "; ".join(diff))
            listed = await _find(s, key)
            diff = _differences(listed, kept)
            promise(not diff, P.SCHEDULE_KEEP_CADENCE, "listed: " + "; ".join(diff))
            promise(
                listed is not None
                and listed.created_at == made.created_at
                and listed.updated_at > made.updated_at,
                P.SCHEDULE_STORED,
                "registering a schedule again keeps its created_at and moves its updated_at: "
                f"created_at, updated_at first {_stamps(made)}, then {_stamps(listed)}",
            )
            await s.delete_schedule(key)

        reflow.run(body)

    def test_a_changed_recurrence_replaces_the_schedule(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        first = ScheduleSpec(key, wf, codec.encode(1), EVERY_MINUTE, _future())
        second = ScheduleSpec(
            key, wf, codec.encode(2), EVERY_HOUR, first.next_run_at + timedelta(minutes=59)
        )

        async def body(s: Storage) -> None:
            await s.upsert_schedule(first)
            record = await s.upsert_schedule(second)
            diff = _differences(record, second)
            promise(not diff, P.SCHEDULE_STORED, "returned: " + "; ".join(diff))
            diff = _differences(await _find(s, key), second)
            promise(not diff, P.SCHEDULE_STORED, "listed: " + "; ".join(diff))
            await s.delete_schedule(key)

        reflow.run(body)

    def test_delete_removes_a_schedule_once(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        spec = ScheduleSpec(key, wf, codec.encode(None), EVERY_MINUTE, _future())

        async def body(s: Storage) -> None:
            await s.upsert_schedule(spec)
            promise(await s.delete_schedule(key), P.SCHEDULE_DELETE, "delete returned False")
            promise(await _find(s, key) is None, P.SCHEDULE_DELETE, "still listed after delete")
            again = await s.delete_schedule(key)
            promise(not again, P.SCHEDULE_DELETE, "a second delete returned True")
            never = await s.delete_schedule(reflow.unique("sched"))
            promise(not never, P.SCHEDULE_DELETE, "deleting an unknown key returned True")

        reflow.run(body)

    def test_schedules_are_listed_by_key(self, reflow: Harness) -> None:
        prefix, wf = reflow.unique("sched"), reflow.unique()
        keys = [f"{prefix}-{suffix}" for suffix in ("b", "d", "a", "b1", "c")]

        async def body(s: Storage) -> None:
            for key in keys:
                await s.upsert_schedule(
                    ScheduleSpec(key, wf, codec.encode(key), EVERY_MINUTE, _future())
                )
            listed = [record.key for record in await s.list_schedules() if record.key in keys]
            promise(listed == sorted(keys), P.SCHEDULE_ORDER, f"listed {listed}")
            for key in keys:
                await s.delete_schedule(key)

        reflow.run(body)


class TestDueSchedules:
    def test_due_schedules_are_the_past_ones_earliest_first(self, reflow: Harness) -> None:
        prefix, wf = reflow.unique("sched"), reflow.unique()
        times = {
            f"{prefix}-late": _FAR_PAST + timedelta(hours=2),
            f"{prefix}-early": _FAR_PAST,
            f"{prefix}-middle": _FAR_PAST + timedelta(milliseconds=1),
            f"{prefix}-future": _future(),
        }
        due_keys = [f"{prefix}-early", f"{prefix}-middle", f"{prefix}-late"]

        async def body(s: Storage) -> None:
            for key, at in times.items():
                await s.upsert_schedule(ScheduleSpec(key, wf, codec.encode(key), EVERY_HOUR, at))
            due = await s.due_schedules(1000)
            mine = [record.key for record in due if record.key in times]
            promise(mine == due_keys, P.SCHEDULE_DUE, f"due, in order: {mine}")
            horizon = datetime.now(UTC) + timedelta(minutes=1)
            promise(
                all(record.next_run_at <= horizon for record in due),
                P.SCHEDULE_DUE,
                "a schedule due in the future was returned",
            )
            stamps = [record.next_run_at for record in due]
            promise(stamps == sorted(stamps), P.SCHEDULE_DUE, "due schedules not earliest first")
            for record in due:
                if record.key in times:
                    diff = _differences(
                        record,
                        ScheduleSpec(
                            record.key, wf, codec.encode(record.key), EVERY_HOUR, times[record.key]
                        ),
                    )
                    promise(not diff, P.SCHEDULE_STORED, "; ".join(diff))
            for limit in (1, 2):
                first = await s.due_schedules(limit)
                promise(
                    [r.next_run_at for r in first] == stamps[:limit],
                    P.SCHEDULE_DUE,
                    f"due_schedules({limit}) gave {[(r.key, r.next_run_at) for r in first]}",
                )
            for key in times:
                await s.delete_schedule(key)

        reflow.run(body)

    def test_due_schedules_of_some_workflows(self, reflow: Harness) -> None:
        """Three workflows' due schedules (two at one slot, to order by key),
        one not due and one paused, behind more due schedules of a fourth
        workflow than a page holds; read for any set of workflows (a list,
        a tuple or a frozenset, empty too, or a name no schedule has), or
        for every workflow, with any limit."""
        prefix = reflow.unique("sched")
        wf_a, wf_b, wf_c, crowd, absent = (reflow.unique() for _ in range(5))
        ms = timedelta(milliseconds=1)
        plan: dict[str, tuple[str, datetime]] = {
            f"{prefix}-k0": (wf_a, _EARLIEST),
            f"{prefix}-k1": (wf_b, _EARLIEST),
            f"{prefix}-k2": (wf_a, _EARLIEST + ms),
            f"{prefix}-k3": (wf_c, _EARLIEST + timedelta(hours=2)),
            f"{prefix}-k4": (wf_b, _EARLIEST + ms),
            f"{prefix}-k5": (wf_a, _EARLIEST + 5 * ms),
            f"{prefix}-k6": (wf_c, _EARLIEST),
        }
        plan.update(
            (f"{prefix}-crowd{i:02}", (crowd, _EARLIEST - timedelta(days=1) + i * ms))
            for i in range(12)
        )
        later, paused = f"{prefix}-later", f"{prefix}-paused"
        due = sorted(plan, key=lambda key: (plan[key][1], key))

        async def setup(s: Storage) -> None:
            for key, (wf, at) in plan.items():
                await s.upsert_schedule(ScheduleSpec(key, wf, codec.encode(key), EVERY_HOUR, at))
            await s.upsert_schedule(
                ScheduleSpec(later, wf_a, codec.encode(1), EVERY_HOUR, _future())
            )
            await s.upsert_schedule(
                ScheduleSpec(paused, wf_b, codec.encode(2), EVERY_HOUR, _EARLIEST)
            )
            await s.set_schedule_paused(paused, True)

        async def cleanup(s: Storage) -> None:
            for key in [*plan, later, paused]:
                await s.delete_schedule(key)

        reflow.run(setup)
        kinds: list[Callable[[set[str]], Collection[str]]] = [list, tuple, frozenset]
        names = st.sets(st.sampled_from([wf_a, wf_b, wf_c, crowd, absent]))

        @suite_settings()
        @given(
            limit=st.integers(1, 25),
            wanted=st.one_of(st.none(), names),
            kind=st.sampled_from(kinds),
        )
        def check(
            limit: int, wanted: set[str] | None, kind: Callable[[set[str]], Collection[str]]
        ) -> None:
            async def body(s: Storage) -> None:
                if wanted is None:
                    got = await s.due_schedules(limit)
                    expected = due[:limit]
                    # Ours are due before any other test's: the first of the page.
                    keys = [r.key for r in got][: len(expected)]
                    asked = f"due_schedules({limit})"
                else:
                    got = await s.due_schedules(limit, kind(wanted))
                    expected = [key for key in due if plan[key][0] in wanted][:limit]
                    keys = [r.key for r in got]
                    asked = f"due_schedules({limit}, {sorted(wanted)} as a {kind.__name__})"
                promise(
                    keys == expected and len(got) <= limit,
                    P.SCHEDULE_DUE_FILTERED,
                    f"{asked} gave {[(r.key, r.workflow, r.next_run_at) for r in got]}, "
                    f"expected {[(key, *plan[key]) for key in expected]}",
                )
                for record in got:
                    if record.key in plan:
                        wf, at = plan[record.key]
                        spec = ScheduleSpec(
                            record.key, wf, codec.encode(record.key), EVERY_HOUR, at
                        )
                        diff = _differences(record, spec)
                        promise(not diff, P.SCHEDULE_STORED, "; ".join(diff))

            reflow.run(body)

        try:
            check()
        finally:
            reflow.run(cleanup)


class TestClaimSlot:
    def test_the_first_claim_of_a_slot_fires_it(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        slot = _future()
        following = slot + timedelta(minutes=1)
        spec = ScheduleSpec(key, wf, codec.encode({"n": 1}), EVERY_MINUTE, slot)
        run = _slot_run(wf, key, slot)

        async def body(s: Storage) -> None:
            await s.upsert_schedule(spec)
            fired = await s.claim_schedule_slot(key, slot, following, run)
            promise(fired is not None, P.SCHEDULE_SLOT_FIRES, "claiming the current slot: None")
            assert fired is not None
            _check_slot_run(fired, run)
            stored = await s.get_run(fired.id)
            promise(stored is not None, P.SCHEDULE_SLOT_FIRES, "the fired run is not stored")
            record = await _find(s, key)
            promise(
                record is not None and record.next_run_at == following,
                P.SCHEDULE_SLOT_FIRES,
                f"next_run_at {record and record.next_run_at}, expected {following}",
            )
            claimed = await s.claim_runs([wf], 10, reflow.long_lease)
            promise(
                [c.run.id for c in claimed] == [fired.id],
                P.SCHEDULE_SLOT_FIRES,
                f"the fired run is not claimable: claimed {claimed}",
            )
            again = await s.claim_schedule_slot(key, slot, following, run)
            promise(again is None, P.SCHEDULE_SLOT_ONCE, f"the same slot fired again: {again}")
            page = await s.list_runs(workflow=wf)
            promise(len(page.runs) == 1, P.SCHEDULE_SLOT_ONCE, f"{len(page.runs)} runs")
            record = await _find(s, key)
            promise(
                record is not None and record.next_run_at == following,
                P.SCHEDULE_SLOT_ONCE,
                f"a refused claim moved next_run_at to {record and record.next_run_at}",
            )
            await s.delete_schedule(key)

        reflow.run(body)

    def test_only_the_current_slot_fires(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        slot = _future()
        spec = ScheduleSpec(key, wf, codec.encode(None), EVERY_MINUTE, slot)
        step = timedelta(minutes=1)

        async def body(s: Storage) -> None:
            await s.upsert_schedule(spec)
            for wrong in (slot - timedelta(milliseconds=1), slot + step):
                fired = await s.claim_schedule_slot(
                    key, wrong, wrong + step, _slot_run(wf, key, wrong)
                )
                promise(fired is None, P.SCHEDULE_SLOT_ONCE, f"slot {wrong} fired at {slot}")
            page = await s.list_runs(workflow=wf)
            promise(list(page.runs) == [], P.SCHEDULE_SLOT_ONCE, f"{len(page.runs)} runs")
            record = await _find(s, key)
            promise(
                record is not None and record.next_run_at == slot,
                P.SCHEDULE_SLOT_ONCE,
                f"a refused claim moved next_run_at to {record and record.next_run_at}",
            )
            ids = []
            for i in range(3):
                current = slot + step * i
                fired = await s.claim_schedule_slot(
                    key, current, current + step, _slot_run(wf, key, current)
                )
                promise(fired is not None, P.SCHEDULE_SLOT_FIRES, f"slot {i} did not fire")
                assert fired is not None
                ids.append(fired.id)
            promise(len(set(ids)) == 3, P.SCHEDULE_SLOT_FIRES, f"three slots fired {ids}")
            record = await _find(s, key)
            promise(
                record is not None and record.next_run_at == slot + step * 3,
                P.SCHEDULE_SLOT_FIRES,
                f"after three slots next_run_at is {record and record.next_run_at}",
            )
            await s.delete_schedule(key)

        reflow.run(body)

    def test_concurrent_claims_fire_a_slot_once(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        slot = _future()
        following = slot + timedelta(minutes=1)
        spec = ScheduleSpec(key, wf, codec.encode(None), EVERY_MINUTE, slot)
        run = _slot_run(wf, key, slot)

        async def body(s: Storage) -> None:
            stores = [s, *[await reflow.open() for _ in range(3)]]
            await s.upsert_schedule(spec)
            results = await asyncio.gather(
                *(
                    stores[i % len(stores)].claim_schedule_slot(key, slot, following, run)
                    for i in range(12)
                )
            )
            fired = [result for result in results if result is not None]
            promise(len(fired) == 1, P.SCHEDULE_SLOT_ONCE, f"{len(fired)} of 12 claims fired")
            page = await s.list_runs(workflow=wf)
            promise(len(page.runs) == 1, P.SCHEDULE_SLOT_ONCE, f"{len(page.runs)} runs created")
            record = await _find(s, key)
            promise(
                record is not None and record.next_run_at == following,
                P.SCHEDULE_SLOT_FIRES,
                f"next_run_at {record and record.next_run_at}, expected {following}",
            )
            await s.delete_schedule(key)

        reflow.run(body)

    def test_a_missing_schedule_fires_nothing(self, reflow: Harness) -> None:
        key, gone, wf = reflow.unique("sched"), reflow.unique("sched"), reflow.unique()
        slot = _future()
        following = slot + timedelta(minutes=1)

        async def body(s: Storage) -> None:
            await s.upsert_schedule(ScheduleSpec(gone, wf, codec.encode(1), EVERY_MINUTE, slot))
            await s.delete_schedule(gone)
            for name in (key, gone):
                fired = await s.claim_schedule_slot(
                    name, slot, following, _slot_run(wf, name, slot)
                )
                promise(fired is None, P.SCHEDULE_SLOT_ONCE, f"a missing schedule fired {fired}")
            page = await s.list_runs(workflow=wf)
            promise(list(page.runs) == [], P.SCHEDULE_SLOT_ONCE, f"{len(page.runs)} runs")
            promise(await _find(s, key) is None, P.SCHEDULE_DELETE, "a claim created a schedule")
            promise(await _find(s, gone) is None, P.SCHEDULE_DELETE, "a claim revived a schedule")

        reflow.run(body)


def _check_slot_run(fired: RunRecord, run: NewRun) -> None:
    promise(
        (fired.workflow, fired.status, fired.idempotency_key)
        == (run.workflow, "pending", run.idempotency_key),
        P.SCHEDULE_SLOT_FIRES,
        f"fired {fired.workflow!r} {fired.status!r} with key {fired.idempotency_key!r}, "
        f"expected a pending {run.workflow!r} with key {run.idempotency_key!r}",
    )
    promise(
        decoded(fired.input) == decoded(run.input),
        P.SCHEDULE_SLOT_FIRES,
        f"input {fired.input!r}, expected {run.input!r}",
    )
    counts = (fired.attempts, fired.reclaims, fired.lease_epoch)
    promise(
        counts == (0, 0, 0), P.CREATE_SHAPE, f"a fired run has attempts, reclaims, epoch {counts}"
    )


def _paused(record: ScheduleRecord | None) -> str:
    return "(missing)" if record is None else "paused" if record.paused else "not paused"


def _pause_differences(
    record: ScheduleRecord | None, before: ScheduleRecord, paused: bool, next_run_at: datetime
) -> list[str]:
    """How a schedule differs from ``before`` with its flag and next slot set."""
    if record is None:
        return [f"schedule {before.key!r} is missing"]
    found = []
    if record.paused is not paused:
        found.append(f"paused is {record.paused!r}, expected {paused!r}")
    if record.next_run_at != next_run_at:
        found.append(f"next_run_at {record.next_run_at.isoformat()} != {next_run_at.isoformat()}")
    for name in ("key", "workflow", "recurrence", "created_at"):
        if getattr(record, name) != getattr(before, name):
            found.append(f"{name}: {getattr(record, name)!r} != {getattr(before, name)!r}")
    if decoded(record.input) != decoded(before.input):
        found.append(f"input: {record.input!r} != {before.input!r}")
    return found


async def _set_paused(
    s: Storage,
    before: ScheduleRecord,
    paused: bool,
    next_run_at: datetime | None = None,
) -> ScheduleRecord:
    """Pause or resume ``before``'s schedule; check what it returns and what is listed."""
    record = await s.set_schedule_paused(before.key, paused, next_run_at=next_run_at)
    slot = before.next_run_at if next_run_at is None else next_run_at
    what = f"set_schedule_paused({before.key!r}, {paused}, next_run_at={next_run_at})"
    diff = _pause_differences(record, before, paused, slot)
    promise(not diff, P.SCHEDULE_PAUSE_SET, f"{what} returned: " + "; ".join(diff))
    diff = _pause_differences(await _find(s, before.key), before, paused, slot)
    promise(not diff, P.SCHEDULE_PAUSE_SET, f"after {what}, listed: " + "; ".join(diff))
    assert record is not None
    return record


async def _due_keys(s: Storage, keys: set[str]) -> list[str]:
    return [record.key for record in await s.due_schedules(10_000) if record.key in keys]


class TestPauseSchedule:
    def test_a_paused_schedule_is_not_due_and_its_slot_does_not_fire(self, reflow: Harness) -> None:
        key, running, wf = reflow.unique("sched"), reflow.unique("sched"), reflow.unique()
        slot = _FAR_PAST
        following = slot + timedelta(hours=1)
        keys = {key, running}

        async def body(s: Storage) -> None:
            other = await reflow.open()
            made = await s.upsert_schedule(ScheduleSpec(key, wf, codec.encode(1), EVERY_HOUR, slot))
            await s.upsert_schedule(ScheduleSpec(running, wf, codec.encode(2), EVERY_HOUR, slot))
            promise(not made.paused, P.SCHEDULE_PAUSE_KEPT, "a new schedule is paused")
            due = await _due_keys(s, keys)
            promise(sorted(due) == sorted(keys), P.SCHEDULE_DUE, f"due: {due}")
            paused = await _set_paused(s, made, True)
            # Pausing a paused schedule changes nothing.
            paused = await _set_paused(other, paused, True)
            for reader in (s, other):
                due = await _due_keys(reader, keys)
                promise(
                    due == [running],
                    P.SCHEDULE_PAUSED_NOT_DUE,
                    f"due with {key} paused: {due}",
                )
            fired = await other.claim_schedule_slot(key, slot, following, _slot_run(wf, key, slot))
            promise(fired is None, P.SCHEDULE_PAUSED_NO_FIRE, f"the slot fired {fired}")
            page = await s.list_runs(workflow=wf)
            promise(
                list(page.runs) == [],
                P.SCHEDULE_PAUSED_NO_FIRE,
                f"firing a paused schedule's slot created {len(page.runs)} runs",
            )
            record = await _find(s, key)
            promise(
                record is not None and record.next_run_at == slot and record.paused,
                P.SCHEDULE_PAUSED_NO_FIRE,
                f"a refused slot left next_run_at {record and record.next_run_at}, "
                f"{_paused(record)}",
            )
            # Resumed, with its next slot where it was: due, and it fires.
            resumed = await _set_paused(other, paused, False)
            await _set_paused(s, resumed, False)
            due = await _due_keys(s, keys)
            promise(sorted(due) == sorted(keys), P.SCHEDULE_DUE, f"due once resumed: {due}")
            fired = await s.claim_schedule_slot(key, slot, following, _slot_run(wf, key, slot))
            promise(fired is not None, P.SCHEDULE_SLOT_FIRES, "a resumed schedule did not fire")
            for name in keys:
                await s.delete_schedule(name)

        reflow.run(body)

    def test_resuming_at_a_new_slot_moves_the_schedule_there(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        slot = _FAR_PAST
        later = _future()
        step = timedelta(hours=1)

        async def body(s: Storage) -> None:
            made = await s.upsert_schedule(ScheduleSpec(key, wf, codec.encode(1), EVERY_HOUR, slot))
            # Pausing may move the slot too.
            paused = await _set_paused(s, made, True, slot + timedelta(milliseconds=1))
            await _set_paused(s, paused, False, later)
            due = await _due_keys(s, {key})
            promise(due == [], P.SCHEDULE_DUE, f"resumed at {later.isoformat()}, yet due")
            for missed in (slot, paused.next_run_at):
                fired = await s.claim_schedule_slot(
                    key, missed, missed + step, _slot_run(wf, key, missed)
                )
                promise(
                    fired is None,
                    P.SCHEDULE_SLOT_ONCE,
                    f"slot {missed.isoformat()}, skipped on resume, fired",
                )
            fired = await s.claim_schedule_slot(key, later, later + step, _slot_run(wf, key, later))
            promise(fired is not None, P.SCHEDULE_SLOT_FIRES, "the slot resumed at did not fire")
            record = await _find(s, key)
            promise(
                record is not None and record.next_run_at == later + step and not record.paused,
                P.SCHEDULE_SLOT_FIRES,
                f"after firing, next_run_at {record and record.next_run_at}, {_paused(record)}",
            )
            await s.delete_schedule(key)

        reflow.run(body)

    def test_registering_again_keeps_a_schedule_paused(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        slot = _FAR_PAST

        async def body(s: Storage) -> None:
            made = await s.upsert_schedule(ScheduleSpec(key, wf, codec.encode(1), EVERY_HOUR, slot))
            await _set_paused(s, made, True)
            changes = (
                ("the same recurrence", EVERY_HOUR, slot + timedelta(minutes=5), slot),
                ("another recurrence", EVERY_MINUTE, slot + timedelta(minutes=7), None),
            )
            for what, recurrence, next_run_at, kept in changes:
                spec = ScheduleSpec(key, wf, codec.encode(what), recurrence, next_run_at)
                record = await s.upsert_schedule(spec)
                listed = await _find(s, key)
                for seen, via in ((record, "returned"), (listed, "listed")):
                    promise(
                        seen is not None and seen.paused,
                        P.SCHEDULE_PAUSE_KEPT,
                        f"registered again with {what}, the paused schedule is {via} "
                        f"{_paused(seen)}",
                    )
                    promise(
                        seen is not None and seen.next_run_at == (kept or next_run_at),
                        P.SCHEDULE_KEEP_CADENCE if kept else P.SCHEDULE_STORED,
                        f"registered again with {what}, next_run_at {via} is "
                        f"{seen and seen.next_run_at}",
                    )
                due = await _due_keys(s, {key})
                promise(due == [], P.SCHEDULE_PAUSED_NOT_DUE, f"due after {what}: {due}")
            # A running schedule stays running when registered again.
            resumed = await s.set_schedule_paused(key, False)
            promise(
                resumed is not None and not resumed.paused,
                P.SCHEDULE_PAUSE_SET,
                f"resumed: {resumed}",
            )
            spec = ScheduleSpec(key, wf, codec.encode(3), EVERY_MINUTE, slot)
            again = await s.upsert_schedule(spec)
            promise(not again.paused, P.SCHEDULE_PAUSE_KEPT, "registering again paused it")
            # Deleted while paused, then registered anew: a new schedule is not paused.
            await s.set_schedule_paused(key, True)
            await s.delete_schedule(key)
            fresh = await s.upsert_schedule(spec)
            listed = await _find(s, key)
            promise(
                not fresh.paused and listed is not None and not listed.paused,
                P.SCHEDULE_PAUSE_KEPT,
                f"a schedule registered after the paused one was deleted is returned "
                f"{_paused(fresh)} and listed {_paused(listed)}",
            )
            due = await _due_keys(s, {key})
            promise(due == [key], P.SCHEDULE_PAUSE_KEPT, f"the new schedule is not due: {due}")
            await s.delete_schedule(key)

        reflow.run(body)

    def test_pausing_a_missing_schedule_returns_none_and_creates_nothing(
        self, reflow: Harness
    ) -> None:
        key, gone, wf = reflow.unique("sched"), reflow.unique("sched"), reflow.unique()

        async def body(s: Storage) -> None:
            await s.upsert_schedule(ScheduleSpec(gone, wf, codec.encode(1), EVERY_HOUR, _FAR_PAST))
            await s.delete_schedule(gone)
            for name in (key, gone):
                for paused, at in ((True, None), (False, None), (False, _future())):
                    got = await s.set_schedule_paused(name, paused, next_run_at=at)
                    promise(
                        got is None,
                        P.SCHEDULE_PAUSE_SET,
                        f"set_schedule_paused of a missing schedule returned {got}",
                    )
                promise(
                    await _find(s, name) is None,
                    P.SCHEDULE_PAUSE_SET,
                    f"set_schedule_paused of missing schedule {name!r} created it",
                )

        reflow.run(body)
