"""Deadlines for whole runs (``workflow(..., timeout=...)``, ``enqueue(..., deadline=...)``),
on every backend.

A run past its deadline fails with ``RunDeadlineError``: a step in flight is
cancelled through its signal, and a run that is delayed, sleeping or waiting
becomes claimable at its deadline to be failed then. What a backend stores
(``deadline_at``, the claimable time) is the conformance suite's business.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from reflow_core import (
    ConfigError,
    Engine,
    RunDeadlineError,
    RunFailedError,
    StepContext,
    Workflow,
    workflow,
)
from reflow_core.storage import Storage


def _engine(storage: Storage, *workflows: Workflow[Any, Any], **options: Any) -> Engine:
    options.setdefault("close_storage", False)
    options.setdefault("load_entry_points", False)
    return Engine(storage=storage, workflows=workflows, **options)


async def test_a_step_still_running_at_the_deadline_is_cancelled_and_the_run_fails(
    storage: Storage,
) -> None:
    cancelled: list[str] = []
    failures: list[Any] = []

    async def slow(ctx: StepContext[Any, Any]) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.signal.reason or "")
            raise

    wf = (
        workflow("bounded", timeout="400ms")
        .step("quick", lambda ctx: 1)
        .step("slow", slow)
        .on_failure(failures.append)
    )
    async with _engine(storage, wf, poll_interval="50ms") as engine:
        started = time.monotonic()
        run = await engine.enqueue(wf)
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout=10)
        took = time.monotonic() - started
        done = await engine.get_run_status(run.id)
    assert 0.35 <= took < 5, took
    assert info.value.error_code == RunDeadlineError.code == "deadline_exceeded"
    assert info.value.step == "slow"
    assert cancelled == ["deadline"]
    assert done.steps["quick"].status == "completed"
    assert done.error is not None
    assert done.error["step"] == "slow"
    assert [f.step for f in failures] == ["slow"]
    record = await storage.get_run(run.id)
    assert record is not None
    assert record.deadline_at == record.created_at + timedelta(milliseconds=400)


async def test_an_enqueue_deadline_bounds_one_run_and_the_earlier_one_counts(
    storage: Storage,
) -> None:
    async def slow(ctx: StepContext[Any, Any]) -> None:
        await asyncio.sleep(30)

    wf = workflow("per-run", timeout="1h").step("slow", slow)
    async with _engine(storage, wf, poll_interval="50ms") as engine:
        run = await engine.enqueue(wf, deadline="300ms")
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout=10)
        record = await storage.get_run(run.id)
        await engine.stop(timeout=0)  # the next run is only stored, never started
        later = await engine.enqueue(wf, deadline="2h")
        limited = await storage.get_run(later.id)
    assert info.value.error_code == "deadline_exceeded"
    assert record is not None
    assert record.deadline_at is not None
    assert record.deadline_at - record.created_at == timedelta(milliseconds=300)
    assert limited is not None
    assert limited.deadline_at is not None
    assert limited.deadline_at - limited.created_at == timedelta(hours=1)  # the workflow's


@pytest.mark.parametrize("kind", ["sleeping", "waiting", "delayed"])
async def test_a_paused_run_fails_when_its_deadline_passes(db: Any, clock: Any, kind: str) -> None:
    ran: list[str] = []
    wf: Workflow[Any, Any] = workflow(f"paused-{kind}", timeout="1h")
    if kind == "sleeping":
        wf = wf.sleep("nap", "2h")
    elif kind == "waiting":
        wf = wf.wait_for_event("approval")
    wf = wf.step("after", lambda ctx: ran.append("after"))
    storage = db.connect(clock=clock)
    async with _engine(storage, wf, worker=False) as engine:
        run = await engine.enqueue(wf, delay="3h" if kind == "delayed" else None)
        await engine.tick()
        record = await storage.get_run(run.id)
        assert record is not None
        assert record.status == kind
        assert record.wake_at == record.created_at + timedelta(hours=1)  # due at the deadline
        clock.advance(3599)
        assert await engine.tick() == 0
        clock.advance(1)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "deadline_exceeded"
    assert ran == []


async def test_a_deadline_as_a_datetime_is_read_on_the_storage_clock(db: Any, clock: Any) -> None:
    wf = workflow("dated").wait_for_event("go").step("after", lambda ctx: "done")
    storage = db.connect(clock=clock)
    async with _engine(storage, wf, worker=False) as engine:
        run = await engine.enqueue(wf, deadline=clock() + timedelta(minutes=5))
        await engine.tick()
        record = await storage.get_run(run.id)
        assert record is not None
        assert record.deadline_at == clock() + timedelta(minutes=5)
        clock.advance(300)
        assert await engine.tick() == 1
        assert (await engine.get_run_status(run.id)).status == "failed"
        # Resuming drops the deadline: the run waits again, for as long as it takes.
        assert await engine.resume(run.id)
        assert await engine.tick() == 1
        resumed = await storage.get_run(run.id)
        assert resumed is not None
        assert (resumed.status, resumed.deadline_at) == ("waiting", None)
        assert await engine.send_event(run.id, "go", None)
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=1) == "done"


async def test_scheduled_runs_get_the_workflow_timeout(db: Any, clock: Any) -> None:
    wf = workflow("scheduled-bounded", timeout="10m").sleep("nap", "1h").step("x", lambda c: 1)
    storage = db.connect(clock=clock)
    async with _engine(storage, wf, worker=False) as engine:
        await engine.schedule(wf, every="1m", key="k")
        clock.advance(60)
        assert await engine.tick() == 1
        [run] = (await engine.list_runs()).runs
    record = await storage.get_run(run.id)
    assert record is not None
    assert record.deadline_at == record.created_at + timedelta(minutes=10)


@pytest.mark.parametrize(
    ("deadline", "message"),
    [
        (datetime(2030, 1, 1), "deadline must be a duration or a timezone-aware datetime"),
        (0, "deadline must be positive"),
        ("-1s", "deadline"),
        ("soon", "deadline='soon' is not a duration"),
    ],
)
async def test_bad_deadlines_are_refused_and_write_nothing(
    storage: Storage, deadline: Any, message: str
) -> None:
    wf = workflow("bad-deadline").step("x", lambda ctx: 1)
    async with _engine(storage, wf, worker=False) as engine:
        with pytest.raises(ConfigError, match=message):
            await engine.enqueue(wf, deadline=deadline)
        assert (await engine.list_runs()).runs == []


def test_a_workflow_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        workflow("w", timeout=0)
    assert workflow("w", timeout="90s").timeout == 90.0
    assert workflow("w", timeout="1m").step("x", lambda c: 1).on_failure(print).timeout == 60.0
