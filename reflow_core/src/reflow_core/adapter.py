"""Helpers for storage adapter authors: ids, cursors, time, rows, guards.

Everything a backend needs that is not specific to its store lives here, so
the id format, cursor encoding, argument checks, error messages and record
layouts are the same on every backend, and no backend carries a copy:

* ids and cursors: :func:`new_run_id`, :func:`encode_cursor`,
  :func:`decode_cursor`, :func:`run_page`;
* time: :func:`to_epoch_us`, :func:`from_epoch_us`, :func:`span_us`,
  :func:`as_utc`;
* rows: :func:`run_from_row`, :func:`step_from_row`,
  :func:`schedule_from_row` map a row in the column order of
  :data:`RUN_COLUMNS`, :data:`STEP_COLUMNS` and :data:`SCHEDULE_COLUMNS`;
* the lifecycle guard :class:`Lifecycle` (closed / not initialized);
* argument checks (``check_*``) every backend runs before touching its store;
* :func:`purge_in_batches`, the loop of every ``purge_finished``;
* :func:`load_queries`, named SQL statements kept in ``.sql`` files.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, cast

from ._durations import MAX_DURATION, describe
from .errors import ConfigError, StorageError
from .storage import (
    MAX_CREATE_BATCH,
    MAX_FINGERPRINT,
    MAX_GET_RUNS,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_HISTORY_MINUTES,
    MAX_RATE,
    MAX_RATE_PERIOD,
    MAX_RUN_LIMITS,
    MAX_RUN_RATES,
    MAX_VERSION,
    PRIORITY_RANGE,
    RATE_BLOCK_PREFIX,
    ConcurrencyLimit,
    FinishedMinute,
    Lease,
    NewRun,
    QueueStats,
    RateLimit,
    RunPage,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    StepRecord,
    StepStatus,
    WorkerInfo,
    WorkerRecord,
)

__all__ = [
    "MAX_DURATION",
    "RUN_COLUMNS",
    "SCHEDULE_COLUMNS",
    "STEP_COLUMNS",
    "WORKER_COLUMNS",
    "Lifecycle",
    "as_utc",
    "check_aware",
    "check_child_start",
    "check_claim_versions",
    "check_count",
    "check_duration",
    "check_fingerprint",
    "check_finish_status",
    "check_headers",
    "check_limits",
    "check_list_limit",
    "check_new_child",
    "check_new_run",
    "check_new_runs",
    "check_purge",
    "check_purge_limit",
    "check_rates",
    "check_run_ids",
    "check_stats_workflows",
    "check_status_update",
    "check_text",
    "check_version",
    "check_worker",
    "child_deadline",
    "child_of",
    "debounced_record",
    "decode_cursor",
    "decode_workflows",
    "due_by_deadline",
    "encode_cursor",
    "encode_workflows",
    "finished_minutes_from_counts",
    "from_epoch_us",
    "headers_column",
    "headers_from_column",
    "history_start",
    "is_delayed",
    "is_open_for_debounce",
    "limit_columns",
    "limits_from_columns",
    "load_queries",
    "minute_of",
    "new_run_id",
    "new_run_ids",
    "new_run_record",
    "purge_in_batches",
    "queue_stats_from_counts",
    "rate_block",
    "rate_columns",
    "rates_from_columns",
    "render_sql",
    "run_from_row",
    "run_page",
    "schedule_from_row",
    "serves_version",
    "span_us",
    "step_from_row",
    "to_epoch_us",
    "utcnow",
    "worker_from_row",
]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
"""Every 10-bit value as two Crockford base32 characters."""


def new_run_id() -> str:
    """A new run id: 26 characters, ULID layout (48-bit millisecond time, 80
    random bits, Crockford base32), so ids sort roughly by creation time."""
    v = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    p = _PAIRS  # 13 pairs of characters, 10 bits each; the first holds the top 8 bits
    return "".join(
        (
            p[v >> 120],
            p[(v >> 110) & 1023],
            p[(v >> 100) & 1023],
            p[(v >> 90) & 1023],
            p[(v >> 80) & 1023],
            p[(v >> 70) & 1023],
            p[(v >> 60) & 1023],
            p[(v >> 50) & 1023],
            p[(v >> 40) & 1023],
            p[(v >> 30) & 1023],
            p[(v >> 20) & 1023],
            p[(v >> 10) & 1023],
            p[v & 1023],
        )
    )


_DIGIT_OF_BYTE = bytes(ord(_CROCKFORD[byte & 31]) for byte in range(256))
"""A byte's low five bits as a Crockford base32 digit, for ``bytes.translate``."""


def new_run_ids(count: int) -> list[str]:
    """``count`` new run ids laid out as :func:`new_run_id` lays one out, in
    ascending order, made together: for a backend creating a batch
    (:meth:`~reflow_core.storage.Storage.create_runs`), whose runs then get
    ids in the batch's order and whose inserts append to the indexes on the
    id. About six times cheaper per id than :func:`new_run_id`.

    The first ten digits (two zero bits and the millisecond) are the same
    for the whole batch; each of the last sixteen holds five random bits,
    the low bits of a random byte, so one ``bytes.translate`` makes the
    random digits of every id at once."""
    stamp = new_run_id()[:10]
    digits = os.urandom(16 * count).translate(_DIGIT_OF_BYTE).decode("ascii")
    ids = [stamp + digits[start : start + 16] for start in range(0, 16 * count, 16)]
    ids.sort()
    return ids


def utcnow() -> datetime:
    """The local clock as an aware UTC datetime."""
    return datetime.now(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


def from_epoch_us(value: int) -> datetime:
    """An aware UTC datetime from microseconds since the Unix epoch.

    A value outside datetime's years 1-9999 reads as the nearest
    representable time instead of failing: nothing is written out of range
    now (durations are bounded), but an older version could store a wake-up
    time in the year 33,715, and every read of that run used to fail."""
    try:
        return _EPOCH + timedelta(microseconds=value)
    except OverflowError:
        return _LATEST if value > 0 else _EARLIEST


_ONE_US = timedelta(microseconds=1)


def to_epoch_us(value: datetime, what: str = "datetime") -> int:
    """Microseconds since the Unix epoch for an aware datetime; a naive one
    is refused with :func:`check_aware`, naming ``what``."""
    return (check_aware(value, what) - _EPOCH) // _ONE_US


def span_us(value: timedelta) -> int:
    """A duration in whole microseconds."""
    return value // _ONE_US


def as_utc(value: datetime) -> datetime:
    """``value`` (aware) expressed in UTC, as records carry it."""
    return value if value.tzinfo is UTC else value.astimezone(UTC)


# -- rows -----------------------------------------------------------------------

RUN_COLUMNS = (
    "id, workflow, status, input, output, error, idempotency_key, attempts, reclaims, "
    "lease_epoch, created_at, updated_at, wake_at, waiting_for, lease_expires_at, deadline_at, "
    "parent_id, parent_step, priority, limit_key1, limit_max1, limit_key2, limit_max2, "
    "blocked_by, rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2, "
    "debounce_key, headers, version, fingerprint"
)
"""The column order :func:`run_from_row` reads (the :class:`RunRecord` fields)."""
STEP_COLUMNS = "name, status, output, error, attempts, wake_at, completed_at"
"""The column order :func:`step_from_row` reads (the :class:`StepRecord` fields)."""
SCHEDULE_COLUMNS = "key, workflow, input, recurrence, next_run_at, created_at, updated_at, paused"
"""The column order :func:`schedule_from_row` reads (the :class:`ScheduleRecord` fields)."""

TimeReader = Callable[[Any], datetime]
"""Turns a stored, non-null time (epoch microseconds, a driver's datetime,
...) into an aware UTC datetime: :func:`from_epoch_us` or :func:`as_utc`."""


def run_from_row(row: Sequence[Any], time: TimeReader) -> RunRecord:
    """A :class:`RunRecord` from a row in :data:`RUN_COLUMNS` order, times read by ``time``."""
    wake_at = row[12]
    expires = row[14]
    deadline = row[15]
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
        created_at=time(row[10]),
        updated_at=time(row[11]),
        wake_at=None if wake_at is None else time(wake_at),
        waiting_for=row[13],
        lease_expires_at=None if expires is None else time(expires),
        deadline_at=None if deadline is None else time(deadline),
        parent_id=row[16],
        parent_step=row[17],
        priority=row[18],
        limits=limits_from_columns(row[19], row[20], row[21], row[22]),
        blocked_by=row[23],
        rates=rates_from_columns(*row[24:30]),
        debounce_key=row[30],
        headers=headers_from_column(row[31]),
        version=row[32],
        fingerprint=row[33],
    )


def limit_columns(
    limits: Sequence[ConcurrencyLimit],
) -> tuple[str | None, int | None, str | None, int | None]:
    """A run's limits as the four columns ``limit_key1, limit_max1,
    limit_key2, limit_max2`` (``None`` where it has fewer)."""
    padded: list[ConcurrencyLimit | None] = [*limits, None, None]
    first, second = padded[0], padded[1]
    return (
        None if first is None else first.key,
        None if first is None else first.max,
        None if second is None else second.key,
        None if second is None else second.max,
    )


def limits_from_columns(
    key1: str | None, max1: int | None, key2: str | None, max2: int | None
) -> tuple[ConcurrencyLimit, ...]:
    """Inverse of :func:`limit_columns`."""
    found = []
    if key1 is not None and max1 is not None:
        found.append(ConcurrencyLimit(key1, max1))
    if key2 is not None and max2 is not None:
        found.append(ConcurrencyLimit(key2, max2))
    return tuple(found)


def rate_columns(
    rates: Sequence[RateLimit],
) -> tuple[str | None, int | None, int | None, str | None, int | None, int | None]:
    """A run's rate limits as the six columns ``rate_key1, rate_max1,
    rate_period1, rate_key2, rate_max2, rate_period2`` (periods in
    microseconds; ``None`` where it has fewer)."""
    padded: list[RateLimit | None] = [*rates, None, None]
    first, second = padded[0], padded[1]
    return (
        None if first is None else first.key,
        None if first is None else first.max,
        None if first is None else span_us(first.period),
        None if second is None else second.key,
        None if second is None else second.max,
        None if second is None else span_us(second.period),
    )


def rates_from_columns(
    key1: str | None,
    max1: int | None,
    period1: int | None,
    key2: str | None,
    max2: int | None,
    period2: int | None,
) -> tuple[RateLimit, ...]:
    """Inverse of :func:`rate_columns`."""
    found = []
    if key1 is not None and max1 is not None and period1 is not None:
        found.append(RateLimit(key1, max1, timedelta(microseconds=period1)))
    if key2 is not None and max2 is not None and period2 is not None:
        found.append(RateLimit(key2, max2, timedelta(microseconds=period2)))
    return tuple(found)


def check_rates(rates: object) -> None:
    """Refuse, with :class:`~reflow_core.errors.ConfigError`, rates that are
    not a tuple of at most :data:`~reflow_core.storage.MAX_RUN_RATES`
    :class:`~reflow_core.storage.RateLimit` with distinct, valid keys, a
    ``max`` from 1 to :data:`~reflow_core.storage.MAX_RATE` and a ``period``
    of whole milliseconds from 1 ms to
    :data:`~reflow_core.storage.MAX_RATE_PERIOD`."""
    if not isinstance(rates, tuple) or len(rates) > MAX_RUN_RATES:
        raise ConfigError(
            f"rates must be a tuple of at most {MAX_RUN_RATES} RateLimit, got {rates!r}",
            option="rates",
        )
    keys = set()
    for rate in rates:
        if not isinstance(rate, RateLimit):
            raise ConfigError(f"rates must hold RateLimit, not {rate!r}", option="rates")
        check_text(rate.key, "rate key")
        if (
            isinstance(rate.max, bool)
            or not isinstance(rate.max, int)
            or not 1 <= rate.max <= MAX_RATE
        ):
            raise ConfigError(
                f"the max of rate {rate.key!r} must be an int from 1 to {MAX_RATE}, "
                f"got {rate.max!r}",
                option="rates",
            )
        period = rate.period
        if (
            not isinstance(period, timedelta)
            or not timedelta(milliseconds=1) <= period <= MAX_RATE_PERIOD
            or period.microseconds % 1000
        ):
            raise ConfigError(
                f"the period of rate {rate.key!r} must be a timedelta of whole milliseconds "
                f"from 1 ms to {MAX_RATE_PERIOD}, got {period!r}",
                option="rates",
            )
        if rate.key in keys:
            raise ConfigError(f"rate key {rate.key!r} is given twice", option="rates")
        keys.add(rate.key)


_HEADER_NAME = re.compile(r"[a-z0-9_.-]{1,64}")


def check_headers(headers: object) -> None:
    """Refuse, with :class:`~reflow_core.errors.ConfigError`, headers that
    are not a mapping of at most :data:`~reflow_core.storage.MAX_HEADERS`
    names of 1-64 characters from ``a-z 0-9 - _ .`` to values of printable
    ASCII (space to ``~``), within
    :data:`~reflow_core.storage.MAX_HEADER_BYTES` in all. A value is never
    shown in the error (it may be a secret)."""
    if not isinstance(headers, Mapping):
        raise ConfigError(
            f"headers must be a mapping of str to str, not {type(headers).__name__}",
            option="headers",
        )
    if len(headers) > MAX_HEADERS:
        raise ConfigError(
            f"a run carries at most {MAX_HEADERS} headers, got {len(headers)}", option="headers"
        )
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ConfigError(
                f"header name {name!r} must be 1-64 characters from a-z 0-9 - _ .",
                option="headers",
            )
        if not isinstance(value, str) or not all(" " <= char <= "~" for char in value):
            raise ConfigError(
                f"the value of header {name!r} must be a str of printable ASCII",
                option="headers",
            )
        size += len(name) + len(value)
    if size > MAX_HEADER_BYTES:
        raise ConfigError(
            f"a run's headers weigh at most {MAX_HEADER_BYTES} bytes, got {size}",
            option="headers",
        )


def headers_column(headers: Mapping[str, str]) -> str | None:
    """A run's headers as one text column: a JSON object with sorted names,
    or ``None`` for none."""
    if not headers:
        return None
    return json.dumps(dict(sorted(headers.items())), separators=(",", ":"))


def headers_from_column(text: str | None) -> dict[str, str]:
    """Inverse of :func:`headers_column`."""
    if not text:
        return {}
    loaded = json.loads(text)
    return {str(name): str(value) for name, value in loaded.items()}


def rate_block(key: str) -> str:
    """``blocked_by`` of a run blocked by the rate limit with ``key``."""
    return RATE_BLOCK_PREFIX + key


def debounced_record(open_run: RunRecord, new: NewRun, now: datetime) -> RunRecord:
    """``open_run`` (the workflow's open run with ``new.debounce_key``) as a
    debounced create at ``now`` leaves it: ``new``'s input, priority, limits,
    rates and headers, unblocked, due ``new.delay`` from now (never after its
    deadline), its id, creation and deadline kept."""
    delayed = is_delayed(new)
    wake_at = now + new.delay if delayed and new.delay is not None else now
    return dataclasses.replace(
        open_run,
        status="delayed" if delayed else "pending",
        input=new.input,
        priority=new.priority,
        limits=new.limits,
        rates=new.rates,
        headers=dict(new.headers),
        version=new.version,
        fingerprint=new.fingerprint,
        blocked_by=None,
        wake_at=due_by_deadline(wake_at, open_run.deadline_at),
        updated_at=now,
    )


def is_open_for_debounce(record: RunRecord) -> bool:
    """Whether a debounced create replaces ``record``: pending or delayed and
    never claimed."""
    return record.status in ("pending", "delayed") and record.attempts == 0


def check_limits(priority: object, limits: object) -> None:
    """Refuse, with :class:`~reflow_core.errors.ConfigError`, a priority that
    is not an int within :data:`~reflow_core.storage.PRIORITY_RANGE`, and
    limits that are not a tuple of at most
    :data:`~reflow_core.storage.MAX_RUN_LIMITS`
    :class:`~reflow_core.storage.ConcurrencyLimit` with distinct, valid keys
    and a ``max`` of at least 1."""
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise ConfigError(
            f"priority must be an int from {low} to {high}, got {priority!r}", option="priority"
        )
    if not isinstance(limits, tuple) or len(limits) > MAX_RUN_LIMITS:
        raise ConfigError(
            f"limits must be a tuple of at most {MAX_RUN_LIMITS} ConcurrencyLimit, got {limits!r}",
            option="limits",
        )
    keys = set()
    for limit in limits:
        if not isinstance(limit, ConcurrencyLimit):
            raise ConfigError(f"limits must hold ConcurrencyLimit, not {limit!r}", option="limits")
        check_text(limit.key, "limit key")
        if limit.key.startswith(RATE_BLOCK_PREFIX):
            raise ConfigError(
                f"limit key {limit.key!r}: keys starting with {RATE_BLOCK_PREFIX!r} are reserved",
                option="limits",
            )
        if isinstance(limit.max, bool) or not isinstance(limit.max, int) or limit.max < 1:
            raise ConfigError(
                f"the max of limit {limit.key!r} must be an int of at least 1, got {limit.max!r}",
                option="limits",
            )
        if limit.key in keys:
            raise ConfigError(f"limit key {limit.key!r} is given twice", option="limits")
        keys.add(limit.key)


def step_from_row(row: Sequence[Any], time: TimeReader) -> StepRecord:
    """A :class:`StepRecord` from a row in :data:`STEP_COLUMNS` order."""
    wake_at = row[5]
    completed = row[6]
    return StepRecord(
        name=row[0],
        status=cast(StepStatus, row[1]),
        output=row[2],
        error=row[3],
        attempts=row[4],
        wake_at=None if wake_at is None else time(wake_at),
        completed_at=None if completed is None else time(completed),
    )


def schedule_from_row(row: Sequence[Any], time: TimeReader) -> ScheduleRecord:
    """A :class:`ScheduleRecord` from a row in :data:`SCHEDULE_COLUMNS` order."""
    return ScheduleRecord(
        key=row[0],
        workflow=row[1],
        input=row[2],
        recurrence=row[3],
        next_run_at=time(row[4]),
        created_at=time(row[5]),
        updated_at=time(row[6]),
        paused=bool(row[7]),
    )


WORKER_COLUMNS = (
    "id, host, pid, workflows, concurrency, in_flight, started_at, last_seen_at, expires_at"
)
"""The column order :func:`worker_from_row` reads (the :class:`WorkerRecord` fields);
``workflows`` is stored as :func:`encode_workflows` text."""


def worker_from_row(row: Sequence[Any], time: TimeReader) -> WorkerRecord:
    """A :class:`WorkerRecord` from a row in :data:`WORKER_COLUMNS` order."""
    return WorkerRecord(
        id=row[0],
        host=row[1],
        pid=int(row[2]),
        workflows=decode_workflows(row[3]),
        concurrency=int(row[4]),
        in_flight=int(row[5]),
        started_at=time(row[6]),
        last_seen_at=time(row[7]),
        expires_at=time(row[8]),
    )


def encode_workflows(workflows: Sequence[str]) -> str:
    """A worker's workflow names as one text value (a JSON array), for a column or field."""
    return json.dumps(list(workflows), ensure_ascii=False, separators=(",", ":"))


def decode_workflows(text: str) -> tuple[str, ...]:
    """The names :func:`encode_workflows` stored."""
    names = json.loads(text)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StorageError(f"a worker's stored workflows are not a list of names: {text!r}")
    return tuple(names)


def check_worker(worker: WorkerInfo, ttl: object) -> None:
    """Refuse a worker announcement no store should keep, naming the field:
    :func:`check_text` on the id, host and every workflow name, a negative
    pid or in-flight count, a concurrency below 1, and a ``ttl`` that is not a
    positive :func:`check_duration`."""
    check_text(worker.id, "worker.id")
    check_text(worker.host, "worker.host")
    for field, value, least in (
        ("pid", worker.pid, 0),
        ("concurrency", worker.concurrency, 1),
        ("in_flight", worker.in_flight, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(
                f"worker.{field} must be an int of at least {least}, got {value!r}",
                option=f"worker.{field}",
            )
    if not isinstance(worker.workflows, tuple):
        raise ConfigError(
            f"worker.workflows must be a tuple of names, got {type(worker.workflows).__name__}",
            option="worker.workflows",
        )
    for name in worker.workflows:
        check_text(name, "worker.workflows[]")
    if check_duration(ttl, "ttl") <= timedelta(0):
        raise ConfigError(f"ttl must be positive, got {ttl!r}", option="ttl")


def check_stats_workflows(workflows: Collection[str] | None) -> list[str] | None:
    """The workflow names :meth:`~reflow_core.storage.Storage.queue_stats` was
    given, checked with :func:`check_text`, without repeats, sorted (``None``
    stays ``None``). A bare string is refused: it is a collection of letters."""
    if workflows is None:
        return None
    if isinstance(workflows, str):
        raise ConfigError(
            f"workflows must be a collection of names, not the string {workflows!r}",
            option="workflows",
        )
    return sorted({check_text(name, "workflows[]") for name in workflows})


StatsRow = tuple[str, str, int, "datetime | None"]
"""``(workflow, status, count, oldest pending wake_at)``, as a backend counts them."""


def queue_stats_from_counts(
    rows: Iterable[StatsRow], workflows: Sequence[str] | None
) -> list[QueueStats]:
    """Assemble :class:`QueueStats`, ordered by workflow, from per-status counts:
    one entry per named workflow (zeros included), or per workflow counted."""
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, datetime] = {}
    for workflow, status, count, since in rows:
        if count <= 0:
            continue
        counts.setdefault(workflow, {})[status] = counts.get(workflow, {}).get(status, 0) + count
        if status == "pending" and since is not None:
            earlier = oldest.get(workflow)
            oldest[workflow] = since if earlier is None or since < earlier else earlier
    names = sorted(counts) if workflows is None else sorted(workflows)
    return [
        QueueStats(
            workflow=name,
            delayed=counts.get(name, {}).get("delayed", 0),
            pending=counts.get(name, {}).get("pending", 0),
            running=counts.get(name, {}).get("running", 0),
            sleeping=counts.get(name, {}).get("sleeping", 0),
            waiting=counts.get(name, {}).get("waiting", 0),
            oldest_pending_since=oldest.get(name),
        )
        for name in names
    ]


_MINUTE = timedelta(minutes=1)


def minute_of(value: datetime) -> datetime:
    """The start of the minute ``value`` falls in, in UTC (seconds and
    microseconds zero): the minute a run that finished at ``value`` counts in."""
    return as_utc(value).replace(second=0, microsecond=0)


def history_start(now: datetime, minutes: int) -> datetime:
    """The first minute :meth:`~reflow_core.storage.Storage.finished_history`
    reports for ``minutes`` at ``now`` (the storage's now): the current
    minute and the ``minutes - 1`` before it. ``minutes`` is checked with
    :func:`check_count` against :data:`~reflow_core.storage.MAX_HISTORY_MINUTES`."""
    minutes = check_count(minutes, "minutes", most=MAX_HISTORY_MINUTES)
    return minute_of(now) - (minutes - 1) * _MINUTE


HistoryRow = tuple[datetime, str, int]
"""``(minute, status, count)``: how many runs finished with ``status`` in the
minute starting at ``minute``, as a backend counts them."""


def finished_minutes_from_counts(rows: Iterable[HistoryRow]) -> list[FinishedMinute]:
    """Assemble :class:`FinishedMinute` entries, oldest first, from per-minute,
    per-status counts (a minute or status may come in several rows; minutes
    whose counts are all zero are left out)."""
    counts: dict[datetime, dict[str, int]] = {}
    for minute, status, count in rows:
        if count <= 0:
            continue
        if status not in ("completed", "failed", "cancelled"):
            raise StorageError(f"finished_history counted a run of status {status!r}")
        by_status = counts.setdefault(minute_of(minute), {})
        by_status[status] = by_status.get(status, 0) + count
    return [
        FinishedMinute(
            minute=minute,
            completed=by_status.get("completed", 0),
            failed=by_status.get("failed", 0),
            cancelled=by_status.get("cancelled", 0),
        )
        for minute, by_status in sorted(counts.items())
    ]


def new_run_record(
    run_id: str,
    new: NewRun,
    now: datetime,
    *,
    parent: RunRecord | None = None,
    parent_step: str | None = None,
) -> RunRecord:
    """The record of a run just created from ``new`` at ``now``: pending, due
    at once (or delayed, due after ``new.delay``), never attempted, with no
    output, error or lease. With ``parent``, a child run of ``parent`` started
    at ``parent_step`` (:meth:`~reflow_core.storage.Storage.start_child`),
    whose deadline is at the latest the parent's (:func:`child_deadline`)."""
    delayed = is_delayed(new)
    deadline_at = None if new.deadline is None else now + new.deadline
    if parent is not None:
        deadline_at = child_deadline(deadline_at, parent.deadline_at)
    wake_at = now + new.delay if delayed and new.delay is not None else now
    return RunRecord(
        id=run_id,
        workflow=new.workflow,
        status="delayed" if delayed else "pending",
        input=new.input,
        output=None,
        error=None,
        idempotency_key=new.idempotency_key,
        attempts=0,
        reclaims=0,
        lease_epoch=0,
        created_at=now,
        updated_at=now,
        wake_at=due_by_deadline(wake_at, deadline_at),
        deadline_at=deadline_at,
        parent_id=None if parent is None else parent.id,
        parent_step=parent_step,
        priority=new.priority,
        limits=new.limits,
        rates=new.rates,
        debounce_key=new.debounce_key,
        headers=dict(new.headers),
        version=new.version,
        fingerprint=new.fingerprint,
    )


def child_deadline(own: datetime | None, parent: datetime | None) -> datetime | None:
    """A child run's ``deadline_at``: the earlier of its own (``now +
    NewRun.deadline``) and its parent's, either of which may be absent."""
    if own is None:
        return parent
    return own if parent is None or own < parent else parent


def due_by_deadline(wake_at: datetime | None, deadline_at: datetime | None) -> datetime | None:
    """When a delayed, sleeping or waiting run becomes claimable: at its
    ``wake_at`` (``None``: only an event wakes it), or at its deadline if that
    comes first, so the engine can fail it then."""
    if deadline_at is None:
        return wake_at
    return deadline_at if wake_at is None or deadline_at < wake_at else wake_at


def is_delayed(new: NewRun) -> bool:
    """Whether ``new`` is created ``delayed``: it has a positive ``delay``."""
    return new.delay is not None and new.delay > timedelta(0)


def run_page(records: Sequence[RunRecord], limit: int) -> RunPage:
    """The :class:`RunPage` of a ``list_runs`` that fetched up to ``limit + 1``
    records (newest first): the first ``limit``, and a cursor after the last
    of them when there were more."""
    page = list(records[:limit])
    more = len(records) > limit
    return RunPage(page, encode_cursor(page[-1].created_at, page[-1].id) if more else None)


# -- lifecycle ------------------------------------------------------------------


class Lifecycle:
    """The state every storage guards its operations with: usable only
    between :meth:`Storage.initialize` and :meth:`Storage.close`.

    ``check(operation)`` raises the same :class:`StorageError` on every
    backend for a closed storage and one never initialized.
    """

    __slots__ = ("backend", "closed", "initialized")

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.initialized = False
        self.closed = False

    def check(self, operation: str) -> None:
        """Refuse ``operation`` unless the storage is initialized and open."""
        if self.closed:
            raise StorageError("storage is closed", operation=operation, backend=self.backend)
        if not self.initialized:
            raise StorageError(
                "storage is not initialized; call initialize() first",
                operation=operation,
                backend=self.backend,
            )

    def check_open(self, operation: str = "initialize") -> None:
        """Refuse ``operation`` (by default ``initialize``) on a closed storage."""
        if self.closed:
            raise StorageError("storage is closed", operation=operation, backend=self.backend)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self.initialized else "new"
        return f"<Lifecycle {self.backend} {state}>"


# -- purging --------------------------------------------------------------------


def check_purge_limit(limit: object) -> int | None:
    """Refuse a ``purge_finished`` ``limit`` that is neither ``None`` nor an int >= 1."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be an integer >= 1 or None, got {limit!r}", option="limit")
    return limit


async def purge_in_batches(
    delete: Callable[[int], Awaitable[tuple[int, bool]]], batch: int, limit: int | None
) -> int:
    """The loop of every ``purge_finished``: call ``delete(n)`` with the size
    of the next batch (at most ``batch``, and no more than ``limit`` leaves)
    until it reports no more runs due or ``limit`` runs are gone. ``delete``
    returns how many runs it deleted and whether more may be due (it found a
    full batch). Returns the total deleted."""
    total = 0
    while limit is None or total < limit:
        size = batch if limit is None else min(batch, limit - total)
        deleted, more = await delete(size)
        total += deleted
        if not more:
            break
    return total


# -- SQL files ------------------------------------------------------------------

_SECTION = re.compile(r"^--\s*name:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$", re.MULTILINE)
_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render_sql(template: str, slots: Mapping[str, str], *, where: str = "SQL") -> str:
    """Fill the ``{name}`` slots of ``template`` from ``slots``. A slot with
    no value is a programming error and raises ``KeyError`` naming it and
    ``where``. Slots hold the package's own identifiers and fragments, never
    user data: every value is a bound parameter."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        try:
            return slots[name]
        except KeyError:
            raise KeyError(f"{where}: no value for slot {{{name}}}") from None

    return _SLOT.sub(fill, template)


def load_queries(
    package: str, filename: str, slots: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The named statements of ``filename`` (a resource of ``package``),
    rendered once: each ``-- name: <name>`` line starts a statement that
    runs to the next one. A statement may use another one of the file as a
    slot (``{fence}`` inserts the statement named ``fence``) and any slot of
    ``slots``; comments and surrounding blank lines are kept out of the text.
    """
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    raw: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in raw:
            raise ValueError(f"{package}/{filename}: statement {name!r} is defined twice")
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        raw[name] = "\n".join(lines).strip().rstrip(";").strip()
    given = dict(slots or {})
    done: dict[str, str] = {}

    def resolve(name: str, trail: tuple[str, ...]) -> str:
        if name in done:
            return done[name]
        if name in trail:
            raise ValueError(f"{package}/{filename}: statements refer to each other: {trail}")
        lookup = _Slots(given, raw, lambda other: resolve(other, (*trail, name)))
        done[name] = render_sql(raw[name], lookup, where=f"{package}/{filename}:{name}")
        return done[name]

    for name in raw:
        resolve(name, ())
    return done


class _Slots(Mapping[str, str]):
    """Slot values: the caller's first, then the file's own statements."""

    def __init__(
        self, given: Mapping[str, str], raw: Mapping[str, str], resolve: Callable[[str], str]
    ) -> None:
        self._given = given
        self._raw = raw
        self._resolve = resolve

    def __getitem__(self, key: str) -> str:
        if key in self._given:
            return self._given[key]
        if key in self._raw:
            return self._resolve(key)
        raise KeyError(key)

    def __iter__(self) -> Any:
        return iter({**self._raw, **self._given})

    def __len__(self) -> int:
        return len({**self._raw, **self._given})


def encode_cursor(created_at: datetime, run_id: str) -> str:
    """An opaque keyset cursor for the position just after ``(created_at, run_id)``."""
    raw = f"{created_at.astimezone(UTC).isoformat()}|{run_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of :func:`encode_cursor`; a malformed cursor raises :class:`ConfigError`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, sep, run_id = raw.partition("|")
        created = datetime.fromisoformat(stamp)
        if not sep or not run_id or created.tzinfo is None:
            raise ValueError(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"malformed list cursor {cursor!r}", option="cursor") from exc
    return created, run_id


def check_status_update(status: str, lease: Lease | None) -> None:
    """Refuse arguments :meth:`Storage.update_run_status` never accepts, before
    touching the store: an unknown target status, or ``pending`` without a lease."""
    if status not in ("pending", "cancelled", "failed"):
        raise ConfigError(
            f"update_run_status moves a run to 'pending', 'cancelled' or 'failed', not {status!r}",
            option="status",
        )
    if status == "pending" and lease is None:
        raise ConfigError("handing a run back to 'pending' requires its lease", option="lease")


def check_list_limit(limit: object) -> int:
    """Refuse a :meth:`Storage.list_runs` ``limit`` that is not an int of at least 1."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive int, got {limit!r}", option="limit")
    return limit


def check_count(value: object, what: str, *, most: int | None = None) -> int:
    """Refuse a count argument (the ``limit`` of
    :meth:`~reflow_core.storage.Storage.find_runs_by_key` and
    :meth:`~reflow_core.storage.Storage.list_buffered_events`, the ``minutes``
    of :meth:`~reflow_core.storage.Storage.finished_history`) that is not an
    int of at least 1, or above ``most`` when given, naming ``what`` and the
    value. Returns ``value``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (most is not None and value > most)
    ):
        wanted = "of at least 1" if most is None else f"from 1 to {most}"
        raise ConfigError(f"{what} must be an int {wanted}, got {value!r}", option=what)
    return value


def check_finish_status(status: str) -> None:
    """Refuse a :meth:`Storage.finish_run` status other than ``completed`` or ``failed``."""
    if status not in ("completed", "failed"):
        raise ConfigError(
            f"finish_run ends a run as 'completed' or 'failed', not {status!r}", option="status"
        )


def check_purge(older_than: object, batch: object) -> int:
    """Refuse the arguments of a backend's ``purge_finished`` that can never
    work; returns ``batch`` as an int."""
    if not isinstance(older_than, timedelta) or older_than < timedelta(0):
        raise ConfigError(
            f"older_than must be a non-negative timedelta, got {older_than!r}",
            option="older_than",
        )
    if isinstance(batch, str) and batch.strip().isdigit():
        batch = int(batch.strip())
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1, got {batch!r}", option="batch")
    return batch


def check_aware(value: datetime, what: str) -> datetime:
    """Refuse a naive datetime (one without a UTC offset), naming ``what``."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigError(f"{what} must be a timezone-aware datetime, got {value!r}", option=what)
    return value


def check_text(value: object, what: str) -> str:
    """Refuse a name, id or key that not every store can keep, the same way on
    every backend: anything but a non-empty ``str``, or one holding a NUL or
    a lone surrogate (PostgreSQL's ``text`` keeps neither; neither encodes to
    UTF-8). Returns ``value``.

    Backends call it on every name, run id, key and event id they are given,
    before touching the store; the engine checks workflow, step and event
    names with it when a workflow is defined.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}", option=what)
    if not value:
        raise ConfigError(f"{what} must be a non-empty string", option=what)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"{what} {value!r} contains a lone surrogate, which no store can keep",
                option=what,
            ) from None
    if "\x00" in value:
        raise ConfigError(f"{what} {value!r} contains a NUL character", option=what)
    return value


def check_duration(value: object, what: str) -> timedelta:
    """Refuse a duration a backend is given that is not a ``timedelta``
    from zero to :data:`~reflow_core._durations.MAX_DURATION` (100 years), so
    every deadline the backend computes from its clock can be stored and read
    back. Returns ``value``."""
    if not isinstance(value, timedelta) or not timedelta(0) <= value <= MAX_DURATION:
        raise ConfigError(
            f"{what} must be a timedelta from 0 to {describe(MAX_DURATION.total_seconds())}, "
            f"got {value!r}",
            option=what,
        )
    return value


def check_new_run(new: NewRun) -> None:
    """:func:`check_text` on the names and keys of a run to create, and
    :func:`check_duration` on its ``delay`` and ``deadline``."""
    check_text(new.workflow, "workflow")
    if new.idempotency_key is not None:
        check_text(new.idempotency_key, "idempotency_key")
    if new.run_id is not None:
        check_text(new.run_id, "run_id")
    if new.delay is not None:
        check_duration(new.delay, "delay")
    if new.deadline is not None:
        check_duration(new.deadline, "deadline")
    check_limits(new.priority, new.limits)
    check_rates(new.rates)
    check_headers(new.headers)
    check_version(new.version, "version")
    if new.fingerprint is not None:
        check_fingerprint(new.fingerprint)
    if new.debounce_key is not None:
        check_text(new.debounce_key, "debounce_key")
        if new.idempotency_key is not None:
            raise ConfigError(
                "a run takes a debounce_key or an idempotency_key, not both",
                option="debounce_key",
            )


def check_version(value: object, what: str) -> int:
    """Refuse, with :class:`~reflow_core.errors.ConfigError`, a workflow
    version that is not an int from 1 to :data:`~reflow_core.storage.MAX_VERSION`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise ConfigError(
            f"{what} must be an int from 1 to {MAX_VERSION}, got {value!r}", option="version"
        )
    return value


_FINGERPRINT_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


def check_fingerprint(value: object) -> str:
    """Refuse, with :class:`~reflow_core.errors.ConfigError`, a fingerprint
    that is not 1 to :data:`~reflow_core.storage.MAX_FINGERPRINT` characters
    of ``0-9 a-z``."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_FINGERPRINT
        or not _FINGERPRINT_CHARS.issuperset(value)
    ):
        shown = repr(value) if isinstance(value, str) and len(value) <= 80 else type(value).__name__
        raise ConfigError(
            f"fingerprint must be 1 to {MAX_FINGERPRINT} characters of 0-9 a-z, got {shown}",
            option="fingerprint",
        )
    return value


def check_claim_versions(
    workflows: Collection[str], versions: Mapping[str, Collection[int]] | None
) -> dict[str, tuple[int, ...]] | None:
    """What :meth:`~reflow_core.storage.Storage.claim_runs` checks of its
    ``versions`` before it claims anything: a mapping whose keys are among
    ``workflows``, each to a non-empty collection of versions
    (:func:`check_version`). Returns it with each collection sorted and
    without repeats, or ``None`` for ``None``; raises
    :class:`~reflow_core.errors.ConfigError` naming the offending entry."""
    if versions is None:
        return None
    if not isinstance(versions, Mapping):
        raise ConfigError(
            f"versions must be a mapping of workflow to versions, not {type(versions).__name__}",
            option="versions",
        )
    names = set(workflows)
    out: dict[str, tuple[int, ...]] = {}
    for workflow, served in versions.items():
        if workflow not in names:
            raise ConfigError(
                f"versions names workflow {workflow!r}, which the claim does not ask for",
                option="versions",
            )
        if isinstance(served, (str, bytes)) or not isinstance(served, Collection) or not served:
            raise ConfigError(
                f"versions[{workflow!r}] must be a non-empty collection of ints, got {served!r}",
                option="versions",
            )
        out[workflow] = tuple(
            sorted({check_version(v, f"versions[{workflow!r}] item") for v in served})
        )
    return out


def serves_version(versions: Mapping[str, Collection[int]] | None, record: RunRecord) -> bool:
    """Whether a claim with ``versions`` (checked by :func:`check_claim_versions`)
    may take ``record``: its workflow is not a key, or its version is listed."""
    if versions is None:
        return True
    served = versions.get(record.workflow)
    return served is None or record.version in served


def check_new_runs(news: Sequence[NewRun], *, backend: str | None = None) -> None:
    """What :meth:`~reflow_core.storage.Storage.create_runs` checks before it
    writes anything: at most :data:`~reflow_core.storage.MAX_CREATE_BATCH`
    items, :func:`check_new_run` on each (its error names the item's index)
    and no caller-chosen ``run_id`` twice (a
    :class:`~reflow_core.errors.StorageError` naming both items)."""
    if len(news) > MAX_CREATE_BATCH:
        raise ConfigError(
            f"create_runs takes at most {MAX_CREATE_BATCH} runs at once, not {len(news)}",
            option="news",
        )
    ids: dict[str, int] = {}
    for index, new in enumerate(news):
        try:
            check_new_run(new)
        except ConfigError as exc:
            raise ConfigError(f"item {index}: {exc}", option=exc.option) from exc
        if new.run_id is not None:
            first = ids.setdefault(new.run_id, index)
            if first != index:
                raise StorageError(
                    f"items {first} and {index} both ask for run id {new.run_id!r}",
                    operation="create_runs",
                    backend=backend,
                )


def check_run_ids(run_ids: Collection[str]) -> list[str]:
    """What :meth:`~reflow_core.storage.Storage.get_runs` checks before it
    reads: each id a text :func:`check_text` takes, at most
    :data:`~reflow_core.storage.MAX_GET_RUNS` of them (a
    :class:`~reflow_core.errors.ConfigError` otherwise). Returns the
    distinct ids, in the order first given."""
    if isinstance(run_ids, str):
        raise ConfigError(
            "run_ids must be a collection of run ids, not one string", option="run_ids"
        )
    ids = list(dict.fromkeys(check_text(run_id, "run_id") for run_id in run_ids))
    if len(ids) > MAX_GET_RUNS:
        raise ConfigError(
            f"get_runs reads at most {MAX_GET_RUNS} runs at once, not {len(ids)}",
            option="run_ids",
        )
    return ids


def check_new_child(new: NewRun) -> None:
    """:func:`check_new_run`, and what :meth:`~reflow_core.storage.Storage.start_child`
    adds: a ``run_id`` is required and an ``idempotency_key`` refused (the
    child's id is what makes starting it idempotent)."""
    check_new_run(new)
    if new.run_id is None:
        raise ConfigError("a child run needs a run_id (derived from its parent)", option="run_id")
    if new.idempotency_key is not None:
        raise ConfigError(
            "a child run takes no idempotency_key: its run_id makes starting it idempotent",
            option="idempotency_key",
        )
    if new.debounce_key is not None:
        raise ConfigError("a child run takes no debounce_key", option="debounce_key")


def check_child_start(lease: Lease, step: str, new: NewRun) -> None:
    """The arguments of :meth:`~reflow_core.storage.Storage.start_child`:
    :func:`check_text` on the parent's id and the step, and :func:`check_new_child`."""
    check_text(lease.run_id, "run_id")
    check_text(step, "step")
    check_new_child(new)
    if new.run_id == lease.run_id:
        raise ConfigError("a run cannot be its own child", option="run_id")


def child_of(record: RunRecord, parent_id: str, step: str) -> bool:
    """Whether ``record`` is the child of run ``parent_id`` started at ``step``."""
    return record.parent_id == parent_id and record.parent_step == step
