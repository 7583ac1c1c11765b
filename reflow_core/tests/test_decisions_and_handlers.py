"""Behaviour that holds across a worker's death: ``when=`` decides once,
``on_failure`` runs at least once; and the engine's guards around it:
``resume`` of a run nobody may claim, schedules under a default key,
errors of observers reported through ``on_error``, retention on workers.

Every test runs on each backend; a "dead" worker is one whose heartbeats
were stopped (its lease lapses and another engine reclaims the run) or one
that was stopped mid-run (the run is handed back).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from reflow_conformance.testsupport import wait_until
from reflow_core import (
    ConfigError,
    Engine,
    FailureContext,
    HookError,
    RunFailedError,
    StepContext,
    WorkflowNotFoundError,
    workflow,
)
from reflow_core.events import RunCompleted, RunFailed
from reflow_core.hookspecs import hookimpl
from reflow_core.storage import Storage
from reflow_core.workflow import Workflow

from .conftest import Database

WHEN_MARK = "reflow:when:"
FAILURE_MARK = "reflow:on_failure"


def make_engine(storage: Storage, *workflows: Workflow[Any, Any], **options: Any) -> Engine:
    options.setdefault("close_storage", False)
    options.setdefault("poll_interval", "0.05s")
    return Engine(storage=storage, workflows=workflows, **options)


def kill(engine: Engine) -> None:
    """Make a running engine a dead worker: it claims nothing more and renews
    no lease, so what it holds lapses and another engine reclaims it, while
    the step or handler it was in stays stuck there."""
    worker = engine._worker
    for task in (worker._dispatcher, worker._heartbeater):
        assert task is not None
        task.cancel()


# -- when= decides once -------------------------------------------------------


async def test_a_true_when_decision_is_saved_and_not_taken_again_on_replay(
    db: Database,
) -> None:
    decisions: list[bool] = []
    started = asyncio.Event()
    release = asyncio.Event()

    def flip(ctx: StepContext[Any, Any]) -> bool:
        decisions.append(not decisions)  # True the first time, False after
        return decisions[-1]

    async def charge(ctx: StepContext[Any, Any]) -> str:
        started.set()
        await release.wait()
        return f"charged {ctx.prev}"

    wf = workflow("decide-once").step("a", lambda ctx: 1).step("b", charge, when=flip)
    storage = db.connect()
    first = make_engine(storage, wf)
    async with first:
        run = await first.enqueue(wf)
        await asyncio.wait_for(started.wait(), 10)
        await first.stop(timeout=0)  # the worker goes away after deciding
    assert decisions == [True]
    saved = await storage.get_step_results(run.id)
    assert saved[WHEN_MARK + "b"].status == "completed"
    assert "b" not in saved
    release.set()
    async with make_engine(db.connect(), wf) as second:
        assert await second.result(run.id, timeout=10) == "charged 1"
        status = await second.get_run_status(run.id)
    assert decisions == [True]  # the predicate was not asked again
    assert set(status.steps) == {"a", "b"}  # the engine's own record is not shown


async def test_a_false_decision_is_the_skip_and_an_async_predicate_is_awaited(
    db: Database,
) -> None:
    asked: list[str] = []

    async def wants_gift(ctx: StepContext[dict[str, Any], int]) -> bool:
        await asyncio.sleep(0)
        asked.append(ctx.step)
        return bool(ctx.input["gift"])

    wf = (
        workflow("async-when")
        .step("price", lambda ctx: 10)
        .step("wrap", lambda ctx: ctx.prev + 5, when=wants_gift)
        .step("total", lambda ctx: ctx.prev)
    )
    async with make_engine(db.connect(), wf) as engine:
        plain = await engine.enqueue(wf, {"gift": False})
        gift = await engine.enqueue(wf, {"gift": True})
        assert await engine.result(plain.id, timeout=10) == 10
        assert await engine.result(gift.id, timeout=10) == 15
        skipped = await engine.get_run_status(plain.id)
    assert skipped.steps["wrap"].status == "skipped"
    assert asked == ["wrap", "wrap"]


async def test_a_when_predicate_that_raises_fails_the_run_at_its_step(db: Database) -> None:
    async def broken(ctx: StepContext[Any, Any]) -> bool:
        raise LookupError("no flag service")

    wf = workflow("when-raises").step("a", lambda ctx: 1).step("b", lambda ctx: 2, when=broken)
    async with make_engine(db.connect(), wf) as engine:
        run = await engine.enqueue(wf)
        with pytest.raises(RunFailedError) as failed:
            await engine.result(run.id, timeout=10)
    assert failed.value.info["step"] == "b"
    assert "LookupError: no flag service" in failed.value.info["message"]
    # The predicate's own traceback and the exception it raised are kept.
    assert 'raise LookupError("no flag service")' in failed.value.info["traceback"]
    assert "in broken" in failed.value.info["traceback"]
    assert failed.value.info["causes"] == [
        {"type": "builtins.LookupError", "message": "no flag service"}
    ]


def test_step_names_may_not_use_the_reserved_prefix() -> None:
    with pytest.raises(ConfigError, match="reserved") as caught:
        workflow("reserved").step("reflow:when:a", lambda ctx: 1)
    assert caught.value.option == "name"
    with pytest.raises(ConfigError, match="reserved"):
        workflow("reserved").step("a", lambda ctx: 1).sleep("reflow:nap", "1s")


# -- on_failure runs at least once ---------------------------------------------


def _failing_workflow(
    name: str, handler: Callable[[FailureContext[Any]], Any]
) -> Workflow[Any, Any]:
    def boom(ctx: StepContext[Any, Any]) -> None:
        raise ValueError("card declined")

    return (
        workflow(name).step("reserve", lambda ctx: "held").step("charge", boom).on_failure(handler)
    )


async def test_on_failure_runs_again_when_its_worker_dies_before_it_returns(
    db: Database,
) -> None:
    calls: list[tuple[str | None, str, bool]] = []
    stuck = threading.Event()
    release = threading.Event()

    def compensate(ctx: FailureContext[Any]) -> None:
        calls.append((ctx.step, ctx.error["message"], ctx.exception is not None))
        if len(calls) == 1:
            stuck.set()
            release.wait(20)  # the first worker hangs in its handler

    wf = _failing_workflow("compensate-once", compensate)
    try:
        async with make_engine(db.connect(), wf, lease="1s") as first:
            run = await first.enqueue(wf)
            await wait_until(stuck.is_set, timeout=10, what="the first handler call")
            kill(first)
            mid = await first.get_run_status(run.id)
            # The mark is saved and the run is not failed yet: the handler is owed.
            assert mid.status == "running"
            assert FAILURE_MARK in await first.storage.get_step_results(run.id)
            seen: list[object] = []
            async with make_engine(db.connect(), wf, lease="1s") as second:
                stream = second.stream()
                with pytest.raises(RunFailedError) as failed:
                    await second.result(run.id, timeout=15)
                async for event in stream:
                    seen.append(event)
                    if isinstance(event, RunFailed):
                        break
            release.set()
    finally:
        release.set()
    # Called twice: by the worker that died in it, then by the one that reclaimed the run.
    assert len(calls) == 2
    assert calls[1][0] == "charge"
    assert "card declined" in calls[1][1]
    assert calls[1][2] is False  # the exception object stayed with the dead worker
    assert failed.value.info["step"] == "charge"
    assert "card declined" in failed.value.info["message"]
    assert [type(e).__name__ for e in seen][-1] == "RunFailed"
    final = await make_engine(db.connect(), wf).get_run_status(run.id)
    assert final.status == "failed"
    assert final.steps["charge"].status == "failed"
    assert final.steps["reserve"].status == "completed"
    assert FAILURE_MARK not in final.steps


async def test_a_run_handed_back_in_its_handler_calls_it_again_and_resume_starts_clean(
    db: Database,
) -> None:
    calls: list[int] = []
    gate = asyncio.Event()

    async def compensate(ctx: FailureContext[Any]) -> None:
        calls.append(1)
        if len(calls) == 1:
            await gate.wait()  # stopped while in here

    wf = _failing_workflow("handed-back", compensate)
    first = make_engine(db.connect(), wf)
    async with first:
        run = await first.enqueue(wf)
        await wait_until(lambda: bool(calls), timeout=10, what="the handler")
        await first.stop(timeout=0)
    async with make_engine(db.connect(), wf) as second:
        with pytest.raises(RunFailedError):
            await second.result(run.id, timeout=10)
        assert calls == [1, 1]
        # Resumed, the run fails again and owes its handler again.
        assert await second.resume(run.id)
        with pytest.raises(RunFailedError):
            await second.result(run.id, timeout=10)
    assert calls == [1, 1, 1]


async def test_a_handler_that_keeps_killing_its_workers_is_given_up(db: Database) -> None:
    calls: list[int] = []
    errors: list[HookError] = []
    release = threading.Event()

    def never_returns(ctx: FailureContext[Any]) -> None:
        calls.append(1)
        release.wait(20)

    wf = _failing_workflow("hopeless-handler", never_returns)
    try:
        async with make_engine(db.connect(), wf, lease="0.5s") as first:
            run = await first.enqueue(wf)
            await wait_until(lambda: bool(calls), timeout=10, what="the first handler call")
            kill(first)
            async with make_engine(
                db.connect(), wf, lease="0.5s", max_reclaims=0, on_error=errors.append
            ) as second:
                with pytest.raises(RunFailedError) as failed:
                    await second.result(run.id, timeout=15)
            # Let the dead worker's handler thread go before it stops, rather
            # than having it wait out its drain for a thread that never ends.
            release.set()
    finally:
        release.set()
    assert calls == [1]  # past max_reclaims the handler is not called again
    assert "card declined" in failed.value.info["message"]
    assert len(errors) == 1
    assert "did not return" in str(errors[0])
    assert errors[0].run_id == run.id


# -- resume ------------------------------------------------------------------------


async def test_resume_of_a_run_whose_workflow_is_not_registered_raises_and_changes_nothing(
    db: Database,
) -> None:
    wf = _failing_workflow("resume-me", lambda ctx: None)
    other = workflow("other").step("a", lambda ctx: 1)
    async with make_engine(db.connect(), wf) as worker:
        run = await worker.enqueue(wf)
        with pytest.raises(RunFailedError):
            await worker.result(run.id, timeout=10)
    async with make_engine(db.connect(), other, worker=False) as client:
        with pytest.raises(WorkflowNotFoundError) as missing:
            await client.resume(run.id)
        assert missing.value.workflow == "resume-me"
        assert (await client.get_run_status(run.id)).status == "failed"
        assert await client.resume("no-such-run") is False
    async with make_engine(db.connect(), wf, worker=False) as registered:
        assert await registered.resume(run.id)
        assert (await registered.get_run(run.id)).status == "pending"  # type: ignore[union-attr]


# -- schedules under a default key ----------------------------------------------------


async def test_two_default_key_schedules_of_one_workflow_do_not_replace_each_other(
    db: Database,
) -> None:
    wf = workflow("report").step("a", lambda ctx: ctx.input)
    async with make_engine(db.connect(), wf, worker=False) as engine:
        daily = await engine.schedule(wf, {"region": "eu"}, every="1d")
        again = await engine.schedule(wf, {"region": "eu"}, every="1d")  # same: a no-op
        assert again.key == daily.key == "report"
        with pytest.raises(ConfigError, match="different input") as caught:
            await engine.schedule(wf, {"region": "us"}, every="1d")
        assert caught.value.option == "key"
        with pytest.raises(ConfigError, match="different recurrence"):
            await engine.schedule(wf, {"region": "eu"}, every="1h")
        stored = {s.key: s.input for s in await engine.list_schedules()}
        assert stored == {"report": {"region": "eu"}}  # the refused calls wrote nothing
        # One key each keeps both; the same key again is a deliberate update.
        await engine.schedule(wf, {"region": "us"}, every="1d", key="report-us")
        await engine.schedule(wf, {"region": "us"}, every="1d", key="report")
        stored = {s.key: s.input for s in await engine.list_schedules()}
        assert stored == {"report": {"region": "us"}, "report-us": {"region": "us"}}
    async with make_engine(db.connect(), wf, worker=False) as redeployed:
        # A new process whose code schedules it differently updates it.
        updated = await redeployed.schedule(wf, {"region": "ap"}, every="1h")
        assert updated.key == "report"
        assert updated.every == timedelta(hours=1)
        assert {s.key: s.input for s in await redeployed.list_schedules()}["report"] == {
            "region": "ap"
        }


# -- on_error ------------------------------------------------------------------------------


class BrokenMetrics:
    @hookimpl
    def reflow_run_completed(self, event: RunCompleted) -> None:
        raise ConnectionError("metrics endpoint down")


@pytest.mark.allow_error_logs
async def test_a_failing_hook_and_a_failing_handler_reach_on_error_as_hook_errors(
    db: Database,
) -> None:
    seen: list[HookError] = []

    async def on_error(error: HookError) -> None:
        await asyncio.sleep(0)
        seen.append(error)

    def bad_handler(ctx: FailureContext[Any]) -> None:
        raise RuntimeError("compensation broke")

    ok = workflow("fine").step("a", lambda ctx: "A")
    bad = _failing_workflow("broken-handler", bad_handler)
    async with make_engine(
        db.connect(), ok, bad, plugins=[BrokenMetrics()], on_error=on_error
    ) as engine:
        done = await engine.enqueue(ok)
        failed = await engine.enqueue(bad)
        assert await engine.result(done.id, timeout=10) == "A"  # the run is unaffected
        with pytest.raises(RunFailedError):
            await engine.result(failed.id, timeout=10)
        await wait_until(lambda: len(seen) >= 2, timeout=10, what="two reports")
    by_where = {e.where: e for e in seen}
    hook = by_where["reflow_run_completed hook"]
    assert isinstance(hook.original, ConnectionError)
    assert hook.__cause__ is hook.original
    assert hook.run_id == done.id
    assert hook.code == "hook_error"
    handler = by_where["on_failure handler of workflow 'broken-handler'"]
    assert isinstance(handler.original, RuntimeError)
    assert "compensation broke" in str(handler)


@pytest.mark.allow_error_logs
async def test_an_on_error_that_raises_is_only_logged(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    def on_error(error: HookError) -> None:
        raise KeyError("the error sink is broken too")

    ok = workflow("fine-too").step("a", lambda ctx: "A")
    async with make_engine(
        db.connect(), ok, plugins=[BrokenMetrics()], on_error=on_error
    ) as engine:
        run = await engine.enqueue(ok)
        assert await engine.result(run.id, timeout=10) == "A"
        await wait_until(
            lambda: any("on_error failed" in r.getMessage() for r in caplog.records),
            what="the log line",
        )


def test_on_error_must_be_callable() -> None:
    with pytest.raises(ConfigError, match="on_error must be callable"):
        Engine(storage="memory://", on_error="print")  # type: ignore[arg-type]


@pytest.mark.allow_error_logs
async def test_a_stream_consumer_that_raised_does_not_hold_the_engine_back(
    db: Database,
) -> None:
    seen: list[HookError] = []
    wf = workflow("streamed").step("a", lambda ctx: 1).step("b", lambda ctx: 2)
    async with make_engine(db.connect(), wf, on_error=seen.append) as engine:
        stream = engine.stream(buffer_size=1)

        async def consume() -> None:
            async for _event in stream:
                raise ValueError("consumer bug")

        consumer = asyncio.create_task(consume())
        runs = [await engine.enqueue(wf) for _ in range(3)]
        for run in runs:  # with the consumer gone and its stream full, runs still finish
            assert await engine.result(run.id, timeout=10) == 2
        with pytest.raises(ValueError, match="consumer bug"):
            await consumer
    assert len(seen) == 1
    assert seen[0].where == "stream consumer"
    assert isinstance(seen[0].original, ValueError)


# -- retention ------------------------------------------------------------------------------


async def test_a_worker_with_retention_purges_finished_runs_and_nothing_else(
    db: Database,
) -> None:
    wf = workflow("kept-briefly").step("a", lambda ctx: ctx.input)
    never = workflow("nobody-runs-this").step("a", lambda ctx: 1)
    async with make_engine(db.connect(), wf, never, worker=False) as client:
        waiting = await client.enqueue(never, idempotency_key="stays")
    async with make_engine(db.connect(), wf, retention="0.3s") as engine:
        done = [await engine.enqueue(wf, i, idempotency_key=f"k{i}") for i in range(5)]
        for run in done:
            await engine.result(run.id, timeout=10)

        async def all_gone() -> bool:
            return all([await engine.get_run(r.id) is None for r in done])

        await wait_until(all_gone, timeout=15, what="the finished runs to be purged")
        assert (await engine.get_run(waiting.id)) is not None  # unfinished: untouched
        # The idempotency keys of purged runs are free again.
        again = await engine.enqueue(wf, 0, idempotency_key="k0")
        assert again.id != done[0].id


def test_retention_must_be_a_positive_duration() -> None:
    with pytest.raises(ConfigError) as caught:
        Engine(storage="memory://", retention="0s")
    assert caught.value.option == "retention"


async def test_retention_passes_are_bounded(
    db: Database, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reflow_core.engine import worker as worker_module

    wf = workflow("bounded-purge").step("a", lambda ctx: 1)
    storage = db.connect()
    async with make_engine(storage, wf) as engine:
        runs = [await engine.enqueue(wf) for _ in range(7)]
        for run in runs:
            await engine.result(run.id, timeout=10)
    monkeypatch.setattr(worker_module, "_PURGE_LIMIT", 3)
    caplog.set_level(logging.INFO, logger="reflow.engine")
    async with make_engine(storage, wf, retention=timedelta(milliseconds=100)) as engine:

        async def all_purged() -> bool:
            return all([await engine.get_run(r.id) is None for r in runs])

        def counts() -> list[int]:
            return [
                int(r.getMessage().split()[1])
                for r in caplog.records
                if r.getMessage().startswith("purged")
            ]

        await wait_until(all_purged, timeout=15, what="all purged")
        # A pass logs what it deleted just after deleting it.
        await wait_until(lambda: sum(counts()) >= 7, timeout=5, what="the passes' log lines")
    assert sum(counts()) == 7
    assert max(counts()) <= 3  # no pass deleted more than its bound
