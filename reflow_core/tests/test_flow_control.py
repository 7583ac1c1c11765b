"""Parallel groups, ``when=`` predicates, ``ctx.complete()`` and ``on_failure``,
on every backend.

A worker "crashes" here by losing its lease: a handler moves the storage
clock past the lease, so the worker's next write is refused and another
engine reclaims the run, exactly as after a dead process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from datetime import timedelta
from typing import Any

import pydantic
import pytest

from reflow_conformance import testsupport
from reflow_core import (
    Branch,
    Engine,
    FailureContext,
    ParallelCompleteError,
    Retry,
    RunFailedError,
    StepContext,
    StepTimeoutError,
    StorageError,
    Workflow,
    codec,
    workflow,
)
from reflow_core.hookspecs import hookimpl
from reflow_core.storage import StepRecord, Storage

LEASE = 30.0


def engine_on(
    storage: Storage, *workflows: Workflow[Any, Any], **options: Any
) -> contextlib.AbstractAsyncContextManager[Engine]:
    """:func:`~reflow_conformance.testsupport.engine_on` with this module's lease."""
    options.setdefault("lease", f"{LEASE:g}s")
    return testsupport.engine_on(storage, *workflows, **options)


FAST = Retry(max_attempts=3, backoff="fixed", initial_delay=0)


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


# -- parallel -------------------------------------------------------------------


async def test_async_branches_overlap_and_next_prev_is_the_outputs(storage: Storage) -> None:
    started: dict[str, asyncio.Event] = {"email": asyncio.Event(), "invoice": asyncio.Event()}
    seen: dict[str, Any] = {}

    def branch(name: str, other: str) -> Any:
        async def handler(ctx: StepContext[Any, Any]) -> str:
            started[name].set()
            # Only returns once the sibling is running too: proves overlap.
            await asyncio.wait_for(started[other].wait(), 5)
            seen[name] = ctx.prev
            return f"{name} for {ctx.prev['order']}"

        return handler

    async def after(ctx: StepContext[Any, dict[str, Any]]) -> dict[str, Any]:
        seen["after"] = ctx.prev
        seen["steps"] = dict(ctx.steps)
        return ctx.prev

    wf = (
        workflow("fanout")
        .step("prepare", lambda ctx: {"order": "ORD_1"})
        .parallel({"email": branch("email", "invoice"), "invoice": branch("invoice", "email")})
        .step("after", after)
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    outputs = {"email": "email for ORD_1", "invoice": "invoice for ORD_1"}
    assert done.status == "completed", done.error
    assert done.output == outputs
    assert seen["email"] == seen["invoice"] == {"order": "ORD_1"}  # both get the same prev
    assert seen["after"] == outputs
    assert seen["steps"] == {"prepare": {"order": "ORD_1"}, **outputs}
    assert {name: s.status for name, s in done.steps.items()} == {
        "prepare": "completed",
        "email": "completed",
        "invoice": "completed",
        "after": "completed",
    }


async def test_sync_branches_run_in_threads_at_the_same_time(storage: Storage) -> None:
    barrier = threading.Barrier(3, timeout=5)

    def branch(ctx: StepContext[Any, Any]) -> str:
        barrier.wait()  # breaks (and fails the run) unless all three run at once
        return threading.current_thread().name

    wf = workflow("threads").parallel({"a": branch, "b": branch, "c": branch}, name="fan")
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed", done.error
    assert set(done.output) == {"a", "b", "c"}
    assert len(set(done.output.values())) == 3


async def test_each_branch_has_its_own_retry_and_timeout(storage: Storage) -> None:
    attempts: dict[str, list[int]] = {"flaky": [], "slow": [], "plain": []}

    async def flaky(ctx: StepContext[Any, Any]) -> str:
        attempts["flaky"].append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")
        return "flaky ok"

    async def slow(ctx: StepContext[Any, Any]) -> str:
        attempts["slow"].append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(5)  # cut short by the branch's own timeout
        return "slow ok"

    async def plain(ctx: StepContext[Any, Any]) -> str:
        attempts["plain"].append(ctx.attempt)
        await asyncio.sleep(0.2)  # longer than slow's timeout: that one is not shared
        return "plain ok"

    wf = workflow("policies").parallel(
        {
            "flaky": Branch(flaky, retry=FAST),
            "slow": Branch(slow, retry=Retry(max_attempts=2, initial_delay=0), timeout="50ms"),
            "plain": plain,
        }
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        began = time.monotonic()
        assert await engine.tick() == 1
        elapsed = time.monotonic() - began
        done = await engine.get_run_status(run.id)
    assert done.status == "completed", done.error
    assert done.output == {"flaky": "flaky ok", "slow": "slow ok", "plain": "plain ok"}
    assert attempts == {"flaky": [1, 2, 3], "slow": [1, 2], "plain": [1]}
    assert done.steps["flaky"].attempts == 3
    assert done.steps["slow"].attempts == 2
    assert done.steps["plain"].attempts == 1
    assert elapsed < 2


@pytest.mark.parametrize("sibling_kind", ["async", "sync"])
async def test_first_branch_to_fail_cancels_its_siblings_and_names_the_run_failure(
    storage: Storage, sibling_kind: str
) -> None:
    sibling_started = threading.Event()
    sibling_done = threading.Event()
    seen: dict[str, Any] = {}

    async def async_sibling(ctx: StepContext[Any, Any]) -> str:
        sibling_started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen["cancelled_error"] = True
            seen["signal"] = ctx.signal.cancelled
            raise
        return "never"

    def sync_sibling(ctx: StepContext[Any, Any]) -> str:
        sibling_started.set()
        seen["signal"] = ctx.signal.wait(5)
        seen["reason"] = ctx.signal.reason
        sibling_done.set()
        return "ignored"

    async def retrying(ctx: StepContext[Any, Any]) -> str:
        # Another sibling, between retries when the failure comes.
        seen.setdefault("retrying", []).append(ctx.attempt)
        raise ConnectionError("down")

    async def bad(ctx: StepContext[Any, Any]) -> str:
        await asyncio.to_thread(sibling_started.wait, 5)
        raise ValueError("card declined")

    after_calls: list[int] = []
    sibling = async_sibling if sibling_kind == "async" else sync_sibling
    wf = (
        workflow("fail-fast")
        .parallel(
            {
                "sibling": sibling,
                "bad": bad,
                "retrying": Branch(retrying, retry=Retry(max_attempts=5, initial_delay="10s")),
            }
        )
        .step("after", lambda ctx: after_calls.append(1))
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        began = time.monotonic()
        assert await engine.tick() == 1
        elapsed = time.monotonic() - began
        done = await engine.get_run_status(run.id)
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout=1)

    assert elapsed < 3  # neither the 5 s sibling nor the 10 s retry delay was waited out
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["step"] == "bad"
    assert done.error["code"] == "step_failed"
    assert done.error["type"] == "builtins.ValueError"
    assert "card declined" in done.error["message"]
    assert info.value.step == "bad"
    assert done.steps["bad"].status == "failed"
    assert "sibling" not in done.steps  # a cancelled sibling saves nothing
    assert "retrying" not in done.steps
    assert seen["retrying"] == [1]
    if sibling_kind == "sync":  # its thread finishes on its own after the signal
        assert sibling_done.wait(2)
    assert seen["signal"] is True
    if sibling_kind == "async":
        assert seen["cancelled_error"] is True
    else:
        assert seen["reason"] == "cancelled"
    assert after_calls == []


async def test_branch_that_times_out_for_good_fails_the_run(storage: Storage) -> None:
    async def hang(ctx: StepContext[Any, Any]) -> None:
        await asyncio.sleep(5)

    wf = workflow("branch-timeout").parallel(
        {"hang": Branch(hang, timeout="30ms", retry=FAST), "ok": lambda ctx: "ok"}
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == StepTimeoutError.code == "step_timeout"
    assert done.error["step"] == "hang"
    assert done.steps["hang"].attempts == 3


async def test_after_a_crash_only_branches_without_results_run_again(db: Any, clock: Any) -> None:
    calls: dict[str, int] = {"a": 0, "b": 0, "c": 0}

    def branch(name: str) -> Any:
        async def handler(ctx: StepContext[Any, Any]) -> str:
            calls[name] += 1
            return f"{name}{calls[name]}"

        return handler

    wf = (
        workflow("resume-fanout")
        .parallel({"a": branch("a"), "b": branch("b"), "c": branch("c")}, name="fan")
        .step("after", lambda ctx: ctx.prev)
    )
    storage = db.connect(clock=clock)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        # A worker saved branches a and c, then died while b was running.
        (claimed,) = await storage.claim_runs(["resume-fanout"], 1, timedelta(seconds=LEASE))
        for name, output in (("a", "saved a"), ("c", "saved c")):
            record = StepRecord(name, "completed", output=codec.encode(output))
            assert await storage.save_step_result(claimed.lease, record, timedelta(seconds=LEASE))
        clock.advance(LEASE + 1)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert calls == {"a": 0, "b": 1, "c": 0}
    assert done.status == "completed"
    assert done.output == {"a": "saved a", "b": "b1", "c": "saved c"}
    assert done.reclaims == 1


async def test_branch_saved_before_a_lost_lease_is_not_run_again(db: Any, clock: Any) -> None:
    """Through the engine: one branch saves its result, the other is running
    when the worker loses its run; the next worker runs only that one."""
    calls: dict[str, int] = {"fast": 0, "slow": 0}
    fast_saved = asyncio.Event()

    async def fast(ctx: StepContext[Any, Any]) -> str:
        calls["fast"] += 1
        return "fast"

    async def slow(ctx: StepContext[Any, Any]) -> str:
        calls["slow"] += 1
        if calls["slow"] == 1:
            await asyncio.wait_for(fast_saved.wait(), 5)
            clock.advance(LEASE + 1)  # this worker is now presumed dead
        return f"slow{calls['slow']}"

    wf = workflow("lost-fanout").parallel({"fast": fast, "slow": slow}).step("end", lambda c: 1)
    storage_a = db.connect(clock=clock)
    async with engine_on(storage_a, wf) as a, engine_on(db.connect(clock=clock), wf) as b:
        run = await a.enqueue(wf)
        tick = asyncio.create_task(a.tick())

        for _ in range(1000):
            if "fast" in await storage_a.get_step_results(run.id):
                break
            await asyncio.sleep(0.005)
        fast_saved.set()
        assert await tick == 1
        stale = await a.get_run_status(run.id)
        assert stale.status == "running"
        assert set(stale.steps) == {"fast"}  # slow's late result was refused
        assert await b.tick() == 1
        done = await b.get_run_status(run.id)
    assert calls == {"fast": 1, "slow": 2}
    assert done.status == "completed"
    assert done.steps["slow"].output == "slow2"


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_complete_inside_a_branch_fails_the_run(storage: Storage, kind: str) -> None:
    async def async_branch(ctx: StepContext[Any, Any]) -> None:
        ctx.complete("early")

    def sync_branch(ctx: StepContext[Any, Any]) -> None:
        ctx.complete("early")

    async def other(ctx: StepContext[Any, Any]) -> str:
        await asyncio.sleep(5)
        return "other"

    wf = workflow("bad-complete").parallel(
        {"done": async_branch if kind == "async" else sync_branch, "other": other}
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == ParallelCompleteError.code == "parallel_complete"
    assert done.error["step"] == "done"
    assert "other" not in done.steps


# -- when= ----------------------------------------------------------------------


async def test_false_predicate_skips_the_step_and_prev_passes_through(storage: Storage) -> None:
    seen: dict[str, Any] = {}
    asked: list[StepContext[Any, Any]] = []

    def big_order(ctx: StepContext[Order, Any]) -> bool:
        asked.append(ctx)
        return ctx.input.amount > 1000

    async def review(ctx: StepContext[Any, Any]) -> str:
        seen["review"] = True
        return "reviewed"

    async def ship(ctx: StepContext[Any, Any]) -> str:
        seen["ship_prev"] = ctx.prev
        seen["ship_steps"] = dict(ctx.steps)
        return "shipped"

    wf = (
        workflow("conditional", input=Order)
        .step("charge", lambda ctx: {"charged": ctx.input.amount})
        .step("review", review, when=big_order)
        .step("ship", ship)
    )
    async with engine_on(storage, wf) as engine:
        small = await engine.enqueue(wf, {"order_id": "S", "amount": 10})
        big = await engine.enqueue(wf, {"order_id": "B", "amount": 5000})
        assert await engine.tick() == 2
        skipped = await engine.get_run_status(small.id)
        reviewed = await engine.get_run_status(big.id)

    assert skipped.status == reviewed.status == "completed"
    assert skipped.steps["review"].status == "skipped"
    assert skipped.steps["review"].output is None
    assert reviewed.steps["review"].status == "completed"
    assert seen["review"] is True
    assert len(asked) == 2
    assert {ctx.prev["charged"] for ctx in asked} == {10, 5000}  # the predicate sees prev
    assert all(ctx.step == "review" for ctx in asked)


async def test_skipped_step_passes_prev_to_the_next_step(storage: Storage) -> None:
    seen: dict[str, Any] = {}

    async def ship(ctx: StepContext[Any, Any]) -> str:
        seen["prev"] = ctx.prev
        seen["steps"] = dict(ctx.steps)
        return "shipped"

    wf = (
        workflow("pass-through")
        .step("charge", lambda ctx: {"charged": 5})
        .step("review", lambda ctx: "reviewed", when=lambda ctx: False)
        .step("ship", ship)
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=1) == "shipped"
    assert seen["prev"] == {"charged": 5}
    assert seen["steps"] == {"charge": {"charged": 5}}


async def test_skipped_last_step_completes_the_run_with_prev(storage: Storage) -> None:
    wf = (
        workflow("skip-last")
        .step("charge", lambda ctx: {"charged": 5})
        .step("notify", lambda ctx: "notified", when=lambda ctx: False)
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == {"charged": 5}
    assert done.steps["notify"].status == "skipped"


async def test_a_saved_skip_is_never_decided_again(db: Any, clock: Any) -> None:
    """The predicate would flip on replay; the replay keeps the saved skip."""
    flag = {"review": False}
    predicate_calls: list[bool] = []
    ran: dict[str, int] = {"review": 0, "ship": 0}

    def wants_review(ctx: StepContext[Any, Any]) -> bool:
        decision = flag["review"]
        predicate_calls.append(decision)
        flag["review"] = True  # the state the predicate reads changes afterwards
        return decision

    async def review(ctx: StepContext[Any, Any]) -> str:
        ran["review"] += 1
        return "reviewed"

    async def ship(ctx: StepContext[Any, Any]) -> Any:
        ran["ship"] += 1
        if ran["ship"] == 1:
            clock.advance(LEASE + 1)  # the worker "dies": its writes are refused
        return {"shipped": ctx.prev}

    wf = (
        workflow("flip")
        .step("charge", lambda ctx: "charged")
        .step("review", review, when=wants_review)
        .step("ship", ship)
        .step("done", lambda ctx: ctx.prev)
    )
    async with (
        engine_on(db.connect(clock=clock), wf) as a,
        engine_on(db.connect(clock=clock), wf) as b,
    ):
        run = await a.enqueue(wf)
        assert await a.tick() == 1
        stale = await a.get_run_status(run.id)
        assert stale.status == "running"
        assert stale.steps["review"].status == "skipped"
        assert await b.tick() == 1  # the replay, on another engine
        done = await b.get_run_status(run.id)
    assert done.status == "completed"
    assert done.reclaims == 1
    assert predicate_calls == [False]  # evaluated once, never again
    assert ran == {"review": 0, "ship": 2}
    assert done.output == {"shipped": "charged"}
    assert done.steps["review"].status == "skipped"


async def test_a_saved_skip_survives_a_resume(storage: Storage) -> None:
    flag = {"value": False}
    calls: list[str] = []

    def predicate(ctx: StepContext[Any, Any]) -> bool:
        calls.append("predicate")
        value = flag["value"]
        flag["value"] = True
        return value

    async def flaky(ctx: StepContext[Any, Any]) -> str:
        calls.append("flaky")
        if calls.count("flaky") == 1:
            raise RuntimeError("first time fails")
        return "ok"

    wf = (
        workflow("skip-resume")
        .step("maybe", lambda ctx: calls.append("maybe"), when=predicate)
        .step("flaky", flaky)
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        assert (await engine.get_run(run.id)).status == "failed"  # type: ignore[union-attr]
        assert await engine.resume(run.id)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert calls == ["predicate", "flaky", "flaky"]
    assert done.steps["maybe"].status == "skipped"


@pytest.mark.allow_error_logs
async def test_predicate_that_raises_fails_the_run_naming_the_step(storage: Storage) -> None:
    failures: list[FailureContext[Any]] = []

    def broken(ctx: StepContext[Any, Any]) -> bool:
        raise KeyError("vip")

    wf = (
        workflow("bad-predicate")
        .step("charge", lambda ctx: "charged")
        .step("review", lambda ctx: "reviewed", when=broken)
        .step("ship", lambda ctx: "shipped")
        .on_failure(failures.append)
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["step"] == "review"
    assert "predicate" in done.error["message"]
    assert "KeyError" in done.error["message"]
    assert set(done.steps) == {"charge", "review"}
    assert done.steps["review"].status == "failed"
    assert [f.step for f in failures] == ["review"]


# -- ctx.complete() --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_complete_finishes_the_run_early(storage: Storage, kind: str) -> None:
    later: list[str] = []

    async def async_check(ctx: StepContext[Any, Any]) -> Any:
        if ctx.prev["cached"]:
            ctx.complete({"from": "cache"})
        return "computed"

    def sync_check(ctx: StepContext[Any, Any]) -> Any:
        if ctx.prev["cached"]:
            ctx.complete({"from": "cache"})
        return "computed"

    wf = (
        workflow("early")
        .step("check", async_check if kind == "async" else sync_check)
        .step("compute", lambda ctx: later.append("compute"))
        .sleep("nap", "1h")
        .step("store", lambda ctx: later.append("store"))
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf, {"cached": True})
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=1) == {"from": "cache"}
        done = await engine.get_run_status(run.id)
        assert await engine.tick() == 0  # nothing left to claim
    assert later == []
    assert done.status == "completed"
    assert set(done.steps) == {"check"}
    assert done.steps["check"].status == "completed"
    assert done.steps["check"].output == {"from": "cache"}


async def test_complete_on_a_retry_records_that_attempt(storage: Storage) -> None:
    async def check(ctx: StepContext[Any, Any]) -> Any:
        if ctx.attempt == 1:
            raise ConnectionError("cache unreachable")
        ctx.complete("hit")

    wf = workflow("early-retry").step("check", check, retry=FAST).step("later", lambda c: 1)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.output == "hit"
    assert done.steps["check"].attempts == 2


async def test_complete_with_a_value_that_is_not_plain_data_fails_the_run(
    storage: Storage,
) -> None:
    wf = (
        workflow("early-bad")
        .step("check", lambda ctx: ctx.complete({1, 2}))
        .step("later", lambda c: 1)
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "serialization_error"
    assert done.error["step"] == "check"


async def test_a_worker_lost_before_complete_landed_reruns_the_step(db: Any, clock: Any) -> None:
    """``complete()`` is one atomic write: a worker that dies before it lands
    leaves nothing behind, and the next worker runs the step again."""
    calls: list[int] = []
    later: list[int] = []

    async def check(ctx: StepContext[Any, Any]) -> None:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            clock.advance(LEASE + 1)  # dies before the completion is written
        ctx.complete({"call": len(calls)})

    wf = workflow("early-crash").step("check", check).step("later", lambda c: later.append(1))
    async with (
        engine_on(db.connect(clock=clock), wf) as a,
        engine_on(db.connect(clock=clock), wf) as b,
    ):
        run = await a.enqueue(wf)
        assert await a.tick() == 1
        stale = await a.get_run_status(run.id)
        assert stale.status == "running"
        assert stale.steps == {}  # neither the step nor the output was written
        assert stale.output is None
        assert await b.tick() == 1
        done = await b.get_run_status(run.id)
        assert await b.tick() == 0
    assert calls == [1, 1]
    assert later == []
    assert done.status == "completed"
    assert done.output == {"call": 2}
    assert done.steps["check"].output == {"call": 2}


# -- on_failure -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_on_failure_is_called_once_with_the_failure(storage: Storage, kind: str) -> None:
    received: list[FailureContext[Order]] = []

    async def async_handler(fc: FailureContext[Order]) -> None:
        await asyncio.sleep(0)
        received.append(fc)

    def sync_handler(fc: FailureContext[Order]) -> None:
        received.append(fc)

    async def charge(ctx: StepContext[Order, Any]) -> None:
        raise ValueError(f"card declined for {ctx.input.order_id}")

    wf = (
        workflow("fails", input=Order)
        .step("reserve", lambda ctx: "reserved")
        .step("charge", charge, retry=FAST)
        .on_failure(async_handler if kind == "async" else sync_handler)
    )
    async with engine_on(storage, wf) as engine:
        ok_wf = workflow("succeeds").step("a", lambda ctx: 1).on_failure(sync_handler)
        engine.register(ok_wf)
        run = await engine.enqueue(wf, {"order_id": "ORD_9", "amount": 3})
        fine = await engine.enqueue(ok_wf)
        assert await engine.tick() == 2
        assert await engine.tick() == 0
        done = await engine.get_run_status(run.id)
        assert (await engine.get_run_status(fine.id)).status == "completed"

    assert done.status == "failed"
    (fc,) = received
    assert fc.run_id == run.id
    assert fc.workflow == "fails"
    assert fc.step == "charge"
    assert fc.input == Order(order_id="ORD_9", amount=3)
    assert fc.error["code"] == "step_failed"
    assert fc.error["step"] == "charge"
    assert fc.error["attempts"] == 3
    assert "card declined for ORD_9" in fc.error["message"]
    assert fc.error == done.error
    assert fc.exception is not None


async def test_on_failure_is_not_called_for_retried_success_or_cancellation(
    storage: Storage,
) -> None:
    received: list[Any] = []
    attempts: list[int] = []

    async def flaky(ctx: StepContext[Any, Any]) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("blip")
        return "ok"

    wf = workflow("recovers").step("flaky", flaky, retry=FAST).on_failure(received.append)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        cancelled = await engine.enqueue(wf)
        assert await engine.cancel(cancelled.id)
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=1) == "ok"
    assert attempts == [1, 2]
    assert received == []


class ErrorSink:
    def __init__(self) -> None:
        self.errors: list[tuple[BaseException, str]] = []

    @hookimpl
    def reflow_error(self, error: BaseException, where: str) -> None:
        self.errors.append((error, where))


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_failure_handler_that_raises_is_reported_and_changes_nothing(
    storage: Storage, kind: str
) -> None:
    sink = ErrorSink()
    calls: list[str] = []

    async def async_handler(fc: FailureContext[Any]) -> None:
        calls.append("handler")
        raise RuntimeError("pager is down")

    def sync_handler(fc: FailureContext[Any]) -> None:
        calls.append("handler")
        raise RuntimeError("pager is down")

    async def boom(ctx: StepContext[Any, Any]) -> None:
        raise ValueError("boom")

    wf = (
        workflow("double-fault")
        .step("boom", boom)
        .on_failure(async_handler if kind == "async" else sync_handler)
    )
    async with engine_on(storage, wf, plugins=[sink]) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
        assert await engine.tick() == 0
    assert calls == ["handler"]
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["message"] == "boom"  # the run's own failure, untouched
    ((error, where),) = sink.errors
    assert isinstance(error, RuntimeError)
    assert str(error) == "pager is down"
    assert "on_failure" in where
    assert "double-fault" in where


async def test_on_failure_runs_for_a_run_given_up_after_lost_workers(db: Any, clock: Any) -> None:
    received: list[FailureContext[Any]] = []
    wf = workflow("given-up").step("a", lambda ctx: 1).on_failure(received.append)
    storage = db.connect(clock=clock)
    async with engine_on(storage, wf, max_reclaims=0) as engine:
        run = await engine.enqueue(wf, {"k": 1})
        await storage.claim_runs(["given-up"], 1, timedelta(seconds=LEASE))
        clock.advance(LEASE + 1)
        assert await engine.tick() == 1
    (fc,) = received
    assert fc.run_id == run.id
    assert fc.step is None
    assert fc.error["code"] == "reclaim_limit"
    assert fc.input == {"k": 1}


class FailingSaves:
    """Delegates to a real storage; ``save_step_result`` for ``step`` raises
    ``StorageError`` the first ``times`` times, as a dropped connection would."""

    def __init__(self, inner: Storage, step: str, times: int) -> None:
        self._inner = inner
        self._step = step
        self._left = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def save_step_result(self, lease: Any, step: StepRecord, extend: Any) -> bool:
        if step.name == self._step and self._left > 0:
            self._left -= 1
            raise StorageError("connection dropped", operation="save_step_result")
        return await self._inner.save_step_result(lease, step, extend)


@pytest.mark.allow_error_logs
async def test_storage_trouble_saving_a_branch_does_not_fail_the_run(db: Any, clock: Any) -> None:
    calls: dict[str, int] = {"a": 0, "b": 0}

    def branch(name: str) -> Any:
        async def handler(ctx: StepContext[Any, Any]) -> str:
            calls[name] += 1
            return name

        return handler

    wf = (
        workflow("flaky-store")
        .parallel({"a": branch("a"), "b": branch("b")})
        .step("end", lambda ctx: ctx.prev)
    )
    # More failures than the engine's write retries: the save gives up.
    flaky = FailingSaves(db.connect(clock=clock), "a", times=4)
    async with engine_on(flaky, wf) as engine:  # type: ignore[arg-type]
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        stuck = await engine.get_run_status(run.id)
        assert stuck.status == "running", stuck.error  # left for a reclaim, not failed
        clock.advance(LEASE + 1)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == {"a": "a", "b": "b"}
    assert calls == {"a": 2, "b": 1}


async def test_a_slow_sync_failure_handler_does_not_block_other_runs(storage: Storage) -> None:
    gaps: list[float] = []

    def slow_handler(fc: FailureContext[Any]) -> None:
        time.sleep(0.5)  # a blocking notification call

    async def boom(ctx: StepContext[Any, Any]) -> None:
        raise ValueError("boom")

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    wf = workflow("slow-handler").step("boom", boom).on_failure(slow_handler)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)  # ticking before the run starts
        assert await engine.tick() == 1
        await asyncio.sleep(0.05)  # one more beat, to record the last gap
        ticking.cancel()
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert max(gaps) < 0.25, max(gaps)  # the event loop kept running meanwhile
