"""Rows to records and records to parameters, for the statements of ``queries.sql``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

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
from reflow_core.storage import ClaimedRun, Lease, NewRun, RunRecord, StepRecord

__all__ = [
    "INSERTED",
    "LIMITED",
    "RATE_DUE",
    "Finish",
    "Save",
    "claimed_run",
    "create_rows",
    "deadline_param",
    "delay_param",
    "finish_rows",
    "limit_params",
    "made_record",
    "save_rows",
    "step_params",
]

Save: TypeAlias = tuple[Lease, StepRecord, timedelta]
"""One save_step_result call: lease, step, lease extension."""
Finish: TypeAlias = tuple[Lease, str, str | None, str | None, StepRecord | None]
"""One finish_run call: lease, status, output, error, last step."""

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
    (rates, periods in microseconds), ``debounce``, ``headers`` (a JSON
    object, or ``None`` for none), ``version`` and ``fingerprint``
    parameters of a statement that creates ``new`` (``limit_values``)."""
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
        "version": new.version,
        "fingerprint": new.fingerprint,
    }


_ZERO = timedelta(0)
_NO_LIMITS = (None, None, None, None)
_NO_RATES = (None, None, None, None, None, None)


def create_rows(ids: Sequence[str], news: Sequence[NewRun]) -> str:
    """The ``rows`` parameter of ``create_many`` for ``news``, created with
    ``ids``: a JSON array with one array per run, in the order and layout
    that statement reads. A run with no delay, deadline, headers, limits or
    rates (the usual enqueue) sends seven fields (its version and
    fingerprint the last two), the others all twenty;
    durations go as interval text in days and seconds, as psycopg sends a
    ``timedelta``. Built in one pass with no per-item calls in the usual
    case: it is the Python cost of every run a batch creates. The JSON is
    ASCII, so text no column can keep (a lone surrogate) reaches the server,
    which refuses it, instead of failing to encode."""
    rows: list[list[Any]] = []
    append = rows.append
    spans: dict[timedelta, str] = {}
    last_headers: object = None
    last_column: str | None = None
    for run_id, new in zip(ids, news, strict=True):
        row: list[Any] = [
            run_id,
            new.workflow,
            new.input,
            new.priority,
            new.idempotency_key,
            new.version,
            new.fingerprint,
        ]
        delay = new.delay
        deadline = new.deadline
        headers = new.headers
        if delay is None and deadline is None and not headers and not new.limits and not new.rates:
            append(row)
            continue
        if delay is not None and delay > _ZERO:
            text = spans.get(delay)
            row.append(text if text is not None else spans.setdefault(delay, _interval(delay)))
        else:
            row.append(None)  # no delay: pending, due at once
        if deadline is not None:
            text = spans.get(deadline)
            row.append(
                text if text is not None else spans.setdefault(deadline, _interval(deadline))
            )
        else:
            row.append(None)
        if headers is not last_headers:
            # A batch usually shares one mapping: encoded once.
            last_headers, last_column = headers, headers_column(headers)
        row.append(last_column)
        row.extend(limit_columns(new.limits) if new.limits else _NO_LIMITS)
        row.extend(rate_columns(new.rates) if new.rates else _NO_RATES)
        append(row)
    return _JSON.encode(rows)


_JSON = json.JSONEncoder(separators=(",", ":"))
"""The encoder of the JSON parameters of the batch statements: ASCII, so
text no column can keep (a lone surrogate, a NUL) reaches the server, which
refuses it (a :class:`~reflow_core.errors.StorageError`), instead of failing
to encode in the client."""


def save_rows(items: Sequence[Save]) -> str:
    """The ``rows`` parameter of ``save_steps`` for ``items``: a JSON array
    with one array per save, in order: run id, lease epoch, lease extension
    (interval text), then the step's name, status, output, error, attempts
    and wake-up time (ISO text, or null). One JSON text is far cheaper to
    send than an array per column, whose every element psycopg would adapt
    one by one; built in one pass, with the extension (the same for every
    save of a worker) turned into text once."""
    rows: list[list[Any]] = []
    append = rows.append
    last: timedelta | None = None
    span = ""
    for lease, step, extend in items:
        if extend != last:
            last, span = extend, _interval(extend)
        wake_at = step.wake_at
        append(
            [
                lease.run_id,
                lease.epoch,
                span,
                step.name,
                step.status,
                step.output,
                step.error,
                step.attempts,
                None if wake_at is None else _time(wake_at),
            ]
        )
    return _JSON.encode(rows)


def finish_rows(items: Sequence[Finish]) -> str:
    """The ``rows`` parameter of ``finish_many`` for ``items``: a JSON array
    with one array per finish, in order: run id, lease epoch, the run's
    status, output and error, then, for a finish that saves a last step,
    the step's name, status, output, error, attempts and wake-up time (ISO
    text, or null), as in :func:`save_rows`."""
    rows: list[list[Any]] = []
    append = rows.append
    for lease, status, output, error, step in items:
        if step is None:
            append([lease.run_id, lease.epoch, status, output, error])
            continue
        wake_at = step.wake_at
        append(
            [
                lease.run_id,
                lease.epoch,
                status,
                output,
                error,
                step.name,
                step.status,
                step.output,
                step.error,
                step.attempts,
                None if wake_at is None else _time(wake_at),
            ]
        )
    return _JSON.encode(rows)


def _interval(span: timedelta) -> str:
    """``span`` as PostgreSQL interval text, in days and seconds."""
    return f"{span.days} days {span.seconds}.{span.microseconds:06d} seconds"


def _time(value: datetime) -> str:
    """``value`` (aware) as ISO text PostgreSQL reads as the same
    ``timestamptz``: in UTC (an offset with a fraction of a second, which
    the server would not read, is applied here), or as given when UTC is out
    of ``datetime``'s range (the first or last day of years 1 and 9999)."""
    try:
        return value.astimezone(UTC).isoformat()
    except OverflowError:
        return value.isoformat()


def made_record(row: Sequence[Any], new: NewRun) -> RunRecord:
    """The record of the run a create statement inserted from ``new``
    (``row[INSERTED]`` is true), equal to what :func:`run_from_row` reads
    from ``row``: the statement's times and status are read from the row,
    the rest is ``new``'s as stored (headers in sorted order, as read back).
    A third cheaper than decoding the whole row, for every run a batch
    creates."""
    created = as_utc(row[10])
    wake_at = row[12]
    deadline_at = row[15]
    headers = new.headers
    return RunRecord(
        id=row[0],
        workflow=new.workflow,
        status=row[2],
        input=new.input,
        output=None,
        error=None,
        idempotency_key=new.idempotency_key,
        attempts=0,
        reclaims=0,
        lease_epoch=0,
        created_at=created,
        updated_at=created,
        wake_at=created if wake_at == row[10] else as_utc(wake_at),
        deadline_at=None if deadline_at is None else as_utc(deadline_at),
        priority=new.priority,
        limits=new.limits,
        rates=new.rates,
        headers=dict(sorted(headers.items())) if headers else {},
        version=new.version,
        fingerprint=new.fingerprint,
    )


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
