"""The stateful test: random operation sequences against the adapter and the model.

:class:`StorageMachine` is a Hypothesis ``RuleBasedStateMachine``. Each rule
performs one storage operation on the adapter and the same operation on
:class:`reflow_conformance.model.Model`, then compares the outcomes; the
invariants compare every run, step and schedule the machine made after every
step. Each rule logs a one-line ``note()``, so a shrunk failure reads as the
story of the operations that led to it, ending with the promise that broke.

Time is real but never uncertain: a lease is taken either for ten minutes
(live for the whole test) or for the harness's short lease, in which case the
same rule sleeps until it has certainly lapsed; a sleep or wait deadline is
either zero (due at once) or an hour away (never reached).

Hypothesis rules cannot be coroutines, so each machine owns one
``asyncio.Runner`` and one storage opened on it, closed in ``teardown``.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import pytest
from hypothesis import Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.model import Deadline, LeaseState, Model, ModelRun, ModelStep
from reflow_conformance.plugin import suite_settings
from reflow_conformance.strategies import plain_values, same_plain
from reflow_core import codec
from reflow_core.errors import EventBufferFullError, IdempotencyConflictError
from reflow_core.storage import (
    ClaimedRun,
    Lease,
    NewRun,
    RunStatus,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    StepStatus,
    Storage,
)

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestStorageStateMachine"]

T = TypeVar("T")

LONG = timedelta(minutes=10)
HOUR = timedelta(hours=1)
MILLISECOND = timedelta(milliseconds=1)
LAPSES_PER_MACHINE = 1
"""Each lapse sleeps for real (most of the time a machine takes, and what makes
shrinking slow); this bounds it."""

STEP_NAMES = ("a", "b")
"""Shared by saved steps, sleeps, waits and takes, so records replace each other."""
EVENTS = ("e1", "e2")
EVENT_IDS = ("x", "y", "z")
event_names = st.sampled_from(EVENTS[:1]) | st.sampled_from(EVENTS)
"""Mostly the first event, so deliveries and takes meet; the second keeps names apart."""
KEYS = ("k1", "k2")
RECURRENCES = ("every:86400", "cron:0 0 * * *")
SLOTS = (
    datetime(2001, 1, 1, tzinfo=UTC),
    datetime(2001, 1, 2, tzinfo=UTC),
    datetime(2199, 1, 1, tzinfo=UTC),
)
"""Schedule slots: two long past (due), one far ahead; all whole milliseconds."""
SLOT_STEP = timedelta(days=1)
STATUSES: tuple[RunStatus, ...] = (
    "pending",
    "running",
    "sleeping",
    "waiting",
    "completed",
    "failed",
    "cancelled",
)
WORKFLOW_CHOICES = ((0,), (1,), (0, 1))

values = st.integers(0, 2) | plain_values(max_leaves=4)
"""Values drawn from a small pool often enough that repeats (idempotent creates) happen."""


def _show(value: object, width: int = 32) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _decoded(text: str | None) -> object:
    return None if text is None else codec.decode(text)


def _same_value(a: str | None, b: str | None) -> bool:
    """Encoded texts hold the same plain value (a store may re-encode them)."""
    return same_plain(_decoded(a), _decoded(b))


def _encoded(value: object) -> str:
    return codec.encode(value)


def _same_instant(a: datetime | None, b: datetime | None) -> bool:
    """Equal to the millisecond the contract guarantees."""
    if a is None or b is None:
        return a is b
    return abs(a - b) < MILLISECOND


class StorageMachine(RuleBasedStateMachine):
    """Drives one adapter and one :class:`Model` through the same operations."""

    runs: Bundle[str] = Bundle("runs")
    leases: Bundle[Lease] = Bundle("leases")
    """Leases handed out by claims and not yet given up (most of them live)."""
    spent: Bundle[Lease] = Bundle("spent")
    """Leases given up by finishing, ending, handing back or sleeping: all lost."""

    def __init__(self, reflow: Harness) -> None:
        super().__init__()
        self.reflow = reflow
        self.model = Model()
        self.workflows = (reflow.unique("wf"), reflow.unique("wf"))
        self.schedule_keys = (reflow.unique("sched"), reflow.unique("sched"))
        self.run_prefix = reflow.unique("run") + "-"
        self.lapses_left = LAPSES_PER_MACHINE
        self.touched_missing = False
        self.epochs: dict[str, list[int]] = {}
        """The lease epochs handed out per run, in order."""
        self._runner = asyncio.Runner()
        self._context = contextvars.copy_context()
        try:
            self.storage: Storage = self._run(self._open())
        except BaseException:
            self._runner.close()
            raise

    async def _open(self) -> Storage:
        storage = self.reflow.factory()
        await storage.initialize()
        return storage

    def teardown(self) -> None:
        try:
            self._run(self.storage.close())
        finally:
            self._runner.close()

    def _run(self, operation: Coroutine[Any, Any, T]) -> T:
        # The runner's loop, driven directly: Runner.run swaps the SIGINT
        # handler on every call, which costs more than a memory-backed
        # operation and adds up over the thousands of calls of a shrink.
        loop = self._runner.get_loop()
        return loop.run_until_complete(loop.create_task(operation, context=self._context))

    def _new_run_id(self) -> str:
        """The id for the next run: chosen by the machine, so that runs sort
        in creation order and a replayed example claims the same runs."""
        return f"{self.run_prefix}{len(self.model.runs) + 1:04d}"

    # -- naming, for notes -------------------------------------------------

    def _wf(self, workflow: str) -> str:
        return "AB"[self.workflows.index(workflow)] if workflow in self.workflows else workflow

    def _lease(self, lease: Lease) -> str:
        return self.model.lease_label(lease.run_id, lease.epoch)

    def _labels(self, ids: Sequence[str]) -> str:
        return ", ".join(self.model.label(i) for i in ids) or "nothing"

    def _stale_reason(self, lease: Lease) -> str:
        """Why the model holds ``lease`` to be lost (or that it holds it live)."""
        run = self.model.runs.get(lease.run_id)
        if run is None:
            return "its run does not exist"
        if run.epoch != lease.epoch:
            return f"superseded by #{run.epoch}"
        if run.status != "running":
            return f"the run is {run.status}"
        if run.lease is LeaseState.LAPSED:
            return "the lease lapsed"
        return "live"

    def _fenced(self, lease: Lease, expected: bool, got: bool, what: str) -> None:
        """The adapter must accept a fenced write exactly when the model's lease is live."""
        reason = self._stale_reason(lease)
        if expected:
            promise(got, P.LIVE_LEASE_ACCEPTED, f"{what} with live lease {self._lease(lease)}")
        elif reason.startswith("the run is cancelled"):
            promise(not got, P.CANCEL, f"{what} accepted from {self._lease(lease)}: {reason}")
        else:
            promise(
                not got,
                P.STALE_LEASE_REFUSED,
                f"{what} accepted from {self._lease(lease)}: {reason}",
            )

    # -- comparing the adapter with the model -------------------------------

    def _check_fenced(
        self, lease: Lease, accepted: bool, name: str, steps_name: str | None = None
    ) -> None:
        """Check the run after a fenced write: as the write left it, or, if the
        write was refused, exactly as it was."""
        if accepted:
            self._check_run(lease.run_id, name, steps_name)
        else:
            self._check_run(lease.run_id, P.STALE_LEASE_REFUSED)

    def _check_run(self, run_id: str, name: str, steps_name: str | None = None) -> None:
        """The adapter's record and steps of ``run_id`` equal the model's."""
        run = self.model.runs[run_id]
        record = self._run(self.storage.get_run(run_id))
        promise(record is not None, P.NO_LOST_RUNS, f"{run.label} reads back as missing")
        assert record is not None
        found: list[str] = []
        for field, want, got in (
            ("status", run.status, record.status),
            ("attempts", run.attempts, record.attempts),
            ("reclaims", run.reclaims, record.reclaims),
            ("lease_epoch", run.epoch, record.lease_epoch),
            ("workflow", run.workflow, record.workflow),
            ("idempotency_key", run.idempotency_key, record.idempotency_key),
        ):
            if want != got:
                found.append(f"{field} is {got!r}, expected {want!r}")
        for field, want_text, got_text in (
            ("input", run.input, record.input),
            ("output", run.output, record.output),
            ("error", run.error, record.error),
        ):
            if not _same_value(want_text, got_text):
                found.append(f"{field} is {got_text!r}, expected {want_text!r}")
        if run.status == "waiting" and record.waiting_for != run.waiting_for:
            found.append(f"waiting_for is {record.waiting_for!r}, expected {run.waiting_for!r}")
        if run.status == "running" and run.lease is LeaseState.LIVE:
            horizon = datetime.now(UTC) + timedelta(minutes=1)
            expires = record.lease_expires_at
            if expires is None or expires < horizon:
                found.append(f"live lease expires at {expires}, not minutes from now")
        promise(not found, name, f"{run.label}: " + "; ".join(found))
        self._check_steps(run, self._run(self.storage.get_step_results(run_id)), steps_name or name)

    def _check_steps(self, run: ModelRun, stored: dict[str, StepRecord], name: str) -> None:
        found: list[str] = []
        if set(stored) != set(run.steps):
            found.append(f"steps {sorted(stored)}, expected {sorted(run.steps)}")
        for step_name in sorted(set(stored) & set(run.steps)):
            found.extend(
                f"step {step_name!r}: {d}"
                for d in _step_diff(stored[step_name], run.steps[step_name])
            )
        promise(not found, name, f"{run.label}: " + "; ".join(found))

    def _check_claimed_steps(self, claimed: ClaimedRun, run: ModelRun) -> None:
        self._check_steps(run, dict(claimed.steps), P.CLAIM_CARRIES_STEPS)

    def _check_deadline(
        self, step: ModelStep, got: datetime | None, name: str, duration: str
    ) -> None:
        """Hold a reported deadline to the step's: fixed once reached, else ``now + duration``."""
        if step.wake_at is not None or step.deadline is None:
            promise(
                _same_instant(got, step.wake_at),
                P.DEADLINE_FIXED,
                f"step {name!r} reports deadline {got}, first reached with {step.wake_at}",
            )
            return
        promise(got is not None, P.DEADLINE_FROM_DURATION, f"step {name!r}: no deadline")
        assert got is not None
        ahead = got - datetime.now(UTC)
        if step.deadline is Deadline.DUE_NOW:
            good = abs(ahead) < timedelta(minutes=30)
        else:
            good = ahead > timedelta(minutes=30)
        promise(good, P.DEADLINE_FROM_DURATION, f"step {name!r}: {duration} gave {got}")
        step.wake_at = got

    # -- runs --------------------------------------------------------------

    @initialize(
        target=runs,
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
        target=runs,
        wf=st.sampled_from((0, 1)),
        value=values,
        key=st.none() | st.sampled_from(KEYS),
    )
    def create(self, wf: int, value: object, key: str | None) -> str | MultipleResults[str]:
        workflow = self.workflows[wf]
        text = _encoded(value)
        expected = self.model.create(workflow, text, key)
        story = f"create in {'AB'[wf]} key={key} input={_show(value)}"
        try:
            chosen = self._new_run_id()
            result = self._run(self.storage.create_run(NewRun(workflow, text, key, chosen)))
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
        promise(
            (run.status, run.attempts, run.reclaims, run.lease_epoch) == ("pending", 0, 0, 0),
            P.CREATE_SHAPE,
            repr(run),
        )
        label = self.model.add_run(run_id, workflow, text, key).label
        note(f"{story} -> new {label}")
        self._check_run(run_id, P.CREATE_SHAPE)
        return run_id

    def _claim(self, which: tuple[int, ...], limit: int, lease: timedelta) -> list[ClaimedRun]:
        names = [self.workflows[i] for i in which]
        claimable = self.model.claimable(names)
        lapsed = self.model.lapsed(names)
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
                promise(False, _unclaimable_promise(run), f"claimed {run.label}, {_why(run)}")
        left = sorted(claimable - set(ids))
        if left and len(ids) < limit:
            # Fewer than `limit` means nothing else was claimable.
            promise(
                False,
                _claimable_promise(self.model.runs[left[0]]),
                f"claimed {self._labels(ids)} with limit {limit}, leaving "
                + ", ".join(f"{self.model.label(i)} ({_why(self.model.runs[i])})" for i in left),
            )
        skipped = lapsed - set(ids)
        if skipped:
            promise(
                all(i in lapsed for i in ids),
                P.RECLAIM_PREFERRED,
                f"claimed {self._labels(ids)} before lapsed {self._labels(sorted(skipped))}",
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
                f"{run.label} ({_why(run)}): reclaimed={c.reclaimed}, reclaims "
                f"{record.reclaims}, expected {run.reclaims + reclaim}",
            )
            self._check_claimed_steps(c, run)
            self.model.claim(run.id, LeaseState.LIVE)
            self.epochs.setdefault(run.id, []).append(c.lease.epoch)
        return claimed

    @rule(
        target=leases,
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
    @rule(target=spent, which=st.sampled_from(WORKFLOW_CHOICES), limit=st.integers(1, 4))
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

    @rule(lease=leases)
    def heartbeat(self, lease: Lease) -> None:
        expected = self.model.heartbeat(lease.run_id, lease.epoch)
        got = self._run(self.storage.heartbeat_run(lease, LONG))
        note(f"heartbeat {self._lease(lease)} -> {got}")
        self._fenced(lease, expected, got, "heartbeat_run")
        self._check_run(lease.run_id, P.STALE_LEASE_REFUSED)

    @rule(
        lease=leases,
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
        step = _step(name, status, value, attempts)
        expected = self.model.save_step(lease.run_id, lease.epoch, name, _model_step(step))
        got = self._run(self.storage.save_step_result(lease, step, LONG))
        note(f"{self._lease(lease)} saves step {name!r} {status} {_show(value)} -> {got}")
        self._fenced(lease, expected, got, "save_step_result")
        self._check_fenced(lease, expected, P.SAVE_EXTENDS, P.STEP_SAVED)

    @rule(
        target=spent,
        lease=consumes(leases),
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
        output = _encoded(value) if status == "completed" else None
        error = _encoded(value) if status == "failed" else None
        step = None if last is None else _step(last, "completed", value, 1)
        expected = self.model.finish(
            lease.run_id,
            lease.epoch,
            status,
            output,
            error,
            None if step is None else (step.name, _model_step(step)),
        )
        got = self._run(
            self.storage.finish_run(lease, status, output=output, error=error, step=step)
        )
        with_step = "" if last is None else f" with last step {last!r}"
        note(f"{self._lease(lease)} finishes {status} {_show(value)}{with_step} -> {got}")
        self._fenced(lease, expected, got, "finish_run")
        self._check_fenced(lease, expected, P.FINISH_ATOMIC)
        return lease

    @rule(
        target=spent,
        lease=consumes(leases),
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
        if status == "pending":
            error = None
            expected = self.model.hand_back(lease.run_id, lease.epoch)
            story = f"{self._lease(lease)} hands its run back"
        else:
            error = None if reason is None else _encoded(reason)
            expected = self.model.end_fenced(lease.run_id, lease.epoch, status, error)
            story = f"{self._lease(lease)} ends its run {status} ({_show(reason)})"
        got = self._run(
            self.storage.update_run_status(lease.run_id, status, lease=lease, error=error)
        )
        note(f"{story} -> {got}")
        self._fenced(lease, expected, got, f"update_run_status({status!r}, lease=...)")
        self._check_fenced(lease, expected, P.HAND_BACK if status == "pending" else P.CANCEL)
        return lease

    @rule(
        run_id=runs,
        status=st.sampled_from(("cancelled", "failed")),
        reason=st.none() | values,
    )
    def cancel(self, run_id: str, status: Literal["cancelled", "failed"], reason: object) -> None:
        """End a run from outside, without its lease."""
        error = None if reason is None else _encoded(reason)
        before = self.model.runs[run_id].status
        expected = self.model.cancel(run_id, status, error)
        got = self._run(self.storage.update_run_status(run_id, status, error=error))
        note(f"end {self.model.label(run_id)} ({before}) {status} from outside -> {got}")
        promise(
            got == expected,
            P.CANCEL if expected else P.TERMINAL_STAYS,
            f"update_run_status({status!r}) on a {before} run returned {got}",
        )
        self._check_run(run_id, P.CANCEL if expected else P.TERMINAL_STAYS)

    @rule(
        target=spent,
        lease=consumes(leases),
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
        lease=leases,
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

    @rule(
        run_id=runs,
        event=event_names,
        value=values,
        event_id=st.none() | st.sampled_from(EVENT_IDS),
        cap=st.none() | st.integers(1, 3),
    )
    def deliver(
        self, run_id: str, event: str, value: object, event_id: str | None, cap: int | None = None
    ) -> None:
        run = self.model.runs[run_id]
        before = run.status + (f" for {run.waiting_for}" if run.status == "waiting" else "")
        before += f", holding {run.held}"
        repeat = event_id is not None and event_id in run.event_ids
        expected = self.model.deliver(run_id, event, _encoded(value), event_id, cap)
        got: bool | str
        try:
            got = self._run(
                self.storage.deliver_event(
                    run_id, event, _encoded(value), event_id=event_id, max_buffered=cap
                )
            )
        except EventBufferFullError:
            got = "full"
        shown_id = "" if event_id is None else f" id={event_id}" + (" (repeat)" if repeat else "")
        shown = _show(value) + ("" if cap is None else f" (cap {cap})")
        note(f"deliver {event}{shown_id} {shown} to {run.label} ({before}) -> {got}")
        if run.terminal:
            name = P.DELIVER_FINISHED
        elif repeat:
            name = P.EVENT_BUFFER_FULL_DEDUPE if got == "full" else P.EVENT_DEDUPE
        elif "full" in (got, expected):
            name = P.EVENT_BUFFER_CAP
        else:
            name = P.EVENT_BUFFERED
        promise(got == expected, name, f"deliver_event returned {got} for a {before} run")
        self._check_run(run_id, P.EVENT_WAKES)

    @rule(
        lease=leases,
        event=event_names,
        value=values,
        event_id=st.none() | st.sampled_from(EVENT_IDS),
    )
    def deliver_to_held_run(
        self, lease: Lease, event: str, value: object, event_id: str | None
    ) -> None:
        """Deliver to the run of a lease handed out, as a worker's wait would expect."""
        self.deliver(lease.run_id, event, value, event_id)

    def _open_runs(self) -> list[str]:
        return sorted(r.id for r in self.model if not r.terminal)

    @precondition(lambda self: bool(self._open_runs()))
    @rule(
        run_id=st.runner().flatmap(lambda machine: st.sampled_from(machine._open_runs())),
        event=event_names,
        value=values,
    )
    def deliver_at_the_cap(self, run_id: str, event: str, value: object) -> None:
        """Deliver under a cap of what the run holds (at least one): refused
        if it holds any event, accepted if it holds none."""
        self.deliver(run_id, event, value, None, max(1, self.model.runs[run_id].held))

    def _waiting(self) -> list[str]:
        return sorted(r.id for r in self.model if r.status == "waiting")

    @precondition(lambda self: bool(self._waiting()))
    @rule(
        run_id=st.runner().flatmap(lambda machine: st.sampled_from(machine._waiting())),
        value=values,
        event_id=st.none() | st.sampled_from(EVENT_IDS),
    )
    def deliver_awaited(self, run_id: str, value: object, event_id: str | None) -> None:
        """Deliver the event a waiting run waits for."""
        event = self.model.runs[run_id].waiting_for
        assert event is not None
        self.deliver(run_id, event, value, event_id)

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

    @rule(lease=leases, name=st.sampled_from(STEP_NAMES), event=event_names)
    def take(self, lease: Lease, name: str, event: str) -> None:
        run = self.model.runs[lease.run_id]
        buffered = [_decoded(p) for p in run.events.get(event, ())]
        expected = self.model.take(lease.run_id, lease.epoch, name, event)
        got = self._run(self.storage.take_event(lease, name, event))
        shown = (
            "lease lost"
            if got is None
            else f"found {_show(_decoded(got.payload))}"
            if got.found
            else "nothing"
        )
        note(f"{self._lease(lease)} takes {event} at step {name!r} -> {shown}")
        self._fenced(lease, expected is not None, got is not None, "take_event")
        if expected is not None and got is not None:
            found, payload = expected
            promise(
                got.found == found and _same_value(got.payload, payload),
                P.EVENT_ONCE_IN_ORDER,
                f"took {got}, expected found={found} {payload!r}; "
                f"{event} buffered for {run.label}: {_show(buffered, 80)}",
            )
        self._check_fenced(lease, expected is not None, P.EVENT_TAKE_SAVES)

    @rule(
        lease=spent,
        operation=st.sampled_from(
            ("heartbeat", "save", "finish", "hand back", "fail", "sleep", "wait", "take")
        ),
    )
    def reuse_spent_lease(self, lease: Lease, operation: str) -> None:
        """A lease given up earlier tries a fenced write: it must be refused."""
        note(f"{self._lease(lease)}, given up earlier, tries to {operation}")
        promise(
            self.model.live(lease.run_id, lease.epoch) is None,
            P.ONE_LIVE_LEASE,
            f"the model holds given-up lease {self._lease(lease)} live",
        )
        if operation == "heartbeat":
            self.heartbeat(lease)
        elif operation == "save":
            self.save_step(lease, STEP_NAMES[0], "completed", "late", 1)
        elif operation == "finish":
            self.finish(lease, "completed", "late", STEP_NAMES[0])
        elif operation == "hand back":
            self.update_status_with_lease(lease, "pending", None)
        elif operation == "fail":
            self.update_status_with_lease(lease, "failed", "late")
        elif operation == "sleep":
            self.sleep(lease, STEP_NAMES[0], True)
        elif operation == "wait":
            self.wait(lease, STEP_NAMES[0], EVENTS[0], None)
        else:
            self.take(lease, STEP_NAMES[0], EVENTS[0])

    @precondition(lambda self: any(r.status in ("failed", "cancelled") for r in self.model))
    @rule(run_id=runs)
    def requeue(self, run_id: str) -> None:
        before = self.model.runs[run_id].status
        expected = self.model.requeue(run_id)
        got = self._run(self.storage.requeue_run(run_id))
        note(f"requeue {self.model.label(run_id)} ({before}) -> {got}")
        promise(got == expected, P.REQUEUE_ONLY_ENDED, f"requeue of a {before} run returned {got}")
        self._check_run(run_id, P.REQUEUE_ONLY_ENDED if not expected else P.REQUEUE)

    @precondition(lambda self: not self.touched_missing)
    @rule()
    def touch_missing_run(self) -> None:
        """Every operation on a run that does not exist refuses and creates nothing."""
        self.touched_missing = True
        ghost = self.reflow.unique("run")
        note("read, cancel, requeue, deliver to and take for a missing run")
        s = self.storage
        promise(self._run(s.get_run(ghost)) is None, P.MISSING_IS_NONE, "get_run")
        promise(self._run(s.get_step_results(ghost)) == {}, P.MISSING_IS_NONE, "get_step_results")
        promise(not self._run(s.update_run_status(ghost, "cancelled")), P.CANCEL, "cancel")
        promise(not self._run(s.requeue_run(ghost)), P.REQUEUE_ONLY_ENDED, "requeue_run")
        delivered = self._run(s.deliver_event(ghost, EVENTS[0], _encoded(1), event_id="x"))
        promise(not delivered, P.DELIVER_FINISHED, "deliver_event to a missing run returned True")
        taken = self._run(s.take_event(Lease(ghost, 1), STEP_NAMES[0], EVENTS[0]))
        promise(taken is None, P.STALE_LEASE_REFUSED, f"take_event for a missing run: {taken}")
        promise(self._run(s.get_run(ghost)) is None, P.MISSING_IS_NONE, "a refused call made it")

    @rule(
        wf=st.sampled_from((0, 1)),
        page_size=st.integers(1, 3),
        statuses=st.none() | st.sets(st.sampled_from(STATUSES), min_size=1, max_size=3),
    )
    def list_pages(self, wf: int, page_size: int, statuses: set[RunStatus] | None) -> None:
        workflow = self.workflows[wf]
        wanted = self.model.matching(workflow, statuses)
        shown = "any status" if statuses is None else "/".join(sorted(statuses))
        seen = self._list(workflow, page_size, statuses, max_pages=len(wanted) + 2)
        note(f"list {'AB'[wf]} ({shown}) {page_size} per page -> {self._labels(seen)}")
        promise(
            sorted(seen) == sorted(wanted),
            P.PAGINATION,
            f"visited {self._labels(seen)}, expected {self._labels(sorted(wanted))}",
        )

    def _list(
        self,
        workflow: str,
        page_size: int,
        statuses: set[RunStatus] | None,
        max_pages: int,
    ) -> list[str]:
        """Follow ``next_cursor`` to the end; the ids in the order visited."""
        seen: list[str] = []
        order: list[tuple[datetime, str]] = []
        cursor: str | None = None
        for _ in range(max_pages):
            page = self._run(
                self.storage.list_runs(
                    status=statuses, workflow=workflow, limit=page_size, cursor=cursor
                )
            )
            promise(
                len(page.runs) <= page_size,
                P.PAGINATION,
                f"page of {len(page.runs)} runs with limit {page_size}",
            )
            for record in page.runs:
                wrong = record.workflow != workflow or (
                    statuses is not None and record.status not in statuses
                )
                promise(not wrong, P.PAGINATION, f"listed {record.workflow}/{record.status}")
                seen.append(record.id)
                order.append((record.created_at, record.id))
            cursor = page.next_cursor
            if cursor is None:
                break
        else:
            promise(False, P.PAGINATION, f"still a next_cursor after {max_pages} pages")
        promise(
            all(a > b for a, b in itertools.pairwise(order)),
            P.PAGINATION,
            f"not newest first, each once: {self._labels(seen)}",
        )
        return seen

    # -- schedules ---------------------------------------------------------

    @rule(
        key=st.sampled_from((0, 1)),
        wf=st.sampled_from((0, 1)),
        value=values,
        recurrence=st.sampled_from(RECURRENCES),
        slot=st.sampled_from(SLOTS),
    )
    def upsert_schedule(
        self, key: int, wf: int, value: object, recurrence: str, slot: datetime
    ) -> None:
        name = self.schedule_keys[key]
        spec = ScheduleSpec(name, self.workflows[wf], _encoded(value), recurrence, slot)
        old = self.model.schedules.get(name)
        want = self.model.upsert_schedule(name, spec.workflow, spec.input, recurrence, slot)
        got = self._run(self.storage.upsert_schedule(spec))
        kept = old is not None and old.recurrence == recurrence
        note(
            f"upsert schedule S{key + 1} of {'AB'[wf]} {recurrence!r} next {slot:%Y-%m-%d} "
            f"-> next {got.next_run_at:%Y-%m-%d}" + (" (cadence kept)" if kept else "")
        )
        promise(
            _schedule_matches(got, want.workflow, want.input, want.recurrence, want.next_run_at),
            P.SCHEDULE_KEEP_CADENCE if kept else P.SCHEDULE_STORED,
            f"returned {got}, expected {want}",
        )
        self._check_schedules(P.SCHEDULE_KEEP_CADENCE if kept else P.SCHEDULE_STORED)

    @precondition(lambda self: bool(self.model.schedules))
    @rule(key=st.sampled_from((0, 1)))
    def delete_schedule(self, key: int) -> None:
        name = self.schedule_keys[key]
        expected = self.model.delete_schedule(name)
        got = self._run(self.storage.delete_schedule(name))
        note(f"delete schedule S{key + 1} -> {got}")
        promise(got == expected, P.SCHEDULE_DELETE, f"delete_schedule returned {got}")
        self._check_schedules(P.SCHEDULE_DELETE)

    @precondition(lambda self: bool(self.model.schedules))
    @rule(target=runs, key=st.sampled_from((0, 1)), right=st.booleans())
    def claim_slot(self, key: int, right: bool) -> str | MultipleResults[str]:
        """Fire a schedule's slot; only its current next slot fires, once."""
        name = self.schedule_keys[key]
        current = self.model.schedules.get(name)
        if current is None:
            slot = SLOTS[0]
        else:
            slot = current.next_run_at if right else current.next_run_at + MILLISECOND
        after = slot + SLOT_STEP
        fired = self.model.fire_slot(name, slot, after)
        new = None
        if fired is not None:
            slot_input = _encoded({"schedule": name, "slot": slot})
            slot_key = f"{name}@{slot.isoformat()}"
            new = NewRun(fired.workflow, slot_input, slot_key, self._new_run_id())
        run_for = new or NewRun(self.workflows[0], _encoded(None), f"{name}@{slot.isoformat()}")
        got = self._run(self.storage.claim_schedule_slot(name, slot, after, run_for))
        which = "its next slot" if fired is not None else "a slot that is not next"
        note(
            f"fire S{key + 1} at {which} {slot:%Y-%m-%d %H:%M:%S.%f} -> "
            + (
                "nothing"
                if got is None
                else self.model.label(got.id)
                if got.id in self.model.runs
                else "new run"
            )
        )
        if new is None:
            promise(got is None, P.SCHEDULE_SLOT_ONCE, f"fired a slot that is not next: {got}")
            self._check_schedules(P.SCHEDULE_SLOT_ONCE)
            return multiple()
        promise(got is not None, P.SCHEDULE_SLOT_FIRES, "the schedule's next slot did not fire")
        assert got is not None
        self._check_schedules(P.SCHEDULE_SLOT_FIRES)
        expected = self.model.create(new.workflow, new.input, new.idempotency_key)
        if expected.kind == "existing":
            promise(
                got.id == expected.existing,
                P.IDEMPOTENT_CREATE,
                f"slot fired again made {got.id}, not {self.model.label(expected.existing or '')}",
            )
        else:
            promise(
                got.id == new.run_id and got.id not in self.model.runs,
                P.CREATE_SHAPE,
                f"asked for id {new.run_id!r}, got {got.id!r}",
            )
            label = self.model.add_run(got.id, new.workflow, new.input, new.idempotency_key).label
            note(f"  the slot's run is {label}")
        self._check_run(got.id, P.SCHEDULE_SLOT_FIRES)
        return got.id

    def _check_schedules(self, name: str) -> None:
        mine = set(self.schedule_keys)
        listed = [s for s in self._run(self.storage.list_schedules()) if s.key in mine]
        found: list[str] = []
        if [s.key for s in listed] != sorted(self.model.schedules):
            found.append(
                f"listed {[s.key for s in listed]}, expected {sorted(self.model.schedules)}"
            )
        for record in listed:
            want = self.model.schedules.get(record.key)
            if want is not None and not _schedule_matches(
                record, want.workflow, want.input, want.recurrence, want.next_run_at
            ):
                found.append(f"{record} is not {want}")
        promise(not found, name, "; ".join(found))
        due = [s for s in self._run(self.storage.due_schedules(1000)) if s.key in mine]
        now = datetime.now(UTC)
        want_due = {k for k, s in self.model.schedules.items() if s.next_run_at <= now}
        promise(
            {s.key for s in due} == want_due
            and [s.next_run_at for s in due] == sorted(s.next_run_at for s in due),
            P.SCHEDULE_DUE,
            f"due {[(s.key, s.next_run_at) for s in due]}, expected {sorted(want_due)}",
        )

    # -- invariants --------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        """After every step: every run reads back as the model has it, none is
        lost or duplicated, and no run is held by two live leases. (One
        invariant, so a failing example prints one line per step for it.)"""
        for run in self.model:
            self._check_run(run.id, P.STATE_MATCHES_MODEL)
        self._no_run_lost_or_duplicated()
        self._at_most_one_live_lease()

    def _no_run_lost_or_duplicated(self) -> None:
        for workflow in self.workflows:
            wanted = self.model.matching(workflow, None)
            listed: list[str] = []
            cursor: str | None = None
            for _ in range(len(wanted) // 100 + 2):
                page = self._run(self.storage.list_runs(workflow=workflow, cursor=cursor))
                listed.extend(r.id for r in page.runs)
                cursor = page.next_cursor
                if cursor is None:
                    break
            promise(
                len(listed) == len(set(listed)) and set(listed) == wanted,
                P.NO_LOST_RUNS,
                f"{self._wf(workflow)} lists {self._labels(listed)}, "
                f"expected {self._labels(sorted(wanted))}",
            )

    def _at_most_one_live_lease(self) -> None:
        """No two claims of a run share an epoch, and at most one of the leases
        handed out is live; the adapter agrees on which (its ``lease_epoch``,
        compared with every run, and claims never return a run held live)."""
        for run_id, epochs in self.epochs.items():
            live = [e for e in epochs if self.model.live(run_id, e) is not None]
            promise(
                len(set(epochs)) == len(epochs) and len(live) <= 1,
                P.ONE_LIVE_LEASE,
                f"{self.model.label(run_id)} was handed epochs {epochs}, live: {live}",
            )


def _step(
    name: str, status: Literal["completed", "failed", "skipped"], value: object, attempts: int
) -> StepRecord:
    text = _encoded(value)
    return StepRecord(
        name,
        status,
        output=text if status == "completed" else None,
        error=text if status == "failed" else None,
        attempts=attempts,
    )


def _model_step(step: StepRecord) -> ModelStep:
    return ModelStep(step.status, step.output, step.error, step.attempts)


def _step_diff(stored: StepRecord, want: ModelStep) -> list[str]:
    found: list[str] = []
    status: StepStatus = want.status
    if stored.status != status:
        found.append(f"status {stored.status!r}, expected {status!r}")
    if stored.attempts != want.attempts:
        found.append(f"attempts {stored.attempts}, expected {want.attempts}")
    if not _same_value(stored.output, want.output):
        found.append(f"output {stored.output!r}, expected {want.output!r}")
    if not _same_value(stored.error, want.error):
        found.append(f"error {stored.error!r}, expected {want.error!r}")
    if status in ("sleeping", "waiting") and not _same_instant(stored.wake_at, want.wake_at):
        found.append(f"wake_at {stored.wake_at}, expected {want.wake_at}")
    if stored.completed_at is None:
        found.append("completed_at is not set")
    return found


def _schedule_matches(
    record: ScheduleRecord, workflow: str, input: str, recurrence: str, next_run_at: datetime
) -> bool:
    return (
        record.workflow == workflow
        and _same_value(record.input, input)
        and record.recurrence == recurrence
        and record.next_run_at == next_run_at
    )


def _why(run: ModelRun) -> str:
    """Why a run is, or is not, claimable, in words."""
    if run.status == "running":
        return "its lease lapsed" if run.lease is LeaseState.LAPSED else "held by a live lease"
    if run.status == "sleeping":
        return "sleeping, due" if run.due else "sleeping, not due"
    if run.status == "waiting":
        event = run.waiting_for or "?"
        if run.due and run.buffered(event):
            return f"waiting for {event}, which arrived"
        return f"waiting for {event}, " + ("timed out" if run.due else "not due")
    return run.status


def _unclaimable_promise(run: ModelRun) -> str:
    """The promise a claim of this (unclaimable) run breaks."""
    if run.status == "running":
        return P.ONE_LIVE_LEASE
    if run.terminal:
        return P.TERMINAL_STAYS
    return P.NOT_DUE_NOT_CLAIMABLE


def _claimable_promise(run: ModelRun) -> str:
    """The promise a claim that leaves this (claimable) run behind breaks."""
    if run.status == "running":
        return P.RECLAIM_AFTER_LAPSE
    if run.status == "waiting" and run.waiting_for is not None and run.buffered(run.waiting_for):
        return P.EVENT_WAKES
    if run.status in ("sleeping", "waiting"):
        return P.DUE_CLAIMABLE
    return P.NO_LOST_RUNS


def _machine_settings() -> settings:
    """The suite's settings without the ``explain`` phase: it traces every line
    of every replay while shrinking, which makes shrinking a failing machine
    several times slower, and for this machine it can only point at
    :func:`~reflow_conformance.promise`, which the failure names anyway."""
    chosen = suite_settings()
    return settings(chosen, phases=[p for p in chosen.phases if p is not Phase.explain])


@pytest.mark.reflow_conformance
class TestStorageStateMachine:
    """Random operation sequences, each checked against the contract's model."""

    def test_stateful_machine(self, reflow: Harness) -> None:
        # Hypothesis documents any zero-argument factory of a machine here,
        # though its annotation names only the class.
        run_state_machine_as_test(
            lambda: StorageMachine(reflow),  # type: ignore[arg-type]
            settings=_machine_settings(),
        )
