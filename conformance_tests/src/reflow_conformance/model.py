"""A reference model of the storage contract: the executable statement of
:mod:`reflow_core.storage`'s docstrings.

:class:`Model` keeps, in plain Python, everything a caller of a storage can
observe: runs (status, counters, epoch, input, output, error, idempotency
key), their steps, their buffered events and the event ids already seen,
and schedules. Each method applies one protocol operation the way the
contract says it must behave and returns the outcome the caller must see.
The stateful test (:mod:`reflow_conformance.suite.test_stateful`) drives an
adapter and this model side by side and compares them after every step.

The model has no clock. Time enters only in two certain forms, which the
test arranges by construction:

* a lease is either :attr:`LeaseState.LIVE` (taken for ten minutes, or
  renewed for ten minutes) or :attr:`LeaseState.LAPSED` (taken for a fraction
  of a second, and the test has slept well past its end);
* a sleep or wait deadline is either :attr:`Deadline.DUE_NOW` (duration or
  timeout zero: already passed when anyone looks) or
  :attr:`Deadline.FAR_FUTURE` (an hour away: never reached during a test);
* so is the delay of a run created ``delayed``: :attr:`Deadline.DUE_NOW`
  (a delay of a few milliseconds, which the test waits out before it looks
  again) or :attr:`Deadline.FAR_FUTURE` (an hour).

Without a clock the model does not know the order of due times, only that of
priorities. So it does not choose which blocked run a stopped holder lets go
when several of the highest priority wait: each write only owes its keys
unblocks (:attr:`Model.owed`), and :meth:`Model.unblock_choices` says which
runs must and which may be let go; the test reads back what the adapter did
and settles it with :meth:`Model.settle`. Likewise a claim is checked against
what it may do rather than replayed (the test adopts the runs it blocked with
:meth:`Model.block`).

Rate limits are counted, not timed: the machine gives its rates a period far
longer than any test, so every claim of a run holding a rate's key stays in
its window (:attr:`Model.rate_claims`), a full rate never has room again,
and the runs it blocks stay blocked until they end.

Run ids come from the adapter (the model adopts them); everything else the
model decides itself. Values are encoded text as the storage sees it; the
test compares them decoded, since a store only has to give back text that
decodes to an equal value.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from reflow_core.storage import (
    CHILDREN_WAIT_PREFIX,
    RATE_BLOCK_PREFIX,
    TERMINAL_STATUSES,
    ConcurrencyLimit,
    RateLimit,
    RunStatus,
    StepStatus,
)

__all__ = [
    "CreateOutcome",
    "Deadline",
    "LeaseState",
    "Model",
    "ModelRun",
    "ModelSchedule",
    "ModelStep",
    "UnblockChoice",
]


class LeaseState(enum.Enum):
    """What the storage clock says about a running run's lease."""

    LIVE = "live"
    LAPSED = "lapsed"


class Deadline(enum.Enum):
    """A sleep or wait deadline, as far as a test can be sure of it."""

    DUE_NOW = "due now"
    FAR_FUTURE = "far future"


@dataclass(slots=True)
class ModelStep:
    """A saved step. ``wake_at`` is the deadline the adapter reported when the
    step was first reached (for ``sleeping``/``waiting`` records), so later
    reports can be held to it."""

    status: StepStatus
    output: str | None = None
    error: str | None = None
    attempts: int = 1
    deadline: Deadline | None = None
    wake_at: datetime | None = None


@dataclass(slots=True)
class ModelRun:
    """A run as the contract says it is."""

    id: str
    label: str
    """A short name for the run (``r1``, ``r2``, ...) used in step notes."""
    workflow: str
    input: str
    idempotency_key: str | None
    status: RunStatus = "pending"
    attempts: int = 0
    reclaims: int = 0
    epoch: int = 0
    lease: LeaseState | None = None
    """Set while ``running``: whether the current lease is live or lapsed."""
    due: bool = True
    """For ``pending``/``delayed``/``sleeping``/``waiting``: claimable now."""
    waiting_for: str | None = None
    output: str | None = None
    error: str | None = None
    deadline_at: datetime | None = None
    """The run deadline the adapter stored at its creation (it never changes)."""
    deadline_cleared: bool = False
    """A requeue cleared the run's deadline."""
    steps: dict[str, ModelStep] = field(default_factory=dict)
    events: dict[str, deque[str]] = field(default_factory=dict)
    event_ids: set[str] = field(default_factory=set)
    parent_id: str | None = None
    """For a child run (``start_child``): the run that started it."""
    parent_step: str | None = None
    """For a child run: the parent's step that started it."""
    children: list[str] = field(default_factory=list)
    """The runs it started with ``start_child``, in the order it started them."""
    priority: int = 0
    limits: tuple[ConcurrencyLimit, ...] = ()
    rates: tuple[RateLimit, ...] = ()
    blocked_by: str | None = None
    """The key of the full limit a claim passed it over for, until a stop lets
    it go; or ``RATE_BLOCK_PREFIX`` and the key of its full rate, for good."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(limit.key for limit in self.limits)

    @property
    def claimable(self) -> bool:
        if self.status == "running":
            return self.lease is LeaseState.LAPSED
        return (
            self.status in ("pending", "delayed", "sleeping", "waiting")
            and self.due
            and self.blocked_by is None
        )

    def buffered(self, event: str) -> int:
        return len(self.events.get(event, ()))

    @property
    def held(self) -> int:
        """How many events the run holds untaken, of every name."""
        return sum(len(queue) for queue in self.events.values())


@dataclass(slots=True)
class ModelSchedule:
    workflow: str
    input: str
    recurrence: str
    next_run_at: datetime


@dataclass(frozen=True, slots=True)
class UnblockChoice:
    """What the unblocks a write owes a key allow: every run of ``must`` is
    let go, and ``more`` of ``may`` besides (they tie on priority, and the
    model does not know their due times)."""

    must: frozenset[str]
    may: frozenset[str]
    more: int
    passed: bool
    """Every unblock owed is a turn passed on (no holder of the key stopped)."""

    def allows(self, let_go: Collection[str]) -> bool:
        chosen = set(let_go)
        return self.must <= chosen <= self.must | self.may and len(chosen - self.must) == self.more


@dataclass(frozen=True, slots=True)
class CreateOutcome:
    """What :meth:`Model.create` expects: a new run, an idempotent hit on
    ``existing``, or a conflict with ``existing``."""

    kind: Literal["created", "existing", "conflict"]
    existing: str | None = None


class Model:
    """The observable state of one store, restricted to what one test made."""

    def __init__(self) -> None:
        self.runs: dict[str, ModelRun] = {}
        self.idempotency: dict[tuple[str, str], str] = {}
        self.schedules: dict[str, ModelSchedule] = {}
        self.owed: dict[str, list[bool]] = {}
        """Unblocks the last write owes each key, not yet settled: one entry
        per holder that stopped (False) or turn passed on (True)."""
        self.rate_claims: dict[str, int] = {}
        """The claims of runs holding each rate key: all in its window."""

    # -- reading -----------------------------------------------------------

    def __iter__(self) -> Iterator[ModelRun]:
        return iter(self.runs.values())

    def label(self, run_id: str) -> str:
        run = self.runs.get(run_id)
        return run.label if run is not None else "<missing run>"

    def lease_label(self, run_id: str, epoch: int) -> str:
        return f"{self.label(run_id)}#{epoch}"

    def live(self, run_id: str, epoch: int) -> ModelRun | None:
        """The run if a lease ``(run_id, epoch)`` is live: the run is
        ``running`` under that epoch and the lease has not lapsed."""
        run = self.runs.get(run_id)
        if run is None or run.status != "running" or run.epoch != epoch:
            return None
        return run if run.lease is LeaseState.LIVE else None

    def claimable(self, workflows: Collection[str]) -> set[str]:
        return {r.id for r in self if r.workflow in workflows and r.claimable}

    def lapsed(self, workflows: Collection[str]) -> set[str]:
        """The claimable runs whose claim would be a reclaim."""
        return {
            r.id for r in self if r.workflow in workflows and r.status == "running" and r.claimable
        }

    def holders(self, key: str) -> list[str]:
        """The running runs (lapsed leases included) holding ``key``."""
        return [r.id for r in self if r.status == "running" and key in r.keys]

    def blocked(self, key: str) -> list[str]:
        return [r.id for r in self if r.blocked_by == key]

    def limit_of(self, key: str) -> int | None:
        """The ``max`` of ``key`` (every run the machine gives a key gives it one max)."""
        for run in self:
            for limit in run.limits:
                if limit.key == key:
                    return limit.max
        return None

    def rate_of(self, key: str) -> RateLimit | None:
        """The rate of ``key`` (every run the machine gives a rate key gives it one rate)."""
        for run in self:
            for rate in run.rates:
                if rate.key == key:
                    return rate
        return None

    def rate_full(self, run_id: str) -> str | None:
        """The key of the first of the run's rates whose window is full, or None."""
        for rate in self.runs[run_id].rates:
            if self.rate_claims.get(rate.key, 0) >= rate.max:
                return rate.key
        return None

    def full(self, key: str) -> bool:
        most = self.limit_of(key)
        return most is not None and len(self.holders(key)) >= most

    def block(self, run_id: str, key: str) -> None:
        """A claim passed the run over: blocked by ``key`` (one of its limit
        keys, or the rate prefix and one of its rate keys)."""
        run = self.runs[run_id]
        assert run.claimable, f"{run.label} cannot be blocked"
        assert run.status != "running", f"{run.label} cannot be blocked"
        rates = [RATE_BLOCK_PREFIX + rate.key for rate in run.rates]
        assert key in run.keys or key in rates, f"{run.label} holds no key {key}"
        run.blocked_by = key

    def unblock_choices(self, key: str) -> UnblockChoice:
        """What the unblocks owed to ``key`` may let go: the blocked runs by
        priority, highest first, as many as are owed; those tying with the
        last one taken are open."""
        owed = self.owed.get(key, [])
        blocked = sorted((self.runs[i] for i in self.blocked(key)), key=lambda r: -r.priority)
        count = min(len(owed), len(blocked))
        if count == 0:
            return UnblockChoice(frozenset(), frozenset(), 0, all(owed))
        edge = blocked[count - 1].priority
        must = frozenset(r.id for r in blocked if r.priority > edge)
        may = frozenset(r.id for r in blocked if r.priority == edge)
        return UnblockChoice(must, may, count - len(must), all(owed))

    def settle(self, key: str, let_go: Collection[str]) -> None:
        """The adapter let ``let_go`` of ``key``'s blocked runs go (the test
        has checked the choice with :meth:`unblock_choices`)."""
        for run_id in let_go:
            self.runs[run_id].blocked_by = None
        self.owed.pop(key, None)

    def _stopped(self, run: ModelRun) -> None:
        """A run holding slots stopped running: each of its keys owes an unblock."""
        for key in run.keys:
            self.owed.setdefault(key, []).append(False)

    def _pass_turn(self, run: ModelRun) -> None:
        """A run that was not blocked ended without running: each of its keys
        with room owes an unblock."""
        for limit in run.limits:
            if len(self.holders(limit.key)) < limit.max:
                self.owed.setdefault(limit.key, []).append(True)

    def matching(self, workflow: str, statuses: Collection[str] | None) -> set[str]:
        return {
            r.id
            for r in self
            if r.workflow == workflow and (statuses is None or r.status in statuses)
        }

    # -- runs --------------------------------------------------------------

    def create(self, workflow: str, input: str, key: str | None) -> CreateOutcome:
        """``create_run``, before the adapter has chosen an id."""
        if key is not None:
            existing = self.idempotency.get((workflow, key))
            if existing is not None:
                same = self.runs[existing].input == input
                return CreateOutcome("existing" if same else "conflict", existing)
        return CreateOutcome("created")

    def add_run(
        self,
        run_id: str,
        workflow: str,
        input: str,
        key: str | None,
        delay: Deadline | None = None,
        priority: int = 0,
        limits: tuple[ConcurrencyLimit, ...] = (),
        rates: tuple[RateLimit, ...] = (),
    ) -> ModelRun:
        """Adopt the run the adapter created: pending, claimable at once; or,
        created with a positive delay, delayed, claimable once it has passed
        (``delay`` says whether it has: the test waits out a short one)."""
        run = ModelRun(run_id, f"r{len(self.runs) + 1}", workflow, input, key)
        run.priority = priority
        run.limits = limits
        run.rates = rates
        if delay is not None:
            run.status = "delayed"
            run.due = delay is Deadline.DUE_NOW
        self.runs[run_id] = run
        if key is not None:
            self.idempotency[(workflow, key)] = run_id
        return run

    def start_child(
        self, parent_id: str, epoch: int, step: str, child_id: str
    ) -> ModelRun | Literal["existing", "taken"] | None:
        """Fenced ``start_child``, before the adapter has made the child: the
        parent if the child is to be created (the caller then adopts it with
        :meth:`add_child`), ``"existing"`` if the id names the parent's child at
        ``step`` (returned as it is), ``"taken"`` if it names another run
        (``StorageError``), ``None`` if the lease is lost."""
        parent = self.live(parent_id, epoch)
        if parent is None:
            return None
        existing = self.runs.get(child_id)
        if existing is None:
            return parent
        if existing.parent_id == parent_id and existing.parent_step == step:
            return "existing"
        return "taken"

    def add_child(
        self, child_id: str, workflow: str, input: str, parent_id: str, step: str
    ) -> ModelRun:
        """Adopt the child the adapter created: pending (the machine starts no
        delayed child), linked to its parent, whose deadline it inherits
        (the caller sets ``deadline_at`` from what the adapter stored)."""
        run = self.add_run(child_id, workflow, input, None)
        run.parent_id = parent_id
        run.parent_step = step
        self.runs[parent_id].children.append(child_id)
        return run

    def open_children(self, run_id: str, step: str) -> list[str]:
        """The run's children at ``step`` that have not ended."""
        return [
            child
            for child in self.runs[run_id].children
            if self.runs[child].parent_step == step and not self.runs[child].terminal
        ]

    def wait_children(self, run_id: str, epoch: int, step: str, record: ModelStep) -> bool | None:
        """Fenced ``wait_children``: upsert the step; True (the lease kept) if
        no child at ``step`` is unfinished, else False with the run waiting
        (not due: only its last child's end, or its deadline, wakes it).
        ``None`` if the lease is lost."""
        run = self.live(run_id, epoch)
        if run is None:
            return None
        run.steps[step] = record
        if not self.open_children(run_id, step):
            return True
        run.status = "waiting"
        run.waiting_for = CHILDREN_WAIT_PREFIX + step
        run.lease = None
        run.due = False
        self._stopped(run)
        return False

    def below(self, run_id: str) -> list[str]:
        """Every run below ``run_id`` (children, their children, ...), depth first."""
        found: list[str] = []
        for child in self.runs[run_id].children:
            found.append(child)
            found.extend(self.below(child))
        return found

    def claim(self, run_id: str, lease: LeaseState) -> bool:
        """One run handed out by ``claim_runs``; returns whether it is a
        reclaim. It counts as a claim of each of its rate keys."""
        run = self.runs[run_id]
        assert run.claimable, f"{run.label} is not claimable"
        for rate in run.rates:
            self.rate_claims[rate.key] = self.rate_claims.get(rate.key, 0) + 1
        reclaimed = run.status == "running"
        run.status = "running"
        run.epoch += 1
        run.attempts += 1
        run.reclaims += 1 if reclaimed else 0
        run.lease = lease
        run.due = False
        run.blocked_by = None
        return reclaimed

    def set_lease(self, run_id: str, lease: LeaseState) -> None:
        """The lease of a running run turned out live (renewed) or lapsed (waited out)."""
        run = self.runs[run_id]
        assert run.status == "running"
        run.lease = lease

    def heartbeat(self, run_id: str, epoch: int) -> bool:
        """Fenced; a live lease is renewed for as long again (it stays live)."""
        return self.live(run_id, epoch) is not None

    def save_step(self, run_id: str, epoch: int, name: str, step: ModelStep) -> bool:
        """Fenced upsert of a step, renewing the lease."""
        run = self.live(run_id, epoch)
        if run is None:
            return False
        run.steps[name] = step
        return True

    def finish(
        self,
        run_id: str,
        epoch: int,
        status: Literal["completed", "failed"],
        output: str | None,
        error: str | None,
        step: tuple[str, ModelStep] | None,
    ) -> bool:
        """Fenced: last step, terminal status, output or error, lease dropped."""
        run = self.live(run_id, epoch)
        if run is None:
            return False
        if step is not None:
            run.steps[step[0]] = step[1]
        self._end(run, status, error)
        run.output = output
        return True

    def hand_back(self, run_id: str, epoch: int) -> bool:
        """Fenced ``update_run_status(pending, lease=...)``: pending, claimable at once."""
        run = self.live(run_id, epoch)
        if run is None:
            return False
        run.status = "pending"
        run.lease = None
        run.due = True
        self._stopped(run)
        return True

    def end_fenced(
        self, run_id: str, epoch: int, status: Literal["failed", "cancelled"], error: str | None
    ) -> bool:
        """Fenced ``update_run_status(failed|cancelled, lease=...)``; a cancel
        cascades (:meth:`cascade`)."""
        run = self.live(run_id, epoch)
        if run is None:
            return False
        self._end(run, status, error)
        if status == "cancelled":
            self.cascade(run_id)
        return True

    def doomed(self, run_id: str) -> list[str]:
        """The runs a cancel of ``run_id`` would cancel below it: the unfinished ones."""
        return [i for i in self.below(run_id) if not self.runs[i].terminal]

    def cascade(self, run_id: str) -> None:
        """What cancelling ``run_id`` does below it, in the same write: every
        unfinished run below is cancelled, its lease broken and its events
        dropped, its error left as it was."""
        for below_id in self.doomed(run_id):
            run = self.runs[below_id]
            self._end(run, "cancelled", run.error)

    def cancel(
        self, run_id: str, status: Literal["failed", "cancelled"], error: str | None
    ) -> bool:
        """Unfenced ``update_run_status``: ends any run that is not terminal;
        a cancel cascades (:meth:`cascade`)."""
        run = self.runs.get(run_id)
        if run is None or run.terminal:
            return False
        self._end(run, status, error)
        if status == "cancelled":
            self.cascade(run_id)
        return True

    def _end(self, run: ModelRun, status: RunStatus, error: str | None) -> None:
        """A run reaches a terminal status: its buffered events go with it
        (the event ids it has seen are kept). A holder's end owes its keys
        unblocks; the end of a run that was not blocked and did not run
        passes its turn on."""
        was = run.status
        blocked = run.blocked_by is not None
        run.status = status
        run.blocked_by = None
        if was == "running":
            self._stopped(run)
        elif was not in TERMINAL_STATUSES and not blocked:
            self._pass_turn(run)
        run.error = error
        run.lease = None
        run.due = False
        run.waiting_for = None
        run.events.clear()
        parent = None if run.parent_id is None else self.runs.get(run.parent_id)
        if (
            parent is not None
            and run.parent_step is not None
            and parent.status == "waiting"
            and parent.waiting_for == CHILDREN_WAIT_PREFIX + run.parent_step
            and not self.open_children(parent.id, run.parent_step)
        ):
            parent.due = True

    def sleep(self, run_id: str, epoch: int, name: str, deadline: Deadline) -> ModelStep | None:
        """Fenced ``sleep_run``: the step's sleeping record (kept if it was
        already sleeping, else new), or ``None`` if the lease is lost."""
        run = self.live(run_id, epoch)
        if run is None:
            return None
        step = run.steps.get(name)
        if step is None or step.status != "sleeping":
            step = run.steps[name] = ModelStep("sleeping", deadline=deadline)
        run.status = "sleeping"
        run.lease = None
        run.due = step.deadline is Deadline.DUE_NOW
        self._stopped(run)
        return step

    def wait(
        self, run_id: str, epoch: int, name: str, event: str, deadline: Deadline | None
    ) -> tuple[bool, ModelStep] | None:
        """Fenced ``wait_run``: ``(ready, the step's waiting record)``, or
        ``None`` if the lease is lost. ``deadline`` is ``None`` for no timeout."""
        run = self.live(run_id, epoch)
        if run is None:
            return None
        step = run.steps.get(name)
        if step is None or step.status != "waiting":
            step = run.steps[name] = ModelStep("waiting", deadline=deadline)
        if run.buffered(event):
            return True, step
        run.status = "waiting"
        run.waiting_for = event
        run.lease = None
        run.due = step.deadline is Deadline.DUE_NOW
        self._stopped(run)
        return False, step

    def deliver(
        self,
        run_id: str,
        event: str,
        payload: str,
        event_id: str | None,
        max_buffered: int | None = None,
    ) -> bool | Literal["full"]:
        """``deliver_event``: buffer in arrival order; a repeated id is a
        no-op. ``"full"`` when the run already holds ``max_buffered`` untaken
        events (the adapter must raise ``EventBufferFullError``, storing nothing)."""
        run = self.runs.get(run_id)
        if run is None or run.terminal:
            return False
        if event_id is not None and event_id in run.event_ids:
            return True
        if max_buffered is not None and run.held >= max_buffered:
            return "full"
        if event_id is not None:
            run.event_ids.add(event_id)
        run.events.setdefault(event, deque()).append(payload)
        if run.status == "waiting" and run.waiting_for == event:
            run.due = True
        return True

    def take(
        self, run_id: str, epoch: int, name: str, event: str
    ) -> tuple[bool, str | None] | None:
        """Fenced ``take_event``: ``(found, payload)``, or ``None`` if the lease is lost."""
        run = self.live(run_id, epoch)
        if run is None:
            return None
        step = run.steps.get(name)
        if step is not None and step.status == "completed":
            return True, step.output
        queue = run.events.get(event)
        if not queue:
            return False, None
        payload = queue.popleft()
        run.steps[name] = ModelStep("completed", output=payload)
        return True, payload

    def requeue(self, run_id: str) -> bool:
        """``requeue_run``: a failed or cancelled run is pending again, its
        failed steps dropped, its error and reclaims reset. It holds no
        buffered events: they were dropped when it ended."""
        run = self.runs.get(run_id)
        if run is None or run.status not in ("failed", "cancelled"):
            return False
        run.steps = {n: s for n, s in run.steps.items() if s.status != "failed"}
        run.status = "pending"
        run.error = None
        run.reclaims = 0
        run.waiting_for = None
        run.due = True
        run.blocked_by = None
        if run.deadline_at is not None:
            run.deadline_at = None
            run.deadline_cleared = True
        return True

    # -- schedules ---------------------------------------------------------

    def upsert_schedule(
        self, key: str, workflow: str, input: str, recurrence: str, next_run_at: datetime
    ) -> ModelSchedule:
        """Same recurrence keeps the cadence (``next_run_at``); otherwise stored as given."""
        old = self.schedules.get(key)
        if old is not None and old.recurrence == recurrence:
            next_run_at = old.next_run_at
        new = ModelSchedule(workflow, input, recurrence, next_run_at)
        self.schedules[key] = new
        return new

    def delete_schedule(self, key: str) -> bool:
        return self.schedules.pop(key, None) is not None

    def fire_slot(self, key: str, slot: datetime, next_run_at: datetime) -> ModelSchedule | None:
        """``claim_schedule_slot``'s first half: the schedule as it was if
        ``slot`` is its next slot (which moves on to ``next_run_at``), else
        ``None``. The caller then creates the slot's run like :meth:`create`."""
        schedule = self.schedules.get(key)
        if schedule is None or schedule.next_run_at != slot:
            return None
        self.schedules[key] = ModelSchedule(
            schedule.workflow, schedule.input, schedule.recurrence, next_run_at
        )
        return schedule
