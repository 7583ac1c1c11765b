"""A run no engine will execute is reported, not waited on in silence; an
engine's lifecycle errors are the same on every backend."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from typing import Any

import pytest

from reflow_conformance.testsupport import FakeClock
from reflow_core import (
    Engine,
    EngineClosedError,
    MemoryStorage,
    ReflowError,
    ResultTimeoutError,
    RunNotFoundError,
    StepContext,
    workflow,
)
from reflow_core.storage import RunPage, RunStatus, Storage

from .conftest import Database


async def hello(ctx: StepContext[Any, Any]) -> str:
    return "hi"


served = workflow("served").step("hello", hello)
orphan = workflow("orphan").step("hello", hello)
approval = workflow("approval").wait_for_event("approve").step("after", hello)


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def unserved_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "reflow.engine"
        and r.levelno == logging.WARNING
        and "no worker has claimed them" in r.getMessage()
    ]


# -- Engine.result(timeout=...) ---------------------------------------------------


async def test_result_timeout_names_an_unserved_workflow(storage: Storage) -> None:
    async with Engine(storage=storage, workflows=[served], poll_interval="0.05s") as engine:
        run = await engine.enqueue(orphan, None)
        with pytest.raises(ResultTimeoutError) as caught:
            await engine.result(run.id, timeout="0.3s")
    err = caught.value
    assert str(err) == (
        f"run {run.id} of workflow 'orphan' is still pending after 0.3s: no worker has "
        "claimed it; is workflow 'orphan' registered on a running worker? "
        "(this engine serves: 'served')"
    )
    assert isinstance(err, TimeoutError)
    assert isinstance(err, ReflowError)
    assert err.code == "result_timeout"
    assert (err.run_id, err.workflow, err.status, err.timeout) == (
        run.id,
        "orphan",
        "pending",
        0.3,
    )
    # No chained CancelledError/TimeoutError noise in the traceback.
    assert err.__cause__ is None
    assert err.__suppress_context__


async def test_existing_except_timeout_error_code_still_catches_it(storage: Storage) -> None:
    async with Engine(storage=storage, workflows=[served], poll_interval="0.05s") as engine:
        run = await engine.enqueue(orphan, None)
        try:
            await engine.result(run.id, timeout="0.1s")
        except TimeoutError as exc:
            caught: BaseException = exc
        assert type(caught) is ResultTimeoutError


async def test_result_timeout_on_a_never_started_engine(storage: Storage) -> None:
    engine = Engine(storage=storage, workflows=[served], close_storage=False)
    try:
        run = await engine.enqueue(served, None)
        with pytest.raises(ResultTimeoutError) as caught:
            await engine.result(run.id, timeout="0.2s")
        assert str(caught.value) == (
            f"run {run.id} of workflow 'served' is still pending after 0.2s: no worker has "
            "claimed it; this engine was never started: `async with engine` or "
            "`await engine.start()`"
        )
        # Started, the same engine runs it.
        await engine.start()
        assert await engine.result(run.id, timeout="5s") == "hi"
    finally:
        await engine.close()


async def test_result_timeout_on_a_never_started_engine_that_does_not_serve_it(
    storage: Storage,
) -> None:
    engine = Engine(storage=storage, workflows=[served])
    try:
        run = await engine.enqueue(orphan, None)
        with pytest.raises(ResultTimeoutError) as caught:
            await engine.result(run.id, timeout="0.1s")
        assert str(caught.value) == (
            f"run {run.id} of workflow 'orphan' is still pending after 0.1s: no worker has "
            "claimed it; this engine was never started: `async with engine` or "
            "`await engine.start()`; and it does not serve workflow 'orphan' "
            "(it serves: 'served')"
        )
    finally:
        await engine.close()


async def test_result_timeout_on_a_client_engine(storage: Storage) -> None:
    async with Engine(storage=storage, workflows=[served], worker=False) as engine:
        run = await engine.enqueue(served, None)
        with pytest.raises(ResultTimeoutError) as caught:
            await engine.result(run.id, timeout="0.1s")
    assert str(caught.value) == (
        f"run {run.id} of workflow 'served' is still pending after 0.1s: no worker has "
        "claimed it; is workflow 'served' registered on a running worker? "
        "(this engine runs no worker: worker=False)"
    )


async def test_result_timeout_on_a_running_run_lets_it_go_on(storage: Storage) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(ctx: StepContext[Any, Any]) -> str:
        started.set()
        await release.wait()
        return "done"

    slow_wf = workflow("slow").step("slow", slow)
    async with Engine(storage=storage, workflows=[slow_wf], poll_interval="0.05s") as engine:
        run = await engine.enqueue(slow_wf, None)
        await asyncio.wait_for(started.wait(), 5)
        with pytest.raises(ResultTimeoutError) as caught:
            await engine.result(run.id, timeout="0.2s")
        assert str(caught.value) == (
            f"run {run.id} of workflow 'slow' is still running after 0.2s: "
            "the run goes on; call result() again to wait longer"
        )
        assert caught.value.status == "running"
        release.set()
        assert await engine.result(run.id, timeout="5s") == "done"


async def test_result_timeout_on_a_waiting_run_names_its_event(storage: Storage) -> None:
    async with Engine(storage=storage, workflows=[approval], poll_interval="0.05s") as engine:
        run = await engine.enqueue(approval, None)
        await wait_for_status(engine, run.id, "waiting")
        with pytest.raises(ResultTimeoutError) as caught:
            await engine.result(run.id, timeout="0.1s")
        assert str(caught.value) == (
            f"run {run.id} of workflow 'approval' is still waiting after 0.1s: it waits for "
            "event 'approve', sent with send_event(); the run goes on; call result() again "
            "to wait longer"
        )


async def test_result_of_a_missing_run_is_not_a_timeout(storage: Storage) -> None:
    async with Engine(storage=storage, workflows=[served]) as engine:
        with pytest.raises(RunNotFoundError):
            await engine.result("no-such-run", timeout="0.1s")


async def wait_for_status(engine: Engine, run_id: str, status: RunStatus) -> None:
    deadline = time.monotonic() + 5
    while True:
        run = await engine.get_run(run_id)
        if run is not None and run.status == status:
            return
        assert time.monotonic() < deadline, f"run never became {status}"
        await asyncio.sleep(0.02)


# -- the worker's warning about runs nobody serves -----------------------------------


async def test_worker_warns_once_about_runs_of_a_workflow_it_does_not_serve(
    db: Database, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="reflow")
    storage = db.connect(clock=clock)
    async with Engine(
        storage=storage,
        workflows=[served],
        poll_interval="0.02s",
        warn_unserved_after="1s",
    ) as engine:
        first = await engine.enqueue(orphan, None)
        second = await engine.enqueue(orphan, 2)
        done = await engine.enqueue(served, None)
        assert await engine.result(done.id, timeout="5s") == "hi"
        # Younger than the threshold (by the storage's clock): no warning yet.
        await asyncio.sleep(0.5)
        assert unserved_warnings(caplog) == []
        clock.advance(2)
        await wait_for(lambda: unserved_warnings(caplog))
        # Several more looks: still only one warning.
        await asyncio.sleep(0.5)
        warnings = unserved_warnings(caplog)
    assert len(warnings) == 1, warnings
    match = re.fullmatch(
        r"runs of workflow 'orphan' are waiting and no worker has claimed them: run (\S+) has "
        r"been pending for 2s \(2 such run\(s\) among the newest pending\); this worker does "
        r"not serve 'orphan' \(it serves: 'served'\): is it registered on a running worker, "
        r"under this name\?",
        warnings[0],
    )
    assert match is not None, warnings[0]
    assert match.group(1) in {first.id, second.id}


async def test_a_run_too_old_for_the_newest_pending_page_is_still_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker reads only the newest pending runs; a run of an unserved
    workflow seen once young is looked at again, so a steady stream of new
    runs does not hide that none of them is ever claimed."""
    caplog.set_level(logging.WARNING, logger="reflow")
    clock = FakeClock()
    storage = MemoryStorage(clock=clock)
    engine = Engine(storage=storage, workflows=[served], worker=False)
    try:
        worker = engine._worker
        oldest = await engine.enqueue(orphan, 0)
        await worker.check_unserved(10.0)  # seen young: remembered
        clock.advance(11)
        for n in range(1, 150):  # a page's worth of younger runs
            await engine.enqueue(orphan, n)
        await worker.check_unserved(10.0)
        warnings = unserved_warnings(caplog)
        assert len(warnings) == 1
        assert f"run {oldest.id} has been pending for 11s" in warnings[0]
    finally:
        await engine.close()


class CountingListRuns:
    """Delegates to a real storage, counting ``list_runs`` calls."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self.list_runs_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def list_runs(self, **kwargs: Any) -> RunPage:
        self.list_runs_calls += 1
        return await self._inner.list_runs(**kwargs)


async def test_the_unserved_check_is_never_part_of_a_claim() -> None:
    counting = CountingListRuns(MemoryStorage())
    storage: Any = counting
    async with Engine(storage=storage, workflows=[served], poll_interval="5s") as engine:
        runs = [await engine.enqueue(served, None) for _ in range(30)]
        for run in runs:
            assert await engine.result(run.id, timeout="5s") == "hi"
    assert counting.list_runs_calls == 0


async def test_the_unserved_check_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    counting = CountingListRuns(MemoryStorage())
    storage: Any = counting
    async with Engine(
        storage=storage, workflows=[served], poll_interval="0.01s", warn_unserved_after=None
    ) as engine:
        await engine.enqueue(orphan, None)
        await asyncio.sleep(0.2)
    assert counting.list_runs_calls == 0


# -- lifecycle -----------------------------------------------------------------------


CLOSED = (
    "engine.enqueue() was called after the engine was closed (its `async with` block "
    "ended, or close() was called, and its storage was closed with it): make the call "
    "inside `async with engine:`, or create a new Engine"
)


async def test_enqueue_after_the_engine_closed_raises_the_same_error_everywhere(
    storage: Storage,
) -> None:
    async with Engine(storage=storage, workflows=[served]) as engine:
        pass
    with pytest.raises(EngineClosedError) as caught:
        await engine.enqueue(served, None)
    assert str(caught.value) == CLOSED
    assert caught.value.code == "engine_closed"
    assert caught.value.operation == "enqueue"
    assert isinstance(caught.value, RuntimeError)
    for call in (
        engine.get_run("x"),
        engine.list_runs(),
        engine.result("x", timeout="1s"),
        engine.cancel("x"),
        engine.tick(),
        engine.start(),
    ):
        with pytest.raises(EngineClosedError):
            await call
    with pytest.raises(EngineClosedError, match=r"^`async with engine` was entered again"):
        async with engine:
            pass


async def test_close_is_idempotent_and_closes_the_engine(storage: Storage) -> None:
    engine = Engine(storage=storage, workflows=[served])
    run = await engine.enqueue(served, None)
    await engine.start()
    assert await engine.result(run.id, timeout="5s") == "hi"
    await engine.close()
    await engine.close()
    assert not engine.running
    with pytest.raises(EngineClosedError):
        await engine.get_run(run.id)


async def test_an_engine_that_keeps_its_storage_open_stays_usable(storage: Storage) -> None:
    async with Engine(storage=storage, workflows=[served], close_storage=False) as engine:
        pass
    run = await engine.enqueue(served, None)
    assert run.status == "pending"
    async with engine:
        assert await engine.result(run.id, timeout="5s") == "hi"
    await storage.close()


def test_with_instead_of_async_with_says_how() -> None:
    engine = Engine(storage=MemoryStorage(), workflows=[served])
    with pytest.raises(TypeError) as caught, engine:
        pass
    assert str(caught.value) == (
        "Engine is an async context manager: use `async with Engine(...) as engine:` "
        "inside a coroutine, not `with`"
    )


async def test_an_engine_never_closed_says_how_to_close_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="reflow")
    engine = Engine(storage="memory://", workflows=[served])
    await engine.enqueue(served, None)
    del engine
    gc.collect()
    messages = [r.getMessage() for r in caplog.records if r.name == "reflow.engine"]
    assert messages == [
        "an Engine on MemoryStorage opened its storage for enqueue() and was never closed; "
        "its connections stay open until the process exits: use "
        "`async with Engine(...) as engine:`, or `await engine.close()` when done"
    ]


async def test_a_closed_or_unused_engine_logs_nothing_when_collected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="reflow")
    async with Engine(storage="memory://", workflows=[served]) as entered:
        await entered.enqueue(served, None)
    closed = Engine(storage="memory://", workflows=[served])
    await closed.list_runs()
    await closed.close()
    unused = Engine(storage="memory://", workflows=[served])
    del entered, closed, unused
    gc.collect()
    assert [r for r in caplog.records if r.name == "reflow.engine"] == []
