"""Adapters that break a promise about schedules, and adapters that lack them."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from datetime import datetime

from reflow_conformance import AdapterFactory
from reflow_core.memory import MemoryStorage
from reflow_core.storage import (
    NewRun,
    RunRecord,
    ScheduleRecord,
    ScheduleSpec,
)

from ._common import _store


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


def schedule_slot_twice() -> MemoryStorage:
    return ScheduleSlotTwice(name=_store("schedule_slot_twice"))


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

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        raise NotImplementedError

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        raise NotImplementedError

    async def set_schedule_paused(
        self, key: str, paused: bool, *, next_run_at: datetime | None = None
    ) -> ScheduleRecord | None:
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


class DuePaused(MemoryStorage):
    """Breaks *a paused schedule is never due*: ``due_schedules`` ignores
    the paused flag, as a query written before schedules could be paused
    would. (``claim_schedule_slot`` still refuses a paused schedule, so
    nothing fires; a worker just looks at it on every poll.)"""

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        now = self._clock()
        due = [
            s
            for s in self._schedules.values()
            if s.next_run_at <= now and (workflows is None or s.workflow in workflows)
        ]
        due.sort(key=lambda s: (s.next_run_at, s.key))
        return due[: max(limit, 0)]


def due_paused() -> MemoryStorage:
    return DuePaused(name=_store("due_paused"))


class DueLimitBeforeWorkflows(MemoryStorage):
    """Breaks *due_schedules with workflows gives only theirs, up to the
    limit*: it takes the first ``limit`` due schedules of every workflow and
    then keeps those of ``workflows``, as the engine once did on its side, so
    enough due schedules of other workflows leave a page short or empty
    while schedules of the workflows asked for are due."""

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        page = await super().due_schedules(limit)
        if workflows is None:
            return page
        return [s for s in page if s.workflow in workflows]


def due_limit_before_workflows() -> MemoryStorage:
    return DueLimitBeforeWorkflows(name=_store("due_limit_before_workflows"))


class UpsertUnpauses(MemoryStorage):
    """Breaks *re-registering a schedule keeps it paused*: registering a
    schedule stores it unpaused, as an upsert that sets every column would,
    so a worker that registers its schedules at start resumes the ones an
    operator paused."""

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        record = dataclasses.replace(await super().upsert_schedule(spec), paused=False)
        self._schedules[spec.key] = record
        return record


def upsert_unpauses() -> MemoryStorage:
    return UpsertUnpauses(name=_store("upsert_unpauses"))


class FiresPaused(MemoryStorage):
    """Breaks *a paused schedule's slot does not fire*: ``claim_schedule_slot``
    compares the slot but not the paused flag, so a worker that read the
    schedule as due just before it was paused still fires it."""

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        sched = self._schedules.get(key)
        if sched is not None and sched.paused:
            self._schedules[key] = dataclasses.replace(sched, paused=False)
            try:
                return await super().claim_schedule_slot(key, slot, next_run_at, run)
            finally:
                current = self._schedules.get(key)
                if current is not None:
                    self._schedules[key] = dataclasses.replace(current, paused=True)
        return await super().claim_schedule_slot(key, slot, next_run_at, run)


def fires_paused() -> MemoryStorage:
    return FiresPaused(name=_store("fires_paused"))
