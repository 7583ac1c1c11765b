"""The stateful machine's rules for runs and their leases: creating runs
(idempotency keys included, and children of running runs), claiming and
reclaiming them, heartbeats, saved steps, finishing, handing back,
cancelling (down to the runs below), sleeps, waits, resuming a sleep or wait
reached before, and requeues."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Literal

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import MultipleResults, consumes, initialize, multiple, precondition, rule

from reflow_conformance import promises as P
from reflow_conformance.harness import promise
from reflow_conformance.model import Deadline, LeaseState
from reflow_core.errors import IdempotencyConflictError
from reflow_core.storage import RATE_BLOCK_PREFIX, ClaimedRun, Lease, NewRun

from ._machine import (
    DELAYS,
    HOUR,
    KEYS,
    LEASES,
    LONG,
    MILLISECOND,
    RATE_MAX,
    RUN_DEADLINE,
    RUNS,
    SOON_WAIT,
    SPENT,
    STEP_NAMES,
    WORKFLOW_CHOICES,
    MachineBase,
    claimable_promise,
    encoded,
    event_names,
    model_step,
    same_instant,
    show,
    step_record,
    unclaimable_promise,
    values,
    why,
)
from ._util import check_times

__all__ = ["RunRules"]


class RunRules(MachineBase):
    """Rules that create runs and move them through their lifecycle."""

    @initialize(
        target=RUNS,
        inputs=st.lists(
            st.tuples(st.sampled_from((0, 1)), values, st.none() | st.sampled_from(KEYS)),
            min_size=1,
            max_size=4,
        ),
    )
    def seed(self, inputs: list[tuple[int, object, str | None]]) -> MultipleResults[str]:
        """Start with a few runs, so every machine has something to claim."""
        created: list[str] = []
        for wf, value, key in inputs:
            made = self.create(wf, value, key)
            if isinstance(made, str):
                created.append(made)
        return multiple(*created)

    @rule(
        target=RUNS,
        wf=st.sampled_from((0, 1)),
        value=values,
        key=st.none() | st.sampled_from(KEYS),
        delay=st.sampled_from(DELAYS),
    )
    def create(
        self, wf: int, value: object, key: str | None, delay: timedelta | None = None
    ) -> str | MultipleResults[str]:
        parent = self._child_parent(key, delay)
        if parent is not None:
            return self._start_child(parent, wf, value)
        workflow = self.workflows[wf]
        text = encoded(value)
        expected = self.model.create(workflow, text, key)
        deadline = None if not delay else Deadline.FAR_FUTURE if delay >= HOUR else Deadline.DUE_NOW
        limit = None if key is None else RUN_DEADLINE
        later = "" if delay is None else f" delay={delay.total_seconds():g}s"
        later += "" if limit is None else f" deadline={limit.total_seconds():g}s"
        priority, limits, rates = self._run_terms()
        later += self._terms(priority, limits, rates)
        story = f"create in {'AB'[wf]} key={key} input={show(value)}{later}"
        try:
            chosen = self._new_run_id()
            new = NewRun(
                workflow,
                text,
                key,
                chosen,
                delay=delay,
                deadline=limit,
                priority=priority,
                limits=limits,
                rates=rates,
            )
            result = self._run(self.storage.create_run(new))
            if deadline is Deadline.DUE_NOW:
                self._run(asyncio.sleep(SOON_WAIT))  # the short delay passes
        except IdempotencyConflictError as exc:
            note(f"{story} -> conflict with {self.model.label(exc.existing_run_id)}")
            promise(
                expected.kind == "conflict",
                P.IDEMPOTENT_CREATE if expected.kind == "existing" else P.IDEMPOTENCY_SCOPE,
                "a conflict raised, expected "
                + (
                    f"{self.model.label(expected.existing or '')} back"
                    if expected.kind == "existing"
                    else "a new run"
                ),
            )
            promise(
                exc.existing_run_id == expected.existing,
                P.IDEMPOTENCY_CONFLICT,
                f"conflict names {exc.existing_run_id}, not {expected.existing}",
            )
            return multiple()
        run_id = result.run.id
        if expected.kind == "existing":
            assert expected.existing is not None
            note(f"{story} -> existing {self.model.label(run_id)}")
            promise(
                not result.created and run_id == expected.existing,
                P.IDEMPOTENT_CREATE,
                f"created={result.created}, id {run_id}, expected {expected.existing}",
            )
            self._check_run(run_id, P.IDEMPOTENT_CREATE)
            return run_id
        promise(
            expected.kind == "created",
            P.IDEMPOTENCY_CONFLICT,
            f"no conflict with {self.model.label(expected.existing or '')}, got run {run_id}",
        )
        promise(
            result.created and run_id not in self.model.runs,
            P.CREATE_SHAPE if run_id not in self.model.runs else P.IDEMPOTENCY_SCOPE,
            f"created={result.created}, id of {self.model.label(run_id)}",
        )
        promise(run_id == chosen, P.CREATE_SHAPE, f"asked for id {chosen!r}, got {run_id!r}")
        run = result.run
        status = "pending" if deadline is None else "delayed"
        promise(
            (run.status, run.attempts, run.reclaims, run.lease_epoch) == (status, 0, 0, 0),
            P.CREATE_SHAPE if deadline is None else P.CREATE_DELAYED,
            f"expected a {status} run: {run!r}",
        )
        if delay:
            due = run.created_at + delay
            promise(
                run.wake_at is not None and abs(run.wake_at - due) <= MILLISECOND,
                P.DELAY_FROM_STORAGE_CLOCK,
                f"created at {run.created_at} with delay {delay}, due at {run.wake_at}",
            )
        want = None if limit is None else run.created_at + limit
        promise(
            same_instant(run.deadline_at, want),
            P.RUN_DEADLINE_FROM_STORAGE_CLOCK,
            f"created at {run.created_at} with deadline {limit}, deadline_at {run.deadline_at}",
        )
        added = self.model.add_run(run_id, workflow, text, key, deadline, priority, limits, rates)
        added.deadline_at = run.deadline_at
        label = added.label
        note(f"{story} -> new {label}")
        self._check_run(run_id, P.CREATE_SHAPE)
        return run_id

    def _child_parent(self, key: str | None, delay: timedelta | None) -> Lease | None:
        """The live lease a create starts its run under, as a child, or ``None``.

        A keyless create of a pending run (no delay, or a zero one) starts a
        child of the first run held by a live lease, if there is one: the rule
        draws nothing more, so the examples it generates (and the broken
        adapters they catch) stay as they were."""
        if key is not None or delay or not self.reflow.implements("children"):
            return None
        for run in self.model:
            if self.model.live(run.id, run.epoch) is not None:
                return Lease(run.id, run.epoch)
        return None

    def _start_child(self, lease: Lease, wf: int, value: object) -> str:
        """``start_child`` of a new pending run, at the first step, under a live lease."""
        workflow = self.workflows[wf]
        text = encoded(value)
        step = STEP_NAMES[0]
        child_id = self._new_run_id()
        parent = self.model.runs[lease.run_id]
        story = (
            f"{self._lease(lease)} starts a child in {'AB'[wf]} at step {step!r} "
            f"input={show(value)}"
        )
        expected = self.model.start_child(lease.run_id, lease.epoch, step, child_id)
        assert expected is parent, f"{story}: the model expected {expected!r}"
        new = NewRun(workflow, text, run_id=child_id)
        record = self._run(self.storage.start_child(lease, step, new))
        note(f"{story} -> " + ("refused" if record is None else "started"))
        promise(record is not None, P.LIVE_LEASE_ACCEPTED, f"{story}: returned None")
        assert record is not None
        check_times(record, f"the child {child_id} as start_child returned it")
        shape = (
            record.id,
            record.status,
            record.attempts,
            record.reclaims,
            record.lease_epoch,
            record.parent_id,
            record.parent_step,
        )
        promise(
            shape == (child_id, "pending", 0, 0, 0, lease.run_id, step),
            P.CHILD_START,
            f"{story}: got {record!r}",
        )
        promise(
            same_instant(record.deadline_at, parent.deadline_at),
            P.CHILD_DEADLINE,
            f"{story}: a child without a deadline has deadline_at {record.deadline_at}, "
            f"its parent's is {parent.deadline_at}",
        )
        added = self.model.add_child(child_id, workflow, text, lease.run_id, step)
        added.deadline_at = record.deadline_at
        note(f"... the child is {added.label}")
        self._check_run(child_id, P.CHILD_START)
        self._check_run(lease.run_id, P.CHILD_START)
        listed = [r.id for r in self._run(self.storage.list_children(lease.run_id))]
        promise(
            listed == parent.children,
            P.CHILDREN_LISTED,
            f"{parent.label} lists children {self._labels(listed)}, "
            f"expected {self._labels(parent.children)}",
        )
        return child_id

    def _check_cascade(self, doomed: list[str], what: str) -> None:
        """The runs a cancel cascaded to read back cancelled, as the model has them."""
        if doomed:
            note(f"... {what} cascades to {self._labels(doomed)}")
        for run_id in doomed:
            self._check_run(run_id, P.CANCEL_CASCADES)

    def _claim(self, which: tuple[int, ...], limit: int, lease: timedelta) -> list[ClaimedRun]:
        names = [self.workflows[i] for i in which]
        self._settle()
        claimable = self.model.claimable(names)
        lapsed = self.model.lapsed(names)
        full_before = {key for key in self.limit_keys if self.model.full(key)}
        rated_before = self.model.rate_claims.get(self.rate_key, 0)
        claimed = self._run(self.storage.claim_runs(names, limit, lease))
        ids = [c.run.id for c in claimed]
        wanted = "+".join("AB"[i] for i in which)
        note(
            f"claim up to {limit} of {wanted} for {lease.total_seconds():g} s -> "
            + (
                ", ".join(
                    self.model.lease_label(c.run.id, c.lease.epoch)
                    + (" (reclaim)" if c.run.id in lapsed else "")
                    for c in claimed
                )
                or "nothing"
            )
        )
        promise(len(ids) <= limit, P.CLAIM_LIMIT, f"limit {limit}, claimed {len(ids)}")
        promise(len(set(ids)) == len(ids), P.ONE_LIVE_LEASE, f"one claim returned {ids} twice")
        for run_id in ids:
            run = self.model.runs.get(run_id)
            if run is None or run.workflow not in names:
                promise(False, P.CLAIM_LIMIT, f"claimed {run_id}, not a run of {wanted}")
            elif run_id not in claimable:
                promise(False, unclaimable_promise(run), f"claimed {run.label}, {why(run)}")
        rated = [i for i in ids if self.model.runs[i].rates]
        promise(
            rated_before + len(rated) <= RATE_MAX,
            P.RATE_NEVER_EXCEEDED,
            f"with {rated_before} claims of rate R (max {RATE_MAX}) in its window, the claim "
            f"took {self._labels(rated)}, which hold it",
        )
        rate_full = rated_before + len(rated) >= RATE_MAX
        records = {i: self._run(self.storage.get_run(i)) for i in self.model.runs}
        held = self._held(records)
        for key in self.limit_keys:
            most = self.model.limit_of(key)
            promise(
                most is None or held[key] <= most,
                P.LIMIT_NEVER_EXCEEDED,
                f"after the claim {held[key]} runs hold key {self._key(key)} (max {most}): "
                + self._labels(
                    sorted(
                        i
                        for i, r in records.items()
                        if r is not None
                        and r.status == "running"
                        and key in self.model.runs[i].keys
                    )
                ),
            )
        passed: dict[str, str] = {}
        for run_id in sorted(claimable - set(ids)):
            record = records[run_id]
            if record is None or record.blocked_by is None:
                continue
            run = self.model.runs[run_id]
            key = record.blocked_by
            by_rate = key == RATE_BLOCK_PREFIX + self.rate_key
            promise(
                run.status != "running",
                P.RATE_RECLAIM if by_rate else P.LIMIT_RECLAIM,
                f"the claim left lapsed {run.label} blocked by {self._key(record.blocked_by)}",
            )
            if by_rate:
                limits_full = [k for k in run.keys if k in full_before]
                promise(
                    bool(run.rates) and rate_full and not limits_full,
                    P.RATE_BLOCKED,
                    f"the claim blocked {run.label}"
                    f"{self._terms(run.priority, run.limits, run.rates)} by rate R, "
                    f"which {rated_before + len(rated)} claims fill (max {RATE_MAX})"
                    + (f", with key {self._key(limits_full[0])} full" if limits_full else ""),
                )
                passed[run_id] = key
                continue
            most = self.model.limit_of(key)
            earlier = run.keys[: run.keys.index(key)] if key in run.keys else run.keys
            first = not any(k in full_before for k in earlier)
            promise(
                key in run.keys and most is not None and held[key] >= most and first,
                P.LIMIT_BLOCKED,
                f"the claim blocked {run.label}{self._terms(run.priority, run.limits)} by key "
                f"{self._key(key)}, which {held.get(key, 0)} runs hold (max {most})",
            )
            passed[run_id] = key
        if passed:
            note(
                "... passing over "
                + ", ".join(
                    f"{self.model.label(i)} (key {self._key(k)})" for i, k in passed.items()
                )
            )
        # A lapsed lease over a full rate is left as it is, for a later claim.
        over = {i for i in lapsed - set(ids) if rate_full and self.model.runs[i].rates}
        left = sorted(claimable - set(ids) - set(passed) - over)
        if left and len(ids) < limit:
            # Fewer than `limit` means nothing else was claimable: every run
            # left was passed over, blocked.
            first_left = self.model.runs[left[0]]
            full = [k for k in first_left.keys if held.get(k, 0) >= (self.model.limit_of(k) or 0)]
            over_rate = rate_full and bool(first_left.rates)
            promise(
                False,
                P.LIMIT_BLOCKED
                if full and first_left.status != "running"
                else P.RATE_BLOCKED
                if over_rate and first_left.status != "running"
                else claimable_promise(first_left),
                f"claimed {self._labels(ids)} with limit {limit}, leaving "
                + ", ".join(f"{self.model.label(i)} ({why(self.model.runs[i])})" for i in left),
            )
        skipped = lapsed - set(ids) - over
        if skipped:
            promise(
                all(i in lapsed for i in ids) and not passed,
                P.RECLAIM_PREFERRED,
                f"claimed {self._labels(ids)} and passed over {self._labels(sorted(passed))} "
                f"before lapsed {self._labels(sorted(skipped))}",
            )
        taken = [i for i in ids if i in claimable and i not in lapsed]
        waiting = [i for i in left if i not in lapsed]
        if taken and waiting:
            low = min(self.model.runs[i].priority for i in taken)
            high = max(self.model.runs[i].priority for i in waiting)
            promise(
                high <= low,
                P.PRIORITY_ORDER,
                f"claimed {self._labels(ids)} (lowest priority {low}), leaving "
                f"{self._labels(waiting)} (highest priority {high})",
            )
        for c in claimed:
            run = self.model.runs[c.run.id]
            reclaim = c.run.id in lapsed
            record = c.run
            promise(
                record.status == "running" and c.lease.run_id == run.id,
                P.CLAIMED_RUNNING,
                f"{run.label}: {record.status!r}, lease {c.lease}",
            )
            promise(
                c.lease.epoch == record.lease_epoch == run.epoch + 1
                and record.attempts == run.attempts + 1,
                P.CLAIM_COUNTS,
                f"{run.label} was at epoch {run.epoch}, {run.attempts} attempts; "
                f"claim gave lease #{c.lease.epoch}, record epoch {record.lease_epoch}, "
                f"{record.attempts} attempts",
            )
            promise(
                c.reclaimed == reclaim and record.reclaims == run.reclaims + reclaim,
                P.HAND_BACK if run.status == "pending" and run.attempts else P.RECLAIM_AFTER_LAPSE,
                f"{run.label} ({why(run)}): reclaimed={c.reclaimed}, reclaims "
                f"{record.reclaims}, expected {run.reclaims + reclaim}",
            )
            self._check_claimed_steps(c, run)
            self.model.claim(run.id, LeaseState.LIVE)
            self.epochs.setdefault(run.id, []).append(c.lease.epoch)
        for run_id, key in passed.items():
            self.model.block(run_id, key)
        return claimed

    @rule(
        target=LEASES,
        which=st.sampled_from(WORKFLOW_CHOICES),
        limit=st.integers(1, 4),
    )
    def claim(self, which: tuple[int, ...], limit: int) -> MultipleResults[Lease]:
        claimed = self._claim(which, limit, LONG)
        for c in claimed:
            self._check_run(c.run.id, P.CLAIMED_RUNNING, P.CLAIM_CARRIES_STEPS)
        return multiple(*(c.lease for c in claimed))

    def _can_lapse(self) -> bool:
        return self.lapses_left > 0 and bool(self.model.claimable(self.workflows))

    @precondition(_can_lapse)
    @rule(target=SPENT, which=st.sampled_from(WORKFLOW_CHOICES), limit=st.integers(1, 4))
    def claim_briefly_and_lapse(self, which: tuple[int, ...], limit: int) -> MultipleResults[Lease]:
        """Claim with the short lease and sleep until it has certainly lapsed:
        the runs become claimable again, as reclaims, and the leases are lost."""
        short = self.reflow.short_lease
        claimed = self._claim(which, limit, short)
        if not claimed:
            return multiple()
        self.lapses_left -= 1
        self._run(self.reflow.lapse(short))
        for c in claimed:
            self.model.set_lease(c.run.id, LeaseState.LAPSED)
        note(f"wait out the {short.total_seconds():g} s lease: it lapsed")
        for c in claimed:
            self._check_run(c.run.id, P.CLAIMED_RUNNING)
        return multiple(*(c.lease for c in claimed))

    @rule(lease=st.one_of(LEASES, SPENT))
    def heartbeat(self, lease: Lease) -> None:
        expected = self.model.heartbeat(lease.run_id, lease.epoch)
        got = self._run(self.storage.heartbeat_run(lease, LONG))
        note(f"heartbeat {self._lease(lease)} -> {got}")
        self._fenced(lease, expected, got, "heartbeat_run")
        self._check_run(lease.run_id, P.STALE_LEASE_REFUSED)

    @rule(
        lease=st.one_of(LEASES, SPENT),
        name=st.sampled_from(STEP_NAMES),
        status=st.sampled_from(("completed", "failed", "skipped")),
        value=values,
        attempts=st.integers(1, 3),
    )
    def save_step(
        self,
        lease: Lease,
        name: str,
        status: Literal["completed", "failed", "skipped"],
        value: object,
        attempts: int,
    ) -> None:
        step = step_record(name, status, value, attempts)
        expected = self.model.save_step(lease.run_id, lease.epoch, name, model_step(step))
        got = self._run(self.storage.save_step_result(lease, step, LONG))
        note(f"{self._lease(lease)} saves step {name!r} {status} {show(value)} -> {got}")
        self._fenced(lease, expected, got, "save_step_result")
        self._check_fenced(lease, expected, P.SAVE_EXTENDS, P.STEP_SAVED)

    @rule(
        target=SPENT,
        lease=consumes(LEASES),
        status=st.sampled_from(("completed", "failed")),
        value=values,
        last=st.none() | st.sampled_from(STEP_NAMES),
    )
    def finish(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        value: object,
        last: str | None,
    ) -> Lease:
        output = encoded(value) if status == "completed" else None
        error = encoded(value) if status == "failed" else None
        step = None if last is None else step_record(last, "completed", value, 1)
        expected = self.model.finish(
            lease.run_id,
            lease.epoch,
            status,
            output,
            error,
            None if step is None else (step.name, model_step(step)),
        )
        got = self._run(
            self.storage.finish_run(lease, status, output=output, error=error, step=step)
        )
        with_step = "" if last is None else f" with last step {last!r}"
        note(f"{self._lease(lease)} finishes {status} {show(value)}{with_step} -> {got}")
        self._fenced(lease, expected, got, "finish_run")
        self._check_fenced(lease, expected, P.FINISH_ATOMIC)
        return lease

    @rule(
        target=SPENT,
        lease=consumes(LEASES),
        status=st.sampled_from(("pending", "failed", "cancelled")),
        reason=st.none() | values,
    )
    def update_status_with_lease(
        self,
        lease: Lease,
        status: Literal["pending", "failed", "cancelled"],
        reason: object,
    ) -> Lease:
        """Hand a run back (``pending``) or end it, fenced by its lease."""
        doomed: list[str] = []
        if status == "pending":
            error = None
            expected = self.model.hand_back(lease.run_id, lease.epoch)
            story = f"{self._lease(lease)} hands its run back"
        else:
            error = None if reason is None else encoded(reason)
            live = self.model.live(lease.run_id, lease.epoch) is not None
            if live and status == "cancelled":
                doomed = self.model.doomed(lease.run_id)
            expected = self.model.end_fenced(lease.run_id, lease.epoch, status, error)
            story = f"{self._lease(lease)} ends its run {status} ({show(reason)})"
        got = self._run(
            self.storage.update_run_status(lease.run_id, status, lease=lease, error=error)
        )
        note(f"{story} -> {got}")
        self._fenced(lease, expected, got, f"update_run_status({status!r}, lease=...)")
        self._check_fenced(lease, expected, P.HAND_BACK if status == "pending" else P.CANCEL)
        if expected and got:
            self._check_cascade(doomed, f"the cancel of {self._lease(lease)}")
        return lease

    @rule(
        run_id=RUNS,
        status=st.sampled_from(("cancelled", "failed")),
        reason=st.none() | values,
    )
    def cancel(self, run_id: str, status: Literal["cancelled", "failed"], reason: object) -> None:
        """End a run from outside, without its lease."""
        error = None if reason is None else encoded(reason)
        before = self.model.runs[run_id].status
        cascading = status == "cancelled" and not self.model.runs[run_id].terminal
        doomed = self.model.doomed(run_id) if cascading else []
        expected = self.model.cancel(run_id, status, error)
        got = self._run(self.storage.update_run_status(run_id, status, error=error))
        note(f"end {self.model.label(run_id)} ({before}) {status} from outside -> {got}")
        promise(
            got == expected,
            P.CANCEL if expected else P.TERMINAL_UNCHANGED,
            f"update_run_status({status!r}) on a {before} run returned {got}",
        )
        self._check_run(run_id, P.CANCEL if expected else P.TERMINAL_UNCHANGED)
        self._check_cascade(doomed, f"the cancel of {self.model.label(run_id)}")

    @rule(
        target=SPENT,
        lease=consumes(LEASES),
        name=st.sampled_from(STEP_NAMES),
        due=st.booleans(),
    )
    def sleep(self, lease: Lease, name: str, due: bool) -> Lease:
        duration = timedelta(0) if due else HOUR
        deadline = Deadline.DUE_NOW if due else Deadline.FAR_FUTURE
        run = self.model.runs[lease.run_id]
        replaced = name in run.steps and run.steps[name].status != "sleeping"
        step = self.model.sleep(lease.run_id, lease.epoch, name, deadline)
        got = self._run(self.storage.sleep_run(lease, name, duration))
        kept = "" if step is None or step.wake_at is None else " (deadline kept)"
        note(
            f"{self._lease(lease)} sleeps at step {name!r} for {duration} ({deadline.value})"
            f"{kept} -> {got}"
        )
        self._fenced(lease, step is not None, got is not None, "sleep_run")
        if step is not None:
            self._check_deadline(step, got, name, f"sleeping {duration}")
        self._check_fenced(
            lease,
            step is not None,
            P.PAUSE_RECORDED,
            P.PAUSE_REPLACES_RECORD if replaced else P.PAUSE_RECORDED,
        )
        return lease

    @rule(
        lease=LEASES,
        name=st.sampled_from(STEP_NAMES),
        event=event_names,
        timeout=st.sampled_from((None, timedelta(0), HOUR)),
    )
    def wait(self, lease: Lease, name: str, event: str, timeout: timedelta | None) -> None:
        deadline = (
            None
            if timeout is None
            else Deadline.DUE_NOW
            if timeout == timedelta(0)
            else Deadline.FAR_FUTURE
        )
        run = self.model.runs[lease.run_id]
        replaced = name in run.steps and run.steps[name].status != "waiting"
        expected = self.model.wait(lease.run_id, lease.epoch, name, event, deadline)
        got = self._run(self.storage.wait_run(lease, name, event, timeout))
        note(
            f"{self._lease(lease)} waits for {event} at step {name!r}, timeout {timeout} -> "
            + ("lease lost" if got is None else "ready" if got.ready else "waiting")
        )
        self._fenced(lease, expected is not None, got is not None, "wait_run")
        if expected is not None and got is not None:
            ready, step = expected
            promise(
                got.ready == ready,
                P.EVENT_BEFORE_WAIT if ready else P.EVENT_ONCE_IN_ORDER,
                f"ready={got.ready}, but {run.buffered(event)} {event} buffered",
            )
            self._check_deadline(step, got.deadline, name, f"timeout {timeout}")
        ready_now = expected is not None and expected[0]
        self._check_fenced(
            lease,
            expected is not None,
            P.WAIT_READY_KEEPS_LEASE if ready_now else P.PAUSE_RECORDED,
            P.PAUSE_REPLACES_RECORD if replaced else P.PAUSE_RECORDED,
        )

    def _resumable(self) -> list[tuple[Lease, str]]:
        """Live leases whose runs have reached a sleep or wait: ``(lease, step)``."""
        found = []
        for run in self.model:
            if self.model.live(run.id, run.epoch) is None:
                continue
            for name, step in sorted(run.steps.items()):
                if step.status in ("sleeping", "waiting"):
                    found.append((Lease(run.id, run.epoch), name))
        return found

    @precondition(lambda self: bool(self._resumable()))
    @rule(
        resumed=st.runner().flatmap(lambda machine: st.sampled_from(machine._resumable())),
        due=st.booleans(),
        event=event_names,
        timeout=st.sampled_from((None, timedelta(0), HOUR)),
    )
    def resume(
        self, resumed: tuple[Lease, str], due: bool, event: str, timeout: timedelta | None
    ) -> None:
        """A claimed run passes a sleep or wait it reached before, as the
        engine does when it resumes: the deadline first set must be kept."""
        lease, name = resumed
        step = self.model.runs[lease.run_id].steps[name]
        note(f"{self._lease(lease)} resumes at step {name!r} ({step.status})")
        if step.status == "sleeping":
            self.sleep(lease, name, due)
        else:
            self.wait(lease, name, event, timeout)

    @precondition(lambda self: any(r.status in ("failed", "cancelled") for r in self.model))
    @rule(run_id=RUNS)
    def requeue(self, run_id: str) -> None:
        before = self.model.runs[run_id].status
        expected = self.model.requeue(run_id)
        got = self._run(self.storage.requeue_run(run_id))
        note(f"requeue {self.model.label(run_id)} ({before}) -> {got}")
        promise(got == expected, P.REQUEUE_ONLY_ENDED, f"requeue of a {before} run returned {got}")
        self._check_run(run_id, P.REQUEUE_ONLY_ENDED if not expected else P.REQUEUE)
