"""Adapters that break a promise about runs: creating, identifying, reading,
listing and requeueing them."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from reflow_core.adapter import (
    MAX_DURATION,
    decode_cursor,
    encode_cursor,
    new_run_record,
)
from reflow_core.memory import MemoryStorage, _Run
from reflow_core.storage import (
    CreateResult,
    Lease,
    NewRun,
    RunPage,
    RunRecord,
    RunStatus,
    StepRecord,
)

from ._common import _millisecond_clock, _store


class NoIdempotency(MemoryStorage):
    """Breaks the idempotency promises: ``create_run`` always creates a new
    run, whatever its idempotency key (the key is still stored on the run)."""

    async def create_run(self, new: NewRun) -> CreateResult:
        if new.idempotency_key is not None:
            self._idem.pop((new.workflow, new.idempotency_key), None)
        return await super().create_run(new)


class LossyRequeue(MemoryStorage):
    """Breaks *requeue keeps completed steps and drops failed ones*: a
    requeued run comes back pending with none of its steps, so every
    completed step runs again (the run itself is not lost)."""

    async def requeue_run(self, run_id: str) -> bool:
        entry = self._runs.get(run_id)
        requeued = await super().requeue_run(run_id)
        if requeued and entry is not None:
            entry.steps = {}
        return requeued


class SloppyPagination(MemoryStorage):
    """Breaks *keyset pagination visits every matching run exactly once*: the
    cursor is compared on the creation time alone, so the runs that share the
    creation time of a page's last run and did not fit on it are skipped.

    Its factory gives it a millisecond clock (correct in itself, see
    ``correct_millisecond_clock``), so runs created together do share a time.
    """

    async def list_runs(
        self,
        *,
        status: Collection[RunStatus] | None = None,
        workflow: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        if cursor is not None:
            created_at, _ = decode_cursor(cursor)
            # "\x00" sorts before every run id: the whole creation time counts as listed.
            cursor = encode_cursor(created_at, "\x00")
        return await super().list_runs(status=status, workflow=workflow, limit=limit, cursor=cursor)


class LaxRunIds(MemoryStorage):
    """Breaks *bad names, ids and keys are refused with ConfigError*: reading a
    run looks the id up without checking it, so an id no other store can hold
    (a lone surrogate, a NUL, not a string) reads as a missing run here and
    fails differently elsewhere."""

    async def get_run(self, run_id: str) -> RunRecord | None:
        entry = self._runs.get(run_id)
        return None if entry is None else entry.record


class ClampedSleeps(MemoryStorage):
    """Breaks *durations outside 0 to 100 years are refused*: a sleep longer
    than the maximum is silently shortened to it instead of refused."""

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        return await super().sleep_run(lease, step, min(duration, MAX_DURATION))


def no_idempotency() -> MemoryStorage:
    return NoIdempotency(name=_store("no_idempotency"))


def lossy_requeue() -> MemoryStorage:
    return LossyRequeue(name=_store("lossy_requeue"))


def lax_run_ids() -> MemoryStorage:
    return LaxRunIds(name=_store("lax_run_ids"))


def clamped_sleeps() -> MemoryStorage:
    return ClampedSleeps(name=_store("clamped_sleeps"))


def sloppy_pagination() -> MemoryStorage:
    return SloppyPagination(name=_store("sloppy_pagination"), clock=_millisecond_clock)


class StaleReads(MemoryStorage):
    """Breaks *what one connection writes, every other connection reads*: each
    storage object caches the runs and steps it has read and refreshes a run's
    entry only when it writes to that run itself, as a per-connection cache in
    front of a shared database would. Claims still read the store."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self._read_runs: dict[str, RunRecord | None] = {}
        self._read_steps: dict[str, dict[str, StepRecord]] = {}

    def _forget(self, run_id: str) -> None:
        self._read_runs.pop(run_id, None)
        self._read_steps.pop(run_id, None)

    def _update(self, entry: _Run, now: datetime, **changes: object) -> None:
        self._forget(entry.record.id)
        super()._update(entry, now, **changes)

    def _store_step(self, entry: _Run, step: StepRecord, now: datetime) -> None:
        self._forget(entry.record.id)
        super()._store_step(entry, step, now)

    async def create_run(self, new: NewRun) -> CreateResult:
        result = await super().create_run(new)
        self._forget(result.run.id)
        return result

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        self._read_runs.clear()
        self._read_steps.clear()
        return await super().purge_finished(older_than, batch=batch, limit=limit)

    async def get_run(self, run_id: str) -> RunRecord | None:
        if run_id not in self._read_runs:
            self._read_runs[run_id] = await super().get_run(run_id)
        return self._read_runs[run_id]

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        if run_id not in self._read_steps:
            self._read_steps[run_id] = await super().get_step_results(run_id)
        return dict(self._read_steps[run_id])


def stale_reads() -> MemoryStorage:
    return StaleReads(name=_store("stale_reads"))


class RunIdOverwrites(MemoryStorage):
    """Breaks *a create with the id of an existing run changes nothing*: a
    caller-chosen run id that is taken replaces the run holding it, as an
    ``INSERT OR REPLACE`` (or an upsert on the id) would."""

    async def create_run(self, new: NewRun) -> CreateResult:
        if new.run_id is not None and new.run_id in self._runs and new.idempotency_key is None:
            record = new_run_record(new.run_id, new, self._clock())
            self._runs[new.run_id] = _Run(record)
            return CreateResult(record, created=True)
        return await super().create_run(new)


class KeyFreedWhenRunEnds(MemoryStorage):
    """Breaks *an idempotency key names its run until the run is purged*: a
    run's key is released when the run ends, as a unique index over live runs
    only would; a retried enqueue of a finished order runs it again."""

    def _discard_events(self, entry: _Run) -> None:
        super()._discard_events(entry)
        record = entry.record
        if record.idempotency_key is not None:
            self._idem.pop((record.workflow, record.idempotency_key), None)


class CaselessStepNames(MemoryStorage):
    """Breaks *names that differ only by case are different names*: step
    names are compared without case, as a column with a case-insensitive
    collation would: a step ``Charge`` overwrites the result of ``charge``."""

    def _store_step(self, entry: _Run, step: StepRecord, now: datetime) -> None:
        for name in [name for name in entry.steps if name.casefold() == step.name.casefold()]:
            del entry.steps[name]
        super()._store_step(entry, step, now)


def run_id_overwrites() -> MemoryStorage:
    return RunIdOverwrites(name=_store("run_id_overwrites"))


def key_freed_when_run_ends() -> MemoryStorage:
    return KeyFreedWhenRunEnds(name=_store("key_freed_when_run_ends"))


def caseless_step_names() -> MemoryStorage:
    return CaselessStepNames(name=_store("caseless_step_names"))
