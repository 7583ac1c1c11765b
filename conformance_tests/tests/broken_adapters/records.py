"""Adapters that break a promise about the run record's own fields."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Literal, TypeVar

from reflow_core.memory import MemoryStorage, _Run
from reflow_core.storage import (
    TERMINAL_STATUSES,
    Lease,
    RunRecord,
    StepRecord,
)

from ._common import _store


class CreatedAtMoves(MemoryStorage):
    """Breaks *a run's created_at never changes*: every claim writes
    ``created_at`` again, as an update writing the whole row with
    ``created_at = now`` would."""

    def _update(self, entry: _Run, now: datetime, **changes: object) -> None:
        if changes.get("status") == "running":
            changes["created_at"] = now
        super()._update(entry, now, **changes)


class UpdatedAtStale(MemoryStorage):
    """Breaks *a run's updated_at is the storage's now at every write*: a
    heartbeat moves the lease alone and leaves ``updated_at`` at the run's
    previous write, as an update setting only ``lease_expires_at`` would."""

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        entry = self._runs.get(lease.run_id)
        previous = None if entry is None else entry.record.updated_at
        beat = await super().heartbeat_run(lease, extend)
        if beat and entry is not None and previous is not None:
            entry.record = dataclasses.replace(entry.record, updated_at=previous)
        return beat


class PendingWithoutWakeAt(MemoryStorage):
    """Breaks *a run's wake_at is now when handed back*: a run handed back is
    pending with ``wake_at`` ``None``. Its claim query takes a pending run
    whatever its ``wake_at`` (``status = 'pending' OR wake_at <= now``), so
    the run is still claimed at once, but its record says it is never due."""

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        changed = await super().update_run_status(run_id, status, lease=lease, error=error)
        entry = self._runs.get(run_id)
        if changed and status == "pending" and entry is not None:
            entry.record = dataclasses.replace(entry.record, wake_at=None)
        return changed

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        if rec.status == "pending" and rec.wake_at is None and rec.blocked_by is None:
            return (1, -rec.priority, rec.updated_at)
        return super()._due(rec, now)


class LeaseOutlivesRun(MemoryStorage):
    """Breaks *a run's lease_expires_at is None once it is not running*:
    finishing, failing or cancelling a run leaves ``lease_expires_at`` as it
    was, as an update setting only the status and the result would. The old
    lease is still refused (the run is not running)."""

    def _update(self, entry: _Run, now: datetime, **changes: object) -> None:
        if changes.get("status") in TERMINAL_STATUSES:
            changes.pop("lease_expires_at", None)
        super()._update(entry, now, **changes)


def created_at_moves() -> MemoryStorage:
    return CreatedAtMoves(name=_store("created_at_moves"))


def updated_at_stale() -> MemoryStorage:
    return UpdatedAtStale(name=_store("updated_at_stale"))


def pending_without_wake_at() -> MemoryStorage:
    return PendingWithoutWakeAt(name=_store("pending_without_wake_at"))


def lease_outlives_run() -> MemoryStorage:
    return LeaseOutlivesRun(name=_store("lease_outlives_run"))


def _naive(record: _R) -> _R:
    """The record with every time's zone dropped (the UTC wall time kept)."""
    changes = {
        field.name: getattr(record, field.name).replace(tzinfo=None)
        for field in dataclasses.fields(record)  # type: ignore[arg-type]
        if isinstance(getattr(record, field.name), datetime)
    }
    return dataclasses.replace(record, **changes)  # type: ignore[type-var]


_R = TypeVar("_R", RunRecord, StepRecord)


class NaiveReads(MemoryStorage):
    """Breaks *every time the storage returns is an aware UTC datetime*:
    ``get_run`` and ``get_step_results`` return times without their zone,
    as a driver that reads a timestamp column without a time zone would
    (writes, claims and ``now()`` stay aware)."""

    async def get_run(self, run_id: str) -> RunRecord | None:
        run = await super().get_run(run_id)
        return None if run is None else _naive(run)

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        steps = await super().get_step_results(run_id)
        return {name: _naive(step) for name, step in steps.items()}


def naive_reads() -> MemoryStorage:
    return NaiveReads(name=_store("naive_reads"))
