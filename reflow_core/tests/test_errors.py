"""The error hierarchy: one root, a stable ``code`` on every class."""

from __future__ import annotations

import re

import pytest

import reflow_core
from reflow_core import errors
from reflow_core.errors import (
    ConfigError,
    ReflowError,
    RunFailedError,
    SerializationError,
    StepError,
    StepTimeoutError,
    error_info,
)

ERROR_CLASSES = [
    getattr(errors, name)
    for name in errors.__all__
    if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), ReflowError)
]

# The codes are public API: stored in run records, matched on by users.
# Changing one breaks stored data and user code; this table says so loudly.
STABLE_CODES = {
    "ReflowError": "reflow_error",
    "ConfigError": "config_error",
    "DuplicateStepError": "duplicate_step",
    "ValidationError": "validation_error",
    "SerializationError": "serialization_error",
    "WorkflowNotFoundError": "workflow_not_found",
    "RunNotFoundError": "run_not_found",
    "IdempotencyConflictError": "idempotency_conflict",
    "HookError": "hook_error",
    "LeaseExpiredError": "lease_expired",
    "StepCancelledError": "step_cancelled",
    "StorageError": "storage_error",
    "BackendNotFoundError": "backend_not_found",
    "SchemaVersionError": "schema_version",
    "RunError": "run_error",
    "StepError": "step_failed",
    "StepTimeoutError": "step_timeout",
    "ReclaimLimitError": "reclaim_limit",
    "IncompatibleRunError": "incompatible_run",
    "RunDeadlineError": "deadline_exceeded",
    "MapTooLargeError": "map_too_large",
    "RunFailedError": "run_failed",
    "RunCancelledError": "run_cancelled",
    "EventNotDeclaredError": "event_not_declared",
    "ParallelCompleteError": "parallel_complete",
    "WaitTimeoutError": "wait_timeout",
    "EventBufferFullError": "event_buffer_full",
    "CorruptDataError": "corrupt_data",
    "ChildFailedError": "child_failed",
    "NonRetryableError": "non_retryable",
    "RemoteTraceback": "remote_traceback",
    "ResultTimeoutError": "result_timeout",
    "EngineClosedError": "engine_closed",
}

PARENTS = {
    "EventNotDeclaredError": "ReflowError",
    "ParallelCompleteError": "ReflowError",
    "WaitTimeoutError": "RunError",
    "RunDeadlineError": "RunError",
    "MapTooLargeError": "RunError",
    "ConfigError": "ReflowError",
    "DuplicateStepError": "ConfigError",
    "ValidationError": "ReflowError",
    "SerializationError": "ReflowError",
    "WorkflowNotFoundError": "ReflowError",
    "RunNotFoundError": "ReflowError",
    "IdempotencyConflictError": "ReflowError",
    "LeaseExpiredError": "ReflowError",
    "StepCancelledError": "ReflowError",
    "StorageError": "ReflowError",
    "BackendNotFoundError": "StorageError",
    "SchemaVersionError": "StorageError",
    "RunError": "ReflowError",
    "StepError": "RunError",
    "StepTimeoutError": "StepError",
    "ReclaimLimitError": "RunError",
    "IncompatibleRunError": "RunError",
    "RunFailedError": "RunError",
    "RunCancelledError": "RunError",
    "EventBufferFullError": "ReflowError",
    "CorruptDataError": "RunError",
    "ChildFailedError": "RunError",
    "NonRetryableError": "ReflowError",
    "RemoteTraceback": "ReflowError",
    "ResultTimeoutError": "ReflowError",
    "EngineClosedError": "ReflowError",
}


def test_every_error_class_is_covered() -> None:
    assert {cls.__name__ for cls in ERROR_CLASSES} == set(STABLE_CODES)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_each_class_declares_its_own_stable_code(cls: type[ReflowError]) -> None:
    assert "code" in vars(cls), f"{cls.__name__} inherits its code"
    assert cls.code == STABLE_CODES[cls.__name__]
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", cls.code)


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in ERROR_CLASSES]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize("name", sorted(PARENTS))
def test_hierarchy(name: str) -> None:
    cls = getattr(errors, name)
    assert cls.__bases__[0] is getattr(errors, PARENTS[name])


def test_errors_are_exported_from_the_package() -> None:
    for cls in ERROR_CLASSES:
        assert getattr(reflow_core, cls.__name__) is cls


def test_builtin_bases_let_generic_handlers_catch_them() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.ValidationError, ValueError)
    assert issubclass(errors.SerializationError, TypeError)
    assert issubclass(errors.WorkflowNotFoundError, LookupError)
    assert issubclass(errors.RunNotFoundError, LookupError)
    assert issubclass(errors.BackendNotFoundError, LookupError)
    assert issubclass(errors.ResultTimeoutError, TimeoutError)
    assert issubclass(errors.EngineClosedError, RuntimeError)


def test_structured_fields() -> None:
    err = SerializationError("set is not plain data", path="$.a[1]")
    assert err.path == "$.a[1]"
    assert err.reason == "set is not plain data"
    assert str(err) == "set is not plain data at $.a[1]"
    conflict = errors.IdempotencyConflictError("pay", "k", "run-1")
    assert (conflict.workflow, conflict.idempotency_key, conflict.existing_run_id) == (
        "pay",
        "k",
        "run-1",
    )
    timeout = StepTimeoutError("charge", 2.5, attempts=3)
    assert (timeout.step, timeout.timeout, timeout.attempts) == ("charge", 2.5, 3)
    assert "2.5s" in str(timeout)
    assert ConfigError("bad", option="lease").option == "lease"


def test_error_info_of_user_code_failure_describes_the_cause() -> None:
    try:
        try:
            raise KeyError("sku")
        except KeyError as exc:
            raise StepError("step failed", step="reserve", attempts=2) from exc
    except StepError as failure:
        info = error_info(failure, step="reserve", attempts=2)
    assert info.pop("traceback").endswith("raise KeyError(\"sku\")\nKeyError: 'sku'\n")
    assert info == {
        "code": "step_failed",
        "type": "builtins.KeyError",
        "message": "'sku'",
        "step": "reserve",
        "attempts": 2,
    }


def test_error_info_of_a_reflow_error_keeps_its_code() -> None:
    info = error_info(StepTimeoutError("charge", 1.0), step="charge")
    assert info["code"] == "step_timeout"
    assert info["type"] == "reflow_core.errors.StepTimeoutError"
    assert "attempts" not in info


def test_run_failed_error_reads_stored_info() -> None:
    err = RunFailedError("run-1", {"code": "step_timeout", "message": "slow", "step": "charge"})
    assert err.step == "charge"
    assert err.error_code == "step_timeout"
    assert err.run_id == "run-1"
    assert "charge" in str(err)
    assert "slow" in str(err)
