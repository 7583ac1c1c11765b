"""Adapters that break a promise about run deadlines: storing ``deadline_at``
by the storage's clock, capping a sleeping run's wake-up by it, and clearing
it on a requeue."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from reflow_core.adapter import due_by_deadline, is_delayed
from reflow_core.memory import MemoryStorage
from reflow_core.storage import CreateResult, Lease, NewRun

from ._common import _store
from .delays import _host_clock


class IgnoresDeadline(MemoryStorage):
    """Breaks *a run's deadline_at is the storage's now plus NewRun.deadline*:
    the deadline is never stored (``deadline_at`` stays ``None``), as an
    adapter whose insert predates the field would; no run is ever capped."""

    async def create_run(self, new: NewRun) -> CreateResult:
        if new.deadline is not None:
            self._check_open("create_run")
            new = dataclasses.replace(new, deadline=None)
        return await super().create_run(new)


def ignores_deadline() -> MemoryStorage:
    return IgnoresDeadline(name=_store("ignores_deadline"))


class SleepIgnoresDeadline(MemoryStorage):
    """Breaks *a sleeping run's wake_at is the earlier of its sleep's end and
    its deadline_at*: the run sleeps to the sleep's end, as a ``sleep_run``
    writing one ``wake_at`` to the step and the run would; a run sleeping
    past its deadline is not claimed until it wakes, too late to fail it."""

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        wake_at = await super().sleep_run(lease, step, duration)
        if wake_at is not None:
            entry = self._runs[lease.run_id]
            entry.record = dataclasses.replace(entry.record, wake_at=wake_at)
        return wake_at


def sleep_ignores_deadline() -> MemoryStorage:
    return SleepIgnoresDeadline(name=_store("sleep_ignores_deadline"))


class CapsSleepStep(MemoryStorage):
    """Breaks *the step record and sleep_run's result keep the sleep's own
    end* (and the run's cap): the cap lands on the step record and the result
    instead of the run, as a ``sleep_run`` with its two ``wake_at`` values
    swapped would; the run sleeps to the sleep's end, and a reclaimed run
    wakes from its sleep at the deadline."""

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        wake_at = await super().sleep_run(lease, step, duration)
        if wake_at is None:
            return None
        entry = self._runs[lease.run_id]
        capped = due_by_deadline(wake_at, entry.record.deadline_at)
        entry.steps[step] = dataclasses.replace(entry.steps[step], wake_at=capped)
        entry.record = dataclasses.replace(entry.record, wake_at=wake_at)
        return capped


def caps_sleep_step() -> MemoryStorage:
    return CapsSleepStep(name=_store("caps_sleep_step"))


class RequeueKeepsDeadline(MemoryStorage):
    """Breaks *requeue_run clears deadline_at*: a requeued run keeps the
    deadline it had, as a requeue resetting only the fields it always reset
    would; the engine fails it again as soon as it is claimed."""

    async def requeue_run(self, run_id: str) -> bool:
        entry = self._runs.get(run_id)
        deadline_at = None if entry is None else entry.record.deadline_at
        requeued = await super().requeue_run(run_id)
        if requeued and entry is not None:
            entry.record = dataclasses.replace(entry.record, deadline_at=deadline_at)
        return requeued


def requeue_keeps_deadline() -> MemoryStorage:
    return RequeueKeepsDeadline(name=_store("requeue_keeps_deadline"))


class DeadlineByClientClock(MemoryStorage):
    """Breaks *a run's deadline_at is the storage's now at its creation plus
    the deadline*: ``deadline_at`` is computed in the application from its
    host's clock, an hour behind the store's, and sent with the insert (a
    delayed run's ``wake_at`` capped by it), while ``created_at`` is the
    store's own ``now()``; every deadline under an hour has passed at once."""

    async def create_run(self, new: NewRun) -> CreateResult:
        result = await super().create_run(new)
        if not result.created or new.deadline is None:
            return result
        entry = self._runs[result.run.id]
        deadline_at = _host_clock() + new.deadline
        wake_at = entry.record.wake_at
        if is_delayed(new) and new.delay is not None:
            wake_at = due_by_deadline(entry.record.created_at + new.delay, deadline_at)
        entry.record = dataclasses.replace(entry.record, deadline_at=deadline_at, wake_at=wake_at)
        return CreateResult(entry.record, created=True)


def deadline_by_client_clock() -> MemoryStorage:
    return DeadlineByClientClock(name=_store("deadline_by_client_clock"))
