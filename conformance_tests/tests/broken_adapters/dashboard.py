"""Adapters that break a promise of the dashboard's reads: the runs of a key
newest first, a run's buffered events in arrival order, and a history of
finished runs that forgets the runs requeued or purged since."""

from __future__ import annotations

from datetime import datetime, timedelta

from reflow_core.adapter import check_count, minute_of
from reflow_core.memory import MemoryStorage
from reflow_core.storage import TERMINAL_STATUSES, BufferedEvent, RunRecord

from ._common import _store

_COUNTED: dict[tuple[str, datetime], list[RunRecord]] = {}
"""The ends a broken history still counts after their run was requeued or
purged, by store and minute: a table of counters that outlives its runs."""

_ALL = 2**62
"""A limit past any number of stored rows."""


def _still_counted(name: str | None, entries: list[tuple[datetime | None, RunRecord]]) -> None:
    for finished_at, record in entries:
        if name is not None and finished_at is not None:
            _COUNTED.setdefault((name, minute_of(finished_at)), []).append(record)


class _Counters(MemoryStorage):
    """The in-memory backend whose history also counts the ends noted in
    :data:`_COUNTED`. Unbroken as it stands (nothing notes an end there);
    each subclass below notes the ends it forgets to take back."""

    def _finished_in(self, minute: datetime) -> list[RunRecord]:
        kept = _COUNTED.get((self._name or "", minute), [])
        return [*super()._finished_in(minute), *kept]


class HistoryCountsRequeued(_Counters):
    """Breaks *a requeued run no longer counts in finished_history*: the
    history is a counter per minute and status, incremented when a run ends
    and never decremented by a requeue, so a run that failed, was requeued
    and completed counts twice (and a requeued run that is pending counts
    as failed)."""

    async def requeue_run(self, run_id: str) -> bool:
        entry = self._runs.get(run_id)
        ended = None if entry is None else (entry.finished_at, entry.record)
        requeued = await super().requeue_run(run_id)
        if requeued and ended is not None:
            _still_counted(self._name, [ended])
        return requeued


def history_counts_requeued() -> MemoryStorage:
    return HistoryCountsRequeued(name=_store("history_counts_requeued"))


class HistoryCountsPurged(_Counters):
    """Breaks *a purged run no longer counts in finished_history*: the
    counters per minute outlive the runs a purge deletes, as a table of
    counts that the purge forgets to decrement would."""

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        ended = {
            run_id: (entry.finished_at, entry.record)
            for run_id, entry in self._runs.items()
            if entry.record.status in TERMINAL_STATUSES
        }
        deleted = await super().purge_finished(older_than, batch=batch, limit=limit)
        _still_counted(self._name, [ended[i] for i in ended if i not in self._runs])
        return deleted


def history_counts_purged() -> MemoryStorage:
    return HistoryCountsPurged(name=_store("history_counts_purged"))


class BufferedByName(MemoryStorage):
    """Breaks *a run's buffered events are listed in arrival order*: they
    come grouped by name, each name's in arrival order, as a query ordered
    by the index of buffered events, ``(run_id, name, id)``, would give
    them; a run that was sent ``b`` then ``a`` lists ``a`` first."""

    async def list_buffered_events(self, run_id: str, *, limit: int = 100) -> list[BufferedEvent]:
        check_count(limit, "limit")
        events = await super().list_buffered_events(run_id, limit=_ALL)
        return sorted(events, key=lambda event: event.event)[:limit]


def buffered_by_name() -> MemoryStorage:
    return BufferedByName(name=_store("buffered_by_name"))


class KeyOldestFirst(MemoryStorage):
    """Breaks *find_runs_by_key lists runs newest first*: they come oldest
    first, as ``ORDER BY created_at, id`` without its ``DESC`` would give
    them; with a limit, the oldest runs of the key are found, not the newest."""

    async def find_runs_by_key(self, idempotency_key: str, *, limit: int = 20) -> list[RunRecord]:
        check_count(limit, "limit")
        runs = await super().find_runs_by_key(idempotency_key, limit=_ALL)
        return runs[::-1][:limit]


def key_oldest_first() -> MemoryStorage:
    return KeyOldestFirst(name=_store("key_oldest_first"))
