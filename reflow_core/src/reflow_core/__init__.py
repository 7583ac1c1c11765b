"""Reflow: durable workflow execution for Python."""

from __future__ import annotations

from .codec import JSONValue
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

__version__ = "0.1.0"

__all__ = [
    "BackendNotFoundError",
    "ConfigError",
    "DuplicateStepError",
    "IdempotencyConflictError",
    "JSONValue",
    "LeaseExpiredError",
    "MemoryStorage",
    "ReclaimLimitError",
    "ReflowError",
    "Retry",
    "RunCancelledError",
    "RunError",
    "RunFailedError",
    "RunNotFoundError",
    "SchemaVersionError",
    "SerializationError",
    "StepError",
    "StepTimeoutError",
    "Storage",
    "StorageError",
    "ValidationError",
    "WorkflowNotFoundError",
    "__version__",
    "available_backends",
    "open_storage",
]
