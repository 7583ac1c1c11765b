"""Stopping background tasks: the task's own cancellation is expected, a
cancellation of the one stopping it is not swallowed."""

from __future__ import annotations

import asyncio

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
