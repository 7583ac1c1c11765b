"""The storage protocol: the whole contract between the engine and a backend.

A backend is any object with the methods of :class:`Storage`. The engine never
reaches past them, so an adapter for another database is one class. The
``reflow-conformance`` suite checks an adapter against everything written here.

Four principles hold for every operation:

1. **Leases are judged by the storage's clock.** The engine passes durations
   (lease length, sleep length, wait timeout), never its own timestamps. A
   backend computes every deadline from its own notion of *now* (the database
   server's clock for networked stores, the local clock for embedded ones), so
   workers whose clocks disagree never steal a live lease.
2. **Every write on a claimed run is fenced by its lease.** A claim hands out
   a :class:`Lease` whose ``epoch`` grows by one on every claim of that run.
   A fenced operation checks, atomically with its write, that the run is still
   ``running`` under that same epoch and that the lease has not lapsed by the
   storage clock; if not, it writes nothing and returns ``False`` (or
   ``None``). Cancelling a run from outside also breaks the fence.
3. **Few round trips.** Claims are batched and return the runs' saved steps, so
   a claimed run needs no further read. Saving a step also renews the lease,
   so a step costs one write in the steady state; the last step and the run's
   completion are one atomic write (:meth:`Storage.finish_run`). A backend may
   group concurrent calls into one transaction or pipeline, as long as every
   caller learns its own outcome.
4. **Plain data only.** Inputs, outputs, errors and payloads reach the backend
   as text produced by :func:`reflow_core.codec.encode` (canonical, tagged
   JSON) and must come back as text that decodes to an equal value. Backends
   never pickle and never evaluate stored data.

Statuses and transitions::

    delayed ──(wake_at passes)──▶ claimable
    pending ──claim──▶ running ──finish_run──▶ completed | failed
       ▲                 │  │ ├─sleep_run──▶ sleeping ──(wake_at passes)──▶ claimable
       │                 │  │ ├─wait_run───▶ waiting ──(event or timeout)──▶ claimable
       │                 │  │ └─wait_children─▶ waiting ──(last child ends)──▶ claimable
       │                 │  └─update_run_status(pending, lease)──▶ pending (handed back)
       │                 └─(lease lapses)──▶ claimable again, as a reclaim
       └──requeue_run── failed | cancelled        any non-terminal ──cancel──▶ cancelled

Time values are timezone-aware UTC datetimes, kept to at least millisecond
precision (the engine passes schedule slots in whole milliseconds, so they
compare exactly after a round trip). Durations are ``timedelta``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol, TypeAlias, runtime_checkable

from reflow_core.errors import IdempotencyConflictError

__all__ = [
    "CHILDREN_WAIT_PREFIX",
    "HOLD_EVENT",
    "MAX_CREATE_BATCH",
    "MAX_FINGERPRINT",
    "MAX_GET_RUNS",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_HISTORY_MINUTES",
    "MAX_RATE",
    "MAX_RATE_PERIOD",
    "MAX_RUN_LIMITS",
    "MAX_RUN_RATES",
    "MAX_VERSION",
    "PRIORITY_RANGE",
    "RATE_BLOCK_PREFIX",
    "TERMINAL_STATUSES",
    "BufferedEvent",
    "ClaimedRun",
    "ConcurrencyLimit",
    "CreateResult",
    "EventTake",
    "FinishSource",
    "FinishedMinute",
    "Lease",
    "NewRun",
    "QueueStats",
    "RateLimit",
    "RunPage",
    "RunRecord",
    "RunStatus",
    "ScheduleRecord",
    "ScheduleSpec",
    "StepRecord",
    "StepStatus",
    "Storage",
    "WaitResult",
    "WakeupSource",
    "WakeupSubscription",
    "WorkerInfo",
    "WorkerRecord",
]

RunStatus: TypeAlias = Literal[
    "delayed", "pending", "running", "sleeping", "waiting", "completed", "failed", "cancelled"
]
"""The lifecycle state of a run."""

TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
"""Statuses a run never leaves on its own (only :meth:`Storage.requeue_run` does)."""

HOLD_EVENT = "reflow:release"
"""``waiting_for`` of a run held after a change of its workflow's definition:
the event that lets it go on (sent by ``Engine.release``)."""

CHILDREN_WAIT_PREFIX = "reflow:children:"
"""``waiting_for`` of a run parked by :meth:`Storage.wait_children`: this
prefix and the step whose children it waits for."""

StepStatus: TypeAlias = Literal["completed", "failed", "skipped", "sleeping", "waiting"]
"""``completed``/``skipped`` steps are never run again; ``failed`` records are
dropped by a requeue; ``sleeping``/``waiting`` mark a sleep or wait that was
reached and carry its fixed deadline in ``wake_at``."""


MAX_RUN_LIMITS = 2
"""How many concurrency limits one run may hold (the engine uses one for the
workflow's ``max_running`` and one for its ``Limit`` key)."""

PRIORITY_RANGE = (-1_000_000, 1_000_000)
"""The priorities a run may have, both ends included."""


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """At most ``max`` runs holding ``key`` may be running at once, across
    every worker of the store (:meth:`Storage.claim_runs`)."""

    key: str
    max: int


MAX_VERSION = 2**31 - 1
"""The highest workflow version a run may carry (versions start at 1)."""

MAX_FINGERPRINT = 64
"""The longest fingerprint a run may carry, in characters."""

MAX_HEADERS = 16
"""How many headers one run may carry (:attr:`NewRun.headers`)."""

MAX_HEADER_BYTES = 8192
"""The most a run's headers may weigh: names and values, in UTF-8 bytes."""

MAX_RUN_RATES = 2
"""How many rate limits one run may hold (the engine uses one for the
workflow's ``rate`` and one for its ``Limit`` key)."""

MAX_RATE = 10_000
"""The largest ``max`` of a :class:`RateLimit`: a backend keeps up to that
many claim times per key."""

MAX_RATE_PERIOD = timedelta(days=7)
"""The longest ``period`` of a :class:`RateLimit`."""

RATE_BLOCK_PREFIX = "reflow:rate:"
"""``blocked_by`` of a run blocked by a rate limit: this prefix and the
rate's key (a concurrency limit's key never starts with it)."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``max`` claims of runs holding ``key`` in any window of
    ``period``, across every worker of the store, by the storage's clock
    (:meth:`Storage.claim_runs`). ``period`` is whole milliseconds, from
    1 ms to :data:`MAX_RATE_PERIOD`; ``max`` is from 1 to :data:`MAX_RATE`."""

    key: str
    max: int
    period: timedelta


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to create. ``input`` is encoded text from :func:`reflow_core.codec.encode`."""

    workflow: str
    input: str
    idempotency_key: str | None = None
    run_id: str | None = None
    """Optional id chosen by the caller; the backend generates a unique one if ``None``."""
    delay: timedelta | None = None
    """Start no sooner than this long after creation, by the storage's clock:
    the run is ``delayed`` until then (``None`` or zero: ``pending``, due at once)."""
    deadline: timedelta | None = None
    """The run must finish within this long after creation, by the storage's
    clock: stored as ``RunRecord.deadline_at``. The engine fails a run past it."""
    priority: int = 0
    """Claims take due runs of a higher priority first (within
    :data:`PRIORITY_RANGE`)."""
    limits: tuple[ConcurrencyLimit, ...] = ()
    """The concurrency limits the run is held to while it runs: at most
    :data:`MAX_RUN_LIMITS`, with distinct keys."""
    rates: tuple[RateLimit, ...] = ()
    """The rate limits every claim of the run is held to: at most
    :data:`MAX_RUN_RATES`, with distinct keys."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Propagation headers stored with the run as given: what an enqueuer
    hands on to the workers that run it (W3C ``traceparent``,
    ``tracestate``, ``baggage``). At most :data:`MAX_HEADERS`, names of
    1-64 characters from ``a-z 0-9 - _ .``, values of printable ASCII, all
    of it within :data:`MAX_HEADER_BYTES`."""
    debounce_key: str | None = None
    """Debounce: while the workflow has an *open* run with this key (pending
    or delayed, never claimed), :meth:`Storage.create_run` replaces that
    run's input, priority and limits with these and makes it due ``delay``
    from now, instead of creating another run. Not with an
    ``idempotency_key``."""
    version: int = 1
    """The version of the workflow definition that enqueued the run (1 to
    :data:`MAX_VERSION`): claims can be limited to the versions a worker
    serves (``claim_runs(versions=...)``). A debounced create replaces it."""
    fingerprint: str | None = None
    """The hash of that definition's shape (its ordered steps, sleeps,
    waits, groups and maps), 1 to :data:`MAX_FINGERPRINT` characters of
    ``0-9 a-z``, or ``None``. Stored as given and never read by the storage;
    a debounced create replaces it."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as stored. ``input``/``output``/``error`` are encoded text.

    ``attempts`` counts claims of the run (every claim is an attempt);
    ``reclaims`` counts the claims that took over a lapsed lease (the previous
    worker vanished). ``lease_epoch`` is the fencing token of the latest claim.
    """

    id: str
    workflow: str
    status: RunStatus
    input: str
    output: str | None
    error: str | None
    idempotency_key: str | None
    attempts: int
    reclaims: int
    lease_epoch: int
    created_at: datetime
    updated_at: datetime
    wake_at: datetime | None = None
    """When the run is (or became) due: a delayed run's start, a sleeping
    run's wake-up, a waiting run's timeout, when a pending run became claimable."""
    waiting_for: str | None = None
    """The event name a waiting run waits for."""
    lease_expires_at: datetime | None = None
    """For a running run: when its lease lapses by the storage clock."""
    deadline_at: datetime | None = None
    """When the run must have finished: ``created_at`` plus ``NewRun.deadline``
    (``None``: no deadline). A run that is delayed, sleeping or waiting becomes
    claimable at its deadline at the latest, so the engine can fail it then."""
    parent_id: str | None = None
    """For a child run (:meth:`Storage.start_child`): the run that started it."""
    parent_step: str | None = None
    """For a child run: the parent's step that started it."""
    priority: int = 0
    """As created (``NewRun.priority``)."""
    limits: tuple[ConcurrencyLimit, ...] = ()
    """As created (``NewRun.limits``), in the order given."""
    blocked_by: str | None = None
    """For a due run (pending, or delayed, sleeping or waiting past its
    ``wake_at``) that a claim passed over because one of its limits was
    full: the key of the first full one, in the order of ``limits`` then
    ``rates`` (a rate's key behind :data:`RATE_BLOCK_PREFIX`). The run is
    not claimable until that key has room again (:meth:`Storage.claim_runs`)."""
    rates: tuple[RateLimit, ...] = ()
    """As created (``NewRun.rates``), in the order given."""
    debounce_key: str | None = None
    """As created (``NewRun.debounce_key``)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """As created (``NewRun.headers``); a debounced create replaces them."""
    version: int = 1
    """As created (``NewRun.version``; 1 for runs stored before versions
    existed); a debounced create replaces it."""
    fingerprint: str | None = None
    """As created (``NewRun.fingerprint``); a debounced create replaces it."""


@dataclass(frozen=True, slots=True)
class StepRecord:
    """A saved step. ``output``/``error`` are encoded text or ``None``."""

    name: str
    status: StepStatus
    output: str | None = None
    error: str | None = None
    attempts: int = 1
    wake_at: datetime | None = None
    """For ``sleeping``/``waiting`` records: the deadline fixed when first reached."""
    completed_at: datetime | None = None
    """Set by the backend when it stores the record; ignored on input."""


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof of a claim: the fencing token every write on the run must present."""

    run_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class ClaimedRun:
    """One run handed out by :meth:`Storage.claim_runs`, with its saved steps."""

    run: RunRecord
    lease: Lease
    steps: Mapping[str, StepRecord]
    reclaimed: bool = False
    """True if this claim took over a lapsed lease from another worker."""


@dataclass(frozen=True, slots=True)
class CreateResult:
    """What :meth:`Storage.create_run` did: ``created`` is False for an idempotent hit."""

    run: RunRecord
    created: bool


@dataclass(frozen=True, slots=True)
class RunPage:
    """One page of :meth:`Storage.list_runs`; ``next_cursor`` is ``None`` on the last page."""

    runs: Sequence[RunRecord]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class EventTake:
    """The outcome of :meth:`Storage.take_event`.

    ``found`` is False when no event is buffered; ``payload`` is encoded text.
    """

    found: bool
    payload: str | None = None


@dataclass(frozen=True, slots=True)
class WaitResult:
    """The outcome of :meth:`Storage.wait_run`."""

    ready: bool
    """True if a matching event is already buffered: the run keeps its lease."""
    deadline: datetime | None
    """The wait's fixed timeout deadline, or ``None`` for no timeout."""


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A schedule to register. ``recurrence`` is an opaque canonical string
    chosen by the engine (for example ``"every:3600"`` or ``"cron:0 * * * *"``);
    the backend only compares it for equality. ``input`` is encoded text."""

    key: str
    workflow: str
    input: str
    recurrence: str
    next_run_at: datetime


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """A stored schedule."""

    key: str
    workflow: str
    input: str
    recurrence: str
    next_run_at: datetime
    created_at: datetime
    updated_at: datetime
    extra: Mapping[str, str] = field(default_factory=dict)
    paused: bool = False
    """A paused schedule fires no slot until it is resumed
    (:meth:`Storage.set_schedule_paused`)."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker announces about itself (:meth:`Storage.announce_worker`)."""

    id: str
    """Unique per worker process, chosen by the worker."""
    host: str
    pid: int
    workflows: tuple[str, ...]
    """The workflows it serves, in the order given."""
    concurrency: int
    """How many runs it holds at most."""
    in_flight: int
    """How many runs it held when it announced itself."""


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A live entry of the worker registry (:meth:`Storage.list_workers`)."""

    id: str
    host: str
    pid: int
    workflows: tuple[str, ...]
    concurrency: int
    in_flight: int
    started_at: datetime
    """The storage's now at the announcement that created this entry."""
    last_seen_at: datetime
    """The storage's now at the latest announcement."""
    expires_at: datetime
    """``last_seen_at`` plus the announcement's ``ttl``: the entry lapses then
    unless announced again."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One workflow's queue: its unfinished runs by status (:meth:`Storage.queue_stats`)."""

    workflow: str
    delayed: int
    """Runs created with a delay that has not all passed yet, or has and they
    wait for a claim (a due delayed run is claimable like a pending one)."""
    pending: int
    running: int
    """Runs held by a lease, lapsed or not."""
    sleeping: int
    waiting: int
    oldest_pending_since: datetime | None
    """The earliest ``wake_at`` of its pending runs: since when the longest-waiting
    claimable run has waited for a worker (``None`` when none is pending)."""


MAX_CREATE_BATCH = 1000
"""How many runs one :meth:`Storage.create_runs` call may create."""

MAX_GET_RUNS = 1000
"""How many runs one :meth:`Storage.get_runs` call may read."""

MAX_HISTORY_MINUTES = 1440
"""How far back :meth:`Storage.finished_history` reaches: one day of minutes."""


@dataclass(frozen=True, slots=True)
class BufferedEvent:
    """An event delivered to a run and not taken yet (:meth:`Storage.list_buffered_events`)."""

    event: str
    """Its name."""
    payload: str
    """Encoded text, as delivered."""
    event_id: str | None = None
    """The id it was delivered with, if any."""


@dataclass(frozen=True, slots=True)
class FinishedMinute:
    """The runs that finished in one minute (:meth:`Storage.finished_history`)."""

    minute: datetime
    """The minute's start by the storage clock (aware UTC, seconds and
    microseconds zero)."""
    completed: int
    failed: int
    cancelled: int


@runtime_checkable
class Storage(Protocol):
    """The operations every Reflow backend provides. All are coroutines.

    Errors: a backend raises :class:`~reflow_core.errors.StorageError` (with
    the driver's exception as ``__cause__``) when the store fails, and never
    lets a driver exception escape. Outcomes that are part of the contract
    (a lost lease, a missing run) are return values, not exceptions.
    """

    async def initialize(self) -> None:
        """Connect and create or migrate the schema. Idempotent and safe when
        several processes call it at once. Refuses, with
        :class:`~reflow_core.errors.StorageError`, a store that holds something
        other than Reflow data, and with
        :class:`~reflow_core.errors.SchemaVersionError` a schema newer than the
        code; in both cases it modifies nothing."""
        ...

    async def close(self) -> None:
        """Release connections. Idempotent. Other operations may not be called after it."""
        ...

    async def create_run(self, new: NewRun) -> CreateResult:
        """Create a ``pending`` run, claimable at once; or, with a positive
        ``new.delay``, a ``delayed`` run whose ``wake_at`` is the storage's
        now plus the delay, claimable from then on. With ``new.deadline``,
        ``deadline_at`` is the storage's now plus the deadline, and a delayed
        run's ``wake_at`` is the earlier of the two
        (:func:`reflow_core.adapter.due_by_deadline`).

        With an ``idempotency_key``, at most one run exists per
        ``(workflow, idempotency_key)``, even under concurrent calls from many
        processes. If one exists and its ``input`` text equals ``new.input``,
        return it with ``created=False`` and change nothing; if the inputs
        differ, raise :class:`~reflow_core.errors.IdempotencyConflictError`.
        Keys of different workflows never collide, and a key names its run
        after the run ends, until :meth:`purge_finished` deletes it. A
        ``run_id`` chosen by the caller that is taken raises
        :class:`~reflow_core.errors.StorageError` and changes nothing. Names,
        keys and ids are compared by code points (no case folding, padding or
        normalization). The returned record has
        ``attempts == reclaims == lease_epoch == 0``.

        With a ``debounce_key``, at most one *open* run (``pending`` or
        ``delayed`` and never claimed: ``attempts == 0``) exists per
        ``(workflow, debounce_key)``, even under concurrent calls. If one
        exists, it is updated instead of creating a run: its ``input``,
        ``priority``, ``limits``, ``rates`` and ``headers`` become the new ones,
        ``blocked_by`` is cleared, and it is due ``new.delay`` from now
        (``delayed``, or ``pending`` and due at once without a delay; never
        later than its deadline); its id, ``created_at`` and ``deadline_at``
        stay, and it is returned with ``created=False``. Once a claim has
        taken the run, or it has ended, the key is free: the next create
        makes a new run. A ``debounce_key`` with an ``idempotency_key``
        raises :class:`~reflow_core.errors.ConfigError`.
        """
        ...

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        """Create several runs in one atomic write: one round trip to the
        store and one commit for the whole batch.

        Each item gets, at its own index, the outcome :meth:`create_run`
        would give it if the items were created one after another in the
        batch's order: a :class:`CreateResult`, or the
        :class:`~reflow_core.errors.IdempotencyConflictError` that
        ``create_run`` would raise, returned in its place (that item writes
        nothing; the others are created). Items see the ones before them: an
        idempotency key given twice with equal inputs returns the first
        item's run with ``created=False`` (a different input is a conflict),
        and a debounce key given twice updates the run the first item made
        or found.

        The batch is written whole or not at all. Every item is checked
        before anything is written, as ``create_run`` checks it, and a
        refusal names the item by its index:
        :class:`~reflow_core.errors.ConfigError` for a malformed item or a
        batch of more than :data:`MAX_CREATE_BATCH`;
        :class:`~reflow_core.errors.StorageError` for a caller-chosen
        ``run_id`` that is taken or given twice in the batch. A store that
        fails raises :class:`~reflow_core.errors.StorageError` and keeps
        nothing of the batch. An empty batch returns ``[]`` and touches
        nothing.
        """
        ...

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` claimable runs of the given workflows.

        Versions: for a workflow that is a key of ``versions``, only runs
        whose ``version`` is one of ``versions[workflow]`` are taken; its
        other runs are left exactly as they are (not blocked, not changed,
        a lapsed lease not taken over) for a claim that serves their
        version, and they never keep a served run from being taken, however
        many of them come first. A workflow that is not a key takes runs of
        any version. ``versions`` must name only workflows in ``workflows``,
        each with at least one version
        (:func:`reflow_core.adapter.check_claim_versions`).

        Claimable means: ``pending``; ``delayed``, ``sleeping`` or ``waiting``
        with ``wake_at`` at or before now; or ``running`` with a lapsed lease.
        Each claimed run becomes ``running`` with a new lease ending at
        ``now + lease``, ``lease_epoch`` incremented, ``attempts`` incremented,
        and ``reclaims`` incremented when the claim took over a lapsed lease
        (``ClaimedRun.reclaimed``). ``waiting_for`` is kept and ``wake_at`` is
        cleared. Runs with lapsed leases are taken before any other claimable
        run, so a backlog cannot starve a dead worker's runs; the other runs
        go by ``priority``, highest first, and within a priority by due time
        (``wake_at``), earliest first, so a steady stream of new runs cannot
        starve old ones of their priority (a steady stream of higher ones can).

        Concurrency limits: a run with ``limits`` is taken only if, for each
        of them, fewer than ``max`` runs holding its ``key`` are ``running``
        (lapsed leases included; runs taken earlier in the same call count).
        A claimable run a claim passes over because a limit is full becomes
        *blocked*: ``blocked_by`` is that limit's key, and no claim takes it,
        or needs to look at it, until a run holding that key stops running.
        The write that stops it (``finish_run``, ``update_run_status`` of
        any kind, ``sleep_run``, ``wait_run`` or ``wait_children`` that
        release it) unblocks, in the same atomic write, the blocked run of
        that key that a claim would take first (by priority, then due
        time), for each key the stopped run held: its ``blocked_by`` is
        cleared and it is claimable again. A run that was not blocked and
        ends without running (cancelled or failed without a lease: a run let
        go that way before any claim took it, say) passes its turn on: for
        each of its keys that has room, the write that ends it unblocks the
        key's first blocked run. A cancelled or requeued run is never
        blocked. A lapsed lease is taken over whatever the limits: the
        run still holds its slots, which pass to the new holder, so a dead
        worker's slot is free again once its lease has lapsed. Claims of
        runs that share a key are serialized with each other and with the
        writes that stop such runs, so no interleaving ever has more than
        ``max`` of them running.

        Rate limits: a run with ``rates`` is taken (a lapsed lease too) only
        if, for each of them, fewer than ``max`` claims of runs holding its
        ``key`` were made in the window of ``period`` ending now (claims
        earlier in the same call count); each claim made records one claim
        at now for each of the run's rate keys. A due run a claim passes over
        because a rate is full becomes blocked, ``blocked_by`` being
        :data:`RATE_BLOCK_PREFIX` and the key (a lapsed lease is left as it
        is, for a later claim). No claim takes it, or needs to look at it,
        until the key's window has room again: the first claim made at or
        after the time the oldest claim in the window leaves it unblocks
        the key's first blocked runs (by priority, then due time), as many
        as the window has room for, before choosing runs, whatever
        workflows it asks for. So no window of ``period`` ever holds more
        than ``max`` claims of runs holding the key, and a run waiting for
        a rate costs no claim anything until it can go.

        No run is ever held by two live leases: concurrent claimers, in this
        process or others, get disjoint runs. Each ``ClaimedRun`` carries the
        run's saved steps so the caller needs no further read.
        """
        ...

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        """Fenced: extend the lease to ``now + extend``.

        Returns False, changing nothing, if the run is no longer ``running``
        under ``lease.epoch`` with a live lease (lapsed, reclaimed, cancelled,
        finished or missing).
        """
        ...

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        """Fenced: upsert ``step`` (by ``step.name``) and extend the lease to
        ``now + extend``, atomically. Returns False, writing nothing, if the
        lease is lost."""
        ...

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        """Fenced: optionally upsert a last ``step``, then set the terminal
        ``status`` with ``output`` or ``error`` and drop the lease, all in one
        atomic write. Returns False, writing nothing, if the lease is lost.

        A child run's end wakes its parent when the parent waits for it
        (:meth:`wait_children`), in the same write."""
        ...

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a run to ``status`` outside the normal step flow.

        With a ``lease`` the write is fenced: ``pending`` hands a claimed run
        back (lease dropped, claimable at once, not counted as a reclaim when
        next claimed); ``failed`` or ``cancelled`` end it. Without a lease it
        applies to any run that is not terminal (``cancel`` uses this), and
        breaks the current holder's fence. Cancelling a run (with or without
        a lease) also cancels, in the same atomic write, every unfinished run
        below it (its children, their children, and so on), each as if it
        were cancelled on its own: lease broken, buffered events deleted. A
        child that ends here wakes its parent when the parent waits for it
        (:meth:`wait_children`). Returns False if nothing changed:
        the run is missing, terminal, or the lease was lost. Raises
        :class:`~reflow_core.errors.ConfigError`, touching nothing, for
        ``pending`` without a lease or any other target status
        (:func:`reflow_core.adapter.check_status_update` does this check).
        """
        ...

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        """Fenced: put the run to sleep at sleep step ``step``.

        The first time a run reaches ``step``, the backend records a
        ``sleeping`` step record with ``wake_at = now + duration``; later calls
        for the same step keep that ``wake_at``, so a reclaimed run sleeps
        once; a record of ``step`` with any other status is replaced. The run
        becomes ``sleeping`` until ``wake_at`` with its lease dropped
        (claimable once due, at once if already due); a run with a
        ``deadline_at`` before it is claimable from its deadline instead (the
        run's ``wake_at`` is the earlier one, the step record keeps its own).
        Returns the step's ``wake_at``, or ``None`` if the lease is lost.
        """
        ...

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        """Fenced: make the run wait for event ``event`` at wait step ``step``.

        The first time, records a ``waiting`` step record whose ``wake_at`` is
        ``now + timeout`` (or ``None``); later calls keep it, and a record of
        ``step`` with any other status is replaced. If an event named
        ``event`` is already buffered for the run, the run stays ``running``
        under its lease and the call returns ``WaitResult(ready=True, ...)``:
        take it now. Otherwise the run becomes ``waiting`` (``waiting_for =
        event``, ``wake_at`` = the wait's deadline, or the run's
        ``deadline_at`` if that is earlier or the wait has none) with its
        lease dropped, and the call returns ``WaitResult(ready=False, ...)``.
        Either way ``deadline`` is the wait's fixed deadline. Returns ``None``
        if the lease is lost.
        """
        ...

    async def deliver_event(
        self,
        run_id: str,
        event: str,
        payload: str,
        *,
        event_id: str | None = None,
        max_buffered: int | None = None,
    ) -> bool:
        """Buffer an event for a run, durably, in arrival order.

        If the run is ``waiting`` for ``event``, it becomes claimable at once.
        With an ``event_id``, a second delivery with the same id to the same
        run is a no-op that returns True (safe retries), for as long as the
        run exists, even after the first was taken. Returns False, storing
        nothing, if the run is missing or terminal.

        With ``max_buffered``, a run that already holds that many buffered
        (not yet taken) events, of any name, refuses the delivery with
        :class:`~reflow_core.errors.EventBufferFullError`, storing nothing;
        the check and the write are atomic. A repeated ``event_id`` is still
        a no-op returning True. When a run ends (``finish_run``, or
        ``update_run_status`` to ``failed`` or ``cancelled``) its buffered
        events are deleted in the same write; the event ids it has seen are
        kept, so a repeated id stays a no-op after :meth:`requeue_run`.
        """
        ...

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        """Fenced: consume the oldest buffered ``event`` for the run and save
        it as the ``completed`` result of wait step ``step``, atomically.

        If ``step`` is already completed, returns its saved payload and
        consumes nothing (a retried take is harmless). Events of other names
        and other runs are never touched. Returns ``EventTake(found=False)``
        when nothing is buffered, ``None`` if the lease is lost.
        """
        ...

    async def now(self) -> datetime:
        """The storage's clock: the *now* by which it judges leases, sleeps,
        waits and due schedules (aware UTC). The engine computes schedule
        slots from it, so engines whose clocks disagree still agree on slots."""
        ...

    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or ``None`` if there is no run with that id."""
        ...

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        """The run's saved steps by name (empty for a missing run)."""
        ...

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        """The stored runs among ``run_ids``, by id, each as :meth:`get_run`
        reads it, in one round trip: what an engine's waiters on many runs
        share. A run that does not exist (never created, or purged) is
        absent from the answer; an id given twice is read once. At most
        :data:`MAX_GET_RUNS` ids; more, or an id :func:`~reflow_core.adapter.check_text`
        refuses, raise :class:`~reflow_core.errors.ConfigError` before the
        store is read. No ids, no read: ``{}``.
        """
        ...

    async def list_runs(
        self,
        *,
        status: Collection[RunStatus] | None = None,
        workflow: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        """Runs, newest first, filtered by status and workflow, ``limit`` at most.

        Pagination is keyset on ``(created_at, id)``: following ``next_cursor``
        visits every matching run exactly once, even when runs share a creation
        time. Ties on ``created_at`` are broken by ``id`` in the store's own
        order. Cursors are opaque strings; a malformed one, or a ``limit``
        below 1, raises :class:`~reflow_core.errors.ConfigError`.
        """
        ...

    async def requeue_run(self, run_id: str) -> bool:
        """Make a ``failed`` or ``cancelled`` run ``pending`` again.

        Completed and skipped step records are kept; ``failed`` ones are
        dropped; ``error`` and ``reclaims`` are reset, and ``deadline_at`` is
        cleared (a requeued run has no deadline). The run holds no
        buffered events (they were deleted when it ended), so a wait it
        reaches again waits for an event sent after the requeue; the event
        ids it saw before are still known. A run never claimed that has a
        ``debounce_key`` is open again for debounced creates, unless another
        open run of its workflow holds that key: then its ``debounce_key``
        is cleared. Returns False, changing nothing, for a missing run or
        one in another status.
        """
        ...

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        """Delete runs that finished (``completed``, ``failed`` or
        ``cancelled``) more than ``older_than`` ago by the storage clock,
        oldest first, with their steps, buffered events, event ids and
        idempotency keys (which become free again). Returns how many runs
        were deleted.

        At most ``batch`` runs go per transaction (or script call), so a
        large purge never holds the store for long; ``limit`` bounds the
        runs deleted by this call in all (``None``: every one due). A run is
        judged by when it finished, as stored when it ended: one that
        finishes while a purge runs is younger than the cut-off and stays.
        Runs that have not finished are never touched. Arguments are checked
        with :func:`reflow_core.adapter.check_purge`.
        """
        ...

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        """Create or replace the schedule ``spec.key``.

        If a schedule with that key exists with the same ``recurrence``, its
        ``next_run_at`` is kept (re-registering does not reset the cadence)
        and its workflow and input are updated; otherwise ``spec`` is stored
        as given.
        """
        ...

    async def delete_schedule(self, key: str) -> bool:
        """Delete a schedule. Returns False if there was none with that key."""
        ...

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Every schedule, ordered by key."""
        ...

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        """Schedules whose ``next_run_at`` is at or before now, earliest first
        (then by key): ``min(limit, number due)`` of them (none for ``limit``
        below 1).

        With ``workflows``, only the due schedules of those workflows, still
        earliest first and up to ``limit``: the due schedules of other
        workflows never take a place in the page, however many there are
        (the engine passes the workflows it serves, so schedules of workflows
        nobody serves cannot keep its own from firing). An empty collection
        gives none; ``None`` (the default) gives those of every workflow.
        A backend should find them by an index keyed by workflow rather than
        walk the due schedules of other workflows.
        """
        ...

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        """Fire one slot of a schedule, exactly once across all workers.

        Atomically: if schedule ``key`` still has ``next_run_at == slot`` and
        is not paused, set it to ``next_run_at`` and create ``run`` (whose
        idempotency key the engine derives from the slot, so a retry after a
        crash finds the same run). Returns the run, or ``None`` if another
        worker fired this slot first, or the schedule is paused or gone.
        """
        ...

    async def set_schedule_paused(
        self, key: str, paused: bool, *, next_run_at: datetime | None = None
    ) -> ScheduleRecord | None:
        """Pause or resume schedule ``key``; with ``next_run_at``, also move its
        next slot there (the engine passes the first slot after now on resume,
        so the slots that passed while it was paused are skipped).

        A paused schedule is never returned by :meth:`due_schedules` and
        :meth:`claim_schedule_slot` refuses it. :meth:`upsert_schedule` keeps
        the flag of a schedule it replaces (a worker that registers its
        schedules at start does not resume one an operator paused); a new
        schedule is not paused. Pausing a paused schedule, or resuming one
        that runs, changes only what is asked. Returns the schedule as
        stored, ``None`` if there is none with that key.
        """
        ...

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        """Enter or refresh ``worker`` in the worker registry, by ``worker.id``.

        The entry's fields become those given, ``last_seen_at`` the storage's
        now and ``expires_at`` now plus ``ttl``. ``started_at`` is kept from a
        live entry of the same id; if there is none (never announced, removed,
        or lapsed) it is now. An entry whose ``expires_at`` has passed by the
        storage's clock has lapsed: it is never listed again, and a backend
        deletes it when it likes. Arguments are checked with
        :func:`reflow_core.adapter.check_worker`. Returns the entry as stored.
        """
        ...

    async def list_workers(self) -> list[WorkerRecord]:
        """The registry's live entries (``expires_at`` after the storage's
        now), ordered by ``started_at`` then ``id``."""
        ...

    async def remove_worker(self, worker_id: str) -> bool:
        """Delete a worker's entry (a worker says goodbye when it stops).
        Returns False if there was no live entry with that id."""
        ...

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        """Each workflow's unfinished runs counted by status, and since when
        its oldest pending run has waited, ordered by workflow name.

        With ``workflows``, one entry for each named workflow (zeros for one
        with no unfinished run); without, one for every workflow that has an
        unfinished run. Finished runs are not counted: they are history, which
        :meth:`list_runs` pages through. The cost grows with the number of
        unfinished runs, never with the runs that finished (an index or
        counters, not a scan of the whole store), so it is safe to call on a
        busy store with a long history.
        """
        ...

    async def find_runs_by_key(self, idempotency_key: str, *, limit: int = 20) -> list[RunRecord]:
        """The runs created with ``idempotency_key``, of any workflow (a key
        is unique within a workflow), newest first (``created_at``, then
        ``id``), ``limit`` at most. Empty when no stored run has the key. A
        lookup by an index, never a scan. ``limit`` below 1 raises
        :class:`~reflow_core.errors.ConfigError`."""
        ...

    async def list_buffered_events(self, run_id: str, *, limit: int = 100) -> list[BufferedEvent]:
        """The events delivered to run ``run_id`` and not taken yet, of every
        name, in arrival order (the order :meth:`take_event` takes them in),
        ``limit`` at most. Empty for a missing run and for a finished one (its
        buffered events were deleted when it ended). ``limit`` below 1 raises
        :class:`~reflow_core.errors.ConfigError`."""
        ...

    async def finished_history(self, minutes: int) -> list[FinishedMinute]:
        """The runs that finished in each of the last ``minutes`` minutes by
        the storage clock, the current minute included, counted by status.

        A run counts in the minute it finished (``updated_at`` when it became
        ``completed``, ``failed`` or ``cancelled``), while it is stored and
        finished: a purged run and a requeued one no longer count (a requeued
        run counts again when it finishes again). Minutes with no finished
        run are left out; the rest come oldest first. ``minutes`` is 1 to
        :data:`MAX_HISTORY_MINUTES`; anything else raises
        :class:`~reflow_core.errors.ConfigError`. The cost grows with the
        minutes asked for and the runs that finished in them, never with
        the rest of the history (an index or counters, not a scan)."""
        ...

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        """Fenced on the parent's lease: create ``new`` as a child of the run
        holding ``lease``, started by its step ``step`` (the child's
        ``parent_id`` is ``lease.run_id``, its ``parent_step`` is ``step``),
        atomically with the check of the lease.

        ``new.run_id`` is required and ``new.idempotency_key`` must be
        ``None`` (:func:`reflow_core.adapter.check_new_child`): the engine
        derives the id from the parent, the step, the step's attempt and the
        child's position in it, so a replayed step asks for the same child.
        If a run with that id exists and is a child of this run at ``step``,
        it is returned as it is and nothing is written (a replay starts
        nothing); if it exists otherwise, :class:`~reflow_core.errors.StorageError`
        is raised and nothing is written. The child is created as
        :meth:`create_run` creates a run (``pending``, or ``delayed`` with a
        positive ``new.delay``), except that its ``deadline_at`` is the
        earlier of ``now + new.deadline`` and the parent's ``deadline_at``
        (either may be absent): a child never outlives its parent's deadline.

        Returns the child, or ``None``, creating nothing, if the lease is lost.
        """
        ...

    async def wait_children(self, lease: Lease, step: StepRecord) -> bool | None:
        """Fenced: wait until every child the run started at step ``step.name``
        has ended (``completed``, ``failed`` or ``cancelled``).

        Upserts ``step`` (the engine passes a ``waiting`` record that carries
        the step's attempt). If no child of the run at that step is
        unfinished (or it has none), the run keeps its lease and the call
        returns True. Otherwise the run becomes ``waiting``, with
        ``waiting_for = CHILDREN_WAIT_PREFIX + step.name``, its lease dropped
        and ``wake_at`` its ``deadline_at`` (``None`` without one), and the
        call returns False. The write that ends its last unfinished child at
        that step (:meth:`finish_run`, or :meth:`update_run_status` to
        ``failed`` or ``cancelled``, a cascaded cancel included) also makes
        it claimable at once (``wake_at`` = now), atomically: no child's end
        can be missed. Returns ``None``, writing nothing, if the lease is lost.
        """
        ...

    async def list_children(self, run_id: str) -> list[RunRecord]:
        """The runs started by :meth:`start_child` from run ``run_id``, in the
        order they were created (``created_at``, then ``id``). Empty for a run
        with no children, and for a missing run (a purged parent's children
        are kept, and keep their ``parent_id``)."""
        ...


class WakeupSubscription(Protocol):
    """A live subscription from :meth:`WakeupSource.subscribe_wakeups`."""

    async def close(self) -> None:
        """Stop calling ``wake``. Idempotent."""
        ...


@runtime_checkable
class WakeupSource(Protocol):
    """Optional: a backend that tells idle workers when work may be ready.

    A networked backend implements this so the engine's poll interval is a
    fallback, not the dispatch latency. The engine subscribes when its worker
    starts and closes the subscription when it stops.
    """

    async def subscribe_wakeups(
        self, workflows: Collection[str], wake: Callable[[], None]
    ) -> WakeupSubscription:
        """Call ``wake()`` (on the subscriber's event loop, never blocking)
        whenever a run of one of ``workflows`` may have become claimable:
        created, handed back, requeued, woken by an event, or a sleep or wait
        deadline passing. ``workflows`` may be a live view that grows.

        Wake-ups are hints: a spurious one costs an empty claim, and one that
        is lost (a dropped connection) costs at most a poll interval, so a
        backend may drop them under load but must keep the claim the only
        judge of what is runnable. After reconnecting, a backend calls
        ``wake()`` once, since hints sent meanwhile are gone.
        """
        ...


@runtime_checkable
class FinishSource(Protocol):
    """Optional: a backend that tells waiting engines when runs end.

    Without it, an engine notices a run finished by another process by
    reading it again, at most every ``poll_interval``. A backend with a
    channel between processes implements this so that
    :meth:`~reflow_core.engine.Engine.result` and
    :meth:`~reflow_core.engine.Engine.wait` return milliseconds after the
    end, wherever the run ran. The engine subscribes while it has waiters.
    """

    async def subscribe_finishes(
        self, notify: Callable[[Collection[str] | None], None]
    ) -> WakeupSubscription:
        """Call ``notify(run_ids)`` (on the subscriber's event loop, never
        blocking) after runs reached a terminal status (completed, failed or
        cancelled, in any way: a finish, a cancel, a cancel cascade), in any
        process using this store; ``notify(None)`` when runs may have ended
        unseen (after the channel was subscribed anew, since hints sent
        meanwhile are gone, or for a run whose id a hint could not carry).

        Hints only, sent by the statement or script that ended the runs,
        after it took effect: the engine reads the runs again, so a spurious
        hint costs one read and a lost one at most a poll interval.

        The subscription may have a ``live`` attribute, true while hints
        reach it (the channel is subscribed). While it is false (listening
        is off, the connection is being made again) the engine reads the
        runs it waits for with a back-off from 10 ms, as without hints;
        while it is true, only every ``poll_interval``. Without the
        attribute the subscription counts as live.
        """
        ...
