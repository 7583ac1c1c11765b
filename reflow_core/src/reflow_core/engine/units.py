"""One executor per kind of unit a workflow is made of: step, sleep, wait,
parallel group.

Every executor has the same contract (:class:`UnitExecutor`): given the run
and its node, it moves the run past the node and returns ``False``, or it
ends or releases the run (finished, failed, sleeping, waiting) and returns
``True``. A node already saved is skipped without running anything again.
Writes and endings go through the :class:`~reflow_core.engine.driver.RunDriver`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from reflow_core import codec
from reflow_core.codec import WaitTimedOut
from reflow_core.context import AwaitChildren, CancelSignal, CompleteRun, StepContext
from reflow_core.errors import (
    MapTooLargeError,
    ParallelCompleteError,
    ReflowError,
    SerializationError,
    StepCancelledError,
    StepError,
    StepTimeoutError,
    StorageError,
    ValidationError,
    WaitTimeoutError,
    error_info,
)
from reflow_core.events import (
    RunSleeping,
    RunWaiting,
    StepAttemptFailed,
    StepCompleted,
    StepSkipped,
    StepStarted,
)
from reflow_core.storage import CHILDREN_WAIT_PREFIX, RunRecord, StepRecord
from reflow_core.tracing import StepKind, StepScope
from reflow_core.workflow import (
    RESERVED_PREFIX,
    MapDefinition,
    Node,
    ParallelDefinition,
    SleepDefinition,
    StepDefinition,
    WaitDefinition,
)

from .children import Children, ended_children
from .driver import _CURRENT, WHEN_PREFIX, Execution, LeaseLost, in_thread
from .views import read_stored

if TYPE_CHECKING:
    from .driver import RunDriver

__all__ = [
    "MapUnit",
    "ParallelUnit",
    "SleepUnit",
    "StepUnit",
    "UnitExecutor",
    "Units",
    "WaitUnit",
]

N = TypeVar("N", contravariant=True)


class UnitExecutor(Protocol, Generic[N]):
    """Moves a run past one node of its kind, or stops it there."""

    async def drive(self, run: Execution, node: N) -> bool:
        """``False``: the run goes on to the next node. ``True``: the run was
        ended or released here (or its lease was lost)."""
        ...


class Units:
    """The executors of one driver, by kind of node."""

    def __init__(self, driver: RunDriver) -> None:
        self.step = StepUnit(driver)
        self.sleep = SleepUnit(driver)
        self.wait = WaitUnit(driver)
        self.parallel = ParallelUnit(driver, self.step)
        self.map = MapUnit(driver, self.step)

    async def drive(self, run: Execution, node: Node) -> bool:
        if isinstance(node, StepDefinition):
            return await self.step.drive(run, node)
        if isinstance(node, SleepDefinition):
            return await self.sleep.drive(run, node)
        if isinstance(node, WaitDefinition):
            return await self.wait.drive(run, node)
        if isinstance(node, MapDefinition):
            return await self.map.drive(run, node)
        return await self.parallel.drive(run, node)


class StepUnit:
    """A step: its ``when=`` decision, its attempts with retries and timeouts,
    and the save of its output (with the run's end, when it is the last)."""

    def __init__(self, driver: RunDriver) -> None:
        self.driver = driver

    async def drive(self, run: Execution, step: StepDefinition) -> bool:
        driver = self.driver
        saved = run.saved.get(step.name)
        if saved is not None and saved.status == "completed":
            run.advance(
                step.name,
                read_stored(saved.output, f"output of step {step.name!r}", run.record.id),
            )
            return False
        if saved is not None and saved.status == "skipped":
            return False
        if step.when is not None and (WHEN_PREFIX + step.name) not in run.saved:
            try:
                verdict = step.when(run.context(step.name, 1, CancelSignal()))
                if inspect.isawaitable(verdict):
                    verdict = await verdict
                go = bool(verdict)
            except Exception as exc:
                error = StepError(
                    f"the when= predicate of step {step.name!r} raised {type(exc).__name__}: {exc}",
                    step=step.name,
                )
                error.__context__ = exc  # its traceback and type are stored with the failure
                await driver.fail(run, error, step=step.name)
                return True
            if not go:
                await driver.emit(StepSkipped(run.record.id, run.record.workflow, step.name))
                return await driver.pass_through(run, StepRecord(step.name, "skipped"))
            # Decided once: saved before the step runs, so a worker that dies
            # before the step is saved does not ask the predicate again.
            decision = StepRecord(WHEN_PREFIX + step.name, "completed", output=codec.encode(True))
            await driver.save(run, decision)
            run.saved[decision.name] = decision
        # A step parked until its children ended goes on with the attempt
        # that started them: it finds the same children.
        first = saved.attempts if saved is not None and saved.status == "waiting" else 1
        try:
            outcome = await self._attempts_awaiting_children(run, step, first)
            if outcome is None:
                return True  # released until its children end
            result, attempts = outcome
            # The text to store, and what the next steps see: what a replay reads back.
            text, value = codec.encode_value(result)
        except CompleteRun as signal:
            try:
                text = codec.encode(signal.value)
            except SerializationError as exc:
                await driver.fail(run, exc, step=step.name)
                return True
            record = StepRecord(step.name, "completed", output=text, attempts=signal.attempts)
            await driver.emit(
                StepCompleted(
                    run.record.id, run.record.workflow, step.name, signal.value, signal.attempts
                )
            )
            await driver.complete(run, text, record)
            return True
        except StepError as exc:
            await driver.fail(run, exc, step=step.name, attempts=exc.attempts)
            return True
        except SerializationError as exc:
            await driver.fail(run, exc, step=step.name)
            return True
        record = StepRecord(step.name, "completed", output=text, attempts=attempts)
        if driver.observers.wants(StepCompleted):
            await driver.emit(
                StepCompleted(run.record.id, run.record.workflow, step.name, value, attempts)
            )
        if run.last:
            await driver.complete(run, text, record)
            return True
        await driver.save(run, record)
        run.advance(step.name, value)
        return False

    async def _attempts_awaiting_children(
        self, run: Execution, step: StepDefinition, first: int
    ) -> tuple[Any, int] | None:
        """:meth:`attempts`, parking the run when the handler awaits a child
        that has not ended (``None``: the run was released until the step's
        children have all ended); if they all have by then, the same attempt
        is run again at once."""
        driver = self.driver
        resumed = run.saved.get(step.name)
        waited = resumed is not None and resumed.status == "waiting"
        while True:
            ended = await ended_children(driver, run, step.name) if waited else None
            try:
                return await self.attempts(run, step, first=first, ended=ended)
            except AwaitChildren as pause:
                first = pause.attempt
                record = StepRecord(step.name, "waiting", attempts=first)
                if await driver.wait_children(run, record):
                    waited = True
                    continue
                record_ = run.record
                await driver.emit(
                    RunWaiting(
                        record_.id,
                        record_.workflow,
                        step.name,
                        CHILDREN_WAIT_PREFIX + step.name,
                        None,
                    )
                )
                return None

    async def attempts(
        self,
        run: Execution,
        step: StepDefinition,
        *,
        in_parallel: bool = False,
        prev: Any = _CURRENT,
        first: int = 1,
        ended: Mapping[str, RunRecord] | None = None,
    ) -> tuple[Any, int]:
        """Run the step's handler until it succeeds or its retry policy gives
        up; returns its result and the number of attempts. ``prev`` is the
        handler's ``ctx.prev`` (default: the run's); ``first`` the number of
        the first attempt (a step resumed after waiting for its children)."""
        attempt = first - 1
        state = run.state
        while True:
            attempt += 1
            signal = CancelSignal()
            state.signals.add(signal)
            if state.stop_reason is not None:
                signal._fire(state.stop_reason)
            children = (
                None if in_parallel else Children(self.driver, run, step.name, attempt, ended)
            )
            ctx = run.context(
                step.name, attempt, signal, in_parallel=in_parallel, prev=prev, children=children
            )
            if self.driver.observers.wants(StepStarted):
                await self.driver.emit(
                    StepStarted(run.record.id, run.record.workflow, step.name, attempt)
                )
            kind: StepKind = "step" if not in_parallel else "branch" if prev is _CURRENT else "item"
            scope = StepScope(run.record.id, run.record.workflow, step.name, attempt, kind)
            try:
                with self.driver.observers.scopes.step(scope):
                    result = await self._invoke(step, ctx, signal)
                return result, attempt
            except CompleteRun as done:
                done.attempts = attempt
                raise
            except AwaitChildren as pause:
                pause.attempt = attempt
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
            retry = step.retry
            delay = (
                retry.delay(attempt)
                if attempt < retry.max_attempts and retry.retries(error)
                else None
            )
            await self._attempt_failed(run, step.name, attempt, error, delay)
            if delay is None:
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
            await self.driver.clock.sleep(delay)

    async def _attempt_failed(
        self, run: Execution, step: str, attempt: int, error: BaseException, delay: float | None
    ) -> None:
        if self.driver.observers.active:  # describing the error costs a traceback
            info = error_info(error, step=step, attempts=attempt)
            await self.driver.emit(
                StepAttemptFailed(run.record.id, run.record.workflow, step, attempt, info, delay)
            )

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
        assert self.driver.executor is not None
        handler = self.driver.observers.scopes.in_thread(step.handler)
        future = in_thread(self.driver.executor, handler, ctx)
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


class SleepUnit:
    """A durable sleep: the run is released until its wake-up time."""

    def __init__(self, driver: RunDriver) -> None:
        self.driver = driver

    async def drive(self, run: Execution, sleep: SleepDefinition) -> bool:
        driver = self.driver
        saved = run.saved.get(sleep.name)
        if saved is not None and saved.status == "completed":
            return False
        if (
            saved is not None
            and saved.status == "sleeping"
            and driver.passed_at_claim(run, saved.wake_at)
        ):
            await driver.emit(
                StepCompleted(run.record.id, run.record.workflow, sleep.name, None, 1)
            )
            return await driver.pass_through(run, StepRecord(sleep.name, "completed"))
        # First reached, or claimed before the wake-up time (a resumed run):
        # sleep_run keeps a wake-up time fixed earlier.
        wake_at = await driver.storage.sleep_run(
            run.lease, sleep.name, timedelta(seconds=sleep.seconds)
        )
        driver.fence(wake_at is not None)
        assert wake_at is not None
        await driver.emit(RunSleeping(run.record.id, run.record.workflow, sleep.name, wake_at))
        return True  # released; any engine resumes it once due


class WaitUnit:
    """A wait for an external event: released until the event or the timeout."""

    def __init__(self, driver: RunDriver) -> None:
        self.driver = driver

    async def _released(
        self, run: Execution, wait: WaitDefinition, deadline: datetime | None
    ) -> bool:
        """Say the run waits (it is released until the event or the deadline)."""
        record = run.record
        await self.driver.emit(
            RunWaiting(record.id, record.workflow, wait.name, wait.name, deadline)
        )
        return True

    async def drive(self, run: Execution, wait: WaitDefinition) -> bool:
        driver = self.driver
        storage = driver.storage
        saved = run.saved.get(wait.name)
        if saved is None or saved.status != "completed":
            if saved is None or saved.status != "waiting":
                timeout = None if wait.timeout is None else timedelta(seconds=wait.timeout)
                result = await storage.wait_run(run.lease, wait.name, wait.name, timeout)
                driver.fence(result is not None)
                assert result is not None
                if not result.ready:
                    return await self._released(run, wait, result.deadline)
            taken = await storage.take_event(run.lease, wait.name, wait.name)
            driver.fence(taken is not None)
            assert taken is not None
            if not taken.found:
                deadline = saved.wake_at if saved is not None else None
                if deadline is None or not driver.passed_at_claim(run, deadline):
                    # Woken without an event before any deadline (a resumed
                    # run): wait again; wait_run keeps the deadline.
                    result = await storage.wait_run(run.lease, wait.name, wait.name, None)
                    driver.fence(result is not None)
                    assert result is not None
                    if result.ready:  # an event came in meanwhile: take it now
                        return await self.drive(run, wait)
                    return await self._released(run, wait, result.deadline)
                if not wait.continue_on_timeout:
                    await driver.fail(
                        run, WaitTimeoutError(wait.name, run_id=run.record.id), step=wait.name
                    )
                    return True
                return await self._timed_out(run, wait, deadline)
            payload_text = taken.payload
        else:
            payload_text = saved.output
        raw = read_stored(payload_text, f"payload of event {wait.name!r}", run.record.id)
        if isinstance(raw, WaitTimedOut):  # a timeout saved as the wait's result: go on
            run.advance(wait.name, raw)
            return await self._go_on(run, raw)
        try:
            value = wait.validate(run.record.workflow, raw)
        except ValidationError as exc:
            await driver.fail(run, exc, step=wait.name)
            return True
        if saved is None or saved.status != "completed":
            await driver.emit(StepCompleted(run.record.id, run.record.workflow, wait.name, raw, 1))
        run.advance(wait.name, value)
        return await self._go_on(run, raw)

    async def _go_on(self, run: Execution, raw: Any) -> bool:
        """After the wait's value is known: finish a run that ends here."""
        if run.last:
            await self.driver.complete(run, codec.encode(raw), None)
            return True
        return False

    async def _timed_out(self, run: Execution, wait: WaitDefinition, deadline: datetime) -> bool:
        """The timeout of a wait that goes on: save the marker as its result."""
        marker = WaitTimedOut(wait.name, deadline)
        text = codec.encode(marker)
        record = StepRecord(name=wait.name, status="completed", output=text)
        completed = StepCompleted(run.record.id, run.record.workflow, wait.name, marker, 1)
        if run.last:
            await self.driver.emit(completed)
            await self.driver.complete(run, text, record)
            return True
        await self.driver.save(run, record)
        await self.driver.emit(completed)
        run.advance(wait.name, marker)
        return False


class ParallelUnit:
    """A parallel group: every unsaved branch at once, each saved as it ends;
    the first failure cancels its siblings and fails the run."""

    def __init__(self, driver: RunDriver, steps: StepUnit) -> None:
        self.driver = driver
        self.steps = steps

    async def drive(self, run: Execution, group: ParallelDefinition) -> bool:
        driver = self.driver
        outputs: dict[str, Any] = {}
        todo: list[StepDefinition] = []
        for branch in group.branches:
            saved = run.saved.get(branch.name)
            if saved is not None and saved.status == "completed":
                outputs[branch.name] = read_stored(
                    saved.output, f"output of step {branch.name!r}", run.record.id
                )
            else:
                todo.append(branch)
        tasks = {
            asyncio.create_task(
                self._branch(run, branch), name=f"reflow-branch-{branch.name}"
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
            for task in tasks:
                if not task.cancelled():
                    # A branch that failed as its siblings were being
                    # stopped: retrieved, so asyncio does not log it as lost.
                    task.exception()
        if failure is not None:
            branch, exc = failure
            if isinstance(exc, LeaseLost | asyncio.CancelledError | StorageError):
                raise exc  # as for a plain step: the run is reclaimed, not failed
            if isinstance(exc, StepError):
                await driver.fail(run, exc, step=branch.name, attempts=exc.attempts)
            elif isinstance(exc, ReflowError):
                await driver.fail(run, exc, step=branch.name)
            else:
                raise exc
            return True
        value = {b.name: outputs[b.name] for b in group.branches}
        for name, output in value.items():
            run.outputs[name] = output
        run.prev = value
        if run.last:
            await driver.complete(run, codec.encode(value), None)
            return True
        return False

    async def _branch(self, run: Execution, branch: StepDefinition) -> Any:
        try:
            result, attempts = await self.steps.attempts(run, branch, in_parallel=True)
        except CompleteRun:  # complete() in a branch raises before this; be safe
            raise ParallelCompleteError(branch.name) from None
        text = codec.encode(result)
        record = StepRecord(branch.name, "completed", output=text, attempts=attempts)
        await self.driver.save(run, record)
        value = codec.decode(text)
        await self.driver.emit(
            StepCompleted(run.record.id, run.record.workflow, branch.name, value, attempts)
        )
        return value


MAP_ITEMS_PREFIX = RESERVED_PREFIX + "map:"
"""The engine's record of a map's items (``reflow:map:<name>``), saved before
the first item runs so that every replay works on the same list."""


class MapUnit:
    """A fan-out: the items saved once, then each unsaved item run (at most
    ``concurrency`` at once) and saved as its own step ``name[i]`` as it
    ends; the first item to fail for good cancels the rest and fails the run."""

    def __init__(self, driver: RunDriver, steps: StepUnit) -> None:
        self.driver = driver
        self.steps = steps

    async def drive(self, run: Execution, node: MapDefinition) -> bool:
        items = await self._items(run, node)
        if items is None:
            return True
        outputs: dict[int, Any] = {}
        todo: list[int] = []
        for index in range(len(items)):
            name = node.item_name(index)
            saved = run.saved.get(name)
            if saved is not None and saved.status == "completed":
                outputs[index] = read_stored(
                    saved.output, f"output of step {name!r}", run.record.id
                )
            else:
                todo.append(index)
        queue = iter(todo)
        failure: list[tuple[int, BaseException]] = []

        async def worker() -> None:
            for index in queue:  # shared: each item is taken by one worker
                if failure:
                    return
                try:
                    outputs[index] = await self._item(run, node, index, items[index])
                except BaseException as exc:
                    failure.append((index, exc))
                    raise

        workers = [
            asyncio.create_task(worker(), name=f"reflow-map-{node.name}-{n}")
            for n in range(min(node.concurrency, len(todo)))
        ]
        try:
            if workers:
                await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            unfinished = [task for task in workers if not task.done()]
            if unfinished:
                for signal in list(run.state.signals):
                    signal._fire("cancelled")
            for task in unfinished:
                task.cancel()
            if workers:
                await asyncio.wait(workers)
            for task in workers:
                if not task.cancelled():
                    # Retrieved, so asyncio does not log it as lost: every
                    # failure is in ``failure``, and the first is acted on below.
                    task.exception()
        if failure:
            index, exc = failure[0]
            name = node.item_name(index)
            if isinstance(exc, LeaseLost | asyncio.CancelledError | StorageError):
                raise exc  # as for a plain step: the run is reclaimed, not failed
            if isinstance(exc, StepError):
                await self.driver.fail(run, exc, step=name, attempts=exc.attempts)
            elif isinstance(exc, ReflowError):
                await self.driver.fail(run, exc, step=name)
            else:
                raise exc
            return True
        value = [outputs[index] for index in range(len(items))]
        run.advance(node.name, value)
        if run.last:
            await self.driver.complete(run, codec.encode(value), None)
            return True
        return False

    async def _items(self, run: Execution, node: MapDefinition) -> list[Any] | None:
        """The map's items: as saved, or computed, checked and saved now;
        ``None`` if that failed the run."""
        record = MAP_ITEMS_PREFIX + node.name
        saved = run.saved.get(record)
        if saved is not None and saved.status == "completed":
            stored = read_stored(saved.output, f"items of map {node.name!r}", run.record.id)
            return list(stored)
        signal = CancelSignal()
        try:
            produced = node.items(run.context(node.name, 1, signal))
            if inspect.isawaitable(produced):
                produced = await produced
            if isinstance(produced, str | bytes | dict) or not hasattr(produced, "__iter__"):
                raise TypeError(
                    f"items must return a list (or another iterable) of items, "
                    f"not {type(produced).__name__}"
                )
            items = list(produced)
            if len(items) > node.max_items:
                raise MapTooLargeError(node.name, len(items), node.max_items, run_id=run.record.id)
            text = codec.encode(items)
        except ReflowError as exc:
            await self.driver.fail(run, exc, step=node.name)
            return None
        except Exception as exc:
            error = StepError(
                f"map {node.name!r}: items raised {type(exc).__name__}: {exc}",
                step=node.name,
                run_id=run.record.id,
                error_type=type(exc).__qualname__,
            )
            error.__cause__ = exc
            await self.driver.fail(run, error, step=node.name)
            return None
        await self.driver.save(run, StepRecord(record, "completed", output=text))
        return list(codec.decode(text))

    async def _item(self, run: Execution, node: MapDefinition, index: int, item: Any) -> Any:
        step = dataclasses.replace(node.item, name=node.item_name(index))
        try:
            result, attempts = await self.steps.attempts(run, step, in_parallel=True, prev=item)
        except CompleteRun:  # complete() in an item raises before this; be safe
            raise ParallelCompleteError(step.name) from None
        text = codec.encode(result)
        await self.driver.save(
            run, StepRecord(step.name, "completed", output=text, attempts=attempts)
        )
        value = codec.decode(text)
        await self.driver.emit(
            StepCompleted(run.record.id, run.record.workflow, step.name, value, attempts)
        )
        return value
