"""Adapters that break a promise about run priorities and concurrency limits:
the order of a claim, the cap on a key's running holders, and which blocked
run a holder's end lets go."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Literal

from reflow_core.adapter import (
    check_claim_versions,
    check_duration,
    check_text,
    rate_block,
    serves_version,
)
from reflow_core.memory import MemoryStorage
from reflow_core.storage import ClaimedRun, Lease, RunRecord

from ._common import _store


class IgnoresLimits(MemoryStorage):
    """Breaks *never more than max runs holding a key are running*: a claim
    never finds a key full, as a claim query that forgot the limits would;
    a workflow with ``max_running=1`` runs on every worker at once."""

    def _full(self, rec: RunRecord) -> str | None:
        return None


def ignores_limits() -> MemoryStorage:
    return IgnoresLimits(name=_store("ignores_limits"))


class PriorityIgnored(MemoryStorage):
    """Breaks *a claim takes due runs by priority*: due runs go by due time
    alone, as a claim query ordered by ``wake_at`` only would; an urgent run
    waits behind the whole backlog."""

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        key = super()._due(rec, now)
        return None if key is None else (key[0], 0, key[2])


def priority_ignored() -> MemoryStorage:
    return PriorityIgnored(name=_store("priority_ignored"))


class NoUnblock(MemoryStorage):
    """Breaks *a holder's stop lets the first blocked run of its key go*: a
    blocked run stays blocked for good, as a backend that marks runs blocked
    but never clears the mark would; once a key has been full, its waiting
    runs never start."""

    def _unblock(self, key: str, now: datetime) -> None:
        return None


def no_unblock() -> MemoryStorage:
    return NoUnblock(name=_store("no_unblock"))


class UnblocksLast(MemoryStorage):
    """Breaks *the blocked run let go is the one a claim would take first*:
    the lowest priority, latest due blocked run goes instead, as an unblock
    query with its order reversed would; urgent runs wait behind the rest."""

    def _unblock(self, key: str, now: datetime) -> None:
        blocked = self._blocked.get(key)
        if not blocked:
            return
        last = max(
            (self._runs[run_id].record for run_id in blocked),
            key=lambda r: (-r.priority, r.wake_at or now, r.id),
        )
        self._update(self._runs[last.id], now, blocked_by=None)


def unblocks_last() -> MemoryStorage:
    return UnblocksLast(name=_store("unblocks_last"))


class ReclaimChecksLimits(MemoryStorage):
    """Breaks *a lapsed lease is reclaimed whatever the limits*: a claim holds
    a lapsed run to its limits like any other, so a run that holds a key of
    max 1 itself is never taken over, as a claim query that counts the
    lapsed holder against its own slot would; a dead worker's run is stuck."""

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        self._check_open("claim_runs")
        for name in workflows:
            check_text(name, "workflow")
        served = check_claim_versions(workflows, versions)
        check_duration(lease, "lease")
        if limit <= 0:
            return []
        now = self._clock()
        self._release_rates(now)
        wanted = set(workflows)
        due = []
        for run_id, entry in self._runs.items():
            if entry.record.workflow in wanted and serves_version(served, entry.record):
                key = self._due(entry.record, now)
                if key is not None:
                    due.append((key, run_id))
        due.sort()
        claimed: list[ClaimedRun] = []
        for (kind, _, _), run_id in due:
            if len(claimed) >= limit:
                break
            entry = self._runs[run_id]
            rec = entry.record
            reclaimed = kind == 0
            full = self._full(rec)  # the bug: a reclaim is held to the limits too
            if full is not None:
                if not reclaimed:
                    self._update(entry, now, blocked_by=full)
                continue
            rate_full = self._rate_full(rec, now)
            if rate_full is not None:
                if not reclaimed:
                    rate, room_at = rate_full
                    self._update(entry, now, blocked_by=rate_block(rate.key))
                    waits = self._rate_waits
                    waits[rate.key] = min(waits.get(rate.key, room_at), room_at)
                continue
            self._record_claim(rec, now)
            self._update(
                entry,
                now,
                status="running",
                lease_epoch=rec.lease_epoch + 1,
                attempts=rec.attempts + 1,
                reclaims=rec.reclaims + (1 if reclaimed else 0),
                lease_expires_at=now + lease,
                wake_at=None,
            )
            claimed.append(
                ClaimedRun(
                    run=entry.record,
                    lease=Lease(run_id, entry.record.lease_epoch),
                    steps=dict(entry.steps),
                    reclaimed=reclaimed,
                )
            )
        return claimed


def reclaim_checks_limits() -> MemoryStorage:
    return ReclaimChecksLimits(name=_store("reclaim_checks_limits"))


class BlockedAfterCancel(MemoryStorage):
    """Breaks *a cancelled run has blocked_by None; a requeued one too*: an
    end from outside leaves the run's ``blocked_by`` as it was, as an update
    that sets the status alone would; once requeued the run still reads
    blocked, and no holder's end ever lets it go."""

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        entry = self._runs.get(run_id)
        before = None if entry is None else entry.record.blocked_by
        changed = await super().update_run_status(run_id, status, lease=lease, error=error)
        if changed and entry is not None and before is not None and status != "pending":
            entry.record = dataclasses.replace(entry.record, blocked_by=before)
        return changed


def blocked_after_cancel() -> MemoryStorage:
    return BlockedAfterCancel(name=_store("blocked_after_cancel"))


class LosesTurn(MemoryStorage):
    """Breaks *a run let go by a slot that ends unclaimed passes its turn
    on*: a cancelled run that a holder's end had let go takes the turn with
    it, as a backend that unblocks only when a running run stops would; the
    key's other waiting runs stay blocked with no run holding the key."""

    def _pass_turn(self, ended: RunRecord, now: datetime) -> None:
        return None


def loses_turn() -> MemoryStorage:
    return LosesTurn(name=_store("loses_turn"))
