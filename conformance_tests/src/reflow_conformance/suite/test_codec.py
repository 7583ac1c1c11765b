"""Round trips: a value encoded with :func:`reflow_core.codec.encode` comes
back exactly from every place a backend stores encoded text: a run's input
and output, a step's output and error, an event's payload and a schedule's
input (left out if the adapter declares it does not implement schedules)."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_conformance.strategies import ZONE_KEYS, plain_differences, plain_values
from reflow_core import codec
from reflow_core.errors import SerializationError
from reflow_core.storage import NewRun, ScheduleSpec, StepRecord, Storage

from ._util import claim_one

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestRoundTrip"]


def _zoned(key: str, wall: datetime, fold: int = 0) -> list[datetime]:
    """``wall`` in zone ``key`` (nothing if this machine has no data for it)."""
    if key not in ZONE_KEYS:
        return []
    return [wall.replace(tzinfo=zoneinfo.ZoneInfo(key), fold=fold)]


TRICKY: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64 + 1,
    -(2**200),
    1.5,
    -0.0,
    5e-324,
    1.7976931348623157e308,
    "",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff\ud800",
    "\u00e9\u4e2d\U0001f600",
    '"\\',
    [[[]], {}, [{}]],
    {"$datetime": "2020-01-01T00:00:00"},
    {"$escape": {"a": 1}},
    {"$": 1},
    {"$a": 1, "$b": 2},
    {"\x00": "\ud800", "": None},
    {"$datetime": {"$escape": {"$": [1]}}},
    datetime(2026, 1, 2, 3, 4, 5, 678901),
    datetime(1, 1, 1),
    datetime(9999, 12, 31, 23, 59, 59, 999999),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=5, minutes=45))),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(-timedelta(hours=23, minutes=59))),
    *_zoned("Europe/Paris", datetime(2026, 7, 14, 12)),
    *_zoned("Europe/Paris", datetime(2026, 10, 25, 2, 30), fold=0),
    *_zoned("Europe/Paris", datetime(2026, 10, 25, 2, 30), fold=1),
    *_zoned("Europe/Paris", datetime(2026, 3, 29, 2, 30), fold=0),
    *_zoned("Europe/Paris", datetime(2026, 3, 29, 2, 30), fold=1),
    *_zoned("America/New_York", datetime(2025, 11, 2, 1, 30), fold=1),
    *_zoned("Australia/Lord_Howe", datetime(2025, 4, 6, 1, 45), fold=1),
]
"""Values every store must keep exactly, whatever Hypothesis draws."""


async def _round_trip(reflow: Harness, s: Storage, value: Any) -> None:
    """Store ``value`` everywhere encoded text goes, read it back from each place."""
    text = codec.encode(value)
    wf, key = reflow.unique(), reflow.unique("sched")
    places: dict[str, str | None] = {}

    created = await s.create_run(NewRun(wf, text))
    places["create_run(...).run.input"] = created.run.input
    run_id = created.run.id
    held = await claim_one(s, wf)
    places["claim_runs(...).run.input"] = held.run.input
    step = StepRecord("step", "completed", output=text, error=text)
    await s.save_step_result(held.lease, step, reflow.long_lease)
    await s.deliver_event(run_id, "event", text)
    taken = await s.take_event(held.lease, "wait", "event")
    places["take_event(...).payload"] = None if taken is None else taken.payload
    last = StepRecord("last", "failed", error=text, output=text)
    await s.finish_run(held.lease, "completed", output=text, step=last)
    run = await s.get_run(run_id)
    places["get_run(...).input"] = None if run is None else run.input
    places["get_run(...).output"] = None if run is None else run.output
    listed = [r for r in (await s.list_runs(workflow=wf)).runs if r.id == run_id]
    places["list_runs(...).output"] = listed[0].output if listed else None
    steps = await s.get_step_results(run_id)
    for name in ("step", "wait", "last"):
        record = steps.get(name)
        places[f"step {name!r} output"] = None if record is None else record.output
        if name != "wait":
            places[f"step {name!r} error"] = None if record is None else record.error

    if reflow.implements("schedules"):
        future = datetime(2200, 1, 1, tzinfo=UTC)
        upserted = await s.upsert_schedule(ScheduleSpec(key, wf, text, "every:60", future))
        places["upsert_schedule(...).input"] = upserted.input
        schedules = [record for record in await s.list_schedules() if record.key == key]
        places["list_schedules() input"] = schedules[0].input if schedules else None
        await s.delete_schedule(key)

    for place, stored in places.items():
        promise(stored is not None, P.ROUND_TRIP, f"{place}: nothing stored for {text}")
        assert stored is not None
        try:
            back = codec.decode(stored)
        except SerializationError as exc:
            promise(False, P.ROUND_TRIP, f"{place}: {stored!r} does not decode ({exc})")
        diff = plain_differences(value, back)
        promise(not diff, P.ROUND_TRIP, f"{place}, stored {text}: " + "; ".join(diff))


class TestRoundTrip:
    def test_tricky_values_round_trip_everywhere(self, reflow: Harness) -> None:
        async def body(s: Storage) -> None:
            for value in TRICKY:
                await _round_trip(reflow, s, value)

        reflow.run(body)

    def test_any_plain_value_round_trips_everywhere(self, reflow: Harness) -> None:
        @suite_settings()
        @given(plain_values())
        def check(value: Any) -> None:
            async def body(s: Storage) -> None:
                await _round_trip(reflow, s, value)

            reflow.run(body)

        check()
