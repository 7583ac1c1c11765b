"""What each page shows, read from the storage, and a fingerprint of it.

A loader reads the records a page shows through the :class:`Storage`
protocol and nothing else; its fingerprint is a short hash of the fields
the page renders, so the live stream can tell when the page would look
different without rendering it. Stored values are decoded and laid out
(pretty JSON, error lines) with the helpers of the ``reflow`` command, so
the page and ``reflow runs show`` say the same thing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from reflow_core.adapter import minute_of
from reflow_core.admin import (
    ACTIVE_STATUSES,
    RESUMABLE_STATUSES,
    STATUSES,
    compact,
    decode_stored,
    error_lines,
    error_summary,
    pretty,
    recurrence_text,
    visible_steps,
)
from reflow_core.errors import ConfigError
from reflow_core.limits import Rate, hold_reason
from reflow_core.storage import (
    CHILDREN_WAIT_PREFIX,
    MAX_HISTORY_MINUTES,
    TERMINAL_STATUSES,
    BufferedEvent,
    FinishedMinute,
    QueueStats,
    RunRecord,
    ScheduleRecord,
    StepRecord,
    Storage,
    WorkerRecord,
)
from reflow_core.versions import held_reason, is_held

from ._charts import Chart, build_chart

__all__ = [
    "ACTIVE_STATUSES",
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "STATUSES",
    "ErrorView",
    "OverviewView",
    "RunFilters",
    "RunView",
    "RunsView",
    "SchedulesView",
    "StoredValue",
    "WorkersView",
    "WorkflowNames",
    "fingerprint",
    "load_overview",
    "load_run",
    "load_runs",
    "load_schedules",
    "load_workers",
]

DEFAULT_PAGE = 50
"""Runs per page of the runs list."""
MAX_PAGE = 500
KEY_MATCHES = 100
"""Runs shown at most for an idempotency key."""
EVENTS_SHOWN = 100
"""Buffered events shown at most on a run's page."""


def fingerprint(*parts: object) -> str:
    """A short hash of what a page shows (``repr`` of plain records is stable)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


# -- stored values ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredValue:
    """A stored value for the page: indented JSON and one line of it, or
    why it cannot be read."""

    text: str | None
    line: str = ""
    problem: str | None = None

    @classmethod
    def of(cls, raw: str | None) -> StoredValue:
        value, problem = decode_stored(raw)
        if problem is not None:
            return cls(None, problem=problem)
        return cls(pretty(value), compact(value, 80))


@dataclass(frozen=True, slots=True)
class ErrorView:
    """A stored error (an ``ErrorInfo`` mapping): ``Type: message``, the
    code, step and attempts, and the traceback with the cause chain."""

    message: str
    details: str
    traceback: str
    step: str | None

    @classmethod
    def of(cls, raw: str | None) -> ErrorView | None:
        if raw is None:
            return None
        info, problem = decode_stored(raw)
        if problem is not None:
            return cls(f"cannot read the stored error: {problem}", "", "", None)
        brief = error_lines(info, brief=True)
        full = error_lines(info)
        step = info.get("step") if isinstance(info, dict) else None
        return cls(
            message=brief[0],
            details=" ".join(brief[1:]).strip("()"),
            traceback="\n".join(full[len(brief) :]).strip("\n"),
            step=step if isinstance(step, str) else None,
        )


def _summary(raw: str | None) -> str:
    info, problem = decode_stored(raw)
    if problem is not None:
        return f"(unreadable: {problem})"
    return error_summary(info)


# -- overview -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OverviewView:
    now: datetime
    queues: list[QueueStats]
    workers: list[WorkerRecord]
    serving: dict[str, int]
    counts: dict[str, int]
    hour: Chart | None
    day: Chart | None
    fingerprint: str


def _serving(workers: Sequence[WorkerRecord]) -> dict[str, int]:
    serving: dict[str, int] = {}
    for worker in workers:
        for name in set(worker.workflows):
            serving[name] = serving.get(name, 0) + 1
    return serving


async def _history(store: Storage, minutes: int) -> list[FinishedMinute] | None:
    history = getattr(store, "finished_history", None)
    if history is None:  # an adapter written before the operation existed
        return None
    found: list[FinishedMinute] = await history(minutes)
    return found


async def load_overview(store: Storage) -> OverviewView:
    queues = await store.queue_stats()
    workers = await store.list_workers()
    now = await store.now()
    day_history = await _history(store, MAX_HISTORY_MINUTES)
    counts = dict.fromkeys(ACTIVE_STATUSES, 0)
    for queue in queues:
        for status in ACTIVE_STATUSES:
            counts[status] += getattr(queue, status)
    hour = day = None
    if day_history is not None:
        # One read serves both charts: the hour is the day's last 60 minutes.
        hour = build_chart("history-hour", day_history, now, minutes=60, pitch=10, tick_every=10)
        day = build_chart(
            "history-day",
            day_history,
            now,
            minutes=MAX_HISTORY_MINUTES,
            bucket=15,
            pitch=6,
            tick_every=12,
        )
    print_ = fingerprint(
        minute_of(now),
        queues,
        [(w.id, w.host, w.pid, w.workflows, w.concurrency, w.in_flight) for w in workers],
        day_history,
    )
    return OverviewView(
        now=now,
        queues=queues,
        workers=workers,
        serving=_serving(workers),
        counts=counts,
        hour=hour,
        day=day,
        fingerprint=print_,
    )


# -- runs list ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunFilters:
    """The runs list's query: a status (or ``any``), a workflow (or all), a
    run id or idempotency key, the page's cursor and size."""

    status: str = "any"
    workflow: str = ""
    q: str = ""
    cursor: str | None = None
    limit: int = DEFAULT_PAGE

    @classmethod
    def parse(cls, params: Any) -> RunFilters:
        status = str(params.get("status") or "any")
        if status not in STATUSES:
            status = "any"
        try:
            limit = min(max(int(params.get("limit") or DEFAULT_PAGE), 1), MAX_PAGE)
        except ValueError:
            limit = DEFAULT_PAGE
        return cls(
            status=status,
            workflow=str(params.get("workflow") or "").strip(),
            q=str(params.get("q") or "").strip(),
            cursor=str(params.get("cursor")) if params.get("cursor") else None,
            limit=limit,
        )

    def params(self, *, cursor: str | None = None, first_page: bool = False) -> dict[str, str]:
        """These filters as query parameters (defaults left out); the
        ``cursor`` given, or this page's unless ``first_page``."""
        found: dict[str, str] = {}
        if self.status != "any":
            found["status"] = self.status
        if self.workflow:
            found["workflow"] = self.workflow
        if self.q:
            found["q"] = self.q
        if self.limit != DEFAULT_PAGE:
            found["limit"] = str(self.limit)
        page = cursor if cursor is not None or first_page else self.cursor
        if page:
            found["cursor"] = page
        return found

    def query(self, **kwargs: Any) -> str:
        return urlencode(self.params(**kwargs))


@dataclass(frozen=True, slots=True)
class RunRow:
    record: RunRecord
    held: str | None


@dataclass(frozen=True, slots=True)
class RunsView:
    now: datetime
    filters: RunFilters
    rows: list[RunRow]
    next_cursor: str | None
    workflows: list[str]
    by_key: bool
    """The rows are the runs created with idempotency key ``filters.q``."""
    problem: str | None
    fingerprint: str


class WorkflowNames:
    """The workflow names the runs filter offers: those with unfinished runs
    (``queue_stats``, which reads every unfinished run) and those live
    workers serve, read again at most every ``ttl`` seconds, so a busy store
    does not pay for them on every page."""

    def __init__(self, ttl: float = 30.0) -> None:
        self._ttl = ttl
        self._names: frozenset[str] | None = None
        self._read_at = 0.0

    async def get(self, store: Storage, current: str) -> list[str]:
        """The names, with the ``current`` choice among them, sorted."""
        if self._names is None or time.monotonic() - self._read_at > self._ttl:
            names = {q.workflow for q in await store.queue_stats()}
            for worker in await store.list_workers():
                names.update(worker.workflows)
            self._names, self._read_at = frozenset(names), time.monotonic()
        return sorted(self._names | {current} if current else self._names)


def _run_print(record: RunRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.status,
        record.attempts,
        record.reclaims,
        record.updated_at,
        record.wake_at,
        record.blocked_by,
        record.waiting_for,
    )


async def load_runs(
    store: Storage, filters: RunFilters, *, choices: WorkflowNames | None = None
) -> RunsView:
    """One page of runs (keyset, through ``list_runs``), or the runs of an
    idempotency key; with ``choices``, the workflows the filter offers too.
    Finding a run by its id is the caller's job."""
    problem = None
    next_cursor = None
    by_key = bool(filters.q)
    status = None if filters.status == "any" else [filters.status]
    if by_key:
        find = getattr(store, "find_runs_by_key", None)
        records: Sequence[RunRecord] = (
            [] if find is None else await find(filters.q, limit=KEY_MATCHES)
        )
        records = [
            r
            for r in records
            if (status is None or r.status in status)
            and (not filters.workflow or r.workflow == filters.workflow)
        ]
    else:
        try:
            page = await store.list_runs(
                status=status,  # type: ignore[arg-type]
                workflow=filters.workflow or None,
                limit=filters.limit,
                cursor=filters.cursor,
            )
        except ConfigError:
            if filters.cursor is None:
                raise
            problem = "This page's link is out of date or malformed; showing the first page."
            filters = RunFilters(filters.status, filters.workflow, filters.q, None, filters.limit)
            page = await store.list_runs(
                status=status,  # type: ignore[arg-type]
                workflow=filters.workflow or None,
                limit=filters.limit,
            )
        records = page.runs
        next_cursor = page.next_cursor
    now = await store.now()
    return RunsView(
        now=now,
        filters=filters,
        rows=[RunRow(r, hold_reason(r)) for r in records],
        next_cursor=next_cursor,
        workflows=await choices.get(store, filters.workflow) if choices else [],
        by_key=by_key,
        problem=problem,
        fingerprint=fingerprint(minute_of(now), [_run_print(r) for r in records], next_cursor),
    )


# -- one run ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepRow:
    record: StepRecord
    took: float | None
    """Seconds since the step before it finished (its duration when the
    run went straight through), when both finished."""
    output: StoredValue | None
    error: ErrorView | None


@dataclass(frozen=True, slots=True)
class EventRow:
    event: BufferedEvent
    payload: str


@dataclass(frozen=True, slots=True)
class RunView:
    now: datetime
    record: RunRecord
    input: StoredValue
    output: StoredValue | None
    error: ErrorView | None
    steps: list[StepRow]
    children: list[RunRecord]
    events: list[EventRow]
    held: str | None
    waiting_for: str | None
    limits: list[str]
    rates: list[str]
    fingerprint: str
    cancellable: bool = field(init=False)
    resumable: bool = field(init=False)
    accepts_events: bool = field(init=False)

    def __post_init__(self) -> None:
        status = self.record.status
        object.__setattr__(self, "cancellable", status not in TERMINAL_STATUSES)
        object.__setattr__(self, "resumable", status in RESUMABLE_STATUSES)
        object.__setattr__(self, "accepts_events", status not in TERMINAL_STATUSES)


def _steps(record: RunRecord, steps: dict[str, StepRecord]) -> list[StepRow]:
    rows = []
    previous: datetime | None = None
    for step in visible_steps(steps):
        took = None
        if step.completed_at is not None and previous is not None:
            took = max((step.completed_at - previous).total_seconds(), 0.0)
        if step.completed_at is not None and step.status in ("completed", "skipped", "failed"):
            previous = step.completed_at
        rows.append(
            StepRow(
                record=step,
                took=took,
                output=StoredValue.of(step.output) if step.output is not None else None,
                error=ErrorView.of(step.error),
            )
        )
    return rows


async def load_run(store: Storage, run_id: str) -> RunView | None:
    """The run with its steps, children and buffered events; ``None`` if
    there is no such run."""
    record = await store.get_run(run_id)
    if record is None:
        return None
    steps = await store.get_step_results(run_id)
    list_children = getattr(store, "list_children", None)
    children: list[RunRecord] = [] if list_children is None else await list_children(run_id)
    list_events = getattr(store, "list_buffered_events", None)
    events: list[BufferedEvent] = []
    if list_events is not None and record.status not in TERMINAL_STATUSES:
        events = await list_events(run_id, limit=EVENTS_SHOWN)
    now = await store.now()
    waiting_for = record.waiting_for
    if waiting_for and waiting_for.startswith(CHILDREN_WAIT_PREFIX):
        waited = waiting_for.removeprefix(CHILDREN_WAIT_PREFIX)
        waiting_for = f"the child runs of step {waited!r}"
    elif waiting_for:
        waiting_for = f"event {waiting_for!r}"
    shown_events = []
    for event in events:
        value, problem = decode_stored(event.payload)
        shown_events.append(
            EventRow(event, f"(unreadable: {problem})" if problem else compact(value, 200))
        )
    return RunView(
        now=now,
        record=record,
        input=StoredValue.of(record.input),
        output=None if record.output is None else StoredValue.of(record.output),
        error=ErrorView.of(record.error),
        steps=_steps(record, steps),
        children=children,
        events=shown_events,
        held=held_reason(record, steps) or hold_reason(record),
        waiting_for=None if is_held(record) else waiting_for,
        limits=[f"{limit.key} (at most {limit.max})" for limit in record.limits],
        rates=[f"{rate.key} ({Rate(rate.max, rate.period)})" for rate in record.rates],
        fingerprint=fingerprint(
            minute_of(now),
            _run_print(record),
            record.output,
            record.error,
            sorted(
                (s.name, s.status, s.attempts, s.completed_at, s.wake_at, s.error)
                for s in steps.values()
            ),
            [_run_print(c) for c in children],
            [(e.event, e.event_id, e.payload) for e in events],
        ),
    )


# -- schedules and workers ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    record: ScheduleRecord
    recurrence: str
    input: str


@dataclass(frozen=True, slots=True)
class SchedulesView:
    now: datetime
    rows: list[ScheduleRow]


async def load_schedules(store: Storage) -> SchedulesView:
    rows = []
    for record in await store.list_schedules():
        value, problem = decode_stored(record.input)
        rows.append(
            ScheduleRow(
                record,
                recurrence_text(record.recurrence),
                f"(unreadable: {problem})" if problem else compact(value, 120),
            )
        )
    return SchedulesView(now=await store.now(), rows=rows)


@dataclass(frozen=True, slots=True)
class WorkersView:
    now: datetime
    workers: list[WorkerRecord]


async def load_workers(store: Storage) -> WorkersView:
    workers = await store.list_workers()
    return WorkersView(now=await store.now(), workers=workers)
