"""Run priorities and fleet-wide concurrency limits: a claim takes lapsed
leases first, then due runs by ``priority`` (highest first) and due time; a
run with ``limits`` is taken only while fewer than ``max`` runs holding each
of its keys are running, else it is *blocked* (``blocked_by``) until a
holder of that key stops running, whose write lets the first blocked run of
the key go.

Every limit key is unique to its test, since limits hold across workflows
and the store may be shared. Only the reclaim test lets a lease lapse in real
time (once, one ``--reflow-short-lease``); every other stop of a holder is a
write the test makes itself."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any, Literal

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import (
    MAX_RUN_LIMITS,
    PRIORITY_RANGE,
    ClaimedRun,
    ConcurrencyLimit,
    Lease,
    NewRun,
    RunRecord,
    ScheduleSpec,
    StepRecord,
    Storage,
)

from ._util import (
    LONG,
    check_times,
    claim_only,
    far_slot,
    read_run,
    refused_creates,
    refused_slots,
    refused_starts,
)

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestConcurrencyLimits", "TestLimitStops", "TestPriorities"]

_APART = 0.003
"""Seconds between creates whose due times must differ by more than a millisecond."""


async def _make(
    s: Storage,
    wf: str,
    value: object = None,
    *,
    priority: int = 0,
    limits: tuple[ConcurrencyLimit, ...] = (),
) -> RunRecord:
    """A pending run of ``wf``; the creates of one test are kept apart in time,
    so their due order is their creation order."""
    made = await s.create_run(NewRun(wf, codec.encode(value), priority=priority, limits=limits))
    check_times(made.run, f"the run create_run returned (priority {priority}, limits {limits})")
    await asyncio.sleep(_APART)
    return made.run


async def _claim(s: Storage, wf: str, limit: int = 10, lease: timedelta = LONG) -> list[str]:
    """Claim up to ``limit`` runs of ``wf``: their ids, in the order claimed."""
    claimed = await s.claim_runs([wf], limit, lease)
    promise(len(claimed) <= limit, P.CLAIM_LIMIT, f"limit {limit}, claimed {len(claimed)}")
    for c in claimed:
        check_times(c, f"the claim of {c.run.id}")
    return [c.run.id for c in claimed]


async def _claimed(s: Storage, wf: str, limit: int = 10) -> list[ClaimedRun]:
    claimed = await s.claim_runs([wf], limit, LONG)
    for c in claimed:
        check_times(c, f"the claim of {c.run.id}")
    return claimed


def _names(ids: list[str], runs: dict[str, str]) -> list[str]:
    """Ids shown by the names the test gave their runs."""
    return [runs.get(run_id, run_id) for run_id in ids]


async def _check_blocked(s: Storage, run_id: str, key: str, name: str, why: str) -> None:
    """The run is pending (or still in the status it was due in), blocked by ``key``."""
    run = await read_run(s, run_id, name)
    promise(
        run.blocked_by == key and run.status not in ("running", "completed", "failed"),
        name,
        f"{why}: {run_id} is {run.status!r} with blocked_by {run.blocked_by!r}, expected "
        f"blocked by {key!r}",
    )


async def _check_free(s: Storage, run_id: str, name: str, why: str) -> RunRecord:
    run = await read_run(s, run_id, name)
    promise(
        run.blocked_by is None,
        name,
        f"{why}: {run_id} ({run.status}) has blocked_by {run.blocked_by!r}, expected None",
    )
    return run


def _stored(
    run: RunRecord, priority: int, limits: tuple[ConcurrencyLimit, ...], where: str
) -> None:
    promise(
        run.priority == priority,
        P.PRIORITY_STORED,
        f"{where}: priority {run.priority!r}, expected {priority!r}",
    )
    promise(
        tuple(run.limits) == limits,
        P.LIMITS_STORED,
        f"{where}: limits {run.limits!r}, expected {limits!r}",
    )


class TestPriorities:
    def test_due_runs_are_claimed_by_priority_then_due_time(self, reflow: Harness) -> None:
        """One at a time, runs come out highest priority first and, within a
        priority, in the order they fell due; a handed-back run goes behind
        the runs of its priority that were waiting, and still ahead of every
        lower one."""
        wf = reflow.unique()
        priorities = [0, 5, -3, 5, 0, 10, PRIORITY_RANGE[0], PRIORITY_RANGE[1]]

        async def body(s: Storage) -> None:
            made = [(await _make(s, wf, i, priority=p)).id for i, p in enumerate(priorities)]
            names = {run_id: f"r{i}(p{priorities[i]})" for i, run_id in enumerate(made)}
            order = sorted(range(len(made)), key=lambda i: (-priorities[i], i))
            expected = [made[i] for i in order]
            got = [(await _claim(s, wf, 1)) for _ in range(2)]
            first = [ids[0] for ids in got if ids]
            promise(
                first == expected[:2],
                P.PRIORITY_ORDER,
                f"the first two claims took {_names(first, names)}, expected "
                f"{_names(expected[:2], names)}",
            )
            # Hand the second back: it now falls due after every run but goes by its priority.
            held = await s.claim_runs([wf], 1, LONG)
            promise(held, P.NEW_RUN_CLAIMABLE, "nothing left to claim after two runs")
            third = held[0]
            await asyncio.sleep(_APART)
            handed = await s.update_run_status(third.run.id, "pending", lease=third.lease)
            promise(handed, P.LIVE_LEASE_ACCEPTED, "a hand-back under a live lease was refused")
            rest = []
            for _ in range(len(made)):
                ids = await _claim(s, wf, 1)
                if not ids:
                    break
                rest.append(ids[0])
            due = {run_id: i for i, run_id in enumerate(made)}
            due[third.run.id] = len(made)  # handed back last
            by = {run_id: priorities[i] for i, run_id in enumerate(made)}
            expected = first + sorted(
                (r for r in made if r not in first), key=lambda r: (-by[r], due[r])
            )
            promise(
                first + rest == expected,
                P.PRIORITY_ORDER,
                f"claimed one at a time as {_names(first + rest, names)}, expected "
                f"{_names(expected, names)} (by priority, then due time; "
                f"{names[third.run.id]} was handed back)",
            )

        reflow.run(body)

    def test_a_batch_claim_takes_the_highest_priorities(self, reflow: Harness) -> None:
        """A claim of fewer runs than are due takes those of the highest
        priorities, whatever the order they fell due in."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            low = [(await _make(s, wf, i)).id for i in range(4)]
            high = [(await _make(s, wf, i, priority=7)).id for i in range(3)]
            got = await _claim(s, wf, 3)
            promise(
                sorted(got) == sorted(high),
                P.PRIORITY_ORDER,
                f"a claim of 3 took {len(set(got) & set(high))} of the 3 runs of priority 7 "
                f"and {len(set(got) & set(low))} of the 4 earlier runs of priority 0",
            )

        reflow.run(body)

    def test_priority_and_limits_read_back_as_created(self, reflow: Harness) -> None:
        """``priority`` and ``limits`` read back as created (0 and none by
        default; limits in the order given), from ``create_run``,
        ``start_child`` and ``claim_schedule_slot``, and no claim, save,
        hand-back or end changes them."""
        wf, cwf, swf = reflow.unique(), reflow.unique("child"), reflow.unique("slot")
        k1, k2 = reflow.unique("key"), reflow.unique("key")
        limits = (ConcurrencyLimit(k2, 3), ConcurrencyLimit(k1, 1))

        async def body(s: Storage) -> None:
            plain = (await s.create_run(NewRun(wf, codec.encode("plain")))).run
            _stored(plain, 0, (), "a run created without priority or limits")
            cases: list[tuple[str, int, tuple[ConcurrencyLimit, ...]]] = [(plain.id, 0, ())]
            choices: list[tuple[int, tuple[ConcurrencyLimit, ...]]] = [
                (PRIORITY_RANGE[1], limits),
                (PRIORITY_RANGE[0], limits[:1]),
                (-2, ()),
            ]
            for priority, chosen in choices:
                new = NewRun(wf, codec.encode(priority), priority=priority, limits=chosen)
                made = (await s.create_run(new)).run
                _stored(made, priority, chosen, f"create_run (priority {priority}) returned")
                cases.append((made.id, priority, chosen))
            if reflow.implements("children"):
                parent = (await s.create_run(NewRun(swf, codec.encode("parent")))).run
                held = await claim_only(s, swf, P.NEW_RUN_CLAIMABLE)
                child_id = reflow.unique("c")
                new = NewRun(cwf, codec.encode("child"), run_id=child_id, priority=4, limits=limits)
                child = await s.start_child(held.lease, "spawn", new)
                promise(child is not None, P.LIVE_LEASE_ACCEPTED, "start_child returned None")
                assert child is not None
                _stored(child, 4, limits, "start_child returned")
                cases.append((child_id, 4, limits))
                await s.finish_run(held.lease, "completed", output=codec.encode(parent.id))
            if reflow.implements("schedules"):
                key, slot = reflow.unique("sched"), far_slot()
                spec = ScheduleSpec(key, cwf, codec.encode(None), "every:60", slot)
                await s.upsert_schedule(spec)
                try:
                    new = NewRun(
                        cwf,
                        codec.encode({"slot": slot}),
                        idempotency_key=f"{key}@{slot.isoformat()}",
                        priority=-9,
                        limits=limits[1:],
                    )
                    fired = await s.claim_schedule_slot(key, slot, slot + timedelta(minutes=1), new)
                    promise(fired is not None, P.SCHEDULE_SLOT_FIRES, "the slot did not fire")
                    assert fired is not None
                    _stored(fired, -9, limits[1:], "claim_schedule_slot returned")
                    cases.append((fired.id, -9, limits[1:]))
                finally:
                    await s.delete_schedule(key)
            for run_id, priority, chosen in cases:
                _stored(await read_run(s, run_id), priority, chosen, f"{run_id} as stored")
            # Every write a run goes through keeps them.
            for workflow in (wf, cwf):
                for _ in range(len(cases)):
                    batch = await _claimed(s, workflow, 10)
                    if not batch:
                        break
                    for c in batch:
                        step = StepRecord("s", "completed", output=codec.encode(1))
                        await s.save_step_result(c.lease, step, LONG)
                        if c.run.attempts == 1:
                            await s.update_run_status(c.run.id, "pending", lease=c.lease)
                        else:
                            await s.finish_run(c.lease, "completed", output=codec.encode(2))
            for run_id, priority, chosen in cases:
                run = await read_run(s, run_id)
                _stored(run, priority, chosen, f"{run_id} ({run.status}) after claims and writes")

        reflow.run(body)

    def test_bad_priorities_and_limits_are_refused_and_write_nothing(self, reflow: Harness) -> None:
        """A priority outside ``PRIORITY_RANGE`` or not an int, and limits that
        are not a tuple of at most ``MAX_RUN_LIMITS`` ``ConcurrencyLimit`` with
        distinct good keys and a max of at least 1, are refused with
        ``ConfigError`` by ``create_run`` (with a fresh key and the key of an
        existing run alike), ``start_child`` and ``claim_schedule_slot``,
        which write nothing. The ends of the range are accepted."""
        wf, cwf, pwf = reflow.unique(), reflow.unique("child"), reflow.unique("parent")
        low, high = PRIORITY_RANGE
        bad_priorities: list[Any] = [high + 1, low - 1, 1.5, True, "1", None]
        good = ConcurrencyLimit("k", 1)
        bad_limits: list[Any] = [
            [good],
            tuple(ConcurrencyLimit(f"k{i}", 1) for i in range(MAX_RUN_LIMITS + 1)),
            (ConcurrencyLimit("k", 0),),
            (ConcurrencyLimit("k", -1),),
            (ConcurrencyLimit("k", True),),
            (ConcurrencyLimit("k", 1.0),),  # type: ignore[arg-type]
            (good, ConcurrencyLimit("k", 2)),
            (("k", 1),),
            (ConcurrencyLimit("", 1),),
            (ConcurrencyLimit("a\x00b", 1),),
            None,
        ]
        bad: list[tuple[str, dict[str, Any]]] = [
            (f"priority={p!r}", {"priority": p}) for p in bad_priorities
        ] + [(f"limits={v!r}", {"limits": v}) for v in bad_limits]

        async def body(s: Storage) -> None:
            await refused_creates(s, wf, bad, P.LIMIT_ARGS)
            for priority in (low, high):
                made = (await s.create_run(NewRun(wf, codec.encode("v"), priority=priority))).run
                _stored(made, priority, (), f"a run of priority {priority}")
            if reflow.implements("children"):
                starts = [(f"start_child({what})", args) for what, args in bad]
                held = await refused_starts(reflow, s, pwf, cwf, starts, P.LIMIT_ARGS)
                stored = await read_run(s, held.run.id)
                promise(
                    stored.status == "running" and stored.lease_epoch == held.lease.epoch,
                    P.LIMIT_ARGS,
                    f"refused starts left the parent {stored.status!r} at {stored.lease_epoch}",
                )
            if reflow.implements("schedules"):
                slots = [(f"claim_schedule_slot with a NewRun of {w}", a) for w, a in bad]
                await refused_slots(reflow, s, cwf, slots, P.LIMIT_ARGS)
                runs = [r.id for r in (await s.list_runs(workflow=cwf)).runs]
                promise(not runs, P.LIMIT_ARGS, f"refused starts and slots made {runs}")

        reflow.run(body)


class TestConcurrencyLimits:
    def test_a_claim_takes_no_more_than_max_holders(self, reflow: Harness) -> None:
        """A claim takes runs of a key while fewer than ``max`` hold it, runs
        it takes itself counting; it passes over the rest, which are left
        pending with ``blocked_by`` the full key (for a run of two limits,
        the full one), and goes on to take runs of other keys and runs
        without limits."""
        wf = reflow.unique()
        key, roomy, other = reflow.unique("key"), reflow.unique("key"), reflow.unique("key")
        two = (ConcurrencyLimit(key, 2),)

        async def body(s: Storage) -> None:
            keyed = [(await _make(s, wf, i, limits=two)).id for i in range(4)]
            both = (await _make(s, wf, "both", limits=(ConcurrencyLimit(roomy, 5), *two))).id
            free = (await _make(s, wf, "free")).id
            solo = (await _make(s, wf, "solo", limits=(ConcurrencyLimit(other, 1),))).id
            got = await _claim(s, wf, 10)
            names = {**{r: f"k{i}" for i, r in enumerate(keyed)}, both: "both", free: "free"}
            names[solo] = "solo"
            holders = [r for r in got if r in keyed or r == both]
            promise(
                len(holders) <= 2,
                P.LIMIT_NEVER_EXCEEDED,
                f"one claim took {_names(holders, names)}: {len(holders)} runs of a key of max 2",
            )
            promise(
                sorted(got) == sorted([*keyed[:2], free, solo]),
                P.LIMIT_BLOCKED,
                f"the claim took {_names(got, names)}; expected the first two of the key, "
                "the run without limits and the only run of another key",
            )
            for run_id in [*keyed[2:], both]:
                await _check_blocked(
                    s, run_id, key, P.LIMIT_BLOCKED, f"{names[run_id]}, passed over by the claim"
                )
                run = await read_run(s, run_id)
                promise(run.status == "pending", P.LIMIT_BLOCKED, f"{names[run_id]}: {run.status}")
            for run_id in got:
                await _check_free(s, run_id, P.LIMIT_BLOCKED, f"{names[run_id]}, claimed")
            running = [r.id for r in (await s.list_runs(workflow=wf, status=["running"])).runs]
            promise(
                len([r for r in running if r in keyed or r == both]) <= 2,
                P.LIMIT_NEVER_EXCEEDED,
                f"running: {_names(running, names)}",
            )

        reflow.run(body)

    def test_a_blocked_run_stays_blocked_while_its_key_is_full(self, reflow: Harness) -> None:
        """A blocked run is taken by no claim while its key stays full, even
        once every run that fell due after it has been taken, and the holder's
        heartbeats and saved steps (it keeps running) free nothing; a run of
        another workflow holding the key counts as well."""
        wf, owf = reflow.unique(), reflow.unique()
        key = reflow.unique("key")
        one = (ConcurrencyLimit(key, 1),)

        async def body(s: Storage) -> None:
            await _make(s, owf, "holder", limits=one)
            holder = await claim_only(s, owf, P.NEW_RUN_CLAIMABLE)
            blocked = (await _make(s, wf, "blocked", limits=one, priority=9)).id
            later = [(await _make(s, wf, i)).id for i in range(3)]
            got = await _claim(s, wf, 1)
            promise(
                got == [later[0]],
                P.LIMIT_BLOCKED,
                f"a claim of one, with the key held by a run of another workflow, took "
                f"{got}, expected the first run without limits",
            )
            await _check_blocked(s, blocked, key, P.LIMIT_BLOCKED, "passed over for a full key")
            for _ in range(3):
                await s.heartbeat_run(holder.lease, LONG)
                step = StepRecord("s", "completed", output=codec.encode(1))
                await s.save_step_result(holder.lease, step, LONG)
                got += await _claim(s, wf, 10)
            promise(
                blocked not in got,
                P.LIMIT_BLOCKED,
                "a blocked run was claimed while the run holding its key kept running",
            )
            promise(sorted(got) == sorted(later), P.NO_LOST_RUNS, f"claimed {got} of {later}")
            await _check_blocked(s, blocked, key, P.LIMIT_BLOCKED, "after its turn came")

        reflow.run(body)

    @pytest.mark.parametrize("how", ["cancelled", "failed"])
    def test_a_run_let_go_that_ends_unclaimed_passes_its_turn_on(
        self, reflow: Harness, how: str
    ) -> None:
        """The holder ends and lets the first blocked run go; that run is
        cancelled (or failed) before any claim takes it: the write that ends
        it lets the next blocked run go, since the key has room, and only
        that one."""
        wf = reflow.unique()
        key = reflow.unique("key")
        one = (ConcurrencyLimit(key, 1),)

        async def body(s: Storage) -> None:
            await _make(s, wf, "holder", limits=one, priority=5)
            holder = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            first = (await _make(s, wf, "first", limits=one, priority=2)).id
            second = (await _make(s, wf, "second", limits=one, priority=1)).id
            third = (await _make(s, wf, "third", limits=one)).id
            promise(await _claim(s, wf) == [], P.LIMIT_BLOCKED, "a claim took a blocked run")
            for run_id in (first, second, third):
                await _check_blocked(s, run_id, key, P.LIMIT_BLOCKED, "behind the holder")
            await s.finish_run(holder.lease, "completed", output=codec.encode(1))
            await _check_free(s, first, P.LIMIT_UNBLOCKED, "the holder ended")
            error = codec.encode({"code": "run_cancelled", "message": "x"})
            status: Literal["cancelled", "failed"] = "cancelled" if how == "cancelled" else "failed"
            ended = await s.update_run_status(first, status, error=error)
            promise(ended, P.CANCEL, f"update_run_status({how}) of a pending run refused")
            await _check_free(s, second, P.LIMIT_TURN_PASSED, f"the run let go was {how} unclaimed")
            await _check_blocked(s, third, key, P.LIMIT_TURN_PASSED, "one turn lets one run go")
            got = await _claim(s, wf)
            promise(
                got == [second],
                P.LIMIT_TURN_PASSED,
                f"after the turn passed on, a claim took {got}, expected [{second}]",
            )

        reflow.run(body)

    def test_a_lapsed_lease_is_reclaimed_whatever_the_limits(self, reflow: Harness) -> None:
        """A run whose lease lapsed is reclaimed first (before a run of a higher
        priority), although it holds a key that is full (it holds it itself),
        and never blocked; a blocked run of the key goes once it ends."""
        wf = reflow.unique()
        key = reflow.unique("key")
        one = (ConcurrencyLimit(key, 1),)

        async def body(s: Storage) -> None:
            dead = (await _make(s, wf, "dead", limits=one)).id
            taken = await _claim(s, wf, 1, reflow.short_lease)
            promise(taken == [dead], P.NEW_RUN_CLAIMABLE, f"claimed {taken}, not the run")
            waiting = (await _make(s, wf, "waiting", limits=one, priority=50)).id
            await reflow.lapse()
            first = await _claimed(s, wf, 1)
            promise(
                [c.run.id for c in first] == [dead],
                P.LIMIT_RECLAIM if not first else P.PRIORITY_ORDER,
                f"a claim of one took {[c.run.id for c in first]}, not the run whose lease "
                "lapsed (it holds a key of max 1, and a run of priority 50 is due)",
            )
            if first:
                promise(first[0].reclaimed, P.RECLAIM_AFTER_LAPSE, "not counted as a reclaim")
            await _check_free(s, dead, P.LIMIT_RECLAIM, "the reclaimed run")
            more = await _claim(s, wf, 10)
            promise(not more, P.LIMIT_NEVER_EXCEEDED, f"with the key held, claimed {more}")
            await _check_blocked(s, waiting, key, P.LIMIT_BLOCKED, "while the reclaim holds it")
            ok = await s.finish_run(first[0].lease, "completed", output=codec.encode(1))
            promise(ok, P.LIVE_LEASE_ACCEPTED, "finishing the reclaimed run was refused")
            await _check_free(s, waiting, P.LIMIT_UNBLOCKED, "after the reclaimed run finished")
            got = await _claim(s, wf, 10)
            promise(got == [waiting], P.LIMIT_UNBLOCKED, f"after the holder ended: {got}")

        reflow.run(body)

    def test_cancel_clears_blocked_by_and_requeue_leaves_it_clear(self, reflow: Harness) -> None:
        """Cancelling (or failing) a blocked run clears ``blocked_by`` and lets
        no other blocked run go (it held nothing); requeueing it leaves it
        pending and not blocked, so the next claim judges it afresh."""
        wf = reflow.unique()
        key = reflow.unique("key")
        one = (ConcurrencyLimit(key, 1),)

        async def body(s: Storage) -> None:
            holder = (await _make(s, wf, "holder", limits=one)).id
            got = await _claim(s, wf, 1)
            promise(got == [holder], P.NEW_RUN_CLAIMABLE, f"claimed {got}, not the holder")
            doomed = (await _make(s, wf, "doomed", limits=one, priority=3)).id
            failed = (await _make(s, wf, "failed", limits=one, priority=2)).id
            other = (await _make(s, wf, "other", limits=one)).id
            got = await _claim(s, wf, 10)
            promise(not got, P.LIMIT_NEVER_EXCEEDED, f"with the key held, claimed {got}")
            for run_id in (doomed, failed, other):
                await _check_blocked(s, run_id, key, P.LIMIT_BLOCKED, "passed over")
            ends: list[tuple[str, Literal["cancelled", "failed"]]] = [
                (doomed, "cancelled"),
                (failed, "failed"),
            ]
            for run_id, status in ends:
                ok = await s.update_run_status(run_id, status, error=codec.encode("x"))
                promise(ok, P.CANCEL, f"ending a blocked run {status} returned False")
                run = await _check_free(s, run_id, P.LIMIT_CANCEL_CLEARS, f"ended {status}")
                promise(run.status == status, P.CANCEL, f"ended {status}: {run.status}")
            await _check_blocked(
                s, other, key, P.LIMIT_UNBLOCKED, "after blocked runs (holding nothing) ended"
            )
            for run_id in (doomed, failed):
                promise(await s.requeue_run(run_id), P.REQUEUE, f"requeue of {run_id} refused")
                run = await _check_free(s, run_id, P.LIMIT_CANCEL_CLEARS, "requeued")
                promise(run.status == "pending", P.REQUEUE, f"requeued: {run.status}")
            got = await _claim(s, wf, 10)
            promise(not got, P.LIMIT_NEVER_EXCEEDED, f"with the key held, claimed {got}")
            for run_id in (doomed, failed):
                await _check_blocked(s, run_id, key, P.LIMIT_BLOCKED, "requeued, passed over")

        reflow.run(body)

    def test_concurrent_claimers_never_exceed_a_limit(self, reflow: Harness) -> None:
        """Claimers on several connections claim and finish runs of keys of max
        1 and 2 at once: no more than ``max`` holders of a key ever run (by
        every claimer's count after each claim, and by the running runs
        listed between operations), and every run ends up finished (each end
        let the next blocked run go)."""
        wf = reflow.unique()
        keys = [(reflow.unique("key"), 1), (reflow.unique("key"), 1), (reflow.unique("key"), 2)]
        maxes = dict(keys)
        total = 36

        def limits_of(i: int) -> tuple[ConcurrencyLimit, ...]:
            first = keys[i % 3]
            if i % 4 == 0:
                second = keys[(i + 1) % 3]
                return (ConcurrencyLimit(*first), ConcurrencyLimit(*second))
            return (ConcurrencyLimit(*first),)

        async def body(s: Storage) -> None:
            made: dict[str, tuple[ConcurrencyLimit, ...]] = {}
            for i in range(total):
                new = NewRun(wf, codec.encode(i), priority=i % 3, limits=limits_of(i))
                made[(await s.create_run(new)).run.id] = limits_of(i)
            stores = [s, *[await reflow.open() for _ in range(3)]]
            held: dict[str, set[str]] = {key: set() for key in maxes}
            done: set[str] = set()
            twice: list[str] = []
            rng = random.Random(7)

            def over() -> list[str]:
                return [f"{k}: {sorted(v)}" for k, v in held.items() if len(v) > maxes[k]]

            async def sample(store: Storage) -> None:
                page = await store.list_runs(workflow=wf, status=["running"], limit=total)
                count = dict.fromkeys(maxes, 0)
                for run in page.runs:
                    for limit in made.get(run.id, ()):
                        count[limit.key] += 1
                wrong = [f"{k}: {n} running" for k, n in count.items() if n > maxes[k]]
                promise(not wrong, P.LIMIT_NEVER_EXCEEDED, f"listed between claims: {wrong}")

            async def claimer(n: int) -> None:
                store = stores[n % len(stores)]
                idle = 0
                while idle < 40 and len(done) < total:
                    batch = await store.claim_runs([wf], 1 + n % 3, LONG)
                    for c in batch:
                        for limit in made[c.run.id]:
                            held[limit.key].add(c.run.id)
                    promise(not over(), P.LIMIT_NEVER_EXCEEDED, f"after a claim: {over()}")
                    idle = 0 if batch else idle + 1
                    await asyncio.sleep(rng.random() * 0.002)
                    if n % 2:
                        await sample(store)
                    for c in batch:
                        for limit in made[c.run.id]:
                            held[limit.key].discard(c.run.id)  # before the write that frees it
                        if c.run.id in done:
                            twice.append(c.run.id)
                        ok = await store.finish_run(c.lease, "completed", output=codec.encode(n))
                        promise(ok, P.LIVE_LEASE_ACCEPTED, f"finishing {c.run.id} was refused")
                        done.add(c.run.id)
                    if not batch:
                        await asyncio.sleep(0.003)

            await asyncio.gather(*(claimer(n) for n in range(8)))
            promise(not twice, P.ONE_LIVE_LEASE, f"claimed again after finishing: {twice}")
            left = []
            for run_id in made:
                run = await read_run(s, run_id)
                if run.status != "completed":
                    left.append(f"{run_id} {run.status} blocked_by={run.blocked_by}")
            promise(
                not left,
                P.LIMIT_UNBLOCKED,
                f"{len(left)} of {total} runs never finished, with no run of their keys "
                f"running: {left[:5]}",
            )

        reflow.run(body)


_STOPS = [
    "finish_completed",
    "finish_failed",
    "fail_with_lease",
    "cancel_with_lease",
    "hand_back",
    "cancel",
    "fail",
    "sleep",
    "wait",
    pytest.param("cascade", marks=pytest.mark.reflow_area("children")),
    pytest.param("wait_children", marks=pytest.mark.reflow_area("children")),
]


async def _stop(s: Storage, reflow: Harness, how: str, c: ClaimedRun) -> None:
    """Stop the running run ``c`` holds (``how``): every write that does must free its slots."""
    value = codec.encode(how)
    lease = c.lease
    ok: object
    if how == "finish_completed":
        ok = await s.finish_run(lease, "completed", output=value)
    elif how == "finish_failed":
        ok = await s.finish_run(lease, "failed", error=value)
    elif how == "fail_with_lease":
        ok = await s.update_run_status(c.run.id, "failed", lease=lease, error=value)
    elif how == "cancel_with_lease":
        ok = await s.update_run_status(c.run.id, "cancelled", lease=lease, error=value)
    elif how == "hand_back":
        ok = await s.update_run_status(c.run.id, "pending", lease=lease)
    elif how in ("cancel", "fail"):
        status: Literal["cancelled", "failed"] = "cancelled" if how == "cancel" else "failed"
        ok = await s.update_run_status(c.run.id, status, error=value)
    elif how == "sleep":
        ok = await s.sleep_run(lease, "nap", timedelta(hours=1))
    elif how == "wait":
        result = await s.wait_run(lease, "hold", "never", timedelta(hours=1))
        ok = result is not None and not result.ready
    else:
        raise AssertionError(how)
    promise(ok, P.LIVE_LEASE_ACCEPTED, f"{how} of the holder under its live lease failed: {ok}")


class TestLimitStops:
    @pytest.mark.parametrize("how", _STOPS)
    def test_each_stop_of_a_holder_lets_the_first_blocked_run_go(
        self, reflow: Harness, how: str
    ) -> None:
        """When a run holding a key of max 1 stops running (``how``), the write
        that stops it lets exactly one blocked run of the key go, the one a
        claim takes first: of the highest priority, the earliest due among
        those; it is claimable at once, and the others stay blocked. The end
        of that one lets the next go, the same way."""
        wf, pwf = reflow.unique(), reflow.unique("parent")
        key = reflow.unique("key")
        one = (ConcurrencyLimit(key, 1),)

        async def body(s: Storage) -> None:
            parent: ClaimedRun | None = None
            if how == "cascade":
                await s.create_run(NewRun(pwf, codec.encode("parent")))
                parent = await claim_only(s, pwf, P.NEW_RUN_CLAIMABLE)
            if how == "cascade":
                assert parent is not None
                new = NewRun(wf, codec.encode("holder"), run_id=reflow.unique("c"), limits=one)
                started = await s.start_child(parent.lease, "spawn", new)
                promise(started is not None, P.LIVE_LEASE_ACCEPTED, "start_child returned None")
                await asyncio.sleep(_APART)
            else:
                await _make(s, wf, "holder", limits=one)
            holder = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            low = (await _make(s, wf, "low", limits=one, priority=-1)).id
            early = (await _make(s, wf, "early", limits=one, priority=5)).id
            late = (await _make(s, wf, "late", limits=one, priority=5)).id
            names = {low: "low", early: "early", late: "late", holder.run.id: "holder"}
            got = await _claim(s, wf, 10)
            promise(not got, P.LIMIT_NEVER_EXCEEDED, f"with the key held, claimed {got}")
            for run_id in (low, early, late):
                await _check_blocked(s, run_id, key, P.LIMIT_BLOCKED, f"{names[run_id]}")
            if how == "cascade":
                assert parent is not None
                ok = await s.update_run_status(parent.run.id, "cancelled", lease=parent.lease)
                promise(ok, P.LIVE_LEASE_ACCEPTED, "cancelling the parent was refused")
                run = await read_run(s, holder.run.id)
                promise(run.status == "cancelled", P.CANCEL_CASCADES, f"holder: {run.status}")
            elif how == "wait_children":
                new = NewRun(reflow.unique("child"), codec.encode(1), run_id=reflow.unique("c"))
                await s.start_child(holder.lease, "spawn", new)
                ready = await s.wait_children(holder.lease, StepRecord("spawn", "waiting"))
                promise(ready is False, P.CHILD_WAIT_PARKS, f"wait_children returned {ready}")
            else:
                await _stop(s, reflow, how, holder)
            why = f"after the holder's {how}"
            await _check_free(s, early, P.LIMIT_UNBLOCKED, f"{why}, the first blocked run")
            for run_id in (low, late):
                await _check_blocked(s, run_id, key, P.LIMIT_UNBLOCKED, f"{why}, {names[run_id]}")
            got = await _claim(s, wf, 10)
            promise(
                got == [early],
                P.LIMIT_UNBLOCKED,
                f"{why}, a claim took {_names(got, names)}, expected the run let go, alone",
            )
            claimed = await read_run(s, early)
            # Its end lets the next go: the later one of the same priority, not the lower one.
            lease = Lease(claimed.id, claimed.lease_epoch)
            ok = await s.finish_run(lease, "completed", output=codec.encode("early"))
            promise(ok, P.LIVE_LEASE_ACCEPTED, "finishing the run let go was refused")
            await _check_free(s, late, P.LIMIT_UNBLOCKED, "after the first let go finished")
            await _check_blocked(s, low, key, P.LIMIT_UNBLOCKED, "after the first let go finished")
            got = await _claim(s, wf, 10)
            promise(
                got == [late],
                P.LIMIT_UNBLOCKED,
                f"after the first let go finished, a claim took {_names(got, names)}",
            )

        reflow.run(body)
