"""The stateful test's machinery: what its rule families share.

:class:`MachineBase` holds one adapter and one
:class:`reflow_conformance.model.Model`, the event loop that drives the
adapter, and the checks that compare a run, its steps and a deadline with
the model. The rules live in ``_machine_runs`` (creating, claiming, leases,
steps, finishing, sleeps, waits, requeues), ``_machine_events`` (delivering
and taking events) and ``_machine_schedules``; ``test_stateful`` puts them
together into the machine it runs.

Time is real but never uncertain: a lease is taken either for ten minutes
(live for the whole test) or for the harness's short lease, in which case the
same rule sleeps until it has certainly lapsed; a sleep or wait deadline is
either zero (due at once) or an hour away (never reached); a run is created
with no delay, a zero one, a few milliseconds (the create waits them out, so
the run is due when anything looks) or an hour.

Priorities and concurrency limits are drawn from nothing: a run made by
``create_run`` takes them from its creation index (:meth:`MachineBase._run_terms`),
so the draws, and the examples they make, stay as they were. Its keys are
the machine's own (:attr:`MachineBase.limit_keys`). So is its rate limit
(:attr:`MachineBase.rate_key`, of max :data:`RATE_MAX` per :data:`RATE_PERIOD`,
a period no test lasts): its window fills once and never has room again, so
the runs it blocks stay blocked, and a lapsed lease over it stays lapsed.

Hypothesis rules cannot be coroutines, so each machine owns one
``asyncio.Runner`` and one storage opened on it, closed in ``teardown``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.model import Deadline, LeaseState, Model, ModelRun, ModelStep
from reflow_conformance.strategies import plain_values, same_plain
from reflow_core import codec
from reflow_core.storage import (
    RATE_BLOCK_PREFIX,
    ClaimedRun,
    ConcurrencyLimit,
    Lease,
    RateLimit,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    StepRecord,
    StepStatus,
    Storage,
)

from ._util import check_times, decoded

__all__ = [
    "DELAYS",
    "EVENTS",
    "EVENT_IDS",
    "HOUR",
    "KEYS",
    "LEASES",
    "LONG",
    "MILLISECOND",
    "RATE_MAX",
    "RATE_PERIOD",
    "RECURRENCES",
    "RUNS",
    "RUN_DEADLINE",
    "SLOTS",
    "SLOT_STEP",
    "SOON",
    "SOON_WAIT",
    "SPENT",
    "STATUSES",
    "STEP_NAMES",
    "WORKFLOW_CHOICES",
    "MachineBase",
    "claimable_promise",
    "decoded",
    "encoded",
    "event_names",
    "model_step",
    "same_instant",
    "same_value",
    "schedule_matches",
    "show",
    "step_record",
    "unclaimable_promise",
    "values",
    "why",
]

T = TypeVar("T")


LONG = timedelta(minutes=10)
HOUR = timedelta(hours=1)
MILLISECOND = timedelta(milliseconds=1)
SOON = timedelta(milliseconds=5)
"""The short delay of a run created delayed: the create waits it out (:data:`SOON_WAIT`),
so the run is due by the time anything looks at it."""
SOON_WAIT = 0.03
"""Seconds a create with the short delay waits: the delay, and rounding, many times over."""
DELAYS = (None, timedelta(0), SOON, HOUR)
"""The delays a create asks for: none, zero (both pending), short (due once the create
returns) and an hour (never due during a test)."""
RUN_DEADLINE = timedelta(days=2)
"""The run deadline of every run the machine creates with an idempotency key
(a keyless one has none; nothing is drawn for it): later than any sleep or
wait it asks for, so it caps none, and it must read back unchanged until a
requeue clears it."""
RATE_MAX = 2
"""The max of the machine's rate limit."""
RATE_PERIOD = timedelta(hours=1)
"""The period of the machine's rate limit: longer than any test, so no claim
ever leaves its window."""
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
    "delayed",
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


RUNS: Bundle[str] = Bundle("runs")
LEASES: Bundle[Lease] = Bundle("leases")
"""Leases handed out by claims and not yet given up (most of them live)."""
SPENT: Bundle[Lease] = Bundle("spent")
"""Leases given up by finishing, ending, handing back or sleeping, or left to
lapse: all lost. Heartbeats and step saves draw from them too, so a stale
lease's writes are tried, and must be refused."""


def show(value: object, width: int = 32) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def same_value(a: str | None, b: str | None) -> bool:
    """Encoded texts hold the same plain value (a store may re-encode them)."""
    return same_plain(decoded(a), decoded(b))


def encoded(value: object) -> str:
    return codec.encode(value)


def same_instant(a: datetime | None, b: datetime | None) -> bool:
    """Equal to the millisecond the contract guarantees."""
    if a is None or b is None:
        return a is b
    return abs(a - b) < MILLISECOND


class MachineBase(RuleBasedStateMachine):
    """The state and the checks the rule families share: the adapter, the
    :class:`Model`, the event loop that drives the adapter, and how a run,
    its steps and a deadline are compared with the model."""

    runs = RUNS
    leases = LEASES
    spent = SPENT

    def __init__(self, reflow: Harness) -> None:
        super().__init__()
        self.reflow = reflow
        self.model = Model()
        self.workflows = (reflow.unique("wf"), reflow.unique("wf"))
        self.schedule_keys = (reflow.unique("sched"), reflow.unique("sched"))
        self.run_prefix = reflow.unique("run") + "-"
        self.limit_keys = (reflow.unique("key"), reflow.unique("key"))
        """Key A (max 1) and key B (max 2), the concurrency limits of this machine's runs."""
        self.rate_key = reflow.unique("rate")
        """Key R, the rate limit of this machine's runs."""
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
        try:
            return loop.run_until_complete(loop.create_task(operation, context=self._context))
        except NotImplementedError as exc:
            failure = self.reflow.area_failure(exc)
            if failure is None:
                raise
            raise failure from exc

    def _new_run_id(self) -> str:
        """The id for the next run: chosen by the machine, so that runs sort
        in creation order and a replayed example claims the same runs."""
        return f"{self.run_prefix}{len(self.model.runs) + 1:04d}"

    def _run_terms(self) -> tuple[int, tuple[ConcurrencyLimit, ...], tuple[RateLimit, ...]]:
        """The priority, limits and rates of the next run ``create_run``
        makes, from its creation index ``n`` alone (nothing is drawn for
        them): every second run holds key A (max 1), every third key B (max
        2), A first when both; every odd run holds rate R (max
        :data:`RATE_MAX`); runs 3, 7, 11, ... have priority 1, the others 0."""
        n = len(self.model.runs) + 1
        limits: list[ConcurrencyLimit] = []
        if n % 2 == 0:
            limits.append(ConcurrencyLimit(self.limit_keys[0], 1))
        if n % 3 == 0:
            limits.append(ConcurrencyLimit(self.limit_keys[1], 2))
        rates = (RateLimit(self.rate_key, RATE_MAX, RATE_PERIOD),) if n % 2 == 1 else ()
        return (1 if n % 4 == 3 else 0), tuple(limits), rates

    def _key(self, key: str | None) -> str:
        """Key A or B, or rate R, for notes."""
        if key in self.limit_keys:
            return "AB"[self.limit_keys.index(key)]
        if key == RATE_BLOCK_PREFIX + self.rate_key:
            return "rate R"
        return repr(key)

    def _terms(
        self,
        priority: int,
        limits: tuple[ConcurrencyLimit, ...],
        rates: tuple[RateLimit, ...] = (),
    ) -> str:
        """A run's priority, limits and rates, for notes (nothing for none)."""
        text = "" if not priority else f" priority={priority}"
        if limits:
            text += " limits=" + ",".join(f"{self._key(x.key)}<={x.max}" for x in limits)
        if rates:
            text += " rate=R<=" + ",".join(str(x.max) for x in rates)
        return text

    def _settle(self) -> None:
        """Read back which blocked runs the last write let go, check that the
        unblocks it owed allowed them (:meth:`Model.unblock_choices`) and let
        the model adopt them."""
        for key in sorted(self.model.owed):
            choice = self.model.unblock_choices(key)
            blocked = self.model.blocked(key)
            let_go: list[str] = []
            for run_id in blocked:
                record = self._run(self.storage.get_run(run_id))
                if record is not None and record.blocked_by != key:
                    let_go.append(run_id)
            wanted = sorted(choice.must) + (
                [f"{choice.more} of {self._labels(sorted(choice.may))}"] if choice.more else []
            )
            promise(
                choice.allows(let_go),
                P.LIMIT_TURN_PASSED if choice.passed else P.LIMIT_UNBLOCKED,
                f"key {self._key(key)}: the write let go {self._labels(let_go)} of blocked "
                f"{self._labels(blocked)}, expected "
                + (
                    ", ".join(self.model.label(w) if w in self.model.runs else w for w in wanted)
                    or "nothing"
                ),
            )
            if let_go:
                note(f"... key {self._key(key)} lets {self._labels(let_go)} go")
            self.model.settle(key, let_go)

    def _held(self, records: dict[str, RunRecord | None]) -> dict[str, int]:
        """How many runs hold each key running (lapsed leases included), by ``records``."""
        held = dict.fromkeys(self.limit_keys, 0)
        for run_id, record in records.items():
            if record is not None and record.status == "running":
                for key in self.model.runs[run_id].keys:
                    held[key] = held.get(key, 0) + 1
        return held

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
        """The adapter's record and steps of ``run_id`` equal the model's
        (after settling what the last write let go)."""
        self._settle()
        run = self.model.runs[run_id]
        record = self._run(self.storage.get_run(run_id))
        promise(record is not None, P.NO_LOST_RUNS, f"{run.label} reads back as missing")
        assert record is not None
        check_times(record, run.label)
        found: list[str] = []
        for field, want, got in (
            ("status", run.status, record.status),
            ("attempts", run.attempts, record.attempts),
            ("reclaims", run.reclaims, record.reclaims),
            ("lease_epoch", run.epoch, record.lease_epoch),
            ("workflow", run.workflow, record.workflow),
            ("idempotency_key", run.idempotency_key, record.idempotency_key),
            ("parent_id", run.parent_id, record.parent_id),
            ("parent_step", run.parent_step, record.parent_step),
        ):
            if want != got:
                found.append(f"{field} is {got!r}, expected {want!r}")
        for field, want_text, got_text in (
            ("input", run.input, record.input),
            ("output", run.output, record.output),
            ("error", run.error, record.error),
        ):
            if not same_value(want_text, got_text):
                found.append(f"{field} is {got_text!r}, expected {want_text!r}")
        if run.status == "waiting" and record.waiting_for != run.waiting_for:
            found.append(f"waiting_for is {record.waiting_for!r}, expected {run.waiting_for!r}")
        if run.status == "running" and run.lease is LeaseState.LIVE:
            horizon = datetime.now(UTC) + timedelta(minutes=1)
            expires = record.lease_expires_at
            if expires is None or expires < horizon:
                found.append(f"live lease expires at {expires}, not minutes from now")
        promise(not found, name, f"{run.label}: " + "; ".join(found))
        promise(
            record.priority == run.priority,
            P.PRIORITY_STORED,
            f"{run.label}: priority {record.priority!r}, created with {run.priority}",
        )
        promise(
            tuple(record.limits) == run.limits,
            P.LIMITS_STORED,
            f"{run.label}: limits {record.limits!r}, created with {run.limits!r}",
        )
        promise(
            tuple(record.rates) == run.rates and record.debounce_key is None,
            P.RATES_STORED,
            f"{run.label}: rates {record.rates!r}, debounce_key {record.debounce_key!r}, "
            f"created with {run.rates!r} and no debounce_key",
        )
        if record.blocked_by != run.blocked_by:
            rated = any(
                b is not None and b.startswith(RATE_BLOCK_PREFIX)
                for b in (record.blocked_by, run.blocked_by)
            )
            if run.blocked_by is not None:
                broken = P.RATE_BLOCKED if rated else P.LIMIT_BLOCKED
            elif run.terminal:
                broken = P.LIMIT_CANCEL_CLEARS
            elif run.status == "running" and rated:
                # Passed over for its rate: as a reclaim, or as if no live lease held it.
                lapsed = run.lease is LeaseState.LAPSED
                broken = P.RATE_RECLAIM if lapsed else P.ONE_LIVE_LEASE
            elif run.status == "running" and run.reclaims:
                broken = P.LIMIT_RECLAIM
            else:
                broken = P.RATE_BLOCKED if rated else P.LIMIT_UNBLOCKED
            promise(
                False,
                broken,
                f"{run.label} ({run.status}): blocked_by {self._key(record.blocked_by)}, "
                f"expected {self._key(run.blocked_by) if run.blocked_by else None}",
            )
        promise(
            same_instant(record.deadline_at, run.deadline_at),
            P.RUN_DEADLINE_REQUEUE if run.deadline_cleared else P.RUN_DEADLINE_KEPT,
            f"{run.label}: deadline_at is {record.deadline_at}, expected {run.deadline_at}"
            + (" (cleared by its requeue)" if run.deadline_cleared else ""),
        )
        self._check_steps(run, self._run(self.storage.get_step_results(run_id)), steps_name or name)

    def _check_steps(self, run: ModelRun, stored: dict[str, StepRecord], name: str) -> None:
        check_times(stored, f"{run.label}, its steps")
        found: list[str] = []
        if set(stored) != set(run.steps):
            found.append(f"steps {sorted(stored)}, expected {sorted(run.steps)}")
        for step_name in sorted(set(stored) & set(run.steps)):
            found.extend(
                f"step {step_name!r}: {d}"
                for d in step_diff(stored[step_name], run.steps[step_name])
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
                same_instant(got, step.wake_at),
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


def step_record(
    name: str, status: Literal["completed", "failed", "skipped"], value: object, attempts: int
) -> StepRecord:
    text = encoded(value)
    return StepRecord(
        name,
        status,
        output=text if status == "completed" else None,
        error=text if status == "failed" else None,
        attempts=attempts,
    )


def model_step(step: StepRecord) -> ModelStep:
    return ModelStep(step.status, step.output, step.error, step.attempts)


def step_diff(stored: StepRecord, want: ModelStep) -> list[str]:
    found: list[str] = []
    status: StepStatus = want.status
    if stored.status != status:
        found.append(f"status {stored.status!r}, expected {status!r}")
    if stored.attempts != want.attempts:
        found.append(f"attempts {stored.attempts}, expected {want.attempts}")
    if not same_value(stored.output, want.output):
        found.append(f"output {stored.output!r}, expected {want.output!r}")
    if not same_value(stored.error, want.error):
        found.append(f"error {stored.error!r}, expected {want.error!r}")
    if status in ("sleeping", "waiting") and not same_instant(stored.wake_at, want.wake_at):
        found.append(f"wake_at {stored.wake_at}, expected {want.wake_at}")
    if stored.completed_at is None:
        found.append("completed_at is not set")
    return found


def schedule_matches(
    record: ScheduleRecord, workflow: str, input: str, recurrence: str, next_run_at: datetime
) -> bool:
    return (
        record.workflow == workflow
        and same_value(record.input, input)
        and record.recurrence == recurrence
        and record.next_run_at == next_run_at
    )


def why(run: ModelRun) -> str:
    """Why a run is, or is not, claimable, in words."""
    if run.blocked_by is not None:
        return f"{run.status}, blocked"
    if run.status == "running":
        return "its lease lapsed" if run.lease is LeaseState.LAPSED else "held by a live lease"
    if run.status == "sleeping":
        return "sleeping, due" if run.due else "sleeping, not due"
    if run.status == "delayed":
        return "delayed, due" if run.due else "delayed, not due"
    if run.status == "waiting":
        event = run.waiting_for or "?"
        if run.due and run.buffered(event):
            return f"waiting for {event}, which arrived"
        return f"waiting for {event}, " + ("timed out" if run.due else "not due")
    return run.status


def unclaimable_promise(run: ModelRun) -> str:
    """The promise a claim of this (unclaimable) run breaks."""
    if run.blocked_by is not None:
        rated = run.blocked_by.startswith(RATE_BLOCK_PREFIX)
        return P.RATE_BLOCKED if rated else P.LIMIT_BLOCKED
    if run.status == "running":
        return P.ONE_LIVE_LEASE
    if run.terminal:
        return P.TERMINAL_STAYS
    if run.status == "delayed":
        return P.DELAYED_NOT_CLAIMABLE
    return P.NOT_DUE_NOT_CLAIMABLE


def claimable_promise(run: ModelRun) -> str:
    """The promise a claim that leaves this (claimable) run behind breaks."""
    if run.status == "running":
        return P.RECLAIM_AFTER_LAPSE
    if run.status == "waiting" and run.waiting_for is not None and run.buffered(run.waiting_for):
        return P.EVENT_WAKES
    if run.status in ("sleeping", "waiting"):
        return P.DUE_CLAIMABLE
    if run.status == "delayed":
        return P.DELAYED_CLAIMABLE
    return P.NO_LOST_RUNS
