"""Reflow: durable workflow execution for Python."""

from __future__ import annotations

from .codec import JSONValue
from .context import CancelSignal, StepContext
from .engine import Engine, Run, StepResult
from .errors import (
    BackendNotFoundError,
    ConfigError,
    DuplicateStepError,
    IdempotencyConflictError,
    LeaseExpiredError,
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
    WorkflowNotFoundError,
)
from .memory import MemoryStorage
from .registry import available_backends, open_storage
from .retry import Retry
from .storage import Storage
from .workflow import Workflow, workflow

__version__ = "0.1.0"

__all__ = [
    "BackendNotFoundError",
    "CancelSignal",
    "ConfigError",
    "DuplicateStepError",
    "Engine",
    "IdempotencyConflictError",
    "JSONValue",
    "LeaseExpiredError",
    "MemoryStorage",
    "ReclaimLimitError",
    "ReflowError",
    "Retry",
    "Run",
    "RunCancelledError",
    "RunError",
    "RunFailedError",
    "RunNotFoundError",
    "SchemaVersionError",
    "SerializationError",
    "StepCancelledError",
    "StepContext",
    "StepError",
    "StepResult",
    "StepTimeoutError",
    "Storage",
    "StorageError",
    "ValidationError",
    "Workflow",
    "WorkflowNotFoundError",
    "__version__",
    "available_backends",
    "open_storage",
    "workflow",
]
