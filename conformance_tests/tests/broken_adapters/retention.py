"""Adapters that break a promise of ``purge_finished``."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from reflow_core.adapter import (
    check_purge,
    check_purge_limit,
    purge_in_batches,
)
from reflow_core.errors import IdempotencyConflictError
from reflow_core.memory import MemoryStorage, _Run
from reflow_core.storage import (
    TERMINAL_STATUSES,
    CreateResult,
    NewRun,
    StepRecord,
)

from ._common import _store


class _Purge(MemoryStorage):
    """The in-memory backend's ``purge_finished``, written out with two
    hooks: which time a run is judged by (``None``: never purged) and how the
    deleted runs are counted. Unbroken as it stands; each subclass below
    changes one hook."""

    def _purge_age(self, entry: _Run) -> datetime | None:
        if entry.record.status not in TERMINAL_STATUSES:
            return None
        return entry.finished_at

    def _purge_count(self, deleted: list[_Run]) -> int:
        return len(deleted)

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        batch = check_purge(older_than, batch)
        limit = check_purge_limit(limit)

        async def delete(size: int) -> tuple[int, bool]:
            cutoff = self._clock() - older_than
            ages = ((self._purge_age(entry), run_id) for run_id, entry in self._runs.items())
            doomed = sorted((age, run_id) for age, run_id in ages if age is not None)
            doomed = [(age, run_id) for age, run_id in doomed if age < cutoff][:size]
            deleted = [self._runs.pop(run_id) for _, run_id in doomed]
            for entry in deleted:
                record = entry.record
                if record.idempotency_key is not None:
                    key = (record.workflow, record.idempotency_key)
                    if self._idem.get(key) == record.id:
                        del self._idem[key]
            await asyncio.sleep(0)
            return self._purge_count(deleted), len(doomed) == size

        return await purge_in_batches(delete, batch, limit)


class PurgesUnfinished(_Purge):
    """Breaks *purge_finished never touches a run that has not finished*: the
    purge judges a run by its finish time or, when it has none, by its last
    change, with no status clause, so a pending, running, sleeping or
    waiting run left alone since before the cut-off is deleted."""

    def _purge_age(self, entry: _Run) -> datetime | None:
        return entry.finished_at or entry.record.updated_at


class PurgeByCreationTime(_Purge):
    """Breaks *purge_finished deletes the runs that finished more than
    older_than ago*: a finished run is judged by when it was created, so a
    long run that finished a moment ago goes with the old ones (and one that
    finishes while a purge runs can go too)."""

    def _purge_age(self, entry: _Run) -> datetime | None:
        if entry.record.status not in TERMINAL_STATUSES:
            return None
        return entry.record.created_at


class PurgeMiscounts(_Purge):
    """Breaks *purge_finished returns the number of runs it deleted*: it
    returns the rows it deleted, each run's steps counted with it, as a sum
    of the row counts of every delete statement would."""

    def _purge_count(self, deleted: list[_Run]) -> int:
        return len(deleted) + sum(len(entry.steps) for entry in deleted)


class PurgeIgnoresLimit(MemoryStorage):
    """Breaks *one purge_finished call deletes at most limit runs*: the limit
    is checked, then ignored, so one call deletes every run due."""

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        check_purge_limit(limit)
        return await super().purge_finished(older_than, batch=batch)


class PurgeKeepsKeys(MemoryStorage):
    """Breaks *a purged run's idempotency key is free again*: the purge
    leaves the keys of the runs it deletes, so a create with one finds it
    taken and reports a conflict with a run that is gone (as a table of keys
    that outlives its runs would)."""

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        keys = dict(self._idem)
        deleted = await super().purge_finished(older_than, batch=batch, limit=limit)
        self._idem.update(keys)
        return deleted

    async def create_run(self, new: NewRun) -> CreateResult:
        if new.idempotency_key is not None:
            holder = self._idem.get((new.workflow, new.idempotency_key))
            if holder is not None and holder not in self._runs:
                raise IdempotencyConflictError(new.workflow, new.idempotency_key, holder)
        return await super().create_run(new)


_LEFT_BEHIND: dict[tuple[str, str], dict[str, object]] = {}
"""What a purge left of each run, by store and run id (:class:`PurgeLeavesSteps`,
:class:`PurgeKeepsEventIds`): a store's other table, keyed by run id."""


class _PurgeLeaves(MemoryStorage):
    """A purge that leaves part of each run it deletes in another table, keyed
    by run id: a new run with that id finds it again. ``_kept`` takes it from
    a run, ``_restore`` puts it on a new one."""

    def _kept(self, entry: _Run) -> object:
        raise NotImplementedError

    def _restore(self, entry: _Run, left: object) -> None:
        raise NotImplementedError

    def _left(self, run_id: str) -> object | None:
        return _LEFT_BEHIND.get((str(self._name), run_id))

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        before = {run_id: self._kept(entry) for run_id, entry in self._runs.items()}
        deleted = await super().purge_finished(older_than, batch=batch, limit=limit)
        for run_id, kept in before.items():
            if run_id not in self._runs:
                _LEFT_BEHIND[(str(self._name), run_id)] = kept
        return deleted

    async def create_run(self, new: NewRun) -> CreateResult:
        result = await super().create_run(new)
        left = self._left(result.run.id)
        if result.created and left is not None:
            self._restore(self._runs[result.run.id], left)
        return result


class PurgeLeavesSteps(_PurgeLeaves):
    """Breaks *a purged run is gone with its steps*: the purge deletes the run
    but not its steps, so they still read back for its id, and a new run
    with that id starts with them (as a steps table without a cascading
    delete would)."""

    def _kept(self, entry: _Run) -> object:
        return dict(entry.steps)

    def _restore(self, entry: _Run, left: object) -> None:
        assert isinstance(left, dict)
        entry.steps = dict(left)

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        steps = await super().get_step_results(run_id)
        left = self._left(run_id)
        if not steps and run_id not in self._runs and isinstance(left, dict):
            return dict(left)
        return steps


class PurgeKeepsEventIds(_PurgeLeaves):
    """Breaks *a purged run is gone with its event ids*: the purge deletes the
    run but not the event ids it had seen, so a new run with its id takes a
    delivery with one of them for a repeat and drops it."""

    def _kept(self, entry: _Run) -> object:
        return set(entry.event_ids)

    def _restore(self, entry: _Run, left: object) -> None:
        assert isinstance(left, set)
        entry.event_ids = set(left)


def purges_unfinished() -> MemoryStorage:
    return PurgesUnfinished(name=_store("purges_unfinished"))


def purge_by_creation_time() -> MemoryStorage:
    return PurgeByCreationTime(name=_store("purge_by_creation_time"))


def purge_miscounts() -> MemoryStorage:
    return PurgeMiscounts(name=_store("purge_miscounts"))


def purge_ignores_limit() -> MemoryStorage:
    return PurgeIgnoresLimit(name=_store("purge_ignores_limit"))


def purge_keeps_keys() -> MemoryStorage:
    return PurgeKeepsKeys(name=_store("purge_keeps_keys"))


def purge_leaves_steps() -> MemoryStorage:
    return PurgeLeavesSteps(name=_store("purge_leaves_steps"))


def purge_keeps_event_ids() -> MemoryStorage:
    return PurgeKeepsEventIds(name=_store("purge_keeps_event_ids"))
