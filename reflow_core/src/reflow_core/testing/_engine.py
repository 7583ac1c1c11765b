"""The async test engine: a real engine on a virtual clock, driven by the test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar, overload

from reflow_core._durations import Duration, to_seconds, to_timedelta
from reflow_core.engine import Engine, Run
from reflow_core.errors import ConfigError, RunNotFoundError
from reflow_core.events import RunCompleted, RunFailed, StepCompleted, StepSkipped, StepStarted
from reflow_core.hookspecs import hookimpl
from reflow_core.memory import MemoryStorage
from reflow_core.registry import open_storage
from reflow_core.schedules import Schedule
from reflow_core.storage import TERMINAL_STATUSES, RunRecord, RunStatus, Storage
from reflow_core.workflow import Workflow

from ._clock import NEVER, VirtualClock, not_before
from ._diagnosis import Driving, Stall, blocked_reason
from ._result import RunResult

OutT = TypeVar("OutT")

_SETTLE_ROUNDS = 20
"""Event-loop turns given to the runs in flight before the clock jumps to
the next back-off deadline, so every run that is about to start a back-off
has started it and the earliest one is passed first."""

_MAX_TICKS = 10_000
"""Claims in one drive after which runs that keep becoming due are reported."""

_WAKE_STATUSES: list[RunStatus] = ["pending", "sleeping", "waiting"]


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

    ``clock`` defaults to a new :class:`VirtualClock` at
    :data:`~reflow_core.testing.DEFAULT_START`. ``wall_timeout`` is how long,
    in real time, a run in flight may make no progress (no step finishing, no
    back-off starting) before driving stops and reports it; ``max_backoffs``
    is how many back-offs are passed in a row (with no run left due in
    between) before a back-off that never ends is reported. Other keyword
    arguments go to :class:`~reflow_core.engine.Engine` (``concurrency``,
    ``plugins``, ...); the lease defaults to ten years of virtual time, so
    passing back-offs never lets one lapse.
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
        self._stall: Stall | None = None

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
        priority: int | None = None,
        debounce_key: str | None = None,
        debounce: Duration | None = None,
    ) -> Run:
        """Enqueue a run without driving it (it runs at the next :meth:`drive`,
        :meth:`advance`, :meth:`send_event` or :meth:`run`); the options are
        :meth:`Engine.enqueue`'s."""
        if isinstance(workflow, Workflow):
            self.register(workflow)
        return await self._engine.enqueue(
            workflow,
            input,
            idempotency_key=idempotency_key,
            priority=priority,
            debounce_key=debounce_key,
            debounce=debounce,
        )

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
        moment = not_before(moment, self.clock.now())
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
        if record.status in TERMINAL_STATUSES:
            return RunResult(run)
        driving = Driving(
            now=self.clock.now(),
            registered=self._names,
            stall=self._stall,
            ticking=self._tick is not None and not self._tick.done(),
            attempts=self._tracker.active,
            wall_timeout=self._wall_timeout,
        )
        return RunResult(run, blocked_reason(record, run, driving))

    async def result(self, run_id: str, *, advance: bool = False) -> Any:
        """Drive run ``run_id`` (as :meth:`drive`) and return its output, or
        raise :class:`~reflow_core.errors.RunFailedError`,
        :class:`~reflow_core.errors.RunCancelledError` or
        :class:`~reflow_core.testing.RunBlockedError`: :meth:`~reflow_core.engine.Engine.result`
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

    async def _advance_through(self, moment: datetime) -> Stall | None:
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

    async def _drive_due(self) -> Stall | None:
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
                self._stall = Stall("busy", count=budget.ticks, at=self.clock.now())
                return self._stall

    async def _forget_stopped(self) -> None:
        """Drop the step attempts of runs no longer running (cancelled or
        handed back mid-step), which would otherwise keep the clock from
        passing other runs' back-offs."""
        for run_id in list(self._tracker.active):
            record = await self.storage.get_run(run_id)
            if record is None or record.status != "running":
                self._tracker.active.pop(run_id, None)

    async def _await_tick(self, tick: asyncio.Task[int], budget: _Budget) -> Stall | None:
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
                    if deadline == NEVER:
                        return Stall("never", at=clock.now())
                    if budget.backoffs >= self._max_backoffs:
                        return Stall("backoff", count=budget.backoffs, at=clock.now())
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
                return Stall("wall")
        return None
