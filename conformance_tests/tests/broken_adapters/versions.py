"""Adapters that break a promise about workflow versions: that a debounced
create replaces a run's version, and that a claim with ``versions`` takes
only the versions it serves, lapsed leases included."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from reflow_core.adapter import check_claim_versions
from reflow_core.memory import MemoryStorage
from reflow_core.storage import ClaimedRun, NewRun, RunRecord

from ._common import _store


class ClaimsIgnoreVersions(MemoryStorage):
    """Breaks *a claim with versions takes only the versions it serves*:
    ``versions`` is checked and then dropped, as a claim query written
    before the version column would; a worker of the new definition runs
    the runs of the old one, and replays them against steps they never had."""

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        check_claim_versions(workflows, versions)
        return await super().claim_runs(workflows, limit, lease)


def claims_ignore_versions() -> MemoryStorage:
    return ClaimsIgnoreVersions(name=_store("claims_ignore_versions"))


class VersionLostOnDebounce(MemoryStorage):
    """Breaks *a debounced create replaces the version and fingerprint*:
    the open run keeps those of the create that made it, as an UPDATE that
    sets the input, priority, limits, rates and headers but forgot the
    version columns would; the last trigger's run waits for a worker of the
    first trigger's version, which may be gone."""

    def _replace_debounced(self, entry: Any, new: NewRun, now: datetime) -> RunRecord:
        old = entry.record
        kept = dataclasses.replace(new, version=old.version, fingerprint=old.fingerprint)
        return super()._replace_debounced(entry, kept, now)


def version_lost_on_debounce() -> MemoryStorage:
    return VersionLostOnDebounce(name=_store("version_lost_on_debounce"))


class LapsedLeaseIgnoresVersions(MemoryStorage):
    """Breaks *a lapsed lease of a version not served is not taken over*:
    due runs are filtered by version, but lapsed leases are taken whatever
    their version, as a claim whose reclaim query forgot the filter its due
    query has; a dead worker's run of the old definition is resumed by a
    worker of the new one."""

    def _claimable(self, workflows: set[str], now: datetime, versions: Any) -> Iterator[Any]:
        runs = self._runs
        lapsed = []
        for name in workflows:
            for run_id in self._running.get(name, ()):
                expires = runs[run_id].record.lease_expires_at
                if expires is not None and expires <= now:
                    lapsed.append(((0, 0, expires), run_id))
        lapsed.sort()
        yield from lapsed
        for found in super()._claimable(workflows, now, versions):
            if found[0][0] != 0:  # the lapsed leases it serves were given above
                yield found


def lapsed_lease_ignores_versions() -> MemoryStorage:
    return LapsedLeaseIgnoresVersions(name=_store("lapsed_lease_ignores_versions"))
