"""The test helpers: a virtual clock, the test engine, its pytest fixtures.

``async def`` tests here run on the suite's own ``asyncio.run`` hook; the
fixture tests also check that a suite without any async plugin can use
``reflow_test_engine``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

import pydantic
import pytest
from mypy import api

from reflow_core import (
    Branch,
    ConfigError,
    FailureContext,
    Retry,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    StepContext,
    ValidationError,
    workflow,
)
from reflow_core.testing import (
    DEFAULT_START,
    RunBlockedError,
    RunResult,
    SyncTestEngine,
    TestEngine,
    VirtualClock,
)

pytest_plugins = ["pytester"]

HAS_SQLITE = importlib.util.find_spec("reflow_sqlite") is not None


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


class Charge(TypedDict):
    charge_id: str
    amount: int


class Shipment(TypedDict):
    tracking: str
    charge_id: str


async def charge(ctx: StepContext[Order, Order]) -> Charge:
    return {"charge_id": f"ch_{ctx.input.order_id}", "amount": ctx.prev.amount}


def ship(ctx: StepContext[Order, Charge]) -> Shipment:  # plain def: runs in a thread
    return {"tracking": f"TRK-{ctx.input.order_id}", "charge_id": ctx.prev["charge_id"]}


order = workflow("order", input=Order).step("charge", charge).step("ship", ship)


def echo(ctx: StepContext[Any, Any]) -> Any:
    return ctx.prev


# -- the virtual clock ------------------------------------------------------------


async def test_clock_sleep_ends_when_virtual_time_reaches_it() -> None:
    clock = VirtualClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 60)), asyncio.create_task(sleeper("soon", 5))]
    await asyncio.sleep(0)
    assert clock.sleepers == 2
    assert clock.next_deadline == DEFAULT_START + timedelta(seconds=5)
    clock.advance("4s")
    await asyncio.sleep(0)
    assert woke == []
    clock.advance(1)
    await asyncio.sleep(0)
    assert woke == ["soon"]
    assert clock.advance_to(DEFAULT_START + timedelta(hours=1)) == clock.now()
    await asyncio.gather(*tasks)
    assert woke == ["soon", "late"]
    assert clock.sleepers == 0
    assert clock.next_deadline is None


async def test_clock_sleep_of_zero_returns_and_cancelled_sleepers_are_dropped() -> None:
    clock = VirtualClock()
    await clock.sleep(0)
    task = asyncio.create_task(clock.sleep(10))
    await asyncio.sleep(0)
    assert clock.sleepers == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert clock.sleepers == 0
    assert clock.next_deadline is None


def test_clock_is_a_storage_clock_and_never_goes_back() -> None:
    start = datetime(2030, 5, 1, 14, 0, tzinfo=UTC)
    clock = VirtualClock(start)
    assert clock() == clock.now() == start
    assert clock.advance(timedelta(minutes=5)) == start + timedelta(minutes=5)
    with pytest.raises(ConfigError, match="never goes back"):
        clock.advance_to(start)
    with pytest.raises(ConfigError, match="timezone-aware"):
        VirtualClock(datetime(2030, 1, 1))
    with pytest.raises(ConfigError):
        clock.advance("-1s")


# -- running to the end -------------------------------------------------------------


async def test_run_to_completion_with_typed_outputs() -> None:
    async with TestEngine([order]) as t:
        result = await t.run(order, {"order_id": "A1", "amount": 100})
        assert result.status == "completed"
        assert result.finished
        assert result.blocked_reason is None
        shipment: Shipment = result.output
        assert shipment == {"tracking": "TRK-A1", "charge_id": "ch_A1"}
        assert result.step("charge").output == {"charge_id": "ch_A1", "amount": 100}
        assert list(result.steps) == ["charge", "ship"]
        assert result.raise_for_status() is result
        assert await t.result(result.id) == shipment
        with pytest.raises(KeyError, match=r"no saved step 'refund'.*'charge', 'ship'"):
            result.step("refund")


async def test_run_registers_the_workflow_and_keeps_idempotency() -> None:
    async with TestEngine() as t:
        first = await t.run(order, {"order_id": "A1", "amount": 1}, idempotency_key="k")
        again = await t.run("order", {"order_id": "A1", "amount": 1}, idempotency_key="k")
        assert again.id == first.id
        assert again.output == first.output
        with pytest.raises(ValidationError):
            await t.run(order, {"order_id": "A1"})


async def test_long_exponential_backoff_passes_instantly() -> None:
    calls: list[int] = []

    async def flaky(ctx: StepContext[Any, Any]) -> int:
        calls.append(ctx.attempt)
        if ctx.attempt < 10:
            raise RuntimeError("payment provider is down")
        return ctx.attempt

    wf = workflow("flaky").step(
        "charge",
        flaky,
        retry=Retry(max_attempts=10, backoff="exponential", initial_delay="1h", max_delay=None),
    )
    started = time.monotonic()
    async with TestEngine() as t:
        result = await t.run(wf)
        assert time.monotonic() - started < 1.0
        assert result.output == 10
        assert result.step("charge").attempts == 10
        assert calls == list(range(1, 11))
        # 1h + 2h + ... + 256h of back-off passed on the virtual clock.
        assert t.now - DEFAULT_START == timedelta(hours=2**9 - 1)


async def test_backoff_of_a_sync_step_and_of_parallel_branches_passes() -> None:
    def sometimes(ctx: StepContext[Any, Any]) -> str:
        if ctx.attempt < 3:
            raise RuntimeError("not yet")
        return f"{ctx.step}@{ctx.attempt}"

    retry = Retry(max_attempts=3, backoff="fixed", initial_delay="10m", max_delay=None)
    wf = (
        workflow("fan-out")
        .step("first", sometimes, retry=retry)
        .parallel({"a": Branch(sometimes, retry=retry), "b": Branch(sometimes, retry=retry)})
    )
    async with TestEngine() as t:
        result = await t.run(wf)
        assert result.output == {"a": "a@3", "b": "b@3"}
        assert result.step("first").output == "first@3"
        assert t.now - DEFAULT_START == timedelta(minutes=40)


async def test_failed_run_reports_its_error_and_calls_on_failure() -> None:
    failures: list[FailureContext[Any]] = []

    def boom(ctx: StepContext[Any, Any]) -> None:
        raise ValueError("card declined")

    wf = (
        workflow("fails")
        .step("charge", boom, retry=Retry(max_attempts=3, initial_delay="1m"))
        .on_failure(failures.append)
    )
    async with TestEngine() as t:
        result = await t.run(wf, {"order_id": "A1"})
        assert result.status == "failed"
        assert result.finished
        assert result.error is not None
        assert result.error["code"] == "step_failed"
        assert result.error["step"] == "charge"
        assert "card declined" in result.error["message"]
        assert result.step("charge").attempts == 3
        with pytest.raises(RunFailedError, match="card declined") as info:
            result.raise_for_status()
        assert info.value.step == "charge"
        with pytest.raises(RunFailedError):
            _ = result.output
        with pytest.raises(RunFailedError):
            await t.result(result.id)
    assert [(f.step, f.input, f.error["code"]) for f in failures] == [
        ("charge", {"order_id": "A1"}, "step_failed")
    ]
    assert isinstance(failures[0].exception, Exception)


async def test_cancelled_run_raises_run_cancelled() -> None:
    wf = workflow("cancel-me").sleep("nap", "1h").step("after", echo)
    async with TestEngine() as t:
        result = await t.run(wf)
        assert await t.engine.cancel(result.id)
        result = await t.get(result.id)
        assert result.status == "cancelled"
        assert result.blocked_reason is None
        with pytest.raises(RunCancelledError):
            result.raise_for_status()


# -- rates and debounce -----------------------------------------------------------


async def test_a_rate_and_a_debounce_pass_as_the_clock_moves() -> None:
    wf = workflow("nightly-export", rate="1/1h").step("export", echo)
    async with TestEngine() as t:
        first = await t.run(wf, {"n": 1})
        assert first.status == "completed"
        second = await t.run(wf, {"n": 2})
        assert second.status == "pending"
        assert second.blocked_reason == (
            "pending, blocked by rate 'reflow:workflow:nightly-export' (1/1h): waits for "
            "its window to have room"
        )
        assert await t.advance("59m") == []
        finished = await t.advance("1m")
        assert [(r.id, r.status) for r in finished] == [(second.id, "completed")]

        burst = [await t.enqueue(wf, {"n": n}, debounce_key="k", debounce="10m") for n in range(3)]
        assert len({run.id for run in burst}) == 1
        waiting = await t.get(burst[0].id)
        assert waiting.blocked_reason == (
            "delayed, debounced by key 'k': starts at 2026-01-01T01:10:00+00:00, unless "
            "enqueued again with that key first; advance the clock to start it"
        )
        await t.advance("1h")
        assert (await t.get(burst[0].id)).output == {"n": 2}


# -- sleeps ---------------------------------------------------------------------


async def test_sleep_passes_only_when_the_clock_is_advanced() -> None:
    wf = workflow("cool-off").step("charge", echo).sleep("cool-off", "24h").step("ship", echo)
    async with TestEngine() as t:
        result = await t.run(wf, {"n": 1})
        assert result.status == "sleeping"
        assert result.blocked_reason == (
            "sleeping in step 'cool-off' until 2026-01-02T00:00:00+00:00, 1d from now; "
            "advance the clock to wake it"
        )
        with pytest.raises(RunBlockedError, match="sleeping in step 'cool-off'") as info:
            result.raise_for_status()
        assert info.value.status == "sleeping"
        assert await t.advance("23h59m") == []
        assert (await t.get(result.id)).status == "sleeping"
        finished = await t.advance("1m")
        assert [r.id for r in finished] == [result.id]
        assert finished[0].output == {"n": 1}
        assert finished[0].step("cool-off").completed_at == DEFAULT_START + timedelta(hours=24)
        assert t.now == DEFAULT_START + timedelta(hours=24)


async def test_advance_steps_through_every_wakeup_in_order() -> None:
    seen: list[tuple[str, datetime]] = []
    clock = VirtualClock()

    def note(ctx: StepContext[Any, Any]) -> None:
        seen.append((ctx.workflow, clock.now()))

    short = workflow("short").sleep("nap", "1h").step("note", note)
    long = workflow("long").sleep("nap", "5h").step("note", note)
    async with TestEngine(clock=clock) as t:
        await t.run(long)
        await t.run(short)
        finished = await t.advance("1d")
        assert [r.workflow for r in finished] == ["short", "long"]
        assert seen == [
            ("short", DEFAULT_START + timedelta(hours=1)),
            ("long", DEFAULT_START + timedelta(hours=5)),
        ]
        assert t.now == DEFAULT_START + timedelta(days=1)


async def test_run_with_advance_passes_sleeps_and_wait_timeouts() -> None:
    wf = (
        workflow("patient")
        .sleep("first", "2h")
        .step("middle", echo)
        .sleep("second", "3d")
        .step("last", echo)
    )
    async with TestEngine() as t:
        result = await t.run(wf, "x", advance=True)
        assert result.output == "x"
        assert t.now == DEFAULT_START + timedelta(days=3, hours=2)

        timing_out = workflow("times-out").wait_for_event("approval", timeout="2h")
        result = await t.run(timing_out, advance=True)
        assert result.status == "failed"
        assert result.error is not None
        assert result.error["code"] == "wait_timeout"


# -- events -----------------------------------------------------------------------


class Approval(pydantic.BaseModel):
    by: str


def approved_by(ctx: StepContext[Any, Approval]) -> str:
    return ctx.prev.by


approval_flow = (
    workflow("approval")
    .step("prepare", echo)
    .sleep("cool-off", "1h")
    .wait_for_event("approval", schema=Approval, timeout="48h")
    .step("record", approved_by)
)


async def test_event_sent_after_the_run_reaches_its_wait() -> None:
    async with TestEngine() as t:
        result = await t.run(approval_flow)
        await t.advance("1h")
        result = await t.get(result.id)
        assert result.status == "waiting"
        assert result.blocked_reason == (
            "waiting for event 'approval' (timeout at 2026-01-03T01:00:00+00:00, 2d from now); "
            "send it with send_event(), or advance the clock past the timeout"
        )
        result = await t.send_event(result.id, "approval", {"by": "ann"})
        assert result.status == "completed"
        assert result.output == "ann"
        assert result.step("approval").output == {"by": "ann"}


async def test_event_sent_before_the_run_reaches_its_wait() -> None:
    async with TestEngine() as t:
        result = await t.run(approval_flow)
        assert result.status == "sleeping"
        result = await t.send_event(result.id, "approval", {"by": "bob"})
        assert result.status == "sleeping"  # the event waits for the run
        finished = await t.advance("1h")
        assert [r.output for r in finished] == ["bob"]

        run = await t.enqueue(approval_flow)  # not driven yet
        result = await t.send_event(run.id, "approval", {"by": "cy"}, advance=True)
        assert result.output == "cy"


async def test_wait_timeout_fails_the_run_once_the_clock_passes_it() -> None:
    async with TestEngine() as t:
        result = await t.run(approval_flow)
        await t.advance("1h")
        await t.advance("47h59m")
        assert (await t.get(result.id)).status == "waiting"
        [failed] = await t.advance("1m")
        assert failed.status == "failed"
        assert failed.error is not None
        assert failed.error["code"] == "wait_timeout"
        assert failed.error["step"] == "approval"
        with pytest.raises(RunFailedError, match="no 'approval' event arrived"):
            failed.raise_for_status()


async def test_invalid_or_misdirected_events_are_refused() -> None:
    async with TestEngine() as t:
        result = await t.run(approval_flow)
        with pytest.raises(ValidationError):
            await t.send_event(result.id, "approval", {"who": "nobody"})
        with pytest.raises(RunNotFoundError):
            await t.send_event("missing", "approval", {"by": "ann"})


# -- runs that cannot finish ---------------------------------------------------------


async def test_wait_without_timeout_says_what_it_waits_for() -> None:
    wf = workflow("forever").wait_for_event("go")
    async with TestEngine() as t:
        result = await t.run(wf, advance=True)
        assert result.status == "waiting"
        assert result.blocked_reason == (
            "waiting for event 'go' (no timeout); send it with send_event()"
        )
        with pytest.raises(RunBlockedError, match="waiting for event 'go'"):
            await t.result(result.id, advance=True)


async def test_backoff_that_never_ends_is_reported() -> None:
    async def always_fails(ctx: StepContext[Any, Any]) -> None:
        raise RuntimeError("down")

    wf = workflow("hopeless").step(
        "charge", always_fails, retry=Retry(max_attempts=1_000_000, initial_delay="1s")
    )
    async with TestEngine(max_backoffs=50) as t:
        result = await t.run(wf)
        assert result.status == "running"
        assert result.blocked_reason is not None
        assert result.blocked_reason.startswith(
            "step 'charge' keeps failing: its retry back-off never ends (passed 50 back-offs"
        )
        assert "attempt 51" in result.blocked_reason


async def test_backoff_longer_than_the_clock_can_count_is_reported() -> None:
    async def always_fails(ctx: StepContext[Any, Any]) -> None:
        raise RuntimeError("down")

    # Back-offs are at most 100 years; a virtual clock near the end of
    # datetime's range still cannot count that far.
    wf = workflow("overflow").step(
        "charge",
        always_fails,
        retry=Retry(max_attempts=3, initial_delay="36500d", max_delay=None),
    )
    async with TestEngine(clock=VirtualClock(datetime(9950, 1, 1, tzinfo=UTC))) as t:
        result = await t.run(wf)
        assert result.blocked_reason == (
            "step 'charge' waits for a retry back-off that never ends "
            "(longer than the clock can count)"
        )


async def test_step_that_hangs_in_real_time_is_reported() -> None:
    async def hangs(ctx: StepContext[Any, Any]) -> None:
        await asyncio.Event().wait()

    wf = workflow("hangs").step("stuck", hangs)
    async with TestEngine(wall_timeout="100ms") as t:
        result = await t.run(wf)
        assert result.status == "running"
        assert result.blocked_reason is not None
        assert result.blocked_reason.startswith("step 'stuck' (attempt 1) has been running for")
        assert "of real time without finishing" in result.blocked_reason


async def test_a_cancelled_stuck_run_does_not_hold_up_other_backoffs() -> None:
    async def hangs(ctx: StepContext[Any, Any]) -> None:
        await asyncio.Event().wait()

    async def fails_twice(ctx: StepContext[Any, Any]) -> int:
        if ctx.attempt < 3:
            raise RuntimeError("later")
        return ctx.attempt

    stuck = workflow("stuck").step("stuck", hangs)
    flaky = workflow("flaky").step(
        "a", fails_twice, retry=Retry(initial_delay="1h", max_delay=None)
    )
    async with TestEngine(wall_timeout="100ms") as t:
        blocked = await t.run(stuck)
        assert blocked.status == "running"
        assert await t.engine.cancel(blocked.id)
        result = await t.run(flaky)
        assert result.output == 3
        assert t.now == DEFAULT_START + timedelta(hours=3)


async def test_run_of_an_unregistered_workflow_says_so() -> None:
    other = workflow("elsewhere").step("a", echo)
    async with TestEngine() as t:
        run = await t.engine.enqueue(other, None)  # enqueued but never registered here
        result = await t.drive(run.id)
        assert result.status == "pending"
        assert result.blocked_reason == (
            "pending, and due, but no worker took it: is workflow 'elsewhere' registered "
            "with this test engine?"
        )


async def test_unknown_run_and_bad_moments_are_errors() -> None:
    async with TestEngine() as t:
        with pytest.raises(RunNotFoundError):
            await t.get("nope")
        with pytest.raises(ConfigError, match="never goes back"):
            await t.advance_to(DEFAULT_START - timedelta(seconds=1))
    with pytest.raises(ConfigError, match="worker"):
        TestEngine(worker=True)
    with pytest.raises(ConfigError, match="max_backoffs"):
        TestEngine(max_backoffs=0)


# -- schedules ------------------------------------------------------------------------


async def test_advancing_the_clock_fires_schedule_slots() -> None:
    clock = VirtualClock()

    def fired_at(ctx: StepContext[Any, Any]) -> str:
        return clock.now().isoformat()

    hourly = workflow("hourly").step("tick", fired_at)
    async with TestEngine(clock=clock) as t:
        await t.schedule(hourly, {"report": "sales"}, every="1h")
        assert await t.advance("59m") == []
        finished = await t.advance("3h1m")
        assert [r.output for r in finished] == [
            "2026-01-01T01:00:00+00:00",
            "2026-01-01T02:00:00+00:00",
            "2026-01-01T03:00:00+00:00",
            "2026-01-01T04:00:00+00:00",
        ]
        assert all(r.run.input == {"report": "sales"} for r in finished)
        [schedule] = await t.engine.list_schedules()
        assert schedule.next_run_at == DEFAULT_START + timedelta(hours=5)


# -- other storages ---------------------------------------------------------------


@pytest.mark.skipif(not HAS_SQLITE, reason="reflow-sqlite is not installed")
async def test_on_sqlite_through_a_url(tmp_path: Path) -> None:
    async with TestEngine(storage=f"sqlite:///{tmp_path / 't.db'}") as t:
        result = await t.run(approval_flow, {"n": 1})
        [] = await t.advance("1h")
        assert (await t.get(result.id)).status == "waiting"
        result = await t.send_event(result.id, "approval", {"by": "ann"})
        assert result.output == "ann"
        assert result.step("cool-off").completed_at == DEFAULT_START + timedelta(hours=1)


async def test_on_a_storage_factory_and_a_storage_object() -> None:
    from reflow_core import MemoryStorage

    made: list[object] = []

    def factory(*, clock: VirtualClock) -> MemoryStorage:
        made.append(clock)
        return MemoryStorage(clock=clock)

    async with TestEngine(storage=factory) as t:
        assert made == [t.clock]
        assert (await t.run(order, {"order_id": "B", "amount": 2})).finished

    clock = VirtualClock()
    storage = MemoryStorage(clock=clock)
    async with TestEngine(storage=storage, clock=clock) as t:
        result = await t.run(approval_flow)
        await t.advance("1h")
    # The caller's storage is left open: the run is still there.
    record = await storage.get_run(result.id)
    assert record is not None
    assert record.status == "waiting"


# -- the pytest fixtures -------------------------------------------------------------


def test_fixture_in_a_plain_test(reflow_test_engine: SyncTestEngine) -> None:
    t = reflow_test_engine
    result: RunResult[Shipment] = t.run(order, {"order_id": "S1", "amount": 5})
    assert result.output["tracking"] == "TRK-S1"
    result2 = t.run(approval_flow)
    assert result2.status == "sleeping"
    assert t.send_event(result2.id, "approval", {"by": "dee"}).status == "sleeping"
    assert [r.output for r in t.advance("1h")] == ["dee"]
    assert t.get(result2.id).output == "dee"
    assert t.now == DEFAULT_START + timedelta(hours=1)
    assert t.call(t.engine.get_run(result2.id)) is not None
    t.schedule(workflow("sync-hourly").step("a", echo), 7, every="1h")
    assert [r.output for r in t.advance("1h")] == [7]


def test_fixture_clock_is_the_virtual_clock(
    reflow_test_engine: SyncTestEngine, virtual_clock: VirtualClock
) -> None:
    assert reflow_test_engine.clock is virtual_clock
    reflow_test_engine.run(workflow("c").sleep("nap", "1d").step("a", echo))
    reflow_test_engine.advance("1d")
    assert virtual_clock.now() == DEFAULT_START + timedelta(days=1)


async def test_fixture_in_an_async_test(reflow_test_engine: SyncTestEngine) -> None:
    with pytest.raises(RuntimeError, match="async_engine"):
        reflow_test_engine.run(order, {"order_id": "X", "amount": 1})
    async with reflow_test_engine.async_engine() as t:
        result = await t.run(order, {"order_id": "X", "amount": 1})
        assert result.output["charge_id"] == "ch_X"


def test_sync_engine_outside_the_fixture() -> None:
    with SyncTestEngine([order]) as t:
        assert t.result(t.enqueue(order, {"order_id": "Q", "amount": 3}).id)["tracking"] == "TRK-Q"
        run_id = t.run(approval_flow).id
        assert t.drive(run_id, advance=True).status == "failed"  # the wait timed out
        assert t.get(run_id).error == {
            "code": "wait_timeout",
            "type": "reflow_core.errors.WaitTimeoutError",
            "message": "no 'approval' event arrived before the wait's timeout",
            "step": "approval",
            "attempts": 1,
        }
        assert t.now == DEFAULT_START + timedelta(hours=49)
        assert t.advance_to(DEFAULT_START + timedelta(days=3)) == []
    with pytest.raises(RuntimeError, match="closed"):
        t.run(order, {"order_id": "Q", "amount": 3})


def test_sync_engine_methods_mirror_the_async_ones() -> None:
    for name in (
        "run",
        "enqueue",
        "drive",
        "send_event",
        "advance",
        "advance_to",
        "get",
        "result",
        "schedule",
    ):
        sync, coro = getattr(SyncTestEngine, name), getattr(TestEngine, name)
        assert inspect.signature(sync) == inspect.signature(coro), name
        assert sync.__doc__ == coro.__doc__, name
        assert sync.__qualname__ == f"SyncTestEngine.{name}"
        assert not inspect.iscoroutinefunction(sync), name


def test_sync_engine_keeps_the_workflows_it_is_given() -> None:
    with SyncTestEngine() as t:
        t.run(workflow=order, input={"order_id": "K", "amount": 1})
        t.enqueue(approval_flow)

    async def in_a_later_async_test() -> None:
        async with t.async_engine() as again:
            result = await again.run("order", {"order_id": "K2", "amount": 1})
            assert result.output["tracking"] == "TRK-K2"
            assert (await again.run(approval_flow.name)).status == "sleeping"

    asyncio.run(in_a_later_async_test())


def test_plugin_serves_a_suite_with_no_async_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from reflow_core import workflow

        def double(ctx):
            return ctx.prev * 2

        wf = workflow("double").step("a", double).sleep("nap", "7d").step("b", double)

        def test_it(reflow_test_engine):
            result = reflow_test_engine.run(wf, 3)
            assert "sleeping in step 'nap'" in result.blocked_reason
            [done] = reflow_test_engine.advance("7d")
            assert done.output == 12
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


# -- typing --------------------------------------------------------------------------


@pytest.mark.slow
def test_run_result_output_is_typed() -> None:
    """Both engines type a run of a typed workflow as a result of its output
    type, and the synchronous facade keeps every parameter's type."""
    case = Path(__file__).parent / "typing_cases" / "testing_output.py"
    stdout, stderr, status = api.run(["--strict", "--no-incremental", str(case)])
    out = stdout + stderr
    assert status == 0, out
    revealed = [
        line.split("Revealed type is ")[1] for line in out.splitlines() if "Revealed" in line
    ]
    typed = "RunResult[TypedDict(testing_output.Shipment, {'tracking': str})]"
    untyped = "RunResult[Any]"
    # The result classes live in a private module of reflow_core.testing.
    assert [r.strip('"').replace("reflow_core.testing._result.", "") for r in revealed] == [
        typed,
        "TypedDict(testing_output.Shipment, {'tracking': str})",
        untyped,
        typed,
        untyped,
        untyped,
        f"list[{untyped}]",
    ], out
