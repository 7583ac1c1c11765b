"""Test helpers: run workflows to the end in a test, with time under the test's control.

:class:`TestEngine` wraps a real :class:`~reflow_core.engine.Engine` on an
in-memory storage (or one you pass), with a :class:`VirtualClock` shared by
the engine and the storage. Time only moves when the test says so, and then
instantly::

    async with TestEngine([order]) as t:
        result = await t.run(order, {"order_id": "A1", "amount": 100})
        assert result.status == "sleeping"          # at .sleep("cool-off", "1h")
        await t.advance("1h")
        result = await t.get(result.id)
        print(result.blocked_reason)                # waiting for event 'approval' (timeout at ...)
        result = await t.send_event(result.id, "approval", {"by": "ann"})
        assert result.output == {"tracking": "TRK-A1"}

What moves the clock:

* **Retry back-off** passes by itself. While every step attempt in flight
  is waiting out its back-off, the clock jumps to the end of the earliest
  one, so ``Retry(max_attempts=10, backoff="exponential")`` takes no real
  time. This is shared time: other runs see it pass too.
* **Durable sleeps, wait timeouts and schedule slots** pass only when asked:
  :meth:`TestEngine.advance` (or :meth:`~TestEngine.advance_to`) moves the
  clock forward through every wake-up on the way, in order, and runs what
  became due at each; ``run(..., advance=True)`` does the same up to the
  run's own wake-ups until it finishes.

A run that cannot finish is returned as it stands, with
:attr:`RunResult.blocked_reason` saying why in words ("sleeping in step
'cool-off' until ...", "waiting for event 'approval' (no timeout) ...",
"step 'charge' keeps failing: its retry back-off never ends ...").

Step timeouts (``timeout=`` of a step) are measured in real time, as are
handlers' own waits: only the engine's and the storage's notion of *now*
is virtual.

**pytest.** Installing reflow-core registers a pytest plugin
(``reflow_core.pytest_plugin``, entry point ``reflow``) with two fixtures;
it needs no async test plugin. ``reflow_test_engine`` is a
:class:`SyncTestEngine`: the same API with plain methods, running on an
event loop of its own for the test, so a plain ``def`` test calls
``reflow_test_engine.run(order, {...})`` directly. In an ``async def`` test
(pytest-asyncio, anyio, or any runner) take the async engine from it, on the
test's own loop: ``async with reflow_test_engine.async_engine() as t``.
``virtual_clock`` is the :class:`VirtualClock` it runs on.

The fixture is the synchronous facade because that works in every test
suite as is, whatever runs its coroutines (or nothing does); the async
:class:`TestEngine` is the same engine for suites whose tests are coroutines.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar, cast, overload

from ._durations import Duration, to_seconds, to_timedelta
from .engine import Clock, Engine, Run, StepResult
from .errors import (
    ConfigError,
    ErrorInfo,
    RunCancelledError,
    RunError,
    RunFailedError,
    RunNotFoundError,
)
from .events import RunCompleted, RunFailed, StepCompleted, StepSkipped, StepStarted
from .hookspecs import hookimpl
from .memory import MemoryStorage
from .registry import open_storage
from .schedules import Schedule
from .storage import TERMINAL_STATUSES, RunRecord, RunStatus, Storage
from .workflow import Workflow

__all__ = [
    "DEFAULT_START",
    "RunBlockedError",
    "RunResult",
    "SyncTestEngine",
    "TestEngine",
    "VirtualClock",
]

T = TypeVar("T")
OutT = TypeVar("OutT")

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
"""Where a :class:`VirtualClock` starts unless told otherwise."""

_NEVER = datetime.max.replace(tzinfo=UTC)
"""The deadline of a sleep too long for a datetime to hold."""

_SETTLE_ROUNDS = 20
"""Event-loop turns given to the runs in flight before the clock jumps to
the next back-off deadline, so every run that is about to start a back-off
has started it and the earliest one is passed first."""

_MAX_TICKS = 10_000
"""Claims in one drive after which runs that keep becoming due are reported."""

_WAKE_STATUSES: list[RunStatus] = ["pending", "sleeping", "waiting"]


# -- the clock ---------------------------------------------------------------


class VirtualClock(Clock):
    """A clock that moves only when told to.

    It is the engine's :class:`~reflow_core.engine.Clock` (``now()`` and an
    ``async sleep()`` that ends when virtual time reaches its deadline, not in
    real time) and, called with no arguments, a storage clock
    (``MemoryStorage(clock=clock)``). ``start`` must be timezone-aware; time
    is kept in UTC.

    Use it from the thread of the event loop that sleeps on it; storages may
    read it from any thread.
    """

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        self._now = _aware(start, "start")
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._listeners: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        return f"<VirtualClock {self._now.isoformat()} sleepers={self.sleepers}>"

    def now(self) -> datetime:
        """The virtual time, aware UTC."""
        return self._now

    def __call__(self) -> datetime:
        """The virtual time: what a storage's ``clock=`` is called for."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has been moved ``seconds`` past the current
        virtual time. Zero or less only yields to the event loop."""
        if not seconds > 0:
            await asyncio.sleep(0)
            return
        try:
            deadline = self._now + timedelta(seconds=seconds)
        except (OverflowError, ValueError):  # too far for a datetime: never ends
            deadline = _NEVER
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._order), future))
        for listener in self._listeners:
            if not listener.done():
                listener.set_result(None)
        self._listeners.clear()
        try:
            await future
        finally:
            future.cancel()  # a cancelled sleeper is dropped from the heap lazily

    def advance(self, duration: Duration) -> datetime:
        """Move the clock forward by ``duration`` (``"1h"``, seconds, a
        ``timedelta``), wake every sleeper whose deadline has passed, and
        return the new time."""
        delta = to_timedelta(duration, option="duration")
        try:
            target = self._now + delta
        except OverflowError:
            raise ConfigError(
                f"advancing by {duration!r} goes past the last datetime", option="duration"
            ) from None
        return self.advance_to(target)

    def advance_to(self, moment: datetime) -> datetime:
        """Move the clock forward to ``moment`` (aware), wake every sleeper
        whose deadline has passed, and return the new time. The clock never
        goes back: an earlier ``moment`` is a :class:`ConfigError`."""
        moment = _aware(moment, "moment")
        if moment < self._now:
            raise ConfigError(
                f"the virtual clock never goes back: it is {self._now.isoformat()}, "
                f"asked for {moment.isoformat()}",
                option="moment",
            )
        self._now = moment
        while self._sleepers and self._sleepers[0][0] <= moment:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        return self._now

    @property
    def next_deadline(self) -> datetime | None:
        """The earliest deadline of a pending :meth:`sleep`, if any."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    @property
    def sleepers(self) -> int:
        """How many :meth:`sleep` calls are waiting."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    def _sleeper_added(self) -> asyncio.Future[None]:
        """A future resolved by the next :meth:`sleep` call."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._listeners.append(future)
        return future


def _aware(moment: datetime, option: str) -> datetime:
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ConfigError(f"{option} must be a timezone-aware datetime", option=option)
    return moment.astimezone(UTC)


def _human(delta: timedelta) -> str:
    """``timedelta(hours=25, minutes=3)`` as ``"1d 1h 3m"``."""
    ms = max(0, round(delta.total_seconds() * 1000))
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms // 1000
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return " ".join(parts)


def _when(moment: datetime, now: datetime) -> str:
    if moment <= now:
        return f"{moment.isoformat()}, already passed"
    return f"{moment.isoformat()}, {_human(moment - now)} from now"


# -- results -----------------------------------------------------------------


class RunBlockedError(RunError):
    """A run that a test expected to finish is stuck; ``reason`` says why."""

    code = "run_blocked"

    def __init__(self, run_id: str, status: RunStatus, reason: str) -> None:
        super().__init__(f"run {run_id} did not finish ({status}): {reason}", run_id=run_id)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RunResult(Generic[OutT]):
    """A run as a test sees it: where it stands, its steps, and, if it cannot
    go on, why.

    ``OutT`` is the output type of the workflow it ran (the type of its last
    step's output), so ``result.output`` is typed.
    """

    run: Run
    """The run with its saved steps, as :meth:`Engine.get_run_status` returns it."""
    blocked_reason: str | None = None
    """Why the run cannot go on by itself, in words; ``None`` once it finished."""

    @property
    def id(self) -> str:
        """The run's id."""
        return self.run.id

    @property
    def workflow(self) -> str:
        """The name of the run's workflow."""
        return self.run.workflow

    @property
    def status(self) -> RunStatus:
        """``completed``, ``failed`` or ``cancelled`` once finished; otherwise
        where it stopped (``sleeping``, ``waiting``, ``pending``, ``running``)."""
        return self.run.status

    @property
    def finished(self) -> bool:
        """True if the run completed, failed or was cancelled."""
        return self.run.status in TERMINAL_STATUSES

    @property
    def error(self) -> ErrorInfo | None:
        """The stored failure of a failed or cancelled run: ``code``, ``type``,
        ``message``, ``step``."""
        return self.run.error

    @property
    def steps(self) -> Mapping[str, StepResult]:
        """The saved steps by name (completed, skipped, failed, and the sleep
        or wait the run stopped at)."""
        return self.run.steps

    @property
    def output(self) -> OutT:
        """The output of a completed run. Raises as :meth:`raise_for_status`
        does for a run that did not complete."""
        self.raise_for_status()
        return cast(OutT, self.run.output)

    def step(self, name: str) -> StepResult:
        """The saved step ``name``; a ``KeyError`` lists the saved ones."""
        try:
            return self.run.steps[name]
        except KeyError:
            saved = ", ".join(repr(n) for n in self.run.steps) or "none"
            raise KeyError(
                f"run {self.run.id} has no saved step {name!r} (saved: {saved})"
            ) from None

    def raise_for_status(self) -> Self:
        """Return this result if the run completed; otherwise raise
        :class:`~reflow_core.errors.RunFailedError` (with the stored failure),
        :class:`~reflow_core.errors.RunCancelledError`, or
        :class:`RunBlockedError` (with :attr:`blocked_reason`)."""
        status = self.run.status
        if status == "completed":
            return self
        if status == "failed":
            raise RunFailedError(self.run.id, self.run.error or {})
        if status == "cancelled":
            raise RunCancelledError(self.run.id)
        raise RunBlockedError(self.run.id, status, self.blocked_reason or status)

    def __repr__(self) -> str:
        extra = f" blocked_reason={self.blocked_reason!r}" if self.blocked_reason else ""
        return (
            f"<RunResult {self.run.id} workflow={self.run.workflow!r} "
            f"status={self.run.status!r}{extra}>"
        )


# -- the test engine -----------------------------------------------------------


class _Tracker:
    """Follows step attempts and finished runs through the lifecycle hooks.

    An attempt is active from its ``StepStarted`` until its step completes
    or is skipped, or its run finishes; one that failed and waits out its
    back-off stays active, asleep on the clock.
    """

    def __init__(self) -> None:
        self.active: dict[str, dict[str, tuple[int, float]]] = {}
        self.finished: list[str] = []
        self._listeners: list[asyncio.Future[None]] = []

    @property
    def attempts(self) -> int:
        """How many step attempts are active (running or in back-off)."""
        return sum(len(steps) for steps in self.active.values())

    def changed(self) -> asyncio.Future[None]:
        """A future resolved by the next lifecycle event."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._listeners.append(future)
        return future

    def _notify(self) -> None:
        for future in self._listeners:
            if not future.done():
                future.set_result(None)
        self._listeners.clear()

    def _end_step(self, run_id: str, step: str) -> None:
        steps = self.active.get(run_id)
        if steps is not None:
            steps.pop(step, None)
            if not steps:
                del self.active[run_id]
        self._notify()

    def _end_run(self, run_id: str) -> None:
        self.active.pop(run_id, None)
        self.finished.append(run_id)
        self._notify()

    @hookimpl
    def reflow_step_started(self, event: StepStarted) -> None:
        self.active.setdefault(event.run_id, {})[event.step] = (event.attempt, time.monotonic())
        self._notify()

    @hookimpl
    def reflow_step_completed(self, event: StepCompleted) -> None:
        self._end_step(event.run_id, event.step)

    @hookimpl
    def reflow_step_skipped(self, event: StepSkipped) -> None:
        self._end_step(event.run_id, event.step)

    @hookimpl
    def reflow_run_completed(self, event: RunCompleted) -> None:
        self._end_run(event.run_id)

    @hookimpl
    def reflow_run_failed(self, event: RunFailed) -> None:
        self._end_run(event.run_id)


@dataclass(slots=True)
class _Budget:
    """What one drive has spent, against the engine's limits."""

    backoffs: int = 0
    ticks: int = 0


@dataclass(frozen=True, slots=True)
class _Stall:
    """Why driving stopped with a run still in flight."""

    kind: Literal["wall", "backoff", "never", "busy"]
    count: int = 0
    at: datetime | None = None
    since: float = field(default_factory=time.monotonic)


StorageOption = Storage | str | Callable[..., Storage] | None


class TestEngine:
    """A real :class:`~reflow_core.engine.Engine` on a :class:`VirtualClock`,
    driven by the test. Use it as an async context manager.

    ``workflows`` are registered up front; :meth:`run` registers the
    workflow it is given too. ``storage`` is where runs are kept:

    * ``None`` (default): a private :class:`~reflow_core.memory.MemoryStorage`
      on the virtual clock;
    * a URL: opened with ``open_storage(url, clock=clock)``;
    * a callable: called as ``storage(clock=clock)``, for example
      ``functools.partial(SQLiteStorage, path)``;
    * a storage object: used as is; give it ``clock=`` the same
      :class:`VirtualClock` (pass it as ``clock``), or its leases, sleeps and
      waits follow another clock. It is not closed on exit.

    ``clock`` defaults to a new :class:`VirtualClock` at :data:`DEFAULT_START`.
    ``wall_timeout`` is how long, in real time, a run in flight may make no
    progress (no step finishing, no back-off starting) before driving stops
    and reports it; ``max_backoffs`` is how many back-offs are passed in a
    row (with no run left due in between) before a back-off that never ends
    is reported. Other keyword arguments go
    to :class:`~reflow_core.engine.Engine` (``concurrency``, ``plugins``,
    ...); the lease defaults to ten years of virtual time, so passing
    back-offs never lets one lapse.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self,
        workflows: Iterable[Workflow[Any, Any]] = (),
        *,
        storage: StorageOption = None,
        clock: VirtualClock | None = None,
        wall_timeout: Duration = "10s",
        max_backoffs: int = 1000,
        **engine_options: Any,
    ) -> None:
        if "worker" in engine_options:
            raise ConfigError(
                "a TestEngine never runs a background worker; it drives runs itself",
                option="worker",
            )
        if isinstance(max_backoffs, bool) or not isinstance(max_backoffs, int) or max_backoffs < 1:
            raise ConfigError(
                f"max_backoffs must be a positive int, got {max_backoffs!r}", option="max_backoffs"
            )
        self.clock: VirtualClock = clock if clock is not None else VirtualClock()
        """The virtual clock shared by the engine and the storage."""
        self._wall_timeout = to_seconds(wall_timeout, option="wall_timeout", allow_zero=False)
        self._max_backoffs = max_backoffs
        owned = not isinstance(storage, Storage)
        if storage is None:
            resolved: Storage = MemoryStorage(clock=self.clock)
        elif isinstance(storage, str):
            resolved = open_storage(storage, clock=self.clock)
        elif isinstance(storage, Storage):
            resolved = storage
        elif callable(storage):
            resolved = storage(clock=self.clock)
        else:
            raise ConfigError(
                "storage must be a storage, a URL, or a callable taking clock=",
                option="storage",
            )
        engine_options.setdefault("lease", "3650d")
        engine_options.setdefault("close_storage", owned)
        self._names: set[str] = set()
        self._engine = Engine(
            storage=resolved, workflows=(), clock=self.clock, worker=False, **engine_options
        )
        for wf in workflows:
            self.register(wf)
        self._tracker = _Tracker()
        self._engine.register_plugin(self._tracker, name="reflow-test-engine")
        self._tick: asyncio.Task[int] | None = None
        self._stall: _Stall | None = None

    def __repr__(self) -> str:
        return f"<TestEngine now={self.clock.now().isoformat()} workflows={sorted(self._names)}>"

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._engine.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Hand back any run still in flight, stop the engine and close the
        storage it opened. Entering and leaving ``async with`` does this."""
        try:
            await self._engine.stop(timeout=0)
            tick, self._tick = self._tick, None
            if tick is not None:
                await asyncio.wait([tick])
                if not tick.cancelled():
                    tick.exception()  # retrieved: a failure of the last tick dies with it
        finally:
            await self._engine.__aexit__(None, None, None)

    # -- what it holds ---------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The engine, for anything this class does not wrap."""
        return self._engine

    @property
    def storage(self) -> Storage:
        """The storage the engine runs on."""
        return self._engine.storage

    @property
    def now(self) -> datetime:
        """The virtual time."""
        return self.clock.now()

    def register(self, workflow: Workflow[Any, Any]) -> None:
        """Register a workflow (done by :meth:`run` for the one it runs)."""
        self._engine.register(workflow)
        self._names.add(workflow.name)

    # -- running ---------------------------------------------------------------

    @overload
    async def run(
        self,
        workflow: Workflow[Any, OutT],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        advance: bool = False,
    ) -> RunResult[OutT]: ...

    @overload
    async def run(
        self,
        workflow: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        advance: bool = False,
    ) -> RunResult[Any]: ...

    async def run(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        advance: bool = False,
    ) -> RunResult[Any]:
        """Enqueue a run and drive it until it finishes or cannot go on.

        Retry back-offs pass by themselves. With ``advance=True`` the clock
        is also moved past the run's durable sleeps and wait timeouts, until
        it finishes or waits for an event with no timeout. Other runs that
        are due meanwhile run too. Raises what
        :meth:`~reflow_core.engine.Engine.enqueue` raises.
        """
        if isinstance(workflow, Workflow):
            self.register(workflow)
        created = await self._engine.enqueue(workflow, input, idempotency_key=idempotency_key)
        return await self.drive(created.id, advance=advance)

    async def enqueue(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
    ) -> Run:
        """Enqueue a run without driving it (it runs at the next :meth:`drive`,
        :meth:`advance`, :meth:`send_event` or :meth:`run`)."""
        if isinstance(workflow, Workflow):
            self.register(workflow)
        return await self._engine.enqueue(workflow, input, idempotency_key=idempotency_key)

    async def drive(self, run_id: str, *, advance: bool = False) -> RunResult[Any]:
        """Run whatever is due until run ``run_id`` finishes or cannot go on,
        and return it. ``advance`` as for :meth:`run`."""
        stall = await self._drive_due()
        while advance and stall is None:
            record = await self._record(run_id)
            if record.status in TERMINAL_STATUSES or record.status not in ("sleeping", "waiting"):
                break
            wake = record.wake_at
            if wake is None or wake <= self.clock.now():
                break
            stall = await self._advance_through(wake)
        return await self.get(run_id)

    async def send_event(
        self,
        run_id: str,
        event: str,
        payload: Any = None,
        *,
        event_id: str | None = None,
        advance: bool = False,
    ) -> RunResult[Any]:
        """Send ``event`` to the run, then drive it as :meth:`drive` does.

        An event sent before the run reaches its wait is kept for it. Raises
        :class:`~reflow_core.errors.RunNotFoundError` for an unknown run, and
        what :meth:`~reflow_core.engine.Engine.send_event`
        raises; an event sent to a finished run is dropped (the result says
        the run finished).
        """
        await self._record(run_id)
        await self._engine.send_event(run_id, event, payload, event_id=event_id)
        return await self.drive(run_id, advance=advance)

    async def advance(self, duration: Duration) -> list[RunResult[Any]]:
        """Move the clock forward by ``duration``, running what falls due on
        the way, in order: each durable sleep that ends, each wait that times
        out, each schedule slot. Returns the runs that finished meanwhile."""
        delta = to_timedelta(duration, option="duration")
        return await self.advance_to(self.clock.now() + delta)

    async def advance_to(self, moment: datetime) -> list[RunResult[Any]]:
        """Move the clock forward to ``moment``, as :meth:`advance` does."""
        moment = _aware(moment, "moment")
        if moment < self.clock.now():
            raise ConfigError(
                f"the virtual clock never goes back: it is {self.clock.now().isoformat()}, "
                f"asked for {moment.isoformat()}",
                option="moment",
            )
        seen = len(self._tracker.finished)
        await self._advance_through(moment)
        finished = list(dict.fromkeys(self._tracker.finished[seen:]))
        return [await self.get(run_id) for run_id in finished]

    async def get(self, run_id: str) -> RunResult[Any]:
        """The run as it stands, without driving anything, with
        :attr:`~RunResult.blocked_reason` if it has not finished."""
        record = await self._record(run_id)
        steps = await self.storage.get_step_results(run_id)
        run: Run = Run.from_record(record, steps)
        reason = None if record.status in TERMINAL_STATUSES else self._blocked(record, run)
        return RunResult(run, reason)

    async def result(self, run_id: str, *, advance: bool = False) -> Any:
        """Drive run ``run_id`` (as :meth:`drive`) and return its output, or
        raise :class:`~reflow_core.errors.RunFailedError`,
        :class:`~reflow_core.errors.RunCancelledError` or
        :class:`RunBlockedError`: :meth:`~reflow_core.engine.Engine.result`
        for tests."""
        return (await self.drive(run_id, advance=advance)).output

    async def schedule(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        every: Duration | None = None,
        cron: str | None = None,
        key: str | None = None,
    ) -> Schedule:
        """Register ``workflow`` and schedule it, as
        :meth:`~reflow_core.engine.Engine.schedule` does; its slots fire as
        :meth:`advance` passes them."""
        if isinstance(workflow, Workflow):
            self.register(workflow)
        return await self._engine.schedule(workflow, input, every=every, cron=cron, key=key)

    # -- driving -----------------------------------------------------------------

    async def _record(self, run_id: str) -> RunRecord:
        record = await self.storage.get_run(run_id)
        if record is None:
            raise RunNotFoundError(run_id)
        return record

    async def _advance_through(self, moment: datetime) -> _Stall | None:
        """Drive what is due, then step the clock through every wake-up up to
        ``moment`` (driving at each), then to ``moment``."""
        stall = await self._drive_due()
        while stall is None:
            wake = await self._next_wake()
            if wake is None or wake > moment:
                break
            self.clock.advance_to(wake)
            stall = await self._drive_due()
        if self.clock.now() < moment:
            self.clock.advance_to(moment)
            if stall is None:
                stall = await self._drive_due()
        return stall

    async def _next_wake(self) -> datetime | None:
        """The earliest moment after now at which a run or schedule falls due."""
        now = self.clock.now()
        wakes: list[datetime] = []
        cursor: str | None = None
        while True:
            page = await self.storage.list_runs(status=_WAKE_STATUSES, limit=500, cursor=cursor)
            wakes.extend(r.wake_at for r in page.runs if r.wake_at is not None and r.wake_at > now)
            cursor = page.next_cursor
            if cursor is None:
                break
        wakes.extend(
            s.next_run_at for s in await self.storage.list_schedules() if s.next_run_at > now
        )
        return min(wakes, default=None)

    async def _drive_due(self) -> _Stall | None:
        """Tick until nothing is due at the current virtual time, passing
        back-offs; stop early (returning why) if a run in flight stalls."""
        await self._forget_stopped()
        budget = _Budget()
        while True:
            if self._tick is None:
                self._tick = asyncio.create_task(self._engine.tick(), name="reflow-test-tick")
            stall = await self._await_tick(self._tick, budget)
            if stall is not None:
                self._stall = stall
                return stall
            tick, self._tick = self._tick, None
            self._stall = None
            if tick.result() == 0:
                return None
            budget.ticks += 1
            if budget.ticks >= _MAX_TICKS:
                self._stall = _Stall("busy", count=budget.ticks, at=self.clock.now())
                return self._stall

    async def _forget_stopped(self) -> None:
        """Drop the step attempts of runs no longer running (cancelled or
        handed back mid-step), which would otherwise keep the clock from
        passing other runs' back-offs."""
        for run_id in list(self._tracker.active):
            record = await self.storage.get_run(run_id)
            if record is None or record.status != "running":
                self._tracker.active.pop(run_id, None)

    async def _await_tick(self, tick: asyncio.Task[int], budget: _Budget) -> _Stall | None:
        """Wait for ``tick``, moving the clock to the next back-off deadline
        whenever every active step attempt is asleep on it."""
        clock = self.clock
        tracker = self._tracker
        while not tick.done():
            if clock.sleepers:
                # Let runs that are about to start a back-off start it, so
                # the earliest deadline is passed first.
                for _ in range(_SETTLE_ROUNDS):
                    await asyncio.sleep(0)
                    if tick.done():
                        return None
                deadline = clock.next_deadline
                if deadline is not None and clock.sleepers >= tracker.attempts:
                    if deadline == _NEVER:
                        return _Stall("never", at=clock.now())
                    if budget.backoffs >= self._max_backoffs:
                        return _Stall("backoff", count=budget.backoffs, at=clock.now())
                    budget.backoffs += 1
                    clock.advance_to(deadline)
                    continue
            # Something runs in real time (a step, a storage call): wait for
            # the tick to end, a back-off to start, or a step to move on.
            slept = clock._sleeper_added()
            moved = tracker.changed()
            try:
                done, _ = await asyncio.wait(
                    (tick, slept, moved),
                    timeout=self._wall_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                slept.cancel()
                moved.cancel()
            if not done:
                return _Stall("wall")
        return None

    # -- explaining -------------------------------------------------------------

    def _blocked(self, record: RunRecord, run: Run) -> str:
        now = self.clock.now()
        status = record.status
        if status == "sleeping":
            sleeps = _record_steps(run, "sleeping")
            where = f" in step {sleeps[0]!r}" if sleeps else ""
            wake = record.wake_at
            until = f" until {_when(wake, now)}" if wake is not None else ""
            hint = "; advance the clock to wake it" if wake is None or wake > now else ""
            return self._unclaimed(record, f"sleeping{where}{until}{hint}", wake, now)
        if status == "waiting":
            event = record.waiting_for or next(iter(_record_steps(run, "waiting")), "?")
            wake = record.wake_at
            if wake is None:
                text = f"waiting for event {event!r} (no timeout); send it with send_event()"
            else:
                text = (
                    f"waiting for event {event!r} (timeout at {_when(wake, now)}); send it "
                    "with send_event(), or advance the clock past the timeout"
                )
            return self._unclaimed(record, text, wake, now)
        if status == "pending":
            return self._unclaimed(record, "pending", record.wake_at or now, now)
        return self._running(record)

    def _unclaimed(self, record: RunRecord, text: str, wake: datetime | None, now: datetime) -> str:
        """``text``, or why a run that is due was not taken."""
        if wake is None or wake > now:
            return text
        if record.workflow not in self._names:
            return (
                f"{text}, and due, but no worker took it: is workflow {record.workflow!r} "
                "registered with this test engine?"
            )
        if self._stall is not None:
            return f"{text}, and due; it runs once the run in flight gets going again"
        return f"{text}, and due, but no worker took it"

    def _running(self, record: RunRecord) -> str:
        stall = self._stall
        ours = self._tick is not None and not self._tick.done()
        if not ours or stall is None:
            expires = record.lease_expires_at
            lease = f" (lease until {expires.isoformat()})" if expires is not None else ""
            return f"running on another worker{lease}"
        active = self._tracker.active.get(record.id, {})
        names = ", ".join(f"{name!r}" for name in active)
        steps = f"step {names}" if len(active) == 1 else f"steps {names}"
        attempts = ", ".join(f"attempt {a}" for a, _ in active.values())
        if stall.kind == "backoff":
            who = f"{steps} keeps failing" if active else "a step keeps failing"
            at = stall.at.isoformat() if stall.at else ""
            return (
                f"{who}: its retry back-off never ends (passed {stall.count} back-offs, "
                f"the clock is at {at}{'; ' + attempts if active else ''})"
            )
        if stall.kind == "never":
            who = steps if active else "a step"
            return (
                f"{who} waits for a retry back-off that never ends "
                "(longer than the clock can count)"
            )
        if stall.kind == "busy":
            return (
                f"runs kept becoming due again ({stall.count} claims without settling); "
                "does something keep waking this run?"
            )
        idle = _human(timedelta(seconds=time.monotonic() - stall.since + self._wall_timeout))
        if active:
            return (
                f"{steps} ({attempts}) has been running for {idle} of real time without "
                "finishing; does it wait for something that never happens?"
            )
        return f"it has been running for {idle} of real time without progress"


def _record_steps(run: Run, status: str) -> list[str]:
    """Names of the run's saved steps with ``status``."""
    return [name for name, step in run.steps.items() if step.status == status]


# -- the synchronous facade ------------------------------------------------------


class SyncTestEngine:
    """:class:`TestEngine` with plain methods, for tests that are not
    coroutines: it runs its own event loop, kept between calls, until
    :meth:`close` (or the end of a ``with`` block).

    It takes the same arguments as :class:`TestEngine`. It cannot be called
    from a running event loop (an ``async def`` test); there, use
    :meth:`async_engine`, which builds the async :class:`TestEngine` with the
    same settings on the caller's loop.
    """

    def __init__(
        self,
        workflows: Iterable[Workflow[Any, Any]] = (),
        *,
        storage: StorageOption = None,
        clock: VirtualClock | None = None,
        wall_timeout: Duration = "10s",
        max_backoffs: int = 1000,
        **engine_options: Any,
    ) -> None:
        self.clock: VirtualClock = clock if clock is not None else VirtualClock()
        """The virtual clock."""
        self._workflows: list[Workflow[Any, Any]] = list(workflows)
        self._storage = storage
        self._options: dict[str, Any] = dict(
            engine_options, wall_timeout=wall_timeout, max_backoffs=max_backoffs
        )
        self._runner: asyncio.Runner | None = None
        self._engine: TestEngine | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<SyncTestEngine now={self.clock.now().isoformat()}>"

    def async_engine(self) -> TestEngine:
        """A new async :class:`TestEngine` with these settings, clock and
        workflows, to enter with ``async with`` on the caller's event loop."""
        return TestEngine(self._workflows, storage=self._storage, clock=self.clock, **self._options)

    def _loop(self) -> tuple[asyncio.Runner, TestEngine]:
        if self._closed:
            raise RuntimeError("this SyncTestEngine is closed")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "SyncTestEngine cannot be called from a running event loop (an async test); "
                "use `async with reflow_test_engine.async_engine() as t:` there"
            )
        if self._runner is None or self._engine is None:
            runner = asyncio.Runner()
            engine = self.async_engine()
            try:
                runner.run(engine.__aenter__())
            except BaseException:
                runner.close()
                raise
            self._runner, self._engine = runner, engine
        return self._runner, self._engine

    def call(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on this engine's event loop and return its
        result, for the async API of :attr:`engine`:
        ``t.call(t.engine.cancel(run_id))``."""
        runner, _ = self._loop()
        return runner.run(_wrap(awaitable))

    def close(self) -> None:
        """Hand back any run in flight, close the storage and the event loop."""
        if self._closed:
            return
        self._closed = True
        runner, engine, self._runner, self._engine = self._runner, self._engine, None, None
        if runner is None:
            return
        try:
            if engine is not None:
                runner.run(engine.aclose())
        finally:
            runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The engine (its methods are coroutines: run them with :meth:`call`)."""
        return self._loop()[1].engine

    @property
    def storage(self) -> Storage:
        """The storage the engine runs on."""
        return self._loop()[1].storage

    @property
    def now(self) -> datetime:
        """The virtual time."""
        return self.clock.now()

    def register(self, workflow: Workflow[Any, Any]) -> None:
        """Register a workflow (done by :meth:`run` for the one it runs)."""
        if self._engine is not None:
            self._engine.register(workflow)
        if workflow not in self._workflows:
            self._workflows.append(workflow)

    @overload
    def run(
        self,
        workflow: Workflow[Any, OutT],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        advance: bool = False,
    ) -> RunResult[OutT]: ...

    @overload
    def run(
        self,
        workflow: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        advance: bool = False,
    ) -> RunResult[Any]: ...

    def run(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        advance: bool = False,
    ) -> RunResult[Any]:
        """:meth:`TestEngine.run`."""
        _, engine = self._loop()
        if isinstance(workflow, Workflow):
            self.register(workflow)
        return self.call(
            engine.run(workflow, input, idempotency_key=idempotency_key, advance=advance)
        )

    def enqueue(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
    ) -> Run:
        """:meth:`TestEngine.enqueue`."""
        _, engine = self._loop()
        if isinstance(workflow, Workflow):
            self.register(workflow)
        return self.call(engine.enqueue(workflow, input, idempotency_key=idempotency_key))

    def drive(self, run_id: str, *, advance: bool = False) -> RunResult[Any]:
        """:meth:`TestEngine.drive`."""
        return self.call(self._loop()[1].drive(run_id, advance=advance))

    def send_event(
        self,
        run_id: str,
        event: str,
        payload: Any = None,
        *,
        event_id: str | None = None,
        advance: bool = False,
    ) -> RunResult[Any]:
        """:meth:`TestEngine.send_event`."""
        engine = self._loop()[1]
        return self.call(
            engine.send_event(run_id, event, payload, event_id=event_id, advance=advance)
        )

    def advance(self, duration: Duration) -> list[RunResult[Any]]:
        """:meth:`TestEngine.advance`."""
        return self.call(self._loop()[1].advance(duration))

    def advance_to(self, moment: datetime) -> list[RunResult[Any]]:
        """:meth:`TestEngine.advance_to`."""
        return self.call(self._loop()[1].advance_to(moment))

    def get(self, run_id: str) -> RunResult[Any]:
        """:meth:`TestEngine.get`."""
        return self.call(self._loop()[1].get(run_id))

    def result(self, run_id: str, *, advance: bool = False) -> Any:
        """:meth:`TestEngine.result`."""
        return self.call(self._loop()[1].result(run_id, advance=advance))

    def schedule(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        every: Duration | None = None,
        cron: str | None = None,
        key: str | None = None,
    ) -> Schedule:
        """:meth:`TestEngine.schedule`."""
        _, engine = self._loop()
        if isinstance(workflow, Workflow):
            self.register(workflow)
        return self.call(engine.schedule(workflow, input, every=every, cron=cron, key=key))


async def _wrap(awaitable: Awaitable[T]) -> T:
    return await awaitable
