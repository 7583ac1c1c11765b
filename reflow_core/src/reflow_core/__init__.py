"""Reflow: durable workflow execution for Python."""

from __future__ import annotations

from .codec import JSONValue
from .context import CancelSignal, FailureContext, StepContext
from .engine import Clock, Engine, Run, RunList, StepResult, SystemClock
from .errors import (
    BackendNotFoundError,
    ConfigError,
    CorruptDataError,
    DuplicateStepError,
    EventBufferFullError,
    EventNotDeclaredError,
    HookError,
    IdempotencyConflictError,
    LeaseExpiredError,
    ParallelCompleteError,
    ReclaimLimitError,
    ReflowError,
    RunCancelledError,
    RunError,
    RunFailedError,
    RunNotFoundError,
    SchemaVersionError,
    SerializationError,
    StepCancelledError,
    StepError,
    StepTimeoutError,
    StorageError,
    ValidationError,
    WaitTimeoutError,
    WorkflowNotFoundError,
)
from .events import (
    Event,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepCompleted,
    StepSkipped,
    StepStarted,
)
from .memory import MemoryStorage
from .registry import available_backends, open_storage
from .retry import Retry
from .schedules import Schedule
from .storage import Storage
from .workflow import Branch, Workflow, workflow

__version__ = "0.1.0"

__all__ = [
    "BackendNotFoundError",
    "Branch",
    "CancelSignal",
    "Clock",
    "ConfigError",
    "CorruptDataError",
    "DuplicateStepError",
    "Engine",
    "Event",
    "EventBufferFullError",
    "EventNotDeclaredError",
    "FailureContext",
    "HookError",
    "IdempotencyConflictError",
    "JSONValue",
    "LeaseExpiredError",
    "MemoryStorage",
    "ParallelCompleteError",
    "ReclaimLimitError",
    "ReflowError",
    "Retry",
    "Run",
    "RunCancelledError",
    "RunCompleted",
    "RunError",
    "RunFailed",
    "RunFailedError",
    "RunList",
    "RunNotFoundError",
    "RunStarted",
    "Schedule",
    "SchemaVersionError",
    "SerializationError",
    "StepCancelledError",
    "StepCompleted",
    "StepContext",
    "StepError",
    "StepResult",
    "StepSkipped",
    "StepStarted",
    "StepTimeoutError",
    "Storage",
    "StorageError",
    "SystemClock",
    "ValidationError",
    "WaitTimeoutError",
    "Workflow",
    "WorkflowNotFoundError",
    "__version__",
    "available_backends",
    "open_storage",
    "workflow",
]
