"""The engine, end to end, on every backend.

Tests that drive a run take the ``storage`` (or ``db``) fixture and so run on
each backend. Waiting is always bounded: ``wait_until`` polls with a
deadline, and every blocking handler also gives up on its own after a few
seconds so no worker thread outlives its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pydantic
import pytest

from reflow_conformance.testsupport import wait_until
from reflow_core import (
    ConfigError,
    Engine,
    IdempotencyConflictError,
    ReclaimLimitError,
    Retry,
    Run,
    RunNotFoundError,
    SerializationError,
    StepCancelledError,
    StepContext,
    StorageError,
    ValidationError,
    Workflow,
    WorkflowNotFoundError,
    workflow,
)
from reflow_core.storage import Storage

# -- helpers --------------------------------------------------------------------


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


def make_engine(storage: Storage, *workflows: Workflow[Any, Any], **options: Any) -> Engine:
    """An engine that leaves the storage open (the fixture closes it)."""
    options.setdefault("close_storage", False)
    return Engine(storage=storage, workflows=workflows, **options)


@contextlib.asynccontextmanager
async def idle_engine(
    storage: Storage, *workflows: Workflow[Any, Any], **options: Any
) -> AsyncIterator[Engine]:
    """An engine that is not started (drive it with ``tick``), stopped afterwards."""
    engine = make_engine(storage, *workflows, **options)
    try:
        yield engine
    finally:
        await engine.stop(timeout=0)


async def wait_for_status(engine: Engine, run_id: str, *statuses: str, timeout: float = 5) -> Run:
    async def reached() -> bool:
        run = await engine.get_run(run_id)
        return run is not None and run.status in statuses

    await wait_until(reached, timeout=timeout, what=f"run {run_id} to become {statuses}")
    return await engine.get_run_status(run_id)


async def all_runs(storage: Storage) -> list[Any]:
    await storage.initialize()  # idempotent; the engine may not have needed it yet
    page = await storage.list_runs(limit=1000)
    return list(page.runs)


async def quick(ctx: StepContext[Any, Any]) -> str:
    return f"{ctx.step} done"


class Gate:
    """A handler that blocks on its first call until interrupted (at most 5 s),
    recording what it saw; later calls return at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.finished = threading.Event()
        self.reasons: list[str | None] = []
        self.cancelled_errors = 0

    async def async_handler(self, ctx: StepContext[Any, Any]) -> str:
        self.calls += 1
        call = self.calls
        if call == 1:
            self.started.set()
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                self.cancelled_errors += 1
                self.reasons.append(ctx.signal.reason)
                raise
            finally:
                self.finished.set()
        return f"call {call}"

    def sync_handler(self, ctx: StepContext[Any, Any]) -> str:
        self.calls += 1
        call = self.calls
        if call == 1:
            self.started.set()
            try:
                ctx.signal.wait(5)
                self.reasons.append(ctx.signal.reason)
            finally:
                self.finished.set()
        return f"call {call}"

    def handler(self, kind: str) -> Callable[[StepContext[Any, Any]], Any]:
        return self.async_handler if kind == "async" else self.sync_handler


# -- the happy path -------------------------------------------------------------


async def test_multi_step_run_passes_input_prev_and_steps(storage: Storage) -> None:
    seen: dict[str, StepContext[Any, Any]] = {}
    visible: dict[str, dict[str, Any]] = {}
    stamp = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)

    async def charge(ctx: StepContext[Order, Order]) -> dict[str, Any]:
        seen["charge"] = ctx
        visible["charge"] = dict(ctx.steps)
        assert ctx.prev is ctx.input  # the first step's prev is the validated input
        return {"charged": ctx.input.amount, "at": stamp}

    def reserve(ctx: StepContext[Order, dict[str, Any]]) -> list[str]:
        seen["reserve"] = ctx
        visible["reserve"] = dict(ctx.steps)
        return ["sku-1", ctx.input.order_id]

    async def ship(ctx: StepContext[Order, list[str]]) -> dict[str, Any]:
        seen["ship"] = ctx
        visible["ship"] = dict(ctx.steps)
        return {"items": ctx.prev, "charged_at": ctx.steps["charge"]["at"]}

    wf = (
        workflow("order", input=Order)
        .step("charge", charge)
        .step("reserve", reserve)
        .step("ship", ship)
    )
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf, {"order_id": "ORD_1", "amount": "100"})
        assert run.status == "pending"
        assert run.input == {"order_id": "ORD_1", "amount": "100"}
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)

    assert done.status == "completed"
    assert done.error is None
    assert done.output == {"items": ["sku-1", "ORD_1"], "charged_at": stamp}
    assert done.attempts == 1
    assert done.reclaims == 0
    assert set(done.steps) == {"charge", "reserve", "ship"}
    assert done.steps["charge"].output == {"charged": 100, "at": stamp}
    assert done.steps["reserve"].output == ["sku-1", "ORD_1"]
    assert all(s.status == "completed" and s.attempts == 1 for s in done.steps.values())
    assert all(s.completed_at is not None for s in done.steps.values())

    assert seen["charge"].input == Order(order_id="ORD_1", amount=100)
    assert seen["reserve"].prev == {"charged": 100, "at": stamp}
    assert visible["charge"] == {}
    assert visible["reserve"] == {"charge": {"charged": 100, "at": stamp}}
    assert seen["ship"].prev == ["sku-1", "ORD_1"]
    assert visible["ship"] == {
        "charge": {"charged": 100, "at": stamp},
        "reserve": ["sku-1", "ORD_1"],
    }
    for name, ctx in seen.items():
        assert ctx.step == name
        assert ctx.run_id == run.id
        assert ctx.workflow == "order"
        assert ctx.attempt == 1
        assert ctx.signal.cancelled is False


async def test_step_outputs_view_is_read_only(storage: Storage) -> None:
    errors: list[BaseException] = []

    def second(ctx: StepContext[Any, Any]) -> int:
        try:
            ctx.steps["first"] = "tampered"  # type: ignore[index]
        except TypeError as exc:
            errors.append(exc)
        return 2

    wf = workflow("ro").step("first", quick).step("second", second)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        done = await engine.get_run_status(run.id)
    assert len(errors) == 1
    assert done.steps["first"].output == "first done"


async def test_plain_def_handlers_run_in_worker_threads(storage: Storage) -> None:
    threads: dict[str, threading.Thread] = {}

    def in_thread(ctx: StepContext[Any, Any]) -> str:
        threads["sync"] = threading.current_thread()
        return threading.current_thread().name

    async def on_loop(ctx: StepContext[Any, Any]) -> str:
        threads["async"] = threading.current_thread()
        return "ok"

    wf = workflow("threads").step("sync", in_thread).step("async", on_loop)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert threads["sync"] is not threading.main_thread()
    assert threads["async"] is threading.main_thread()
    assert done.steps["sync"].output.startswith("reflow-step")


async def test_plain_def_returning_a_coroutine_is_awaited(storage: Storage) -> None:
    async def later(value: int) -> int:
        await asyncio.sleep(0)
        return value * 2

    wf = workflow("coro").step("double", lambda ctx: later(21))
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == 42


async def test_async_with_starts_the_worker_and_closes_the_storage(storage: Storage) -> None:
    wf = workflow("ctx").step("a", quick)
    async with Engine(storage=storage, workflows=[wf]) as engine:
        assert engine.running
        run = await engine.enqueue(wf)
        done = await wait_for_status(engine, run.id, "completed")
        assert done.output == "a done"
    assert not engine.running
    with pytest.raises(StorageError, match="closed"):
        await storage.get_run(run.id)


async def test_engine_accepts_a_storage_url() -> None:
    wf = workflow("url").step("a", quick)
    async with Engine(storage="memory://", workflows=[wf]) as engine:
        run = await engine.enqueue("url")
        done = await wait_for_status(engine, run.id, "completed")
    assert done.output == "a done"


# -- retries, failures and timeouts ---------------------------------------------


async def test_retries_until_success_and_saves_the_attempt_count(storage: Storage) -> None:
    attempts: list[int] = []

    def flaky(ctx: StepContext[Any, Any]) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")
        return "finally"

    wf = workflow("flaky").step(
        "call", flaky, retry=Retry(max_attempts=5, backoff="fixed", initial_delay="10ms")
    )
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        done = await engine.get_run_status(run.id)
    assert attempts == [1, 2, 3]
    assert done.status == "completed"
    assert done.output == "finally"
    assert done.steps["call"].attempts == 3
    assert done.attempts == 1  # retries happen within one claim


@pytest.mark.parametrize(
    ("backoff", "gaps"),
    [("linear", [0.05, 0.10]), ("exponential", [0.05, 0.10]), ("fixed", [0.05, 0.05])],
)
async def test_backoff_waits_between_attempts(
    storage: Storage, backoff: Any, gaps: list[float]
) -> None:
    stamps: list[float] = []

    async def failing(ctx: StepContext[Any, Any]) -> None:
        stamps.append(time.monotonic())
        if ctx.attempt < 3:
            raise RuntimeError("no")

    retry = Retry(max_attempts=3, backoff=backoff, initial_delay="50ms")
    wf = workflow("backoff").step("call", failing, retry=retry)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        assert (await engine.get_run(run.id)).status == "completed"  # type: ignore[union-attr]
    measured = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(measured) == 2
    for got, expected in zip(measured, gaps, strict=True):
        assert got >= expected * 0.9, (measured, gaps)


async def test_exhausted_retries_fail_the_run_naming_the_step(storage: Storage) -> None:
    calls = {"charge": 0, "ship": 0}

    def charge(ctx: StepContext[Any, Any]) -> None:
        calls["charge"] += 1
        raise ValueError("card declined")

    async def ship(ctx: StepContext[Any, Any]) -> None:
        calls["ship"] += 1

    wf = (
        workflow("fail")
        .step("charge", charge, retry=Retry(max_attempts=2, initial_delay=0))
        .step("ship", ship)
    )
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        done = await engine.get_run_status(run.id)
    assert calls == {"charge": 2, "ship": 0}
    assert done.status == "failed"
    assert done.output is None
    assert done.error is not None
    assert 'in charge\n    raise ValueError("card declined")' in done.error["traceback"]
    assert {k: v for k, v in done.error.items() if k != "traceback"} == {
        "code": "step_failed",
        "type": "builtins.ValueError",
        "message": "card declined",
        "step": "charge",
        "attempts": 2,
    }
    step = done.steps["charge"]
    assert step.status == "failed"
    assert step.attempts == 2
    assert step.error == done.error
    assert "ship" not in done.steps


async def test_async_step_timeout_cancels_the_attempt(storage: Storage) -> None:
    contexts: list[StepContext[Any, Any]] = []
    cancelled: list[bool] = []

    async def slow(ctx: StepContext[Any, Any]) -> None:
        contexts.append(ctx)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    wf = workflow("slow").step("wait", slow, timeout="100ms")
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        started = time.monotonic()
        await engine.tick()
        elapsed = time.monotonic() - started
        done = await engine.get_run_status(run.id)
    assert elapsed < 3
    assert cancelled == [True]
    assert contexts[0].signal.cancelled
    assert contexts[0].signal.reason == "timeout"
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "step_timeout"
    assert done.error["step"] == "wait"
    assert done.error["attempts"] == 1
    assert "timed out after 0.1s" in done.error["message"]


async def test_sync_step_timeout_fires_its_signal(storage: Storage) -> None:
    observed: dict[str, Any] = {}
    returned = threading.Event()

    def slow(ctx: StepContext[Any, Any]) -> str:
        observed["woken"] = ctx.signal.wait(5)
        observed["cancelled"] = ctx.signal.cancelled
        observed["reason"] = ctx.signal.reason
        try:
            ctx.signal.raise_if_cancelled()
        except Exception as exc:
            observed["raised"] = exc
        returned.set()
        return "too late"

    wf = workflow("slow-sync").step("wait", slow, timeout="100ms")
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        started = time.monotonic()
        await engine.tick()
        assert time.monotonic() - started < 3
        await wait_until(returned.is_set, what="the handler to return")
        done = await engine.get_run_status(run.id)
    assert observed["woken"] is True
    assert observed["cancelled"] is True
    assert observed["reason"] == "timeout"
    assert type(observed["raised"]).__name__ == "StepCancelledError"
    assert observed["raised"].reason == "timeout"
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "step_timeout"
    assert done.steps["wait"].output is None  # the late result was discarded


async def test_timeout_applies_per_attempt_and_a_retry_can_succeed(storage: Storage) -> None:
    async def sometimes_slow(ctx: StepContext[Any, Any]) -> int:
        if ctx.attempt == 1:
            await asyncio.sleep(10)
        await asyncio.sleep(0.06)
        return ctx.attempt

    wf = workflow("retry-timeout").step(
        "call", sometimes_slow, timeout="150ms", retry=Retry(max_attempts=3, initial_delay=0)
    )
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == 2
    assert done.steps["call"].attempts == 2


async def test_non_plain_step_output_fails_the_run_with_the_path(storage: Storage) -> None:
    later_calls: list[int] = []

    def price_list(ctx: StepContext[Any, Any]) -> dict[str, Any]:
        items: list[dict[str, Any]] = [{"price": 1}, {"price": 2}, {"price": 3}]
        return {"items": [*items, {"price": Decimal("9.99")}]}

    async def later(ctx: StepContext[Any, Any]) -> None:
        later_calls.append(1)

    wf = workflow("bad-output").step("prices", price_list).step("later", later)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert later_calls == []
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "serialization_error"
    assert done.error["step"] == "prices"
    assert "$.items[3].price" in done.error["message"]
    assert "Decimal" in done.error["message"]
    assert done.steps["prices"].status == "failed"


async def test_non_plain_output_of_the_last_step_fails_the_run(storage: Storage) -> None:
    wf = workflow("bad-last").step("a", quick).step("b", lambda ctx: {"when": {1, 2}})
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "serialization_error"
    assert "$.when" in done.error["message"]
    assert done.steps["a"].status == "completed"


async def test_step_raising_step_cancelled_on_its_own_is_a_failure(storage: Storage) -> None:
    def confused(ctx: StepContext[Any, Any]) -> None:
        raise StepCancelledError("nobody asked")

    wf = workflow("confused").step("a", confused)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "step_failed"
    assert "outside a cancellation" in done.error["message"]


async def test_cancel_during_a_retry_delay_stops_the_retries(storage: Storage) -> None:
    calls: list[int] = []

    async def failing(ctx: StepContext[Any, Any]) -> None:
        calls.append(ctx.attempt)
        raise RuntimeError("down")

    retry = Retry(max_attempts=5, backoff="fixed", initial_delay="10s")
    wf = workflow("retry-cancel").step("a", failing, retry=retry)
    async with make_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await wait_until(lambda: calls == [1], what="the first attempt")
        await asyncio.sleep(0.05)  # now waiting out the retry delay
        assert await engine.cancel(run.id) is True
        await wait_until(lambda: not engine._worker.inflight, what="the run to leave the engine")
        done = await engine.get_run_status(run.id)
    assert calls == [1]
    assert done.status == "cancelled"
    assert done.steps == {}


async def test_input_rejected_by_the_worker_fails_the_run(db: Any) -> None:
    # The client enqueued with a lax schema; the worker's is stricter.
    lax = workflow("orders").step("a", quick)
    strict = workflow("orders", input=Order).step("a", quick)
    client = make_engine(db.connect(), lax)
    try:
        run = await client.enqueue(lax, {"order_id": "A"})
        async with idle_engine(db.connect(), strict) as worker:
            assert await worker.tick() == 1
            done = await worker.get_run_status(run.id)
    finally:
        await client.stop(timeout=0)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "validation_error"
    assert done.error["step"] is None
    assert done.steps == {}


# -- enqueue: validation, names, idempotency ------------------------------------


async def test_invalid_input_raises_and_creates_no_run(storage: Storage) -> None:
    wf = workflow("order", input=Order).step("a", quick)
    async with idle_engine(storage, wf) as engine:
        with pytest.raises(ValidationError) as caught:
            await engine.enqueue(wf, {"order_id": "ORD_1", "amount": "lots"})
        assert await all_runs(storage) == []
    issues = caught.value.issues
    assert [tuple(i["loc"]) for i in issues] == [("amount",)]
    assert issues[0]["type"] == "int_parsing"
    assert caught.value.workflow == "order"


async def test_non_plain_input_raises_and_creates_no_run(storage: Storage) -> None:
    wf = workflow("anything").step("a", quick)
    async with idle_engine(storage, wf) as engine:
        with pytest.raises(SerializationError) as caught:
            await engine.enqueue(wf, {"items": [1, 2, {"tags": {"x"}}]})
        assert await all_runs(storage) == []
    assert caught.value.path == "$.items[2].tags"


async def test_model_and_dataclass_inputs_are_stored_as_plain_data(storage: Storage) -> None:
    @dataclass
    class Point:
        x: int
        y: int

    got: list[Any] = []

    async def record(ctx: StepContext[Any, Any]) -> None:
        got.append(ctx.input)

    orders = workflow("orders", input=Order).step("a", record)
    points = workflow("points", input=Point).step("a", record)
    async with idle_engine(storage, orders, points) as engine:
        one = await engine.enqueue(orders, Order(order_id="A", amount=5))
        two = await engine.enqueue(points, Point(1, 2))
        assert one.input == {"order_id": "A", "amount": 5}
        assert two.input == {"x": 1, "y": 2}
        await engine.tick()
    assert sorted(got, key=repr) == sorted([Order(order_id="A", amount=5), Point(1, 2)], key=repr)


async def test_enqueue_by_name(storage: Storage) -> None:
    wf = workflow("by-name").step("a", quick)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue("by-name", {"k": 1})
        assert run.workflow == "by-name"
        await engine.tick()
        assert (await engine.get_run_status(run.id)).status == "completed"


async def test_unknown_workflow_name_is_refused(storage: Storage) -> None:
    wf = workflow("known").step("a", quick)
    async with idle_engine(storage, wf) as engine:
        with pytest.raises(WorkflowNotFoundError) as caught:
            await engine.enqueue("unknown", {})
        assert await all_runs(storage) == []
    assert caught.value.workflow == "unknown"
    assert caught.value.code == "workflow_not_found"
    assert "known" in str(caught.value)


async def test_idempotency_key_returns_the_existing_run(storage: Storage) -> None:
    wf = workflow("pay").step("a", quick)
    async with idle_engine(storage, wf) as engine:
        first = await engine.enqueue(wf, {"b": 1, "a": [1, 2]}, idempotency_key="k1")
        again = await engine.enqueue("pay", {"a": [1, 2], "b": 1}, idempotency_key="k1")
        assert again.id == first.id
        assert again.idempotency_key == "k1"
        assert len(await all_runs(storage)) == 1
        # Still the same run once it has completed.
        await engine.tick()
        later = await engine.enqueue(wf, {"a": [1, 2], "b": 1}, idempotency_key="k1")
        assert later.id == first.id
        assert later.status == "completed"
        # A different key is a different run.
        other = await engine.enqueue(wf, {"a": [1, 2], "b": 1}, idempotency_key="k2")
        assert other.id != first.id


async def test_idempotency_key_with_other_input_conflicts(storage: Storage) -> None:
    wf = workflow("pay").step("a", quick)
    async with idle_engine(storage, wf) as engine:
        first = await engine.enqueue(wf, {"amount": 1}, idempotency_key="k")
        with pytest.raises(IdempotencyConflictError) as caught:
            await engine.enqueue(wf, {"amount": 2}, idempotency_key="k")
        runs = await all_runs(storage)
    err = caught.value
    assert err.code == "idempotency_conflict"
    assert err.workflow == "pay"
    assert err.idempotency_key == "k"
    assert err.existing_run_id == first.id
    assert [r.id for r in runs] == [first.id]


async def test_idempotency_keys_are_scoped_per_workflow(storage: Storage) -> None:
    a = workflow("a").step("s", quick)
    b = workflow("b").step("s", quick)
    async with idle_engine(storage, a, b) as engine:
        run_a = await engine.enqueue(a, {"x": 1}, idempotency_key="same")
        run_b = await engine.enqueue(b, {"x": 2}, idempotency_key="same")
        assert run_a.id != run_b.id
        assert len(await all_runs(storage)) == 2


async def test_concurrent_enqueues_with_one_key_make_one_run(storage: Storage) -> None:
    wf = workflow("race").step("s", quick)
    async with idle_engine(storage, wf) as engine:
        runs = await asyncio.gather(
            *(engine.enqueue(wf, {"n": 1}, idempotency_key="once") for _ in range(20))
        )
        assert len({r.id for r in runs}) == 1
        assert len(await all_runs(storage)) == 1


@pytest.mark.parametrize("key", ["", 42])
async def test_invalid_idempotency_key_is_a_config_error(storage: Storage, key: Any) -> None:
    wf = workflow("w").step("s", quick)
    async with idle_engine(storage, wf) as engine:
        with pytest.raises(ConfigError) as caught:
            await engine.enqueue(wf, {}, idempotency_key=key)
        assert await all_runs(storage) == []
    assert caught.value.option == "idempotency_key"


# -- inspection -----------------------------------------------------------------


async def test_unknown_run_ids(storage: Storage) -> None:
    async with idle_engine(storage, workflow("w").step("s", quick)) as engine:
        assert await engine.get_run("no-such-run") is None
        with pytest.raises(RunNotFoundError) as caught:
            await engine.get_run_status("no-such-run")
        assert caught.value.run_id == "no-such-run"
        assert await engine.cancel("no-such-run") is False


# -- cancel ---------------------------------------------------------------------


async def test_cancel_a_pending_run(storage: Storage) -> None:
    calls: list[str] = []

    async def step(ctx: StepContext[Any, Any]) -> None:
        calls.append(ctx.step)

    wf = workflow("cancel-pending").step("a", step)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.cancel(run.id) is True
        assert await engine.tick() == 0
        done = await engine.get_run_status(run.id)
        assert await engine.cancel(run.id) is False  # already finished
    assert calls == []
    assert done.status == "cancelled"
    assert done.error is not None
    assert done.error["code"] == "run_cancelled"
    assert done.steps == {}


async def test_cancel_a_completed_run_is_refused(storage: Storage) -> None:
    wf = workflow("w").step("a", quick)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await engine.tick()
        assert await engine.cancel(run.id) is False
        assert (await engine.get_run_status(run.id)).status == "completed"


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_cancel_a_running_run_stops_its_step(storage: Storage, kind: str) -> None:
    gate = Gate()
    after: list[int] = []

    async def last(ctx: StepContext[Any, Any]) -> None:
        after.append(1)

    wf = (
        workflow("cancel-running")
        .step("first", quick)
        .step("blocked", gate.handler(kind))
        .step("last", last)
    )
    async with make_engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        await wait_until(gate.started.is_set, what="the blocking step to start")
        assert await engine.cancel(run.id) is True
        await wait_until(gate.finished.is_set, what="the blocking step to stop")
        await wait_until(lambda: not engine._worker.inflight, what="the run to leave the engine")
        await asyncio.sleep(0.1)  # a late write would land now
        done = await engine.get_run_status(run.id)

    assert gate.reasons == ["cancelled"]
    if kind == "async":
        assert gate.cancelled_errors == 1
    assert done.status == "cancelled"
    assert done.error is not None
    assert done.error["code"] == "run_cancelled"
    assert set(done.steps) == {"first"}
    assert after == []


async def test_cancel_from_another_engine_stops_the_worker_at_its_heartbeat(
    db: Any,
) -> None:
    gate = Gate()
    wf = workflow("remote-cancel").step("blocked", gate.sync_handler).step("never", quick)
    worker = make_engine(db.connect(), wf, lease="2s", heartbeat="50ms")
    client = make_engine(db.connect(), wf)
    try:
        run = await client.enqueue(wf)
        tick = asyncio.create_task(worker.tick())
        await wait_until(gate.started.is_set, what="the step to start")
        assert await client.cancel(run.id) is True
        await wait_until(gate.finished.is_set, timeout=3, what="the worker to notice")
        assert await tick == 1
        done = await client.get_run_status(run.id)
    finally:
        await worker.stop(timeout=0)
        await client.stop(timeout=0)
    assert gate.reasons == ["lease_lost"]
    assert done.status == "cancelled"
    assert done.steps == {}


# -- leases, heartbeats and reclaims --------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_heartbeats_keep_a_long_step_alive(db: Any, kind: str) -> None:
    async def long_async(ctx: StepContext[Any, Any]) -> str:
        await asyncio.sleep(1.2)
        return "done"

    def long_sync(ctx: StepContext[Any, Any]) -> str:
        time.sleep(1.2)
        return "done"

    # Five heartbeats a lease: a loaded machine may delay one or two.
    wf = workflow("long").step("long", long_async if kind == "async" else long_sync)
    worker = make_engine(db.connect(), wf, lease="500ms", heartbeat="100ms")
    rival = make_engine(db.connect(), wf, lease="500ms", heartbeat="100ms")
    try:
        run = await worker.enqueue(wf)
        tick = asyncio.create_task(worker.tick())
        await asyncio.sleep(0.1)
        first = await worker.storage.get_run(run.id)
        await asyncio.sleep(0.6)  # past the first lease's end
        assert await rival.tick() == 0  # the lease is still held
        second = await worker.storage.get_run(run.id)
        assert await tick == 1
        done = await worker.get_run_status(run.id)
    finally:
        await worker.stop(timeout=0)
        await rival.stop(timeout=0)
    assert first is not None
    assert second is not None
    assert first.status == second.status == "running"
    assert first.lease_expires_at is not None
    assert second.lease_expires_at is not None
    assert second.lease_expires_at > first.lease_expires_at
    assert done.status == "completed"
    assert done.attempts == 1
    assert done.reclaims == 0
    assert done.steps["long"].attempts == 1


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_worker_whose_lease_was_taken_stops_and_writes_nothing(
    db: Any, clock: Any, kind: str
) -> None:
    gate = Gate()
    after: list[str] = []

    async def last(ctx: StepContext[Any, Any]) -> str:
        after.append(ctx.prev)
        return f"{ctx.prev}!"

    wf = workflow("stolen").step("work", gate.handler(kind)).step("last", last)
    a = make_engine(db.connect(clock=clock), wf, lease="10s", heartbeat="50ms")
    b = make_engine(db.connect(clock=clock), wf, lease="10s", heartbeat="50ms")
    try:
        run = await a.enqueue(wf)
        a_tick = asyncio.create_task(a.tick())
        await wait_until(gate.started.is_set, what="A to start the step")
        clock.advance(11)  # A's lease lapses by the storage clock
        assert await b.tick() == 1  # B takes the run over and finishes it
        await wait_until(gate.finished.is_set, timeout=3, what="A to stop its step")
        assert await a_tick == 1
        await asyncio.sleep(0.1)  # a late write from A would land now
        done = await b.get_run_status(run.id)
    finally:
        await a.stop(timeout=0)
        await b.stop(timeout=0)

    assert gate.reasons == ["lease_lost"]
    if kind == "async":
        assert gate.cancelled_errors == 1
    assert gate.calls == 2
    assert after == ["call 2"]  # only B ran the next step
    assert done.status == "completed"
    assert done.output == "call 2!"
    assert done.steps["work"].output == "call 2"
    assert done.attempts == 2
    assert done.reclaims == 1


async def test_write_after_a_lapsed_lease_is_refused_and_the_run_reclaimed(
    db: Any, clock: Any
) -> None:
    release = asyncio.Event()
    calls: list[int] = []

    async def work(ctx: StepContext[Any, Any]) -> str:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            await release.wait()
        return f"call {len(calls)}"

    wf = workflow("lapsed").step("work", work).step("next", quick)
    # The heartbeat is far off in real time: only the fence can stop A.
    a = make_engine(db.connect(clock=clock), wf, lease="1h", heartbeat="30m")
    b = make_engine(db.connect(clock=clock), wf, lease="1h", heartbeat="30m")
    try:
        run = await a.enqueue(wf)
        a_tick = asyncio.create_task(a.tick())
        await wait_until(lambda: bool(calls), what="the step to start")
        clock.advance(2 * 3600)
        release.set()
        assert await a_tick == 1
        stale = await a.get_run_status(run.id)
        assert stale.status == "running"  # nothing A did after the lapse landed
        assert stale.steps == {}
        assert await b.tick() == 1
        done = await b.get_run_status(run.id)
    finally:
        await a.stop(timeout=0)
        await b.stop(timeout=0)
    assert calls == [1, 1]
    assert done.status == "completed"
    assert done.steps["work"].output == "call 2"
    assert done.reclaims == 1
    assert done.attempts == 2


async def test_run_that_keeps_losing_its_worker_is_failed(db: Any, clock: Any) -> None:
    calls: list[int] = []

    async def step(ctx: StepContext[Any, Any]) -> None:
        calls.append(1)

    wf = workflow("crashy").step("boom", step)
    storage = db.connect(clock=clock)
    async with idle_engine(storage, wf, lease="30s", max_reclaims=2) as engine:
        run = await engine.enqueue(wf)
        # Three workers claim the run and die without a word.
        for expected_reclaims in (0, 1, 2):
            (claimed,) = await storage.claim_runs(["crashy"], 10, timedelta(seconds=30))
            assert claimed.run.reclaims == expected_reclaims
            assert claimed.reclaimed is (expected_reclaims > 0)
            clock.advance(31)
        assert await engine.tick() == 1  # the third reclaim is one too many
        done = await engine.get_run_status(run.id)
    assert calls == []
    assert done.status == "failed"
    assert done.reclaims == 3
    assert done.attempts == 4
    assert done.error is not None
    assert done.error["code"] == ReclaimLimitError.code == "reclaim_limit"
    assert done.error["step"] is None
    assert "3 times (limit 2)" in done.error["message"]


async def test_run_at_the_reclaim_limit_still_runs(db: Any, clock: Any) -> None:
    wf = workflow("survivor").step("a", quick)
    storage = db.connect(clock=clock)
    async with idle_engine(storage, wf, lease="30s", max_reclaims=2) as engine:
        run = await engine.enqueue(wf)
        for _ in range(2):
            await storage.claim_runs(["survivor"], 10, timedelta(seconds=30))
            clock.advance(31)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.reclaims == 2
    assert done.attempts == 3


async def test_reclaimed_run_resumes_after_its_last_saved_step(db: Any, clock: Any) -> None:
    calls: dict[str, int] = {"a": 0, "b": 0}

    async def a(ctx: StepContext[Any, Any]) -> str:
        calls["a"] += 1
        return "A"

    async def b(ctx: StepContext[Any, Any]) -> str:
        calls["b"] += 1
        return f"{ctx.prev}B"

    wf = workflow("resume").step("a", a).step("b", b)
    storage = db.connect(clock=clock)
    async with idle_engine(storage, wf, lease="30s") as engine:
        run = await engine.enqueue(wf)
        # A worker saved step "a" and then died.
        from reflow_core import codec
        from reflow_core.storage import StepRecord

        (claimed,) = await storage.claim_runs(["resume"], 1, timedelta(seconds=30))
        saved = StepRecord("a", "completed", output=codec.encode("A"))
        assert await storage.save_step_result(claimed.lease, saved, timedelta(seconds=30))
        clock.advance(31)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert calls == {"a": 0, "b": 1}
    assert done.status == "completed"
    assert done.output == "AB"
    assert done.reclaims == 1


# -- stop, start, tick ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_stop_hands_in_flight_runs_back(db: Any, kind: str) -> None:
    gate = Gate()
    first_calls: list[int] = []

    async def first(ctx: StepContext[Any, Any]) -> str:
        first_calls.append(1)
        return "saved"

    wf = workflow("handback").step("first", first).step("blocked", gate.handler(kind))
    storage = db.connect()
    engine = make_engine(storage, wf)
    await engine.start()
    run = await engine.enqueue(wf)
    await wait_until(gate.started.is_set, what="the blocking step to start")
    await engine.stop(timeout=0)
    assert not engine.running
    await wait_until(gate.finished.is_set, what="the step to see the shutdown")
    handed = await engine.get_run_status(run.id)

    assert gate.reasons == ["shutdown"]
    assert handed.status == "pending"
    assert handed.error is None
    assert set(handed.steps) == {"first"}
    assert handed.steps["first"].output == "saved"

    # Another engine picks it up and does not run the saved step again.
    async with idle_engine(db.connect(), wf) as other:
        assert await other.tick() == 1
        done = await other.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == "call 2"
    assert first_calls == [1]
    assert gate.calls == 2
    assert done.reclaims == 0  # a hand-back is not a lapsed lease
    assert done.attempts == 2


class SlowClaimReplies:
    """A storage whose claim replies arrive late, as over a slow network: the
    claim is made at once, its answer reaches the engine ``delay`` later."""

    def __init__(self, inner: Storage, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self.claimed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_runs(self, workflows: Any, limit: int, lease: timedelta) -> Any:
        claimed = await self._inner.claim_runs(workflows, limit, lease)
        if claimed:
            self.claimed.set()
        await asyncio.sleep(self._delay)
        return claimed


async def test_stop_during_a_claim_hands_the_claimed_runs_back(storage: Storage) -> None:
    calls: list[int] = []

    async def step(ctx: StepContext[Any, Any]) -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(5)  # still running when the engine stops
        return "ran"

    wf = workflow("mid-claim").step("a", step)
    slow = SlowClaimReplies(storage, delay=0.2)
    engine = make_engine(slow, wf, lease="30s")  # type: ignore[arg-type]
    run = await engine.enqueue(wf)
    await engine.start()
    await asyncio.wait_for(slow.claimed.wait(), 5)
    await engine.stop(timeout=0)
    handed = await engine.get_run_status(run.id)
    assert handed.status == "pending"  # not left leased to a worker that is gone
    assert handed.error is None
    async with idle_engine(storage, wf) as other:
        assert await other.tick() == 1
        done = await other.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == "ran"
    assert done.reclaims == 0


async def test_cancel_just_after_a_claim_frees_the_engine_slot(storage: Storage) -> None:
    calls: list[Any] = []

    async def step(ctx: StepContext[Any, Any]) -> None:
        calls.append(ctx.input)
        if ctx.input == 1:
            await asyncio.sleep(5)  # cancelled long before this ends

    wf = workflow("early-cancel").step("a", step)
    engine = make_engine(storage, wf, concurrency=1)
    first = await engine.enqueue(wf, 1)
    await engine.start()
    try:
        # Catch the run between its claim and the first step of its task.
        for _ in range(10_000):
            record = await storage.get_run(first.id)
            if record is not None and record.status == "running":
                break
            await asyncio.sleep(0)
        assert await engine.cancel(first.id) is True
        second = await engine.enqueue(wf, 2)
        done = await wait_for_status(engine, second.id, "completed", "failed", timeout=3)
    finally:
        await engine.stop(timeout=0)
    assert done.status == "completed"  # the only slot was given back
    assert (await engine.get_run_status(first.id)).status == "cancelled"
    assert calls[-1] == 2


async def test_stop_lets_in_flight_runs_finish_within_the_grace(storage: Storage) -> None:
    started = asyncio.Event()

    async def short(ctx: StepContext[Any, Any]) -> str:
        started.set()
        await asyncio.sleep(0.2)
        return "finished"

    wf = workflow("drain").step("short", short)
    engine = make_engine(storage, wf)
    await engine.start()
    run = await engine.enqueue(wf)
    await asyncio.wait_for(started.wait(), 5)
    await engine.stop(timeout=5)
    done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == "finished"


async def test_stopped_engine_claims_nothing_more(storage: Storage) -> None:
    calls: list[int] = []

    async def step(ctx: StepContext[Any, Any]) -> None:
        calls.append(1)

    wf = workflow("stopped").step("a", step)
    engine = make_engine(storage, wf, poll_interval="20ms")
    await engine.start()
    await engine.stop()
    run = await engine.enqueue(wf)
    await asyncio.sleep(0.2)
    assert calls == []
    assert (await engine.get_run_status(run.id)).status == "pending"


async def test_tick_processes_one_batch_and_returns_its_size(storage: Storage) -> None:
    wf = workflow("batch").step("a", quick)
    async with idle_engine(storage, wf, concurrency=2) as engine:
        ids = [(await engine.enqueue(wf, {"n": n})).id for n in range(3)]
        assert await engine.tick() == 2
        statuses = [(await engine.get_run(i)).status for i in ids]  # type: ignore[union-attr]
        assert sorted(statuses) == ["completed", "completed", "pending"]
        assert await engine.tick() == 1
        assert await engine.tick() == 0
        statuses = [(await engine.get_run(i)).status for i in ids]  # type: ignore[union-attr]
        assert statuses == ["completed"] * 3


async def test_start_keeps_the_window_full_without_waiting_for_a_poll(storage: Storage) -> None:
    running = 0
    peak = 0

    async def work(ctx: StepContext[Any, Any]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.2)
        running -= 1

    wf = workflow("window").step("work", work)
    engine = make_engine(storage, wf, concurrency=2, poll_interval="5s")
    ids = [(await engine.enqueue(wf, {"n": n})).id for n in range(6)]
    started = time.monotonic()
    await engine.start()
    try:
        for run_id in ids:
            await wait_for_status(engine, run_id, "completed", timeout=4)
        elapsed = time.monotonic() - started
    finally:
        await engine.stop(timeout=0)
    assert peak == 2
    # Three waves of 0.2 s; a poll-gated refill would take over 5 s.
    assert 0.55 <= elapsed < 2.5, elapsed


async def test_a_freed_slot_is_refilled_while_a_long_run_continues(storage: Storage) -> None:
    finished: dict[int, float] = {}

    async def work(ctx: StepContext[Any, Any]) -> None:
        await asyncio.sleep(ctx.input["seconds"])
        finished[ctx.input["n"]] = time.monotonic()

    wf = workflow("refill").step("work", work)
    engine = make_engine(storage, wf, concurrency=2, poll_interval="5s")
    ids = [(await engine.enqueue(wf, {"n": 0, "seconds": 0.8})).id]
    for n in range(1, 6):
        ids.append((await engine.enqueue(wf, {"n": n, "seconds": 0.02})).id)
    await engine.start()
    try:
        for run_id in ids:
            await wait_for_status(engine, run_id, "completed", timeout=4)
    finally:
        await engine.stop(timeout=0)
    # The short runs all went through the second slot while the long one ran:
    # an engine that waited for its whole batch would finish the long one first.
    assert all(finished[n] < finished[0] for n in range(1, 6)), finished


async def test_work_enqueued_while_idle_is_picked_up_at_once(storage: Storage) -> None:
    wf = workflow("wake").step("a", quick)
    engine = make_engine(storage, wf, poll_interval="10s")
    await engine.start()
    try:
        await asyncio.sleep(0.1)  # the worker found nothing and went idle
        started = time.monotonic()
        run = await engine.enqueue(wf)
        await wait_for_status(engine, run.id, "completed", timeout=4)
        assert time.monotonic() - started < 2
    finally:
        await engine.stop(timeout=0)


# -- configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -2}, "concurrency"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"lease": -1}, "lease"),
        ({"lease": 0}, "lease"),
        ({"lease": "30 seconds"}, "lease"),
        ({"lease": "30"}, "lease"),
        ({"lease": "10s", "heartbeat": "10s"}, "heartbeat"),
        ({"lease": "10s", "heartbeat": "1m"}, "heartbeat"),
        ({"heartbeat": 0}, "heartbeat"),
        ({"heartbeat": "soon"}, "heartbeat"),
        ({"poll_interval": "fast"}, "poll_interval"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"claim_batch": 0}, "claim_batch"),
        ({"max_reclaims": -1}, "max_reclaims"),
        ({"drain_timeout": "-1s"}, "drain_timeout"),
    ],
)
def test_nonsense_configuration_is_refused_at_construction(
    options: dict[str, Any], option: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Engine(storage="memory://", **options)
    assert caught.value.option == option
    assert option in str(caught.value)


def test_default_heartbeat_is_a_third_of_the_lease() -> None:
    engine = Engine(storage="memory://", lease="30s")
    assert engine._worker._heartbeat == pytest.approx(10.0)


def test_workflow_registration_errors() -> None:
    with pytest.raises(ConfigError, match="no steps"):
        Engine(storage="memory://", workflows=[workflow("empty")])
    with pytest.raises(ConfigError, match="two different workflows"):
        Engine(
            storage="memory://",
            workflows=[workflow("twin").step("a", quick), workflow("twin").step("b", quick)],
        )
    with pytest.raises(ConfigError, match="built with workflow"):
        Engine(storage="memory://", workflows=[object()])  # type: ignore[list-item]
    wf = workflow("once").step("a", quick)
    engine = Engine(storage="memory://", workflows=[wf, wf])
    engine.register(wf)
    assert "once" in repr(engine)


# -- configuring the worker before it starts ------------------------------------


async def test_configure_worker_claims_only_the_workflows_named(storage: Storage) -> None:
    served = workflow("served-here").step("a", quick)
    elsewhere = workflow("served-elsewhere").step("a", quick)
    async with idle_engine(storage, served, elsewhere, concurrency=4) as engine:
        engine.configure_worker(workflows=["served-here"], concurrency=2)
        assert engine.workflow_names == ["served-elsewhere", "served-here"]
        assert engine.concurrency == 2
        mine = [await engine.enqueue(served) for _ in range(3)]
        other = await engine.enqueue(elsewhere)
        assert await engine.tick() == 2  # two slots, claim batch following concurrency
        assert await engine.tick() == 1
        assert await engine.tick() == 0
        for run in mine:
            assert (await engine.get_run_status(run.id)).status == "completed"
        assert (await engine.get_run_status(other.id)).status == "pending"
        assert engine.in_flight == 0


async def test_configure_worker_refuses_bad_values_and_a_started_worker(storage: Storage) -> None:
    wf = workflow("configured").step("a", quick)
    engine = make_engine(storage, wf)
    with pytest.raises(
        ConfigError, match="unknown workflow 'configurd'; this engine has: configured"
    ):
        engine.configure_worker(workflows=["configurd"])
    with pytest.raises(ConfigError, match="no workflow named"):
        engine.configure_worker(workflows=[])
    with pytest.raises(ConfigError, match="concurrency must be a positive int"):
        engine.configure_worker(concurrency=0)
    assert engine.drain_timeout == 10.0
    async with engine:
        with pytest.raises(ConfigError, match="before the worker starts"):
            engine.configure_worker(concurrency=3)
