"""Run deadlines: ``NewRun.deadline`` stores ``RunRecord.deadline_at``, the
storage's now at the run's creation plus the deadline, and caps when a
delayed, sleeping or waiting run falls due, so the engine can claim it at its
deadline and fail it.

The storage only stores and caps: it never fails a run itself. Every time is
judged by the storage's clock: creates and pauses are bracketed between
readings of ``now()``, and a deadline of one ``--reflow-short-lease`` is let
pass in real time (once, for every run of a test together) before expecting
its runs to be claimable."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import NewRun, RunRecord, ScheduleSpec, StepRecord, Storage

from ._util import (
    LONG,
    SLACK,
    check_times,
    claim_one,
    claim_only,
    far_slot,
    off_bracket,
    read_run,
    refused,
    storage_now,
)

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestRunDeadlines"]

_FAR = timedelta(hours=2)
"""A run deadline no test reaches."""
_NAP = timedelta(minutes=30)
"""A sleep or wait that ends before :data:`_FAR` and after :data:`LONG`."""
_TOO_LONG = timedelta(days=36501)
_LONGEST = timedelta(days=36500)


def _show(value: datetime | None) -> str:
    return "None" if value is None else value.isoformat()


def _near(value: datetime | None, want: datetime | None) -> bool:
    """``value`` is ``want``, give or take the millisecond a store may round to."""
    if value is None or want is None:
        return value is want
    return abs(value - want) <= SLACK


async def _create(
    s: Storage,
    workflow: str,
    *,
    deadline: timedelta | None,
    delay: timedelta | None = None,
    key: str | None = None,
    value: object = None,
) -> RunRecord:
    new = NewRun(workflow, codec.encode(value), key, delay=delay, deadline=deadline)
    result = await s.create_run(new)
    check_times(result.run, f"the run create_run returned (deadline {deadline})")
    return result.run


def _check_deadline_at(
    run: RunRecord,
    deadline: timedelta | None,
    where: str,
    name: str = P.RUN_DEADLINE_FROM_STORAGE_CLOCK,
) -> None:
    """``run.deadline_at`` is its ``created_at`` plus ``deadline``, or ``None`` without one."""
    if deadline is None:
        promise(
            run.deadline_at is None,
            name,
            f"{where}: a run created without a deadline has deadline_at {_show(run.deadline_at)}",
        )
        return
    want = run.created_at + deadline
    promise(
        _near(run.deadline_at, want),
        name,
        f"{where}: deadline_at is {_show(run.deadline_at)}, not created_at "
        f"{run.created_at.isoformat()} plus the deadline {deadline}, {want.isoformat()}",
    )


async def _kept(s: Storage, run_id: str, fixed: datetime | None, after: str) -> RunRecord:
    """The run as stored, its ``deadline_at`` still ``fixed``."""
    run = await read_run(s, run_id)
    promise(
        run.deadline_at == fixed,
        P.RUN_DEADLINE_KEPT,
        f"after {after}: deadline_at moved from {_show(fixed)} to {_show(run.deadline_at)}",
    )
    return run


async def _refused(call: Callable[[], Awaitable[Any]], what: str) -> None:
    await refused(call, what, P.RUN_DEADLINE_ARGS)


def _slot_run(workflow: str, key: str, slot: datetime, deadline: Any) -> NewRun:
    """The run firing ``slot`` of schedule ``key``, keyed by the slot as the engine does."""
    return NewRun(
        workflow,
        codec.encode({"slot": slot}),
        idempotency_key=f"{key}@{slot.isoformat()}",
        deadline=deadline,
    )


class TestRunDeadlines:
    def test_deadline_at_is_created_at_plus_the_deadline(self, reflow: Harness) -> None:
        """``deadline_at`` is ``created_at`` (the storage's now) plus the
        deadline, to the millisecond, and ``None`` without one; a delayed run
        is due at the end of its delay, or at its deadline if that comes
        first. A repeat with the key of an existing run returns it unchanged,
        whatever deadline it asks for."""
        wf = reflow.unique()
        cases: list[tuple[timedelta | None, timedelta | None]] = [
            (LONG, None),
            (timedelta(0), None),
            (None, None),
            (None, LONG),
            (_FAR, LONG),
            (LONG, _FAR),
        ]

        async def body(s: Storage) -> None:
            for deadline, delay in cases:
                before = await storage_now(s)
                made = await _create(s, wf, deadline=deadline, delay=delay)
                after = await storage_now(s)
                stored = await read_run(s, made.id)
                for where, run in (("as create_run returned it", made), ("as stored", stored)):
                    where = f"{where} (deadline {deadline}, delay {delay})"
                    wrong = off_bracket(run.created_at, before, after)
                    promise(not wrong, P.RECORD_CREATED_FIXED, f"{where}: created_at {wrong}")
                    _check_deadline_at(run, deadline, where)
                    if delay is None:
                        promise(
                            (run.status, run.wake_at) == ("pending", run.created_at),
                            P.RECORD_WAKE_AT,
                            f"{where}: the run is {run.status!r}, wake_at {_show(run.wake_at)}, "
                            f"created_at {run.created_at.isoformat()}",
                        )
                    elif deadline is None or deadline >= delay:
                        due = run.created_at + delay
                        promise(
                            run.status == "delayed" and _near(run.wake_at, due),
                            P.DELAY_FROM_STORAGE_CLOCK,
                            f"{where}: the run is {run.status!r}, wake_at {_show(run.wake_at)}, "
                            f"not created_at plus the delay, {due.isoformat()}",
                        )
                    else:
                        promise(
                            run.status == "delayed" and _near(run.wake_at, run.deadline_at),
                            P.RUN_DEADLINE_CAPS_DELAY,
                            f"{where}: the run is {run.status!r}, wake_at {_show(run.wake_at)}, "
                            f"not its deadline_at {_show(run.deadline_at)}",
                        )
            first = await _create(s, wf, deadline=LONG, key="kept", value="kept")
            for deadline in (None, timedelta(0), _FAR):
                again = await s.create_run(
                    NewRun(wf, codec.encode("kept"), "kept", deadline=deadline)
                )
                promise(
                    not again.created and again.run.id == first.id,
                    P.IDEMPOTENT_CREATE,
                    f"a repeat with deadline {deadline} gave {again.run.id} "
                    f"(created={again.created}), not {first.id}",
                )
                promise(
                    again.run.deadline_at == first.deadline_at,
                    P.RUN_DEADLINE_KEPT,
                    f"a repeat with deadline {deadline} returned deadline_at "
                    f"{_show(again.run.deadline_at)}, not {_show(first.deadline_at)}",
                )
                await _kept(s, first.id, first.deadline_at, f"a repeat with deadline {deadline}")

        reflow.run(body)

    def test_every_later_operation_keeps_deadline_at(self, reflow: Harness) -> None:
        """Claims, a heartbeat, a save, a sleep and a wait that end before the
        deadline (each keeping its own wake-up), an event, a take, a hand back,
        a finish and a cancel: none moves ``deadline_at``."""
        wf = reflow.unique()
        lease = reflow.long_lease
        done = codec.encode("done")

        async def body(s: Storage) -> None:
            run = await _create(s, wf, deadline=_FAR)
            _check_deadline_at(run, _FAR, "as create_run returned it")
            fixed = run.deadline_at
            held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            promise(
                held.run.deadline_at == fixed,
                P.RUN_DEADLINE_KEPT,
                f"a claim returned deadline_at {_show(held.run.deadline_at)}, not {_show(fixed)}",
            )
            await _kept(s, run.id, fixed, "a claim")
            ok = await s.heartbeat_run(held.lease, lease)
            promise(ok, P.LIVE_LEASE_ACCEPTED, "a heartbeat of a live lease was refused")
            await _kept(s, run.id, fixed, "a heartbeat")
            step = StepRecord("a", "completed", output=codec.encode(1))
            ok = await s.save_step_result(held.lease, step, lease)
            promise(ok, P.LIVE_LEASE_ACCEPTED, "a save under a live lease was refused")
            await _kept(s, run.id, fixed, "a step save")
            wake = await s.sleep_run(held.lease, "nap", timedelta(0))
            promise(wake is not None, P.LIVE_LEASE_ACCEPTED, "a sleep under a live lease refused")
            stored = await _kept(s, run.id, fixed, "a sleep")
            promise(
                _near(stored.wake_at, wake),
                P.RUN_DEADLINE_CAPS_SLEEP,
                f"a sleep ending before the run's deadline {_show(fixed)}: the run's wake_at is "
                f"{_show(stored.wake_at)}, not the sleep's end {_show(wake)}",
            )
            held = await claim_only(s, wf, P.DUE_CLAIMABLE)
            await _kept(s, run.id, fixed, "a claim of the woken run")
            waited = await s.wait_run(held.lease, "approval", "approved", _NAP)
            promise(waited is not None, P.LIVE_LEASE_ACCEPTED, "a wait under a live lease refused")
            assert waited is not None
            stored = await _kept(s, run.id, fixed, "a wait")
            promise(
                waited.deadline is not None and _near(stored.wake_at, waited.deadline),
                P.RUN_DEADLINE_CAPS_WAIT,
                f"a wait of {_NAP} on a run whose deadline is {_FAR} away: the run's wake_at "
                f"is {_show(stored.wake_at)}, not the wait's deadline {_show(waited.deadline)}",
            )
            ok = await s.deliver_event(run.id, "approved", codec.encode("yes"))
            promise(ok, P.EVENT_WAKES, "the event the run waits for was refused")
            await _kept(s, run.id, fixed, "the delivery of the event it waits for")
            held = await claim_only(s, wf, P.EVENT_WAKES)
            taken = await s.take_event(held.lease, "approval", "approved")
            promise(taken is not None, P.LIVE_LEASE_ACCEPTED, "a take under a live lease refused")
            await _kept(s, run.id, fixed, "a take of the event")
            ok = await s.update_run_status(run.id, "pending", lease=held.lease)
            promise(ok, P.HAND_BACK, "a hand back under a live lease was refused")
            await _kept(s, run.id, fixed, "a hand back")
            held = await claim_only(s, wf, P.HAND_BACK)
            last = StepRecord("last", "completed", output=done)
            ok = await s.finish_run(held.lease, "completed", output=done, step=last)
            promise(ok, P.LIVE_LEASE_ACCEPTED, "finish_run under a live lease was refused")
            await _kept(s, run.id, fixed, "finish_run('completed')")
            other = await _create(s, wf, deadline=_FAR)
            ok = await s.update_run_status(other.id, "cancelled", error=codec.encode("stop"))
            promise(ok, P.CANCEL, "cancelling a pending run was refused")
            await _kept(s, other.id, other.deadline_at, "a cancel")

        reflow.run(body)

    def test_a_deadline_caps_a_delay_a_sleep_and_a_wait(self, reflow: Harness) -> None:
        """Runs whose deadline (one short lease) comes before their delay's end,
        their sleep's end, their wait's timeout, or that wait with no timeout:
        each run's ``wake_at`` is its ``deadline_at``, while the sleep's and
        the wait's own ends stay on their step records and in what
        ``sleep_run`` and ``wait_run`` return. None is claimable at first;
        once the deadline has passed, each is, as a first claim."""
        short = reflow.short_lease
        kinds = ("delayed", "sleeping", "waiting", "timed")
        wfs = {kind: reflow.unique() for kind in kinds}

        async def pause(s: Storage, kind: str) -> tuple[RunRecord, datetime | None]:
            """A run of ``kind`` with a deadline of one short lease, and the
            wake-up its own pause asked for (its sleep's or wait's)."""
            wf = wfs[kind]
            if kind == "delayed":
                run = await _create(s, wf, deadline=short, delay=LONG)
                stored = await read_run(s, run.id)
                _check_deadline_at(stored, short, "a delayed run")
                promise(
                    stored.status == "delayed" and _near(stored.wake_at, stored.deadline_at),
                    P.RUN_DEADLINE_CAPS_DELAY,
                    f"a run delayed by {LONG} with a deadline of {short} is {stored.status!r}, "
                    f"wake_at {_show(stored.wake_at)}, not its deadline_at "
                    f"{_show(stored.deadline_at)}",
                )
                return stored, stored.created_at + LONG
            run = await _create(s, wf, deadline=short)
            held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            before = await storage_now(s)
            own: datetime | None
            if kind == "sleeping":
                what = f"a sleep of {LONG}"
                slept = await s.sleep_run(held.lease, "nap", LONG)
                promise(slept is not None, P.LIVE_LEASE_ACCEPTED, f"{what} was refused")
                own, step_name, caps = slept, "nap", P.RUN_DEADLINE_CAPS_SLEEP
            else:
                timeout = LONG if kind == "timed" else None
                what = f"a wait with timeout {timeout}"
                waited = await s.wait_run(held.lease, "approval", "approved", timeout)
                promise(
                    waited is not None and not waited.ready,
                    P.LIVE_LEASE_ACCEPTED,
                    f"{what} returned {waited}",
                )
                assert waited is not None
                own, step_name, caps = waited.deadline, "approval", P.RUN_DEADLINE_CAPS_WAIT
            after = await storage_now(s)
            where = f"{what} on a run with a deadline of {short}"
            if kind == "waiting":
                promise(own is None, caps, f"{where}: the wait's deadline is {_show(own)}")
            else:
                wrong = off_bracket(None if own is None else own - LONG, before, after)
                promise(not wrong, caps, f"{where}: the deadline returned, less {LONG}, {wrong}")
            step = (await s.get_step_results(run.id)).get(step_name)
            check_times(step, f"step {step_name!r}")
            promise(
                step is not None and _near(step.wake_at, own),
                caps,
                f"{where}: its step record reads {step}, not with the pause's own wake_at "
                f"{_show(own)}",
            )
            stored = await read_run(s, run.id)
            promise(
                stored.status == kind.replace("timed", "waiting")
                and _near(stored.wake_at, stored.deadline_at),
                caps,
                f"{where}: the run is {stored.status!r}, wake_at {_show(stored.wake_at)}, not "
                f"its deadline_at {_show(stored.deadline_at)}",
            )
            return stored, own

        async def body(s: Storage) -> None:
            runs = {kind: await pause(s, kind) for kind in kinds}
            early = await s.claim_runs(list(wfs.values()), 10, LONG)
            checked = await storage_now(s)
            first = min(run.deadline_at or checked for run, _ in runs.values())
            if checked + SLACK >= first:
                pytest.skip("a deadline passed before the first claim: the store is too slow")
            for c in early:
                kind = next(k for k, (run, _) in runs.items() if run.id == c.run.id)
                promise(
                    False,
                    P.DELAYED_NOT_CLAIMABLE if kind == "delayed" else P.NOT_DUE_NOT_CLAIMABLE,
                    f"the {kind} run {c.run.id}, due at its deadline "
                    f"{_show(runs[kind][0].deadline_at)}, was claimed by a claim that ended by "
                    f"{checked.isoformat()}",
                )
            await reflow.lapse(short)
            for kind in kinds:
                run, own = runs[kind]
                c = await claim_only(s, wfs[kind], P.RUN_DEADLINE_CLAIMABLE)
                attempts = 1 if kind == "delayed" else 2
                promise(
                    (c.run.id, c.run.status, c.reclaimed, c.run.reclaims, c.run.attempts)
                    == (run.id, "running", False, 0, attempts),
                    P.RUN_DEADLINE_CLAIMABLE,
                    f"the {kind} run {run.id} past its deadline was claimed as {c.run.id}, "
                    f"{c.run.status!r}, reclaimed={c.reclaimed}, reclaims {c.run.reclaims}, "
                    f"attempts {c.run.attempts} (expected {attempts})",
                )
                promise(
                    c.run.deadline_at == run.deadline_at,
                    P.RUN_DEADLINE_KEPT,
                    f"the claim of the {kind} run returned deadline_at "
                    f"{_show(c.run.deadline_at)}, not {_show(run.deadline_at)}",
                )
                if kind == "sleeping":
                    nap = c.steps.get("nap")
                    promise(
                        nap is not None and _near(nap.wake_at, own),
                        P.RUN_DEADLINE_CAPS_SLEEP,
                        f"claimed at its deadline, the run carries its sleep step as {nap}, "
                        f"not with the sleep's own end {_show(own)}",
                    )

        reflow.run(body)

    def test_a_requeue_clears_deadline_at(self, reflow: Harness) -> None:
        """A cancelled or failed run keeps its ``deadline_at``; requeued, it has
        none, and a sleep past its old deadline is no longer capped by it."""
        wf = reflow.unique()
        error = codec.encode({"type": "Boom"})

        async def body(s: Storage) -> None:
            cancelled = await _create(s, wf, deadline=LONG)
            ok = await s.update_run_status(cancelled.id, "cancelled", error=error)
            promise(ok, P.CANCEL, "cancelling a pending run was refused")
            await _kept(s, cancelled.id, cancelled.deadline_at, "a cancel")
            failed = await _create(s, wf, deadline=LONG)
            held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            ok = await s.finish_run(held.lease, "failed", error=error)
            promise(ok, P.LIVE_LEASE_ACCEPTED, "finish_run('failed') under a live lease refused")
            await _kept(s, failed.id, failed.deadline_at, "finish_run('failed')")
            for run, how in ((cancelled, "cancelled"), (failed, "failed")):
                ok = await s.requeue_run(run.id)
                promise(ok, P.REQUEUE_ONLY_ENDED, f"the requeue of a {how} run was refused")
                stored = await read_run(s, run.id)
                promise(
                    (stored.status, stored.deadline_at) == ("pending", None),
                    P.RUN_DEADLINE_REQUEUE,
                    f"requeued, a {how} run with a deadline is {stored.status!r}, deadline_at "
                    f"{_show(stored.deadline_at)}",
                )
            for _ in range(2):
                held = await claim_one(s, wf, name=P.REQUEUE)
                promise(
                    held.run.deadline_at is None,
                    P.RUN_DEADLINE_REQUEUE,
                    f"a claim of a requeued run returned deadline_at {_show(held.run.deadline_at)}",
                )
                wake = await s.sleep_run(held.lease, "nap", _NAP)
                promise(wake is not None, P.LIVE_LEASE_ACCEPTED, "a sleep was refused")
                stored = await read_run(s, held.run.id)
                promise(
                    _near(stored.wake_at, wake),
                    P.RUN_DEADLINE_REQUEUE,
                    f"a requeued run asleep for {_NAP}, past the deadline of {LONG} it had: "
                    f"wake_at {_show(stored.wake_at)}, not the sleep's end {_show(wake)}",
                )

        reflow.run(body)

    @pytest.mark.reflow_area("schedules")
    def test_a_fired_schedule_slot_run_has_its_deadline(self, reflow: Harness) -> None:
        """``claim_schedule_slot`` creates the slot's run with the deadline of
        the ``NewRun`` it is given, as ``create_run`` does; without one, none."""
        key, wf = reflow.unique("sched"), reflow.unique()
        slot = far_slot()
        later = slot + timedelta(minutes=1)

        async def body(s: Storage) -> None:
            await s.upsert_schedule(ScheduleSpec(key, wf, codec.encode(None), "every:60", slot))
            try:
                for at, deadline in ((slot, LONG), (later, None)):
                    following = at + timedelta(minutes=1)
                    before = await storage_now(s)
                    fired = await s.claim_schedule_slot(
                        key, at, following, _slot_run(wf, key, at, deadline)
                    )
                    after = await storage_now(s)
                    promise(fired is not None, P.SCHEDULE_SLOT_FIRES, f"slot {at}: not fired")
                    assert fired is not None
                    check_times(fired, "the fired run")
                    stored = await read_run(s, fired.id, P.SCHEDULE_SLOT_FIRES)
                    for where, run in (("as fired", fired), ("as stored", stored)):
                        where = f"the run of slot {at.isoformat()} {where}"
                        wrong = off_bracket(run.created_at, before, after)
                        promise(not wrong, P.RECORD_CREATED_FIXED, f"{where}: created_at {wrong}")
                        _check_deadline_at(run, deadline, where, P.RUN_DEADLINE_SCHEDULED)
            finally:
                await s.delete_schedule(key)

        reflow.run(body)

    def test_a_bad_deadline_is_refused_and_writes_nothing(self, reflow: Harness) -> None:
        """A deadline that is negative, over 100 years, or not a ``timedelta``
        is refused with ``ConfigError`` before anything is written or looked
        up, by ``create_run`` (with a fresh key and with the key of an
        existing run alike) and by ``claim_schedule_slot`` (which neither
        fires the slot nor moves the schedule). The longest deadline allowed
        is accepted and reads back."""
        wf = reflow.unique()
        bad_deadlines: list[Any] = [timedelta(seconds=-1), _TOO_LONG, 5, 1.5, "10s", True]

        async def body(s: Storage) -> None:
            value = codec.encode("v")
            kept = (await s.create_run(NewRun(wf, value, idempotency_key="kept"))).run
            for deadline in bad_deadlines:
                for key in (None, "fresh", "kept"):
                    new = NewRun(wf, value, idempotency_key=key, deadline=deadline)
                    await _refused(
                        functools.partial(s.create_run, new),
                        f"create_run(deadline={deadline!r}, idempotency_key={key!r})",
                    )
            page = await s.list_runs(workflow=wf)
            promise(
                [run.id for run in page.runs] == [kept.id],
                P.RUN_DEADLINE_ARGS,
                f"after refused creates the workflow holds {[r.id for r in page.runs]}",
            )
            promise(
                await s.get_run(kept.id) == kept,
                P.RUN_DEADLINE_ARGS,
                "a refused create with the key of an existing run changed it",
            )
            made = await _create(s, wf, deadline=_LONGEST)
            stored = await read_run(s, made.id)
            _check_deadline_at(stored, _LONGEST, "a run with a deadline of 100 years")
            if not reflow.implements("schedules"):
                return
            key, fired_wf = reflow.unique("sched"), reflow.unique()
            slot = far_slot()
            spec = ScheduleSpec(key, fired_wf, codec.encode(None), "every:60", slot)
            await s.upsert_schedule(spec)
            try:
                for deadline in bad_deadlines:
                    await _refused(
                        functools.partial(
                            s.claim_schedule_slot,
                            key,
                            slot,
                            slot + timedelta(minutes=1),
                            _slot_run(fired_wf, key, slot, deadline),
                        ),
                        f"claim_schedule_slot with a NewRun of deadline {deadline!r}",
                    )
                found = [r for r in await s.list_schedules() if r.key == key]
                promise(
                    [r.next_run_at for r in found] == [slot],
                    P.RUN_DEADLINE_ARGS,
                    f"after refused slot claims the schedule reads {found}",
                )
                page = await s.list_runs(workflow=fired_wf)
                promise(
                    not page.runs,
                    P.RUN_DEADLINE_ARGS,
                    f"refused slot claims created {[r.id for r in page.runs]}",
                )
            finally:
                await s.delete_schedule(key)

        reflow.run(body)
