"""Adapters that break a promise about delayed runs: their status, when they
fall due, by which clock, and how queue statistics count them."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from datetime import datetime, timedelta

from reflow_core.adapter import check_stats_workflows, is_delayed, queue_stats_from_counts, utcnow
from reflow_core.memory import MemoryStorage
from reflow_core.storage import CreateResult, NewRun, QueueStats, RunRecord

from ._common import _store


class ClaimsDelayedEarly(MemoryStorage):
    """Breaks *a delayed run is not claimable before its wake_at*: a claim
    takes delayed runs as it takes pending ones, whatever their ``wake_at``,
    as a claim query reading ``status IN ('pending', 'delayed') OR (status IN
    ('sleeping', 'waiting') AND wake_at <= now)`` would; a run delayed by an
    hour starts at once."""

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        if rec.status == "delayed" and rec.wake_at is not None and rec.blocked_by is None:
            return (1, -rec.priority, min(rec.wake_at, now))
        return super()._due(rec, now)


def claims_delayed_early() -> MemoryStorage:
    return ClaimsDelayedEarly(name=_store("claims_delayed_early"))


class DelayedAsPending(MemoryStorage):
    """Breaks *a run created with a positive delay is delayed*: it is stored
    ``pending`` with its ``wake_at`` in the future, as a backend that only
    moved the wake-up time would. Claims still wait for it (a pending run is
    claimed once its ``wake_at`` has passed), but it is listed and counted as
    pending, and ``list_runs(status=["delayed"])`` never finds it."""

    async def create_run(self, new: NewRun) -> CreateResult:
        result = await super().create_run(new)
        if not result.created or not is_delayed(new):
            return result
        entry = self._runs[result.run.id]
        self._update(entry, entry.record.updated_at, status="pending")
        return CreateResult(entry.record, created=True)


def delayed_as_pending() -> MemoryStorage:
    return DelayedAsPending(name=_store("delayed_as_pending"))


_HOST_BEHIND = timedelta(hours=1)
"""How far behind the store's clock ``delay_by_client_clock``'s host clock runs."""


def _host_clock() -> datetime:
    return utcnow() - _HOST_BEHIND


class DelayByClientClock(MemoryStorage):
    """Breaks *a delayed run's wake_at is the storage's now plus the delay*:
    ``wake_at`` is computed in the application from its host's clock, an
    hour behind the store's (a wrong time zone), and sent with the insert,
    while ``created_at`` is the store's own ``now()``; every run delayed by
    less than an hour is due at once."""

    async def create_run(self, new: NewRun) -> CreateResult:
        result = await super().create_run(new)
        if not result.created or new.delay is None or not is_delayed(new):
            return result
        entry = self._runs[result.run.id]
        entry.record = dataclasses.replace(entry.record, wake_at=_host_clock() + new.delay)
        return CreateResult(entry.record, created=True)


def delay_by_client_clock() -> MemoryStorage:
    return DelayByClientClock(name=_store("delay_by_client_clock"))


class StatsDelayedAsPending(MemoryStorage):
    """Breaks *queue_stats counts delayed runs as delayed, never as pending*:
    a delayed run counts as pending, its ``wake_at`` in
    ``oldest_pending_since``, as counts grouped by ``status IN ('pending',
    'delayed')`` (both "waiting for a worker" in a dashboard's eyes) would."""

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        self._check_open("queue_stats")
        names = check_stats_workflows(workflows)
        chosen = (
            self._unfinished
            if names is None
            else {name: self._unfinished.get(name, set()) for name in names}
        )
        rows: list[tuple[str, str, int, datetime | None]] = []
        for workflow, ids in chosen.items():
            for run_id in ids:
                record = self._runs[run_id].record
                status = "pending" if record.status == "delayed" else record.status
                since = record.wake_at if status == "pending" else None
                rows.append((workflow, status, 1, since))
        return queue_stats_from_counts(rows, names)


def stats_delayed_as_pending() -> MemoryStorage:
    return StatsDelayedAsPending(name=_store("stats_delayed_as_pending"))
