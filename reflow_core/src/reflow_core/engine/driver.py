"""Driving one claimed run: its state, its fenced writes, and how it ends.

The :class:`RunDriver` walks a claimed run's nodes in order and hands each to
the executor for its kind (:mod:`reflow_core.engine.units`). Everything that
ends a run (completing it, failing it, calling its failure handler) and every
fenced write goes through here, so the units only decide what to write.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from reflow_core import codec
from reflow_core.context import CancelSignal, ChildStarter, FailureContext, StepContext
from reflow_core.errors import (
    ConfigError,
    CorruptDataError,
    ErrorInfo,
    HookError,
    IncompatibleRunError,
    ReclaimLimitError,
    RunDeadlineError,
    SerializationError,
    StorageError,
    ValidationError,
    error_info,
)
from reflow_core.events import (
    Event,
    Observers,
    RunCompleted,
    RunFailed,
    RunReclaimed,
    RunStarted,
    RunWaiting,
)
from reflow_core.storage import ClaimedRun, Lease, RunRecord, StepRecord, Storage
from reflow_core.tracing import RunScope
from reflow_core.versions import (
    HOLD_EVENT,
    HOLD_PREFIX,
    HOLD_REASON,
    check_replay,
    remap_saved,
)
from reflow_core.workflow import RESERVED_PREFIX, Workflow, _is_async_callable

from .views import Clock, read_stored

__all__ = ["FAILURE_MARK", "WHEN_PREFIX", "Execution", "InFlight", "LeaseLost", "RunDriver"]

logger = logging.getLogger("reflow.engine")

WHEN_PREFIX = RESERVED_PREFIX + "when:"
"""A saved ``when=`` decision that was true is the step record
``reflow:when:<step>`` (a false one is the step's own ``skipped`` record)."""
FAILURE_MARK = RESERVED_PREFIX + "on_failure"
"""The step record that says a failed run's ``on_failure`` handler is owed:
saved (as ``failed``, with the run's error) before the handler is called, and
the run is ended only after it returns. A worker that dies in between leaves
the run running; whoever reclaims it calls the handler again, then ends it.
``requeue_run`` drops it with the other failed records."""

_WRITE_RETRY_PAUSES = (0.05, 0.25, 1.0)
"""Pauses between retries of a fenced write that failed with a StorageError."""


_CURRENT: Any = object()
"""``Execution.context``'s default ``prev``: the run's current one."""


def in_thread(
    executor: ThreadPoolExecutor | None, function: Callable[[Any], Any], arg: Any
) -> asyncio.Future[Any]:
    """``function(arg)`` in the worker threads, as plain ``def`` steps and
    handlers run, with the caller's context (its current step, a tracing
    plugin's span) copied to the thread."""
    call = partial(contextvars.copy_context().run, function, arg)
    return asyncio.get_running_loop().run_in_executor(executor, call)


def _nothing() -> None:
    pass


class LeaseLost(Exception):
    """Internal: a fenced write was refused; stop working on the run."""


@dataclass(slots=True)
class InFlight:
    """A run this worker holds: its lease and how to stop it."""

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


@dataclass(slots=True)
class Execution:
    """One claimed run being driven: its definition and what is known so far."""

    record: RunRecord
    lease: Lease
    state: InFlight
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
        self,
        step: str,
        attempt: int,
        signal: CancelSignal,
        *,
        in_parallel: bool = False,
        prev: Any = _CURRENT,
        children: ChildStarter | None = None,
    ) -> StepContext[Any, Any]:
        return StepContext(
            run_id=self.record.id,
            workflow=self.record.workflow,
            step=step,
            attempt=attempt,
            input=self.input,
            prev=self.prev if prev is _CURRENT else prev,
            steps=self._view,
            signal=signal,
            in_parallel=in_parallel,
            _children=children,
            _is_item=prev is not _CURRENT,
        )


class RunDriver:
    """Drives claimed runs to their next stop: the end, a sleep, a wait, or a
    lost lease. One per engine; it holds no per-run state of its own."""

    def __init__(
        self,
        *,
        storage: Storage,
        workflows: Mapping[str, Workflow[Any, Any]],
        lease: timedelta,
        max_reclaims: int,
        versions: Mapping[str, Mapping[int, Workflow[Any, Any]]] | None = None,
        clock: Clock,
        observers: Observers,
        notify_finished: Callable[[str], None],
    ) -> None:
        from .units import Units  # the units call back into the driver

        self.storage = storage
        self.workflows = workflows
        self.versions: Mapping[str, Mapping[int, Workflow[Any, Any]]] = versions or {}
        """Every registered definition, by workflow and version."""
        self.lease = lease
        self.max_reclaims = max_reclaims
        self.clock = clock
        self.observers = observers
        self.notify_finished = notify_finished
        self.wake_worker: Callable[[], None] = _nothing
        """Tells this engine's worker to claim now (set by the engine): a run
        it serves may have become claimable (a child started or ended)."""
        self.executor: ThreadPoolExecutor | None = None
        """The worker threads that run plain ``def`` steps and handlers; the
        worker creates it when it starts and shuts it down when it stops."""
        self._units = Units(self)

    # -- reporting ---------------------------------------------------------

    async def emit(self, event: Event) -> None:
        if self.observers.active:
            await self.observers.publish(event)

    async def report(self, error: BaseException, where: str) -> None:
        await self.observers.report(error, where)

    # -- the run -------------------------------------------------------------

    async def drive(self, claimed: ClaimedRun, state: InFlight) -> None:
        """Drive a claimed run to its next stop, inside the tracing plugins'
        scope for this execution."""
        record = claimed.run
        scope = RunScope(
            record.id,
            record.workflow,
            record.attempts,
            claimed.reclaimed,
            record.headers,
            record.parent_id,
        )
        with self.observers.scopes.run(scope):
            await self._drive(claimed, state)

    async def _drive(self, claimed: ClaimedRun, state: InFlight) -> None:
        record = claimed.run
        wf = self.definition(record)
        if wf is None:  # claimed only for what we serve; be safe anyway
            logger.warning(
                "run %s (workflow %r, version %d) was claimed but this worker does not serve "
                "it: handed back (the storage adapter ignored claim_runs' versions)",
                record.id,
                record.workflow,
                record.version,
            )
            await self.storage.update_run_status(record.id, "pending", lease=claimed.lease)
            return
        run = Execution(record, claimed.lease, state, wf, dict(claimed.steps))
        if claimed.reclaimed:
            await self.emit(
                RunReclaimed(record.id, record.workflow, record.attempts, record.reclaims)
            )
        owed = run.saved.get(FAILURE_MARK)
        if owed is not None:
            await self._finish_owed_failure(run, owed, claimed.reclaimed)
            return
        # The reclaim limit comes first: whatever about this run kills its
        # workers (its input included) cannot stop it from being given up.
        if claimed.reclaimed and record.reclaims > self.max_reclaims:
            error = ReclaimLimitError(record.id, record.reclaims, self.max_reclaims)
            with contextlib.suppress(CorruptDataError):  # for the failure handler
                run.input = read_stored(record.input, "input", record.id)
            await self.fail(run, error, step=None)
            return
        try:
            run.input = read_stored(record.input, "input", record.id)
            run.input = run.prev = wf.validate_input(run.input)
        except (ValidationError, CorruptDataError) as exc:
            await self.fail(run, exc, step=None)
            return
        deadline = record.deadline_at
        if deadline is not None and self.passed_at_claim(run, deadline):
            # Claimed at (or after) its deadline: delayed, sleeping or waiting
            # runs become claimable then, to be failed here.
            await self.fail(run, RunDeadlineError(deadline, run_id=record.id), step=None)
            return
        if record.fingerprint != wf.fingerprint and await self._changed_shape(run):
            return
        if record.attempts == 1:
            await self.emit(RunStarted(record.id, record.workflow, record.attempts, False))
        else:
            await self.emit(
                RunStarted(record.id, record.workflow, record.attempts, claimed.reclaimed)
            )
        timer = None if deadline is None else self._arm_deadline(run, deadline)
        current: str | None = None
        try:
            last = len(wf.steps) - 1
            for index, node in enumerate(wf.steps):
                run.last = index == last
                current = node.name
                try:
                    done = await self._units.drive(run, node)
                except CorruptDataError as exc:
                    # A saved output or payload cannot be read. No step is named,
                    # so its stored record is kept as evidence, not overwritten;
                    # the error says which value it was.
                    await self.fail(run, exc, step=None)
                    return
                if done:
                    return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if state.stop_reason != "deadline" or task is None or deadline is None:
                raise
            task.uncancel()
            late = RunDeadlineError(deadline, step=current, run_id=record.id)
            await self.fail(run, late, step=current)
            return
        finally:
            if timer is not None:
                timer.cancel()
        # Every node was already saved (a trailing one was removed from the
        # definition since): finish with the last output.
        await self.complete(run, codec.encode(run.prev), None)

    def definition(self, record: RunRecord) -> Workflow[Any, Any] | None:
        """The definition that runs ``record``: its own version's if
        registered, else the current one, unless that one leaves other
        versions to other workers (``"old_version"``) or is older than the
        run; ``None`` when this engine serves neither."""
        own = self.versions.get(record.workflow, {}).get(record.version)
        if own is not None:
            return own
        current = self.workflows.get(record.workflow)
        if current is None or record.version > current.version:
            return None
        if current.on_incompatible == "old_version" and record.version != current.version:
            return None
        return current

    async def _changed_shape(self, run: Execution) -> bool:
        """For a run started on another shape than its definition's: carry
        its records saved under earlier names (``was=``) over, check that it
        can go on where it stands, and if not apply the definition's
        ``on_incompatible``. True when the run was held or failed here."""
        wf = run.workflow
        record = run.record
        check = check_replay(wf.steps, run.saved)
        run.saved = remap_saved(wf.steps, run.saved)
        if check.outcome == "continue":
            return False
        reason = check.describe()
        policy = wf.on_incompatible
        if policy == "continue":
            logger.warning(
                "run %s of workflow %r (version %d) goes on with version %d as "
                "on_incompatible='continue' says, although %s",
                record.id,
                wf.name,
                record.version,
                wf.version,
                reason,
            )
            return False
        if policy == "fail":
            error = IncompatibleRunError(
                wf.name, record.version, wf.version, reason, run_id=record.id
            )
            await self.fail(run, error, step=None)
            return True
        hold = HOLD_PREFIX + wf.fingerprint
        released = run.saved.get(hold)
        if released is not None and released.status == "completed":
            return False
        if hold not in run.saved:
            about = {"reason": reason, "version": wf.version, "fingerprint": wf.fingerprint}
            await self.save(run, StepRecord(HOLD_REASON, "completed", output=codec.encode(about)))
        result = await self.storage.wait_run(run.lease, hold, HOLD_EVENT, None)
        self.fence(result is not None)
        assert result is not None
        if result.ready:
            taken = await self.storage.take_event(run.lease, hold, HOLD_EVENT)
            self.fence(taken is not None)
            logger.info(
                "held run %s was released: it goes on with version %d", record.id, wf.version
            )
            return False
        logger.warning(
            "run %s of workflow %r (version %d) is held: version %d cannot go on with it "
            "because %s; Engine.release() or `reflow runs release` lets it go on",
            record.id,
            wf.name,
            record.version,
            wf.version,
            reason,
        )
        await self.emit(RunWaiting(record.id, record.workflow, hold, HOLD_EVENT, None))
        return True

    def _arm_deadline(self, run: Execution, deadline: datetime) -> asyncio.TimerHandle:
        """Interrupt the run (its step's cancel signal fires, its task is
        cancelled) when ``deadline`` passes: the time left is measured from
        the claim on the storage's clock, then counted on this process's."""
        expires = run.record.lease_expires_at
        claimed_at = deadline if expires is None else expires - self.lease
        left = (deadline - claimed_at).total_seconds() - (time.monotonic() - run.state.renewed_at)
        return asyncio.get_running_loop().call_later(
            max(left, 0.0), run.state.interrupt, "deadline"
        )

    def passed_at_claim(self, run: Execution, deadline: datetime | None) -> bool:
        """Whether ``deadline`` had passed, by the storage's clock, when the
        run was claimed (the claim made the lease end at claim time + lease)."""
        expires = run.record.lease_expires_at
        if deadline is None or expires is None:
            return True
        return deadline <= expires - self.lease

    # -- fenced writes -----------------------------------------------------

    @staticmethod
    def fence(ok: bool) -> None:
        if not ok:
            raise LeaseLost

    async def fenced(self, write: Callable[[], Awaitable[bool]], run_id: str) -> None:
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
            self.fence(ok)
            return

    async def save(self, run: Execution, record: StepRecord) -> None:
        started = time.monotonic()
        await self.fenced(
            partial(self.storage.save_step_result, run.lease, record, self.lease),
            run.record.id,
        )
        run.state.renewed_at = max(run.state.renewed_at, started)

    async def wait_children(self, run: Execution, record: StepRecord) -> bool:
        """Fenced :meth:`~reflow_core.storage.Storage.wait_children`: True if
        the step's children have all ended (the run keeps its lease), False
        if the run was released until they have."""
        wait = getattr(self.storage, "wait_children", None)
        if wait is None:
            raise ConfigError(
                f"the storage {type(self.storage).__name__} does not implement child runs "
                "(start_child, wait_children, list_children)",
                option="start_child",
            )
        ready: list[bool] = []

        async def write() -> bool:
            outcome = await wait(run.lease, record)
            if outcome is None:
                return False
            ready.append(bool(outcome))
            return True

        await self.fenced(write, run.record.id)
        run.saved[record.name] = record
        return ready[-1]

    async def pass_through(self, run: Execution, record: StepRecord) -> bool:
        """Save a step that leaves ``prev`` unchanged; finish if it was the last."""
        if run.last:
            await self.complete(run, codec.encode(run.prev), record)
            return True
        await self.save(run, record)
        run.saved[record.name] = record
        return False

    # -- endings -------------------------------------------------------------

    async def complete(self, run: Execution, output: str, step: StepRecord | None) -> None:
        await self.fenced(
            partial(self.storage.finish_run, run.lease, "completed", output=output, step=step),
            run.record.id,
        )
        if self.observers.active:  # decoding the output is for the listeners
            await self.emit(RunCompleted(run.record.id, run.record.workflow, codec.decode(output)))
        self.notify_finished(run.record.id)
        if run.record.parent_id is not None:
            self.wake_worker()  # its parent may be claimable now

    async def fail(
        self,
        run: Execution,
        exc: BaseException,
        *,
        step: str | None,
        attempts: int = 1,
    ) -> None:
        """Fail the run for good. With an ``on_failure`` handler, the handler
        is called first, at least once: a durable mark (:data:`FAILURE_MARK`)
        is saved before the call and the run ends after it."""
        info = error_info(exc, step=step, attempts=attempts)
        text = codec.encode(dict(info))
        if run.workflow.failure_handler is not None:
            await self.save(run, StepRecord(FAILURE_MARK, "failed", error=text, attempts=attempts))
            await self._call_failure_handler(run, info, step, exc)
        await self._end_failed(run, info, text, step, attempts)

    async def _end_failed(
        self, run: Execution, info: ErrorInfo, text: str, step: str | None, attempts: int
    ) -> None:
        record = None if step is None else StepRecord(step, "failed", error=text, attempts=attempts)
        lease = run.lease
        await self.fenced(
            partial(self.storage.finish_run, lease, "failed", error=text, step=record),
            lease.run_id,
        )
        await self.emit(RunFailed(run.record.id, run.record.workflow, info, step))
        self.notify_finished(run.record.id)
        if run.record.parent_id is not None:
            self.wake_worker()  # its parent may be claimable now

    async def _finish_owed_failure(self, run: Execution, owed: StepRecord, reclaimed: bool) -> None:
        """A run that failed while its ``on_failure`` handler had not returned
        (its worker died or was stopped): call the handler again, then end
        the run as the first worker would have. A handler that kept killing
        its workers past ``max_reclaims`` is given up, and the run ended."""
        record = run.record
        text = owed.error or codec.encode({"code": "reflow_error", "message": "failed"})
        try:
            info: ErrorInfo = codec.decode(text)
        except SerializationError:
            info = {"code": "corrupt_data", "message": "the stored failure cannot be read"}
        step = info.get("step") if isinstance(info.get("step"), str) else None
        with contextlib.suppress(CorruptDataError):
            raw = read_stored(record.input, "input", record.id)
            try:
                run.input = run.workflow.validate_input(raw)
            except ValidationError:
                run.input = raw
        if reclaimed and record.reclaims > self.max_reclaims:
            await self.report(
                HookError(
                    f"the on_failure handler of workflow {record.workflow!r} did not return "
                    f"before its worker was lost {record.reclaims} times; it is not called again",
                    where=f"on_failure handler of workflow {record.workflow!r}",
                    run_id=record.id,
                ),
                f"on_failure handler of workflow {record.workflow!r}",
            )
        else:
            await self._call_failure_handler(run, info, step, None)
        await self._end_failed(run, info, text, step, owed.attempts)

    async def _call_failure_handler(
        self, run: Execution, info: ErrorInfo, step: str | None, exc: BaseException | None
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
                result = await in_thread(
                    self.executor, self.observers.scopes.in_thread(handler), ctx
                )
            if inspect.isawaitable(result):
                await result
        except Exception as error:
            await self.report(error, f"on_failure handler of workflow {run.record.workflow!r}")
