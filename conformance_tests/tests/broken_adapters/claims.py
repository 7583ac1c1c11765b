"""Adapters that break a promise about claims: what a claim takes, in what
order, and what it counts."""

from __future__ import annotations

import atexit
import dataclasses
import tempfile
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from reflow_core.adapter import (
    check_claim_versions,
    check_duration,
    check_text,
    span_us,
)
from reflow_core.memory import MemoryStorage
from reflow_core.storage import (
    ClaimedRun,
    Lease,
    RunRecord,
)
from reflow_sqlite import SQLiteStorage
from reflow_sqlite import _scripts as sqlite_scripts
from reflow_sqlite._queries import with_marks

from ._common import _store


class DoubleClaim(MemoryStorage):
    """Breaks *a run is held by at most one live lease*: a running run whose
    lease is still live stays claimable (after every other claimable run), as
    if the claim query forgot to exclude live leases."""

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        key = super()._due(rec, now)
        if key is None and rec.status == "running" and rec.lease_expires_at is not None:
            return (2, 0, rec.lease_expires_at)
        return key


def double_claim() -> MemoryStorage:
    return DoubleClaim(name=_store("double_claim"))


class ReclaimsFirstWorkflowOnly(MemoryStorage):
    """Breaks *a claim for several workflows takes the claimable runs of each*:
    a claim reclaims lapsed leases of the first workflow it is given only, as
    if the lapsed-lease query were bound to ``workflows[0]``. Due runs of
    every workflow are still claimed; with the engine, a dead worker's runs of
    any other workflow are stranded."""

    _first: str | None = None

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        # No await before the claim's own loop, so no other claim interleaves.
        self._first = next(iter(workflows), None)
        return await super().claim_runs(workflows, limit, lease, versions=versions)

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        if rec.status == "running" and rec.workflow != self._first:
            return None
        return super()._due(rec, now)


_BY_DUE_TIME = """
SELECT id, status = 'running' FROM runs
WHERE workflow IN ({marks}) AND (
    (status = 'running' AND lease_expires_at <= ?)
    OR (status IN ('pending', 'sleeping', 'waiting') AND wake_at <= ?))
ORDER BY coalesce(wake_at, lease_expires_at), id LIMIT ?
"""


def _claim_by_due_time(
    now: int, workflows: list[str], limit: int, lease_us: int
) -> sqlite_scripts.Script[list[ClaimedRun]]:
    """The SQLite backend's claim, with its runs chosen by one query in due
    order, a lapsed lease due when it lapsed; the rest of the claim is the
    backend's own script, told which of them were lapsed."""
    sql = _BY_DUE_TIME.format(marks=",".join("?" * len(workflows)))
    rows = yield sql, (*workflows, now, now, limit)
    # As the backend's queries answer: a lapsed lease's id and rates; a due
    # run's id, priority, due time, limits and rates. The place in this
    # query's order stands for the due time (none has limits or rates).
    lapsed = [(row[0], *[None] * 6) for row in rows if row[1]]
    due = [
        (row[0], 0, place, *[None] * 10) for place, row in enumerate(r for r in rows if not r[1])
    ]
    claim = sqlite_scripts.claim(now, workflows, limit, lease_us)
    lapsed_query = with_marks("claim_lapsed", "workflows", len(workflows))
    try:
        request = next(claim)
        while request[0] != lapsed_query:  # the release of due rate waits, as the backend's
            answer = yield request
            request = claim.send(answer)
        request = claim.send(lapsed)
        if len(lapsed) < limit:  # then the others
            request = claim.send(due)
        while True:
            answer = yield request
            request = claim.send(answer)
    except StopIteration as stop:
        result: list[ClaimedRun] = stop.value
        return result


class ClaimsBacklogFirst(SQLiteStorage):
    """Breaks *a claim takes runs with lapsed leases before other claimable
    runs*, on the SQLite backend: one query picks the claimable runs by due
    time, counting a lapsed lease as due when it lapsed, so a backlog of runs
    due earlier starves a dead worker's runs."""

    async def claim_runs(
        self, workflows: Collection[str], limit: int, lease: timedelta
    ) -> list[ClaimedRun]:
        names = [check_text(name, "workflow") for name in dict.fromkeys(workflows)]
        check_duration(lease, "lease")
        if limit <= 0 or not names:
            return []
        lease_us = span_us(lease)
        return await self._call(
            "claim_runs", lambda now: _claim_by_due_time(now, names, limit, lease_us)
        )


def _remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


_BACKLOG_FIRST_DB = Path(tempfile.gettempdir()) / f"{_store('claims_backlog_first')}.db"
"""The SQLite file every ``claims_backlog_first`` storage of this process opens."""
atexit.register(_remove_database, _BACKLOG_FIRST_DB)


def reclaims_first_workflow_only() -> MemoryStorage:
    return ReclaimsFirstWorkflowOnly(name=_store("reclaims_first_workflow_only"))


def claims_backlog_first() -> SQLiteStorage:
    return ClaimsBacklogFirst(_BACKLOG_FIRST_DB)


class LimitPerWorkflow(MemoryStorage):
    """Breaks *a claim takes at most limit runs*: a claim of several workflows
    takes up to ``limit`` runs of each, as a query run once per workflow
    would; a worker with four free slots takes twelve runs of three
    workflows and holds their leases with nothing to run them."""

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        check_claim_versions(workflows, versions)
        claimed: list[ClaimedRun] = []
        for name in dict.fromkeys(workflows):
            served = None if versions is None or name not in versions else {name: versions[name]}
            claimed += await super().claim_runs([name], limit, lease, versions=served)
        return claimed


def limit_per_workflow() -> MemoryStorage:
    return LimitPerWorkflow(name=_store("limit_per_workflow"))


class ClaimsNewestFirst(MemoryStorage):
    """Breaks *due runs are claimed earliest first*: after lapsed leases, a
    claim takes the runs that fell due last first, as a stack (or an index
    scanned backwards) would; under a steady stream of new runs the oldest
    wait forever."""

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, int, datetime] | None:
        key = super()._due(rec, now)
        if key is None or key[0] == 0:
            return key
        return (1, key[1], datetime.max.replace(tzinfo=key[2].tzinfo) - (key[2] - _EPOCH))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SleepResetsAttempts(MemoryStorage):
    """Breaks *attempts change only when the run is claimed*: a sleep resets
    the run's ``attempts`` to zero, as a pause written as a fresh row would;
    a run's retry budget (``max_attempts`` counts claims) starts over at
    every sleep."""

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        wake_at = await super().sleep_run(lease, step, duration)
        if wake_at is not None:
            entry = self._runs[lease.run_id]
            entry.record = dataclasses.replace(entry.record, attempts=0)
        return wake_at


def claims_newest_first() -> MemoryStorage:
    return ClaimsNewestFirst(name=_store("claims_newest_first"))


def sleep_resets_attempts() -> MemoryStorage:
    return SleepResetsAttempts(name=_store("sleep_resets_attempts"))
