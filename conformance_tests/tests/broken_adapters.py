"""Deliberately broken storage adapters, to prove the conformance suite catches them.

Each class below is the in-memory reference backend (or, where the bug lives
in a query, the SQLite backend) with exactly one promise of the storage
contract broken, the way a real adapter might get it wrong (a claim query
missing a clause, a fence that checks too little). Each has a
zero-argument factory usable as ``--reflow-storage=broken_adapters:<factory>``;
every call of one factory opens the same named store of this process, as a
second connection to one database would. ``correct`` is the unbroken backend,
the control; ``correct_millisecond_clock`` is the control for the one broken
adapter that runs on a millisecond clock.

The breakages override private helpers of :class:`~reflow_core.memory.MemoryStorage`
where that is the smallest change. If the memory backend is refactored and an
override stops taking effect, the adapter turns correct again and
``test_catches_broken_adapters`` fails, so a stale breakage cannot go unnoticed.

Loaded as a pytest plugin (``-p broken_adapters``), the module also registers
the Hypothesis profile :data:`NO_SHRINK_PROFILE` for those checks. They ask only
whether the suite fails and which promise it names, so they skip shrinking
(the stateful machine sleeps for real to let leases lapse, and shrinking a
failure it found replays those sleeps for minutes) and draw the same examples
on every run.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import Phase, settings

from reflow_core.adapter import (
    MAX_DURATION,
    check_duration,
    check_purge,
    check_purge_limit,
    check_text,
    decode_cursor,
    encode_cursor,
    new_run_record,
    purge_in_batches,
    span_us,
    utcnow,
)
from reflow_core.errors import IdempotencyConflictError
from reflow_core.memory import MemoryStorage, _Run
from reflow_core.storage import (
    TERMINAL_STATUSES,
    ClaimedRun,
    CreateResult,
    EventTake,
    Lease,
    NewRun,
    RunPage,
    RunRecord,
    RunStatus,
    StepRecord,
)
from reflow_sqlite import SQLiteStorage
from reflow_sqlite import _scripts as sqlite_scripts

__all__ = [
    "FACTORIES",
    "NO_SHRINK_PROFILE",
    "clamped_sleeps",
    "correct",
    "correct_millisecond_clock",
    "double_claim",
    "event_crosses_runs",
    "events_outlive_run",
    "events_twice",
    "immortal_leases",
    "lax_run_ids",
    "lossy_requeue",
    "no_fencing",
    "no_idempotency",
    "purge_by_creation_time",
    "purge_ignores_limit",
    "purge_keeps_event_ids",
    "purge_keeps_keys",
    "purge_leaves_steps",
    "purge_miscounts",
    "purges_unfinished",
    "schedule_slot_twice",
    "skewed_now",
    "sloppy_pagination",
    "unbounded_events",
]

_PROCESS = uuid.uuid4().hex
"""Chosen once per process, so each factory's store is new in every test run."""


NO_SHRINK_PROFILE = "reflow-ci-no-shrink"
"""The suite's ``reflow-ci`` profile without shrinking, derandomized (the same
examples every run) and without an example database."""


@pytest.hookimpl(tryfirst=True)
def pytest_configure() -> None:
    # Every entry-point plugin is imported by now, so reflow-ci is registered;
    # tryfirst registers this profile before Hypothesis loads the chosen one.
    settings.register_profile(
        NO_SHRINK_PROFILE,
        parent=settings.get_profile("reflow-ci"),
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
        database=None,
    )


def _store(kind: str) -> str:
    return f"broken-adapters-{kind}-{_PROCESS}"


class DoubleClaim(MemoryStorage):
    """Breaks *a run is held by at most one live lease*: a running run whose
    lease is still live stays claimable (after every other claimable run), as
    if the claim query forgot to exclude live leases."""

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, datetime] | None:
        key = super()._due(rec, now)
        if key is None and rec.status == "running" and rec.lease_expires_at is not None:
            return (2, rec.lease_expires_at)
        return key


class NoFencing(MemoryStorage):
    """Breaks *a lapsed or superseded lease's writes are refused*: a fenced
    write only checks that the run is running, not under which epoch nor
    whether the lease has lapsed. (Cancelled and finished runs still refuse
    writes, because they are not running.)"""

    def _live(self, lease: Lease, now: datetime) -> _Run | None:
        entry = self._runs.get(lease.run_id)
        if entry is None or entry.record.status != "running":
            return None
        return entry


class ImmortalLeases(MemoryStorage):
    """Breaks *once a lease lapses the run can be reclaimed*: claims never
    take over a running run, however long ago its lease lapsed, as if the
    claim query forgot the lapsed-lease clause. The lapsed holder's writes are
    still refused, so such a run is stranded for good."""

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, datetime] | None:
        if rec.status == "running":
            return None
        return super()._due(rec, now)


class NoIdempotency(MemoryStorage):
    """Breaks the idempotency promises: ``create_run`` always creates a new
    run, whatever its idempotency key (the key is still stored on the run)."""

    async def create_run(self, new: NewRun) -> CreateResult:
        if new.idempotency_key is not None:
            self._idem.pop((new.workflow, new.idempotency_key), None)
        return await super().create_run(new)


class EventsTwice(MemoryStorage):
    """Breaks *a buffered event is consumed once*: ``take_event`` saves the
    step but leaves the event buffered, so the next take (for another wait
    step) returns it again."""

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        entry = self._runs.get(lease.run_id)
        queue = None if entry is None else entry.events.get(event)
        before = list(queue) if queue else []
        result = await super().take_event(lease, step, event)
        if entry is not None and before and len(entry.events.get(event, ())) < len(before):
            entry.events[event] = deque(before)
        return result


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


class EventCrossesRuns(MemoryStorage):
    """Breaks *events never cross runs or event names*: when a run has no
    buffered event of that name, ``take_event`` takes the oldest one buffered
    for any other run, as if the query filtered on the event name only."""

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        entry = self._runs.get(lease.run_id)
        if entry is not None and not entry.events.get(event):
            for other in self._runs.values():
                queue = other.events.get(event)
                if other is not entry and queue:
                    entry.events.setdefault(event, deque()).append(queue.popleft())
                    break
        return await super().take_event(lease, step, event)


class UnboundedEvents(MemoryStorage):
    """Breaks *a run holding max_buffered untaken events refuses another*:
    ``deliver_event`` never finds a buffer full, as if it ignored
    ``max_buffered`` (the growth the cap exists to stop)."""

    def _buffered(self, entry: _Run) -> int:
        return 0


class EventsOutliveRun(MemoryStorage):
    """Breaks *a run's buffered events are dropped when it ends*: finishing,
    failing or cancelling a run leaves its untaken events buffered, so they
    pile up on finished runs, and a requeued run finds (and counts against
    the cap) events from before it ended."""

    def _discard_events(self, entry: _Run) -> None:
        return None


class ScheduleSlotTwice(MemoryStorage):
    """Breaks *a schedule slot is claimed once*: ``claim_schedule_slot`` fires
    any slot of an existing schedule without comparing it with the schedule's
    ``next_run_at``, so a second worker firing the same slot gets the run too."""

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        sched = self._schedules.get(key)
        if sched is not None:
            self._schedules[key] = dataclasses.replace(sched, next_run_at=slot)
        return await super().claim_schedule_slot(key, slot, next_run_at, run)


class SkewedNow(MemoryStorage):
    """Breaks *now() is the clock the storage judges by*: ``now()`` reports
    the local clock an hour fast, while leases, deadlines and due schedules
    follow the storage's own clock, as if ``now()`` read the application
    server's clock instead of the database's."""

    async def now(self) -> datetime:
        return await super().now() + timedelta(hours=1)


def _millisecond_clock() -> datetime:
    """The local clock, cut to whole milliseconds: the precision the contract
    requires and many databases keep, so runs created together share a time."""
    now = utcnow()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


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


def correct() -> MemoryStorage:
    """The unbroken in-memory backend: the control, which must pass."""
    return MemoryStorage(name=_store("correct"))


def correct_millisecond_clock() -> MemoryStorage:
    """The unbroken backend on a millisecond clock: the control for ``sloppy_pagination``."""
    return MemoryStorage(name=_store("correct_millisecond_clock"), clock=_millisecond_clock)


def double_claim() -> MemoryStorage:
    return DoubleClaim(name=_store("double_claim"))


def no_fencing() -> MemoryStorage:
    return NoFencing(name=_store("no_fencing"))


def immortal_leases() -> MemoryStorage:
    return ImmortalLeases(name=_store("immortal_leases"))


def no_idempotency() -> MemoryStorage:
    return NoIdempotency(name=_store("no_idempotency"))


def events_twice() -> MemoryStorage:
    return EventsTwice(name=_store("events_twice"))


def lossy_requeue() -> MemoryStorage:
    return LossyRequeue(name=_store("lossy_requeue"))


def event_crosses_runs() -> MemoryStorage:
    return EventCrossesRuns(name=_store("event_crosses_runs"))


def unbounded_events() -> MemoryStorage:
    return UnboundedEvents(name=_store("unbounded_events"))


def events_outlive_run() -> MemoryStorage:
    return EventsOutliveRun(name=_store("events_outlive_run"))


def schedule_slot_twice() -> MemoryStorage:
    return ScheduleSlotTwice(name=_store("schedule_slot_twice"))


def skewed_now() -> MemoryStorage:
    return SkewedNow(name=_store("skewed_now"))


def lax_run_ids() -> MemoryStorage:
    return LaxRunIds(name=_store("lax_run_ids"))


def clamped_sleeps() -> MemoryStorage:
    return ClampedSleeps(name=_store("clamped_sleeps"))


def sloppy_pagination() -> MemoryStorage:
    return SloppyPagination(name=_store("sloppy_pagination"), clock=_millisecond_clock)


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


FACTORIES: dict[str, Callable[[], MemoryStorage | SQLiteStorage]] = {
    factory.__name__: factory
    for factory in (
        double_claim,
        no_fencing,
        immortal_leases,
        no_idempotency,
        events_twice,
        lossy_requeue,
        event_crosses_runs,
        unbounded_events,
        events_outlive_run,
        schedule_slot_twice,
        skewed_now,
        sloppy_pagination,
        lax_run_ids,
        clamped_sleeps,
        purges_unfinished,
        purge_by_creation_time,
        purge_miscounts,
        purge_ignores_limit,
        purge_keeps_keys,
        purge_leaves_steps,
        purge_keeps_event_ids,
    )
}
"""Every broken adapter's factory by name (``correct`` is not among them)."""


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


class ReclaimsFirstWorkflowOnly(MemoryStorage):
    """Breaks *a claim for several workflows takes the claimable runs of each*:
    a claim reclaims lapsed leases of the first workflow it is given only, as
    if the lapsed-lease query were bound to ``workflows[0]``. Due runs of
    every workflow are still claimed; with the engine, a dead worker's runs of
    any other workflow are stranded."""

    _first: str | None = None

    async def claim_runs(
        self, workflows: Collection[str], limit: int, lease: timedelta
    ) -> list[ClaimedRun]:
        # No await before the claim's own loop, so no other claim interleaves.
        self._first = next(iter(workflows), None)
        return await super().claim_runs(workflows, limit, lease)

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, datetime] | None:
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
    lapsed = [(row[0],) for row in rows if row[1]]
    due = [(row[0],) for row in rows if not row[1]]
    claim = sqlite_scripts.claim(now, workflows, limit, lease_us)
    try:
        request = next(claim)  # the lapsed runs
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


def stale_reads() -> MemoryStorage:
    return StaleReads(name=_store("stale_reads"))


def reclaims_first_workflow_only() -> MemoryStorage:
    return ReclaimsFirstWorkflowOnly(name=_store("reclaims_first_workflow_only"))


def claims_backlog_first() -> SQLiteStorage:
    return ClaimsBacklogFirst(_BACKLOG_FIRST_DB)


__all__ += ["claims_backlog_first", "reclaims_first_workflow_only", "stale_reads"]
FACTORIES.update(
    {
        factory.__name__: factory
        for factory in (stale_reads, reclaims_first_workflow_only, claims_backlog_first)
    }
)


from collections.abc import Awaitable  # noqa: E402
from typing import Literal, TypeVar  # noqa: E402

from reflow_core.storage import WaitResult  # noqa: E402

_T = TypeVar("_T")


class SplitFence(MemoryStorage):
    """Breaks *a fenced write racing a cancel, requeue or reclaim lands before
    it or is refused*: every fenced write checks its lease, then yields (the
    write is a second round trip) and writes without checking again, so a
    cancel, requeue or reclaim that lands in between is overwritten while both
    sides report success."""

    _unchecked = False

    def _live(self, lease: Lease, now: datetime) -> _Run | None:
        if self._unchecked:
            return self._runs.get(lease.run_id)
        return super()._live(lease, now)

    async def _split(self, lease: Lease, write: Callable[[], Awaitable[_T]], refused: _T) -> _T:
        if super()._live(lease, self._clock()) is None:
            return refused
        await asyncio.sleep(0)
        self._unchecked = True
        try:
            return await write()  # runs to its end without yielding
        finally:
            self._unchecked = False

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        parent = super()
        return await self._split(lease, lambda: parent.heartbeat_run(lease, extend), False)

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        parent = super()
        return await self._split(lease, lambda: parent.save_step_result(lease, step, extend), False)

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        parent = super()
        return await self._split(
            lease,
            lambda: parent.finish_run(lease, status, output=output, error=error, step=step),
            False,
        )

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        parent = super()
        return await self._split(lease, lambda: parent.sleep_run(lease, step, duration), None)

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        parent = super()
        return await self._split(lease, lambda: parent.wait_run(lease, step, event, timeout), None)


def split_fence() -> MemoryStorage:
    return SplitFence(name=_store("split_fence"))


__all__ += ["split_fence"]
FACTORIES[split_fence.__name__] = split_fence


from reflow_conformance import AdapterFactory  # noqa: E402
from reflow_core.storage import ScheduleRecord, ScheduleSpec  # noqa: E402


class NoSchedules(MemoryStorage):
    """Not broken but unfinished: an adapter whose schedule methods are still
    stubs raising ``NotImplementedError``, as a half-built adapter's are. Run
    as is (``no_schedules``), every test that touches schedules must fail
    naming the area and how to declare it; declared missing
    (``no_schedules_declared``), the rest of the suite must pass."""

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        raise NotImplementedError

    async def delete_schedule(self, key: str) -> bool:
        raise NotImplementedError

    async def list_schedules(self) -> list[ScheduleRecord]:
        raise NotImplementedError

    async def due_schedules(self, limit: int) -> list[ScheduleRecord]:
        raise NotImplementedError

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        raise NotImplementedError


def no_schedules() -> MemoryStorage:
    return NoSchedules(name=_store("no_schedules"))


def no_schedules_declared() -> AdapterFactory:
    """``no_schedules``, declaring that it does not implement schedules yet."""
    name = _store("no_schedules_declared")
    return AdapterFactory(
        make=lambda: NoSchedules(name=name),
        name="no_schedules_declared",
        without=frozenset({"schedules"}),
    )


__all__ += ["no_schedules", "no_schedules_declared"]
UNFINISHED: dict[str, Callable[[], MemoryStorage | AdapterFactory]] = {
    no_schedules.__name__: no_schedules,
    no_schedules_declared.__name__: no_schedules_declared,
}
"""Adapters that lack an area of the contract, undeclared and declared (not
broken adapters: they are checked by their own tests, not by a ``Case``)."""


import random  # noqa: E402

_LEASE_ENDS: dict[tuple[str, str], datetime] = {}
"""When each run's lease really ends in a :class:`LeasesLapseAtRandom` store,
by store and run id."""
_RANDOM = random.Random()  # not the module's generator, which Hypothesis seeds per example


class LeasesLapseAtRandom(MemoryStorage):
    """Breaks *a lease stays live for its whole length*: every claim or
    renewal reports the lease's end as asked, but the store lets the lease lapse
    after a random time under half a second, as a store that judges leases by a
    clock running at its own pace would. What the holder and other claimers see
    then depends on how fast the test runs: the same operations get other
    answers when they are repeated."""

    def _end_key(self, run_id: str) -> tuple[str, str]:
        return (str(self._name), run_id)

    def _update(self, entry: _Run, now: datetime, **changes: object) -> None:
        super()._update(entry, now, **changes)
        if isinstance(changes.get("lease_expires_at"), datetime):
            end = now + timedelta(seconds=_RANDOM.uniform(0.05, 0.45))
            _LEASE_ENDS[self._end_key(entry.record.id)] = end

    def _lapsed(self, rec: RunRecord, now: datetime) -> bool:
        end = _LEASE_ENDS.get(self._end_key(rec.id))
        return rec.lease_expires_at is not None and end is not None and end <= now

    def _live(self, lease: Lease, now: datetime) -> _Run | None:
        entry = super()._live(lease, now)
        if entry is not None and self._lapsed(entry.record, now):
            return None
        return entry

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, datetime] | None:
        if rec.status == "running" and self._lapsed(rec, now):
            return (0, rec.lease_expires_at or now)
        return super()._due(rec, now)


def leases_lapse_at_random() -> MemoryStorage:
    return LeasesLapseAtRandom(name=_store("leases_lapse_at_random"))


__all__ += ["leases_lapse_at_random"]
FACTORIES[leases_lapse_at_random.__name__] = leases_lapse_at_random


_FAST_BY = timedelta(seconds=0.45)
"""How far ahead the fast clock of ``fast_client_clock`` runs: one and a half
default short leases, so a lease of two short ones looks lapsed a third of
the way through."""
_fast_clock_made = [0]


def _fast_clock() -> datetime:
    return utcnow() + _FAST_BY


def fast_client_clock() -> MemoryStorage:
    """Breaks *a lease stays live for its whole length by the storage clock,
    whichever connection judges it*: every second storage object judges
    leases, deadlines and due schedules by a clock 0.45 s ahead of the
    store's, as if each worker judged by its own host's clock (one of them
    fast) instead of the database's. Its ``now()`` reads the same clock, so
    each storage object agrees with itself; only a lease one connection took
    and another judges shows the skew."""
    _fast_clock_made[0] += 1
    clock = _fast_clock if _fast_clock_made[0] % 2 else None
    return MemoryStorage(name=_store("fast_client_clock"), clock=clock)


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

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, datetime] | None:
        if rec.status == "pending" and rec.wake_at is None:
            return (1, rec.updated_at)
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


__all__ += [
    "created_at_moves",
    "fast_client_clock",
    "lease_outlives_run",
    "pending_without_wake_at",
    "updated_at_stale",
]
FACTORIES.update(
    {
        factory.__name__: factory
        for factory in (
            fast_client_clock,
            created_at_moves,
            updated_at_stale,
            pending_without_wake_at,
            lease_outlives_run,
        )
    }
)


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


__all__ += ["naive_reads"]
FACTORIES[naive_reads.__name__] = naive_reads


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


class LimitPerWorkflow(MemoryStorage):
    """Breaks *a claim takes at most limit runs*: a claim of several workflows
    takes up to ``limit`` runs of each, as a query run once per workflow
    would; a worker with four free slots takes twelve runs of three
    workflows and holds their leases with nothing to run them."""

    async def claim_runs(
        self, workflows: Collection[str], limit: int, lease: timedelta
    ) -> list[ClaimedRun]:
        claimed: list[ClaimedRun] = []
        for name in dict.fromkeys(workflows):
            claimed += await super().claim_runs([name], limit, lease)
        return claimed


class EventsDroppedOnPause(MemoryStorage):
    """Breaks *an event for a live run is buffered until taken*: a run's
    buffered events are dropped whenever it stops running short of its end
    (a sleep, a wait that does not find its event, a hand back), as a store
    that clears the buffer on every status change would."""

    def _update(self, entry: _Run, now: datetime, **changes: object) -> None:
        if changes.get("status") in ("sleeping", "waiting", "pending"):
            entry.events.clear()
        super()._update(entry, now, **changes)


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


def limit_per_workflow() -> MemoryStorage:
    return LimitPerWorkflow(name=_store("limit_per_workflow"))


def events_dropped_on_pause() -> MemoryStorage:
    return EventsDroppedOnPause(name=_store("events_dropped_on_pause"))


def caseless_step_names() -> MemoryStorage:
    return CaselessStepNames(name=_store("caseless_step_names"))


_IDENTITY = (
    run_id_overwrites,
    key_freed_when_run_ends,
    limit_per_workflow,
    events_dropped_on_pause,
    caseless_step_names,
)
__all__ += [factory.__name__ for factory in _IDENTITY]
FACTORIES.update({factory.__name__: factory for factory in _IDENTITY})


class ScheduleForgetsCreatedAt(MemoryStorage):
    """Breaks *a schedule reads back as registered*: registering a schedule
    again rewrites its ``created_at``, as an upsert that replaces the whole
    row would (the engine re-registers every schedule at each start)."""

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        record = dataclasses.replace(await super().upsert_schedule(spec), created_at=self._clock())
        self._schedules[spec.key] = record
        return record


def schedule_forgets_created_at() -> MemoryStorage:
    return ScheduleForgetsCreatedAt(name=_store("schedule_forgets_created_at"))


__all__ += ["schedule_forgets_created_at"]
FACTORIES[schedule_forgets_created_at.__name__] = schedule_forgets_created_at


class ClaimsNewestFirst(MemoryStorage):
    """Breaks *due runs are claimed earliest first*: after lapsed leases, a
    claim takes the runs that fell due last first, as a stack (or an index
    scanned backwards) would; under a steady stream of new runs the oldest
    wait forever."""

    def _due(self, rec: RunRecord, now: datetime) -> tuple[int, datetime] | None:
        key = super()._due(rec, now)
        if key is None or key[0] == 0:
            return key
        return (1, datetime.max.replace(tzinfo=key[1].tzinfo) - (key[1] - _EPOCH))


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


__all__ += ["claims_newest_first", "sleep_resets_attempts"]
FACTORIES.update({f.__name__: f for f in (claims_newest_first, sleep_resets_attempts)})
