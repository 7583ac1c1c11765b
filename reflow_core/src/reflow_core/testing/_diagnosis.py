"""Why a run cannot go on, in words: the ``blocked_reason`` of a result."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from reflow_core.engine import Run
from reflow_core.limits import hold_reason
from reflow_core.storage import RunRecord


@dataclass(frozen=True, slots=True)
class Stall:
    """Why driving stopped with a run still in flight."""

    kind: Literal["wall", "backoff", "never", "busy"]
    count: int = 0
    at: datetime | None = None
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Driving:
    """What the test engine knows beyond the stored run, for its diagnosis."""

    now: datetime
    """The virtual time."""
    registered: Collection[str]
    """The names of the workflows registered with the test engine."""
    stall: Stall | None
    """Why the last drive stopped with a run in flight, if it did."""
    ticking: bool
    """Whether the test engine's own tick is still in flight."""
    attempts: Mapping[str, Mapping[str, tuple[int, float]]]
    """The active step attempts by run id: ``{step: (attempt, started)}``."""
    wall_timeout: float
    """Seconds of real time without progress after which a drive stops."""


def blocked_reason(record: RunRecord, run: Run, driving: Driving) -> str:
    """Why the unfinished run ``record`` (``run`` with its saved steps) cannot
    go on by itself, and what would move it."""
    now = driving.now
    status = record.status
    if status == "sleeping":
        sleeps = _record_steps(run, "sleeping")
        where = f" in step {sleeps[0]!r}" if sleeps else ""
        wake = record.wake_at
        until = f" until {_when(wake, now)}" if wake is not None else ""
        hint = "; advance the clock to wake it" if wake is None or wake > now else ""
        return _unclaimed(record, f"sleeping{where}{until}{hint}", wake, driving)
    if status == "waiting":
        event = record.waiting_for or next(iter(_record_steps(run, "waiting")), "?")
        wake = record.wake_at
        if wake is None:
            text = f"waiting for event {event!r} (no timeout); send it with send_event()"
        else:
            text = (
                f"waiting for event {event!r} (timeout at {_when(wake, now)}); send it "
                "with send_event(), or advance the clock past the timeout"
            )
        return _unclaimed(record, text, wake, driving)
    hold = hold_reason(record)
    if hold is not None and record.blocked_by is not None:
        return f"{status}, {hold}"
    if status == "delayed":
        wake = record.wake_at
        text = f"delayed until {_when(wake, now)}" if wake is not None else "delayed"
        if hold is not None:
            text = f"delayed, {hold}"
        if wake is not None and wake > now:
            text += "; advance the clock to start it"
        return _unclaimed(record, text, wake, driving)
    if status == "pending":
        return _unclaimed(record, "pending", record.wake_at or now, driving)
    return _running(record, driving)


def _unclaimed(record: RunRecord, text: str, wake: datetime | None, driving: Driving) -> str:
    """``text``, or why a run that is due was not taken."""
    if wake is None or wake > driving.now:
        return text
    if record.workflow not in driving.registered:
        return (
            f"{text}, and due, but no worker took it: is workflow {record.workflow!r} "
            "registered with this test engine?"
        )
    if driving.stall is not None:
        return f"{text}, and due; it runs once the run in flight gets going again"
    return f"{text}, and due, but no worker took it"


def _running(record: RunRecord, driving: Driving) -> str:
    stall = driving.stall
    if not driving.ticking or stall is None:
        expires = record.lease_expires_at
        lease = f" (lease until {expires.isoformat()})" if expires is not None else ""
        return f"running on another worker{lease}"
    active = driving.attempts.get(record.id, {})
    names = ", ".join(f"{name!r}" for name in active)
    steps = f"step {names}" if len(active) == 1 else f"steps {names}"
    attempts = ", ".join(f"attempt {a}" for a, _ in active.values())
    if stall.kind == "backoff":
        who = f"{steps} keeps failing" if active else "a step keeps failing"
        at = stall.at.isoformat() if stall.at else ""
        return (
            f"{who}: its retry back-off never ends (passed {stall.count} back-offs, "
            f"the clock is at {at}{'; ' + attempts if active else ''})"
        )
    if stall.kind == "never":
        who = steps if active else "a step"
        return f"{who} waits for a retry back-off that never ends (longer than the clock can count)"
    if stall.kind == "busy":
        return (
            f"runs kept becoming due again ({stall.count} claims without settling); "
            "does something keep waking this run?"
        )
    idle = _human(timedelta(seconds=time.monotonic() - stall.since + driving.wall_timeout))
    if active:
        return (
            f"{steps} ({attempts}) has been running for {idle} of real time without "
            "finishing; does it wait for something that never happens?"
        )
    return f"it has been running for {idle} of real time without progress"


def _record_steps(run: Run, status: str) -> list[str]:
    """Names of the run's saved steps with ``status``."""
    return [name for name, step in run.steps.items() if step.status == status]


def _human(delta: timedelta) -> str:
    """``timedelta(hours=25, minutes=3)`` as ``"1d 1h 3m"``."""
    ms = max(0, round(delta.total_seconds() * 1000))
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms // 1000
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return " ".join(parts)


def _when(moment: datetime, now: datetime) -> str:
    if moment <= now:
        return f"{moment.isoformat()}, already passed"
    return f"{moment.isoformat()}, {_human(moment - now)} from now"
