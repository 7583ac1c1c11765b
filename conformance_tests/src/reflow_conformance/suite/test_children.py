"""Child runs: ``start_child`` creates a run linked to the run (and step) that
started it, fenced by the parent's lease and idempotent by the child's id;
``wait_children`` parks the parent until its last unfinished child at a step
ends, and that end wakes it in the same write; cancelling a run cancels every
unfinished run below it; ``list_children`` lists a run's children.

Children go to workflows of their own, so a claim of the parent's workflow
never takes a child and the other way round. Only the fencing test lets a
lease lapse in real time (once, one ``--reflow-short-lease``); every other
wait is for an end the test writes itself."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.errors import StorageError
from reflow_core.storage import (
    CHILDREN_WAIT_PREFIX,
    ClaimedRun,
    Lease,
    NewRun,
    RunRecord,
    StepRecord,
    Storage,
)

from ._util import (
    LONG,
    SLACK,
    check_times,
    claim_one,
    claim_only,
    fenced_writes,
    off_bracket,
    read_run,
    refused,
    step_differences,
    storage_now,
)

pytestmark = [pytest.mark.reflow_conformance, pytest.mark.reflow_area("children")]

__all__ = ["TestChildCancel", "TestChildStart", "TestChildWait"]

_FAR = timedelta(hours=2)
"""A parent's deadline no test reaches."""
_FARTHER = timedelta(hours=3)
"""A child's deadline later than :data:`_FAR`."""


def _show(value: datetime | None) -> str:
    return "None" if value is None else value.isoformat()


def _near(value: datetime | None, want: datetime | None) -> bool:
    """``value`` is ``want``, give or take the millisecond a store may round to."""
    if value is None or want is None:
        return value is want
    return abs(value - want) <= SLACK


def _waiting(step: str) -> StepRecord:
    """The record the engine passes to ``wait_children`` at ``step``."""
    return StepRecord(step, "waiting", attempts=1)


async def _parent(
    s: Storage, wf: str, *, deadline: timedelta | None = None, lease: timedelta = LONG
) -> ClaimedRun:
    """A run of ``wf`` (the only one), created and claimed."""
    new = NewRun(wf, codec.encode("parent"), deadline=deadline)
    await s.create_run(new)
    return await claim_only(s, wf, P.NEW_RUN_CLAIMABLE, lease)


async def _start(
    s: Storage,
    lease: Lease,
    step: str,
    wf: str,
    child_id: str,
    *,
    value: object = "child",
    delay: timedelta | None = None,
    deadline: timedelta | None = None,
) -> RunRecord:
    """``start_child`` under a live lease, which must start (or return) the child."""
    new = NewRun(wf, codec.encode(value), run_id=child_id, delay=delay, deadline=deadline)
    child = await s.start_child(lease, step, new)
    promise(
        child is not None,
        P.LIVE_LEASE_ACCEPTED,
        f"start_child of {child_id} at step {step!r} under a live lease returned None",
    )
    assert child is not None
    check_times(child, f"child {child_id} as start_child returned it")
    return child


async def _park(s: Storage, lease: Lease, step: str, why: str) -> None:
    """``wait_children`` at ``step``, which must park the run."""
    ready = await s.wait_children(lease, _waiting(step))
    promise(
        ready is False,
        P.CHILD_WAIT_PARKS,
        f"wait_children at step {step!r} with {why} returned {ready}, not False",
    )


async def _unclaimable(s: Storage, wf: str, name: str, why: str) -> None:
    claimed = await s.claim_runs([wf], 10, LONG)
    promise(not claimed, name, f"{why}: claimed {[c.run.id for c in claimed]}")


async def _woken(s: Storage, wf: str, parent: RunRecord, why: str) -> ClaimedRun:
    """Claim the parent, woken by ``why``: a first claim under a new lease."""
    c = await claim_only(s, wf, P.CHILD_END_WAKES)
    promise(
        (c.run.id, c.run.status, c.reclaimed, c.run.reclaims, c.run.lease_epoch)
        == (parent.id, "running", False, 0, parent.lease_epoch + 1),
        P.CHILD_END_WAKES,
        f"{why}: the parent was claimed as {c.run.id}, {c.run.status!r}, "
        f"reclaimed={c.reclaimed}, reclaims {c.run.reclaims}, epoch {c.run.lease_epoch} "
        f"(expected {parent.id}, a first claim at epoch {parent.lease_epoch + 1})",
    )
    return c


async def _finish(s: Storage, wf: str, status: str) -> ClaimedRun:
    """Claim the one run of ``wf`` and end it ``status`` under its lease."""
    c = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
    value = codec.encode(status)
    if status == "completed":
        ok = await s.finish_run(c.lease, "completed", output=value)
    elif status == "failed":
        ok = await s.finish_run(c.lease, "failed", error=value)
    else:
        ok = await s.update_run_status(c.run.id, "failed", lease=c.lease, error=value)
    promise(ok, P.LIVE_LEASE_ACCEPTED, f"ending a child ({status}) under its live lease refused")
    return c


async def _refused(call: Callable[[], Awaitable[Any]], what: str) -> None:
    await refused(call, what, P.CHILD_ARGS)


class TestChildStart:
    def test_a_child_is_created_linked_to_its_parent(self, reflow: Harness) -> None:
        """A child is created as ``create_run`` creates a run (pending, or
        delayed with a delay), its ``parent_id`` the lease's run and its
        ``parent_step`` the step; the parent keeps running under its lease."""
        wf, cwf, dwf = reflow.unique(), reflow.unique("child"), reflow.unique("child")
        cid, did = reflow.unique("c"), reflow.unique("c")

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            before = await storage_now(s)
            made = await _start(s, held.lease, "spawn", cwf, cid, value={"n": 1})
            after = await storage_now(s)
            stored = await read_run(s, cid, P.CHILD_START)
            for where, run in (("as start_child returned it", made), ("as stored", stored)):
                found = []
                for field, want in (
                    ("id", cid),
                    ("workflow", cwf),
                    ("status", "pending"),
                    ("attempts", 0),
                    ("reclaims", 0),
                    ("lease_epoch", 0),
                    ("parent_id", held.run.id),
                    ("parent_step", "spawn"),
                    ("idempotency_key", None),
                    ("output", None),
                    ("error", None),
                    ("deadline_at", None),
                ):
                    if getattr(run, field) != want:
                        found.append(f"{field} is {getattr(run, field)!r}, expected {want!r}")
                if codec.decode(run.input) != {"n": 1}:
                    found.append(f"input is {run.input!r}")
                wrong = off_bracket(run.created_at, before, after)
                if wrong:
                    found.append(f"created_at {wrong}")
                promise(not found, P.CHILD_START, f"the child {where}: " + "; ".join(found))
            late = await _start(s, held.lease, "later", dwf, did, delay=LONG)
            promise(
                late.status == "delayed" and _near(late.wake_at, late.created_at + LONG),
                P.CHILD_START,
                f"a child with a delay of {LONG} is {late.status!r}, wake_at "
                f"{_show(late.wake_at)} (created_at {late.created_at.isoformat()})",
            )
            promise(
                (late.parent_id, late.parent_step) == (held.run.id, "later"),
                P.CHILD_START,
                f"a delayed child has parent_id {late.parent_id!r}, "
                f"parent_step {late.parent_step!r}",
            )
            await _unclaimable(s, dwf, P.DELAYED_NOT_CLAIMABLE, "a child delayed by 10 minutes")
            claimed = await claim_only(s, cwf, P.CHILD_START)
            promise(claimed.run.id == cid, P.CHILD_START, f"claimed {claimed.run.id}, not {cid}")
            parent = await read_run(s, held.run.id)
            promise(
                parent.status == "running" and parent.lease_epoch == held.lease.epoch,
                P.CHILD_START,
                f"after starting children the parent is {parent.status!r} at epoch "
                f"{parent.lease_epoch}, not running under its lease #{held.lease.epoch}",
            )
            beat = await s.heartbeat_run(held.lease, LONG)
            promise(beat, P.CHILD_START, "the parent's lease was refused after start_child")

        reflow.run(body)

    def test_starting_a_child_again_returns_it_and_writes_nothing(self, reflow: Harness) -> None:
        """The same id at the same step, asked again (with another input, a
        delay, a deadline; later under a new lease of the parent; after the
        child ran and finished) returns the child as stored and changes nothing."""
        wf, cwf = reflow.unique(), reflow.unique("child")
        cid = reflow.unique("c")

        async def check(s: Storage, lease: Lease, stored: RunRecord, when: str) -> None:
            asks = (
                NewRun(cwf, codec.encode("child"), run_id=cid),
                NewRun(cwf, codec.encode("other"), run_id=cid, delay=LONG, deadline=LONG),
            )
            for new in asks:
                again = await s.start_child(lease, "spawn", new)
                promise(
                    again == stored,
                    P.CHILD_START_ONCE,
                    f"{when}, start_child of the existing child returned {again}, "
                    f"not the child as stored: {stored}",
                )
                now = await read_run(s, cid, P.CHILD_START_ONCE)
                promise(
                    now == stored,
                    P.CHILD_START_ONCE,
                    f"{when}, start_child of the existing child changed it from {stored} to {now}",
                )
            children = await s.list_children(lease.run_id)
            promise(
                [c.id for c in children] == [cid],
                P.CHILD_START_ONCE,
                f"{when}, the parent's children are {[c.id for c in children]}, not [{cid}]",
            )

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            await _start(s, held.lease, "spawn", cwf, cid)
            running = await claim_only(s, cwf, P.NEW_RUN_CLAIMABLE)
            ok = await s.save_step_result(
                running.lease, StepRecord("x", "completed", output=codec.encode(1)), LONG
            )
            promise(ok, P.LIVE_LEASE_ACCEPTED, "a child's save under its live lease refused")
            stored = await read_run(s, cid)
            await check(s, held.lease, stored, "while the child runs")
            promise(
                set(await s.get_step_results(cid)) == {"x"},
                P.CHILD_START_ONCE,
                "a repeated start_child changed the running child's steps",
            )
            beat = await s.heartbeat_run(running.lease, LONG)
            promise(beat, P.CHILD_START_ONCE, "a repeated start_child broke the child's lease")
            stored = await read_run(s, cid)
            ok = await s.update_run_status(held.run.id, "pending", lease=held.lease)
            promise(ok, P.HAND_BACK, "the parent's hand back was refused")
            replay = await claim_only(s, wf, P.HAND_BACK)
            await check(s, replay.lease, stored, "under the parent's next lease")
            ok = await s.finish_run(running.lease, "completed", output=codec.encode("done"))
            promise(ok, P.LIVE_LEASE_ACCEPTED, "the child's finish under its live lease refused")
            done = await read_run(s, cid)
            await check(s, replay.lease, done, "after the child completed")

        reflow.run(body)

    def test_a_taken_id_is_refused_and_nothing_is_written(self, reflow: Harness) -> None:
        """An id taken by a plain run, by a child of the same parent at
        another step, or by another parent's child at the same step raises
        ``StorageError`` and changes neither that run nor the parent's children."""
        wf, cwf = reflow.unique(), reflow.unique("child")
        plain, mine, theirs = reflow.unique("r"), reflow.unique("c"), reflow.unique("c")

        async def body(s: Storage) -> None:
            await s.create_run(NewRun(cwf, codec.encode("plain"), run_id=plain))
            first = await _parent(s, wf)
            other = await _parent(s, wf)
            await _start(s, other.lease, "spawn", cwf, theirs)
            await _start(s, first.lease, "elsewhere", cwf, mine)
            for taken, what in (
                (plain, "a run that is nobody's child"),
                (mine, "the parent's child at another step"),
                (theirs, "another run's child at the same step"),
            ):
                before = await read_run(s, taken)
                new = NewRun(cwf, codec.encode("again"), run_id=taken)
                try:
                    got = await s.start_child(first.lease, "spawn", new)
                except StorageError:
                    pass
                else:
                    promise(False, P.CHILD_ID_TAKEN, f"the id of {what}: returned {got}")
                after = await read_run(s, taken)
                promise(
                    after == before,
                    P.CHILD_ID_TAKEN,
                    f"a refused start_child with the id of {what} changed it from {before} "
                    f"to {after}",
                )
            children = await s.list_children(first.run.id)
            promise(
                [c.id for c in children] == [mine],
                P.CHILD_ID_TAKEN,
                f"after refused starts the parent's children are {[c.id for c in children]}",
            )
            parent = await read_run(s, first.run.id)
            promise(
                parent.status == "running" and parent.lease_epoch == first.lease.epoch,
                P.CHILD_ID_TAKEN,
                f"after refused starts the parent is {parent.status!r} at epoch "
                f"{parent.lease_epoch}",
            )

        reflow.run(body)

    def test_a_lost_lease_starts_nothing_and_waits_for_nothing(self, reflow: Harness) -> None:
        """With a lease that lapsed, was superseded by a reclaim, or whose run
        was cancelled or finished, ``start_child`` and ``wait_children``
        return ``None`` and write nothing: no child, no step, no change."""
        short = reflow.short_lease
        kinds = ("lapsed", "superseded", "cancelled", "finished")
        wfs = {kind: reflow.unique() for kind in kinds}
        cwf = reflow.unique("child")

        async def body(s: Storage) -> None:
            held: dict[str, ClaimedRun] = {}
            for kind in ("lapsed", "superseded"):
                held[kind] = await _parent(s, wfs[kind], lease=short)
            for kind in ("cancelled", "finished"):
                held[kind] = await _parent(s, wfs[kind])
            ok = await s.update_run_status(held["cancelled"].run.id, "cancelled")
            promise(ok, P.CANCEL, "cancelling a running run was refused")
            ok = await s.finish_run(held["finished"].lease, "completed", output=codec.encode(1))
            promise(ok, P.LIVE_LEASE_ACCEPTED, "finish_run under a live lease was refused")
            await reflow.lapse(short)
            await claim_only(s, wfs["superseded"], P.RECLAIM_AFTER_LAPSE)
            for kind in kinds:
                lease = held[kind].lease
                before = await read_run(s, lease.run_id)
                steps = await s.get_step_results(lease.run_id)
                child_id = reflow.unique("c")
                new = NewRun(cwf, codec.encode(kind), run_id=child_id)
                got = await s.start_child(lease, "spawn", new)
                promise(
                    got is None,
                    P.CHILD_FENCED,
                    f"start_child under a {kind} lease returned {got}",
                )
                promise(
                    await s.get_run(child_id) is None,
                    P.CHILD_FENCED,
                    f"start_child under a {kind} lease created run {child_id}",
                )
                ready = await s.wait_children(lease, _waiting("spawn"))
                promise(
                    ready is None,
                    P.CHILD_FENCED,
                    f"wait_children under a {kind} lease returned {ready}",
                )
                children = await s.list_children(lease.run_id)
                promise(
                    not children,
                    P.CHILD_FENCED,
                    f"under a {kind} lease the parent got children {[c.id for c in children]}",
                )
                after = await read_run(s, lease.run_id)
                promise(
                    (after.status, after.lease_epoch, after.waiting_for)
                    == (before.status, before.lease_epoch, before.waiting_for),
                    P.CHILD_FENCED,
                    f"calls under a {kind} lease changed the parent from {before} to {after}",
                )
                promise(
                    await s.get_step_results(lease.run_id) == steps,
                    P.CHILD_FENCED,
                    f"wait_children under a {kind} lease saved a step",
                )
            await _unclaimable(s, cwf, P.CHILD_FENCED, "children asked for under lost leases")

        reflow.run(body)

    def test_a_child_never_outlives_its_parent_deadline(self, reflow: Harness) -> None:
        """A child's ``deadline_at`` is the earlier of its own (its creation
        plus ``NewRun.deadline``) and its parent's; ``None`` only when neither
        has one. A child delayed past its deadline is due at the deadline."""
        wf, cwf = reflow.unique(), reflow.unique("child")

        async def body(s: Storage) -> None:
            for parent_deadline in (_FAR, None):
                held = await _parent(s, wf, deadline=parent_deadline)
                fixed = held.run.deadline_at
                promise(
                    (fixed is None) == (parent_deadline is None),
                    P.RUN_DEADLINE_FROM_STORAGE_CLOCK,
                    f"a run created with deadline {parent_deadline} has deadline_at {_show(fixed)}",
                )
                for own in (None, LONG, _FARTHER):
                    child = await _start(
                        s, held.lease, "spawn", cwf, reflow.unique("c"), deadline=own
                    )
                    stored = await read_run(s, child.id)
                    mine = None if own is None else stored.created_at + own
                    want = mine if fixed is None else fixed if mine is None else min(mine, fixed)
                    for where, run in (("as returned", child), ("as stored", stored)):
                        promise(
                            _near(run.deadline_at, want),
                            P.CHILD_DEADLINE,
                            f"a child with deadline {own} of a parent with deadline "
                            f"{parent_deadline} ({_show(fixed)}), {where}: deadline_at "
                            f"{_show(run.deadline_at)}, expected {_show(want)}",
                        )
                if fixed is None:
                    continue
                late = await _start(s, held.lease, "spawn", cwf, reflow.unique("c"), delay=_FARTHER)
                promise(
                    late.status == "delayed"
                    and _near(late.deadline_at, fixed)
                    and _near(late.wake_at, fixed),
                    P.CHILD_DEADLINE,
                    f"a child delayed by {_FARTHER} of a parent due by {_show(fixed)} is "
                    f"{late.status!r}, wake_at {_show(late.wake_at)}, deadline_at "
                    f"{_show(late.deadline_at)}",
                )
                ok = await s.finish_run(held.lease, "completed", output=codec.encode(1))
                promise(ok, P.LIVE_LEASE_ACCEPTED, "finish_run under a live lease was refused")

        reflow.run(body)

    def test_children_are_listed_in_creation_order(self, reflow: Harness) -> None:
        """``list_children`` gives the run's own children (every step, no
        grandchildren, no other run's) as stored, in creation order; nothing
        for a run without children or a missing run."""
        wf, cwf, gwf = reflow.unique(), reflow.unique("child"), reflow.unique("grand")
        prefix = reflow.unique("c")
        ids = [f"{prefix}-{i}" for i in range(1, 4)]

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            other = await _parent(s, wf)
            empty = await s.list_children(held.run.id)
            promise(empty == [], P.CHILDREN_LISTED, f"a run without children lists {empty}")
            missing = await s.list_children(reflow.unique("missing"))
            promise(missing == [], P.CHILDREN_LISTED, f"a missing run lists {missing}")
            await _start(s, held.lease, "a", cwf, ids[0])
            await _start(s, other.lease, "a", cwf, f"{prefix}-0")
            await _start(s, held.lease, "b", cwf, ids[1])
            await _start(s, held.lease, "a", cwf, ids[2])
            claims = {c.run.id: c for c in await s.claim_runs([cwf], 10, LONG)}
            promise(ids[0] in claims, P.CHILD_START, f"child {ids[0]} was not claimable")
            first = claims[ids[0]]
            grandchild = reflow.unique("g")
            await _start(s, first.lease, "a", gwf, grandchild)
            listed = await s.list_children(held.run.id)
            check_times(listed, "list_children")
            promise(
                [c.id for c in listed] == ids,
                P.CHILDREN_LISTED,
                f"list_children gave {[c.id for c in listed]}, expected {ids}",
            )
            for child in listed:
                stored = await read_run(s, child.id)
                promise(
                    child == stored,
                    P.CHILDREN_LISTED,
                    f"list_children gave {child}, stored as {stored}",
                )
            keys = [(c.created_at, c.id) for c in listed]
            promise(keys == sorted(keys), P.CHILDREN_LISTED, f"listed out of order: {keys}")
            below = await s.list_children(first.run.id)
            promise(
                [c.id for c in below] == [grandchild],
                P.CHILDREN_LISTED,
                f"the child {first.run.id} lists {[c.id for c in below]}, not [{grandchild}]",
            )

        reflow.run(body)

    def test_bad_arguments_are_refused_and_write_nothing(self, reflow: Harness) -> None:
        """A child without a run id, with an idempotency key, with its
        parent's id, or with a bad name, step, delay or deadline is refused
        with ``ConfigError``; so is ``wait_children`` at a bad step. Nothing
        is written: no child, no step, the parent still runs under its lease."""
        wf, cwf = reflow.unique(), reflow.unique("child")
        cid = reflow.unique("c")
        value = codec.encode("v")

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            lease = held.lease
            bad: list[tuple[str, NewRun]] = [
                ("no run_id", NewRun(cwf, value)),
                ("an idempotency_key", NewRun(cwf, value, idempotency_key="k", run_id=cid)),
                ("the parent's own id", NewRun(cwf, value, run_id=held.run.id)),
                ("an empty workflow", NewRun("", value, run_id=cid)),
                ("a run_id with a NUL", NewRun(cwf, value, run_id=cid + "\x00")),
                ("a negative delay", NewRun(cwf, value, run_id=cid, delay=timedelta(-1))),
                ("a negative deadline", NewRun(cwf, value, run_id=cid, deadline=timedelta(-1))),
                ("a deadline of 5", NewRun(cwf, value, run_id=cid, deadline=5)),  # type: ignore[arg-type]
            ]
            for what, new in bad:
                await _refused(
                    functools.partial(s.start_child, lease, "spawn", new),
                    f"start_child with {what}",
                )
            for step in ("", "bad\x00step"):
                await _refused(
                    functools.partial(s.start_child, lease, step, NewRun(cwf, value, run_id=cid)),
                    f"start_child at step {step!r}",
                )
                await _refused(
                    functools.partial(s.wait_children, lease, _waiting(step)),
                    f"wait_children at step {step!r}",
                )
            promise(
                await s.get_run(cid) is None,
                P.CHILD_ARGS,
                f"refused start_child calls created run {cid}",
            )
            children = await s.list_children(held.run.id)
            promise(
                not children,
                P.CHILD_ARGS,
                f"refused start_child calls left children {[c.id for c in children]}",
            )
            parent = await read_run(s, held.run.id)
            steps = await s.get_step_results(held.run.id)
            promise(
                (parent.status, parent.lease_epoch, steps) == ("running", lease.epoch, {}),
                P.CHILD_ARGS,
                f"after refused calls the parent is {parent.status!r} at epoch "
                f"{parent.lease_epoch} with steps {sorted(steps)}",
            )
            await _unclaimable(s, cwf, P.CHILD_ARGS, "after refused start_child calls")

        reflow.run(body)


class TestChildWait:
    def test_a_wait_with_nothing_unfinished_keeps_the_lease(self, reflow: Harness) -> None:
        """``wait_children`` at a step with no children, or whose children
        have all ended (completed, failed, cancelled), returns True, saves the
        step and leaves the run running under its lease. Unfinished children
        at another step do not hold it."""
        wf, cwf = reflow.unique(), reflow.unique("child")

        async def ready(s: Storage, lease: Lease, step: str, why: str) -> None:
            record = _waiting(step)
            got = await s.wait_children(lease, record)
            promise(got is True, P.CHILD_WAIT_READY, f"wait_children with {why} returned {got}")
            run = await read_run(s, lease.run_id)
            promise(
                (run.status, run.lease_epoch) == ("running", lease.epoch),
                P.CHILD_WAIT_READY,
                f"after a ready wait with {why} the run is {run.status!r} at epoch "
                f"{run.lease_epoch}, not running under lease #{lease.epoch}",
            )
            saved = (await s.get_step_results(lease.run_id)).get(step)
            wrong = step_differences(saved, record)
            promise(not wrong, P.CHILD_WAIT_READY, f"with {why}: " + "; ".join(wrong))
            beat = await s.heartbeat_run(lease, LONG)
            promise(beat, P.CHILD_WAIT_READY, f"after a ready wait with {why}: heartbeat refused")
            await _unclaimable(s, wf, P.ONE_LIVE_LEASE, f"a run after a ready wait with {why}")

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            await ready(s, held.lease, "none", "no children at all")
            await _start(s, held.lease, "other", cwf, reflow.unique("c"))
            await ready(s, held.lease, "none", "an unfinished child at another step only")
            for failed in (False, True):
                await _start(s, held.lease, "ended", cwf, reflow.unique("c"))
                claimed = await s.claim_runs([cwf], 10, LONG)
                for c in claimed:  # the child of step "other" too, which stays running
                    if c.run.parent_step != "ended":
                        continue
                    if failed:
                        ok = await s.finish_run(c.lease, "failed", error=codec.encode("boom"))
                    else:
                        ok = await s.finish_run(c.lease, "completed", output=codec.encode(1))
                    promise(ok, P.LIVE_LEASE_ACCEPTED, "a child's finish was refused")
            cancelled = await _start(s, held.lease, "ended", cwf, reflow.unique("c"))
            ok = await s.update_run_status(cancelled.id, "cancelled")
            promise(ok, P.CANCEL, "cancelling a pending child was refused")
            await ready(s, held.lease, "ended", "every child at that step ended")

        reflow.run(body)

    def test_a_wait_for_an_unfinished_child_parks_the_run(self, reflow: Harness) -> None:
        """``wait_children`` while a child at that step is unfinished returns
        False, saves the step, and leaves the run waiting for the children
        prefix and the step, its lease dropped, due at its deadline (never
        without one), and unclaimable."""
        wfs = (reflow.unique(), reflow.unique())
        cwf = reflow.unique("child")

        async def body(s: Storage) -> None:
            for wf, deadline in zip(wfs, (None, _FAR), strict=True):
                held = await _parent(s, wf, deadline=deadline)
                await _start(s, held.lease, "fan", cwf, reflow.unique("c"))
                record = _waiting("fan")
                got = await s.wait_children(held.lease, record)
                promise(
                    got is False,
                    P.CHILD_WAIT_PARKS,
                    f"wait_children with a pending child returned {got}",
                )
                run = await read_run(s, held.run.id)
                want_wake = run.deadline_at
                promise(
                    run.status == "waiting"
                    and run.waiting_for == CHILDREN_WAIT_PREFIX + "fan"
                    and run.lease_expires_at is None
                    and _near(run.wake_at, want_wake),
                    P.CHILD_WAIT_PARKS,
                    f"a parked parent (deadline {deadline}) is {run.status!r}, waiting_for "
                    f"{run.waiting_for!r}, lease_expires_at {_show(run.lease_expires_at)}, "
                    f"wake_at {_show(run.wake_at)} (expected {_show(want_wake)})",
                )
                saved = (await s.get_step_results(held.run.id)).get("fan")
                wrong = step_differences(saved, record)
                promise(not wrong, P.CHILD_WAIT_PARKS, "; ".join(wrong))
                await _unclaimable(s, wf, P.CHILD_WAIT_PARKS, "a parent parked for its child")
                accepted = await fenced_writes(s, held.lease)
                promise(
                    accepted == [],
                    P.CHILD_WAIT_PARKS,
                    f"the parked parent's lease still did {accepted}",
                )
                again = await s.start_child(
                    held.lease, "fan", NewRun(cwf, codec.encode(0), run_id=reflow.unique("c"))
                )
                promise(
                    again is None, P.CHILD_WAIT_PARKS, f"the parked lease started child {again}"
                )
                after = await read_run(s, held.run.id)
                promise(
                    after.status == "waiting" and after.waiting_for == run.waiting_for,
                    P.CHILD_WAIT_PARKS,
                    f"stale writes changed the parked parent: {after}",
                )
                await _unclaimable(s, wf, P.CHILD_WAIT_PARKS, "a parked parent after stale writes")

        reflow.run(body)

    @pytest.mark.parametrize("end", ["completed", "failed", "failed_with_lease", "cancelled"])
    def test_the_last_child_end_wakes_the_parent(self, reflow: Harness, end: str) -> None:
        """The end of a waiting parent's only child (``finish_run``
        completed or failed, ``update_run_status`` failed under its lease,
        cancelled from outside) makes the parent claimable at once, as a
        first claim; waiting again then finds nothing unfinished."""
        wf, cwf = reflow.unique(), reflow.unique("child")

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            child = await _start(s, held.lease, "fan", cwf, reflow.unique("c"))
            await _park(s, held.lease, "fan", "a pending child")
            parked = await read_run(s, held.run.id)
            await _unclaimable(s, wf, P.CHILD_WAIT_PARKS, "a parent parked for its child")
            if end == "cancelled":
                ok = await s.update_run_status(child.id, "cancelled")
                promise(ok, P.CANCEL, "cancelling a pending child was refused")
            else:
                await _finish(s, cwf, end)
            ended = await read_run(s, child.id)
            promise(
                ended.status == end.removesuffix("_with_lease"),
                P.CANCEL if end == "cancelled" else P.FINISH_ATOMIC,
                f"the child ended {end} reads back {ended.status!r}",
            )
            woken = await _woken(s, wf, parked, f"its only child ended {end}")
            ready = await s.wait_children(woken.lease, _waiting("fan"))
            promise(
                ready is True,
                P.CHILD_WAIT_READY,
                f"woken after its child ended, the parent's wait returned {ready}",
            )

        reflow.run(body)

    def test_only_the_last_child_at_the_step_wakes_the_parent(self, reflow: Harness) -> None:
        """A parent waiting at a step with two children wakes only when the
        second ends; a child at another step ending wakes it neither, nor
        does a grandchild's end."""
        wf, cwf, gwf = reflow.unique(), reflow.unique("child"), reflow.unique("grand")
        first, second, aside = reflow.unique("c"), reflow.unique("c"), reflow.unique("c")

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            await _start(s, held.lease, "fan", cwf, first)
            await _start(s, held.lease, "fan", cwf, second)
            await _start(s, held.lease, "side", gwf, aside)
            await _park(s, held.lease, "fan", "two pending children")
            parked = await read_run(s, held.run.id)
            ok = await s.update_run_status(aside, "cancelled")
            promise(ok, P.CANCEL, "cancelling a pending child was refused")
            await _unclaimable(
                s,
                wf,
                P.CHILD_WAKE_LAST,
                "a parent waiting at 'fan' after its child at 'side' ended",
            )
            c = await claim_one(s, cwf)
            grand = await _start(s, c.lease, "fan", gwf, reflow.unique("g"))
            ok = await s.update_run_status(grand.id, "cancelled")
            promise(ok, P.CANCEL, "cancelling a pending grandchild was refused")
            await _unclaimable(
                s, wf, P.CHILD_WAKE_LAST, "a parent waiting at 'fan' after a grandchild ended"
            )
            ok = await s.finish_run(c.lease, "completed", output=codec.encode(1))
            promise(ok, P.LIVE_LEASE_ACCEPTED, "a child's finish under its live lease refused")
            await _unclaimable(
                s, wf, P.CHILD_WAKE_LAST, "a parent waiting at 'fan' after one of two children"
            )
            await _finish(s, cwf, "completed")
            woken = await _woken(s, wf, parked, "the second of its two children ended")
            ready = await s.wait_children(woken.lease, _waiting("fan"))
            promise(
                ready is True, P.CHILD_WAIT_READY, f"every child ended, yet the wait gave {ready}"
            )

        reflow.run(body)

    def test_an_ended_child_does_not_wake_a_parent_not_waiting_for_it(
        self, reflow: Harness
    ) -> None:
        """A child's end while its parent runs, or waits for children at
        another step, leaves the parent as it is."""
        wf, cwf = reflow.unique(), reflow.unique("child")

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            early = await _start(s, held.lease, "early", cwf, reflow.unique("c"))
            await _start(s, held.lease, "late", cwf, reflow.unique("c"))
            await _start(s, held.lease, "late", cwf, reflow.unique("c"))
            ok = await s.update_run_status(early.id, "cancelled")
            promise(ok, P.CANCEL, "cancelling a pending child was refused")
            run = await read_run(s, held.run.id)
            promise(
                (run.status, run.lease_epoch) == ("running", held.lease.epoch),
                P.CHILD_WAKE_LAST,
                f"a child's end changed its running parent: {run}",
            )
            beat = await s.heartbeat_run(held.lease, LONG)
            promise(beat, P.CHILD_WAKE_LAST, "a child's end broke its running parent's lease")
            await _park(s, held.lease, "late", "two pending children")
            children = await s.list_children(held.run.id)
            for child in children:
                if child.parent_step == "late":
                    ok = await s.update_run_status(child.id, "cancelled")
                    promise(ok, P.CANCEL, "cancelling a pending child was refused")
                    break
            await _unclaimable(
                s, wf, P.CHILD_WAKE_LAST, "a parent with one of its two children at 'late' ended"
            )

        reflow.run(body)


class TestChildCancel:
    def test_a_cancel_cascades_to_every_unfinished_run_below(self, reflow: Harness) -> None:
        """Cancelling a parent (from outside, and under its lease) cancels its
        unfinished children and grandchildren, pending, running (their leases
        broken, their buffered events dropped) or waiting; finished ones are
        left as they are, and none is claimable."""
        wf, cwf, gwf = reflow.unique(), reflow.unique("child"), reflow.unique("grand")

        async def body(s: Storage) -> None:
            for how in ("from outside", "under its lease"):
                held = await _parent(s, wf)
                pending = await _start(s, held.lease, "a", cwf, reflow.unique("c"))
                waiting = await _start(s, held.lease, "a", cwf, reflow.unique("c"))
                running = await _start(s, held.lease, "b", cwf, reflow.unique("c"))
                done = await _start(s, held.lease, "b", cwf, reflow.unique("c"))
                claims = {c.run.id: c for c in await s.claim_runs([cwf], 10, LONG)}
                promise(
                    {waiting.id, running.id, done.id} <= set(claims),
                    P.CHILD_START,
                    f"pending children {sorted({waiting.id, running.id, done.id})} were not "
                    f"all claimed: {sorted(claims)}",
                )
                # Give the first child back: it stays pending.
                if pending.id in claims:
                    ok = await s.update_run_status(
                        pending.id, "pending", lease=claims[pending.id].lease
                    )
                    promise(ok, P.HAND_BACK, "a child's hand back was refused")
                ok = await s.finish_run(claims[done.id].lease, "completed", output=codec.encode(1))
                promise(ok, P.LIVE_LEASE_ACCEPTED, "a child's finish was refused")
                lease = claims[waiting.id].lease
                await _start(s, lease, "g", gwf, reflow.unique("g"))
                g = await claim_only(s, gwf, P.NEW_RUN_CLAIMABLE)
                ok = await s.finish_run(g.lease, "completed", output=codec.encode(2))
                promise(ok, P.LIVE_LEASE_ACCEPTED, "a grandchild's finish was refused")
                grand_pending = await _start(s, lease, "g", gwf, reflow.unique("g"))
                await _park(s, lease, "g", "a pending grandchild")
                delivered = await s.deliver_event(running.id, "note", codec.encode("x"))
                promise(delivered, P.EVENT_BUFFERED, "an event to a running child was refused")
                finished = {run_id: await read_run(s, run_id) for run_id in (done.id, g.run.id)}
                if how == "from outside":
                    ok = await s.update_run_status(held.run.id, "cancelled")
                else:
                    ok = await s.update_run_status(held.run.id, "cancelled", lease=held.lease)
                promise(ok, P.CANCEL, f"cancelling the parent {how} was refused")
                below = (pending.id, waiting.id, running.id, grand_pending.id)
                for run_id in below:
                    run = await read_run(s, run_id)
                    promise(
                        run.status == "cancelled",
                        P.CANCEL_CASCADES,
                        f"cancelling its ancestor {how} left {run_id} {run.status!r}",
                    )
                for run_id, before in finished.items():
                    after = await read_run(s, run_id)
                    promise(
                        (after.status, after.updated_at, codec.decode(after.output or "null"))
                        == (
                            before.status,
                            before.updated_at,
                            codec.decode(before.output or "null"),
                        ),
                        P.CANCEL_CASCADES,
                        f"cancelling an ancestor {how} changed a finished run from {before} "
                        f"to {after}",
                    )
                accepted = await fenced_writes(s, claims[running.id].lease)
                promise(
                    accepted == [],
                    P.CANCEL_CASCADES,
                    f"a running child's lease still did {accepted} after its parent's cancel",
                )
                await _unclaimable(s, cwf, P.CANCEL_CASCADES, f"children of a run cancelled {how}")
                await _unclaimable(
                    s, gwf, P.CANCEL_CASCADES, f"grandchildren of a run cancelled {how}"
                )
                requeued = await s.requeue_run(running.id)
                promise(requeued, P.REQUEUE_ONLY_ENDED, "a cancelled child's requeue was refused")
                again = await claim_only(s, cwf, P.REQUEUE)
                taken = await s.take_event(again.lease, "note", "note")
                promise(
                    taken is not None and not taken.found,
                    P.CANCEL_CASCADES,
                    f"a child cancelled with its parent kept its buffered event: {taken}",
                )
                ok = await s.update_run_status(again.run.id, "cancelled")
                promise(ok, P.CANCEL, "cancelling a running child was refused")

        reflow.run(body)

    def test_cancelling_the_last_open_child_wakes_the_parent(self, reflow: Harness) -> None:
        """A waiting parent whose last unfinished child at the step is
        cancelled (that child's own children cancelled with it) is claimable
        at once; the cancel of a waiting grandparent's child wakes it too
        when that child's cancel cascades further down."""
        wf, cwf, gwf = reflow.unique(), reflow.unique("child"), reflow.unique("grand")

        async def body(s: Storage) -> None:
            held = await _parent(s, wf)
            child = await _start(s, held.lease, "fan", cwf, reflow.unique("c"))
            c = await claim_only(s, cwf, P.NEW_RUN_CLAIMABLE)
            grand = await _start(s, c.lease, "fan", gwf, reflow.unique("g"))
            await _park(s, c.lease, "fan", "a pending grandchild")
            done = await _start(s, held.lease, "fan", cwf, reflow.unique("c"))
            ok = await s.update_run_status(done.id, "cancelled")
            promise(ok, P.CANCEL, "cancelling a pending child was refused")
            await _park(s, held.lease, "fan", "a waiting child")
            parked = await read_run(s, held.run.id)
            ok = await s.update_run_status(child.id, "cancelled")
            promise(ok, P.CANCEL, "cancelling a waiting child was refused")
            low = await read_run(s, grand.id)
            promise(
                low.status == "cancelled",
                P.CANCEL_CASCADES,
                f"cancelling its parent left the grandchild {low.status!r}",
            )
            await _woken(s, wf, parked, "its last unfinished child was cancelled")
            await _unclaimable(s, cwf, P.CANCEL_CASCADES, "a cancelled child")

        reflow.run(body)
