"""Lifecycle events: what :meth:`Engine.stream` yields and the hooks receive.

Every event is a frozen dataclass with the run's id and workflow name. An
engine publishes each one to its lifecycle hooks (plugins, see
:mod:`reflow_core.hookspecs`), in pluggy's call order (the plugin registered
last first, ``tryfirst``/``trylast`` honoured), then to every open stream. A
failing hook never affects a run: the failure goes to the ``reflow_error``
hook (and to the ``reflow.engine`` logger).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypeAlias

import pluggy

from . import hookspecs
from ._tasks import cancel_and_wait
from .errors import ConfigError, ErrorInfo, HookError
from .tracing import Scopes, TracingSpecs

__all__ = [
    "Event",
    "RunCancelled",
    "RunCompleted",
    "RunFailed",
    "RunReclaimed",
    "RunSleeping",
    "RunStarted",
    "RunWaiting",
    "StepAttemptFailed",
    "StepCompleted",
    "StepSkipped",
    "StepStarted",
]

logger = logging.getLogger("reflow.engine")


@dataclass(frozen=True, slots=True)
class RunStarted:
    """A worker claimed the run and starts (or resumes) its steps."""

    hook: ClassVar[str] = "reflow_run_started"
    run_id: str
    workflow: str
    attempt: int
    """How many times the run has been claimed, this time included."""
    reclaimed: bool
    """True if the previous worker's lease lapsed (it crashed or hung)."""


@dataclass(frozen=True, slots=True)
class StepStarted:
    """An attempt of a step (or parallel branch) starts."""

    hook: ClassVar[str] = "reflow_step_started"
    run_id: str
    workflow: str
    step: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StepCompleted:
    """A step's output was produced (and is being saved with the run)."""

    hook: ClassVar[str] = "reflow_step_completed"
    run_id: str
    workflow: str
    step: str
    output: Any
    attempts: int


@dataclass(frozen=True, slots=True)
class StepAttemptFailed:
    """An attempt of a step (or parallel branch) raised.

    ``error`` is the failure as it would be stored (``code``, ``type``,
    ``message``, ``traceback``, ``causes``). ``retry_in`` is the delay in
    seconds before the next attempt, or ``None`` when the step gives up:
    its attempts are used up, or the error is not retried (see
    :class:`~reflow_core.retry.Retry`). A ``RunFailed`` follows then.
    """

    hook: ClassVar[str] = "reflow_step_attempt_failed"
    run_id: str
    workflow: str
    step: str
    attempt: int
    error: ErrorInfo
    retry_in: float | None


@dataclass(frozen=True, slots=True)
class StepSkipped:
    """A step's ``when=`` predicate was false; the skip is saved."""

    hook: ClassVar[str] = "reflow_step_skipped"
    run_id: str
    workflow: str
    step: str


@dataclass(frozen=True, slots=True)
class RunCompleted:
    """The run finished with an output."""

    hook: ClassVar[str] = "reflow_run_completed"
    run_id: str
    workflow: str
    output: Any


@dataclass(frozen=True, slots=True)
class RunFailed:
    """The run failed for good."""

    hook: ClassVar[str] = "reflow_run_failed"
    run_id: str
    workflow: str
    error: ErrorInfo
    step: str | None


@dataclass(frozen=True, slots=True)
class RunReclaimed:
    """A worker claimed a run whose previous worker's lease had lapsed (it
    crashed, hung or was cut off); the run resumes at its first unsaved
    step, or fails once ``reclaims`` passes ``Engine(max_reclaims=...)``."""

    hook: ClassVar[str] = "reflow_run_reclaimed"
    run_id: str
    workflow: str
    attempt: int
    """How many times the run has been claimed, this time included."""
    reclaims: int
    """How many times its lease has lapsed so far."""


@dataclass(frozen=True, slots=True)
class RunSleeping:
    """The run reached a durable sleep and was released until ``wake_at``."""

    hook: ClassVar[str] = "reflow_run_sleeping"
    run_id: str
    workflow: str
    step: str
    wake_at: datetime


@dataclass(frozen=True, slots=True)
class RunWaiting:
    """The run reached a wait with no event buffered for it and was
    released until the event ``event`` arrives, or ``deadline`` passes
    (``None``: no timeout); or a step awaits child runs that have not all
    ended, and the run was released until they have (``event`` is then
    :data:`~reflow_core.storage.CHILDREN_WAIT_PREFIX` and the step, and
    ``deadline`` ``None``)."""

    hook: ClassVar[str] = "reflow_run_waiting"
    run_id: str
    workflow: str
    step: str
    event: str
    deadline: datetime | None


@dataclass(frozen=True, slots=True)
class RunCancelled:
    """The run was cancelled by :meth:`Engine.cancel` on this engine."""

    hook: ClassVar[str] = "reflow_run_cancelled"
    run_id: str
    workflow: str


Event: TypeAlias = (
    RunStarted
    | RunReclaimed
    | StepStarted
    | StepAttemptFailed
    | StepCompleted
    | StepSkipped
    | RunSleeping
    | RunWaiting
    | RunCompleted
    | RunFailed
    | RunCancelled
)
"""Any lifecycle event."""


ErrorCallback: TypeAlias = Callable[[HookError], "Awaitable[None] | None"]
"""``Engine(on_error=...)``: called with every :class:`HookError`."""


class _Subscription:
    __slots__ = ("closed", "consumer", "queue", "wakeup")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue(size)
        self.closed = False
        self.wakeup = asyncio.Event()
        self.consumer: asyncio.Task[Any] | None = None
        """The task that last read from the stream."""


class Observers:
    """An engine's lifecycle plugins and open streams."""

    def __init__(self, on_error: ErrorCallback | None = None) -> None:
        self.on_error = on_error
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs.LifecycleSpecs)
        self.pm.add_hookspecs(TracingSpecs)
        self.scopes = Scopes(self.pm)
        """The tracing hooks: headers at creation, scopes around runs and steps."""
        self._streams: list[_Subscription] = []
        self._hooked: set[str] = set()

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object or module implementing lifecycle hooks."""
        if self.pm.is_registered(plugin):
            return
        try:
            # register() refuses an implementation whose arguments the spec
            # lacks; check_pending() one whose name matches no spec.
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise ConfigError(f"plugin {name or plugin!r} is invalid: {exc}") from exc
        self._hooked = {
            name for name in _EVENT_HOOKS if getattr(self.pm.hook, name).get_hookimpls()
        }
        self.scopes.refresh()

    @property
    def active(self) -> bool:
        """Whether anyone listens: a lifecycle hook implementation or a stream."""
        return bool(self._streams) or bool(self._hooked)

    def wants(self, kind: type[Event]) -> bool:
        """Whether anyone listens for events of ``kind``: lets the engine skip
        building the per-step events no plugin or stream would see."""
        return bool(self._streams) or kind.hook in self._hooked

    async def _call(self, name: str, kwargs: dict[str, Any]) -> list[BaseException]:
        failures: list[BaseException] = []
        caller = getattr(self.pm.hook, name)
        # pluggy's own call order (last registered first), each awaited
        # before the next starts; one failing never stops the others.
        for impl in reversed(caller.get_hookimpls()):
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                label = getattr(impl.plugin, "__name__", None) or type(impl.plugin).__qualname__
                exc.add_note(f"in {name} of plugin {impl.plugin_name} ({label})")
                failures.append(exc)
        return failures

    async def publish(self, event: Event) -> None:
        """Call the event's hook on every plugin, then feed every stream (a
        full bounded stream makes this wait: backpressure)."""
        if event.hook in self._hooked:
            for failure in await self._call(event.hook, {"event": event}):
                await self.report(failure, f"{event.hook} hook", run_id=event.run_id)
        for sub in list(self._streams):
            if not sub.closed:
                await self._put(sub, event)

    async def _put(self, sub: _Subscription, event: Event) -> None:
        """Put ``event`` on a stream, waiting for room while its consumer
        lives. A consumer task that raised without closing the stream would
        hold the engine back for good: the stream is closed and the
        exception reported as a :class:`HookError`. (A task that only read
        and returned, such as ``asyncio.wait_for(anext(stream), ...)``, is a
        reader like any other, not a consumer that went away.)"""
        while not sub.closed:
            if not sub.queue.full():
                sub.queue.put_nowait(event)
                sub.wakeup.set()
                return
            consumer = sub.consumer
            if consumer is not None and consumer.done() and _raised(consumer) is not None:
                self._unsubscribe(sub)
                original = _raised(consumer)
                await self.report(
                    HookError(
                        f"a stream's consumer raised {type(original).__name__}: {original} "
                        "without closing the stream; it was closed so that the engine does "
                        "not wait on it",
                        where="stream consumer",
                        original=original,
                        run_id=event.run_id,
                    ),
                    "stream consumer",
                )
                return
            put = asyncio.ensure_future(sub.queue.put(event))
            if consumer is None or consumer.done():
                await put  # plain backpressure until the next read
            else:
                await asyncio.wait({put, consumer}, return_when=asyncio.FIRST_COMPLETED)
                if not put.done():
                    await cancel_and_wait(put)
            if put.done() and not put.cancelled():
                sub.wakeup.set()
                return

    async def report(self, error: BaseException, where: str, *, run_id: str | None = None) -> None:
        """Report an error that must not affect runs: log it, then hand it to
        ``on_error`` (as a :class:`HookError`) and the ``reflow_error`` hook
        (the original exception, with a note naming the plugin)."""
        logger.error("%s failed: %s: %s", where, type(error).__name__, error)
        if isinstance(error, HookError):
            wrapped, original = error, (error.original or error)
        else:
            wrapped = HookError(
                f"{where} raised {type(error).__name__}: {error}",
                where=where,
                original=error,
                run_id=run_id,
            )
            original = error
        if self.on_error is not None:
            try:
                result = self.on_error(wrapped)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                logger.error("on_error failed: %s: %s", type(exc).__name__, exc)
        for failure in await self._call("reflow_error", {"error": original, "where": where}):
            logger.error("reflow_error hook failed: %s: %s", type(failure).__name__, failure)

    def stream(self, buffer_size: int | None) -> AsyncIterator[Event]:
        """Subscribe now, so no event is missed before the first read, and
        return the iterator. It unsubscribes when it ends or is closed, or
        when it is dropped, read or not."""
        if buffer_size is not None and buffer_size < 1:
            raise ConfigError(
                f"buffer_size must be at least 1, got {buffer_size}", option="buffer_size"
            )
        sub = _Subscription(buffer_size or 0)
        self._streams.append(sub)
        events = self._iterate(sub)
        weakref.finalize(events, self._unsubscribe, sub)
        return events

    async def _iterate(self, sub: _Subscription) -> AsyncIterator[Event]:
        try:
            while True:
                sub.consumer = asyncio.current_task()
                if not sub.queue.empty():
                    yield sub.queue.get_nowait()  # type: ignore[misc]
                    continue
                if sub.closed:
                    return
                sub.wakeup.clear()
                await sub.wakeup.wait()
        finally:
            self._unsubscribe(sub)

    def _unsubscribe(self, sub: _Subscription) -> None:
        sub.closed = True
        if sub in self._streams:
            self._streams.remove(sub)
        while not sub.queue.empty():  # release a publisher blocked on a full buffer
            sub.queue.get_nowait()

    def close_streams(self) -> None:
        """End every open stream after the events already buffered."""
        for sub in self._streams:
            sub.closed = True
            sub.wakeup.set()


def _raised(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception a finished task raised (``None`` if it returned or was cancelled)."""
    return None if task.cancelled() else task.exception()


_EVENT_HOOKS = (
    "reflow_run_started",
    "reflow_run_reclaimed",
    "reflow_step_started",
    "reflow_step_attempt_failed",
    "reflow_step_completed",
    "reflow_step_skipped",
    "reflow_run_sleeping",
    "reflow_run_waiting",
    "reflow_run_completed",
    "reflow_run_failed",
    "reflow_run_cancelled",
)
