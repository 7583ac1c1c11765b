"""Durable sleeps, ``wait_for_event`` and ``send_event``, on every backend.

Time is the storage's: tests that sleep or time out open their storages with
the ``clock`` fixture and move it forward, so nothing here waits for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import timedelta
from typing import Any

import pydantic
import pytest

from reflow_conformance import testsupport
from reflow_core import (
    ConfigError,
    Engine,
    EventNotDeclaredError,
    RunFailedError,
    StepContext,
    ValidationError,
    WaitTimedOut,
    WaitTimeoutError,
    Workflow,
    workflow,
)
from reflow_core.storage import Storage

LEASE = 30.0


def engine_on(
    storage: Storage, *workflows: Workflow[Any, Any], **options: Any
) -> contextlib.AbstractAsyncContextManager[Engine]:
    """:func:`~reflow_conformance.testsupport.engine_on` with this module's lease."""
    options.setdefault("lease", f"{LEASE:g}s")
    return testsupport.engine_on(storage, *workflows, **options)


class Recorder:
    """Step handlers that record every call and the ``prev`` they saw."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.prevs: dict[str, Any] = {}

    def step(self, output: Any = None) -> Any:
        async def handler(ctx: StepContext[Any, Any]) -> Any:
            self.calls.append(ctx.step)
            self.prevs[ctx.step] = ctx.prev
            return ctx.prev if output is None else output

        return handler


# -- sleep ----------------------------------------------------------------------


async def test_sleeping_run_holds_no_lease_and_any_engine_resumes_it_when_due(
    db: Any, clock: Any
) -> None:
    rec = Recorder()
    wf = (
        workflow("nap")
        .step("before", rec.step({"charged": 1}))
        .sleep("nap", "1h")
        .step("after", rec.step("done"))
    )
    storage_a = db.connect(clock=clock)
    storage_b = db.connect(clock=clock)
    started = clock.now
    async with engine_on(storage_a, wf) as a, engine_on(storage_b, wf) as b:
        run = await a.enqueue(wf)
        assert await a.tick() == 1
        record = await storage_a.get_run(run.id)
        assert record is not None
        assert record.status == "sleeping"
        assert record.wake_at == started + timedelta(hours=1)
        assert record.lease_expires_at is None  # released: nobody holds it
        status = await a.get_run_status(run.id)
        assert status.wake_at == started + timedelta(hours=1)
        assert status.steps["nap"].status == "sleeping"
        assert rec.calls == ["before"]

        clock.advance(3599)
        assert await a.tick() == 0
        assert await b.tick() == 0
        clock.advance(1)
        assert await b.tick() == 1  # the other engine resumes it
        done = await b.get_run_status(run.id)

    assert done.status == "completed"
    assert done.output == "done"
    assert rec.calls == ["before", "after"]
    assert rec.prevs["after"] == {"charged": 1}  # prev passes through the sleep
    assert done.steps["nap"].status == "completed"
    assert done.attempts == 2
    assert done.reclaims == 0


async def test_sleep_as_the_last_node_completes_with_prev(db: Any, clock: Any) -> None:
    wf = workflow("tail-nap").step("a", Recorder().step([1, 2])).sleep("nap", "10s")
    async with engine_on(db.connect(clock=clock), wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        clock.advance(10)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == [1, 2]
    assert done.steps["nap"].status == "completed"


async def test_a_run_reclaimed_ten_times_sleeps_once(db: Any, clock: Any) -> None:
    rec = Recorder()
    wf = (
        workflow("reclaimed-nap")
        .step("before", rec.step("B"))
        .sleep("nap", "1h")
        .step("after", rec.step("A"))
    )
    storage = db.connect(clock=clock)
    async with engine_on(storage, wf, max_reclaims=20) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        wake_at = clock.now + timedelta(hours=1)
        clock.advance(3600)
        # Ten workers in a row claim the woken run and die before saving anything.
        for expected in range(10):
            (claimed,) = await storage.claim_runs(["reclaimed-nap"], 5, timedelta(seconds=LEASE))
            assert claimed.run.reclaims == expected
            assert claimed.steps["nap"].status == "sleeping"
            assert claimed.steps["nap"].wake_at == wake_at  # fixed when first reached
            clock.advance(LEASE + 1)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    # The survivor did not start the hour over: it went straight on.
    assert done.status == "completed"
    assert done.output == "A"
    assert done.reclaims == 10
    assert rec.calls == ["before", "after"]
    assert rec.prevs["after"] == "B"


async def test_cancelled_sleeping_run_resumed_keeps_its_wake_time(db: Any, clock: Any) -> None:
    rec = Recorder()
    wf = workflow("resumed-nap").sleep("nap", "1h").step("after", rec.step("A"))
    async with engine_on(db.connect(clock=clock), wf) as engine:
        run = await engine.enqueue(wf)
        wake_at = clock.now + timedelta(hours=1)
        assert await engine.tick() == 1
        clock.advance(600)
        assert await engine.cancel(run.id)
        assert await engine.resume(run.id)
        assert await engine.tick() == 1  # claimed at once, and back to sleep
        again = await engine.get_run_status(run.id)
        assert again.status == "sleeping"
        assert again.wake_at == wake_at
        assert rec.calls == []
        clock.advance(3000)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert rec.calls == ["after"]


async def test_a_started_engine_resumes_a_due_sleep_on_its_own(storage: Storage) -> None:
    rec = Recorder()
    wf = workflow("short-nap").sleep("nap", "150ms").step("after", rec.step("woke"))
    engine = Engine(storage=storage, workflows=[wf], close_storage=False, poll_interval="20ms")
    async with engine:
        run = await engine.enqueue(wf)
        assert await engine.result(run.id, timeout=5) == "woke"
    assert rec.calls == ["after"]


# -- wait_for_event and send_event ----------------------------------------------


class Approval(pydantic.BaseModel):
    by: str
    amount: int


@dataclasses.dataclass
class ApprovalDC:
    by: str
    amount: int


def approval_callable(raw: Any) -> tuple[str, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("amount"), int):
        raise TypeError("amount must be an int")
    return (str(raw["by"]), raw["amount"])


SCHEMAS = [
    pytest.param(Approval, Approval(by="ann", amount=5), id="pydantic"),
    pytest.param(ApprovalDC, ApprovalDC(by="ann", amount=5), id="dataclass"),
    pytest.param(approval_callable, ("ann", 5), id="callable"),
]


@pytest.mark.parametrize(("schema", "expected"), SCHEMAS)
async def test_waiting_run_holds_no_lease_and_the_event_becomes_prev(
    db: Any, schema: Any, expected: Any
) -> None:
    rec = Recorder()
    wf = (
        workflow("approve")
        .step("ask", rec.step("asked"))
        .wait_for_event("approval", schema=schema)
        .step("after", rec.step("done"))
    )
    worker_store = db.connect()
    async with engine_on(worker_store, wf) as worker, engine_on(db.connect(), wf) as client:
        run = await worker.enqueue(wf)
        assert await worker.tick() == 1
        record = await worker_store.get_run(run.id)
        assert record is not None
        assert record.status == "waiting"
        assert record.waiting_for == "approval"
        assert record.lease_expires_at is None
        assert record.wake_at is None  # no timeout
        assert await worker.tick() == 0  # nothing to do until the event comes

        assert await client.send_event(run.id, "approval", {"by": "ann", "amount": 5}) is True
        assert await worker.tick() == 1
        done = await worker.get_run_status(run.id)

    assert done.status == "completed"
    assert rec.calls == ["ask", "after"]
    assert rec.prevs["after"] == expected
    assert done.steps["approval"].status == "completed"


async def test_send_event_with_a_bad_payload_raises_and_stores_nothing(storage: Storage) -> None:
    rec = Recorder()
    wf = (
        workflow("strict").wait_for_event("approval", schema=Approval).step("after", rec.step("ok"))
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        with pytest.raises(ValidationError) as info:
            await engine.send_event(run.id, "approval", {"by": "ann", "amount": "lots"})
        assert info.value.issues  # pydantic's findings are carried
        with pytest.raises(ValidationError):
            await engine.send_event(run.id, "approval", None)
        assert (await engine.get_run_status(run.id)).status == "waiting"  # still asleep
        assert await engine.tick() == 0
        assert await engine.send_event(run.id, "approval", {"by": "ann", "amount": 1})
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    # Had the bad payload been stored, the run would have consumed it first.
    assert done.status == "completed"
    assert rec.prevs["after"] == Approval(by="ann", amount=1)


async def test_send_event_refuses_undeclared_events_and_ignores_finished_runs(
    storage: Storage,
) -> None:
    wf = workflow("declared").wait_for_event("approval").step("after", Recorder().step("x"))
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        with pytest.raises(EventNotDeclaredError) as info:
            await engine.send_event(run.id, "aproval", {})
        assert info.value.code == "event_not_declared"
        assert info.value.event == "aproval"
        assert "'approval'" in str(info.value)
        assert await engine.send_event("no-such-run", "approval", {}) is False
        assert await engine.send_event(run.id, "approval", {"ok": 1}) is True
        assert await engine.tick() == 1
        assert (await engine.get_run_status(run.id)).status == "completed"
        assert await engine.send_event(run.id, "approval", {"late": 1}) is False
        cancelled = await engine.enqueue(wf)
        assert await engine.cancel(cancelled.id)
        assert await engine.send_event(cancelled.id, "approval", {}) is False


async def test_event_sent_before_the_wait_is_kept_and_consumed_there(db: Any) -> None:
    rec = Recorder()
    wf = (
        workflow("early-bird")
        .step("first", rec.step("one"))
        .wait_for_event("go")
        .step("after", rec.step("done"))
    )
    async with engine_on(db.connect(), wf) as client:
        run = await client.enqueue(wf)
        assert await client.send_event(run.id, "go", {"n": 1})  # run is still pending
        assert await client.send_event(run.id, "go", {"n": 2})
    # Another connection (another process, for sqlite) finds the buffered events.
    async with engine_on(db.connect(), wf) as worker:
        assert await worker.tick() == 1  # never had to wait
        done = await worker.get_run_status(run.id)
    assert done.status == "completed"
    assert rec.prevs["after"] == {"n": 1}  # the oldest, consumed once
    assert done.steps["go"].output == {"n": 1}
    assert done.attempts == 1


async def test_event_payload_may_be_a_model_instance(storage: Storage) -> None:
    rec = Recorder()
    wf = (
        workflow("model-event")
        .wait_for_event("approval", schema=Approval)
        .step("after", rec.step("ok"))
    )
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.send_event(run.id, "approval", Approval(by="bo", amount=2))
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=1) == "ok"
    assert rec.prevs["after"] == Approval(by="bo", amount=2)


async def test_wait_as_the_last_node_completes_with_the_payload(storage: Storage) -> None:
    wf = workflow("tail-wait").step("a", Recorder().step("A")).wait_for_event("done")
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        assert await engine.send_event(run.id, "done", {"final": True})
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=1) == {"final": True}


async def test_wait_times_out_and_fails_the_run(db: Any, clock: Any) -> None:
    rec = Recorder()
    failures: list[Any] = []
    wf = (
        workflow("impatient")
        .step("ask", rec.step("asked"))
        .wait_for_event("approval", timeout="10m")
        .step("after", rec.step())
        .on_failure(failures.append)
    )
    storage = db.connect(clock=clock)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        record = await storage.get_run(run.id)
        assert record is not None
        assert record.status == "waiting"
        assert record.wake_at == clock.now + timedelta(minutes=10)
        clock.advance(599)
        assert await engine.tick() == 0
        clock.advance(1)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout=1)
        assert await engine.send_event(run.id, "approval", {}) is False

    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == WaitTimeoutError.code == "wait_timeout"
    assert done.error["step"] == "approval"
    assert done.steps["approval"].status == "failed"
    assert info.value.error_code == "wait_timeout"
    assert info.value.step == "approval"
    assert rec.calls == ["ask"]
    assert [f.step for f in failures] == ["approval"]


async def test_a_wait_that_continues_on_timeout_passes_a_marker_on(db: Any, clock: Any) -> None:
    seen: list[Any] = []

    async def after(ctx: StepContext[Any, Any]) -> Any:
        seen.append(ctx.prev)
        if isinstance(ctx.prev, WaitTimedOut):
            return {"approved": False, "timed_out": ctx.prev}
        return {"approved": ctx.prev["yes"]}

    wf = (
        workflow("lenient")
        .wait_for_event("approval", timeout="10m", on_timeout="continue")
        .step("after", after)
    )
    storage = db.connect(clock=clock)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        deadline = clock.now + timedelta(minutes=10)
        clock.advance(600)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
        on_time = await engine.enqueue(wf)
        assert await engine.tick() == 1
        assert await engine.send_event(on_time.id, "approval", {"yes": True})
        assert await engine.tick() == 1
        assert await engine.result(on_time.id, timeout=1) == {"approved": True}

    marker = WaitTimedOut("approval", deadline)
    assert done.status == "completed"
    assert done.output == {"approved": False, "timed_out": marker}
    assert done.steps["approval"].status == "completed"
    assert done.steps["approval"].output == marker
    assert seen == [marker, {"yes": True}]


async def test_a_replayed_run_sees_the_saved_timeout_marker(db: Any, clock: Any) -> None:
    """The run is handed back after the wait timed out: the next claim
    replays the saved marker, never waits again."""
    calls: list[Any] = []

    async def after(ctx: StepContext[Any, Any]) -> Any:
        calls.append(ctx.prev)
        if len(calls) == 1:
            raise asyncio.CancelledError  # the worker goes away mid-step
        return "done"

    wf = (
        workflow("replayed-timeout")
        .wait_for_event("approval", timeout="1m", on_timeout="continue")
        .step("after", after)
    )
    storage = db.connect(clock=clock)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        clock.advance(60)
        await engine.tick()
        record = await storage.get_run(run.id)
        assert record is not None
        if record.status != "completed":  # handed back: claim it again
            clock.advance(LEASE + 1)
            await engine.tick()
        assert await engine.result(run.id, timeout=1) == "done"
    assert len(calls) == 2
    assert calls[0] == calls[1]
    assert isinstance(calls[0], WaitTimedOut)


async def test_continue_on_timeout_needs_a_timeout() -> None:
    with pytest.raises(ConfigError, match="on_timeout='continue' but no timeout"):
        workflow("w").wait_for_event("e", on_timeout="continue")  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="on_timeout must be 'fail' or 'continue'"):
        workflow("w").wait_for_event("e", timeout="1m", on_timeout="skip")  # type: ignore[call-overload]


async def test_event_before_the_timeout_wakes_the_run_at_once(db: Any, clock: Any) -> None:
    rec = Recorder()
    wf = workflow("in-time").wait_for_event("approval", timeout="10m").step("after", rec.step("ok"))
    async with engine_on(db.connect(clock=clock), wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        clock.advance(300)
        assert await engine.send_event(run.id, "approval", {"yes": True})
        assert await engine.tick() == 1  # claimable now, not at the deadline
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert rec.prevs["after"] == {"yes": True}


async def test_cancelled_waiting_run_resumed_waits_again_until_its_deadline(
    db: Any, clock: Any
) -> None:
    rec = Recorder()
    wf = (
        workflow("resumed-wait")
        .wait_for_event("approval", timeout="10m")
        .step("after", rec.step("ok"))
    )
    storage = db.connect(clock=clock)
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        deadline = clock.now + timedelta(minutes=10)
        assert await engine.tick() == 1
        clock.advance(60)
        assert await engine.cancel(run.id)
        assert await engine.resume(run.id)
        assert await engine.tick() == 1
        again = await engine.get_run_status(run.id)
        # Resuming does not count as the deadline passing.
        assert again.status == "waiting", again.error
        assert again.wake_at == deadline
        assert await engine.send_event(run.id, "approval", {"late": False})
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert rec.prevs["after"] == {"late": False}


async def test_a_started_engine_is_woken_by_send_event(storage: Storage) -> None:
    wf = workflow("live-wait").wait_for_event("go").step("after", Recorder().step("went"))
    # A poll far beyond the test: only send_event's wake-up can get the run going.
    engine = Engine(storage=storage, workflows=[wf], close_storage=False, poll_interval="1h")
    async with engine:
        run = await engine.enqueue(wf)
        for _ in range(200):
            current = await engine.get_run(run.id)
            assert current is not None
            if current.status == "waiting":
                break
            await asyncio.sleep(0.01)
        assert await engine.send_event(run.id, "go", 1)
        assert await engine.result(run.id, timeout=5) == "went"


class EventBetweenTakeAndWait:
    """Delegates to a real storage; right after the first ``take_event`` that
    finds nothing, an event is delivered, as another process might do."""

    def __init__(self, inner: Storage, event: str, payload: str) -> None:
        self._inner = inner
        self._event = event
        self._payload = payload
        self.delivered = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def take_event(self, lease: Any, step: str, event: str) -> Any:
        taken = await self._inner.take_event(lease, step, event)
        if taken is not None and not taken.found and not self.delivered:
            self.delivered = True
            await self._inner.deliver_event(lease.run_id, self._event, self._payload)
        return taken


async def test_event_arriving_while_a_resumed_run_waits_again_is_taken(storage: Storage) -> None:
    from reflow_core import codec

    rec = Recorder()
    wf = workflow("racy-wait").wait_for_event("go").step("after", rec.step("ok"))
    racy = EventBetweenTakeAndWait(storage, "go", codec.encode({"n": 7}))
    async with engine_on(racy, wf) as engine:  # type: ignore[arg-type]
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        assert await engine.cancel(run.id)
        assert await engine.resume(run.id)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert racy.delivered
    assert done.status == "completed"  # not left running under an idle lease
    assert rec.prevs["after"] == {"n": 7}
