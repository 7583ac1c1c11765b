"""``Engine.resume``, ``Engine.list_runs`` and ``Engine.result``, on every backend."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest

from reflow_conformance.testsupport import engine_on
from reflow_core import (
    ConfigError,
    Engine,
    EngineClosedError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    StepContext,
    workflow,
)
from reflow_core.storage import Storage


class CountingGetRun:
    """Delegates to a real storage, counting the reads of runs by id
    (``get_run`` and ``get_runs`` calls)."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self.get_run_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_run(self, run_id: str) -> Any:
        self.get_run_calls += 1
        return await self._inner.get_run(run_id)

    async def get_runs(self, run_ids: Any) -> Any:
        self.get_run_calls += 1
        return await self._inner.get_runs(run_ids)


# -- resume ---------------------------------------------------------------------


async def test_resume_a_failed_run_keeps_its_completed_steps(storage: Storage) -> None:
    calls: dict[str, int] = {"reserve": 0, "charge": 0, "ship": 0}

    async def reserve(ctx: StepContext[Any, Any]) -> str:
        calls["reserve"] += 1
        return "reserved"

    async def charge(ctx: StepContext[Any, Any]) -> str:
        calls["charge"] += 1
        if calls["charge"] == 1:
            raise ConnectionError("gateway down")
        return f"charged after {ctx.prev}"

    async def ship(ctx: StepContext[Any, Any]) -> str:
        calls["ship"] += 1
        return f"shipped, {ctx.prev}"

    wf = workflow("resumable").step("reserve", reserve).step("charge", charge).step("ship", ship)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        failed = await engine.get_run_status(run.id)
        assert failed.status == "failed"
        assert failed.steps["charge"].status == "failed"

        assert await engine.resume(run.id) is True
        queued = await engine.get_run_status(run.id)
        assert queued.status == "pending"
        assert queued.error is None
        assert set(queued.steps) == {"reserve"}  # the failed record is dropped
        assert await engine.resume(run.id) is False  # not failed any more

        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
        assert await engine.resume(run.id) is False  # completed runs stay completed
        assert await engine.resume("no-such-run") is False

    assert calls == {"reserve": 1, "charge": 2, "ship": 1}
    assert done.status == "completed"
    assert done.output == "shipped, charged after reserved"
    assert done.steps["reserve"].output == "reserved"


async def test_resume_a_cancelled_run_continues_where_it_stopped(storage: Storage) -> None:
    calls: dict[str, int] = {"first": 0, "second": 0}
    blocked = asyncio.Event()

    async def first(ctx: StepContext[Any, Any]) -> str:
        calls["first"] += 1
        return "one"

    async def second(ctx: StepContext[Any, Any]) -> str:
        calls["second"] += 1
        if calls["second"] == 1:
            blocked.set()
            await asyncio.sleep(5)  # interrupted by the cancel
        return f"{ctx.prev} two"

    wf = workflow("cancel-resume").step("first", first).step("second", second)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        tick = asyncio.create_task(engine.tick())
        await asyncio.wait_for(blocked.wait(), 5)
        assert await engine.cancel(run.id)
        assert await tick == 1
        assert (await engine.get_run_status(run.id)).status == "cancelled"
        assert await engine.resume(run.id)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert calls == {"first": 1, "second": 2}
    assert done.status == "completed"
    assert done.output == "one two"


async def test_a_resumed_run_is_picked_up_by_a_started_engine(storage: Storage) -> None:
    attempts: list[int] = []

    async def flaky(ctx: StepContext[Any, Any]) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first run fails")
        return "second run works"

    wf = workflow("live-resume").step("flaky", flaky)
    engine = Engine(storage=storage, workflows=[wf], close_storage=False, poll_interval="1h")
    async with engine:
        run = await engine.enqueue(wf)
        with pytest.raises(RunFailedError):
            await engine.result(run.id, timeout=5)
        assert await engine.resume(run.id)
        # The poll is an hour away: resume itself must wake the worker.
        assert await engine.result(run.id, timeout=5) == "second run works"


# -- list_runs ------------------------------------------------------------------


@pytest.mark.parametrize("same_instant", [True, False], ids=["one-instant", "ticking"])
async def test_list_runs_pages_exactly_newest_first(
    db: Any, clock: Any, same_instant: bool
) -> None:
    wf = workflow("listed").step("a", lambda ctx: 1)
    other = workflow("other").step("a", lambda ctx: 1)
    async with engine_on(db.connect(clock=clock), wf, other) as engine:
        created = []
        for i in range(25):
            run = await engine.enqueue(wf, {"i": i})
            created.append(run.id)
            if not same_instant:
                clock.advance(1)
        for _ in range(3):
            await engine.enqueue(other)

        seen: list[str] = []
        sizes: list[int] = []
        cursor: str | None = None
        while True:
            page = await engine.list_runs(workflow=wf, limit=4, cursor=cursor)
            sizes.append(len(page.runs))
            seen.extend(r.id for r in page.runs)
            assert all(r.workflow == "listed" for r in page.runs)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor

    assert sorted(seen) == sorted(created)  # every run ...
    assert len(seen) == len(set(seen)) == 25  # ... exactly once
    assert sizes[:6] == [4] * 6
    assert sum(sizes) == 25
    if not same_instant:
        assert seen == list(reversed(created))  # newest first


async def test_list_runs_filters_by_status_and_workflow(storage: Storage) -> None:
    ok = workflow("ok-wf").step("a", lambda ctx: "fine")
    bad = workflow("bad-wf").step("a", lambda ctx: 1 / 0)
    async with engine_on(storage, ok, bad) as engine:
        done = [await engine.enqueue(ok) for _ in range(2)]
        failed = [await engine.enqueue(bad) for _ in range(3)]
        assert await engine.tick() == 5
        waiting = await engine.enqueue(ok)
        cancelled = await engine.enqueue(bad)
        assert await engine.cancel(cancelled.id)

        def ids(page: Any) -> set[str]:
            return {r.id for r in page.runs}

        assert ids(await engine.list_runs(status="failed")) == {r.id for r in failed}
        assert ids(await engine.list_runs(status="completed", workflow="ok-wf")) == {
            r.id for r in done
        }
        assert ids(await engine.list_runs(status=["pending", "cancelled"])) == {
            waiting.id,
            cancelled.id,
        }
        assert ids(await engine.list_runs(workflow=bad)) == {r.id for r in failed} | {cancelled.id}
        assert ids(await engine.list_runs(status="completed", workflow="bad-wf")) == set()
        everything = await engine.list_runs()
        assert len(everything.runs) == 7
        assert everything.next_cursor is None
        failed_run = (await engine.list_runs(status="failed", limit=1)).runs[0]
        assert failed_run.error is not None
        assert failed_run.error["code"] == "step_failed"
        with pytest.raises(ConfigError):
            await engine.list_runs(cursor="not a cursor")


# -- result ---------------------------------------------------------------------


async def test_result_returns_the_output_or_raises(storage: Storage) -> None:
    ok = workflow("res-ok").step("a", lambda ctx: {"total": 3})
    bad = workflow("res-bad").step("pay", lambda ctx: 1 / 0)
    async with engine_on(storage, ok, bad) as engine:
        good = await engine.enqueue(ok)
        failing = await engine.enqueue(bad)
        cancelled = await engine.enqueue(ok)
        assert await engine.cancel(cancelled.id)
        assert await engine.tick() == 2

        assert await engine.result(good.id) == {"total": 3}
        with pytest.raises(RunFailedError) as info:
            await engine.result(failing.id, timeout=1)
        assert info.value.run_id == failing.id
        assert info.value.step == "pay"
        assert info.value.error_code == "step_failed"
        assert info.value.info["type"] == "builtins.ZeroDivisionError"
        with pytest.raises(RunCancelledError):
            await engine.result(cancelled.id, timeout=1)
        with pytest.raises(RunNotFoundError):
            await engine.result("no-such-run", timeout=1)

        never = await engine.enqueue(ok)  # nobody works on it
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await engine.result(never.id, timeout=0.2)
        assert 0.15 < time.monotonic() - began < 2


async def test_result_is_woken_at_once_without_busy_polling(storage: Storage) -> None:
    counting = CountingGetRun(storage)
    release = asyncio.Event()
    finished_at: list[float] = []

    async def slow(ctx: StepContext[Any, Any]) -> str:
        await release.wait()
        return "done"

    def mark(ctx: StepContext[Any, Any]) -> str:
        finished_at.append(time.monotonic())
        return ctx.prev

    wf = workflow("awaited").step("slow", slow).step("mark", mark)
    engine = Engine(
        storage=counting,  # type: ignore[arg-type]
        workflows=[wf],
        close_storage=False,
        poll_interval="10s",
    )
    async with engine:
        run = await engine.enqueue(wf)
        waiter = asyncio.create_task(engine.result(run.id, timeout=10))
        await asyncio.sleep(1.0)
        assert not waiter.done()
        calls_while_waiting = counting.get_run_calls
        release.set()
        output = await waiter
        returned_at = time.monotonic()
        # Nothing is kept per awaited run once its waiters have left.
        assert engine._watcher._waiting == {}
    assert output == "done"
    assert returned_at - finished_at[0] < 0.25  # woken by the finish, not a poll
    # Backing off from 10 ms towards the 10 s poll interval: a handful of
    # reads in a second, not one every few milliseconds.
    assert calls_while_waiting <= 9, calls_while_waiting
    assert counting.get_run_calls <= calls_while_waiting + 2


async def test_result_is_woken_at_once_when_this_engine_cancels_the_run(
    storage: Storage,
) -> None:
    wf = workflow("cancel-awaited").step("a", lambda ctx: 1)
    async with engine_on(storage, wf, poll_interval="10s") as engine:
        run = await engine.enqueue(wf)  # never claimed: the engine is not started
        waiter = asyncio.create_task(engine.result(run.id, timeout=10))
        await asyncio.sleep(0.7)  # the waiter has backed off to a long pause by now
        assert await engine.cancel(run.id)
        cancelled_at = time.monotonic()
        with pytest.raises(RunCancelledError):
            await waiter
        assert time.monotonic() - cancelled_at < 0.25


async def test_several_waiters_on_one_run_are_all_woken(storage: Storage) -> None:
    release = asyncio.Event()

    async def slow(ctx: StepContext[Any, Any]) -> str:
        await release.wait()
        return "done"

    wf = workflow("many-waiters").step("slow", slow)
    engine = Engine(storage=storage, workflows=[wf], close_storage=False, poll_interval="10s")
    async with engine:
        run = await engine.enqueue(wf)
        waiters = [asyncio.create_task(engine.result(run.id, timeout=10)) for _ in range(3)]
        impatient = asyncio.create_task(engine.result(run.id, timeout=0.3))
        with pytest.raises(TimeoutError):
            await impatient  # gives up first; the others must still be woken
        await asyncio.sleep(0.5)
        release.set()
        began = time.monotonic()
        assert await asyncio.gather(*waiters) == ["done"] * 3
        assert time.monotonic() - began < 0.25


# -- many waiters ----------------------------------------------------------------


async def test_many_waiters_share_one_read_per_tick(storage: Storage) -> None:
    counting = CountingGetRun(storage)
    release = asyncio.Event()

    async def gated(ctx: StepContext[Any, Any]) -> int:
        await release.wait()
        return int(ctx.input["n"]) * 2

    wf = workflow("many-awaited").step("double", gated)
    engine = Engine(
        storage=counting,  # type: ignore[arg-type]
        workflows=[wf],
        close_storage=False,
        concurrency=50,
        poll_interval="1s",
    )
    async with engine:
        runs = await engine.enqueue_many(wf, [{"n": n} for n in range(500)])
        waiters = [asyncio.create_task(engine.result(run.id, timeout=30)) for run in runs]
        await asyncio.sleep(0.5)
        before = counting.get_run_calls
        release.set()
        outputs = await asyncio.gather(*waiters)
        reads = counting.get_run_calls - before
        assert engine._watcher._waiting == {}
    assert outputs == [2 * n for n in range(500)]
    # 500 waiters, and the reads are the reader's ticks, not one per waiter.
    assert before <= 12, before
    assert reads < 200, reads


async def test_waiters_on_a_missing_or_purged_run_are_told(storage: Storage) -> None:
    wf = workflow("gone-awaited").step("a", lambda ctx: 1)
    async with engine_on(storage, wf, poll_interval="50ms") as engine:
        with pytest.raises(RunNotFoundError):
            await engine.result("no-such-run", timeout=5)
        run = await engine.enqueue(wf)
        waiter = asyncio.create_task(engine.result(run.id, timeout=5))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        # Gone while awaited (as a purge or an operator deleting it would).
        await engine.cancel(run.id)
        with pytest.raises(RunCancelledError):
            await waiter
        deleted = await engine.storage.purge_finished(timedelta(0))
        assert deleted >= 1
        with pytest.raises(RunNotFoundError):
            await engine.result(run.id, timeout=5)


class WithoutGetRuns:
    """A real storage whose adapter has not built ``get_runs`` yet."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_runs(self, run_ids: Any) -> Any:
        raise NotImplementedError


async def test_without_get_runs_waiters_read_one_run_at_a_time(storage: Storage) -> None:
    wf = workflow("one-by-one").step("a", lambda ctx: ctx.input["n"])
    engine = Engine(
        storage=WithoutGetRuns(storage),  # type: ignore[arg-type]
        workflows=[wf],
        close_storage=False,
        poll_interval="50ms",
    )
    async with engine:
        runs = await engine.enqueue_many(wf, [{"n": n} for n in range(5)])
        outputs = await asyncio.gather(*(engine.result(r.id, timeout=10) for r in runs))
    assert outputs == [0, 1, 2, 3, 4]


async def test_a_waiter_on_a_closed_engine_is_told_it_closed(storage: Storage) -> None:
    wf = workflow("closing-awaited").step("a", lambda ctx: 1)
    engine = Engine(storage=storage, workflows=[wf], worker=False, poll_interval="50ms")
    run = await engine.enqueue(wf)
    waiter = asyncio.create_task(engine.result(run.id, timeout=10))
    await asyncio.sleep(0.1)
    await engine.close()
    with pytest.raises(EngineClosedError):
        await waiter
