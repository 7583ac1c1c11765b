"""The engine: enqueues runs, claims them, runs their steps, persists each result.

One :class:`Engine` is a worker (it claims and runs workflows) and a client
(it enqueues, inspects and cancels runs). Any number of engines may share one
storage, in one process or many; the storage's leases decide who runs what.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, Self

from . import codec
from ._durations import Duration, to_seconds
from .adapter import check_text
from .context import CancelSignal, CompleteRun, FailureContext, StepContext
from .errors import (
    ConfigError,
    CorruptDataError,
    ErrorInfo,
    EventNotDeclaredError,
    ParallelCompleteError,
    ReclaimLimitError,
    ReflowError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    SerializationError,
    StepCancelledError,
    StepError,
    StepTimeoutError,
    StorageError,
    ValidationError,
    WaitTimeoutError,
    WorkflowNotFoundError,
    error_info,
)
from .events import (
    Event,
    Observers,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepCompleted,
    StepSkipped,
    StepStarted,
)
from .registry import DISABLE_AUTOLOAD_ENV, load_observer_entry_points, open_storage
from .schedules import Schedule, Scheduler, parse_recurrence
from .storage import (
    TERMINAL_STATUSES,
    ClaimedRun,
    Lease,
    NewRun,
    RunRecord,
    RunStatus,
    ScheduleSpec,
    StepRecord,
    StepStatus,
    Storage,
    WakeupSource,
    WakeupSubscription,
)
from .workflow import (
    ParallelDefinition,
    SleepDefinition,
    StepDefinition,
    WaitDefinition,
    Workflow,
    _is_async_callable,
    to_plain_input,
)

__all__ = ["Clock", "Engine", "Run", "RunList", "StepResult", "SystemClock"]

logger = logging.getLogger("reflow.engine")

_WRITE_RETRY_PAUSES = (0.05, 0.25, 1.0)
"""Pauses between retries of a fenced write that failed with a StorageError."""

_SCHEDULE_BATCH = 100
"""Due schedules fired per look; a full batch makes the dispatcher look again at once."""
_HINT_GAP_MIN = 0.002
_HINT_GAP_MAX = 0.05
"""After claims that came back empty, a storage wake-up hint is acted on no
sooner than this gap (seconds, doubling per empty claim up to the maximum)
after the last empty one. Another worker took that work; when many workers
share one notification channel, this keeps a burst of hints from sending
every idle worker into the claim query for each of them."""
_HINT_GAPS = tuple(
    min(_HINT_GAP_MIN * 2**n, _HINT_GAP_MAX)
    for n in range(int(math.log2(_HINT_GAP_MAX / _HINT_GAP_MIN)) + 2)
)
"""The gap after 1, 2, ... empty claims; the last one holds from then on."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """A saved step, decoded."""

    name: str
    status: StepStatus
    output: Any
    error: ErrorInfo | None
    attempts: int
    completed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Run:
    """A run, decoded. ``steps`` is filled by :meth:`Engine.get_run_status`."""

    id: str
    workflow: str
    status: RunStatus
    input: Any
    output: Any
    error: ErrorInfo | None
    idempotency_key: str | None
    attempts: int
    reclaims: int
    created_at: datetime
    updated_at: datetime
    wake_at: datetime | None = None
    steps: Mapping[str, StepResult] = field(default_factory=dict)
    read_error: str | None = None
    """Set when a stored value of this run (its input, output, error or a
    step's) cannot be decoded: which one and why. That value reads as
    ``None``; everything else is as stored. Listing never fails because of
    one such run; a worker that claims it fails it with
    :class:`~reflow_core.errors.CorruptDataError`."""

    @classmethod
    def from_record(cls, record: RunRecord, steps: Mapping[str, StepRecord] | None = None) -> Run:
        problems: list[str] = []

        def read(text: str | None, what: str) -> Any:
            if text is None:
                return None
            try:
                return codec.decode(text)
            except SerializationError as exc:
                problems.append(f"{what}: {exc.reason}")
                return None

        decoded_steps = {
            name: StepResult(
                name=s.name,
                status=s.status,
                output=read(s.output, f"output of step {name!r}"),
                error=read(s.error, f"error of step {name!r}"),
                attempts=s.attempts,
                completed_at=s.completed_at,
            )
            for name, s in (steps or {}).items()
        }
        return cls(
            id=record.id,
            workflow=record.workflow,
            status=record.status,
            input=read(record.input, "input"),
            output=read(record.output, "output"),
            error=read(record.error, "error"),
            idempotency_key=record.idempotency_key,
            attempts=record.attempts,
            reclaims=record.reclaims,
            created_at=record.created_at,
            updated_at=record.updated_at,
            wake_at=record.wake_at,
            steps=decoded_steps,
            read_error="; ".join(problems) or None,
        )


def _read_stored(text: str | None, what: str, run_id: str) -> Any:
    """Decode a value stored for a run; one that cannot be read is a
    :class:`CorruptDataError`, which fails the run rather than the worker."""
    if text is None:
        return None
    try:
        return codec.decode(text)
    except SerializationError as exc:
        raise CorruptDataError(what, exc.reason, run_id=run_id) from exc


class _LeaseLost(Exception):
    """Internal: a fenced write was refused; stop working on the run."""


@dataclass(slots=True)
class _InFlight:
    lease: Lease
    renewed_at: float
    task: asyncio.Task[None] | None = None
    signals: set[CancelSignal] = field(default_factory=set)
    stop_reason: str | None = None
    started: bool = False

    def interrupt(self, reason: str) -> None:
        """Stop the run: fire the current attempt's signal and cancel the task.

        A task that has not started yet is not cancelled (its coroutine would
        never run, so it could neither free its slot nor hand the run back);
        it sees ``stop_reason`` when it starts and stops at once.
        """
        if self.stop_reason is None:
            self.stop_reason = reason
        for signal in list(self.signals):
            signal._fire(reason)
        if self.started and self.task is not None and not self.task.done():
            self.task.cancel()


@dataclass(slots=True)
class _Execution:
    """One claimed run being driven: its definition and what is known so far."""

    record: RunRecord
    lease: Lease
    state: _InFlight
    workflow: Workflow[Any, Any]
    saved: dict[str, StepRecord]
    input: Any = None
    prev: Any = None
    outputs: dict[str, Any] = field(default_factory=dict)
    last: bool = False
    _view: _ReadOnly = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._view = _ReadOnly(self.outputs)

    def advance(self, step: str, value: Any) -> None:
        self.outputs[step] = value
        self.prev = value

    def context(
        self, step: str, attempt: int, signal: CancelSignal, *, in_parallel: bool = False
    ) -> StepContext[Any, Any]:
        return StepContext(
            run_id=self.record.id,
            workflow=self.record.workflow,
            step=step,
            attempt=attempt,
            input=self.input,
            prev=self.prev,
            steps=self._view,
            signal=signal,
            in_parallel=in_parallel,
        )


class Clock:
    """Where the engine gets the time and waits (retry back-off, polling).

    The default is :class:`SystemClock`; :mod:`reflow_core.testing` uses a
    virtual one so tests pass time instantly.
    """

    def now(self) -> datetime:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError


class SystemClock(Clock):
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class RunList:
    """One page of :meth:`Engine.list_runs`; pass ``next_cursor`` for the next."""

    runs: list[Run]
    next_cursor: str | None


def _positive(value: Duration, option: str, minimum: float, maximum: float) -> float:
    return to_seconds(value, option=option, allow_zero=False, minimum=minimum, maximum=maximum)


MIN_LEASE = 0.1
"""The shortest lease (seconds): anything shorter lapses between two writes."""
MAX_LEASE = 3650 * 86400.0
"""The longest lease (seconds, ten years). Production leases are seconds to
minutes (a dead worker's runs wait this long); the test engine uses the
maximum so that virtual time never lapses one."""
MIN_HEARTBEAT = 0.01
"""The shortest heartbeat interval (seconds)."""
POLL_INTERVAL_RANGE = (0.001, 86400.0)
"""The shortest and longest ``poll_interval`` (seconds)."""


class Engine:
    """Runs workflows durably on a storage backend.

    ``storage`` is a storage object or a URL for :func:`~reflow_core.open_storage`.
    ``concurrency`` bounds the runs in flight in this engine; ``lease`` is how
    long a claim lasts without renewal; ``heartbeat`` how often a long step
    renews it (default a third of the lease; it must be shorter than the
    lease). ``poll_interval`` is how often an idle engine looks for work
    enqueued elsewhere. A run whose lease lapsed more than ``max_reclaims``
    times (its worker died or hung each time) is failed with
    :class:`~reflow_core.errors.ReclaimLimitError`. ``drain_timeout`` is how
    long :meth:`stop` lets in-flight runs finish before handing them back.
    ``max_buffered_events`` bounds the events one run may hold that no wait
    has consumed yet (default 1000, ``None`` for no bound): :meth:`send_event`
    to a run holding that many raises
    :class:`~reflow_core.errors.EventBufferFullError`.

    Use it as an async context manager: entering initializes the storage and
    starts the worker, leaving stops it and closes the storage (pass
    ``close_storage=False`` to keep it open). With ``worker=False`` entering
    starts no worker: the engine only enqueues, inspects and cancels runs.

    ``plugins`` are observer plugins (see :mod:`reflow_core.hookspecs`);
    observers announced through the ``reflow`` entry-point group are loaded
    too unless ``load_entry_points=False``. ``clock`` replaces the real
    clock for the engine's own waits (see :mod:`reflow_core.testing`).
    """

    def __init__(
        self,
        *,
        storage: Storage | str,
        workflows: Iterable[Workflow[Any, Any]] = (),
        concurrency: int = 10,
        lease: Duration = "30s",
        heartbeat: Duration | None = None,
        poll_interval: Duration = "1s",
        claim_batch: int | None = None,
        max_reclaims: int = 5,
        max_buffered_events: int | None = 1000,
        drain_timeout: Duration = "10s",
        close_storage: bool = True,
        worker: bool = True,
        plugins: Iterable[object] = (),
        load_entry_points: bool = True,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(
                f"concurrency must be a positive int, got {concurrency!r}", option="concurrency"
            )
        lease_s = _positive(lease, "lease", MIN_LEASE, MAX_LEASE)
        heartbeat_s = (
            lease_s / 3
            if heartbeat is None
            else _positive(heartbeat, "heartbeat", MIN_HEARTBEAT, MAX_LEASE)
        )
        if heartbeat_s >= lease_s:
            raise ConfigError(
                f"heartbeat ({heartbeat_s:g}s) must be shorter than the lease ({lease_s:g}s), "
                "or a slow renewal lets another worker take the run",
                option="heartbeat",
            )
        if claim_batch is not None and (
            isinstance(claim_batch, bool) or not isinstance(claim_batch, int) or claim_batch < 1
        ):
            raise ConfigError(
                f"claim_batch must be a positive int, got {claim_batch!r}", option="claim_batch"
            )
        if isinstance(max_reclaims, bool) or not isinstance(max_reclaims, int) or max_reclaims < 0:
            raise ConfigError(
                f"max_reclaims must be an int >= 0, got {max_reclaims!r}", option="max_reclaims"
            )
        if max_buffered_events is not None and (
            isinstance(max_buffered_events, bool)
            or not isinstance(max_buffered_events, int)
            or max_buffered_events < 1
        ):
            raise ConfigError(
                "max_buffered_events must be a positive int or None (no limit), "
                f"got {max_buffered_events!r}",
                option="max_buffered_events",
            )
        self._storage: Storage = open_storage(storage) if isinstance(storage, str) else storage
        self._workflows: dict[str, Workflow[Any, Any]] = {}
        for wf in workflows:
            self.register(wf)
        self._concurrency = concurrency
        self._lease = timedelta(seconds=lease_s)
        self._heartbeat = heartbeat_s
        self._poll = _positive(poll_interval, "poll_interval", *POLL_INTERVAL_RANGE)
        self._claim_batch = claim_batch or concurrency
        self._max_reclaims = max_reclaims
        self._max_buffered_events = max_buffered_events
        self._drain_timeout = to_seconds(drain_timeout, option="drain_timeout")
        self._close_storage = close_storage
        self._worker = worker
        self._clock: Clock = clock or SystemClock()
        self._observers = Observers()
        for plugin in plugins:
            self._observers.register(plugin)
        self._load_entry_points = load_entry_points and not os.environ.get(DISABLE_AUTOLOAD_ENV)
        self._finished: dict[str, set[asyncio.Event]] = {}
        """The events of the ``result`` calls waiting on each run, one per call."""

        self._inflight: dict[str, _InFlight] = {}
        self._initialized = False
        self._init_lock = asyncio.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._heartbeater: asyncio.Task[None] | None = None
        self._wakeups: WakeupSubscription | None = None
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._more_work = False
        self._empty_claims = 0
        self._last_empty_claim = 0.0
        self._hint_timer: asyncio.TimerHandle | None = None
        self._scheduler = Scheduler(interval=self._poll, clock=self._clock.now)

    # -- configuration -----------------------------------------------------

    def register(self, wf: Workflow[Any, Any]) -> None:
        """Register a workflow so this engine runs it and can enqueue it by name."""
        if not isinstance(wf, Workflow):
            raise ConfigError(
                f"workflows must be built with workflow(), got {type(wf).__name__}",
                option="workflows",
            )
        if not wf.steps:
            raise ConfigError(f"workflow {wf.name!r} has no steps", option="workflows")
        existing = self._workflows.get(wf.name)
        if existing is not None and existing is not wf:
            raise ConfigError(f"two different workflows are named {wf.name!r}", option="workflows")
        self._workflows[wf.name] = wf

    @property
    def storage(self) -> Storage:
        """The storage this engine runs on."""
        return self._storage

    @property
    def running(self) -> bool:
        """True while the worker started by :meth:`start` is running."""
        return self._dispatcher is not None and not self._dispatcher.done()

    def __repr__(self) -> str:
        return (
            f"<Engine storage={type(self._storage).__name__} workflows={sorted(self._workflows)} "
            f"in_flight={len(self._inflight)}/{self._concurrency}>"
        )

    # -- lifecycle ---------------------------------------------------------

    async def _ensure_initialized(self) -> None:
        if self._initialized:
            return
        async with self._init_lock:
            if not self._initialized:
                if self._load_entry_points:
                    for name, plugin in load_observer_entry_points():
                        self._observers.register(plugin, name=name)
                    self._load_entry_points = False
                await self._storage.initialize()
                self._initialized = True

    def _ensure_background(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._concurrency + 4, thread_name_prefix="reflow-step"
            )
        if self._heartbeater is None or self._heartbeater.done():
            self._heartbeater = asyncio.create_task(self._heartbeat_loop(), name="reflow-heartbeat")

    async def start(self) -> None:
        """Initialize the storage and start working: keep up to ``concurrency``
        runs in flight, refilling a freed slot at once while work is waiting."""
        if self.running:
            return
        await self._ensure_initialized()
        self._stopping = False
        self._ensure_background()
        await self._subscribe_wakeups()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="reflow-dispatch")

    async def _subscribe_wakeups(self) -> None:
        """Let a backend that can tell when work arrives wake the dispatcher,
        so polling is only the fallback. A failure leaves polling alone."""
        if self._wakeups is not None or not isinstance(self._storage, WakeupSource):
            return
        try:
            self._wakeups = await self._storage.subscribe_wakeups(
                self._workflows.keys(), self._hinted
            )
        except ReflowError as exc:
            logger.warning("wake-ups unavailable (%s); polling every %gs", exc, self._poll)

    async def stop(self, timeout: Duration | None = None) -> None:
        """Stop claiming, let in-flight runs finish for up to ``timeout``
        (default ``drain_timeout``), then hand the rest back to the storage.

        Handed-back runs are ``pending`` again, keep their saved steps, and are
        never marked failed; any engine can pick them up.
        """
        grace = self._drain_timeout if timeout is None else to_seconds(timeout, option="timeout")
        self._stopping = True
        self._wake.set()
        wakeups, self._wakeups = self._wakeups, None
        if wakeups is not None:
            with contextlib.suppress(ReflowError):
                await wakeups.close()
        if self._hint_timer is not None:
            self._hint_timer.cancel()
            self._hint_timer = None
        self._slot_freed.set()
        if self._dispatcher is not None:
            # Let a claim in progress complete instead of cancelling it: the
            # storage may already have handed its runs over, and they must be
            # handed back below, not left leased to nobody. The loop exits at
            # its next check of _stopping; a claim that outlasts a lease is moot.
            await asyncio.wait({self._dispatcher}, timeout=self._lease.total_seconds())
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        tasks = [s.task for s in self._inflight.values() if s.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for state in list(self._inflight.values()):
            state.interrupt("shutdown")
        tasks = [s.task for s in self._inflight.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        if self._heartbeater is not None:
            self._heartbeater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeater
            self._heartbeater = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._observers.close_streams()

    async def __aenter__(self) -> Self:
        if self._worker:
            await self.start()
        else:
            await self._ensure_initialized()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            if self._close_storage:
                await self._storage.close()
                self._initialized = False

    # -- client API ----------------------------------------------------------

    def _resolve(self, wf: Workflow[Any, Any] | str) -> Workflow[Any, Any]:
        if isinstance(wf, Workflow):
            return wf
        found = self._workflows.get(wf)
        if found is None:
            raise WorkflowNotFoundError(wf, list(self._workflows))
        return found

    async def enqueue(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
    ) -> Run:
        """Create a run of ``workflow`` (an object or a registered name).

        The input is validated first: a :class:`~reflow_core.errors.ValidationError`
        or :class:`~reflow_core.errors.SerializationError` means nothing was
        written. With ``idempotency_key``, enqueueing again with an equal input
        returns the existing run; a different input raises
        :class:`~reflow_core.errors.IdempotencyConflictError`. Keys are scoped
        per workflow.
        """
        wf = self._resolve(workflow)
        if idempotency_key is not None:
            check_text(idempotency_key, "idempotency_key")
        raw = to_plain_input(input)
        wf.validate_input(raw)
        text = codec.encode(raw)
        await self._ensure_initialized()
        result = await self._storage.create_run(
            NewRun(workflow=wf.name, input=text, idempotency_key=idempotency_key)
        )
        if result.created and wf.name in self._workflows:
            self._wake.set()
        return Run.from_record(result.run)

    async def get_run(self, run_id: str) -> Run | None:
        """The run without its steps, or ``None`` if there is none."""
        await self._ensure_initialized()
        record = await self._storage.get_run(run_id)
        return None if record is None else Run.from_record(record)

    async def get_run_status(self, run_id: str) -> Run:
        """The run and its saved steps. Raises :class:`RunNotFoundError`."""
        await self._ensure_initialized()
        record = await self._storage.get_run(run_id)
        if record is None:
            raise RunNotFoundError(run_id)
        steps = await self._storage.get_step_results(run_id)
        return Run.from_record(record, steps)

    async def cancel(self, run_id: str) -> bool:
        """Cancel a run that has not finished. Returns False if it is missing or
        already finished. A step running in this engine is interrupted at
        once; a worker elsewhere stops at its next heartbeat or write."""
        await self._ensure_initialized()
        error = codec.encode({"code": "run_cancelled", "message": "cancelled", "step": None})
        changed = await self._storage.update_run_status(run_id, "cancelled", error=error)
        state = self._inflight.get(run_id)
        if changed and state is not None:
            state.interrupt("cancelled")
        if changed:
            self._notify_finished(run_id)
        return changed

    async def send_event(
        self, run_id: str, event: str, payload: Any = None, *, event_id: str | None = None
    ) -> bool:
        """Send event ``event`` to a run; it becomes the ``prev`` of the step
        after the run's ``wait_for_event(event)``.

        An event sent before the run reaches the wait is kept and consumed
        when it gets there; events still unconsumed when the run ends are
        dropped with it. Returns False if the run is missing or finished.
        Raises :class:`~reflow_core.errors.EventNotDeclaredError` if the run's
        workflow never waits for ``event``,
        :class:`~reflow_core.errors.ValidationError` if the payload fails the
        wait's schema, and :class:`~reflow_core.errors.EventBufferFullError`
        if the run already holds ``max_buffered_events`` unconsumed events
        (of any name; see :class:`Engine`); nothing is stored then. With
        ``event_id``, sending the same id again is a no-op, even to a full
        run.
        """
        await self._ensure_initialized()
        record = await self._storage.get_run(run_id)
        if record is None or record.status in TERMINAL_STATUSES:
            return False
        wf = self._resolve(record.workflow)
        wait = next(
            (n for n in wf.steps if isinstance(n, WaitDefinition) and n.name == event), None
        )
        if wait is None:
            raise EventNotDeclaredError(wf.name, event, wf.events)
        raw = to_plain_input(payload)
        wait.validate(wf.name, raw)
        delivered = await self._storage.deliver_event(
            run_id,
            event,
            codec.encode(raw),
            event_id=event_id,
            max_buffered=self._max_buffered_events,
        )
        if delivered:
            self._wake.set()
        return delivered

    async def resume(self, run_id: str) -> bool:
        """Queue a failed or cancelled run again; its completed steps are kept
        and it continues at its first unfinished step. Returns False for a
        run that is missing or not failed or cancelled."""
        await self._ensure_initialized()
        requeued = await self._storage.requeue_run(run_id)
        if requeued:
            self._wake.set()
        return requeued

    async def list_runs(
        self,
        *,
        status: RunStatus | Iterable[RunStatus] | None = None,
        workflow: Workflow[Any, Any] | str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> RunList:
        """Runs, newest first, optionally filtered by status(es) and workflow.

        Pagination is exact: pass the returned ``next_cursor`` to get the next
        page; every matching run appears exactly once.
        """
        await self._ensure_initialized()
        statuses = [status] if isinstance(status, str) else None if status is None else list(status)
        name = workflow.name if isinstance(workflow, Workflow) else workflow
        page = await self._storage.list_runs(
            status=statuses, workflow=name, limit=limit, cursor=cursor
        )
        return RunList([Run.from_record(r) for r in page.runs], page.next_cursor)

    async def schedule(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        every: Duration | None = None,
        cron: str | None = None,
        key: str | None = None,
    ) -> Schedule:
        """Run ``workflow`` with ``input`` on a recurrence: ``every`` (a
        duration; slots are whole multiples of it since the Unix epoch) or
        ``cron`` (a five-field expression, UTC), exactly one of them.

        The schedule is stored under ``key`` (default: the workflow's name),
        so it survives restarts and every engine on the storage shares it;
        engines started as workers that run the workflow fire it, once per
        slot in all. Registering a key again replaces its workflow and input
        and keeps its next slot if the recurrence is unchanged; a changed
        recurrence starts over at its first slot after now. Slots missed while
        no worker ran are skipped. See :mod:`reflow_core.schedules`.

        Raises :class:`~reflow_core.errors.ConfigError` for an invalid
        recurrence (naming the expression and why) or key, and
        :class:`~reflow_core.errors.ValidationError` or
        :class:`~reflow_core.errors.SerializationError` for invalid input;
        nothing is stored then.
        """
        wf = self._resolve(workflow)
        recurrence = parse_recurrence(every=every, cron=cron)
        key = wf.name if key is None else check_text(key, "key")
        raw = to_plain_input(input)
        wf.validate_input(raw)
        text = codec.encode(raw)
        await self._ensure_initialized()
        # Slots are computed on the storage's clock, which also decides when
        # they are due, so a skewed engine clock cannot move them.
        now = await self._scheduler.storage_now(self._storage)
        record = await self._storage.upsert_schedule(
            ScheduleSpec(
                key=key,
                workflow=wf.name,
                input=text,
                recurrence=recurrence.canonical,
                next_run_at=recurrence.next_after(now),
            )
        )
        self._scheduler.expect(key, record.next_run_at)
        self._wake.set()
        return Schedule.from_record(record)

    async def unschedule(self, key: str) -> bool:
        """Delete schedule ``key``: no slot after this fires. Runs it already
        created are not touched. Returns False if there was no such schedule."""
        await self._ensure_initialized()
        self._scheduler.forget(key)
        return await self._storage.delete_schedule(key)

    async def list_schedules(self) -> list[Schedule]:
        """Every stored schedule, of any workflow, ordered by key."""
        await self._ensure_initialized()
        return [Schedule.from_record(r) for r in await self._storage.list_schedules()]

    async def result(self, run_id: str, *, timeout: Duration | None = None) -> Any:
        """Wait for a run to finish and return its output.

        Raises :class:`~reflow_core.errors.RunFailedError` (with the stored
        failure) or :class:`~reflow_core.errors.RunCancelledError`, and
        ``TimeoutError`` after ``timeout``. A run finished by this engine
        wakes the waiter at once; one finished elsewhere is noticed by a
        read that backs off to ``poll_interval``.
        """
        seconds = None if timeout is None else to_seconds(timeout, option="timeout")
        await self._ensure_initialized()
        finished = asyncio.Event()
        self._finished.setdefault(run_id, set()).add(finished)
        pause = 0.01
        try:
            async with asyncio.timeout(seconds):
                while True:
                    finished.clear()  # before the read, so a finish during it is seen
                    record = await self._storage.get_run(run_id)
                    if record is None:
                        raise RunNotFoundError(run_id)
                    if record.status == "completed":
                        return None if record.output is None else codec.decode(record.output)
                    if record.status == "failed":
                        info: ErrorInfo = codec.decode(record.error) if record.error else {}
                        raise RunFailedError(run_id, info)
                    if record.status == "cancelled":
                        raise RunCancelledError(run_id)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await finished.wait()
                    pause = min(pause * 2, self._poll)
        finally:
            waiters = self._finished.get(run_id)
            if waiters is not None:
                waiters.discard(finished)
                if not waiters:
                    del self._finished[run_id]

    def stream(self, *, buffer_size: int | None = 1000) -> AsyncIterator[Event]:
        """An async iterator of this engine's lifecycle events.

        It is subscribed from this call on, read or not. With a bounded
        ``buffer_size`` a slow consumer slows the engine down (backpressure)
        instead of losing events; ``None`` means unbounded. The iterator ends
        after :meth:`stop`, and unsubscribes when the consumer leaves the loop
        or drops it.
        """
        return self._observers.stream(buffer_size)

    def register_plugin(self, plugin: object, *, name: str | None = None) -> None:
        """Register an observer plugin (see :mod:`reflow_core.hookspecs`)."""
        self._observers.register(plugin, name=name)

    async def _emit(self, event: Event) -> None:
        if self._observers.active:
            await self._observers.publish(event)

    async def _report(self, error: BaseException, where: str) -> None:
        await self._observers.report(error, where)

    def _notify_finished(self, run_id: str) -> None:
        for waiter in self._finished.get(run_id, ()):
            waiter.set()

    # -- worker ------------------------------------------------------------

    async def tick(self) -> int:
        """Fire the due schedules of this engine's workflows, claim one batch
        (up to the free slots), run it to the end, and return how many runs
        were processed. For tests and scripts; it does not need :meth:`start`."""
        await self._ensure_initialized()
        self._ensure_background()
        await self._fire_schedules(force=True)
        claimed = await self._claim()
        tasks = [self._spawn(c) for c in claimed]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(claimed)

    async def _claim(self) -> list[ClaimedRun]:
        free = self._concurrency - len(self._inflight)
        if free <= 0 or not self._workflows:
            return []
        limit = min(free, self._claim_batch)
        claimed = await self._storage.claim_runs(list(self._workflows), limit, self._lease)
        self._more_work = len(claimed) == limit
        return claimed

    async def _fire_schedules(self, *, force: bool = False) -> None:
        """Fire due schedules of this engine's workflows: at most once per poll
        interval, or sooner when a slot known here falls due, unless ``force``.
        A look reads the storage's clock, by which slots are computed.
        Storage trouble is logged and retried at a later look."""
        if not self._workflows:
            return
        if not force and not self._scheduler.should_check(self._clock.now()):
            return
        try:
            fired = await self._scheduler.fire_due(self._storage, self._workflows, _SCHEDULE_BATCH)
        except ReflowError as exc:
            logger.warning("firing schedules failed (%s); retrying at the next poll", exc)
            return
        if fired:
            self._wake.set()

    def _spawn(self, claimed: ClaimedRun) -> asyncio.Task[None]:
        state = _InFlight(lease=claimed.lease, renewed_at=time.monotonic())
        self._inflight[claimed.run.id] = state
        task = asyncio.create_task(
            self._run_claimed(claimed, state), name=f"reflow-run-{claimed.run.id}"
        )
        state.task = task
        return task

    async def _dispatch_loop(self) -> None:
        failures = 0
        while not self._stopping:
            await self._fire_schedules()
            if len(self._inflight) >= self._concurrency:
                # Wake up for due schedules even while every slot is busy.
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._schedule_wait(self._poll)):
                        await self._slot_freed.wait()
                continue
            self._wake.clear()
            try:
                claimed = await self._claim()
                failures = 0
            except ReflowError as exc:
                failures += 1
                delay = min(self._poll * 2 ** min(failures, 6), 30.0)
                logger.warning("claim failed (%s); retrying in %.1fs", exc, delay)
                await self._idle(delay)
                continue
            if claimed:
                # Halve rather than reset: a worker that wins now and then in
                # a contested burst keeps some of its gap.
                self._empty_claims //= 2
            else:
                # Bounded: past the longest gap, more empty claims change nothing.
                self._empty_claims = min(self._empty_claims + 1, len(_HINT_GAPS))
                self._last_empty_claim = time.monotonic()
            for c in claimed:
                self._spawn(c)
            if not self._more_work:
                # The queue looked empty: wait for local work, the next poll
                # or the next schedule slot known here.
                await self._idle(self._schedule_wait(self._poll * random.uniform(0.9, 1.1)))

    def _hinted(self, *_: object) -> None:
        """A wake-up hint from the storage: work may be ready elsewhere.

        Acted on at once, unless this worker's last claims found nothing
        (other workers are taking the work): then no sooner than a short,
        growing gap after the last empty claim. Local work (this engine's
        own enqueues, freed slots) never waits for the gap."""
        if self._wake.is_set() or self._hint_timer is not None:
            return
        if self._empty_claims:
            gap = _HINT_GAPS[min(self._empty_claims, len(_HINT_GAPS)) - 1]
            delay = self._last_empty_claim + gap - time.monotonic()
            if delay > 0:
                self._hint_timer = asyncio.get_running_loop().call_later(delay, self._hint_due)
                return
        self._wake.set()

    def _hint_due(self) -> None:
        self._hint_timer = None
        self._wake.set()

    def _schedule_wait(self, seconds: float) -> float:
        # The scheduler corrects the engine's clock by the storage's offset.
        return self._scheduler.wait(self._clock.now(), seconds)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _heartbeat_loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [s for s in self._inflight.values() if now - s.renewed_at >= self._heartbeat]
            if due:
                await asyncio.gather(*(self._renew(s) for s in due))
            pending = [s.renewed_at + self._heartbeat for s in self._inflight.values()]
            wait = min(pending, default=now + self._heartbeat) - time.monotonic()
            await asyncio.sleep(min(max(wait, 0.01), self._heartbeat))

    async def _renew(self, state: _InFlight) -> None:
        started = time.monotonic()
        try:
            ok = await self._storage.heartbeat_run(state.lease, self._lease)
        except ReflowError as exc:
            logger.warning("heartbeat for run %s failed: %s", state.lease.run_id, exc)
            return
        if ok:
            state.renewed_at = max(state.renewed_at, started)
        elif state.stop_reason is None and state.task is not None and not state.task.done():
            logger.warning(
                "lease on run %s was lost; stopping its step and writing nothing more",
                state.lease.run_id,
            )
            state.interrupt("lease_lost")

    # -- running one run ---------------------------------------------------

    async def _run_claimed(self, claimed: ClaimedRun, state: _InFlight) -> None:
        run_id = claimed.run.id
        state.started = True
        try:
            if state.stop_reason is not None:  # interrupted before it started
                raise asyncio.CancelledError
            await self._drive(claimed, state)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if state.stop_reason is None or task is None:
                raise
            task.uncancel()
            if state.stop_reason == "shutdown":
                with contextlib.suppress(ReflowError):
                    await self._storage.update_run_status(run_id, "pending", lease=state.lease)
        except _LeaseLost:
            logger.warning("lease on run %s was lost; another worker may own it", run_id)
        except ReflowError as exc:
            # Storage trouble mid-run: the lease will lapse and the run is reclaimed.
            logger.error("run %s stopped: %s", run_id, exc)
        except Exception:  # an engine bug; never let it kill the worker
            logger.exception("run %s stopped by an unexpected error", run_id)
        finally:
            self._inflight.pop(run_id, None)
            if self._more_work:
                self._wake.set()
            self._slot_freed.set()

    def _fence(self, ok: bool) -> None:
        if not ok:
            raise _LeaseLost

    async def _fenced(self, write: Callable[[], Awaitable[bool]], run_id: str) -> None:
        """Make a fenced write, retrying transient storage errors, and stop the
        run if the lease is lost.

        Retrying is safe: every fenced write is an idempotent upsert, and one
        that landed before its reply was lost is refused the second time
        (the run is no longer running under this lease), which only stops a
        run that has already moved on. Giving up leaves the run to be
        reclaimed once its lease lapses.
        """
        for attempt, pause in enumerate((*_WRITE_RETRY_PAUSES, None)):
            try:
                ok = await write()
            except StorageError as exc:
                if pause is None:
                    raise
                logger.warning(
                    "write for run %s failed (%s); retry %d in %.2fs",
                    run_id,
                    exc,
                    attempt + 1,
                    pause,
                )
                await asyncio.sleep(pause)
                continue
            self._fence(ok)
            return

    async def _fail(
        self,
        run: _Execution,
        exc: BaseException,
        *,
        step: str | None,
        attempts: int = 1,
    ) -> None:
        info = error_info(exc, step=step, attempts=attempts)
        text = codec.encode(dict(info))
        record = None if step is None else StepRecord(step, "failed", error=text, attempts=attempts)
        lease = run.lease
        await self._fenced(
            partial(self._storage.finish_run, lease, "failed", error=text, step=record),
            lease.run_id,
        )
        await self._emit(RunFailed(run.record.id, run.record.workflow, info, step))
        self._notify_finished(run.record.id)
        await self._call_failure_handler(run, info, step, exc)

    async def _call_failure_handler(
        self, run: _Execution, info: ErrorInfo, step: str | None, exc: BaseException
    ) -> None:
        handler = run.workflow.failure_handler
        if handler is None:
            return
        ctx = FailureContext(
            run_id=run.record.id,
            workflow=run.record.workflow,
            step=step,
            error=info,
            input=run.input,
            exception=exc,
        )
        try:
            if _is_async_callable(handler):
                result = handler(ctx)
            else:
                # In a worker thread, as a plain def step is: a slow handler
                # must not stall the event loop and every run's heartbeat.
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, handler, ctx)
            if inspect.isawaitable(result):
                await result
        except Exception as error:
            await self._report(error, f"on_failure handler of workflow {run.record.workflow!r}")

    async def _complete(self, run: _Execution, output: str, step: StepRecord | None) -> None:
        await self._fenced(
            partial(self._storage.finish_run, run.lease, "completed", output=output, step=step),
            run.record.id,
        )
        await self._emit(RunCompleted(run.record.id, run.record.workflow, codec.decode(output)))
        self._notify_finished(run.record.id)

    async def _save(self, run: _Execution, record: StepRecord) -> None:
        started = time.monotonic()
        await self._fenced(
            partial(self._storage.save_step_result, run.lease, record, self._lease),
            run.record.id,
        )
        run.state.renewed_at = max(run.state.renewed_at, started)

    async def _drive(self, claimed: ClaimedRun, state: _InFlight) -> None:
        record = claimed.run
        wf = self._workflows.get(record.workflow)
        if wf is None:  # claimed only for our workflows; be safe anyway
            await self._storage.update_run_status(record.id, "pending", lease=claimed.lease)
            return
        run = _Execution(record, claimed.lease, state, wf, dict(claimed.steps))
        # The reclaim limit comes first: whatever about this run kills its
        # workers (its input included) cannot stop it from being given up.
        if claimed.reclaimed and record.reclaims > self._max_reclaims:
            error = ReclaimLimitError(record.id, record.reclaims, self._max_reclaims)
            with contextlib.suppress(CorruptDataError):  # for the failure handler
                run.input = _read_stored(record.input, "input", record.id)
            await self._fail(run, error, step=None)
            return
        try:
            run.input = _read_stored(record.input, "input", record.id)
            run.input = run.prev = wf.validate_input(run.input)
        except (ValidationError, CorruptDataError) as exc:
            await self._fail(run, exc, step=None)
            return
        if record.attempts == 1:
            await self._emit(RunStarted(record.id, record.workflow, record.attempts, False))
        else:
            await self._emit(
                RunStarted(record.id, record.workflow, record.attempts, claimed.reclaimed)
            )
        last = len(wf.steps) - 1
        for index, node in enumerate(wf.steps):
            run.last = index == last
            try:
                if isinstance(node, StepDefinition):
                    done = await self._drive_step(run, node)
                elif isinstance(node, SleepDefinition):
                    done = await self._drive_sleep(run, node)
                elif isinstance(node, WaitDefinition):
                    done = await self._drive_wait(run, node)
                else:
                    done = await self._drive_parallel(run, node)
            except CorruptDataError as exc:
                # A saved output or payload cannot be read. No step is named,
                # so its stored record is kept as evidence, not overwritten;
                # the error says which value it was.
                await self._fail(run, exc, step=None)
                return
            if done:
                return
        # Every node was already saved (a trailing one was removed from the
        # definition since): finish with the last output.
        await self._complete(run, codec.encode(run.prev), None)

    def _passed_at_claim(self, run: _Execution, deadline: datetime | None) -> bool:
        """Whether ``deadline`` had passed, by the storage's clock, when the
        run was claimed (the claim made the lease end at claim time + lease)."""
        expires = run.record.lease_expires_at
        if deadline is None or expires is None:
            return True
        return deadline <= expires - self._lease

    async def _pass_through(self, run: _Execution, record: StepRecord) -> bool:
        """Save a step that leaves ``prev`` unchanged; finish if it was the last."""
        if run.last:
            await self._complete(run, codec.encode(run.prev), record)
            return True
        await self._save(run, record)
        run.saved[record.name] = record
        return False

    async def _drive_step(self, run: _Execution, step: StepDefinition) -> bool:
        saved = run.saved.get(step.name)
        if saved is not None and saved.status == "completed":
            run.advance(
                step.name,
                _read_stored(saved.output, f"output of step {step.name!r}", run.record.id),
            )
            return False
        if saved is not None and saved.status == "skipped":
            return False
        if step.when is not None:
            try:
                go = bool(step.when(run.context(step.name, 1, CancelSignal())))
            except Exception as exc:
                await self._fail(
                    run,
                    StepError(
                        f"the when= predicate of step {step.name!r} raised "
                        f"{type(exc).__name__}: {exc}",
                        step=step.name,
                    ),
                    step=step.name,
                )
                return True
            if not go:
                await self._emit(StepSkipped(run.record.id, run.record.workflow, step.name))
                return await self._pass_through(run, StepRecord(step.name, "skipped"))
        try:
            result, attempts = await self._run_step(run, step)
            text = codec.encode(result)
        except CompleteRun as signal:
            try:
                text = codec.encode(signal.value)
            except SerializationError as exc:
                await self._fail(run, exc, step=step.name)
                return True
            record = StepRecord(step.name, "completed", output=text, attempts=signal.attempts)
            await self._emit(
                StepCompleted(
                    run.record.id, run.record.workflow, step.name, signal.value, signal.attempts
                )
            )
            await self._complete(run, text, record)
            return True
        except StepError as exc:
            await self._fail(run, exc, step=step.name, attempts=exc.attempts)
            return True
        except SerializationError as exc:
            await self._fail(run, exc, step=step.name)
            return True
        record = StepRecord(step.name, "completed", output=text, attempts=attempts)
        value = codec.decode(text)
        await self._emit(
            StepCompleted(run.record.id, run.record.workflow, step.name, value, attempts)
        )
        if run.last:
            await self._complete(run, text, record)
            return True
        await self._save(run, record)
        run.advance(step.name, value)
        return False

    async def _drive_sleep(self, run: _Execution, sleep: SleepDefinition) -> bool:
        saved = run.saved.get(sleep.name)
        if saved is not None and saved.status == "completed":
            return False
        if (
            saved is not None
            and saved.status == "sleeping"
            and self._passed_at_claim(run, saved.wake_at)
        ):
            await self._emit(StepCompleted(run.record.id, run.record.workflow, sleep.name, None, 1))
            return await self._pass_through(run, StepRecord(sleep.name, "completed"))
        # First reached, or claimed before the wake-up time (a resumed run):
        # sleep_run keeps a wake-up time fixed earlier.
        wake_at = await self._storage.sleep_run(
            run.lease, sleep.name, timedelta(seconds=sleep.seconds)
        )
        self._fence(wake_at is not None)
        return True  # released; any engine resumes it once due

    async def _drive_wait(self, run: _Execution, wait: WaitDefinition) -> bool:
        saved = run.saved.get(wait.name)
        if saved is None or saved.status != "completed":
            taken = None
            if saved is None or saved.status != "waiting":
                timeout = None if wait.timeout is None else timedelta(seconds=wait.timeout)
                result = await self._storage.wait_run(run.lease, wait.name, wait.name, timeout)
                self._fence(result is not None)
                assert result is not None
                if not result.ready:
                    return True  # released until the event or the timeout
            taken = await self._storage.take_event(run.lease, wait.name, wait.name)
            self._fence(taken is not None)
            assert taken is not None
            if not taken.found:
                deadline = saved.wake_at if saved is not None else None
                if deadline is None or not self._passed_at_claim(run, deadline):
                    # Woken without an event before any deadline (a resumed
                    # run): wait again; wait_run keeps the deadline.
                    result = await self._storage.wait_run(run.lease, wait.name, wait.name, None)
                    self._fence(result is not None)
                    assert result is not None
                    if result.ready:  # an event came in meanwhile: take it now
                        return await self._drive_wait(run, wait)
                    return True
                await self._fail(
                    run, WaitTimeoutError(wait.name, run_id=run.record.id), step=wait.name
                )
                return True
            payload_text = taken.payload
        else:
            payload_text = saved.output
        raw = _read_stored(payload_text, f"payload of event {wait.name!r}", run.record.id)
        try:
            value = wait.validate(run.record.workflow, raw)
        except ValidationError as exc:
            await self._fail(run, exc, step=wait.name)
            return True
        if saved is None or saved.status != "completed":
            await self._emit(StepCompleted(run.record.id, run.record.workflow, wait.name, raw, 1))
        run.advance(wait.name, value)
        if run.last:
            await self._complete(run, codec.encode(raw), None)
            return True
        return False

    async def _drive_parallel(self, run: _Execution, group: ParallelDefinition) -> bool:
        outputs: dict[str, Any] = {}
        todo: list[StepDefinition] = []
        for branch in group.branches:
            saved = run.saved.get(branch.name)
            if saved is not None and saved.status == "completed":
                outputs[branch.name] = _read_stored(
                    saved.output, f"output of step {branch.name!r}", run.record.id
                )
            else:
                todo.append(branch)
        tasks = {
            asyncio.create_task(
                self._run_branch(run, branch), name=f"reflow-branch-{branch.name}"
            ): branch
            for branch in todo
        }
        failure: tuple[StepDefinition, BaseException] | None = None
        try:
            pending = set(tasks)
            while pending and failure is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    branch = tasks[task]
                    exc = task.exception()
                    if exc is None:
                        outputs[branch.name] = task.result()
                    elif failure is None:
                        failure = (branch, exc)
        finally:
            unfinished = [task for task in tasks if not task.done()]
            if unfinished:
                # Fire the siblings' signals first, so an async handler that
                # catches CancelledError sees why, as a sync one does.
                for signal in list(run.state.signals):
                    signal._fire("cancelled")
            for task in unfinished:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        if failure is not None:
            branch, exc = failure
            if isinstance(exc, _LeaseLost | asyncio.CancelledError | StorageError):
                raise exc  # as for a plain step: the run is reclaimed, not failed
            if isinstance(exc, StepError):
                await self._fail(run, exc, step=branch.name, attempts=exc.attempts)
            elif isinstance(exc, ReflowError):
                await self._fail(run, exc, step=branch.name)
            else:
                raise exc
            return True
        value = {b.name: outputs[b.name] for b in group.branches}
        for name, output in value.items():
            run.outputs[name] = output
        run.prev = value
        if run.last:
            await self._complete(run, codec.encode(value), None)
            return True
        return False

    async def _run_branch(self, run: _Execution, branch: StepDefinition) -> Any:
        try:
            result, attempts = await self._run_step(run, branch, in_parallel=True)
        except CompleteRun:  # complete() in a branch raises before this; be safe
            raise ParallelCompleteError(branch.name) from None
        text = codec.encode(result)
        record = StepRecord(branch.name, "completed", output=text, attempts=attempts)
        await self._save(run, record)
        value = codec.decode(text)
        await self._emit(
            StepCompleted(run.record.id, run.record.workflow, branch.name, value, attempts)
        )
        return value

    async def _run_step(
        self, run: _Execution, step: StepDefinition, *, in_parallel: bool = False
    ) -> tuple[Any, int]:
        attempt = 0
        state = run.state
        while True:
            attempt += 1
            signal = CancelSignal()
            state.signals.add(signal)
            if state.stop_reason is not None:
                signal._fire(state.stop_reason)
            ctx = run.context(step.name, attempt, signal, in_parallel=in_parallel)
            await self._emit(StepStarted(run.record.id, run.record.workflow, step.name, attempt))
            try:
                return await self._invoke(step, ctx, signal), attempt
            except CompleteRun as done:
                done.attempts = attempt
                raise
            except (asyncio.CancelledError, ParallelCompleteError):
                raise
            except StepCancelledError:
                if state.stop_reason is not None:
                    raise asyncio.CancelledError from None
                error: BaseException = StepError(
                    f"step {step.name!r} raised StepCancelledError outside a cancellation",
                    step=step.name,
                    attempts=attempt,
                )
            except StepTimeoutError as exc:
                error = exc
            except Exception as exc:  # user code failed
                error = exc
            finally:
                state.signals.discard(signal)
            if attempt >= step.retry.max_attempts:
                if isinstance(error, StepTimeoutError):
                    error.attempts = attempt
                    raise error
                if isinstance(error, StepError):
                    raise error
                raise StepError(
                    f"step {step.name!r} failed after {attempt} attempt(s): "
                    f"{type(error).__name__}: {error}",
                    step=step.name,
                    attempts=attempt,
                    run_id=run.record.id,
                    error_type=type(error).__qualname__,
                ) from error
            await self._clock.sleep(step.retry.delay(attempt))

    async def _invoke(
        self, step: StepDefinition, ctx: StepContext[Any, Any], signal: CancelSignal
    ) -> Any:
        timeout = step.timeout
        if step.is_async:
            if timeout is None:
                return await step.handler(ctx)
            try:
                async with asyncio.timeout(timeout):
                    return await step.handler(ctx)
            except TimeoutError:
                signal._fire("timeout")
                raise StepTimeoutError(step.name, timeout or 0.0) from None
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        future = loop.run_in_executor(self._executor, step.handler, ctx)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            signal._fire("timeout")
            raise StepTimeoutError(step.name, timeout or 0.0) from None
        except asyncio.CancelledError:
            signal._fire("cancelled")
            raise
        if signal.cancelled:
            raise StepCancelledError(signal.reason or "cancelled")
        # inspect's check, not asyncio's: asyncio counts plain generators as
        # coroutines, and a generator returned by a step is a (refused) value.
        if inspect.iscoroutine(result):
            async with asyncio.timeout(timeout):
                return await result
        return result


class _ReadOnly(Mapping[str, Any]):
    """A read-only live view of the completed steps' outputs."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"StepOutputs({self._data!r})"
