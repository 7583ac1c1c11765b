"""Every error Reflow raises, under one root.

Each class carries a stable ``code`` string (safe to match on, log and store)
and structured fields for the details. The tree::

    ReflowError
    ├── ConfigError                  invalid engine, workflow or backend configuration
    │   └── DuplicateStepError       two steps of one workflow share a name
    ├── ValidationError              workflow input rejected by its validator
    ├── SerializationError           a value is not plain data (names the path)
    ├── WorkflowNotFoundError        no workflow registered under that name
    ├── EventNotDeclaredError        send_event names an event the workflow does not wait for
    ├── ParallelCompleteError        ctx.complete() called inside a parallel branch
    ├── RunNotFoundError             no run with that id
    ├── ResultTimeoutError           ``Engine.result`` gave up waiting (also a ``TimeoutError``)
    ├── EngineClosedError            a call on an engine that was closed
    ├── IdempotencyConflictError     same key, different input
    ├── EventBufferFullError         a run already holds as many unconsumed events as allowed
    ├── LeaseExpiredError            a worker lost its lease on a run
    ├── StepCancelledError           raised inside a step by ``ctx.signal.raise_if_cancelled()``
    ├── NonRetryableError            raised by a step to fail at once, without retries
    ├── RemoteTraceback              a stored traceback, chained to ``RunFailedError``
    ├── StorageError                 the backend failed; the driver error is ``__cause__``
    │   ├── BackendNotFoundError     no backend installed for a URL scheme
    │   └── SchemaVersionError       the database was written by a newer Reflow
    └── RunError                     a run ended without a result
        ├── StepError                a step failed for good (``step``, ``attempts``)
        │   └── StepTimeoutError     an attempt ran past its timeout
        ├── WaitTimeoutError         no event arrived before a wait's timeout
        ├── RunDeadlineError         the run had not finished by its deadline
        ├── MapTooLargeError         a map got more items than its max_items
        ├── ReclaimLimitError        the run kept losing its worker and was given up
        ├── CorruptDataError         a stored value of the run cannot be read back
        ├── RunFailedError           raised by ``Engine.result`` for a failed run
        └── RunCancelledError        raised by ``Engine.result`` for a cancelled run

Errors that describe a stored run (``RunError`` and subclasses) can be turned
into the plain ``ErrorInfo`` mapping that storage keeps, and back. For an
exception raised by a step, the mapping keeps its formatted traceback
(without Reflow's own frames, bounded in size) and its cause chain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import traceback as _traceback
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, TypedDict

__all__ = [
    "MAX_CAUSES",
    "MAX_TRACEBACK_CHARS",
    "MAX_TRACEBACK_FRAMES",
    "BackendNotFoundError",
    "CauseInfo",
    "ChildFailedError",
    "ConfigError",
    "CorruptDataError",
    "DuplicateStepError",
    "EngineClosedError",
    "ErrorInfo",
    "EventBufferFullError",
    "EventNotDeclaredError",
    "HookError",
    "IdempotencyConflictError",
    "IncompatibleRunError",
    "LeaseExpiredError",
    "MapTooLargeError",
    "NonRetryableError",
    "ParallelCompleteError",
    "ReclaimLimitError",
    "ReflowError",
    "RemoteTraceback",
    "ResultTimeoutError",
    "RunCancelledError",
    "RunDeadlineError",
    "RunError",
    "RunFailedError",
    "RunNotFoundError",
    "SchemaVersionError",
    "SerializationError",
    "StepCancelledError",
    "StepError",
    "StepTimeoutError",
    "StorageError",
    "ValidationError",
    "WaitTimeoutError",
    "WorkflowNotFoundError",
]


MAX_TRACEBACK_CHARS = 8192
"""The longest stored traceback; a longer one keeps its end (the exception
and the frames nearest to it) after a line saying how much was left out."""
MAX_TRACEBACK_FRAMES = 40
"""Frames kept per exception of a stored traceback: the innermost ones."""
MAX_CAUSES = 5
"""Links of a cause chain (``__cause__``/``__context__``) that are stored."""
_MAX_CAUSE_MESSAGE = 1000

_ENGINE_DIRS = tuple(
    os.path.dirname(path) + os.sep
    for path in (
        os.path.join(os.path.dirname(__file__), "engine", "__init__.py"),
        asyncio.__file__,
        concurrent.futures.__file__,
    )
)
"""Where the frames that call a step come from: Reflow's engine, asyncio and
the thread pool. Leading frames from these are left out of stored tracebacks."""


class CauseInfo(TypedDict):
    """One link of a failure's cause chain: ``type`` is the qualified class
    name, ``message`` the exception's text."""

    type: str
    message: str


class ErrorInfo(TypedDict, total=False):
    """The plain-data form of a run's failure, as storage keeps it.

    ``code`` is the ``ReflowError.code`` of the error (``"step_failed"`` for an
    exception raised by user code), ``type`` the qualified class name of the
    original exception, ``message`` its text, ``step`` the step it came from.

    For an exception that was raised (not only created), ``traceback`` is its
    formatted traceback as Python prints it, from the step handler's frame
    on (the engine's frames that call a step are left out), at most
    :data:`MAX_TRACEBACK_FRAMES` frames per exception and
    :data:`MAX_TRACEBACK_CHARS` characters in all; ``causes`` its cause
    chain (``raise ... from ...`` and exceptions raised while handling
    another), nearest first, at most :data:`MAX_CAUSES` links. Neither holds
    local variables: only source lines and what the exceptions say. Records
    stored before these fields existed lack them.
    """

    code: str
    type: str
    message: str
    step: str | None
    attempts: int
    traceback: str
    causes: list[CauseInfo]


class ReflowError(Exception):
    """Root of every error Reflow raises.

    ``code`` is stable across releases; match on it (or on the class), never on
    the message.
    """

    code: ClassVar[str] = "reflow_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ReflowError, ValueError):
    """Configuration that can never work: zero concurrency, a negative lease,
    a heartbeat not shorter than the lease, an unparseable duration."""

    code = "config_error"

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class DuplicateStepError(ConfigError):
    """A workflow definition names the same step twice."""

    code = "duplicate_step"

    def __init__(self, workflow: str, step: str) -> None:
        super().__init__(f"workflow {workflow!r} already has a step named {step!r}", option="name")
        self.workflow = workflow
        self.step = step


class ValidationError(ReflowError, ValueError):
    """Workflow input (or an event payload) was rejected by its validator.

    ``issues`` holds the validator's own findings: for pydantic, the list from
    ``errors()``; for other validators, one entry with the message. Nothing was
    written when this is raised.
    """

    code = "validation_error"

    def __init__(
        self,
        message: str,
        *,
        workflow: str | None = None,
        issues: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(message)
        self.workflow = workflow
        self.issues: list[Mapping[str, Any]] = list(issues)


class SerializationError(ReflowError, TypeError):
    """A value is not plain data and cannot be stored.

    ``path`` locates the offending value in JSONPath style, for example
    ``$.items[3].price``.
    """

    code = "serialization_error"

    def __init__(self, message: str, *, path: str = "$") -> None:
        super().__init__(f"{message} at {path}")
        self.path = path
        self.reason = message


class WorkflowNotFoundError(ReflowError, LookupError):
    """No workflow with this name is registered on the engine."""

    code = "workflow_not_found"

    def __init__(self, workflow: str, known: Sequence[str] = ()) -> None:
        hint = f"; registered: {', '.join(sorted(known))}" if known else "; none are registered"
        super().__init__(f"no workflow named {workflow!r}{hint}")
        self.workflow = workflow


class EventNotDeclaredError(ReflowError, LookupError):
    """``send_event`` named an event the run's workflow never waits for."""

    code = "event_not_declared"

    def __init__(self, workflow: str, event: str, declared: Sequence[str]) -> None:
        listing = ", ".join(repr(name) for name in declared) or "none"
        super().__init__(
            f"workflow {workflow!r} does not wait for an event named {event!r} "
            f"(it waits for: {listing})"
        )
        self.workflow = workflow
        self.event = event


class ParallelCompleteError(ReflowError):
    """``ctx.complete()`` was called inside a parallel branch, where finishing
    the whole run early has no single meaning. The run fails with this error."""

    code = "parallel_complete"

    def __init__(self, branch: str) -> None:
        super().__init__(
            f"ctx.complete() was called in parallel branch {branch!r}; "
            "complete a run from a plain step instead"
        )
        self.branch = branch


class RunNotFoundError(ReflowError, LookupError):
    """No run with this id exists in the storage."""

    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}")
        self.run_id = run_id


class ResultTimeoutError(ReflowError, TimeoutError):
    """``Engine.result(timeout=...)`` stopped waiting before the run finished.

    Also a ``TimeoutError``, so ``except TimeoutError`` catches it. The run
    itself goes on. ``status`` is the run's status read when the wait ended
    (``None`` if it could not be read), ``workflow`` its workflow and
    ``timeout`` the wait in seconds; the message says why a ``pending`` run
    was not picked up, as far as the engine can tell.
    """

    code = "result_timeout"

    def __init__(
        self,
        run_id: str,
        timeout: float,
        *,
        workflow: str | None = None,
        status: str | None = None,
        detail: str | None = None,
    ) -> None:
        of = f" of workflow {workflow!r}" if workflow else ""
        if status is None:
            head = f"run {run_id}{of} did not finish within {timeout:g}s"
        else:
            head = f"run {run_id}{of} is still {status} after {timeout:g}s"
        super().__init__(f"{head}: {detail}" if detail else head)
        self.run_id = run_id
        self.timeout = timeout
        self.workflow = workflow
        self.status = status


class EngineClosedError(ReflowError, RuntimeError):
    """A call on an engine that was closed: its ``async with`` block ended
    (or ``close()`` was called) and its storage was closed with it. The same
    on every backend; ``operation`` names the refused call."""

    code = "engine_closed"

    def __init__(self, operation: str, *, client: bool = False) -> None:
        if client:
            message = (
                f"client.{operation}() was called after the SyncClient was closed (its "
                "`with` block ended, close() was called, or the interpreter is exiting): "
                "create a new SyncClient"
            )
        else:
            what = (
                "`async with engine` was entered again"
                if operation == "__aenter__"
                else f"engine.{operation}() was called"
            )
            message = (
                f"{what} after the engine was closed (its `async with` block ended, or "
                "close() was called, and its storage was closed with it): make the call inside "
                "`async with engine:`, or create a new Engine"
            )
        super().__init__(message)
        self.operation = operation


class IdempotencyConflictError(ReflowError):
    """A run with this idempotency key already exists with a different input."""

    code = "idempotency_conflict"

    def __init__(self, workflow: str, idempotency_key: str, existing_run_id: str) -> None:
        super().__init__(
            f"workflow {workflow!r} already has run {existing_run_id} for idempotency key "
            f"{idempotency_key!r} with a different input"
        )
        self.workflow = workflow
        self.idempotency_key = idempotency_key
        self.existing_run_id = existing_run_id


class EventBufferFullError(ReflowError):
    """A run already holds ``limit`` events that no wait has consumed yet.

    Events sent before a run reaches its wait are buffered; this bound keeps
    a sender in a loop from growing one run without end. Nothing was stored.
    """

    code = "event_buffer_full"

    def __init__(self, run_id: str, event: str, limit: int) -> None:
        super().__init__(
            f"run {run_id} already holds {limit} unconsumed event(s) (the limit); "
            f"event {event!r} was not stored"
        )
        self.run_id = run_id
        self.event = event
        self.limit = limit


class HookError(ReflowError):
    """Something that must never affect a run failed: an observer plugin's
    hook, a stream whose consumer ended without closing it, or a workflow's
    ``on_failure`` handler. The run goes on regardless; the engine hands this
    to ``Engine(on_error=...)`` and the ``reflow_error`` hook, and logs it.

    ``original`` is the exception that was raised (also the ``__cause__``),
    ``where`` says what raised it (``"reflow_run_completed hook"``,
    ``"on_failure handler of workflow 'orders'"``, ``"stream consumer"``), and
    ``run_id`` names the run concerned, when there is one.
    """

    code = "hook_error"

    def __init__(
        self,
        message: str,
        *,
        where: str,
        original: BaseException | None = None,
        run_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.where = where
        self.original = original
        self.run_id = run_id
        self.__cause__ = original


class LeaseExpiredError(ReflowError):
    """This worker no longer holds the lease on a run; another may own it."""

    code = "lease_expired"

    def __init__(self, run_id: str, *, operation: str | None = None) -> None:
        where = f" during {operation}" if operation else ""
        super().__init__(f"lease on run {run_id} was lost{where}")
        self.run_id = run_id
        self.operation = operation


class StepCancelledError(ReflowError):
    """Raised inside a step handler by ``ctx.signal.raise_if_cancelled()``.

    ``reason`` says why: ``"cancelled"`` (the run was cancelled),
    ``"lease_lost"`` (another worker may own the run now), ``"timeout"`` (this
    attempt ran past its timeout) or ``"shutdown"`` (the engine is stopping and
    hands the run back). The engine never records it as a step failure.
    """

    code = "step_cancelled"

    def __init__(self, reason: str) -> None:
        super().__init__(f"step cancelled: {reason}")
        self.reason = reason


class NonRetryableError(ReflowError):
    """Raised by a step to fail at once: the step is not tried again,
    whatever its :class:`~reflow_core.retry.Retry` allows. Raise it ``from``
    the exception that caused it to keep that one in the stored cause chain::

        except InvalidCard as exc:
            raise NonRetryableError(f"card rejected: {exc}") from exc
    """

    code = "non_retryable"


class RemoteTraceback(ReflowError):
    """The stored traceback of a failure, as text. :class:`RunFailedError`
    chains one as its ``__cause__``, so printing it (or a test failing on
    it) shows where the step failed, as it happened, wherever it ran."""

    code = "remote_traceback"

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback.rstrip()}\n"""'


class StorageError(ReflowError):
    """The storage backend failed. The driver's own exception is ``__cause__``.

    ``operation`` names the protocol operation that failed, ``backend`` the
    URL scheme. Messages never contain credentials.
    """

    code = "storage_error"

    def __init__(
        self, message: str, *, operation: str | None = None, backend: str | None = None
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.backend = backend


class BackendNotFoundError(StorageError, LookupError):
    """No installed backend serves this URL scheme."""

    code = "backend_not_found"

    def __init__(
        self,
        scheme: str,
        installed: Sequence[str],
        provider: str | None,
        suggestions: Sequence[str] = (),
    ) -> None:
        listing = ", ".join(sorted(installed)) or "none"
        hint = f"; install {provider!r} to use it" if provider else ""
        if suggestions and not provider:
            hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?"
        super().__init__(
            f"no Reflow storage backend for URL scheme {scheme!r}{hint} "
            f"(installed backends: {listing})",
            backend=scheme,
        )
        self.scheme = scheme
        self.installed = sorted(installed)
        self.provider = provider
        self.suggestions = list(suggestions)
        """Installed schemes close to ``scheme``, closest first (a likely typo)."""


class SchemaVersionError(StorageError):
    """The database schema was written by a newer Reflow than this one."""

    code = "schema_version"


class RunError(ReflowError):
    """Base of errors that describe how a run ended without a result."""

    code = "run_error"

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class StepError(RunError):
    """A step failed for good: its retries were used up, or it raised a
    non-retryable error. The user exception is ``__cause__`` when it happened
    in this process."""

    code = "step_failed"

    def __init__(
        self,
        message: str,
        *,
        step: str,
        attempts: int = 1,
        run_id: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message, run_id=run_id)
        self.step = step
        self.attempts = attempts
        self.error_type = error_type


class StepTimeoutError(StepError):
    """One attempt of a step ran past its ``timeout``."""

    code = "step_timeout"

    def __init__(self, step: str, timeout: float, *, attempts: int = 1) -> None:
        super().__init__(
            f"step {step!r} timed out after {timeout:g}s", step=step, attempts=attempts
        )
        self.timeout = timeout


class WaitTimeoutError(RunError):
    """A ``wait_for_event`` step's timeout passed before its event arrived."""

    code = "wait_timeout"

    def __init__(self, step: str, *, run_id: str | None = None) -> None:
        super().__init__(f"no {step!r} event arrived before the wait's timeout", run_id=run_id)
        self.step = step


class RunDeadlineError(RunError):
    """The run had not finished by its deadline (``workflow(..., timeout=...)``
    or ``enqueue(..., deadline=...)``): the step in flight was cancelled, or the
    run was delayed, sleeping or waiting when the deadline passed. Never retried."""

    code = "deadline_exceeded"

    def __init__(
        self, deadline: datetime, *, step: str | None = None, run_id: str | None = None
    ) -> None:
        where = f" (in step {step!r})" if step is not None else ""
        super().__init__(
            f"run did not finish by its deadline {deadline.isoformat()}{where}", run_id=run_id
        )
        self.deadline = deadline
        self.step = step


class MapTooLargeError(RunError):
    """A ``.map()`` step's ``items`` returned more items than its ``max_items``:
    every item is a saved step of the run, read back by every claim, so a
    fan-out that large belongs in several runs. Never retried."""

    code = "map_too_large"

    def __init__(self, step: str, count: int, limit: int, *, run_id: str | None = None) -> None:
        super().__init__(
            f"map {step!r} got {count} items, more than its max_items={limit}; split the "
            "work into several runs, or raise max_items if the store can hold that many steps",
            run_id=run_id,
        )
        self.step = step
        self.count = count
        self.limit = limit


class ChildFailedError(RunError):
    """A child run awaited by a step (``ctx.start_child(...).result()`` or a
    ``.child(...)`` step) failed or was cancelled. ``child_run_id``,
    ``workflow`` and ``status`` say which child and how it ended; ``info`` is
    its stored failure (``None`` for a cancellation), whose traceback, when
    there is one, is chained as ``__cause__``. The awaiting step fails with
    it and is retried by its own retry policy, each attempt starting a new
    child."""

    code = "child_failed"

    def __init__(
        self,
        child_run_id: str,
        workflow: str,
        status: str,
        info: ErrorInfo | None,
        *,
        run_id: str | None = None,
    ) -> None:
        what = "was cancelled" if status == "cancelled" or info is None else _failed(info)
        super().__init__(f"child run {child_run_id} of workflow {workflow!r} {what}", run_id=run_id)
        self.child_run_id = child_run_id
        self.workflow = workflow
        self.status = status
        self.info = info
        stored = None if info is None else info.get("traceback")
        if isinstance(stored, str) and stored:
            self.__cause__ = RemoteTraceback(stored)


class IncompatibleRunError(RunError):
    """A run of another version, or started on an earlier shape of its
    workflow, that the definition which claimed it cannot continue where the
    run stands (``workflow(..., on_incompatible="fail")``). ``reason`` says
    what would go wrong; ``run_version`` and ``version`` are the run's and
    the definition's versions. Never retried."""

    code = "incompatible_run"

    def __init__(
        self,
        workflow: str,
        run_version: int,
        version: int,
        reason: str,
        *,
        run_id: str | None = None,
    ) -> None:
        super().__init__(
            f"run of workflow {workflow!r} version {run_version} cannot go on with version "
            f"{version} of its definition: {reason}",
            run_id=run_id,
        )
        self.workflow = workflow
        self.run_version = run_version
        self.version = version
        self.reason = reason


class ReclaimLimitError(RunError):
    """The run's lease lapsed more times than ``max_reclaims`` allows.

    A run that kills or hangs every worker that takes it is failed with this
    error instead of crash-looping the fleet.
    """

    code = "reclaim_limit"

    def __init__(self, run_id: str, reclaims: int, limit: int) -> None:
        super().__init__(
            f"run {run_id} lost its worker {reclaims} times (limit {limit}); "
            "it may crash or hang every worker that takes it",
            run_id=run_id,
        )
        self.reclaims = reclaims
        self.limit = limit


class CorruptDataError(RunError):
    """A value stored for a run (its input, a step's output, an event's
    payload) cannot be read back: it is not valid tagged JSON, or it is
    nested deeper than :data:`reflow_core.codec.MAX_DEPTH`.

    A worker fails such a run with this error instead of crashing on it;
    ``field`` names the value (``"input"``, ``"output of step 'charge'"``).
    """

    code = "corrupt_data"

    def __init__(self, field: str, reason: str, *, run_id: str | None = None) -> None:
        where = f" of run {run_id}" if run_id else ""
        super().__init__(f"the stored {field}{where} cannot be read: {reason}", run_id=run_id)
        self.field = field
        self.reason = reason


class RunFailedError(RunError):
    """The run failed. ``info`` is the stored failure, ``step`` its step,
    ``error_type`` the qualified class name of the exception, ``traceback``
    its stored traceback (``None`` when there is none) and ``causes`` its
    cause chain.

    When there is a traceback, a :class:`RemoteTraceback` holding it is the
    ``__cause__``, so a printed traceback of this error (an uncaught one, a
    failing test) shows the step's own frames first.
    """

    code = "run_failed"

    def __init__(self, run_id: str, info: ErrorInfo) -> None:
        super().__init__(f"run {run_id} {_failed(info)}", run_id=run_id)
        self.info = info
        self.step = info.get("step")
        self.error_code = info.get("code", "step_failed")
        self.error_type = info.get("type")
        stored = info.get("traceback")
        self.traceback = stored if isinstance(stored, str) and stored else None
        self.causes: list[CauseInfo] = list(info.get("causes") or [])
        if self.traceback is not None:
            self.__cause__ = RemoteTraceback(self.traceback)


def _failed(info: ErrorInfo) -> str:
    """``failed at step 'x': Type: message``, from a stored failure."""
    step = info.get("step")
    where = f" at step {step!r}" if step else ""
    error_type = info.get("type")
    message = info.get("message", "")
    if error_type:
        short = error_type.removeprefix("builtins.")
        message = f"{short}: {message}" if message and message != short else short
    return f"failed{where}: {message}"


class RunCancelledError(RunError):
    """The run was cancelled before it finished."""

    code = "run_cancelled"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} was cancelled", run_id=run_id)


def error_info(
    exc: BaseException, *, step: str | None = None, attempts: int | None = None
) -> ErrorInfo:
    """Describe ``exc`` as plain data for storage."""
    code = exc.code if isinstance(exc, ReflowError) else "step_failed"
    cause = exc.__cause__ if isinstance(exc, StepError) and exc.__cause__ is not None else exc
    info: ErrorInfo = {
        "code": code,
        "type": qualified_name(type(cause)),
        "message": str(cause) or type(cause).__name__,
        "step": step,
    }
    if attempts is not None:
        info["attempts"] = attempts
    if cause.__traceback__ is not None:
        info["traceback"] = format_traceback(cause)
    else:
        # An error the engine made, not raised, about one that was (a when=
        # predicate's): the traceback of the one raised.
        raised = _chained(cause)
        if raised is not None and raised.__traceback__ is not None:
            info["traceback"] = format_traceback(raised)
    causes = cause_chain(cause)
    if causes:
        info["causes"] = causes
    return info


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, as ``ErrorInfo["type"]`` stores it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _chained(exc: BaseException) -> BaseException | None:
    if exc.__cause__ is not None:
        return exc.__cause__
    if exc.__context__ is not None and not exc.__suppress_context__:
        return exc.__context__
    return None


def cause_chain(exc: BaseException) -> list[CauseInfo]:
    """What ``exc`` was raised from or while handling, nearest first, at most
    :data:`MAX_CAUSES` links (a cycle ends the chain)."""
    causes: list[CauseInfo] = []
    seen = {id(exc)}
    link = _chained(exc)
    while link is not None and id(link) not in seen and len(causes) < MAX_CAUSES:
        seen.add(id(link))
        message = str(link) or type(link).__name__
        if len(message) > _MAX_CAUSE_MESSAGE:
            message = message[: _MAX_CAUSE_MESSAGE - 3] + "..."
        causes.append({"type": qualified_name(type(link)), "message": message})
        link = _chained(link)
    return causes


def _from_engine(frame: _traceback.FrameSummary) -> bool:
    return frame.filename.startswith(_ENGINE_DIRS)


def _format_one(te: _traceback.TracebackException) -> list[str]:
    """One exception of a chain: its frames past the engine's, the innermost
    :data:`MAX_TRACEBACK_FRAMES` of them, then the exception itself."""
    frames = list(te.stack)
    start = 0
    while start < len(frames) and _from_engine(frames[start]):
        start += 1
    frames = frames[start:]
    omitted = max(len(frames) - MAX_TRACEBACK_FRAMES, 0)
    te.stack = _traceback.StackSummary.from_list(frames[omitted:])
    lines = list(te.format(chain=False))
    if omitted and lines and lines[0].startswith("Traceback"):
        lines.insert(1, f"  [... {omitted} earlier frame(s) left out ...]\n")
    return lines


def format_traceback(exc: BaseException) -> str:
    """``exc``'s traceback with its chain, as Python prints it, without the
    engine's leading frames, bounded as :class:`ErrorInfo` describes. Local
    variables are never included."""
    te: _traceback.TracebackException | None = _traceback.TracebackException.from_exception(
        exc, lookup_lines=False
    )
    # Newest first: each exception with the line that leads to it from the
    # one it was raised from (or while handling).
    chain: list[tuple[_traceback.TracebackException, str]] = []
    while te is not None and len(chain) <= MAX_CAUSES:
        if te.__cause__ is not None:
            chain.append((te, _CAUSE))
            te = te.__cause__
        elif te.__context__ is not None and not te.__suppress_context__:
            chain.append((te, _CONTEXT))
            te = te.__context__
        else:
            chain.append((te, ""))
            te = None
    lines: list[str] = []
    if te is not None:  # a longer chain: its oldest exceptions are left out
        lines.append("[... earlier exceptions of the chain left out ...]\n")
    for link, leading in reversed(chain):
        if lines:
            lines.append(leading)
        lines.extend(_format_one(link))
    text = "".join(lines)
    if len(text) > MAX_TRACEBACK_CHARS:
        marker = "[... {} characters left out ...]\n"
        keep = MAX_TRACEBACK_CHARS - len(marker.format(len(text)))
        text = marker.format(len(text) - keep) + text[len(text) - keep :]
    return text


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
