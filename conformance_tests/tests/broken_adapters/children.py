"""Adapters that break a promise about child runs: starting one once and
only under the parent's lease, its deadline, waking its waiting parent at
the right end, and the cancel that cascades down to it."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from reflow_core.adapter import (
    check_child_start,
    child_of,
    due_by_deadline,
    is_delayed,
    new_run_record,
)
from reflow_core.memory import MemoryStorage, _Run
from reflow_core.storage import CHILDREN_WAIT_PREFIX, Lease, NewRun, RunRecord

from ._common import _store


class ChildTwice(MemoryStorage):
    """Breaks *start_child with the id of an existing child returns it and
    writes nothing*: the existing child is replaced by a fresh one, as an
    ``INSERT ... ON CONFLICT (id) DO UPDATE`` meant to make the start
    idempotent would; a replayed step restarts a child that already ran."""

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        if new.run_id is not None and self._live(lease, self._clock()) is not None:
            existing = self._runs.get(new.run_id)
            if existing is not None and child_of(existing.record, lease.run_id, step):
                del self._runs[new.run_id]
                self._children[lease.run_id].remove(new.run_id)
        return await super().start_child(lease, step, new)


def child_twice() -> MemoryStorage:
    return ChildTwice(name=_store("child_twice"))


class UnfencedChild(MemoryStorage):
    """Breaks *start_child on a lost lease returns None and creates nothing*:
    the child is created for any parent that exists, whatever the lease, as
    an insert that never looks at the parent's row would; a worker that lost
    its run still starts children."""

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        self._check_open("start_child")
        check_child_start(lease, step, new)
        assert new.run_id is not None
        parent = self._runs.get(lease.run_id)
        if parent is None or self._live(lease, self._clock()) is not None:
            return await super().start_child(lease, step, new)
        existing = self._runs.get(new.run_id)
        if existing is not None:
            return existing.record
        now = self._clock()
        record = new_run_record(new.run_id, new, now, parent=parent.record, parent_step=step)
        self._runs[new.run_id] = _Run(record)
        self._track(record)
        self._children.setdefault(lease.run_id, []).append(new.run_id)
        return record


def unfenced_child() -> MemoryStorage:
    return UnfencedChild(name=_store("unfenced_child"))


class CancelNoCascade(MemoryStorage):
    """Breaks *cancelling a run cancels every unfinished run below it*: only
    the run itself is cancelled, as ``update_run_status`` written before
    children existed would; its children run on, orphaned."""

    def _cancel_below(self, run_id: str, now: datetime) -> None:
        return None


def cancel_no_cascade() -> MemoryStorage:
    return CancelNoCascade(name=_store("cancel_no_cascade"))


class ChildEndNoWake(MemoryStorage):
    """Breaks *the end of a waiting parent's last child makes it claimable
    at once*: a child's end never touches its parent, as a backend that left
    the wake-up to a poller it never wrote would; the parent waits until its
    deadline, or for ever."""

    def _ended(self, entry: _Run, now: datetime) -> None:
        self._discard_events(entry)
        entry.finished_at = now


def child_end_no_wake() -> MemoryStorage:
    return ChildEndNoWake(name=_store("child_end_no_wake"))


class WakesOnFirstChild(MemoryStorage):
    """Breaks *a waiting parent stays unclaimable while another child at that
    step is unfinished*: the end of any child wakes a parent waiting for
    children, as a wake-up that skipped the count of open children would;
    the parent resumes with children still running."""

    def _ended(self, entry: _Run, now: datetime) -> None:
        self._discard_events(entry)
        entry.finished_at = now
        rec = entry.record
        parent = None if rec.parent_id is None else self._runs.get(rec.parent_id)
        if parent is None:
            return
        waiting_for = parent.record.waiting_for or ""
        if parent.record.status == "waiting" and waiting_for.startswith(CHILDREN_WAIT_PREFIX):
            self._update(parent, now, wake_at=now)


def wakes_on_first_child() -> MemoryStorage:
    return WakesOnFirstChild(name=_store("wakes_on_first_child"))


class ChildOutlivesParent(MemoryStorage):
    """Breaks *a child's deadline_at is the earlier of its own and its
    parent's*: a child gets only the deadline it asks for, as a
    ``start_child`` that reuses ``create_run``'s insert would; a child of a
    parent past its deadline runs on."""

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        fresh = new.run_id is not None and new.run_id not in self._runs
        child = await super().start_child(lease, step, new)
        if child is None or not fresh:
            return child
        deadline_at = None if new.deadline is None else child.created_at + new.deadline
        wake_at = child.created_at
        if is_delayed(new) and new.delay is not None:
            wake_at = child.created_at + new.delay
        entry = self._runs[child.id]
        entry.record = dataclasses.replace(
            child, deadline_at=deadline_at, wake_at=due_by_deadline(wake_at, deadline_at)
        )
        return entry.record


def child_outlives_parent() -> MemoryStorage:
    return ChildOutlivesParent(name=_store("child_outlives_parent"))
