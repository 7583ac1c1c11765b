"""Bounded event buffers (``Engine(max_buffered_events=...)``) on every backend,
and retention (``purge_finished``) of the memory backend.

The SQLite, PostgreSQL and Redis packages check in their own tests that a
finished run leaves no buffered event behind in their tables and keys.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reflow_conformance.testsupport import FakeClock, engine_on
from reflow_core import (
    ConfigError,
    Engine,
    EventBufferFullError,
    MemoryStorage,
    StepContext,
    Workflow,
    codec,
    workflow,
)
from reflow_core.storage import Lease, NewRun, StepRecord, Storage

DEFAULT_CAP = 1000


async def _echo(ctx: StepContext[Any, Any]) -> Any:
    return ctx.prev


def _approval() -> Workflow[Any, Any]:
    return (
        workflow("buffered-approval")
        .step("prepare", lambda ctx: "prepared")
        .wait_for_event("approval")
        .step("after", _echo)
    )


# -- the cap, on every backend -----------------------------------------------------


async def test_the_1001st_event_to_a_run_not_yet_waiting_is_refused(storage: Storage) -> None:
    wf = _approval()
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        for i in range(DEFAULT_CAP):
            assert await engine.send_event(run.id, "approval", {"n": i})
        with pytest.raises(EventBufferFullError) as caught:
            await engine.send_event(run.id, "approval", {"n": DEFAULT_CAP})
        assert caught.value.code == "event_buffer_full"
        assert caught.value.run_id == run.id
        assert caught.value.event == "approval"
        assert caught.value.limit == DEFAULT_CAP
        # A send with an id that is new is refused too; nothing was stored.
        with pytest.raises(EventBufferFullError):
            await engine.send_event(run.id, "approval", {"n": -1}, event_id="late")
        current = await engine.get_run(run.id)
        assert current is not None
        assert current.status == "pending"  # never reached its wait
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == {"n": 0}  # the oldest event, consumed at the wait
    assert list(done.steps) == ["prepare", "approval", "after"]


async def test_a_repeated_event_id_to_a_full_run_is_still_a_no_op(storage: Storage) -> None:
    wf = _approval()
    async with engine_on(storage, wf, max_buffered_events=2) as engine:
        run = await engine.enqueue(wf)
        assert await engine.send_event(run.id, "approval", 1, event_id="a")
        assert await engine.send_event(run.id, "approval", 2, event_id="b")
        assert await engine.send_event(run.id, "approval", 3, event_id="a")  # a retry
        with pytest.raises(EventBufferFullError):
            await engine.send_event(run.id, "approval", 4, event_id="c")
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=5) == 1


async def test_the_cap_counts_every_event_of_the_run(storage: Storage) -> None:
    wf = workflow("two-waits").wait_for_event("first").wait_for_event("second").step("after", _echo)
    async with engine_on(storage, wf, max_buffered_events=2) as engine:
        run = await engine.enqueue(wf)
        assert await engine.send_event(run.id, "first", "f1")
        assert await engine.send_event(run.id, "second", "s1")
        with pytest.raises(EventBufferFullError) as caught:
            await engine.send_event(run.id, "first", "f2")
        assert caught.value.limit == 2
        other = await engine.enqueue(wf)
        assert await engine.send_event(other.id, "first", "theirs")  # per run
        assert await engine.tick() == 2
        assert await engine.result(run.id, timeout=5) == "s1"


async def test_consumed_events_free_room_under_the_cap(storage: Storage) -> None:
    wf = workflow("waits-twice").wait_for_event("go").wait_for_event("again").step("after", _echo)
    async with engine_on(storage, wf, max_buffered_events=1) as engine:
        run = await engine.enqueue(wf)
        assert await engine.send_event(run.id, "go", 1)
        with pytest.raises(EventBufferFullError):
            await engine.send_event(run.id, "again", 2)
        assert await engine.tick() == 1  # takes "go", then waits for "again"
        current = await engine.get_run(run.id)
        assert current is not None
        assert current.status == "waiting"
        assert await engine.send_event(run.id, "again", 2)
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=5) == 2


async def test_no_limit_with_none() -> None:
    wf = _approval()
    async with engine_on(MemoryStorage(), wf, max_buffered_events=None) as engine:
        run = await engine.enqueue(wf)
        for i in range(DEFAULT_CAP + 200):
            assert await engine.send_event(run.id, "approval", i)


async def test_a_cancelled_and_resumed_run_starts_with_an_empty_buffer(storage: Storage) -> None:
    wf = _approval()
    async with engine_on(storage, wf, max_buffered_events=1) as engine:
        run = await engine.enqueue(wf)
        assert await engine.send_event(run.id, "approval", "before the cancel")
        assert await engine.cancel(run.id)
        assert await engine.resume(run.id)
        # The event sent before the cancel went with it: there is room, and
        # the run waits for a new one.
        assert await engine.send_event(run.id, "approval", "after the resume")
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=5) == "after the resume"


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "10"])
def test_max_buffered_events_must_be_a_positive_int_or_none(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        Engine(storage=MemoryStorage(), max_buffered_events=value)  # type: ignore[arg-type]
    assert caught.value.option == "max_buffered_events"


# -- retention of the memory backend ------------------------------------------------


async def _finished(store: MemoryStorage, wf: str, key: str | None = None) -> str:
    """A run of ``wf`` that completed now, with a step and a buffered event."""
    run_id = (await store.create_run(NewRun(wf, codec.encode(key), idempotency_key=key))).run.id
    await store.deliver_event(run_id, "e", codec.encode(1), event_id="e1")
    claimed = await store.claim_runs([wf], 1, timedelta(minutes=5))
    assert [c.run.id for c in claimed] == [run_id]
    step = StepRecord("s", "completed", output=codec.encode(1))
    assert await store.finish_run(claimed[0].lease, "completed", output="1", step=step)
    return run_id


async def test_memory_purge_deletes_only_runs_finished_before_the_cut_off() -> None:
    clock = FakeClock(start=datetime(2030, 1, 1, tzinfo=UTC))
    store = MemoryStorage(clock=clock)
    await store.initialize()
    old = [await _finished(store, "wf", f"k{i}") for i in range(5)]
    cancelled = (await store.create_run(NewRun("wf", "1"))).run.id
    assert await store.update_run_status(cancelled, "cancelled")
    clock.now += timedelta(days=2)
    recent = await _finished(store, "wf", "recent")
    pending = (await store.create_run(NewRun("wf", "2"))).run.id
    running = (await store.create_run(NewRun("other", "3"))).run.id
    [held] = await store.claim_runs(["other"], 1, timedelta(minutes=5))

    assert await store.purge_finished(timedelta(days=1), batch=2) == 6
    assert await store.purge_finished(timedelta(days=1)) == 0
    for run_id in [*old, cancelled]:
        assert await store.get_run(run_id) is None
        assert await store.get_step_results(run_id) == {}
    for run_id in (recent, pending, running):
        assert await store.get_run(run_id) is not None
    assert held.lease == Lease(running, 1)
    # Idempotency keys of purged runs are free; the kept run still holds its own.
    assert (await store.create_run(NewRun("wf", codec.encode("k0"), idempotency_key="k0"))).created
    again = await store.create_run(NewRun("wf", codec.encode("recent"), idempotency_key="recent"))
    assert not again.created
    assert again.run.id == recent


async def test_memory_purge_judges_a_run_by_its_last_finish() -> None:
    clock = FakeClock(start=datetime(2030, 1, 1, tzinfo=UTC))
    store = MemoryStorage(clock=clock)
    await store.initialize()
    run_id = (await store.create_run(NewRun("wf", "1"))).run.id
    assert await store.update_run_status(run_id, "cancelled")
    clock.now += timedelta(days=3)
    assert await store.requeue_run(run_id)  # pending again: never purged
    assert await store.purge_finished(timedelta(days=1)) == 0
    clock.now += timedelta(days=3)
    [claimed] = await store.claim_runs(["wf"], 1, timedelta(minutes=5))
    assert await store.finish_run(claimed.lease, "failed", error="1")  # finished just now
    assert await store.purge_finished(timedelta(days=1)) == 0
    assert await store.purge_finished(timedelta(0)) == 0  # not before now
    clock.now += timedelta(microseconds=1)
    assert await store.purge_finished(timedelta(0)) == 1


@pytest.mark.parametrize(("older_than", "batch"), [(timedelta(seconds=-1), 1), (timedelta(1), 0)])
async def test_memory_purge_refuses_bad_arguments(older_than: timedelta, batch: int) -> None:
    store = MemoryStorage()
    await store.initialize()
    with pytest.raises(ConfigError):
        await store.purge_finished(older_than, batch=batch)
