"""The engine facade: configuration, lifecycle and the client API.

One :class:`Engine` is a worker (it claims and runs workflows) and a client
(it enqueues, inspects and cancels runs). Any number of engines may share one
storage, in one process or many; the storage's leases decide who runs what.
The claim loop lives in :class:`~reflow_core.engine.worker.Worker`, the
driving of one run in :class:`~reflow_core.engine.driver.RunDriver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import Any, Literal, NoReturn, Self, overload

from reflow_core import codec
from reflow_core._durations import MAX_DURATION, Duration, to_seconds
from reflow_core.adapter import check_text
from reflow_core.errors import (
    ConfigError,
    EngineClosedError,
    ErrorInfo,
    EventNotDeclaredError,
    IdempotencyConflictError,
    ReflowError,
    ResultTimeoutError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    WorkflowNotFoundError,
)
from reflow_core.events import ErrorCallback, Event, Observers, RunCancelled
from reflow_core.limits import check_priority
from reflow_core.registry import DISABLE_AUTOLOAD_ENV, load_observer_entry_points, open_storage
from reflow_core.schedules import Schedule, Scheduler, parse_recurrence, set_paused
from reflow_core.storage import (
    MAX_CREATE_BATCH,
    TERMINAL_STATUSES,
    CreateResult,
    NewRun,
    QueueStats,
    RunRecord,
    RunStatus,
    ScheduleSpec,
    Storage,
    WorkerRecord,
)
from reflow_core.versions import release_held
from reflow_core.workflow import WaitDefinition, Workflow, to_plain_input

from .driver import RunDriver
from .enqueue import BatchBuilder, Timing
from .views import Clock, Run, RunList, SystemClock, WaitedRuns
from .watch import ReturnWhen, RunWatcher, check_wait_args, wait_records
from .worker import Worker

__all__ = ["MAX_LEASE", "MIN_HEARTBEAT", "MIN_LEASE", "POLL_INTERVAL_RANGE", "Engine"]

logger = logging.getLogger("reflow.engine")


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
MAX_DURATION_S = MAX_DURATION.total_seconds()
POLL_INTERVAL_RANGE = (0.001, 86400.0)
"""The shortest and longest ``poll_interval`` (seconds)."""
_FINAL_READ_TIMEOUT = 1.0
"""Seconds :meth:`Engine.result` gives the one read of the run that explains a timeout."""


def _outcome(record: RunRecord) -> Any:
    """The output of a finished run, or the error that says how it ended."""
    if record.status == "failed":
        info: ErrorInfo = codec.decode(record.error) if record.error else {}
        raise RunFailedError(record.id, info)
    if record.status == "cancelled":
        raise RunCancelledError(record.id)
    return None if record.output is None else codec.decode(record.output)


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

    ``on_error`` is called with a :class:`~reflow_core.errors.HookError` for
    every failure that must not affect a run: an observer plugin's hook that
    raised, a stream whose consumer ended without closing it, an
    ``on_failure`` handler that raised. It may be ``async``; what it raises
    is only logged. The ``reflow_error`` hook of plugins sees the same.

    ``retention`` (a duration, default ``None``: keep everything) makes a
    worker delete runs that finished longer ago than that, with their steps
    and events, through :meth:`Storage.purge_finished`: a pass about once a
    minute (sooner for a short retention), each deleting at most
    a bounded number of runs, so a large backlog is cleared over several
    passes without holding the storage. Idempotency keys of deleted runs are
    free again: keep runs longer than any client may retry an enqueue.

    ``warn_unserved_after`` (a duration, default five minutes; ``None``
    turns it off): a running worker logs a warning, once per workflow name,
    when it sees ``pending`` runs of a workflow it does not serve that have
    waited longer than this (a workflow registered on no running worker, or a
    mistyped name). It looks about once a minute (sooner for a short
    threshold) at the newest pending runs, with one storage read; claiming
    is never slowed by it.

    Leave the ``async with`` block (or call :meth:`close`) when done: every
    call on a closed engine raises
    :class:`~reflow_core.errors.EngineClosedError`, on every backend. An
    engine used without ``async with`` opens its storage at its first call;
    close it with :meth:`close`, or a warning is logged when it is collected.
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
        on_error: ErrorCallback | None = None,
        retention: Duration | None = None,
        warn_unserved_after: Duration | None = "5m",
    ) -> None:
        self._opened_storage = isinstance(storage, str)
        self._initialized_by: str | None = None
        self._batches = True
        """Whether the storage creates batches (``create_runs``); see :meth:`_create_runs`."""
        self._closed = False
        self._started = False
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
        """The current (highest) version of each registered workflow."""
        self._versions: dict[str, dict[int, Workflow[Any, Any]]] = {}
        """Every registered definition, by workflow and version."""
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
        self._start_worker = worker
        self._clock: Clock = clock or SystemClock()
        if on_error is not None and not callable(on_error):
            raise ConfigError(f"on_error must be callable, got {on_error!r}", option="on_error")
        self._observers = Observers(on_error)
        self._retention = (
            None
            if retention is None
            else timedelta(seconds=_positive(retention, "retention", MIN_LEASE, MAX_DURATION_S))
        )
        unserved_after = (
            None
            if warn_unserved_after is None
            else _positive(warn_unserved_after, "warn_unserved_after", MIN_LEASE, MAX_DURATION_S)
        )
        for plugin in plugins:
            self._observers.register(plugin)
        self._load_entry_points = load_entry_points and not os.environ.get(DISABLE_AUTOLOAD_ENV)
        self._default_schedules: dict[str, tuple[str, str]] = {}
        """Input and recurrence of the schedules this engine stored under a
        default key, so that two different ones do not replace each other."""
        self._watcher = RunWatcher(self._storage, self._poll, self._runs_here)
        """The events of the ``result`` calls waiting on each run, one per call."""

        self._initialized = False
        self._init_lock = asyncio.Lock()
        self._scheduler = Scheduler(interval=self._poll, clock=self._clock.now)
        self._driver = RunDriver(
            storage=self._storage,
            workflows=self._workflows,
            versions=self._versions,
            lease=self._lease,
            max_reclaims=max_reclaims,
            clock=self._clock,
            observers=self._observers,
            notify_finished=self._notify_finished,
        )
        self._worker = Worker(
            storage=self._storage,
            workflows=self._workflows,
            versions=self._versions,
            driver=self._driver,
            concurrency=concurrency,
            claim_batch=self._claim_batch,
            lease=self._lease,
            heartbeat=heartbeat_s,
            poll=self._poll,
            clock=self._clock,
            scheduler=self._scheduler,
            retention=self._retention,
            unserved_after=unserved_after,
        )
        self._driver.wake_worker = self._worker.wake.set

    # -- configuration -----------------------------------------------------

    def register(self, wf: Workflow[Any, Any]) -> None:
        """Register a workflow so this engine runs it and can enqueue it by name.

        Several versions of one workflow (``workflow(..., version=N)``) may
        be registered: the highest is the one enqueued by name, and each
        run goes on with the definition of its own version. Registering a
        different definition under a name and version already taken raises
        :class:`~reflow_core.errors.ConfigError`."""
        if not isinstance(wf, Workflow):
            raise ConfigError(
                f"workflows must be built with workflow(), got {type(wf).__name__}",
                option="workflows",
            )
        if not wf.steps:
            raise ConfigError(f"workflow {wf.name!r} has no steps", option="workflows")
        versions = self._versions.setdefault(wf.name, {})
        existing = versions.get(wf.version)
        if existing is not None and existing is not wf:
            raise ConfigError(
                f"two different workflows are named {wf.name!r} with version {wf.version}; "
                "give the changed one its own version=",
                option="workflows",
            )
        versions[wf.version] = wf
        current = self._workflows.get(wf.name)
        if current is None or wf.version > current.version:
            self._workflows[wf.name] = wf

    @property
    def storage(self) -> Storage:
        """The storage this engine runs on."""
        return self._storage

    @property
    def running(self) -> bool:
        """True while the worker started by :meth:`start` is running."""
        return self._worker.running

    @property
    def workflow_names(self) -> list[str]:
        """The names of the workflows registered on this engine, sorted."""
        return sorted(self._workflows)

    @property
    def concurrency(self) -> int:
        """How many runs this engine's worker keeps in flight at most."""
        return self._concurrency

    @property
    def in_flight(self) -> int:
        """How many runs this engine's worker is executing now."""
        return len(self._worker.inflight)

    @property
    def worker_id(self) -> str:
        """The id under which this engine's worker appears in the storage's
        worker registry (:meth:`list_workers`, ``reflow workers ls``) while it runs."""
        return self._worker.presence.worker_id

    @property
    def drain_timeout(self) -> float:
        """Seconds :meth:`stop` lets runs in flight finish before handing them back."""
        return self._drain_timeout

    def configure_worker(
        self, *, concurrency: int | None = None, workflows: Collection[str] | None = None
    ) -> None:
        """Before the worker starts, change what it does: keep up to
        ``concurrency`` runs in flight (the claim batch follows it, unless it
        was set), and claim runs of ``workflows`` only, a subset of the
        registered ones (the engine still knows the others: it can enqueue,
        resume and schedule them). For process managers such as
        ``reflow worker``; a ``ConfigError`` names a bad value."""
        if self.running:
            raise ConfigError(
                "configure_worker() must be called before the worker starts", option="workflows"
            )
        served: dict[str, Workflow[Any, Any]] | None = None
        if workflows is not None:
            names = list(dict.fromkeys(workflows))
            unknown = [name for name in names if name not in self._workflows]
            if unknown or not names:
                has = ", ".join(sorted(self._workflows)) or "none"
                what = f"unknown workflow {unknown[0]!r}" if unknown else "no workflow named"
                raise ConfigError(f"{what}; this engine has: {has}", option="workflows")
            served = {name: self._workflows[name] for name in names}
        if concurrency is not None:
            if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
                raise ConfigError(
                    f"concurrency must be a positive int, got {concurrency!r}",
                    option="concurrency",
                )
            if self._claim_batch == self._concurrency:  # the default: one batch fills every slot
                self._claim_batch = concurrency
            self._concurrency = concurrency
        self._worker.configure(
            concurrency=self._concurrency, claim_batch=self._claim_batch, workflows=served
        )

    def __repr__(self) -> str:
        return (
            f"<Engine storage={type(self._storage).__name__} workflows={sorted(self._workflows)} "
            f"in_flight={len(self._worker.inflight)}/{self._concurrency}>"
        )

    # -- lifecycle ---------------------------------------------------------

    async def _ensure_initialized(self, operation: str) -> None:
        if self._closed:
            raise EngineClosedError(operation)
        if self._initialized:
            return
        async with self._init_lock:
            if self._closed:
                raise EngineClosedError(operation)
            if not self._initialized:
                if self._load_entry_points:
                    for name, plugin in load_observer_entry_points():
                        self._observers.register(plugin, name=name)
                    self._load_entry_points = False
                await self._storage.initialize()
                self._initialized = True
                self._initialized_by = operation

    async def start(self) -> None:
        """Initialize the storage and start working: keep up to ``concurrency``
        runs in flight, refilling a freed slot at once while work is waiting."""
        if self.running:
            return
        await self._ensure_initialized("start")
        await self._worker.start()
        self._started = True
        self._observers.scopes.worker_started(self)

    async def stop(self, timeout: Duration | None = None) -> None:
        """Stop claiming, let in-flight runs finish for up to ``timeout``
        (default ``drain_timeout``), then hand the rest back to the storage.

        Handed-back runs are ``pending`` again, keep their saved steps, and are
        never marked failed; any engine can pick them up.
        """
        grace = self._drain_timeout if timeout is None else to_seconds(timeout, option="timeout")
        if self.running:
            self._observers.scopes.worker_stopping(self)
        await self._worker.stop(grace)
        self._observers.close_streams()

    async def close(self) -> None:
        """Stop (as :meth:`stop`) and close the storage, unless the engine
        was made with ``close_storage=False``. Leaving ``async with`` does
        this; call it when done with an engine used without ``async with``.
        Idempotent. Once the storage is closed, every call on the engine
        raises :class:`~reflow_core.errors.EngineClosedError`."""
        try:
            await self.stop()
        finally:
            await self._watcher.close()
            if self._close_storage:
                self._closed = True
                await self._storage.close()
                self._initialized = False

    async def __aenter__(self) -> Self:
        if self._closed:
            raise EngineClosedError("__aenter__")
        if self._start_worker:
            await self.start()
        else:
            await self._ensure_initialized("__aenter__")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __enter__(self) -> NoReturn:
        raise TypeError(
            "Engine is an async context manager: use `async with Engine(...) as engine:` "
            "inside a coroutine, not `with`"
        )

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ always raises
        return None

    def __del__(self) -> None:
        # An engine that opened its storage from a URL and was never closed
        # leaves the storage's connections (and threads) open: say how to
        # close it. Guarded: this may run at interpreter exit.
        with contextlib.suppress(Exception):
            if (
                getattr(self, "_initialized", False)
                and getattr(self, "_opened_storage", False)
                and getattr(self, "_close_storage", False)
                and not getattr(self, "_closed", True)
            ):
                logger.warning(
                    "an Engine on %s opened its storage for %s() and was never closed; "
                    "its connections stay open until the process exits: use "
                    "`async with Engine(...) as engine:`, or `await engine.close()` when done",
                    type(self._storage).__name__,
                    self._initialized_by or "a call",
                )

    # -- client API ----------------------------------------------------------

    def definition_for(self, record: RunRecord) -> Workflow[Any, Any] | None:
        """The registered definition this engine's worker runs ``record``
        with: its own version's, or else the current one of its workflow
        unless that one says ``on_incompatible="old_version"`` or is older
        than the run. ``None`` when it would not take the run (what
        ``reflow deploy-check`` reports for each run in flight)."""
        return self._driver.definition(record)

    @property
    def workflows(self) -> Mapping[str, Workflow[Any, Any]]:
        """The current (highest) registered version of each workflow, by name."""
        return MappingProxyType(self._workflows)

    def _definition(self, record: RunRecord) -> Workflow[Any, Any]:
        """The registered definition of ``record``'s own version, or the
        current one of its workflow."""
        return self._driver.definition(record) or self._resolve(record.workflow)

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
        delay: Duration | None = None,
        run_at: datetime | None = None,
        deadline: Duration | datetime | None = None,
        priority: int | None = None,
        debounce_key: str | None = None,
        debounce: Duration | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Run:
        """Create a run of ``workflow`` (an object or a registered name).

        The input is validated first: a :class:`~reflow_core.errors.ValidationError`
        or :class:`~reflow_core.errors.SerializationError` means nothing was
        written. With ``idempotency_key``, enqueueing again with an equal input
        returns the existing run; a different input raises
        :class:`~reflow_core.errors.IdempotencyConflictError`. Keys are scoped
        per workflow.

        ``delay`` (a duration) or ``run_at`` (an aware datetime), not both,
        start the run later: it is stored as ``delayed`` and no worker claims
        it before then, judged by the storage's clock as sleeps are (a
        ``run_at`` is turned into a delay with one reading of that clock, so a
        skewed engine clock cannot move it). A ``run_at`` in the past, or a
        zero delay, enqueues a run due at once.

        ``deadline`` (a duration from now, or an aware datetime) bounds the
        run, as the workflow's ``timeout`` does (the earlier of the two
        counts): a run that has not finished by then fails with
        :class:`~reflow_core.errors.RunDeadlineError`, its step in flight
        cancelled, or at once if it is delayed, sleeping or waiting then.

        ``priority`` (default: the workflow's) orders it among due runs:
        claims take higher priorities first. The workflow's ``max_running``
        and concurrency ``Limit`` (its key computed from this input) hold
        it while it runs, and its ``rate`` and the ``Limit``'s rate bound how
        often it may start; see :func:`~reflow_core.workflow.workflow`.

        ``debounce_key`` with ``debounce`` (a duration) debounces a burst:
        while the workflow has a run with that key that no worker has
        started yet, enqueueing again replaces that run's input with this one
        and starts the wait over, so the run starts once the key has been
        quiet for ``debounce``, with the last input sent. The same run is
        returned each time (its ``created`` is False after the first). Not
        with ``idempotency_key``, ``delay`` or ``run_at``.

        ``headers`` are stored with the run, over those the tracing plugins
        give (the current trace context): at most 16 names from ``a-z 0-9 -
        _ .`` to printable ASCII values (see
        :attr:`~reflow_core.storage.NewRun.headers`).
        """
        wf = self._resolve(workflow)
        if idempotency_key is not None:
            check_text(idempotency_key, "idempotency_key")
        timing = Timing.of(delay, run_at, deadline, debounce_key, debounce, idempotency_key)
        rank = None if priority is None else check_priority(priority, "enqueue")
        raw = to_plain_input(input)
        shape = wf.flow.shape(wf.name, wf.validate_input(raw), rank)
        text = codec.encode(raw)
        await self._ensure_initialized("enqueue")
        # Absolute times are read against the storage's clock.
        now = await self._storage.now() if timing.absolute else None
        later, due = timing.resolve(now, wf.timeout)
        result = await self._storage.create_run(
            NewRun(
                workflow=wf.name,
                input=text,
                idempotency_key=idempotency_key,
                delay=later,
                deadline=due,
                priority=shape.priority,
                limits=shape.limits,
                rates=shape.rates,
                debounce_key=debounce_key,
                headers=self._observers.scopes.headers(wf.name, headers),
                version=wf.version,
                fingerprint=wf.fingerprint,
            )
        )
        self._wake_for([result.run], wf)
        return Run.from_record(result.run, created=result.created)

    @overload
    async def enqueue_many(
        self,
        workflow: Workflow[Any, Any] | str,
        items: Iterable[Any],
        *,
        delay: Duration | None = None,
        run_at: datetime | None = None,
        deadline: Duration | datetime | None = None,
        priority: int | None = None,
        headers: Mapping[str, str] | None = None,
        return_exceptions: Literal[False] = False,
    ) -> list[Run]: ...

    @overload
    async def enqueue_many(
        self,
        workflow: Workflow[Any, Any] | str,
        items: Iterable[Any],
        *,
        delay: Duration | None = None,
        run_at: datetime | None = None,
        deadline: Duration | datetime | None = None,
        priority: int | None = None,
        headers: Mapping[str, str] | None = None,
        return_exceptions: Literal[True],
    ) -> list[Run | IdempotencyConflictError]: ...

    async def enqueue_many(
        self,
        workflow: Workflow[Any, Any] | str,
        items: Iterable[Any],
        *,
        delay: Duration | None = None,
        run_at: datetime | None = None,
        deadline: Duration | datetime | None = None,
        priority: int | None = None,
        headers: Mapping[str, str] | None = None,
        return_exceptions: bool = False,
    ) -> list[Run] | list[Run | IdempotencyConflictError]:
        """Create a run of ``workflow`` for each of ``items``, in one round
        trip and one commit per :data:`~reflow_core.storage.MAX_CREATE_BATCH`
        (1,000) items. Returns the runs in the order of ``items``.

        An item is the run's input, or an :class:`EnqueueItem` holding the
        input with options of its own (``idempotency_key``, ``delay``,
        ``run_at``, ``deadline``, ``priority``, ``debounce_key`` and
        ``debounce``, ``headers``). The keyword arguments apply to every
        item that does not set its own; they mean what they mean for
        :meth:`enqueue`.

        Every item is validated and encoded before anything is written: a
        :class:`~reflow_core.errors.ValidationError`,
        :class:`~reflow_core.errors.SerializationError` or
        :class:`~reflow_core.errors.ConfigError` names the item (``item 7:
        ...``) and nothing is enqueued.

        Each item keeps its own idempotency outcome, as if enqueued one
        after another: ``run.created`` says whether it made a new run or
        found the one holding its key. An item whose key holds a run with a
        different input is not enqueued, and the others are: the first such
        conflict is raised as
        :class:`~reflow_core.errors.IdempotencyConflictError` after the
        batch is written, or, with ``return_exceptions=True``, each is
        returned in its item's place, as :func:`asyncio.gather` does.
        """
        wf = self._resolve(workflow)
        builder = BatchBuilder(
            wf,
            self._observers.scopes,
            delay=delay,
            run_at=run_at,
            deadline=deadline,
            priority=priority,
            headers=headers,
        )
        builder.extend(items)
        await self._ensure_initialized("enqueue_many")
        now = await self._storage.now() if builder.uses_clock else None
        news = builder.build(now)
        outcomes: list[Run | IdempotencyConflictError] = []
        conflicts = 0
        for start in range(0, len(news), MAX_CREATE_BATCH):
            results = await self._create_runs(news[start : start + MAX_CREATE_BATCH])
            self._wake_for(
                [r.run for r in results if not isinstance(r, IdempotencyConflictError)], wf
            )
            for result in results:
                if isinstance(result, IdempotencyConflictError):
                    conflicts += 1
                    outcomes.append(result)
                else:
                    outcomes.append(Run.from_record(result.run, created=result.created))
        if conflicts and not return_exceptions:
            first = next(o for o in outcomes if isinstance(o, IdempotencyConflictError))
            first.add_note(
                f"{conflicts} of {len(outcomes)} items conflicted; the other "
                f"{len(outcomes) - conflicts} were enqueued (return_exceptions=True returns "
                "each item's outcome)"
            )
            raise first
        return outcomes

    async def _create_runs(
        self, news: list[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        """``create_runs`` of the storage, or, on an adapter that declares the
        ``batches`` area not built yet, one ``create_run`` per item."""
        if self._batches:
            try:
                return await self._storage.create_runs(news)
            except NotImplementedError:
                self._batches = False
                logger.info(
                    "%s does not implement create_runs: enqueue_many creates one run at a time",
                    type(self._storage).__name__,
                )
        results: list[CreateResult | IdempotencyConflictError] = []
        for new in news:
            try:
                results.append(await self._storage.create_run(new))
            except IdempotencyConflictError as exc:
                results.append(exc)
        return results

    def _wake_for(self, records: Iterable[RunRecord], wf: Workflow[Any, Any]) -> None:
        """Wake this engine's worker for runs just created or debounced, at
        once or when the earliest of them falls due."""
        if wf.name not in self._workflows:
            return
        soonest: float | None = None
        for record in records:
            if record.status == "delayed" and record.wake_at is not None:
                wait = (record.wake_at - record.updated_at).total_seconds()
                soonest = wait if soonest is None else min(soonest, wait)
            elif record.status == "pending":
                self._worker.wake.set()
                return
        if soonest is not None:
            self._worker.wake_in(soonest)

    async def get_run(self, run_id: str) -> Run | None:
        """The run without its steps, or ``None`` if there is none."""
        await self._ensure_initialized("get_run")
        record = await self._storage.get_run(run_id)
        return None if record is None else Run.from_record(record)

    async def get_run_status(self, run_id: str) -> Run:
        """The run, its saved steps and the child runs it started (its
        ``parent_id`` names its own parent). Raises :class:`RunNotFoundError`."""
        await self._ensure_initialized("get_run_status")
        record = await self._storage.get_run(run_id)
        if record is None:
            raise RunNotFoundError(run_id)
        steps = await self._storage.get_step_results(run_id)
        list_children = getattr(self._storage, "list_children", None)
        children = [] if list_children is None else await list_children(run_id)
        return Run.from_record(record, steps, children)

    async def cancel(self, run_id: str) -> bool:
        """Cancel a run that has not finished, and every unfinished child run
        below it, in one write. Returns False if it is missing or already
        finished. A step of the run or of a child run below it running in
        this engine is interrupted at once; a worker elsewhere stops at its
        next heartbeat or write."""
        await self._ensure_initialized("cancel")
        error = codec.encode({"code": "run_cancelled", "message": "cancelled", "step": None})
        changed = await self._storage.update_run_status(run_id, "cancelled", error=error)
        if changed:
            # The run and, cancelled in the same write, its unfinished
            # descendants (a child's id extends its parent's) that run here.
            below = f"{run_id}:"
            for held_id, state in list(self._worker.inflight.items()):
                if held_id == run_id or held_id.startswith(below):
                    state.interrupt("cancelled")
            self._notify_finished(run_id)
            self._worker.wake.set()  # a parent waiting for it may be claimable now
            if self._observers.active:
                record = await self._storage.get_run(run_id)
                if record is not None:
                    await self._observers.publish(RunCancelled(run_id, record.workflow))
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
        await self._ensure_initialized("send_event")
        record = await self._storage.get_run(run_id)
        if record is None or record.status in TERMINAL_STATUSES:
            return False
        wf = self._definition(record)
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
            self._worker.wake.set()
        return delivered

    async def resume(self, run_id: str) -> bool:
        """Queue a failed or cancelled run again; its completed steps are kept
        and it continues at its first unfinished step. Returns False for a
        run that is missing or not failed or cancelled. Raises
        :class:`~reflow_core.errors.WorkflowNotFoundError`, changing nothing,
        when the run's workflow is not registered on this engine (register
        it, even on an engine started with ``worker=False``)."""
        await self._ensure_initialized("resume")
        record = await self._storage.get_run(run_id)
        if record is None or record.status not in ("failed", "cancelled"):
            return False
        if record.workflow not in self._workflows:
            # Requeued, it would wait for a worker that runs its workflow;
            # this engine cannot tell whether one exists.
            raise WorkflowNotFoundError(record.workflow, list(self._workflows))
        requeued = await self._storage.requeue_run(run_id)
        if requeued:
            self._worker.wake.set()
        return requeued

    async def release(self, run_id: str) -> bool:
        """Let a held run go on: a run that a definition of its workflow
        held because it cannot continue the run where it stands
        (``on_incompatible="hold"`` or ``None``; see ``docs/versions.md``). The
        next worker to claim it goes on with it on the definition it has:
        its own version's, if that worker registers it, or else the
        current one, whatever the check says. Releasing it again before a
        worker takes it changes nothing and returns True. Returns False,
        changing nothing, for a run that is missing or not held."""
        await self._ensure_initialized("release")
        delivered = await release_held(self._storage, run_id)
        if delivered:
            self._worker.wake.set()
        return delivered

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
        await self._ensure_initialized("list_runs")
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
        slot in all. Registering a key again is a deliberate update: it
        replaces the workflow and input and keeps the next slot if the
        recurrence is unchanged; a changed recurrence starts over at its
        first slot after now. Slots missed while no worker ran are skipped.
        See :mod:`reflow_core.schedules`.

        Without ``key``, a second call on this engine for the same workflow
        with a different input or recurrence raises
        :class:`~reflow_core.errors.ConfigError` instead of replacing the
        first: give each schedule its own ``key``. (A new deploy whose code
        schedules the workflow differently still updates it: the first call
        of an engine replaces what an earlier process stored.)

        Raises :class:`~reflow_core.errors.ConfigError` for an invalid
        recurrence (naming the expression and why) or key, and
        :class:`~reflow_core.errors.ValidationError` or
        :class:`~reflow_core.errors.SerializationError` for invalid input;
        nothing is stored then.
        """
        wf = self._resolve(workflow)
        recurrence = parse_recurrence(every=every, cron=cron)
        raw = to_plain_input(input)
        wf.validate_input(raw)
        text = codec.encode(raw)
        shape: tuple[str, str] | None = None
        if key is None:
            key = wf.name
            shape = (text, recurrence.canonical)
            earlier = self._default_schedules.get(key, shape)
            if earlier != shape:
                raise ConfigError(
                    f"workflow {wf.name!r} is already scheduled by this engine under the "
                    f"default key {key!r} with a different "
                    f"{'input' if earlier[0] != text else 'recurrence'}; pass key= to keep "
                    "both schedules (one key each), or the same key to replace it",
                    option="key",
                )
        else:
            check_text(key, "key")
        await self._ensure_initialized("schedule")
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
        if shape is not None:
            self._default_schedules[key] = shape
        self._scheduler.expect(key, record.next_run_at)
        self._worker.wake.set()
        return Schedule.from_record(record)

    async def unschedule(self, key: str) -> bool:
        """Delete schedule ``key``: no slot after this fires. Runs it already
        created are not touched. Returns False if there was no such schedule."""
        await self._ensure_initialized("unschedule")
        self._scheduler.forget(key)
        self._default_schedules.pop(key, None)
        return await self._storage.delete_schedule(key)

    async def list_schedules(self) -> list[Schedule]:
        """Every stored schedule, of any workflow, ordered by key."""
        await self._ensure_initialized("list_schedules")
        return [Schedule.from_record(r) for r in await self._storage.list_schedules()]

    async def pause_schedule(self, key: str) -> bool:
        """Pause schedule ``key``: it fires no slot until :meth:`resume_schedule`,
        even when a worker registers it again at start. Returns False if there
        is no such schedule."""
        await self._ensure_initialized("pause_schedule")
        return await set_paused(self._storage, key, True) is not None

    async def resume_schedule(self, key: str) -> bool:
        """Resume a paused schedule. Slots that passed while it was paused are
        skipped: it next fires at its first slot after now. Returns False if
        there is no such schedule."""
        await self._ensure_initialized("resume_schedule")
        record = await set_paused(self._storage, key, False)
        if record is None:
            return False
        self._scheduler.expect(key, record.next_run_at)
        self._worker.wake.set()
        return True

    async def list_workers(self) -> list[WorkerRecord]:
        """The live workers of this engine's storage (every engine's, on every
        machine), oldest first: each one's host, pid, workflows, concurrency
        and runs in flight at its last announcement."""
        await self._ensure_initialized("list_workers")
        return await self._storage.list_workers()

    async def queue_stats(
        self, workflows: Collection[Workflow[Any, Any] | str] | None = None
    ) -> list[QueueStats]:
        """Each workflow's unfinished runs by status, and since when its oldest
        pending run has waited: of ``workflows`` (zeros included), or of every
        workflow with unfinished runs. Cheap on a store with a long history:
        finished runs are not counted."""
        await self._ensure_initialized("queue_stats")
        names = None
        if workflows is not None:
            if isinstance(workflows, (str, Workflow)):
                workflows = [workflows]
            names = [w.name if isinstance(w, Workflow) else w for w in workflows]
        return await self._storage.queue_stats(names)

    async def result(self, run_id: str, *, timeout: Duration | None = None) -> Any:
        """Wait for a run to finish and return its output.

        Raises :class:`~reflow_core.errors.RunFailedError` (with the stored
        failure) or :class:`~reflow_core.errors.RunCancelledError`, and
        :class:`~reflow_core.errors.ResultTimeoutError` (a ``TimeoutError``)
        after ``timeout``, naming the run's status then and, for a run still
        ``pending``, why it may not have been picked up. The run itself goes
        on. A run finished by this engine wakes the waiter at once, and so
        does one finished by any process on a store that sends finish hints
        (:class:`~reflow_core.storage.FinishSource`: PostgreSQL, Redis);
        otherwise the run is read again after a pause that backs off to
        ``poll_interval`` (at once ``poll_interval`` for a run of a workflow
        this engine's running worker runs, whose end here wakes the waiter
        anyway). The reads are shared by every waiter of this
        engine (one :meth:`~reflow_core.storage.Storage.get_runs` round trip
        for the runs due, at most once per 10 ms). A missing or purged run raises
        :class:`~reflow_core.errors.RunNotFoundError`; closing the engine
        ends the wait with :class:`~reflow_core.errors.EngineClosedError`.
        """
        seconds = None if timeout is None else to_seconds(timeout, option="timeout")
        await self._ensure_initialized("result")
        # One reader for every waiter of this engine (see RunWatcher).
        future = self._watcher.watch(run_id)
        waiting = asyncio.timeout(seconds)
        try:
            async with waiting:
                return _outcome(await future)
        except TimeoutError:
            if not waiting.expired():
                raise
        finally:
            self._watcher.forget(run_id, future)
        # Timed out: one more read says where the run stands now.
        assert seconds is not None
        gone = False
        record: RunRecord | None = None
        with contextlib.suppress(ReflowError, TimeoutError):
            async with asyncio.timeout(_FINAL_READ_TIMEOUT):
                record = await self._storage.get_run(run_id)
                gone = record is None
        if gone:
            raise RunNotFoundError(run_id)
        if record is not None and record.status in TERMINAL_STATUSES:
            return _outcome(record)
        raise self._result_timeout(run_id, seconds, record) from None

    async def wait(
        self,
        run_ids: Iterable[str],
        *,
        return_when: ReturnWhen = "ALL_COMPLETED",
        timeout: Duration | None = None,
    ) -> WaitedRuns:
        """Wait for runs to finish, as :func:`asyncio.wait` waits for tasks:
        ``done, pending = await engine.wait(ids)``.

        ``return_when`` is ``"ALL_COMPLETED"`` (the default), ``"FIRST_COMPLETED"``
        (as soon as any has finished) or ``"FIRST_EXCEPTION"`` (as soon as any
        has failed or was cancelled, or all have finished); asyncio's
        constants of those names work too. ``done`` holds the finished runs
        as :class:`Run` views, failed and cancelled ones included (nothing is
        raised for them: look at ``run.status``), in the order given;
        ``pending`` the ids of the others. After ``timeout`` it returns what
        it has, without raising; the runs go on.

        The waits share :meth:`result`'s reader: one batched read for every
        run this engine waits for, woken at once by a finish hint on backends
        that send them (PostgreSQL, Redis), so any number of runs costs one
        read per tick. Raises :class:`~reflow_core.errors.RunNotFoundError`
        for a run that does not exist (or was purged), and
        :class:`~reflow_core.errors.EngineClosedError` if the engine closes.
        """
        ids = check_wait_args(run_ids, return_when)
        seconds = None if timeout is None else to_seconds(timeout, option="timeout")
        await self._ensure_initialized("wait")
        if not ids:
            return WaitedRuns([], [])
        records, pending = await wait_records(self._watcher, ids, return_when, seconds)
        return WaitedRuns([Run.from_record(record) for record in records], pending)

    def _result_timeout(
        self, run_id: str, seconds: float, record: RunRecord | None
    ) -> ResultTimeoutError:
        if record is None:
            return ResultTimeoutError(run_id, seconds, detail="its record could not be read")
        goes_on = "the run goes on; call result() again to wait longer"
        if record.status == "pending":
            detail = f"no worker has claimed it; {self._pending_hint(record.workflow)}"
        elif record.status == "waiting":
            deadline = f" (its wait ends at {record.wake_at.isoformat()})" if record.wake_at else ""
            detail = (
                f"it waits for event {record.waiting_for!r}{deadline}, sent with send_event(); "
                f"{goes_on}"
            )
        elif record.status == "sleeping" and record.wake_at is not None:
            detail = f"it sleeps until {record.wake_at.isoformat()}; {goes_on}"
        else:
            detail = goes_on
        return ResultTimeoutError(
            run_id, seconds, workflow=record.workflow, status=record.status, detail=detail
        )

    def _pending_hint(self, workflow: str) -> str:
        """Why a pending run of ``workflow`` may not be picked up, as far as
        this engine can tell."""
        serves = ", ".join(repr(name) for name in sorted(self._worker.served)) or "no workflows"
        elsewhere = f"is workflow {workflow!r} registered on a running worker?"
        if not self._start_worker:
            return f"{elsewhere} (this engine runs no worker: worker=False)"
        if not self.running:
            if self._started:
                state = "this engine's worker was stopped"
            else:
                state = (
                    "this engine was never started: `async with engine` or `await engine.start()`"
                )
            if workflow in self._worker.served:
                return state
            return f"{state}; and it does not serve workflow {workflow!r} (it serves: {serves})"
        if workflow not in self._worker.served:
            return f"{elsewhere} (this engine serves: {serves})"
        return (
            f"this engine serves workflow {workflow!r}, with {len(self._worker.inflight)} of "
            f"{self._concurrency} runs in flight"
        )

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

    @property
    def plugins(self) -> list[object]:
        """The observer plugins registered so far (those found through entry
        points are added when the engine starts)."""
        return list(self._observers.pm.get_plugins())

    def _runs_here(self, workflow: str) -> bool:
        """Whether this engine's running worker runs ``workflow``'s runs."""
        return self._worker.running and workflow in self._worker.served

    def _notify_finished(self, run_id: str) -> None:
        self._watcher.finished(run_id)

    # -- worker ------------------------------------------------------------

    async def tick(self) -> int:
        """Fire the due schedules of this engine's workflows, claim one batch
        (up to the free slots), run it to the end, and return how many runs
        were processed. For tests and scripts; it does not need :meth:`start`."""
        await self._ensure_initialized("tick")
        return await self._worker.tick()
