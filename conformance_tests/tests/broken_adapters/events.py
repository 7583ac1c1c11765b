"""Adapters that break a promise about events: buffering, delivery and taking."""

from __future__ import annotations

from collections import deque
from datetime import datetime

from reflow_core.memory import MemoryStorage, _Run
from reflow_core.storage import (
    EventTake,
    Lease,
)

from ._common import _store


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


def events_twice() -> MemoryStorage:
    return EventsTwice(name=_store("events_twice"))


def event_crosses_runs() -> MemoryStorage:
    return EventCrossesRuns(name=_store("event_crosses_runs"))


def unbounded_events() -> MemoryStorage:
    return UnboundedEvents(name=_store("unbounded_events"))


def events_outlive_run() -> MemoryStorage:
    return EventsOutliveRun(name=_store("events_outlive_run"))


class EventsDroppedOnPause(MemoryStorage):
    """Breaks *an event for a live run is buffered until taken*: a run's
    buffered events are dropped whenever it stops running short of its end
    (a sleep, a wait that does not find its event, a hand back), as a store
    that clears the buffer on every status change would."""

    def _update(self, entry: _Run, now: datetime, **changes: object) -> None:
        if changes.get("status") in ("sleeping", "waiting", "pending"):
            entry.events.clear()
        super()._update(entry, now, **changes)


def events_dropped_on_pause() -> MemoryStorage:
    return EventsDroppedOnPause(name=_store("events_dropped_on_pause"))
