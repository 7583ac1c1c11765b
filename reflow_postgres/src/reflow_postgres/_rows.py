"""Rows to records and records to parameters, for the statements of ``queries.sql``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from reflow_core.adapter import (
    RUN_COLUMNS,
    as_utc,
    check_aware,
    from_epoch_us,
    headers_column,
    is_delayed,
    limit_columns,
    rate_columns,
    run_from_row,
    step_from_row,
)
from reflow_core.storage import ClaimedRun, Lease, NewRun, StepRecord

__all__ = [
    "INSERTED",
    "LIMITED",
    "RATE_DUE",
    "claimed_run",
    "deadline_param",
    "delay_param",
    "limit_params",
    "step_params",
]

_RUN_WIDTH = len(RUN_COLUMNS.split(", "))
INSERTED = _RUN_WIDTH
"""Index of ``inserted`` in a row of the statements that create runs (the
run's columns, then whether this statement inserted it)."""
_STALE = _RUN_WIDTH
_STEPS = _RUN_WIDTH + 2
LIMITED = _RUN_WIDTH + 3
"""Index, in a row of the ``claim`` statement, of the ids of the picked runs
that hold limits or rates, left for ``claim_limited``."""
RATE_DUE = _RUN_WIDTH + 4
"""Index, in a row of the ``claim`` statement, of whether its probe found a
rate wait due (then it claimed nothing)."""


def delay_param(new: NewRun) -> timedelta | None:
    """The ``delay`` parameter of a statement that creates ``new``: its delay
    when it is created delayed, else ``None`` (a pending run, due at once)."""
    return new.delay if is_delayed(new) else None


def deadline_param(new: NewRun) -> timedelta | None:
    """The ``deadline`` parameter of a statement that creates ``new``: how
    long after creation it must finish (``None``: no deadline)."""
    return new.deadline


def limit_params(new: NewRun) -> dict[str, Any]:
    """The ``priority``, ``key1``, ``max1``, ``key2`` and ``max2`` (limits),
    ``rkey1``, ``rmax1``, ``rperiod1``, ``rkey2``, ``rmax2`` and ``rperiod2``
    (rates, periods in microseconds), ``debounce`` and ``headers`` (a JSON
    object, or ``None`` for none) parameters of a statement that creates
    ``new`` (``limit_values``)."""
    key1, max1, key2, max2 = limit_columns(new.limits)
    rkey1, rmax1, rperiod1, rkey2, rmax2, rperiod2 = rate_columns(new.rates)
    return {
        "priority": new.priority,
        "key1": key1,
        "max1": max1,
        "key2": key2,
        "max2": max2,
        "rkey1": rkey1,
        "rmax1": rmax1,
        "rperiod1": rperiod1,
        "rkey2": rkey2,
        "rmax2": rmax2,
        "rperiod2": rperiod2,
        "debounce": new.debounce_key,
        "headers": headers_column(new.headers),
    }


def step_params(step: StepRecord) -> dict[str, Any]:
    """The ``step_*`` parameters of a statement that saves ``step`` (``step_values``)."""
    return {
        "name": step.name,
        "step_status": step.status,
        "step_output": step.output,
        "step_error": step.error,
        "step_attempts": step.attempts,
        "step_wake_at": None if step.wake_at is None else check_aware(step.wake_at, "step.wake_at"),
    }


def claimed_run(row: Sequence[Any]) -> ClaimedRun:
    """A row of the ``claim`` or ``claim_limited`` statement: the run's
    columns (in :data:`~reflow_core.adapter.RUN_COLUMNS` order), whether its
    lease had lapsed, its sort key, and its steps as JSON arrays in
    :data:`~reflow_core.adapter.STEP_COLUMNS` order with times in epoch
    microseconds."""
    record = run_from_row(row, as_utc)
    steps: dict[str, StepRecord] = {}
    for step in row[_STEPS] or ():
        steps[step[0]] = step_from_row(step, from_epoch_us)
    return ClaimedRun(
        run=record,
        lease=Lease(record.id, record.lease_epoch),
        steps=steps,
        reclaimed=bool(row[_STALE]),
    )
