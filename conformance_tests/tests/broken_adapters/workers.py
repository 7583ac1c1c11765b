"""Adapters that break a promise about the worker registry or the queue statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from reflow_core.adapter import check_stats_workflows, queue_stats_from_counts, utcnow
from reflow_core.memory import MemoryStorage
from reflow_core.storage import TERMINAL_STATUSES, QueueStats, WorkerInfo, WorkerRecord

from ._common import _store

# -- the worker registry --------------------------------------------------------


class ListsLapsedWorkers(MemoryStorage):
    """Breaks *a lapsed worker entry is never listed*: ``list_workers`` lists
    every entry it holds, as a query that forgot ``WHERE expires_at > now``
    would, until some other call happens to delete the lapsed ones."""

    async def list_workers(self) -> list[WorkerRecord]:
        return sorted(self._workers.values(), key=lambda w: (w.started_at, w.id))


def lists_lapsed_workers() -> MemoryStorage:
    return ListsLapsedWorkers(name=_store("lists_lapsed_workers"))


_HOST_AHEAD = timedelta(seconds=0.45)
_host_clocks_made = [0]


class WorkersByHostClock(MemoryStorage):
    """Breaks *a worker entry's times are the storage's now*: every second
    storage object stamps the entries it announces, and judges which are
    live, by its host's clock (0.45 s fast) instead of the store's, while its
    ``now()`` and everything else follow the store's clock."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        _host_clocks_made[0] += 1
        self._fast = _host_clocks_made[0] % 2 == 0

    @contextmanager
    def _host_clock(self) -> Iterator[None]:
        # The memory backend's worker methods never await, so swapping the
        # clock around one of them affects that call alone.
        store_clock = self._clock
        if self._fast:
            self._clock = lambda: utcnow() + _HOST_AHEAD
        try:
            yield
        finally:
            self._clock = store_clock

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        with self._host_clock():
            return await super().announce_worker(worker, ttl)

    async def list_workers(self) -> list[WorkerRecord]:
        with self._host_clock():
            return await super().list_workers()

    async def remove_worker(self, worker_id: str) -> bool:
        with self._host_clock():
            return await super().remove_worker(worker_id)


def workers_by_host_clock() -> MemoryStorage:
    return WorkersByHostClock(name=_store("workers_by_host_clock"))


class StartedAtResets(MemoryStorage):
    """Breaks *a worker that announces itself again while live keeps its
    started_at*: every announcement writes the whole entry, ``started_at``
    included, as an upsert that sets every column would."""

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        record = await super().announce_worker(worker, ttl)
        record = dataclasses.replace(record, started_at=record.last_seen_at)
        self._workers[worker.id] = record
        return record


def started_at_resets() -> MemoryStorage:
    return StartedAtResets(name=_store("started_at_resets"))


_first_started: dict[tuple[str | None, str], datetime] = {}


class StartedAtOutlivesLapse(MemoryStorage):
    """Breaks *a worker that announces itself after its entry lapsed starts
    anew*: ``started_at`` is kept apart from the entry, under a key that
    ``remove_worker`` deletes but that never expires with it, so a worker
    that went away without a goodbye and came back keeps its old start."""

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        record = await super().announce_worker(worker, ttl)
        started = _first_started.setdefault((self._name, worker.id), record.started_at)
        record = dataclasses.replace(record, started_at=started)
        self._workers[worker.id] = record
        return record

    async def remove_worker(self, worker_id: str) -> bool:
        _first_started.pop((self._name, worker_id), None)
        return await super().remove_worker(worker_id)


def started_at_outlives_lapse() -> MemoryStorage:
    return StartedAtOutlivesLapse(name=_store("started_at_outlives_lapse"))


class WorkersById(MemoryStorage):
    """Breaks *workers are listed by started_at, then by id*: they are
    listed by id alone, the order of a key scan."""

    async def list_workers(self) -> list[WorkerRecord]:
        return sorted(await super().list_workers(), key=lambda w: w.id)


def workers_by_id() -> MemoryStorage:
    return WorkersById(name=_store("workers_by_id"))


# -- queue statistics -----------------------------------------------------------


class _StatsFromRows(MemoryStorage):
    """``queue_stats`` over every run of the store, row by row: ``_row``
    decides what each run counts as (``None``: nothing), ``_names`` which
    workflows a named entry covers."""

    def _row(
        self, workflow: str, status: str, wake_at: datetime | None, created_at: datetime
    ) -> tuple[str, str, int, datetime | None] | None:
        if status in TERMINAL_STATUSES:
            return None
        return (workflow, status, 1, wake_at if status == "pending" else None)

    def _covers(self, name: str, workflow: str) -> bool:
        return name == workflow

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        self._check_open("queue_stats")
        names = check_stats_workflows(workflows)
        rows = []
        for entry in self._runs.values():
            rec = entry.record
            row = self._row(rec.workflow, rec.status, rec.wake_at, rec.created_at)
            if row is None:
                continue
            if names is None:
                rows.append(row)
            else:
                rows.extend((name, *row[1:]) for name in names if self._covers(name, row[0]))
        return queue_stats_from_counts(rows, names)


class StatsCountFinished(_StatsFromRows):
    """Breaks *queue_stats never counts a run that finished*: the counts are
    kept as counters that a claim raises and a finish never lowers, so a run
    that finished still counts as running."""

    def _row(
        self, workflow: str, status: str, wake_at: datetime | None, created_at: datetime
    ) -> tuple[str, str, int, datetime | None] | None:
        if status in TERMINAL_STATUSES:
            return (workflow, "running", 1, None)
        return super()._row(workflow, status, wake_at, created_at)


def stats_count_finished() -> MemoryStorage:
    return StatsCountFinished(name=_store("stats_count_finished"))


class StatsByPrefix(_StatsFromRows):
    """Breaks *queue_stats counts each workflow's runs in its own entry*: a
    named workflow's entry counts the runs of every workflow whose name
    starts with it, as ``WHERE workflow LIKE name || '%'`` would."""

    def _covers(self, name: str, workflow: str) -> bool:
        return workflow.startswith(name)


def stats_by_prefix() -> MemoryStorage:
    return StatsByPrefix(name=_store("stats_by_prefix"))


class StatsSkipIdle(MemoryStorage):
    """Breaks *queue_stats gives one entry per workflow named, zeros
    included*: a named workflow with no unfinished run gets no entry, as a
    ``GROUP BY`` over the runs gives none."""

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        stats = await super().queue_stats(workflows)
        return [s for s in stats if s.pending or s.running or s.sleeping or s.waiting]


def stats_skip_idle() -> MemoryStorage:
    return StatsSkipIdle(name=_store("stats_skip_idle"))


class OldestByCreation(_StatsFromRows):
    """Breaks *oldest_pending_since is the earliest wake_at of the pending
    runs*: it is their earliest ``created_at``, so a run handed back or
    requeued counts as waiting since it was first created."""

    def _row(
        self, workflow: str, status: str, wake_at: datetime | None, created_at: datetime
    ) -> tuple[str, str, int, datetime | None] | None:
        row = super()._row(workflow, status, wake_at, created_at)
        if row is None or status != "pending":
            return row
        return (workflow, status, 1, created_at)


def oldest_by_creation() -> MemoryStorage:
    return OldestByCreation(name=_store("oldest_by_creation"))
