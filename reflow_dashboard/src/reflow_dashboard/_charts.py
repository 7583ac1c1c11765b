"""The bars of the overview's charts: runs finished per minute (last hour)
and per 15 minutes (last day), from :meth:`Storage.finished_history`.

Only geometry and words are computed here; the SVG is written by the
``_chart.html`` template, so every text in it goes through the same
escaping as the rest of the page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from reflow_core.adapter import minute_of
from reflow_core.storage import FinishedMinute

__all__ = ["Bar", "Chart", "Segment", "build_chart"]

STATUSES = ("completed", "failed", "cancelled")
_TOP = 14.0
"""Room above the bars for the scale's label."""
_PLOT = 110.0
"""Height of the plot area."""
_BOTTOM = 18.0
"""Room below the bars for the time labels."""


@dataclass(frozen=True, slots=True)
class Segment:
    status: str
    y: float
    height: float


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    width: float
    start: datetime
    completed: int
    failed: int
    cancelled: int
    segments: tuple[Segment, ...]
    title: str
    """The hover text: the period and its counts."""

    @property
    def total(self) -> int:
        return self.completed + self.failed + self.cancelled


@dataclass(frozen=True, slots=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    id: str
    label: str
    """What the chart shows, for the ``aria-label``."""
    width: float
    height: float
    plot_top: float
    plot_bottom: float
    scale: int
    """The count the top of the plot stands for."""
    bars: tuple[Bar, ...]
    ticks: tuple[Tick, ...]
    totals: dict[str, int]

    @property
    def empty(self) -> bool:
        return not any(self.totals.values())


def _nice(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at least ``value`` (1 at least)."""
    if value <= 1:
        return 1
    power = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns


def build_chart(
    chart_id: str,
    history: Sequence[FinishedMinute],
    now: datetime,
    *,
    minutes: int,
    bucket: int = 1,
    pitch: float = 10.0,
    tick_every: int = 10,
) -> Chart:
    """Bars of ``bucket`` minutes each covering the last ``minutes`` minutes
    up to ``now`` (its minute included). Buckets start on multiples of
    ``bucket`` minutes of the clock, so the bars stay put as time passes
    (the oldest one may reach before the window). A time label marks
    every ``tick_every``-th bar."""
    step = timedelta(minutes=bucket)
    last_minute = minute_of(now)
    first_minute = last_minute - timedelta(minutes=minutes - 1)

    def floor(moment: datetime) -> datetime:
        return moment - timedelta(minutes=(moment.hour * 60 + moment.minute) % bucket)

    first = floor(first_minute)
    count = int((floor(last_minute) - first) / step) + 1
    counts = [dict.fromkeys(STATUSES, 0) for _ in range(count)]
    for entry in history:
        minute = minute_of(entry.minute)
        if not first_minute <= minute <= last_minute:
            continue
        slot = int((minute - first) / step)
        counts[slot]["completed"] += entry.completed
        counts[slot]["failed"] += entry.failed
        counts[slot]["cancelled"] += entry.cancelled
    scale = _nice(max((sum(c.values()) for c in counts), default=0))
    width = count * pitch
    bars: list[Bar] = []
    ticks: list[Tick] = []
    for i, by_status in enumerate(counts):
        start = first + i * step
        x = i * pitch
        y = _TOP + _PLOT
        segments = []
        for status in STATUSES:
            n = by_status[status]
            if n:
                height = _PLOT * n / scale
                y -= height
                segments.append(Segment(status, round(y, 2), round(height, 2)))
        when = start.strftime("%H:%M")
        if bucket > 1:
            when = f"{when} to {(start + step).strftime('%H:%M')}"
        title = (
            f"{when} UTC: {by_status['completed']} completed, "
            f"{by_status['failed']} failed, {by_status['cancelled']} cancelled"
        )
        bars.append(
            Bar(
                x=x,
                width=pitch,
                start=start,
                completed=by_status["completed"],
                failed=by_status["failed"],
                cancelled=by_status["cancelled"],
                segments=tuple(segments),
                title=title,
            )
        )
        minute_of_day = start.hour * 60 + start.minute
        if minute_of_day % (tick_every * bucket) == 0:
            ticks.append(Tick(x=x, label=start.strftime("%H:%M")))
    totals = {status: sum(c[status] for c in counts) for status in STATUSES}
    label = "Runs finished per minute" if bucket == 1 else f"Runs finished per {bucket} minutes"
    return Chart(
        id=chart_id,
        label=label,
        width=width,
        height=_TOP + _PLOT + _BOTTOM,
        plot_top=_TOP,
        plot_bottom=_TOP + _PLOT,
        scale=scale,
        bars=tuple(bars),
        ticks=tuple(ticks),
        totals=totals,
    )
