"""Helpers of the event modules (``test_events``, ``test_event_buffer``):
taking every buffered event, delivering under a cap, and reading the outcome
of a take or a capped delivery."""

from __future__ import annotations

from reflow_conformance import promises as P
from reflow_conformance.harness import promise
from reflow_core import codec
from reflow_core.errors import EventBufferFullError
from reflow_core.storage import EventTake, Lease, Storage

from ._util import decoded

__all__ = ["deliver_capped", "drain_events", "is_full", "nothing_found", "took"]


def took(take: EventTake | None, expected: object) -> bool:
    return take is not None and take.found and decoded(take.payload) == expected


def nothing_found(take: EventTake | None) -> bool:
    return take is not None and not take.found and take.payload is None


async def drain_events(s: Storage, lease: Lease, event: str, prefix: str) -> list[object]:
    """Take every buffered ``event`` (one wait step each), oldest first."""
    found: list[object] = []
    for i in range(100):
        take = await s.take_event(lease, f"{prefix}-{i}", event)
        promise(take is not None, P.LIVE_LEASE_ACCEPTED, "take_event refused a live lease")
        assert take is not None
        if not take.found:
            return found
        found.append(decoded(take.payload))
    promise(
        False,
        P.EVENT_ONCE_IN_ORDER,
        f"more than 100 {event!r} events taken: a take does not consume the event",
    )
    return found


async def deliver_capped(
    s: Storage, run_id: str, event: str, value: object, cap: int, event_id: str | None = None
) -> bool | EventBufferFullError:
    """``deliver_event`` under a cap: its answer, or the refusal it raised."""
    try:
        return await s.deliver_event(
            run_id, event, codec.encode(value), event_id=event_id, max_buffered=cap
        )
    except EventBufferFullError as exc:
        return exc


def is_full(got: bool | EventBufferFullError, run_id: str, event: str, cap: int) -> bool:
    """``got`` is the refusal of a full buffer, and says which run, event and cap."""
    return (
        isinstance(got, EventBufferFullError)
        and got.run_id == run_id
        and got.event == event
        and got.limit == cap
    )
