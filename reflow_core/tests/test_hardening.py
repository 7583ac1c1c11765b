"""Edges of what the engine accepts: inputs, outputs, durations, names, idle spells.

Each test is the regression test of a finding of an adversarial pass over
every backend: a value, duration or string that used to wedge a run, break
listing or stall wake-ups. They run on every backend the ``backend`` fixture
offers, except where a finding concerns only the networked ones.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest

from reflow_core import (
    ConfigError,
    Engine,
    RunFailedError,
    SerializationError,
    codec,
    workflow,
)
from reflow_core.storage import NewRun, StepRecord, Storage
from reflow_core.wakeups import MAX_HINT_DELAY_MS, WakeupHub
from reflow_core.workflow import Workflow

from .conftest import Database


def make_engine(storage: Storage, *workflows: Workflow[Any, Any], **options: Any) -> Engine:
    options.setdefault("close_storage", False)
    return Engine(storage=storage, workflows=workflows, **options)


def nested(depth: int, leaf: Any = "$") -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_text(depth: int) -> str:
    """Stored text nested ``depth`` dicts deep, with a tag-like key at the bottom
    (the shape that used to overflow the decoder's recursion)."""
    return '{"a":' * depth + '{"$x":1}' + "}" * depth


async def runs_in(engine: Engine) -> list[str]:
    page = await engine.list_runs(limit=100)
    return [run.id for run in page.runs]


# -- 1. inputs too deep for the decoder ------------------------------------


@pytest.mark.parametrize("depth", [600, 10_000])
async def test_an_input_nested_too_deep_is_refused_and_nothing_is_written(
    storage: Storage, depth: int
) -> None:
    wf = workflow("deep").step("a", lambda ctx: None)
    async with make_engine(storage, wf, worker=False) as engine:
        with pytest.raises(SerializationError) as info:
            await engine.enqueue(wf, nested(depth))
        assert f"nested more than {codec.MAX_DEPTH}" in str(info.value)
        assert info.value.path.startswith("$.a.a.a")
        assert await runs_in(engine) == []


async def test_a_self_referencing_input_is_refused_naming_the_path(storage: Storage) -> None:
    wf = workflow("loop").step("a", lambda ctx: None)
    value: dict[str, Any] = {"items": [1, 2]}
    value["items"].append(value)
    async with make_engine(storage, wf, worker=False) as engine:
        with pytest.raises(SerializationError) as info:
            await engine.enqueue(wf, value)
        assert info.value.path == "$.items[2]"
        assert "contains itself" in str(info.value)
        assert await runs_in(engine) == []


async def test_an_input_at_the_depth_limit_runs_and_reads_back(storage: Storage) -> None:
    wf = workflow("deepest").step("a", lambda ctx: ctx.input)
    value = nested(codec.MAX_DEPTH)
    async with make_engine(storage, wf, poll_interval="50ms") as engine:
        run = await engine.enqueue(wf, value)
        assert await engine.result(run.id, timeout="10s") == value


async def test_a_stored_input_that_cannot_be_decoded_fails_the_run_at_its_first_claim(
    storage: Storage,
) -> None:
    calls: list[int] = []
    wf = workflow("corrupt").step("a", lambda ctx: calls.append(1))
    async with make_engine(storage, wf, worker=False, max_reclaims=2) as engine:
        # Written by an older version, or by hand: the engine never writes this.
        created = await storage.create_run(NewRun("corrupt", nested_text(600)))
        good = await engine.enqueue(wf, {"fine": True})
        assert await engine.tick() == 2
        with pytest.raises(RunFailedError) as info:
            await engine.result(created.run.id, timeout="5s")
        assert info.value.error_code == "corrupt_data"
        assert "stored input" in str(info.value)
        assert calls == [1]  # only the good run's step ran
        assert (await engine.get_run_status(good.id)).status == "completed"
        # Reading and listing it work, and say what is wrong.
        status = await engine.get_run_status(created.run.id)
        assert status.status == "failed"
        assert status.input is None
        assert status.read_error is not None
        assert status.read_error.startswith("input:")
        listed = {run.id: run for run in (await engine.list_runs()).runs}
        assert set(listed) == {created.run.id, good.id}
        assert listed[created.run.id].read_error == status.read_error
        assert listed[good.id].read_error is None
        assert (await engine.get_run(created.run.id)) is not None
        assert await engine.tick() == 0  # failed for good, not reclaimed


async def test_an_unreadable_saved_step_output_fails_the_run_instead_of_the_worker(
    storage: Storage,
) -> None:
    calls: list[str] = []

    def second(ctx: Any) -> str:
        calls.append("b")
        return "b"

    wf = workflow("bad-output").step("a", lambda ctx: "a").step("b", second)
    async with make_engine(storage, wf, worker=False, lease="1s") as engine:
        run = await engine.enqueue(wf)
        [claimed] = await storage.claim_runs(["bad-output"], 1, timedelta(seconds=1))
        assert await storage.save_step_result(
            claimed.lease, StepRecord("a", "completed", output=nested_text(600)), timedelta(0)
        )
        await asyncio.sleep(0.05)  # that worker's lease lapses
        assert await engine.tick() == 1
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout="5s")
        assert info.value.error_code == "corrupt_data"
        assert "output of step 'a'" in str(info.value)
        assert calls == []
        status = await engine.get_run_status(run.id)
        # The unreadable record is kept as it was, and reads as None.
        assert status.steps["a"].status == "completed"
        assert status.steps["a"].output is None
        assert status.read_error is not None
        assert "output of step 'a'" in status.read_error


# -- 2. outputs that cannot be stored ----------------------------------------


@pytest.mark.parametrize("shape", ["deep", "self-referencing", "generator"])
async def test_an_output_that_cannot_be_stored_fails_the_run_once(
    storage: Storage, shape: str
) -> None:
    calls: list[int] = []

    def produce(ctx: Any) -> Any:
        calls.append(1)
        if shape == "deep":
            return nested(600)
        if shape == "generator":
            return (i for i in range(3))
        loop: list[Any] = []
        loop.append(loop)
        return {"x": loop}

    wf = workflow("bad-out").step("a", produce).step("b", lambda ctx: "never")
    # A lease long enough that a loaded machine never lets it lapse while the
    # step runs (a lapse would run the step again, rightly), and short enough
    # to wait out below.
    async with make_engine(storage, wf, poll_interval="20ms", lease="1s") as engine:
        run = await engine.enqueue(wf)
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout="10s")
        assert info.value.error_code == "serialization_error"
        assert info.value.step == "a"
        await asyncio.sleep(1.3)  # a lease and more: nothing is left to reclaim
        assert calls == [1]
        status = await engine.get_run_status(run.id)
        assert status.status == "failed"
        assert status.reclaims == 0
        assert status.steps["a"].status == "failed"


# -- 3 and 7. durations ----------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "option"),
    [
        (lambda: workflow("w").sleep("z", 10**12), "sleep 'z' duration"),
        (lambda: workflow("w").wait_for_event("e", timeout=10**12), "wait 'e' timeout"),
        (lambda: workflow("w").step("s", lambda c: 1, timeout="36501d"), "step 's' timeout"),
        (lambda: workflow("w").sleep("z", float("inf")), "sleep 'z' duration"),
    ],
)
def test_durations_past_the_maximum_are_refused_at_definition(build: Any, option: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.option == option
    assert "at most 36500d" in str(info.value) or "finite" in str(info.value)


@pytest.mark.parametrize(
    ("options", "name", "message"),
    [
        ({"lease": 1e300}, "lease", "at most 3650d"),
        ({"lease": 1e-9}, "lease", "at least 100ms"),
        ({"lease": "0.0001ms"}, "lease", "at least 100ms"),
        ({"lease": "99ms"}, "lease", "at least 100ms"),
        ({"lease": "1s", "heartbeat": 1e-9}, "heartbeat", "at least 10ms"),
        ({"poll_interval": 1e-9}, "poll_interval", "at least 1ms"),
        ({"poll_interval": "2d"}, "poll_interval", "at most 1d"),
        ({"drain_timeout": 10**12}, "drain_timeout", "at most 36500d"),
    ],
)
def test_engine_durations_outside_their_range_are_config_errors(
    options: dict[str, Any], name: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Engine(storage="memory://", **options)
    assert info.value.option == name
    assert message in str(info.value)


def test_the_shortest_lease_is_accepted() -> None:
    Engine(storage="memory://", lease="100ms")


async def test_a_sleep_of_the_longest_duration_reads_back_everywhere(storage: Storage) -> None:
    wf = workflow("long-sleep").step("a", lambda ctx: 1).sleep("z", "36500d").step("b", lambda c: 2)
    async with make_engine(storage, wf, worker=False) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        status = await engine.get_run_status(run.id)
        assert status.status == "sleeping"
        assert status.wake_at is not None
        assert status.wake_at.year >= status.created_at.year + 99
        page = await engine.list_runs(status="sleeping")
        assert [r.id for r in page.runs] == [run.id]


# -- 4. wake-ups after an idle spell ------------------------------------------


@pytest.mark.parametrize("backend", ["postgres", "redis"])
async def test_dispatch_stays_fast_after_an_idle_spell(db: Database) -> None:
    started: list[float] = []
    wf = workflow("idle").step("a", lambda ctx: started.append(time.monotonic()))
    engine = make_engine(db.connect(), wf, poll_interval="30s")
    client = make_engine(db.connect(), wf, worker=False)
    worker = engine._worker
    async with engine, client:
        await asyncio.sleep(0.3)  # subscribed, first claim found nothing
        # An idle spell of some 20 minutes at the default poll interval is
        # this many empty claims; the old gap arithmetic overflowed here.
        for _ in range(1100):
            worker._empty_claims += 1
            worker._hinted()
            worker.wake.clear()
            if worker._hint_timer is not None:
                worker._hint_timer.cancel()
                worker._hint_timer = None
        latencies = []
        for _ in range(3):
            before = len(started)
            sent = time.monotonic()
            await client.enqueue(wf)
            for _ in range(1000):
                if len(started) > before:
                    break
                await asyncio.sleep(0.002)
            assert len(started) > before, "the run did not start within 2s"
            latencies.append(started[-1] - sent)
            await asyncio.sleep(0.1)
        # Well under the 30 s poll: the hints got through, within the longest
        # gap after empty claims plus a round trip.
        assert max(latencies) < 0.5, latencies


async def test_idle_engines_bound_their_empty_claim_count() -> None:
    store = "memory://idle-count"
    wf = workflow("idle-count").step("a", lambda ctx: None)
    async with make_engine(store, wf, poll_interval="1ms") as engine:
        await asyncio.sleep(0.3)  # hundreds of empty claims
        assert 0 < engine._worker._empty_claims <= 6


# -- 10. odd strings --------------------------------------------------------------


@pytest.mark.parametrize("bad", ["run\ud800", "a\x00b", 42, b"bytes", ""])
async def test_a_bad_run_id_is_the_same_config_error_on_every_backend(
    storage: Storage, bad: Any
) -> None:
    wf = workflow("ids").wait_for_event("go")
    async with make_engine(storage, wf, worker=False) as engine:
        for call in (
            engine.get_run(bad),
            engine.get_run_status(bad),
            engine.cancel(bad),
            engine.resume(bad),
            engine.send_event(bad, "go"),
            engine.result(bad, timeout="1s"),
        ):
            with pytest.raises(ConfigError) as info:
                await call
            assert info.value.option == "run_id"


@pytest.mark.parametrize("bad", ["key\udfff", "k\x00"])
async def test_bad_idempotency_and_schedule_keys_are_refused_before_writing(
    storage: Storage, bad: str
) -> None:
    wf = workflow("keys").step("a", lambda ctx: None)
    async with make_engine(storage, wf, worker=False) as engine:
        with pytest.raises(ConfigError):
            await engine.enqueue(wf, idempotency_key=bad)
        with pytest.raises(ConfigError):
            await engine.schedule(wf, every="1h", key=bad)
        assert await runs_in(engine) == []
        assert await engine.list_schedules() == []


@pytest.mark.parametrize("bad", ["wf\ud800", "wf\x00"])
def test_names_that_no_store_can_keep_are_refused_at_definition(bad: str) -> None:
    with pytest.raises(ConfigError, match="workflow name"):
        workflow(bad)
    with pytest.raises(ConfigError, match="step name"):
        workflow("ok").step(bad, lambda ctx: None)
    with pytest.raises(ConfigError, match="step name"):
        workflow("ok").wait_for_event(bad)
    with pytest.raises(ConfigError, match="step name"):
        workflow("ok").parallel({bad: lambda ctx: None})


async def test_an_event_id_that_no_store_can_keep_is_refused(storage: Storage) -> None:
    wf = workflow("event-ids").wait_for_event("go")
    async with make_engine(storage, wf, worker=False) as engine:
        run = await engine.enqueue(wf)
        with pytest.raises(ConfigError) as info:
            await engine.send_event(run.id, "go", 1, event_id="e\ud800")
        assert info.value.option == "event_id"


class QueueHub(WakeupHub):
    """A channel fed by the test: each queued message is one hint."""

    def __init__(self) -> None:
        async def no_due(workflows: list[str]) -> None:
            return None

        super().__init__(next_due=no_due, describe="test")
        self.messages: asyncio.Queue[str] = asyncio.Queue()
        self.listens = 0

    async def listen(self) -> None:
        self.listens += 1
        self.connected_now()
        while True:
            self.hint(await self.messages.get())


@pytest.mark.allow_error_logs
async def test_a_subscriber_that_raises_never_takes_the_channel_down() -> None:
    hub = QueueHub()
    woken: list[str] = []

    def broken() -> None:
        raise OverflowError("int too large to convert to float")

    await hub.subscribe(["wf"], broken)
    await hub.subscribe(["wf"], lambda: woken.append("ok"))
    await asyncio.wait_for(hub.connected.wait(), 1)
    woken.clear()  # connecting wakes everyone once
    for _ in range(5):
        hub.messages.put_nowait("0|wf")
    for _ in range(100):
        if len(woken) == 5:
            break
        await asyncio.sleep(0.01)
    assert woken == ["ok"] * 5
    assert hub.listens == 1
    assert hub.reconnects == 0
    await hub.close()


async def test_hints_with_absurd_delays_are_bounded_not_fatal() -> None:
    hub = QueueHub()
    woken: list[str] = []
    await hub.subscribe(["wf"], lambda: woken.append("x"))
    await asyncio.wait_for(hub.connected.wait(), 1)
    for payload in ("9" * 5000 + "|wf", "99999999999999999999|wf", "\u0661\u0662|wf", "|wf"):
        hub.messages.put_nowait(payload)
    hub.messages.put_nowait("0|wf")
    woken.clear()
    for _ in range(100):
        if woken:
            break
        await asyncio.sleep(0.01)
    assert woken == ["x"]
    assert hub.listens == 1
    assert hub.reconnects == 0
    # The far-future hints armed a timer of a day at most.
    assert hub._timer is not None
    assert hub._timer_at - asyncio.get_running_loop().time() <= MAX_HINT_DELAY_MS / 1000
    await hub.close()
