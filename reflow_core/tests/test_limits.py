"""Priorities and fleet-wide concurrency limits, on every backend.

What a backend stores and how its claim enforces a limit is the conformance
suite's business; these check the engine's side: the options of
``workflow()`` and ``enqueue()``, the keys computed from the input, two
engines on one store never running more than a key allows, runs told why
they wait, and bad options refused before anything is written.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from reflow_core import ConfigError, Engine, Limit, StepContext, ValidationError, workflow
from reflow_core.limits import WORKFLOW_LIMIT_PREFIX
from reflow_core.storage import ConcurrencyLimit, Storage

from .conftest import blocked_status


def _engine(storage: Storage, *workflows: Any, **options: Any) -> Engine:
    options.setdefault("close_storage", False)
    options.setdefault("poll_interval", "50ms")
    return Engine(storage=storage, workflows=list(workflows), load_entry_points=False, **options)


class Tracker:
    """Which runs of each key were running when, as the handlers saw it."""

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total = 0
        self.peak_total = 0

    async def work(self, key: str, seconds: float) -> None:
        self.active[key] = self.active.get(key, 0) + 1
        self.total += 1
        self.peak[key] = max(self.peak.get(key, 0), self.active[key])
        self.peak_total = max(self.peak_total, self.total)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.active[key] -= 1
            self.total -= 1


async def test_one_run_per_key_at_a_time_across_two_engines(db: Any) -> None:
    tracker = Tracker()

    async def sync(ctx: StepContext[dict[str, Any], Any]) -> str:
        await tracker.work(ctx.input["customer"], 0.02)
        return str(ctx.input["customer"])

    wf = workflow(
        "sync-customer", input=dict, concurrency=Limit(key=lambda i: i["customer"], max=1)
    ).step("sync", sync)
    one, two = db.connect(), db.connect()
    async with _engine(one, wf, concurrency=8) as first, _engine(two, wf, concurrency=8):
        runs = [await first.enqueue(wf, {"customer": f"c{n % 4}"}) for n in range(24)]
        for run in runs:
            await first.result(run.id, timeout=20)
        record = await one.get_run(runs[0].id)
    assert tracker.peak == {f"c{n}": 1 for n in range(4)}
    assert tracker.peak_total > 1  # different keys did run side by side
    assert record is not None
    assert record.limits == (ConcurrencyLimit("sync-customer:c0", 1),)
    assert record.blocked_by is None


async def test_max_running_bounds_a_workflow(storage: Storage) -> None:
    tracker = Tracker()

    async def call(ctx: StepContext[Any, Any]) -> None:
        await tracker.work("all", 0.02)

    wf = workflow("partner-call", max_running=2).step("call", call)
    async with _engine(storage, wf, concurrency=10) as engine:
        runs = [await engine.enqueue(wf, n) for n in range(12)]
        for run in runs:
            await engine.result(run.id, timeout=20)
    assert tracker.peak == {"all": 2}
    first = await storage.get_run(runs[0].id)
    assert first is not None
    assert first.limits == (ConcurrencyLimit(WORKFLOW_LIMIT_PREFIX + "partner-call", 2),)


async def test_a_named_limit_is_shared_by_workflows(storage: Storage) -> None:
    tracker = Tracker()

    async def call(ctx: StepContext[Any, Any]) -> None:
        await tracker.work("partner", 0.02)

    shared = Limit(key=lambda i: "api", max=1, name="partner")
    a = workflow("a", concurrency=shared).step("call", call)
    b = workflow("b", concurrency=shared).step("call", call)
    async with _engine(storage, a, b, concurrency=10) as engine:
        runs = [await engine.enqueue(a if n % 2 else b, n) for n in range(8)]
        for run in runs:
            await engine.result(run.id, timeout=20)
        record = await storage.get_run(runs[0].id)
    assert tracker.peak == {"partner": 1}
    assert record is not None
    assert record.limits == (ConcurrencyLimit("partner:api", 1),)


async def test_higher_priorities_run_first(storage: Storage) -> None:
    order: list[str] = []
    wf = workflow("jobs", priority=1).step("run", lambda ctx: order.append(ctx.input))
    async with _engine(storage, wf, worker=False, concurrency=1) as engine:
        await engine.enqueue(wf, "low", priority=-5)
        await engine.enqueue(wf, "default")
        await engine.enqueue(wf, "urgent", priority=10)
        await engine.enqueue(wf, "default-2")
        while await engine.tick():
            pass
        run = await engine.enqueue(wf, "x")
    assert order == ["urgent", "default", "default-2", "low"]
    assert run.priority == 1


async def test_a_run_waiting_for_a_slot_says_why(storage: Storage) -> None:
    release = asyncio.Event()

    async def hold(ctx: StepContext[Any, Any]) -> None:
        await release.wait()

    wf = workflow("exclusive", input=dict, concurrency=Limit(key=lambda i: i["k"], max=1)).step(
        "hold", hold
    )
    async with _engine(storage, wf, concurrency=4) as engine:
        first = await engine.enqueue(wf, {"k": "x"})
        second = await engine.enqueue(wf, {"k": "x"})
        status = await blocked_status(engine, second.id)
        assert status.status == "pending"
        assert status.blocked_by == "exclusive:x"
        release.set()
        await engine.result(first.id, timeout=10)
        await engine.result(second.id, timeout=10)
        assert (await engine.get_run_status(second.id)).blocked_by is None


async def test_a_key_that_cannot_be_computed_writes_nothing(storage: Storage) -> None:
    wf = workflow("keyed", concurrency=Limit(key=lambda i: i["missing"], max=1)).step(
        "s", lambda ctx: None
    )
    async with _engine(storage, wf, worker=False) as engine:
        with pytest.raises(ValidationError, match="concurrency key of workflow 'keyed'"):
            await engine.enqueue(wf, {"other": 1})
        with pytest.raises(ConfigError, match="priority"):
            await engine.enqueue(wf, {"missing": 1}, priority=10**9)
        assert (await engine.list_runs()).runs == []


def test_flow_options_are_checked_when_the_workflow_is_defined() -> None:
    with pytest.raises(ConfigError, match="max_running"):
        workflow("w", max_running=0)
    with pytest.raises(ConfigError, match="priority"):
        workflow("w", priority="high")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="concurrency must be a Limit"):
        workflow("w", concurrency=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Limit\.max"):
        Limit(key=lambda i: i, max=0)
    with pytest.raises(ConfigError, match="reserved"):
        Limit(key=lambda i: i, max=1, name="reflow:mine")
    wf = workflow("w", priority=3, max_running=4, concurrency=Limit(key=lambda i: i, max=1))
    assert (wf.flow.priority, wf.flow.max_running) == (3, 4)
    assert wf.step("s", lambda ctx: None).flow == wf.flow
