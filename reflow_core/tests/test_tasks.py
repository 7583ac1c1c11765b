"""Stopping background tasks: the task's own cancellation is expected, a
cancellation of the one stopping it is not swallowed."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from reflow_core._tasks import cancel_and_wait


async def test_the_task_is_cancelled_and_waited_for() -> None:
    ended: list[str] = []

    async def background() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            ended.append("cleaned up")

    task = asyncio.create_task(background())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
    assert ended == ["cleaned up"]


async def test_a_cancellation_of_the_caller_propagates() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        # Takes its time to stop, as a task finishing a write would.
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await release.wait()
            raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.01)
    stopper.cancel()  # a timeout or a Ctrl-C around the stop
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, timeout=2)
    release.set()
    await asyncio.wait_for(asyncio.wait({task}), timeout=2)
    assert task.cancelled()


async def test_an_error_the_task_ended_with_propagates() -> None:
    async def failing() -> None:
        raise RuntimeError("broken")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broken"):
        await cancel_and_wait(task)


async def test_a_timeout_around_an_engine_stop_is_not_swallowed() -> None:
    from reflow_core import Engine, MemoryStorage, workflow

    wf = workflow("tasks-stop").step("noop", lambda ctx: None)
    engine = Engine(storage=MemoryStorage(), workflows=[wf], poll_interval="10ms")
    await engine.start()
    hold = asyncio.Event()
    # The worker's presence task takes its time to stop, as one stuck on a
    # store that does not answer would.
    presence = engine._worker.presence
    task = presence._task
    assert task is not None

    async def slow_leave() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await hold.wait()
            raise

    stuck = asyncio.create_task(slow_leave())
    presence._task = stuck
    task.cancel()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await engine.stop()
    hold.set()
    await engine.close()


async def test_a_loop_whose_storage_swallows_the_cancellation_still_stops() -> None:
    """A driver that swallows the cancellation reaching it mid-call (redis-py
    on Python 3.11 does) and answers anyway: the engine's background loops
    act on the request at their next turn, so stop() returns."""
    from typing import Any

    from reflow_core import Engine, MemoryStorage, workflow

    calls: list[str] = []

    class Swallowing(MemoryStorage):
        async def list_runs(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("list_runs")
            with contextlib.suppress(asyncio.CancelledError):  # swallowed, as the driver does
                await asyncio.sleep(0.2)
            return await super().list_runs(*args, **kwargs)

        async def purge_finished(self, *args: Any, **kwargs: Any) -> int:
            calls.append("purge_finished")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.2)
            return await super().purge_finished(*args, **kwargs)

        async def announce_worker(self, *args: Any, **kwargs: Any) -> Any:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
            return await super().announce_worker(*args, **kwargs)

    wf = workflow("tasks-swallow").step("noop", lambda ctx: None)
    engine = Engine(
        storage=Swallowing(),
        workflows=[wf],
        poll_interval="10ms",
        warn_unserved_after=0.1,
        retention="1s",
    )
    await engine.start()
    for _ in range(200):  # until both loops are inside their storage calls
        if {"list_runs", "purge_finished"} <= set(calls):
            break
        await asyncio.sleep(0.005)
    assert {"list_runs", "purge_finished"} <= set(calls)
    await asyncio.wait_for(engine.stop(), 5)
    await engine.close()
