"""``sqlite://``: the embedded SQLite backend.

One file holds every run, step, event and schedule. Several processes on one
host may share the file (WAL mode); SQLite serializes their writes and every
write transaction starts with ``BEGIN IMMEDIATE``, so two claimers never take
the same run.

How an operation reaches the database: each one is written once, as a
generator that yields ``(sql, parameters)`` and receives the fetched rows (a
*script*). A script runs as one transaction in one call on aiosqlite's worker
thread, so nothing else can interleave with it and it costs a single hop from
the event loop. When that fast path is unavailable (see
:meth:`SQLiteStorage.initialize`), the same script is driven statement by
statement through aiosqlite's public coroutines under a lock: slower, equally
correct.
"""

# SQL text here is composed only from this module's constants and "?"
# placeholders; every value is bound as a parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Collection, Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeAlias, TypeVar, cast
from urllib.parse import parse_qsl, unquote

import aiosqlite

from reflow_core.adapter import (
    check_aware,
    check_duration,
    check_list_limit,
    check_new_run,
    check_purge,
    check_status_update,
    check_text,
    decode_cursor,
    encode_cursor,
    from_epoch_us,
    new_run_id,
    utcnow,
)
from reflow_core.errors import (
    ConfigError,
    EventBufferFullError,
    IdempotencyConflictError,
    ReflowError,
    SchemaVersionError,
    StorageError,
)
from reflow_core.storage import (
    TERMINAL_STATUSES,
    ClaimedRun,
    CreateResult,
    EventTake,
    Lease,
    NewRun,
    RunPage,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    StepStatus,
    WaitResult,
)

from ._schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION

__all__ = ["SQLiteStorage", "parse_sqlite_url"]

BACKEND = "sqlite"
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_BUSY_TIMEOUT_MS = 5000
MIN_SQLITE_VERSION = (3, 35, 0)  # UPDATE ... RETURNING and upserts with RETURNING

# Group commit: concurrent step saves wait for the writer and then share one
# transaction. A batch never holds more than this many saves.
_MAX_BATCH = 256
# One claim takes at most this many runs (each id is one SQL parameter).
MAX_CLAIM = 10_000

_T = TypeVar("_T")
Params: TypeAlias = Sequence[object]
Row: TypeAlias = tuple[Any, ...]
Script: TypeAlias = Generator[tuple[str, Params], list[Row], _T]
"""A database operation: yields statements, receives their rows, returns a value."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_NOTADB_CODES = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT})


# -- conversions -----------------------------------------------------------


def _to_us(value: datetime, what: str = "datetime") -> int:
    """Microseconds since the epoch for an aware datetime."""
    return (check_aware(value, what) - _EPOCH) // _ONE_US


def _span_us(value: timedelta) -> int:
    """A duration in whole microseconds."""
    return value // _ONE_US


def _from_us_opt(value: int | None) -> datetime | None:
    return None if value is None else from_epoch_us(value)


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


# -- statements --------------------------------------------------------------

_RUN_COLUMNS = (
    "id, workflow, status, input, output, error, idempotency_key, attempts, reclaims, "
    "lease_epoch, created_at, updated_at, wake_at, waiting_for, lease_expires_at"
)
_STEP_COLUMNS = "name, status, output, error, attempts, wake_at, completed_at"
_SCHEDULE_COLUMNS = "key, workflow, input, recurrence, next_run_at, created_at, updated_at"

# The fence: still running under the same epoch, and the lease has not lapsed
# by the storage clock. Parameters: run id, epoch, now.
_FENCE = "id = ? AND status = 'running' AND lease_epoch = ? AND lease_expires_at > ?"
_NOT_TERMINAL = "status NOT IN ('completed', 'failed', 'cancelled')"

_SQL_INSPECT = (
    "SELECT (SELECT application_id FROM pragma_application_id()), "
    "(SELECT user_version FROM pragma_user_version()), "
    "(SELECT count(*) FROM sqlite_master)"
)
_SQL_INSERT_RUN = (
    "INSERT INTO runs (id, workflow, status, input, idempotency_key, created_at, updated_at, "
    "wake_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?) "
    f"ON CONFLICT (workflow, idempotency_key) DO NOTHING RETURNING {_RUN_COLUMNS}"
)
_SQL_RUN_BY_KEY = f"SELECT {_RUN_COLUMNS} FROM runs WHERE workflow = ? AND idempotency_key = ?"
_SQL_GET_RUN = f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?"
_SQL_UPSERT_STEP = (
    "INSERT INTO steps (run_id, name, status, output, error, attempts, wake_at, completed_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, name) DO UPDATE SET "
    "status = excluded.status, output = excluded.output, error = excluded.error, "
    "attempts = excluded.attempts, wake_at = excluded.wake_at, "
    "completed_at = excluded.completed_at"
)
_SQL_GET_STEP = "SELECT status, output, wake_at FROM steps WHERE run_id = ? AND name = ?"
_SQL_GET_STEPS = f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY rowid"
_SQL_EXTEND = f"UPDATE runs SET lease_expires_at = ?, updated_at = ? WHERE {_FENCE} RETURNING 1"
_SQL_FINISH = (
    "UPDATE runs SET status = ?, output = ?, error = ?, lease_expires_at = NULL, "
    f"wake_at = NULL, waiting_for = NULL, updated_at = ?, finished_at = ? WHERE {_FENCE} "
    "RETURNING 1"
)
_SQL_HAND_BACK = (
    "UPDATE runs SET status = 'pending', lease_expires_at = NULL, wake_at = ?, "
    f"updated_at = ? WHERE {_FENCE} RETURNING 1"
)
_SQL_END_FENCED = (
    "UPDATE runs SET status = ?, error = ?, lease_expires_at = NULL, wake_at = NULL, "
    f"waiting_for = NULL, updated_at = ?, finished_at = ? WHERE {_FENCE} RETURNING 1"
)
_SQL_END_UNFENCED = (
    "UPDATE runs SET status = ?, error = ?, lease_expires_at = NULL, wake_at = NULL, "
    f"waiting_for = NULL, updated_at = ?, finished_at = ? WHERE id = ? AND {_NOT_TERMINAL} "
    "RETURNING 1"
)
_SQL_SLEEP = (
    "UPDATE runs SET status = 'sleeping', wake_at = ?, lease_expires_at = NULL, "
    f"updated_at = ? WHERE {_FENCE} RETURNING 1"
)
_SQL_WAIT = (
    "UPDATE runs SET status = 'waiting', waiting_for = ?, wake_at = ?, "
    f"lease_expires_at = NULL, updated_at = ? WHERE {_FENCE} RETURNING 1"
)
_SQL_WAIT_READY = f"UPDATE runs SET waiting_for = NULL, updated_at = ? WHERE {_FENCE} RETURNING 1"
_SQL_FENCE_CHECK = f"SELECT 1 FROM runs WHERE {_FENCE}"
_SQL_HAS_EVENT = "SELECT 1 FROM events WHERE run_id = ? AND name = ? AND taken_at IS NULL LIMIT 1"
_SQL_OLDEST_EVENT = (
    "SELECT id, payload FROM events WHERE run_id = ? AND name = ? AND taken_at IS NULL "
    "ORDER BY id LIMIT 1"
)
_SQL_TAKE_EVENT = "UPDATE events SET taken_at = ? WHERE id = ?"
_SQL_TOOK_EVENT = "UPDATE runs SET waiting_for = NULL, updated_at = ? WHERE id = ?"
_SQL_RUN_STATE = "SELECT status, waiting_for FROM runs WHERE id = ?"
_SQL_SEEN_EVENT_ID = "SELECT 1 FROM events WHERE run_id = ? AND event_id = ?"
# Counting stops at the limit, so a full buffer costs at most that many index entries.
_SQL_COUNT_BUFFERED = (
    "SELECT count(*) FROM (SELECT 1 FROM events WHERE run_id = ? AND taken_at IS NULL LIMIT ?)"
)
_SQL_INSERT_EVENT = (
    "INSERT INTO events (run_id, name, payload, event_id, created_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id, event_id) DO NOTHING RETURNING id"
)
_SQL_WAKE = "UPDATE runs SET wake_at = ?, updated_at = ? WHERE id = ?"
_SQL_REQUEUE = (
    "UPDATE runs SET status = 'pending', error = NULL, reclaims = 0, wake_at = ?, "
    "waiting_for = NULL, lease_expires_at = NULL, updated_at = ?, finished_at = NULL "
    "WHERE id = ? AND status IN ('failed', 'cancelled') RETURNING 1"
)
_SQL_DROP_FAILED_STEPS = "DELETE FROM steps WHERE run_id = ? AND status = 'failed'"
# Retention walks the partial index runs_finished, oldest finish first.
_SQL_PURGE_CANDIDATES = (
    "SELECT id FROM runs WHERE finished_at < ? "
    "AND status IN ('completed', 'failed', 'cancelled') ORDER BY finished_at, id LIMIT ?"
)
_PURGE_CHUNK = 500
"""Run ids per ``IN (...)`` list when a purge deletes a batch (one parameter each)."""
_SQL_GET_SCHEDULE = "SELECT recurrence, next_run_at, created_at FROM schedules WHERE key = ?"
_SQL_UPSERT_SCHEDULE = (
    f"INSERT INTO schedules ({_SCHEDULE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET workflow = excluded.workflow, input = excluded.input, "
    "recurrence = excluded.recurrence, next_run_at = excluded.next_run_at, "
    "updated_at = excluded.updated_at"
)
_SQL_DELETE_SCHEDULE = "DELETE FROM schedules WHERE key = ? RETURNING 1"
_SQL_LIST_SCHEDULES = f"SELECT {_SCHEDULE_COLUMNS} FROM schedules ORDER BY key"
_SQL_DUE_SCHEDULES = (
    f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE next_run_at <= ? "
    "ORDER BY next_run_at, key LIMIT ?"
)
_SQL_ADVANCE_SCHEDULE = (
    "UPDATE schedules SET next_run_at = ?, updated_at = ? "
    "WHERE key = ? AND next_run_at = ? RETURNING 1"
)


def _run_record(row: Row) -> RunRecord:
    return RunRecord(
        id=row[0],
        workflow=row[1],
        status=cast(RunStatus, row[2]),
        input=row[3],
        output=row[4],
        error=row[5],
        idempotency_key=row[6],
        attempts=row[7],
        reclaims=row[8],
        lease_epoch=row[9],
        created_at=from_epoch_us(row[10]),
        updated_at=from_epoch_us(row[11]),
        wake_at=_from_us_opt(row[12]),
        waiting_for=row[13],
        lease_expires_at=_from_us_opt(row[14]),
    )


def _step_record(row: Row) -> StepRecord:
    return StepRecord(
        name=row[0],
        status=cast(StepStatus, row[1]),
        output=row[2],
        error=row[3],
        attempts=row[4],
        wake_at=_from_us_opt(row[5]),
        completed_at=_from_us_opt(row[6]),
    )


def _schedule_record(row: Row) -> ScheduleRecord:
    return ScheduleRecord(
        key=row[0],
        workflow=row[1],
        input=row[2],
        recurrence=row[3],
        next_run_at=from_epoch_us(row[4]),
        created_at=from_epoch_us(row[5]),
        updated_at=from_epoch_us(row[6]),
    )


@dataclass(frozen=True, slots=True)
class _StepRow:
    """A step ready to be written: the record's fields with ``wake_at`` in microseconds."""

    name: str
    status: str
    output: str | None
    error: str | None
    attempts: int
    wake_at: int | None

    @classmethod
    def of(cls, step: StepRecord) -> _StepRow:
        wake = None if step.wake_at is None else _to_us(step.wake_at, "step.wake_at")
        return cls(step.name, step.status, step.output, step.error, step.attempts, wake)

    def params(self, run_id: str, now: int) -> Params:
        return (
            run_id,
            self.name,
            self.status,
            self.output,
            self.error,
            self.attempts,
            self.wake_at,
            now,
        )


# -- scripts -------------------------------------------------------------------
#
# Each script is one transaction. ``now`` is the storage clock in microseconds,
# read once when the transaction has started (after the write lock is held).


def _inspect_script(now: int) -> Script[tuple[int, int, int]]:
    rows = yield (_SQL_INSPECT, ())
    app_id, version, objects = rows[0]
    return int(app_id), int(version), int(objects)


def _create_script(now: int, new: NewRun, run_id: str) -> Script[CreateResult]:
    try:
        rows = yield (
            _SQL_INSERT_RUN,
            (run_id, new.workflow, new.input, new.idempotency_key, now, now, now),
        )
    except sqlite3.IntegrityError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_PRIMARYKEY":
            raise StorageError(
                f"run id {run_id!r} already exists", operation="create_run", backend=BACKEND
            ) from exc
        raise
    if rows:
        return CreateResult(_run_record(rows[0]), created=True)
    rows = yield (_SQL_RUN_BY_KEY, (new.workflow, new.idempotency_key))
    existing = _run_record(rows[0])
    if existing.input != new.input:
        assert new.idempotency_key is not None
        raise IdempotencyConflictError(new.workflow, new.idempotency_key, existing.id)
    return CreateResult(existing, created=False)


def _claim_script(
    now: int, workflows: Sequence[str], limit: int, lease_us: int
) -> Script[list[ClaimedRun]]:
    marks = _placeholders(len(workflows))
    # Lapsed leases first, so a backlog cannot starve a dead worker's runs,
    # then everything else by due time; ties broken by id. Both queries walk
    # a partial index in order and stop at the limit. The unary "+" keeps the
    # planner off the (workflow, idempotency_key) index, which would make it
    # read and sort every run of the workflow, history included.
    lapsed_rows = yield (
        "SELECT id FROM runs WHERE status = 'running' AND lease_expires_at <= ? "
        f"AND +workflow IN ({marks}) ORDER BY lease_expires_at, id LIMIT ?",
        (now, *workflows, limit),
    )
    lapsed = [row[0] for row in lapsed_rows]
    due: list[str] = []
    if len(lapsed) < limit:
        due_rows = yield (
            "SELECT id FROM runs WHERE status IN ('pending', 'sleeping', 'waiting') "
            f"AND wake_at <= ? AND +workflow IN ({marks}) ORDER BY wake_at, id LIMIT ?",
            (now, *workflows, limit - len(lapsed)),
        )
        due = [row[0] for row in due_rows]
    ids = lapsed + due
    if not ids:
        return []
    id_marks = _placeholders(len(ids))
    # Column references on the right-hand side see the row before the update,
    # so a lapsed lease (status still 'running') counts as a reclaim.
    updated = yield (
        "UPDATE runs SET status = 'running', lease_epoch = lease_epoch + 1, "
        "attempts = attempts + 1, reclaims = reclaims + (status = 'running'), "
        "lease_expires_at = ?, wake_at = NULL, updated_at = ? "
        f"WHERE id IN ({id_marks}) RETURNING {_RUN_COLUMNS}",
        (now + lease_us, now, *ids),
    )
    step_rows = yield (
        f"SELECT run_id, {_STEP_COLUMNS} FROM steps WHERE run_id IN ({id_marks}) ORDER BY rowid",
        ids,
    )
    steps: dict[str, dict[str, StepRecord]] = {run_id: {} for run_id in ids}
    for row in step_rows:
        steps[row[0]][row[1]] = _step_record(row[1:])
    records = {row[0]: _run_record(row) for row in updated}
    reclaimed = set(lapsed)
    return [
        ClaimedRun(
            run=records[run_id],
            lease=Lease(run_id, records[run_id].lease_epoch),
            steps=steps[run_id],
            reclaimed=run_id in reclaimed,
        )
        for run_id in ids
    ]


def _heartbeat_script(now: int, lease: Lease, extend_us: int) -> Script[bool]:
    rows = yield (_SQL_EXTEND, (now + extend_us, now, lease.run_id, lease.epoch, now))
    return bool(rows)


def _save_step_script(now: int, lease: Lease, step: _StepRow, extend_us: int) -> Script[bool]:
    rows = yield (_SQL_EXTEND, (now + extend_us, now, lease.run_id, lease.epoch, now))
    if not rows:
        return False
    yield (_SQL_UPSERT_STEP, step.params(lease.run_id, now))
    return True


class _BatchItemFailed(Exception):
    """One save of a batch raised; the batch was rolled back and is retried one by one."""


def _save_batch_script(
    now: int, items: Sequence[tuple[Lease, _StepRow, int]]
) -> Script[list[bool]]:
    results: list[bool] = []
    for lease, step, extend_us in items:
        try:
            saved = yield from _save_step_script(now, lease, step, extend_us)
        except (sqlite3.Error, UnicodeError) as exc:
            raise _BatchItemFailed(str(exc)) from exc
        results.append(saved)
    return results


def _finish_script(
    now: int,
    lease: Lease,
    status: str,
    output: str | None,
    error: str | None,
    step: _StepRow | None,
) -> Script[bool]:
    rows = yield (_SQL_FINISH, (status, output, error, now, now, lease.run_id, lease.epoch, now))
    if not rows:
        return False
    if step is not None:
        yield (_SQL_UPSERT_STEP, step.params(lease.run_id, now))
    # Setting finished_at dropped the run's buffered events (a trigger).
    return True


def _update_status_script(
    now: int, run_id: str, status: str, lease: Lease | None, error: str | None
) -> Script[bool]:
    if lease is None:
        rows = yield (_SQL_END_UNFENCED, (status, error, now, now, run_id))
    elif status == "pending":
        rows = yield (_SQL_HAND_BACK, (now, now, run_id, lease.epoch, now))
    else:
        rows = yield (_SQL_END_FENCED, (status, error, now, now, run_id, lease.epoch, now))
    # Ending a run sets finished_at, which drops its buffered events (a trigger).
    return bool(rows)


def _sleep_script(now: int, lease: Lease, step: str, duration_us: int) -> Script[int | None]:
    rows = yield (_SQL_GET_STEP, (lease.run_id, step))
    if rows and rows[0][0] == "sleeping" and rows[0][2] is not None:
        wake_at: int = rows[0][2]
        first = False
    else:
        wake_at = now + duration_us
        first = True
    fenced = yield (_SQL_SLEEP, (wake_at, now, lease.run_id, lease.epoch, now))
    if not fenced:
        return None
    if first:
        record = _StepRow(step, "sleeping", None, None, 1, wake_at)
        yield (_SQL_UPSERT_STEP, record.params(lease.run_id, now))
    return wake_at


def _wait_script(
    now: int, lease: Lease, step: str, event: str, timeout_us: int | None
) -> Script[tuple[bool, int | None] | None]:
    rows = yield (_SQL_GET_STEP, (lease.run_id, step))
    deadline: int | None
    if rows and rows[0][0] == "waiting":
        deadline = rows[0][2]
        first = False
    else:
        deadline = None if timeout_us is None else now + timeout_us
        first = True
    buffered = yield (_SQL_HAS_EVENT, (lease.run_id, event))
    if buffered:
        fenced = yield (_SQL_WAIT_READY, (now, lease.run_id, lease.epoch, now))
    else:
        fenced = yield (_SQL_WAIT, (event, deadline, now, lease.run_id, lease.epoch, now))
    if not fenced:
        return None
    if first:
        record = _StepRow(step, "waiting", None, None, 1, deadline)
        yield (_SQL_UPSERT_STEP, record.params(lease.run_id, now))
    return bool(buffered), deadline


def _deliver_script(
    now: int,
    run_id: str,
    event: str,
    payload: str,
    event_id: str | None,
    max_buffered: int | None,
) -> Script[bool]:
    rows = yield (_SQL_RUN_STATE, (run_id,))
    if not rows or rows[0][0] in TERMINAL_STATUSES:
        return False
    status, waiting_for = rows[0]
    if max_buffered is not None:
        if event_id is not None:
            seen = yield (_SQL_SEEN_EVENT_ID, (run_id, event_id))
            if seen:
                return True  # a repeated id is a no-op, full buffer or not
        counted = yield (_SQL_COUNT_BUFFERED, (run_id, max_buffered))
        if counted[0][0] >= max_buffered:
            raise EventBufferFullError(run_id, event, max_buffered)
    inserted = yield (_SQL_INSERT_EVENT, (run_id, event, payload, event_id, now))
    if inserted and status == "waiting" and waiting_for == event:
        yield (_SQL_WAKE, (now, now, run_id))
    return True


def _take_script(now: int, lease: Lease, step: str, event: str) -> Script[EventTake | None]:
    fenced = yield (_SQL_FENCE_CHECK, (lease.run_id, lease.epoch, now))
    if not fenced:
        return None
    rows = yield (_SQL_GET_STEP, (lease.run_id, step))
    if rows and rows[0][0] == "completed":
        return EventTake(found=True, payload=rows[0][1])
    rows = yield (_SQL_OLDEST_EVENT, (lease.run_id, event))
    if not rows:
        return EventTake(found=False)
    event_row_id, payload = rows[0]
    yield (_SQL_TAKE_EVENT, (now, event_row_id))
    record = _StepRow(step, "completed", payload, None, 1, None)
    yield (_SQL_UPSERT_STEP, record.params(lease.run_id, now))
    yield (_SQL_TOOK_EVENT, (now, lease.run_id))
    return EventTake(found=True, payload=payload)


def _get_run_script(now: int, run_id: str) -> Script[RunRecord | None]:
    rows = yield (_SQL_GET_RUN, (run_id,))
    return _run_record(rows[0]) if rows else None


def _get_steps_script(now: int, run_id: str) -> Script[dict[str, StepRecord]]:
    rows = yield (_SQL_GET_STEPS, (run_id,))
    return {row[0]: _step_record(row) for row in rows}


def _list_runs_script(
    now: int,
    statuses: Sequence[str] | None,
    workflow: str | None,
    limit: int,
    after: tuple[int, str] | None,
) -> Script[RunPage]:
    clauses: list[str] = []
    params: list[object] = []
    if statuses is not None:
        clauses.append(f"status IN ({_placeholders(len(statuses))})")
        params.extend(statuses)
    if workflow is not None:
        clauses.append("workflow = ?")
        params.append(workflow)
    if after is not None:
        clauses.append("(created_at, id) < (?, ?)")
        params.extend(after)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    rows = yield (
        f"SELECT {_RUN_COLUMNS} FROM runs {where}ORDER BY created_at DESC, id DESC LIMIT ?",
        (*params, limit + 1),
    )
    page = [_run_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more else None
    return RunPage(page, next_cursor)


def _purge_script(now: int, age_us: int, batch: int) -> Script[int]:
    rows = yield (_SQL_PURGE_CANDIDATES, (now - age_us, batch))
    ids = [row[0] for row in rows]
    for start in range(0, len(ids), _PURGE_CHUNK):
        chunk = ids[start : start + _PURGE_CHUNK]
        marks = _placeholders(len(chunk))
        yield (f"DELETE FROM steps WHERE run_id IN ({marks})", chunk)
        yield (f"DELETE FROM events WHERE run_id IN ({marks})", chunk)
        yield (f"DELETE FROM runs WHERE id IN ({marks})", chunk)
    return len(ids)


def _requeue_script(now: int, run_id: str) -> Script[bool]:
    rows = yield (_SQL_REQUEUE, (now, now, run_id))
    if not rows:
        return False
    yield (_SQL_DROP_FAILED_STEPS, (run_id,))
    return True


def _upsert_schedule_script(
    now: int, spec: ScheduleSpec, next_run_at: int
) -> Script[ScheduleRecord]:
    rows = yield (_SQL_GET_SCHEDULE, (spec.key,))
    created_at = now
    if rows:
        recurrence, old_next, created_at = rows[0]
        if recurrence == spec.recurrence:
            next_run_at = old_next
    values = (spec.key, spec.workflow, spec.input, spec.recurrence, next_run_at, created_at, now)
    yield (_SQL_UPSERT_SCHEDULE, values)
    return _schedule_record(values)


def _delete_schedule_script(now: int, key: str) -> Script[bool]:
    rows = yield (_SQL_DELETE_SCHEDULE, (key,))
    return bool(rows)


def _list_schedules_script(now: int) -> Script[list[ScheduleRecord]]:
    rows = yield (_SQL_LIST_SCHEDULES, ())
    return [_schedule_record(row) for row in rows]


def _due_schedules_script(now: int, limit: int) -> Script[list[ScheduleRecord]]:
    rows = yield (_SQL_DUE_SCHEDULES, (now, limit))
    return [_schedule_record(row) for row in rows]


def _claim_slot_script(
    now: int, key: str, slot: int, next_run_at: int, run: NewRun, run_id: str
) -> Script[RunRecord | None]:
    advanced = yield (_SQL_ADVANCE_SCHEDULE, (next_run_at, now, key, slot))
    if not advanced:
        return None
    result = yield from _create_script(now, run, run_id)
    return result.run


# -- drivers -------------------------------------------------------------------

Mode: TypeAlias = Literal["read", "write"]


def _drive(script: Script[_T], execute: Callable[[str, Params], list[Row]]) -> _T:
    """Run ``script`` to completion, feeding it rows or throwing driver errors into it."""
    try:
        sql, params = next(script)
        while True:
            try:
                rows = execute(sql, params)
            except Exception as exc:
                sql, params = script.throw(exc)
            else:
                sql, params = script.send(rows)
    except StopIteration as stop:
        return cast(_T, stop.value)


def _run_on_thread(
    db: sqlite3.Connection,
    factory: Callable[[int], Script[_T]],
    mode: Mode,
    clock: Callable[[], datetime],
) -> _T:
    """One transaction, run entirely on the connection's worker thread."""

    def execute(sql: str, params: Params) -> list[Row]:
        return db.execute(sql, params).fetchall()

    if mode == "write":
        db.execute("BEGIN IMMEDIATE")
    try:
        result = _drive(factory(_to_us(clock(), "clock")), execute)
        if mode == "write":
            db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return result


@contextmanager
def _storage_errors(operation: str) -> Iterator[None]:
    """Translate driver exceptions into :class:`StorageError`, cause attached.

    Reflow's own errors (an idempotency conflict, a refused option) pass
    through unchanged.
    """
    try:
        yield
    except ReflowError:
        raise
    except sqlite3.Error as exc:
        raise StorageError(
            f"SQLite failed during {operation}: {exc}", operation=operation, backend=BACKEND
        ) from exc
    except UnicodeError as exc:
        raise StorageError(
            f"SQLite cannot store this text during {operation}: {exc}",
            operation=operation,
            backend=BACKEND,
        ) from exc


# -- options -----------------------------------------------------------------------


def _synchronous_option(value: object) -> str:
    if isinstance(value, str) and value.strip().upper() in SYNCHRONOUS_LEVELS:
        return value.strip().upper()
    raise ConfigError(
        f"synchronous must be one of {', '.join(SYNCHRONOUS_LEVELS)}, got {value!r}",
        option="synchronous",
    )


def _busy_timeout_option(value: object) -> int:
    if isinstance(value, timedelta):
        millis = value // timedelta(milliseconds=1)
    elif isinstance(value, int) and not isinstance(value, bool):
        millis = value
    elif isinstance(value, str) and value.strip().isdigit():
        millis = int(value.strip())
    else:
        raise ConfigError(
            f"busy_timeout must be a whole number of milliseconds or a timedelta, got {value!r}",
            option="busy_timeout",
        )
    if millis < 0:
        raise ConfigError(
            f"busy_timeout must not be negative, got {value!r}", option="busy_timeout"
        )
    return millis


def _group_commit_option(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "on", "yes"):
            return True
        if text in ("0", "false", "off", "no"):
            return False
    raise ConfigError(f"group_commit must be a boolean, got {value!r}", option="group_commit")


def _database_path(value: str | os.PathLike[str]) -> str:
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise ConfigError("the SQLite database path must not be empty", option="path")
    if path == ":memory:" or path.startswith("file::memory:"):
        raise ConfigError(
            "in-memory SQLite databases are not supported: workers in several processes "
            "share one database through a WAL file, so give a file path "
            "(use memory:// for a throwaway store)",
            option="path",
        )
    if path.startswith("file:"):
        raise ConfigError(
            f"SQLite URI filenames are not supported, give a plain file path: {path!r}",
            option="path",
        )
    return path


_URL_OPTIONS = ("synchronous", "busy_timeout", "group_commit")


def parse_sqlite_url(url: str) -> tuple[str, dict[str, str]]:
    """Split a ``sqlite://`` URL into the database path and its query options.

    ``sqlite:///relative/path.db`` names a path relative to the working
    directory, ``sqlite:////absolute/path.db`` an absolute one. The path may be
    percent-encoded. Raises :class:`~reflow_core.errors.ConfigError` for any
    other form, an unknown or repeated option, or an in-memory database.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != BACKEND:
        raise ConfigError(f"not a sqlite:// URL: {url!r}", option="url")
    if "#" in rest:
        raise ConfigError(f"sqlite URLs take no fragment: {url!r}", option="url")
    location, _, query = rest.partition("?")
    if not location.startswith("/"):
        raise ConfigError(
            f"sqlite URLs have no host: write sqlite:///relative/path.db or "
            f"sqlite:////absolute/path.db, got {url!r}",
            option="url",
        )
    path = _database_path(unquote(location[1:]))
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ConfigError(f"malformed query string in {url!r}", option="url") from exc
    for name, value in pairs:
        if name not in _URL_OPTIONS:
            raise ConfigError(
                f"unknown sqlite URL option {name!r}; known options: {', '.join(_URL_OPTIONS)}",
                option=name,
            )
        if name in options:
            raise ConfigError(f"sqlite URL option {name!r} is given twice", option=name)
        options[name] = value
    return path, options


# -- the storage -------------------------------------------------------------------------


@dataclass(slots=True)
class _PendingSave:
    lease: Lease
    step: _StepRow
    extend_us: int
    future: asyncio.Future[bool]


class SQLiteStorage:
    """The Reflow storage protocol on one SQLite file, through aiosqlite.

    ``path`` is the database file (created if missing; its directory must
    exist). Keyword options:

    ``synchronous`` (default ``"NORMAL"``)
        ``PRAGMA synchronous`` for this connection, in WAL mode:

        * ``NORMAL``: a commit survives a crash of the process, but the last
          commits may be lost (never corrupted) if the machine loses power or
          the OS crashes before the next checkpoint. A lost step save means the
          step runs again: still at-least-once.
        * ``FULL``: the WAL is synced on every commit, so a commit survives
          power loss and OS crashes too. Slower per commit.
        * ``EXTRA``: as ``FULL`` (its extra directory sync only matters for
          rollback journals).
        * ``OFF``: no syncs at all. Survives a process crash, but an OS crash
          or power loss can corrupt the database. Unsafe; for throwaway data.

    ``busy_timeout`` (default 5000)
        Milliseconds (an ``int``, or a ``timedelta``) to wait for another
        process's write lock before failing with ``StorageError``.

    ``clock``
        A callable returning the storage's *now* as an aware datetime; every
        lease, sleep and wait deadline is judged by it. Defaults to the local
        clock. It is called on the connection's worker thread. For tests.

    ``group_commit`` (default ``True``)
        Concurrent :meth:`save_step_result` calls share one transaction, each
        still fenced on its own and told its own outcome.

    Several processes may share the file, on one host only: WAL needs shared
    memory, so never put the file on a network filesystem.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        busy_timeout: int | timedelta = DEFAULT_BUSY_TIMEOUT_MS,
        clock: Callable[[], datetime] | None = None,
        group_commit: bool = True,
    ) -> None:
        self._path = _database_path(path)
        self._synchronous = _synchronous_option(synchronous)
        self._busy_timeout_ms = _busy_timeout_option(busy_timeout)
        if clock is not None and not callable(clock):
            raise ConfigError("clock must be a callable returning a datetime", option="clock")
        self._clock: Callable[[], datetime] = clock or utcnow
        self._group_commit = _group_commit_option(group_commit)
        self._conn: aiosqlite.Connection | None = None
        self._raw: sqlite3.Connection | None = None
        self._hook: Callable[..., Awaitable[Any]] | None = None
        self._use_private_hook = True
        self._public_lock = asyncio.Lock()
        self._init_lock = asyncio.Lock()
        self._pending: list[_PendingSave] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> SQLiteStorage:
        """Build a storage from a ``sqlite://`` URL (see :func:`parse_sqlite_url`).

        Query options (``synchronous``, ``busy_timeout`` in milliseconds,
        ``group_commit``) and keyword ``options`` (the same, plus ``clock``)
        are merged; a keyword wins over the same option in the URL. Unknown
        options raise :class:`~reflow_core.errors.ConfigError`.
        """
        path, query = parse_sqlite_url(url)
        merged: dict[str, Any] = {**query, **options}
        for name in merged:
            if name not in (*_URL_OPTIONS, "clock"):
                raise ConfigError(
                    f"unknown sqlite option {name!r}; known options: "
                    f"{', '.join((*_URL_OPTIONS, 'clock'))}",
                    option=name,
                )
        return cls(path, **merged)

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    @property
    def synchronous(self) -> str:
        """The ``PRAGMA synchronous`` level in use."""
        return self._synchronous

    def __repr__(self) -> str:
        return f"SQLiteStorage({self._path!r}, synchronous={self._synchronous!r})"

    # -- plumbing ------------------------------------------------------------------

    def _connection(self, operation: str) -> aiosqlite.Connection:
        if self._closed:
            raise StorageError("storage is closed", operation=operation, backend=BACKEND)
        if self._conn is None:
            raise StorageError(
                "storage is not initialized; call initialize() first",
                operation=operation,
                backend=BACKEND,
            )
        return self._conn

    async def _call(
        self, operation: str, factory: Callable[[int], Script[_T]], mode: Mode = "write"
    ) -> _T:
        """Run one script as one transaction; ``write`` transactions use BEGIN IMMEDIATE."""
        conn = self._connection(operation)
        with _storage_errors(operation):
            if self._hook is not None:
                result: _T = await self._hook(_run_on_thread, self._raw, factory, mode, self._clock)
                return result
            return await self._call_public(operation, conn, factory, mode)

    async def _call_public(
        self,
        operation: str,
        conn: aiosqlite.Connection,
        factory: Callable[[int], Script[_T]],
        mode: Mode,
    ) -> _T:
        """The same transaction through public coroutines: one await per statement."""
        async with self._public_lock:
            if self._closed:
                raise StorageError("storage is closed", operation=operation, backend=BACKEND)
            if mode == "write":
                await conn.execute_fetchall("BEGIN IMMEDIATE")
            try:
                script = factory(_to_us(self._clock(), "clock"))
                try:
                    sql, params = next(script)
                    while True:
                        try:
                            rows = cast(list[Row], list(await conn.execute_fetchall(sql, params)))
                        except Exception as exc:
                            sql, params = script.throw(exc)
                        else:
                            sql, params = script.send(rows)
                except StopIteration as stop:
                    result = cast(_T, stop.value)
                if mode == "write":
                    await conn.execute_fetchall("COMMIT")
            except BaseException:
                if mode == "write":
                    await asyncio.shield(self._rollback(conn))
                raise
            return result

    @staticmethod
    async def _rollback(conn: aiosqlite.Connection) -> None:
        with suppress(sqlite3.Error):
            await conn.rollback()

    # -- lifecycle -------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the file, then create or migrate the schema.

        Refusals happen before anything is written (the switch to WAL writes
        the file): a file that is not a SQLite database, or a SQLite database
        of another application, raises :class:`StorageError`; a schema newer
        than this code raises :class:`SchemaVersionError`. Migrations run in
        one ``BEGIN IMMEDIATE`` transaction, so processes initializing at the
        same time apply them once. Idempotent.

        Each operation runs as one call on aiosqlite's worker thread through
        its private ``Connection._execute``; if an aiosqlite release lacks it,
        the same transactions go through the public API instead.
        """
        async with self._init_lock:
            if self._conn is not None and not self._closed:
                return
            if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
                raise StorageError(
                    f"reflow-sqlite needs SQLite {'.'.join(map(str, MIN_SQLITE_VERSION))} "
                    f"or newer; this Python links SQLite {sqlite3.sqlite_version}",
                    operation="initialize",
                    backend=BACKEND,
                )
            conn = aiosqlite.connect(
                self._path,
                timeout=self._busy_timeout_ms / 1000,
                isolation_level=None,
                cached_statements=256,
            )
            _daemonize(conn)
            try:
                with _storage_errors("initialize"):
                    await conn
            except BaseException:
                await _stopped(conn)
                raise
            self._conn = conn
            self._closing = False
            self._closed = False
            hook = getattr(conn, "_execute", None) if self._use_private_hook else None
            self._hook = cast(Callable[..., Awaitable[Any]], hook) if callable(hook) else None
            self._raw = conn._conn if self._hook is not None else None
            try:
                await self._prepare()
            except BaseException:
                self._conn = None
                self._hook = None
                self._raw = None
                with suppress(sqlite3.Error, ValueError):
                    await conn.close()
                raise

    async def _prepare(self) -> None:
        try:
            identity = await self._call("initialize", _inspect_script, "read")
        except StorageError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, sqlite3.DatabaseError)
                and getattr(cause, "sqlite_errorcode", None) in _NOTADB_CODES
            ):
                raise StorageError(
                    f"{self._path} is not a SQLite database (or it is corrupt): {cause}",
                    operation="initialize",
                    backend=BACKEND,
                ) from cause
            raise
        needs_migration = self._check_identity(*identity)
        await self._call("initialize", self._configure_script, "read")
        if needs_migration:
            await self._call("initialize", self._migrate_script, "write")

    def _check_identity(self, app_id: int, version: int, objects: int) -> bool:
        """Refuse a foreign or too new database; True if the schema must be created or migrated."""
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self._path} has Reflow schema version {version}, but this reflow-sqlite "
                    f"supports up to version {SCHEMA_VERSION}; upgrade reflow-sqlite",
                    operation="initialize",
                    backend=BACKEND,
                )
            return version < SCHEMA_VERSION
        if app_id != 0:
            raise StorageError(
                f"{self._path} is not a Reflow database: its application_id is "
                f"{app_id:#010x}, Reflow's is {APPLICATION_ID:#010x}",
                operation="initialize",
                backend=BACKEND,
            )
        if objects or version:
            raise StorageError(
                f"{self._path} is not a Reflow database: it already holds another "
                "application's tables",
                operation="initialize",
                backend=BACKEND,
            )
        return True

    def _configure_script(self, now: int) -> Script[None]:
        rows = yield ("PRAGMA journal_mode = WAL", ())
        if str(rows[0][0]).lower() != "wal":
            raise StorageError(
                f"{self._path} could not be switched to WAL mode (it is in {rows[0][0]!r} mode)",
                operation="initialize",
                backend=BACKEND,
            )
        # Pragmas take no parameters; the level is one of SYNCHRONOUS_LEVELS.
        yield (f"PRAGMA synchronous = {self._synchronous}", ())

    def _migrate_script(self, now: int) -> Script[None]:
        rows = yield (_SQL_INSPECT, ())
        app_id, version, objects = (int(value) for value in rows[0])
        # Checked again under the write lock: another process may have
        # initialized the file since it was first inspected.
        if not self._check_identity(app_id, version, objects):
            return
        for migration in MIGRATIONS[version:]:
            for statement in migration:
                yield (statement, ())
        yield (f"PRAGMA application_id = {int(APPLICATION_ID)}", ())
        yield (f"PRAGMA user_version = {int(SCHEMA_VERSION)}", ())

    async def close(self) -> None:
        """Flush pending step saves, checkpoint the WAL into the file
        (``wal_checkpoint(TRUNCATE)``) and close the connection. Idempotent."""
        if self._closed or self._conn is None:
            self._closed = True
            return
        conn = self._conn
        self._closing = True  # refuse new step saves, finish the queued ones
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.gather(flusher, return_exceptions=True)
        if self._conn is not conn:
            return  # a concurrent close() got there first
        self._closed = True
        self._conn = None
        self._hook = None
        self._raw = None
        # With the public driver a transaction may still be in progress.
        async with self._public_lock:
            try:
                with _storage_errors("close"):
                    await conn.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                with _storage_errors("close"):
                    await conn.close()

    # -- runs ----------------------------------------------------------------------

    async def create_run(self, new: NewRun) -> CreateResult:
        """Create a ``pending`` run, or return the run already holding its idempotency key."""
        check_new_run(new)
        run_id = new.run_id or new_run_id()
        return await self._call("create_run", lambda now: _create_script(now, new, run_id))

    async def claim_runs(
        self, workflows: Collection[str], limit: int, lease: timedelta
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs (lapsed leases first, then by due time) with their steps.

        One call claims at most :data:`MAX_CLAIM` runs.
        """
        self._connection("claim_runs")
        names = [check_text(name, "workflow") for name in dict.fromkeys(workflows)]
        check_duration(lease, "lease")
        if limit <= 0 or not names:
            return []
        limit = min(limit, MAX_CLAIM)
        lease_us = _span_us(lease)
        return await self._call(
            "claim_runs", lambda now: _claim_script(now, names, limit, lease_us)
        )

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        """Fenced: extend the lease to ``now + extend``."""
        extend_us = _span_us(check_duration(extend, "extend"))
        return await self._call(
            "heartbeat_run", lambda now: _heartbeat_script(now, lease, extend_us)
        )

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        """Fenced: upsert ``step`` and extend the lease, atomically.

        With group commit, saves that arrive while the writer is busy share
        the next transaction; each is fenced on its own.
        """
        self._connection("save_step_result")
        if self._closing:
            raise StorageError("storage is closed", operation="save_step_result", backend=BACKEND)
        check_text(step.name, "step")
        row = _StepRow.of(step)
        extend_us = _span_us(check_duration(extend, "extend"))
        if not self._group_commit:
            return await self._call(
                "save_step_result", lambda now: _save_step_script(now, lease, row, extend_us)
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append(_PendingSave(lease, row, extend_us, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_saves())
        return await future

    async def _flush_saves(self) -> None:
        """The group-commit writer: runs queued saves in shared transactions until none are left."""
        try:
            while self._pending:
                # Let every task that is ready to save enqueue before writing.
                await asyncio.sleep(0)
                batch = self._pending[:_MAX_BATCH]
                del self._pending[:_MAX_BATCH]
                await self._write_batch(batch)
        finally:
            if self._pending:
                # Only reached if the writer itself was cancelled.
                pending, self._pending = self._pending, []
                for item in pending:
                    if not item.future.done():
                        item.future.set_exception(
                            StorageError(
                                "the step save was abandoned",
                                operation="save_step_result",
                                backend=BACKEND,
                            )
                        )

    async def _write_batch(self, batch: list[_PendingSave]) -> None:
        items = [(p.lease, p.step, p.extend_us) for p in batch]
        try:
            results = await self._call(
                "save_step_result", lambda now: _save_batch_script(now, items)
            )
        except _BatchItemFailed:
            # One save failed for reasons of its own (not its fence): the
            # batch was rolled back; give every save its own transaction.
            for pending in batch:
                await self._write_one(pending)
        except BaseException as exc:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(_copy_error(exc))
            if not isinstance(exc, Exception):
                raise
        else:
            for pending, saved in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(saved)

    async def _write_one(self, pending: _PendingSave) -> None:
        try:
            saved = await self._call(
                "save_step_result",
                lambda now: _save_step_script(now, pending.lease, pending.step, pending.extend_us),
            )
        except Exception as exc:
            if not pending.future.done():
                pending.future.set_exception(exc)
        else:
            if not pending.future.done():
                pending.future.set_result(saved)

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        """Fenced: optional last step, terminal status, lease dropped, in one transaction."""
        row = None if step is None else _StepRow.of(step)
        if step is not None:
            check_text(step.name, "step")
        return await self._call(
            "finish_run", lambda now: _finish_script(now, lease, status, output, error, row)
        )

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        """Hand a run back (``pending``, with its lease) or end it (``failed``/``cancelled``)."""
        self._connection("update_run_status")
        check_text(run_id, "run_id")
        check_status_update(status, lease)
        if lease is not None and lease.run_id != run_id:
            return False
        return await self._call(
            "update_run_status",
            lambda now: _update_status_script(now, run_id, status, lease, error),
        )

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        """Fenced: sleep until a deadline fixed the first time ``step`` is reached."""
        check_text(step, "step")
        duration_us = _span_us(check_duration(duration, "duration"))
        wake_at = await self._call(
            "sleep_run", lambda now: _sleep_script(now, lease, step, duration_us)
        )
        return _from_us_opt(wake_at)

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        """Fenced: wait for ``event`` (ready at once if one is buffered)."""
        check_text(step, "step")
        check_text(event, "event")
        timeout_us = None if timeout is None else _span_us(check_duration(timeout, "timeout"))
        outcome = await self._call(
            "wait_run", lambda now: _wait_script(now, lease, step, event, timeout_us)
        )
        if outcome is None:
            return None
        ready, deadline = outcome
        return WaitResult(ready=ready, deadline=_from_us_opt(deadline))

    async def deliver_event(
        self,
        run_id: str,
        event: str,
        payload: str,
        *,
        event_id: str | None = None,
        max_buffered: int | None = None,
    ) -> bool:
        """Buffer an event (deduplicated by ``event_id``) and wake a run waiting
        for it. With ``max_buffered``, a run already holding that many
        untaken events refuses it with
        :class:`~reflow_core.errors.EventBufferFullError`, in the same
        transaction as the write."""
        check_text(run_id, "run_id")
        check_text(event, "event")
        if event_id is not None:
            check_text(event_id, "event_id")
        return await self._call(
            "deliver_event",
            lambda now: _deliver_script(now, run_id, event, payload, event_id, max_buffered),
        )

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        """Fenced: consume the oldest buffered ``event`` as the result of wait step ``step``."""
        check_text(step, "step")
        check_text(event, "event")
        return await self._call("take_event", lambda now: _take_script(now, lease, step, event))

    async def now(self) -> datetime:
        """The storage clock (the ``clock`` option, else the local clock), in
        the microseconds the database keeps: the *now* every deadline is
        judged by."""
        self._connection("now")
        return from_epoch_us(_to_us(self._clock(), "clock"))

    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or ``None``."""
        check_text(run_id, "run_id")
        return await self._call("get_run", lambda now: _get_run_script(now, run_id), "read")

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        """The run's saved steps by name, in the order they were first saved."""
        check_text(run_id, "run_id")
        return await self._call(
            "get_step_results", lambda now: _get_steps_script(now, run_id), "read"
        )

    async def list_runs(
        self,
        *,
        status: Collection[RunStatus] | None = None,
        workflow: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        """Runs newest first, keyset-paginated on ``(created_at, id)``."""
        self._connection("list_runs")
        check_list_limit(limit)
        if workflow is not None:
            check_text(workflow, "workflow")
        after: tuple[int, str] | None = None
        if cursor is not None:
            created, last_id = decode_cursor(cursor)
            after = (_to_us(created, "cursor"), last_id)
        statuses = None if status is None else sorted(set(status))
        if statuses is not None and not statuses:
            return RunPage([], None)
        return await self._call(
            "list_runs",
            lambda now: _list_runs_script(now, statuses, workflow, limit, after),
            "read",
        )

    async def requeue_run(self, run_id: str) -> bool:
        """Make a ``failed`` or ``cancelled`` run ``pending`` again, dropping failed steps."""
        check_text(run_id, "run_id")
        return await self._call("requeue_run", lambda now: _requeue_script(now, run_id))

    async def purge_finished(self, older_than: timedelta, *, batch: int = 1000) -> int:
        """Delete runs that finished (completed, failed or cancelled) more than
        ``older_than`` ago by the storage clock, with their steps, events and
        event ids, oldest first. Returns how many runs were deleted.

        Each transaction deletes at most ``batch`` runs and holds the write
        lock only that long, so workers keep going while a large backlog is
        purged. A run is judged by the time it finished, stored when it
        ended: one that finishes while a purge runs is younger than the
        cut-off and stays. Unfinished runs are never touched. Idempotency
        keys of deleted runs become free again, so keep finished runs for
        longer than any client may retry an enqueue.
        """
        self._connection("purge_finished")
        batch = check_purge(older_than, batch)
        age_us = _span_us(older_than)
        total = 0
        while True:
            deleted = await self._call(
                "purge_finished",
                lambda now: _purge_script(now, age_us, batch),
            )
            total += deleted
            if deleted < batch:
                return total

    # -- schedules -------------------------------------------------------------------

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        """Create or replace a schedule, keeping its cadence if the recurrence is unchanged."""
        check_text(spec.key, "key")
        check_text(spec.workflow, "workflow")
        next_run_at = _to_us(spec.next_run_at, "next_run_at")
        return await self._call(
            "upsert_schedule", lambda now: _upsert_schedule_script(now, spec, next_run_at)
        )

    async def delete_schedule(self, key: str) -> bool:
        """Delete a schedule; False if there was none."""
        check_text(key, "key")
        return await self._call("delete_schedule", lambda now: _delete_schedule_script(now, key))

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Every schedule, ordered by key."""
        return await self._call("list_schedules", _list_schedules_script, "read")

    async def due_schedules(self, limit: int) -> list[ScheduleRecord]:
        """Schedules due by the storage clock, earliest first."""
        self._connection("due_schedules")
        if limit <= 0:
            return []
        return await self._call(
            "due_schedules", lambda now: _due_schedules_script(now, limit), "read"
        )

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        """Compare-and-set the schedule's slot and create its run, in one transaction."""
        check_text(key, "key")
        check_new_run(run)
        slot_us = _to_us(slot, "slot")
        next_us = _to_us(next_run_at, "next_run_at")
        run_id = run.run_id or new_run_id()
        return await self._call(
            "claim_schedule_slot",
            lambda now: _claim_slot_script(now, key, slot_us, next_us, run, run_id),
        )


def _daemonize(conn: aiosqlite.Connection) -> None:
    """Let the process exit even if this storage is never closed.

    aiosqlite's worker thread is not a daemon, so a program that ends without
    ``close()`` (an unhandled exception in a worker process, say) would hang
    at exit instead of ending and being restarted. Ending the thread with the
    process is as safe as a crash: SQLite rolls back an unfinished
    transaction when the file is next opened.
    """
    thread = getattr(conn, "_thread", None)
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True


async def _stopped(conn: aiosqlite.Connection) -> None:
    """Wait for the worker thread of a connection that failed to open.

    aiosqlite stops the thread itself, and the thread then reports to the
    event loop; waiting keeps it from reporting to a loop that has closed.
    """
    thread = getattr(conn, "_thread", None)
    if isinstance(thread, threading.Thread) and thread.is_alive():
        await asyncio.to_thread(thread.join, 5.0)


def _copy_error(exc: BaseException) -> BaseException:
    """A separate exception per waiting caller, so tracebacks do not pile up on one object."""
    if isinstance(exc, StorageError) and type(exc) is StorageError:
        copy = StorageError(exc.message, operation=exc.operation, backend=exc.backend)
        copy.__cause__ = exc.__cause__
        return copy
    return exc
