"""``Engine.wait``, and how waiters act on finish hints.

``wait`` runs on every backend; the hints are those of the in-memory backend
(a named store shared by two engines of this process) and of a hub fed by
hand, as the PostgreSQL and Redis listeners feed theirs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Collection
from datetime import timedelta
from typing import Any

import pytest

from reflow_conformance.testsupport import engine_on
from reflow_core import (
    ConfigError,
    Engine,
    EngineClosedError,
    MemoryStorage,
    RunNotFoundError,
    StepContext,
    WaitedRuns,
    codec,
    workflow,
)
from reflow_core.storage import FinishSource, NewRun, Storage
from reflow_core.wakeups import (
    MAX_FINISH_PAYLOAD,
    WakeupHub,
    finish_payloads,
    parse_finish_hint,
)

# -- wait ---------------------------------------------------------------------------


async def test_wait_for_all_returns_every_run_failed_and_cancelled_ones_included(
    storage: Storage,
) -> None:
    ok = workflow("w-ok").step("a", lambda ctx: ctx.input * 2)
    bad = workflow("w-bad").step("a", lambda ctx: 1 / 0)
    async with engine_on(storage, ok, bad) as engine:
        first = await engine.enqueue(ok, 1)
        second = await engine.enqueue(bad)
        third = await engine.enqueue(ok, 3)
        assert await engine.cancel(third.id)
        waiting = asyncio.ensure_future(engine.wait([third.id, first.id, second.id, first.id]))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert await engine.tick() == 2
        done, pending = await asyncio.wait_for(waiting, 5)
        assert pending == []
        assert [run.id for run in done] == [third.id, first.id, second.id]  # given order, once
        assert [run.status for run in done] == ["cancelled", "completed", "failed"]
        assert done[1].output == 2
        assert done[2].error is not None
        assert done[2].error["step"] == "a"


async def test_first_completed_returns_as_soon_as_one_has_finished(storage: Storage) -> None:
    release = asyncio.Event()

    async def slow(ctx: StepContext[Any, Any]) -> str:
        await release.wait()
        return "slow"

    fast_wf = workflow("w-fast").step("a", lambda ctx: "fast")
    slow_wf = workflow("w-slow").step("a", slow)
    async with engine_on(storage, fast_wf, slow_wf, concurrency=4) as engine:
        await engine.start()
        slow_run = await engine.enqueue(slow_wf)
        fast_run = await engine.enqueue(fast_wf)
        done, pending = await asyncio.wait_for(
            engine.wait([slow_run.id, fast_run.id], return_when="FIRST_COMPLETED"), 5
        )
        assert [run.id for run in done] == [fast_run.id]
        assert done[0].output == "fast"
        assert pending == [slow_run.id]
        release.set()
        result = await asyncio.wait_for(
            engine.wait([slow_run.id], return_when=asyncio.FIRST_COMPLETED), 5
        )
        assert isinstance(result, WaitedRuns)
        assert [run.output for run in result.done] == ["slow"]


async def test_first_exception_returns_at_the_first_failure_or_when_all_have_finished(
    storage: Storage,
) -> None:
    release = asyncio.Event()

    async def slow(ctx: StepContext[Any, Any]) -> str:
        await release.wait()
        return "slow"

    ok = workflow("x-ok").step("a", lambda ctx: "ok")
    bad = workflow("x-bad").step("a", lambda ctx: 1 / 0)
    slow_wf = workflow("x-slow").step("a", slow)
    async with engine_on(storage, ok, bad, slow_wf, concurrency=4) as engine:
        await engine.start()
        slow_run = await engine.enqueue(slow_wf)
        ok_run = await engine.enqueue(ok)
        await engine.result(ok_run.id, timeout=5)
        failing = await engine.enqueue(bad)
        done, pending = await asyncio.wait_for(
            engine.wait([ok_run.id, slow_run.id, failing.id], return_when="FIRST_EXCEPTION"), 5
        )
        assert {run.id: run.status for run in done} == {
            ok_run.id: "completed",
            failing.id: "failed",
        }
        assert pending == [slow_run.id]
        # Without a failure it waits for them all.
        release.set()
        done, pending = await asyncio.wait_for(
            engine.wait([ok_run.id, slow_run.id], return_when="FIRST_EXCEPTION"), 5
        )
        assert [run.status for run in done] == ["completed", "completed"]
        assert pending == []


async def test_wait_with_a_timeout_returns_what_has_finished_without_raising(
    storage: Storage,
) -> None:
    wf = workflow("w-timeout").step("a", lambda ctx: "done")
    async with engine_on(storage, wf) as engine:
        finished = await engine.enqueue(wf)
        await engine.tick()
        never = await engine.enqueue(wf)  # nobody works on it
        began = time.monotonic()
        done, pending = await engine.wait([never.id, finished.id], timeout="200ms")
        assert 0.15 < time.monotonic() - began < 3
        assert [run.id for run in done] == [finished.id]
        assert pending == [never.id]
        # The waits given up leave nothing behind: a later finish is read once.
        await engine.tick()
        done, pending = await engine.wait([never.id], timeout=5)
        assert [run.output for run in done] == ["done"]


async def test_wait_for_a_missing_or_purged_run_raises(storage: Storage) -> None:
    wf = workflow("w-missing").step("a", lambda ctx: "done")
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        never = await engine.enqueue(wf)
        with pytest.raises(RunNotFoundError) as info:
            await engine.wait([never.id, "no-such-run"], timeout=5)
        assert info.value.run_id == "no-such-run"
        await engine.tick()
        assert await storage.purge_finished(older_than=timedelta(0)) >= 1
        with pytest.raises(RunNotFoundError):
            await engine.wait([run.id], return_when="FIRST_COMPLETED", timeout=5)


async def test_bad_arguments_are_refused_before_anything_is_read() -> None:
    wf = workflow("w-args").step("a", lambda ctx: None)
    async with Engine(storage=MemoryStorage(), workflows=[wf], worker=False) as engine:
        with pytest.raises(ConfigError, match="not one string") as info:
            await engine.wait("run-1")
        assert info.value.option == "run_ids"
        with pytest.raises(ConfigError, match="return_when must be one of") as info:
            await engine.wait(["run-1"], return_when="ANY")  # type: ignore[arg-type]
        assert info.value.option == "return_when"
        with pytest.raises(ConfigError, match="run_id must be a non-empty string"):
            await engine.wait([""])
        with pytest.raises(ConfigError, match="timeout"):
            await engine.wait(["run-1"], timeout="soon")
        assert await engine.wait([]) == WaitedRuns([], [])


async def test_closing_the_engine_ends_a_wait() -> None:
    wf = workflow("w-close").step("a", lambda ctx: None)
    engine = Engine(storage=MemoryStorage(), workflows=[wf], worker=False)
    run = await engine.enqueue(wf)
    waiting = asyncio.ensure_future(engine.wait([run.id]))
    await asyncio.sleep(0.05)
    await engine.close()
    with pytest.raises(EngineClosedError):
        await asyncio.wait_for(waiting, 5)


# -- finish hints ---------------------------------------------------------------------


async def test_a_producer_engine_learns_of_a_finish_by_another_engine_from_the_hint() -> None:
    name = f"finish-hints-{uuid.uuid4().hex}"
    ok = workflow("h-ok").step("a", lambda ctx: ctx.input + 1)
    producer = Engine(
        storage=MemoryStorage(name=name), workflows=[ok], worker=False, poll_interval="30s"
    )
    worker = Engine(storage=MemoryStorage(name=name), workflows=[ok], poll_interval="30s")
    async with producer, worker:
        assert isinstance(producer._storage, FinishSource)
        runs = [await producer.enqueue(ok, n) for n in range(20)]
        waiting = asyncio.ensure_future(producer.wait([run.id for run in runs]))
        result = asyncio.ensure_future(producer.result(runs[0].id))
        await asyncio.sleep(0.05)  # both read once and now back off toward 30 s
        await worker.start()  # the worker engine claims and finishes them
        assert await asyncio.wait_for(result, 5) == 1
        done, pending = await asyncio.wait_for(waiting, 5)
        assert [run.output for run in done] == list(range(1, 21))
        assert pending == []
        assert producer._watcher.hinted >= 1


async def test_the_memory_store_hints_every_way_a_run_ends() -> None:
    store = MemoryStorage()
    got: list[Collection[str] | None] = []
    subscription = await store.subscribe_finishes(got.append)
    parent = workflow("h-parent").step("wait", lambda ctx: ctx.input)
    ok = workflow("h-ok2").step("a", lambda ctx: "ok")
    async with engine_on(store, ok, parent) as engine:
        finished = await engine.enqueue(ok)
        cancelled = await engine.enqueue(ok)
        await engine.tick()
        await engine.cancel(cancelled.id)
        await asyncio.sleep(0)
        seen = {run_id for ids in got if ids is not None for run_id in ids}
        assert {finished.id, cancelled.id} <= seen
        assert None not in got
        await subscription.close()
        got.clear()
        late = await engine.enqueue(ok)
        await engine.tick()
        await asyncio.sleep(0)
        assert got == []
        assert (await store.get_run(late.id)) is not None


def test_finish_payloads_fit_a_notification_and_name_what_they_can() -> None:
    ids = [f"{n:026d}" for n in range(1000)]
    payloads = finish_payloads(ids)
    assert len(payloads) > 1
    assert all(len(payload.encode()) <= MAX_FINISH_PAYLOAD for payload in payloads)
    assert [run_id for payload in payloads for run_id in parse_finish_hint(payload) or []] == ids
    assert parse_finish_hint(finish_payloads(["a", "x" * 1001, "b"])[0]) is None
    assert parse_finish_hint(finish_payloads(["a\nb"])[0]) is None
    assert parse_finish_hint("") is None
    assert parse_finish_hint("é:step:1:0") == ["é:step:1:0"]


class FedHub(WakeupHub):
    """A hub whose "connection" is a queue the test feeds, on two channels."""

    def __init__(self) -> None:
        async def no_due(workflows: list[str]) -> float | None:
            return None

        super().__init__(next_due=no_due, describe="'test'")
        self.connections: list[tuple[bool, bool]] = []
        self.messages: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def listen(self) -> None:
        self.connections.append(self.channels_wanted())
        wakes, finishes = self.connections[-1]
        self.connected_now()
        while True:
            channel, payload = await self.messages.get()
            if channel == "wake" and wakes:
                self.hint(payload)
            elif channel == "done" and finishes:
                self.finish_hint(payload)


async def test_a_hub_listens_to_the_finish_channel_only_while_someone_subscribes() -> None:
    hub = FedHub()
    woken: list[int] = []
    told: list[Collection[str] | None] = []
    await hub.subscribe(["orders"], lambda: woken.append(1))
    await asyncio.wait_for(hub.connected.wait(), 5)
    assert hub.connections == [(True, False)]
    hub.messages.put_nowait(("done", "run-1"))
    await asyncio.sleep(0.01)

    woken.clear()
    finishes = await hub.subscribe_finishes(told.append)
    for _ in range(100):
        if told:
            break
        await asyncio.sleep(0.01)
    assert hub.connections == [(True, False), (True, True)]  # connected again, both channels
    assert told == [None]  # what ended before is unknown: look at everything
    # The old connection listened until the new one was subscribed: no
    # wake-up was lost, so none is made up.
    assert woken == []
    hub.messages.put_nowait(("done", "run-2\nrun-3"))
    hub.messages.put_nowait(("wake", "0|orders"))
    for _ in range(100):
        if woken and len(told) == 2:
            break
        await asyncio.sleep(0.01)
    assert told == [None, ["run-2", "run-3"]]
    assert woken == [1]

    await finishes.close()
    assert hub.connected.is_set()  # the wake-ups go on on the same connection
    await hub.close()
    assert not hub.connected.is_set()


async def test_a_hub_with_only_finish_subscribers_does_not_listen_for_wakeups() -> None:
    hub = FedHub()
    told: list[Collection[str] | None] = []
    sub = await hub.subscribe_finishes(told.append)
    await asyncio.wait_for(hub.connected.wait(), 5)
    assert hub.connections == [(False, True)]
    await sub.close()
    assert not hub.connected.is_set()  # the last subscriber gone, the hub stopped


async def test_waiters_cost_reads_of_the_runs_that_finished_not_of_all_of_them() -> None:
    wf = workflow("h-many").step("a", lambda ctx: ctx.input)
    store = MemoryStorage()
    async with engine_on(store, wf, concurrency=10, poll_interval="30s") as engine:
        runs = await engine.enqueue_many(wf, list(range(300)))
        waits = [asyncio.ensure_future(engine.result(run.id)) for run in runs]
        await asyncio.sleep(0.3)  # the first reads; each run's pause has grown past 100 ms
        watcher = engine._watcher
        before_runs, before_reads = watcher.runs_read, watcher.reads
        for _ in range(10):
            assert await engine.tick() == 10  # ten runs finished here, each tick
            await asyncio.sleep(0.02)
        finished = [n for n, task in enumerate(waits) if task.done()]
        assert len(finished) == 100
        assert all(waits[n].result() == n for n in finished)
        # About the hundred runs that finished, plus the backoff reads of the
        # others that came due meanwhile (at most one each over this time).
        assert watcher.runs_read - before_runs < 100 + 300
        assert watcher.reads - before_reads <= 25
        for task in waits:
            task.cancel()


class WithoutHints:
    """A real in-memory store that sends no finish hints, as SQLite sends none."""

    def __init__(self, inner: MemoryStorage) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "subscribe_finishes":
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_without_hints_runs_this_engine_runs_are_not_polled_but_others_are() -> None:
    gate = asyncio.Event()

    async def held(ctx: StepContext[Any, Any]) -> str:
        await gate.wait()
        return "here"

    served = workflow("h-served").step("a", held)
    store: Any = WithoutHints(MemoryStorage())
    async with Engine(
        storage=store, workflows=[served], poll_interval="30s", close_storage=False
    ) as engine:
        assert not isinstance(engine._storage, FinishSource)
        mine = [await engine.enqueue(served) for _ in range(20)]
        # A run of a workflow this engine does not run: another process would.
        other = await store.create_run(NewRun("h-elsewhere", codec.encode(None)))
        waits = [asyncio.ensure_future(engine.result(run.id)) for run in mine]
        theirs = asyncio.ensure_future(engine.result(other.run.id))
        await asyncio.sleep(0.1)  # the first reads of each, and the back-off's first
        watcher = engine._watcher
        before = watcher.runs_read
        await asyncio.sleep(0.6)
        # Only the run nobody here runs was read again (10, 20, 40 ... ms apart).
        assert 3 <= watcher.runs_read - before <= 8
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*waits), 5) == ["here"] * 20
        assert not theirs.done()
        theirs.cancel()
