"""``memory://``: the in-memory backend built into reflow-core.

It keeps everything in one process and loses it on exit: for tests, demos and
workflows that need no durability. It implements the full protocol and passes
the same conformance suite as every other backend; each operation runs
without awaiting, so it is atomic with respect to the event loop.

``memory://`` opens a private store. ``memory://NAME`` opens the named store
of this process, shared by every storage opened with the same name (as two
connections to one database would be), until the process exits.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import heapq
import operator
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from typing import Literal, NamedTuple

from .adapter import (
    Lifecycle,
    as_utc,
    check_aware,
    check_child_start,
    check_claim_versions,
    check_count,
    check_duration,
    check_list_limit,
    check_new_run,
    check_new_runs,
    check_purge,
    check_purge_limit,
    check_run_ids,
    check_stats_workflows,
    check_status_update,
    check_text,
    check_worker,
    child_of,
    debounced_record,
    decode_cursor,
    due_by_deadline,
    finished_minutes_from_counts,
    history_start,
    is_open_for_debounce,
    minute_of,
    new_run_id,
    new_run_record,
    purge_in_batches,
    queue_stats_from_counts,
    rate_block,
    run_page,
    serves_version,
    utcnow,
)
from .errors import EventBufferFullError, IdempotencyConflictError, StorageError
from .storage import (
    CHILDREN_WAIT_PREFIX,
    MAX_HISTORY_MINUTES,
    TERMINAL_STATUSES,
    BufferedEvent,
    ClaimedRun,
    CreateResult,
    EventTake,
    FinishedMinute,
    Lease,
    NewRun,
    QueueStats,
    RateLimit,
    RunPage,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    WaitResult,
    WorkerInfo,
    WorkerRecord,
)

__all__ = ["MemoryStorage"]


class _Buffered(NamedTuple):
    """An event buffered for a run: its place in the run's arrival order,
    its payload and the id it was delivered with."""

    arrival: int
    payload: str
    event_id: str | None


_WAKES = frozenset({"pending", "delayed", "sleeping", "waiting"})
"""Statuses whose runs are claimable once their ``wake_at`` has passed."""

_Due = tuple[tuple[int, int, datetime], str]
"""A claimable run's sort key (see ``_due``) and its id."""

_Versions = Mapping[str, tuple[int, ...]] | None
"""The versions a claim serves, by workflow, as ``check_claim_versions`` gives
them (``None``: every version of every workflow)."""

_RUN_FIELDS = tuple(field.name for field in dataclasses.fields(RunRecord))
_RUN_VALUES = operator.attrgetter(*_RUN_FIELDS)
_RUN_INDEX = {name: index for index, name in enumerate(_RUN_FIELDS)}
_UPDATED_AT = _RUN_INDEX["updated_at"]
_LEASE_EXPIRES_AT = _RUN_INDEX["lease_expires_at"]


def _replaced(record: RunRecord, changes: dict[str, object]) -> RunRecord:
    """``dataclasses.replace(record, **changes)``, in half the time: the
    in-memory backend replaces a run's record on every write."""
    values = list(_RUN_VALUES(record))
    for name, value in changes.items():
        values[_RUN_INDEX[name]] = value
    return RunRecord(*values)


def _in_order(due: list[_Due], first: int) -> Iterator[_Due]:
    """``sorted(due)``, without sorting all of it when only the ``first``
    few are wanted (a claim of a few runs among a long backlog)."""
    head = first + 1  # a claim looks at one more to find it has enough
    if len(due) <= head:
        yield from sorted(due)
        return
    yield from heapq.nsmallest(head, due)
    due.sort()
    yield from islice(due, head, None)


@dataclass(slots=True)
class _Run:
    record: RunRecord
    steps: dict[str, StepRecord] = field(default_factory=dict)
    events: dict[str, deque[_Buffered]] = field(default_factory=dict)
    """The events buffered and not taken yet, by name, each name's oldest first."""
    arrivals: int = 0
    """How many events were ever buffered for the run: the next one's ``arrival``."""
    event_ids: set[str] = field(default_factory=set)
    finished_at: datetime | None = None
    """When the run last reached a terminal status (``None`` while it has not)."""


@dataclass(slots=True)
class _State:
    runs: dict[str, _Run] = field(default_factory=dict)
    idem: dict[tuple[str, str], str] = field(default_factory=dict)
    schedules: dict[str, ScheduleRecord] = field(default_factory=dict)
    unfinished: dict[str, set[str]] = field(default_factory=dict)
    """Ids of each workflow's runs that have not ended: what queue_stats counts."""
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    """Each parent's children's ids, in the order they were started."""
    open_children: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    """Each parent's children that have not ended, by the step that started them."""
    running_by_key: dict[str, set[str]] = field(default_factory=dict)
    """The running runs holding each concurrency limit key."""
    blocked_by_key: dict[str, set[str]] = field(default_factory=dict)
    """The runs each full limit key blocks."""
    rate_claims: dict[str, list[datetime]] = field(default_factory=dict)
    """Each rate key's claim times within its period, oldest first."""
    rate_waits: dict[str, datetime] = field(default_factory=dict)
    """When each rate key with blocked runs has room again."""
    rate_heap: list[tuple[datetime, str]] = field(default_factory=list)
    """``rate_waits`` by time (entries no longer in it are skipped)."""
    debounce: dict[tuple[str, str], str] = field(default_factory=dict)
    """The run each ``(workflow, debounce_key)`` last created or updated."""
    by_key: dict[str, set[str]] = field(default_factory=dict)
    """The runs created with each idempotency key, of every workflow."""
    running: dict[str, set[str]] = field(default_factory=dict)
    """Ids of each workflow's running runs: where a claim looks for lapsed leases."""
    future: dict[str, list[tuple[datetime, str, int, RunRecord]]] = field(default_factory=dict)
    """Each workflow's runs waiting for their ``wake_at`` (pending, delayed,
    sleeping or waiting, not blocked), as a heap by ``wake_at``. An entry
    whose record is no longer the run's current one is skipped."""
    ready: dict[str, dict[int, list[tuple[int, datetime, str, int, RunRecord]]]] = field(
        default_factory=dict
    )
    """Each workflow's due runs, moved from ``future`` by the claims, by
    version, each a heap in claim order (priority, highest first, then
    ``wake_at``): a claim serving some versions looks only at theirs."""
    pushes: list[int] = field(default_factory=lambda: [0])
    """A counter that keeps heap entries of equal times apart."""
    finished_by_minute: dict[datetime, set[str]] = field(default_factory=dict)
    """The runs that ended in each minute (by the storage clock). An id stays
    when its run is requeued or deleted: a read skips it unless the run is
    still finished, in that minute."""
    finish_listeners: list[_FinishListener] = field(default_factory=list)
    """The subscriptions of :meth:`MemoryStorage.subscribe_finishes`."""


class _FinishListener:
    """One finish subscription: the ids of runs that ended are gathered and
    handed to ``notify`` once per turn of the subscriber's event loop, from
    that loop, whichever thread ended them."""

    def __init__(
        self,
        listeners: list[_FinishListener],
        loop: asyncio.AbstractEventLoop,
        notify: Callable[[Collection[str] | None], None],
    ) -> None:
        self._listeners = listeners
        self._loop = loop
        self._notify = notify
        self._pending: list[str] = []
        self._lock = threading.Lock()

    def add(self, run_id: str) -> None:
        with self._lock:
            self._pending.append(run_id)
            if len(self._pending) > 1:
                return  # a flush is already due
        try:
            same_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            same_loop = False
        try:
            if same_loop:
                self._loop.call_soon(self._flush)
            else:
                self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the subscriber's loop is closed
            self._listeners_remove()

    def _flush(self) -> None:
        with self._lock:
            ids, self._pending = self._pending, []
        if ids and self in self._listeners:
            self._notify(ids)

    def _listeners_remove(self) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(self)

    @property
    def live(self) -> bool:
        """Always: nothing comes between a store of this process and its subscribers."""
        return True

    async def close(self) -> None:
        self._listeners_remove()


_named: dict[str, _State] = {}
_named_lock = threading.Lock()


class MemoryStorage:
    """The in-memory backend.

    ``name`` selects a named store shared by every ``MemoryStorage`` of this
    process opened with that name; without it the store is private. ``clock``
    returns the storage's *now* (aware UTC); tests pass a virtual clock to
    move time without sleeping.
    """

    def __init__(
        self, *, name: str | None = None, clock: Callable[[], datetime] | None = None
    ) -> None:
        if name is None:
            state = _State()
        else:
            with _named_lock:
                state = _named.setdefault(name, _State())
        self._name = name
        self._clock = clock or utcnow
        self._runs = state.runs
        self._idem = state.idem
        self._schedules = state.schedules
        self._unfinished = state.unfinished
        self._workers = state.workers
        self._children = state.children
        self._open = state.open_children
        self._holding = state.running_by_key
        self._blocked = state.blocked_by_key
        self._rate_claims = state.rate_claims
        self._rate_waits = state.rate_waits
        self._rate_heap = state.rate_heap
        self._debounce = state.debounce
        self._by_key = state.by_key
        self._finished = state.finished_by_minute
        self._running = state.running
        self._future = state.future
        self._ready = state.ready
        self._pushes = state.pushes
        self._finish_listeners = state.finish_listeners
        # A subclass that redefines which runs are due gets the plain scan.
        self._indexed_claims = type(self)._due is MemoryStorage._due
        self._plain_updates = type(self)._update is MemoryStorage._update
        self._life = Lifecycle("memory")

    def __repr__(self) -> str:
        label = f"name={self._name!r}, " if self._name is not None else ""
        return f"MemoryStorage({label}runs={len(self._runs)})"

    # -- helpers -----------------------------------------------------------

    def _check_open(self, operation: str) -> None:
        # Usable before initialize(): only a closed storage is refused.
        self._life.check_open(operation)

    def _live(self, lease: Lease, now: datetime) -> _Run | None:
        entry = self._runs.get(lease.run_id)
        if entry is None:
            return None
        rec = entry.record
        if rec.status != "running" or rec.lease_epoch != lease.epoch:
            return None
        if rec.lease_expires_at is None or rec.lease_expires_at <= now:
            return None
        return entry

    def _renew(self, entry: _Run, now: datetime, expires: datetime) -> None:
        """A running run's lease renewed: nothing but its ``updated_at`` and
        ``lease_expires_at`` changes, so no index does (unless a subclass
        redefines ``_update``, which then sees it as any write)."""
        if not self._plain_updates:
            self._update(entry, now, lease_expires_at=expires)
            return
        values = list(_RUN_VALUES(entry.record))
        values[_UPDATED_AT] = now
        values[_LEASE_EXPIRES_AT] = expires
        entry.record = RunRecord(*values)

    def _update(self, entry: _Run, now: datetime, **changes: object) -> None:
        before = entry.record
        if "status" in changes and changes["status"] != "pending":
            changes.setdefault("blocked_by", None)  # only a pending run is blocked
        changes["updated_at"] = now
        entry.record = _replaced(before, changes)
        self._track(entry.record)
        after = entry.record
        if after.status in TERMINAL_STATUSES and before.status not in TERMINAL_STATUSES:
            self._finished.setdefault(minute_of(now), set()).add(after.id)
            if self._finish_listeners:
                self._hint_finished(after)
        if before.blocked_by != after.blocked_by:
            if before.blocked_by is not None:
                self._blocked.get(before.blocked_by, set()).discard(after.id)
            if after.blocked_by is not None:
                self._blocked.setdefault(after.blocked_by, set()).add(after.id)
        held = before.status == "running"
        if held != (after.status == "running"):
            for limit in after.limits:
                holders = self._holding.setdefault(limit.key, set())
                if held:
                    holders.discard(after.id)
                else:
                    holders.add(after.id)
            if held:  # it stopped running: each of its slots may let a blocked run go
                for limit in after.limits:
                    self._unblock(limit.key, now)
        elif (
            after.status in TERMINAL_STATUSES
            and before.status not in TERMINAL_STATUSES
            and before.blocked_by is None
        ):
            self._pass_turn(after, now)

    def _hint_finished(self, record: RunRecord) -> None:
        """Tell the finish subscribers of this store that ``record``'s run ended."""
        for listener in list(self._finish_listeners):
            listener.add(record.id)

    async def subscribe_finishes(
        self, notify: Callable[[Collection[str] | None], None]
    ) -> _FinishListener:
        """Call ``notify(run_ids)`` on the caller's event loop after runs of
        this store (a named store: of every ``MemoryStorage`` sharing it)
        ended, however they ended (see
        :class:`~reflow_core.storage.FinishSource`). Nothing is lost in a
        process, so ``notify(None)`` never comes."""
        self._check_open("subscribe_finishes")
        listener = _FinishListener(self._finish_listeners, asyncio.get_running_loop(), notify)
        self._finish_listeners.append(listener)
        return listener

    def _pass_turn(self, ended: RunRecord, now: datetime) -> None:
        """A run that was free to be claimed ended without running (a run let
        go by a slot, cancelled before a claim took it): pass its turn on,
        where its keys have room."""
        for limit in ended.limits:
            if len(self._holding.get(limit.key, ())) < limit.max:
                self._unblock(limit.key, now)

    def _unblock(self, key: str, now: datetime) -> None:
        """Make claimable the run blocked by ``key`` that a claim would take first."""
        blocked = self._blocked.get(key)
        if not blocked:
            return
        first = min(
            (self._runs[run_id].record for run_id in blocked),
            key=lambda r: (-r.priority, r.wake_at or now, r.id),
        )
        self._update(self._runs[first.id], now, blocked_by=None)

    def _in_window(self, rate: RateLimit, now: datetime) -> list[datetime]:
        """The claims of runs holding ``rate.key`` in the window of its period ending now."""
        times = self._rate_claims.get(rate.key, [])
        return times[bisect.bisect_right(times, now - rate.period) :]

    def _rate_full(self, rec: RunRecord, now: datetime) -> tuple[RateLimit, datetime] | None:
        """The first of the run's rates whose window is full, and when it has
        room again; or None."""
        for rate in rec.rates:
            window = self._in_window(rate, now)
            if len(window) >= rate.max:
                return rate, window[len(window) - rate.max] + rate.period
        return None

    def _record_claim(self, rec: RunRecord, now: datetime) -> None:
        """Note a claim of ``rec`` at ``now`` for each of its rate keys."""
        for rate in rec.rates:
            times = self._rate_claims.setdefault(rate.key, [])
            del times[: bisect.bisect_right(times, now - rate.period)]
            times.append(now)

    def _release_rates(self, now: datetime) -> None:
        """Unblock, for each rate key whose window has room again, as many of
        its first blocked runs as there is room for."""
        heap = self._rate_heap
        while heap and heap[0][0] <= now:
            at, key = heapq.heappop(heap)
            if self._rate_waits.get(key) != at:
                continue  # moved earlier since, or gone
            del self._rate_waits[key]
            blocked = self._blocked.get(rate_block(key))
            if not blocked:
                continue
            rate = next(r for r in self._runs[next(iter(blocked))].record.rates if r.key == key)
            window = self._in_window(rate, now)
            for _ in range(rate.max - len(window)):
                if not blocked:
                    break
                self._unblock(rate_block(key), now)
            if blocked:
                self._wait_for_room(key, (window[0] if window else now) + rate.period)

    def _wait_for_room(self, key: str, at: datetime) -> None:
        """Note that rate ``key`` has blocked runs and room again at ``at``
        (the earlier of that and a time already noted)."""
        noted = self._rate_waits.get(key)
        if noted is None or at < noted:
            self._rate_waits[key] = at
            heapq.heappush(self._rate_heap, (at, key))

    def _debounced(self, new: NewRun, now: datetime) -> RunRecord | None:
        """Update and return the workflow's open run with ``new.debounce_key``, if any."""
        if new.debounce_key is None:
            return None
        entry = self._runs.get(self._debounce.get((new.workflow, new.debounce_key), ""))
        if entry is None or not self._replaced_by_debounce(entry.record):
            return None
        return self._replace_debounced(entry, new, now)

    def _replaced_by_debounce(self, record: RunRecord) -> bool:
        """Whether a debounced create replaces ``record``, the open run of its key."""
        return is_open_for_debounce(record)

    def _replace_debounced(self, entry: _Run, new: NewRun, now: datetime) -> RunRecord:
        """Rewrite the open run ``entry`` as the debounced create ``new`` asks."""
        after = debounced_record(entry.record, new, now)
        self._update(
            entry,
            now,
            status=after.status,
            input=after.input,
            priority=after.priority,
            limits=after.limits,
            rates=after.rates,
            headers=after.headers,
            version=after.version,
            fingerprint=after.fingerprint,
            blocked_by=None,
            wake_at=after.wake_at,
        )
        return entry.record

    def _requeued_debounce_key(self, entry: _Run) -> str | None:
        """The debounce key of a run being requeued: a run never claimed
        takes its key back, unless another open run holds it."""
        record = entry.record
        key = record.debounce_key
        if key is None or record.attempts > 0:
            return key
        pointer = (record.workflow, key)
        other = self._runs.get(self._debounce.get(pointer, ""))
        if other is not None and other is not entry and is_open_for_debounce(other.record):
            return None  # that run holds the key
        self._debounce[pointer] = record.id
        return key

    def _track(self, record: RunRecord) -> None:
        ids = self._unfinished.setdefault(record.workflow, set())
        ended = record.status in TERMINAL_STATUSES
        if ended:
            ids.discard(record.id)
        else:
            ids.add(record.id)
        running = self._running.setdefault(record.workflow, set())
        if record.status == "running":
            running.add(record.id)
        else:
            running.discard(record.id)
            if record.wake_at is not None and record.blocked_by is None and record.status in _WAKES:
                self._pushes[0] += 1
                entry = (record.wake_at, record.id, self._pushes[0], record)
                heapq.heappush(self._future.setdefault(record.workflow, []), entry)
        if record.parent_id is not None and record.parent_step is not None:
            steps = self._open.setdefault(record.parent_id, {})
            if ended:
                steps.get(record.parent_step, set()).discard(record.id)
            else:
                steps.setdefault(record.parent_step, set()).add(record.id)

    def _store_step(self, entry: _Run, step: StepRecord, now: datetime) -> None:
        entry.steps[step.name] = StepRecord(
            step.name, step.status, step.output, step.error, step.attempts, step.wake_at, now
        )

    def _finished_in(self, minute: datetime) -> list[RunRecord]:
        """The runs stored and finished that ended in ``minute``; ids of runs
        requeued or deleted since are dropped from the minute's index."""
        ids = self._finished.get(minute)
        if not ids:
            return []
        found = []
        for run_id in list(ids):
            entry = self._runs.get(run_id)
            if (
                entry is None
                or entry.record.status not in TERMINAL_STATUSES
                or entry.finished_at is None
                or minute_of(entry.finished_at) != minute
            ):
                ids.discard(run_id)
            else:
                found.append(entry.record)
        if not ids:
            del self._finished[minute]
        return found

    def _forget_key(self, key: str, run_id: str) -> None:
        """Drop a deleted run from the runs of its idempotency key."""
        ids = self._by_key.get(key)
        if ids is not None:
            ids.discard(run_id)
            if not ids:
                del self._by_key[key]

    def _buffered(self, entry: _Run) -> int:
        """How many events the run holds that no wait has taken yet, of any name."""
        return sum(len(queue) for queue in entry.events.values())

    def _discard_events(self, entry: _Run) -> None:
        """Drop a run's buffered events as it ends; the event ids it has seen
        are kept, so a repeated delivery stays a no-op after a requeue."""
        entry.events.clear()

    def _ended(self, entry: _Run, now: datetime) -> None:
        """What every end of a run does besides its status: drop its buffered
        events, note when it finished, and wake its parent if that waits for
        its last unfinished child at its step."""
        self._discard_events(entry)
        entry.finished_at = now
        rec = entry.record
        if rec.parent_id is None or rec.parent_step is None:
            return
        parent = self._runs.get(rec.parent_id)
        if parent is None:
            return
        prec = parent.record
        if prec.status != "waiting" or prec.waiting_for != CHILDREN_WAIT_PREFIX + rec.parent_step:
            return
        if not self._open_children(rec.parent_id, rec.parent_step):
            self._update(parent, now, wake_at=now)

    def _open_children(self, parent_id: str, step: str) -> bool:
        """Whether the run has a child at ``step`` that has not ended."""
        return bool(self._open.get(parent_id, {}).get(step))

    def _cancel_below(self, run_id: str, now: datetime) -> None:
        """Cancel every unfinished run below ``run_id``, depth first."""
        for child_id in self._children.get(run_id, ()):
            child = self._runs.get(child_id)
            if child is None:
                continue
            if child.record.status not in TERMINAL_STATUSES:
                self._update(
                    child,
                    now,
                    status="cancelled",
                    lease_expires_at=None,
                    wake_at=None,
                    waiting_for=None,
                )
                self._discard_events(child)
                child.finished_at = now
            self._cancel_below(child_id, now)

    # -- lifecycle ---------------------------------------------------------

    async def initialize(self) -> None:
        self._life.closed = False
        self._life.initialized = True

    async def close(self) -> None:
        self._life.closed = True

    # -- runs --------------------------------------------------------------

    async def create_run(self, new: NewRun) -> CreateResult:
        self._check_open("create_run")
        check_new_run(new)
        outcome = self._create(new, self._clock())
        if isinstance(outcome, IdempotencyConflictError):
            raise outcome
        return outcome

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        self._check_open("get_runs")
        found: dict[str, RunRecord] = {}
        for run_id in check_run_ids(run_ids):
            entry = self._runs.get(run_id)
            if entry is not None:
                found[run_id] = entry.record
        return found

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        self._check_open("create_runs")
        check_new_runs(news, backend="memory")
        for index, new in enumerate(news):
            if new.run_id is not None and new.run_id in self._runs:
                raise StorageError(
                    f"item {index}: run id {new.run_id!r} already exists", operation="create_runs"
                )
        now = self._clock()
        return [self._create(new, now) for new in news]

    def _create(self, new: NewRun, now: datetime) -> CreateResult | IdempotencyConflictError:
        if new.idempotency_key is not None:
            existing_id = self._idem.get((new.workflow, new.idempotency_key))
            if existing_id is not None:
                existing = self._runs[existing_id].record
                if existing.input != new.input:
                    return IdempotencyConflictError(new.workflow, new.idempotency_key, existing.id)
                return CreateResult(existing, created=False)
        debounced = self._debounced(new, now)
        if debounced is not None:
            return CreateResult(debounced, created=False)
        run_id = new.run_id or new_run_id()
        if run_id in self._runs:
            raise StorageError(f"run id {run_id!r} already exists", operation="create_run")
        record = new_run_record(run_id, new, now)
        self._runs[run_id] = _Run(record)
        self._track(record)
        if new.idempotency_key is not None:
            self._idem[(new.workflow, new.idempotency_key)] = run_id
            self._by_key.setdefault(new.idempotency_key, set()).add(run_id)
        if new.debounce_key is not None:
            self._debounce[(new.workflow, new.debounce_key)] = run_id
        return CreateResult(record, created=True)

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        """Sort key of a claimable run (lapsed leases first, then by priority
        and due time), or None."""
        if rec.status == "running":
            if rec.lease_expires_at is not None and rec.lease_expires_at <= now:
                return (0, 0, rec.lease_expires_at)
            return None
        if rec.blocked_by is not None:
            return None
        due = rec.status in ("pending", "delayed", "sleeping", "waiting")
        if due and rec.wake_at is not None and rec.wake_at <= now:
            return (1, -rec.priority, rec.wake_at)
        return None

    def _scanned(
        self, workflows: set[str], now: datetime, limit: int, versions: _Versions
    ) -> Iterator[_Due]:
        """The claimable runs of ``workflows`` (of the versions served) in
        claim order, found by asking :meth:`_due` of every run that has not
        ended."""
        due: list[_Due] = []
        runs = self._runs
        for name in workflows:
            for run_id in self._unfinished.get(name, ()):
                record = runs[run_id].record
                if not serves_version(versions, record):
                    continue
                key = self._due(record, now)
                if key is not None:
                    due.append((key, run_id))
        return _in_order(due, limit)

    def _claimable(self, workflows: set[str], now: datetime, versions: _Versions) -> Iterator[_Due]:
        """What :meth:`_scanned` finds, in the same order, from the indexes:
        the lapsed leases among the running runs, then the due runs of the
        ``ready`` heaps of the versions served, topped up from ``future``
        with the runs due by now. The heaps of the versions not served are
        not looked at, so however many of their runs are due, they take no
        place in the claim. Whatever the caller takes it must write (claim
        or block), so that its entry is spent."""
        runs = self._runs
        lapsed: list[_Due] = []
        for name in workflows:
            served = None if versions is None else versions.get(name)
            for run_id in self._running.get(name, ()):
                record = runs[run_id].record
                expires = record.lease_expires_at
                if (
                    expires is not None
                    and expires <= now
                    and (served is None or record.version in served)
                ):
                    lapsed.append(((0, 0, expires), run_id))
        lapsed.sort()
        yield from lapsed
        heaps: list[list[tuple[int, datetime, str, int, RunRecord]]] = []
        for name in workflows:
            future = self._future.get(name)
            ready = self._ready.setdefault(name, {})
            while future and future[0][0] <= now:
                wake_at, run_id, seq, record = heapq.heappop(future)
                entry = runs.get(run_id)
                if entry is not None and entry.record is record:
                    heap = ready.get(record.version)
                    if heap is None:
                        heap = ready[record.version] = []
                    heapq.heappush(heap, (-record.priority, wake_at, run_id, seq, record))
            for version in [version for version, heap in ready.items() if not heap]:
                del ready[version]
            served = None if versions is None else versions.get(name)
            if served is None:
                heaps.extend(ready.values())
            else:
                heaps.extend(ready[version] for version in served if version in ready)
        while True:
            best: list[tuple[int, datetime, str, int, RunRecord]] | None = None
            for ready_heap in heaps:
                while ready_heap:
                    run_id, record = ready_heap[0][2], ready_heap[0][4]
                    entry = runs.get(run_id)
                    if entry is not None and entry.record is record:
                        break
                    heapq.heappop(ready_heap)  # written since: stale
                if ready_heap and (best is None or ready_heap[0] < best[0]):
                    best = ready_heap
            if best is None:
                return
            rank, wake_at, run_id, _, _ = heapq.heappop(best)
            yield (1, rank, wake_at), run_id

    def _full(self, rec: RunRecord) -> str | None:
        """The key of the first of the run's limits that is full, or None."""
        for limit in rec.limits:
            if len(self._holding.get(limit.key, ())) >= limit.max:
                return limit.key
        return None

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        self._check_open("claim_runs")
        for name in workflows:
            check_text(name, "workflow")
        served = check_claim_versions(workflows, versions) or None
        check_duration(lease, "lease")
        if limit <= 0:
            return []
        now = self._clock()
        self._release_rates(now)
        claimed: list[ClaimedRun] = []
        candidates = (
            self._claimable(set(workflows), now, served)
            if self._indexed_claims
            else self._scanned(set(workflows), now, limit, served)
        )
        while len(claimed) < limit:
            found = next(candidates, None)
            if found is None:
                break
            (kind, _, _), run_id = found
            entry = self._runs[run_id]
            reclaimed = kind == 0
            rec = entry.record
            full = None if reclaimed else self._full(rec)
            if full is not None:
                self._update(entry, now, blocked_by=full)
                continue
            rate_full = self._rate_full(rec, now)
            if rate_full is not None:
                if not reclaimed:  # a lapsed lease stays as it is, for a later claim
                    rate, room_at = rate_full
                    self._update(entry, now, blocked_by=rate_block(rate.key))
                    self._wait_for_room(rate.key, room_at)
                continue
            self._record_claim(rec, now)
            self._update(
                entry,
                now,
                status="running",
                lease_epoch=rec.lease_epoch + 1,
                attempts=rec.attempts + 1,
                reclaims=rec.reclaims + (1 if reclaimed else 0),
                lease_expires_at=now + lease,
                wake_at=None,
            )
            claimed.append(
                ClaimedRun(
                    run=entry.record,
                    lease=Lease(run_id, entry.record.lease_epoch),
                    steps=dict(entry.steps),
                    reclaimed=reclaimed,
                )
            )
        return claimed

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        self._check_open("heartbeat_run")
        check_duration(extend, "extend")
        now = self._clock()
        entry = self._live(lease, now)
        if entry is None:
            return False
        self._renew(entry, now, now + extend)
        return True

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        self._check_open("save_step_result")
        check_text(step.name, "step")
        check_duration(extend, "extend")
        now = self._clock()
        entry = self._live(lease, now)
        if entry is None:
            return False
        self._store_step(entry, step, now)
        self._renew(entry, now, now + extend)
        return True

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        self._check_open("finish_run")
        if step is not None:
            check_text(step.name, "step")
        now = self._clock()
        entry = self._live(lease, now)
        if entry is None:
            return False
        if step is not None:
            self._store_step(entry, step, now)
        self._update(
            entry,
            now,
            status=status,
            output=output,
            error=error,
            lease_expires_at=None,
            wake_at=None,
            waiting_for=None,
        )
        self._ended(entry, now)
        return True

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        self._check_open("update_run_status")
        check_text(run_id, "run_id")
        check_status_update(status, lease)
        now = self._clock()
        if lease is not None:
            if lease.run_id != run_id:
                return False
            entry = self._live(lease, now)
        else:
            entry = self._runs.get(run_id)
            if entry is not None and entry.record.status in TERMINAL_STATUSES:
                entry = None
        if entry is None:
            return False
        if status == "pending":
            self._update(entry, now, status="pending", lease_expires_at=None, wake_at=now)
        else:
            self._update(
                entry,
                now,
                status=status,
                error=error,
                lease_expires_at=None,
                wake_at=None,
                waiting_for=None,
            )
            if status == "cancelled":
                self._cancel_below(run_id, now)
            self._ended(entry, now)
        return True

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        self._check_open("sleep_run")
        check_text(step, "step")
        check_duration(duration, "duration")
        now = self._clock()
        entry = self._live(lease, now)
        if entry is None:
            return None
        existing = entry.steps.get(step)
        if existing is not None and existing.status == "sleeping" and existing.wake_at:
            wake_at = existing.wake_at
        else:
            wake_at = now + duration
            self._store_step(entry, StepRecord(step, "sleeping", wake_at=wake_at), now)
        self._update(
            entry,
            now,
            status="sleeping",
            wake_at=due_by_deadline(wake_at, entry.record.deadline_at),
            lease_expires_at=None,
        )
        return wake_at

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        self._check_open("wait_run")
        check_text(step, "step")
        check_text(event, "event")
        if timeout is not None:
            check_duration(timeout, "timeout")
        now = self._clock()
        entry = self._live(lease, now)
        if entry is None:
            return None
        existing = entry.steps.get(step)
        if existing is not None and existing.status == "waiting":
            deadline = existing.wake_at
        else:
            deadline = None if timeout is None else now + timeout
            self._store_step(entry, StepRecord(step, "waiting", wake_at=deadline), now)
        if entry.events.get(event):
            self._update(entry, now, waiting_for=None)
            return WaitResult(ready=True, deadline=deadline)
        self._update(
            entry,
            now,
            status="waiting",
            waiting_for=event,
            wake_at=due_by_deadline(deadline, entry.record.deadline_at),
            lease_expires_at=None,
        )
        return WaitResult(ready=False, deadline=deadline)

    async def deliver_event(
        self,
        run_id: str,
        event: str,
        payload: str,
        *,
        event_id: str | None = None,
        max_buffered: int | None = None,
    ) -> bool:
        self._check_open("deliver_event")
        check_text(run_id, "run_id")
        check_text(event, "event")
        if event_id is not None:
            check_text(event_id, "event_id")
        entry = self._runs.get(run_id)
        if entry is None or entry.record.status in TERMINAL_STATUSES:
            return False
        if event_id is not None and event_id in entry.event_ids:
            return True
        if max_buffered is not None and self._buffered(entry) >= max_buffered:
            raise EventBufferFullError(run_id, event, max_buffered)
        if event_id is not None:
            entry.event_ids.add(event_id)
        entry.events.setdefault(event, deque()).append(_Buffered(entry.arrivals, payload, event_id))
        entry.arrivals += 1
        now = self._clock()
        if entry.record.status == "waiting" and entry.record.waiting_for == event:
            self._update(entry, now, wake_at=now)
        return True

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        self._check_open("take_event")
        check_text(step, "step")
        check_text(event, "event")
        now = self._clock()
        entry = self._live(lease, now)
        if entry is None:
            return None
        existing = entry.steps.get(step)
        if existing is not None and existing.status == "completed":
            return EventTake(found=True, payload=existing.output)
        queue = entry.events.get(event)
        if not queue:
            return EventTake(found=False)
        payload = queue.popleft().payload
        self._store_step(entry, StepRecord(step, "completed", output=payload), now)
        self._update(entry, now, waiting_for=None)
        return EventTake(found=True, payload=payload)

    # -- children ----------------------------------------------------------

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        self._check_open("start_child")
        check_child_start(lease, step, new)
        assert new.run_id is not None
        now = self._clock()
        entry = self._live(lease, now)
        if entry is None:
            return None
        existing = self._runs.get(new.run_id)
        if existing is not None:
            if child_of(existing.record, lease.run_id, step):
                return existing.record
            raise StorageError(f"run id {new.run_id!r} already exists", operation="start_child")
        record = new_run_record(new.run_id, new, now, parent=entry.record, parent_step=step)
        self._runs[new.run_id] = _Run(record)
        self._track(record)
        self._children.setdefault(lease.run_id, []).append(new.run_id)
        return record

    async def wait_children(self, lease: Lease, step: StepRecord) -> bool | None:
        self._check_open("wait_children")
        check_text(step.name, "step")
        now = self._clock()
        entry = self._live(lease, now)
        if entry is None:
            return None
        self._store_step(entry, step, now)
        if not self._open_children(lease.run_id, step.name):
            self._update(entry, now)
            return True
        self._update(
            entry,
            now,
            status="waiting",
            waiting_for=CHILDREN_WAIT_PREFIX + step.name,
            wake_at=entry.record.deadline_at,
            lease_expires_at=None,
        )
        return False

    async def list_children(self, run_id: str) -> list[RunRecord]:
        self._check_open("list_children")
        check_text(run_id, "run_id")
        if run_id not in self._runs:
            return []
        children = [self._runs[c].record for c in self._children.get(run_id, ()) if c in self._runs]
        return sorted(children, key=lambda r: (r.created_at, r.id))

    async def now(self) -> datetime:
        self._check_open("now")
        return self._clock()

    async def get_run(self, run_id: str) -> RunRecord | None:
        self._check_open("get_run")
        check_text(run_id, "run_id")
        entry = self._runs.get(run_id)
        return None if entry is None else entry.record

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        self._check_open("get_step_results")
        check_text(run_id, "run_id")
        entry = self._runs.get(run_id)
        return {} if entry is None else dict(entry.steps)

    async def list_runs(
        self,
        *,
        status: Collection[RunStatus] | None = None,
        workflow: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        self._check_open("list_runs")
        check_list_limit(limit)
        if workflow is not None:
            check_text(workflow, "workflow")
        after = decode_cursor(cursor) if cursor is not None else None
        statuses = None if status is None else set(status)
        rows = sorted(
            (e.record for e in self._runs.values()),
            key=lambda r: (r.created_at, r.id),
            reverse=True,
        )
        found: list[RunRecord] = []
        for rec in rows:
            if statuses is not None and rec.status not in statuses:
                continue
            if workflow is not None and rec.workflow != workflow:
                continue
            if after is not None and (rec.created_at, rec.id) >= after:
                continue
            found.append(rec)
            if len(found) > limit:
                break
        return run_page(found, limit)

    async def requeue_run(self, run_id: str) -> bool:
        self._check_open("requeue_run")
        check_text(run_id, "run_id")
        entry = self._runs.get(run_id)
        if entry is None or entry.record.status not in ("failed", "cancelled"):
            return False
        now = self._clock()
        entry.steps = {k: v for k, v in entry.steps.items() if v.status != "failed"}
        self._update(
            entry,
            now,
            debounce_key=self._requeued_debounce_key(entry),
            status="pending",
            error=None,
            reclaims=0,
            wake_at=now,
            waiting_for=None,
            lease_expires_at=None,
            deadline_at=None,
        )
        if entry.finished_at is not None:  # it no longer counts in the minute it ended in
            self._finished.get(minute_of(entry.finished_at), set()).discard(run_id)
        entry.finished_at = None
        return True

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        """See :meth:`Storage.purge_finished`; other tasks run between batches."""
        batch = check_purge(older_than, batch)
        limit = check_purge_limit(limit)

        async def delete(size: int) -> tuple[int, bool]:
            self._check_open("purge_finished")
            cutoff = self._clock() - older_than
            doomed = sorted(
                (entry.finished_at, run_id)
                for run_id, entry in self._runs.items()
                if entry.finished_at is not None
                and entry.finished_at < cutoff
                and entry.record.status in TERMINAL_STATUSES
            )[:size]
            for finished_at, run_id in doomed:
                record = self._runs.pop(run_id).record
                if finished_at is not None:
                    self._finished.get(minute_of(finished_at), set()).discard(run_id)
                self._children.pop(run_id, None)
                self._open.pop(run_id, None)
                if record.idempotency_key is not None:
                    key = (record.workflow, record.idempotency_key)
                    if self._idem.get(key) == run_id:
                        del self._idem[key]
                    self._forget_key(record.idempotency_key, run_id)
                if record.debounce_key is not None:
                    key = (record.workflow, record.debounce_key)
                    if self._debounce.get(key) == run_id:
                        del self._debounce[key]
            await asyncio.sleep(0)
            return len(doomed), len(doomed) == size

        return await purge_in_batches(delete, batch, limit)

    # -- schedules ---------------------------------------------------------

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        self._check_open("upsert_schedule")
        check_text(spec.key, "key")
        check_text(spec.workflow, "workflow")
        now = self._clock()
        old = self._schedules.get(spec.key)
        keep = old is not None and old.recurrence == spec.recurrence
        record = ScheduleRecord(
            key=spec.key,
            workflow=spec.workflow,
            input=spec.input,
            recurrence=spec.recurrence,
            next_run_at=old.next_run_at if keep and old else spec.next_run_at,
            created_at=old.created_at if old else now,
            updated_at=now,
            paused=old.paused if old else False,
        )
        self._schedules[spec.key] = record
        return record

    async def delete_schedule(self, key: str) -> bool:
        self._check_open("delete_schedule")
        check_text(key, "key")
        return self._schedules.pop(key, None) is not None

    async def list_schedules(self) -> list[ScheduleRecord]:
        self._check_open("list_schedules")
        return [self._schedules[k] for k in sorted(self._schedules)]

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        self._check_open("due_schedules")
        names = check_stats_workflows(workflows)
        if limit < 1 or names == []:
            return []
        wanted = None if names is None else set(names)
        now = self._clock()
        due = [
            s
            for s in self._schedules.values()
            if s.next_run_at <= now and not s.paused and (wanted is None or s.workflow in wanted)
        ]
        due.sort(key=lambda s: (s.next_run_at, s.key))
        return due[:limit]

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        self._check_open("claim_schedule_slot")
        check_text(key, "key")
        check_new_run(run)
        sched = self._schedules.get(key)
        if sched is None or sched.next_run_at != slot or sched.paused:
            return None
        result = await self.create_run(run)
        self._schedules[key] = dataclasses.replace(
            sched, next_run_at=next_run_at, updated_at=self._clock()
        )
        return result.run

    async def set_schedule_paused(
        self, key: str, paused: bool, *, next_run_at: datetime | None = None
    ) -> ScheduleRecord | None:
        self._check_open("set_schedule_paused")
        check_text(key, "key")
        if next_run_at is not None:
            check_aware(next_run_at, "next_run_at")
        sched = self._schedules.get(key)
        if sched is None:
            return None
        record = dataclasses.replace(
            sched,
            paused=bool(paused),
            next_run_at=sched.next_run_at if next_run_at is None else as_utc(next_run_at),
            updated_at=self._clock(),
        )
        self._schedules[key] = record
        return record

    # -- workers and queue statistics --------------------------------------

    def _live_workers(self, now: datetime) -> dict[str, WorkerRecord]:
        for worker_id in [w.id for w in self._workers.values() if w.expires_at <= now]:
            del self._workers[worker_id]
        return self._workers

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        self._check_open("announce_worker")
        check_worker(worker, ttl)
        now = self._clock()
        old = self._live_workers(now).get(worker.id)
        record = WorkerRecord(
            id=worker.id,
            host=worker.host,
            pid=worker.pid,
            workflows=tuple(worker.workflows),
            concurrency=worker.concurrency,
            in_flight=worker.in_flight,
            started_at=now if old is None else old.started_at,
            last_seen_at=now,
            expires_at=now + ttl,
        )
        self._workers[worker.id] = record
        return record

    async def list_workers(self) -> list[WorkerRecord]:
        self._check_open("list_workers")
        live = self._live_workers(self._clock())
        return sorted(live.values(), key=lambda w: (w.started_at, w.id))

    async def remove_worker(self, worker_id: str) -> bool:
        self._check_open("remove_worker")
        check_text(worker_id, "worker_id")
        live = self._live_workers(self._clock())
        return live.pop(worker_id, None) is not None

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        self._check_open("queue_stats")
        names = check_stats_workflows(workflows)
        chosen = (
            self._unfinished
            if names is None
            else {name: self._unfinished.get(name, set()) for name in names}
        )
        rows: list[tuple[str, str, int, datetime | None]] = []
        for workflow, ids in chosen.items():
            for run_id in ids:
                record = self._runs[run_id].record
                since = record.wake_at if record.status == "pending" else None
                rows.append((workflow, record.status, 1, since))
        return queue_stats_from_counts(rows, names)

    # -- dashboard reads ---------------------------------------------------

    async def find_runs_by_key(self, idempotency_key: str, *, limit: int = 20) -> list[RunRecord]:
        self._check_open("find_runs_by_key")
        check_text(idempotency_key, "idempotency_key")
        check_count(limit, "limit")
        found = []
        for run_id in self._by_key.get(idempotency_key, ()):
            entry = self._runs.get(run_id)
            if entry is not None and entry.record.idempotency_key == idempotency_key:
                found.append(entry.record)
        found.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return found[:limit]

    async def list_buffered_events(self, run_id: str, *, limit: int = 100) -> list[BufferedEvent]:
        self._check_open("list_buffered_events")
        check_text(run_id, "run_id")
        check_count(limit, "limit")
        entry = self._runs.get(run_id)
        if entry is None or entry.record.status in TERMINAL_STATUSES:
            return []

        def named(name: str, queue: deque[_Buffered]) -> Iterator[tuple[int, str, _Buffered]]:
            return ((item.arrival, name, item) for item in queue)

        arrived = heapq.merge(*(named(name, queue) for name, queue in entry.events.items()))
        return [
            BufferedEvent(event=name, payload=item.payload, event_id=item.event_id)
            for _, name, item in islice(arrived, limit)
        ]

    async def finished_history(self, minutes: int) -> list[FinishedMinute]:
        self._check_open("finished_history")
        check_count(minutes, "minutes", most=MAX_HISTORY_MINUTES)
        now = self._clock()
        minute, last = history_start(now, minutes), minute_of(now)
        rows: list[tuple[datetime, str, int]] = []
        while minute <= last:
            for record in self._finished_in(minute):
                rows.append((minute, record.status, 1))
            minute += timedelta(minutes=1)
        return finished_minutes_from_counts(rows)
