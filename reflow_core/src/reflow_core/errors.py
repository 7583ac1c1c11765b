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
    ├── IdempotencyConflictError     same key, different input
    ├── EventBufferFullError         a run already holds as many unconsumed events as allowed
    ├── LeaseExpiredError            a worker lost its lease on a run
    ├── StepCancelledError           raised inside a step by ``ctx.signal.raise_if_cancelled()``
    ├── StorageError                 the backend failed; the driver error is ``__cause__``
    │   ├── BackendNotFoundError     no backend installed for a URL scheme
    │   └── SchemaVersionError       the database was written by a newer Reflow
    └── RunError                     a run ended without a result
        ├── StepError                a step failed for good (``step``, ``attempts``)
        │   └── StepTimeoutError     an attempt ran past its timeout
        ├── WaitTimeoutError         no event arrived before a wait's timeout
        ├── ReclaimLimitError        the run kept losing its worker and was given up
        ├── CorruptDataError         a stored value of the run cannot be read back
        ├── RunFailedError           raised by ``Engine.result`` for a failed run
        └── RunCancelledError        raised by ``Engine.result`` for a cancelled run

Errors that describe a stored run (``RunError`` and subclasses) can be turned
into the plain ``ErrorInfo`` mapping that storage keeps, and back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypedDict

__all__ = [
    "BackendNotFoundError",
    "ConfigError",
    "CorruptDataError",
    "DuplicateStepError",
    "ErrorInfo",
    "EventBufferFullError",
    "EventNotDeclaredError",
    "HookError",
    "IdempotencyConflictError",
    "LeaseExpiredError",
    "ParallelCompleteError",
    "ReclaimLimitError",
    "ReflowError",
    "RunCancelledError",
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


class ErrorInfo(TypedDict, total=False):
    """The plain-data form of a run's failure, as storage keeps it.

    ``code`` is the ``ReflowError.code`` of the error (``"step_failed"`` for an
    exception raised by user code), ``type`` the qualified class name of the
    original exception, ``message`` its text, ``step`` the step it came from.
    """

    code: str
    type: str
    message: str
    step: str | None
    attempts: int


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

    def __init__(self, scheme: str, installed: Sequence[str], provider: str | None) -> None:
        listing = ", ".join(sorted(installed)) or "none"
        hint = f"; install {provider!r} to use it" if provider else ""
        super().__init__(
            f"no Reflow storage backend for URL scheme {scheme!r}{hint} "
            f"(installed backends: {listing})",
            backend=scheme,
        )
        self.scheme = scheme
        self.installed = sorted(installed)
        self.provider = provider


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
    """The run failed. ``info`` is the stored failure, ``step`` its step."""

    code = "run_failed"

    def __init__(self, run_id: str, info: ErrorInfo) -> None:
        step = info.get("step")
        where = f" at step {step!r}" if step else ""
        super().__init__(f"run {run_id} failed{where}: {info.get('message', '')}", run_id=run_id)
        self.info = info
        self.step = step
        self.error_code = info.get("code", "step_failed")


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
        "type": f"{type(cause).__module__}.{type(cause).__qualname__}",
        "message": str(cause) or type(cause).__name__,
        "step": step,
    }
    if attempts is not None:
        info["attempts"] = attempts
    return info
