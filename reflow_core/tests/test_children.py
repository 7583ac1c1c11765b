"""Child runs: ``ctx.start_child(...)`` and ``.child(...)``, on every backend.

What a backend stores (the link, the wake-up of a waiting parent, the cancel
cascade) is the conformance suite's business; these check the engine's side:
a parent waits without a worker slot, a step run again finds its children
instead of starting new ones, a child's failure fails the step and a retry
starts a new child, cancelling reaches the whole tree, deadlines are
inherited, and the links show both ways.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from reflow_core import (
    ChildFailedError,
    ConfigError,
    Engine,
    Retry,
    RunFailedError,
    StepContext,
    workflow,
)
from reflow_core.storage import CHILDREN_WAIT_PREFIX, Storage

LABEL = workflow("label", input=dict).step("print", lambda ctx: f"label-{ctx.input['order']}")


def _engine(storage: Storage, *workflows: Any, **options: Any) -> Engine:
    options.setdefault("close_storage", False)
    options.setdefault("poll_interval", "100ms")
    return Engine(storage=storage, workflows=list(workflows), load_entry_points=False, **options)


async def test_a_step_awaits_its_children_without_holding_a_slot(storage: Storage) -> None:
    """With one slot, the parent must let go of it for its children to run
    on the same worker; the step's handler runs again when they have ended,
    and finds the same children."""
    calls: list[int] = []

    async def ship(ctx: StepContext[dict[str, Any], Any]) -> list[str]:
        calls.append(ctx.attempt)
        handles = [await ctx.start_child(LABEL, {"order": n}) for n in ctx.input["orders"]]
        return [await handle.result() for handle in handles]

    batch = workflow("batch", input=dict).step("ship", ship)
    async with _engine(storage, batch, LABEL, concurrency=1) as engine:
        run = await engine.enqueue(batch, {"orders": [1, 2, 3]})
        assert await engine.result(run.id, timeout=15) == ["label-1", "label-2", "label-3"]
        status = await engine.get_run_status(run.id)
    # Started once, resumed once when the three had ended: never a fourth child.
    assert calls == [1, 1]
    assert [child.id for child in status.children] == [f"{run.id}:ship:1:{n}" for n in range(3)]
    assert {(child.workflow, child.step, child.status) for child in status.children} == {
        ("label", "ship", "completed")
    }
    children = await storage.list_children(run.id)
    assert len(children) == 3


async def test_the_links_show_both_ways(storage: Storage) -> None:
    order = workflow("order", input=dict).child(
        "ship", LABEL, lambda ctx: {"order": ctx.input["id"]}
    )
    async with _engine(storage, order, LABEL) as engine:
        run = await engine.enqueue(order, {"id": 7})
        assert await engine.result(run.id, timeout=15) == "label-7"
        parent = await engine.get_run_status(run.id)
        (link,) = parent.children
        child = await engine.get_run_status(link.id)
    assert parent.parent_id is None
    assert parent.parent_step is None
    assert (link.workflow, link.step, link.status) == ("label", "ship", "completed")
    assert (child.parent_id, child.parent_step) == (run.id, "ship")
    assert child.output == "label-7"
    assert child.children == ()
    assert parent.steps["ship"].status == "completed"
    assert parent.steps["ship"].output == "label-7"


async def test_the_parent_is_waiting_while_its_child_runs(db: Any) -> None:
    storage = db.connect()
    release = asyncio.Event()

    async def slow(ctx: StepContext[Any, Any]) -> str:
        await release.wait()
        return "done"

    child_wf = workflow("slow-child").step("work", slow)
    parent_wf = workflow("parent").child("wait", child_wf)
    async with _engine(storage, parent_wf, child_wf) as engine:
        run = await engine.enqueue(parent_wf, None)
        for _ in range(200):
            record = await storage.get_run(run.id)
            assert record is not None
            if record.status == "waiting":
                break
            await asyncio.sleep(0.02)
        assert record.status == "waiting"
        assert record.waiting_for == CHILDREN_WAIT_PREFIX + "wait"
        assert record.lease_expires_at is None
        steps = await storage.get_step_results(run.id)
        assert (steps["wait"].status, steps["wait"].attempts) == ("waiting", 1)
        release.set()
        assert await engine.result(run.id, timeout=15) == "done"


async def test_a_failed_child_fails_the_step_and_a_retry_starts_a_new_child(
    storage: Storage,
) -> None:
    def flaky(ctx: StepContext[dict[str, Any], Any]) -> str:
        if ctx.input["attempt"] == 1:
            raise ValueError("printer jammed")
        return "printed"

    printer = workflow("printer", input=dict).step("print", flaky)

    async def print_it(ctx: StepContext[Any, Any]) -> str:
        handle = await ctx.start_child(printer, {"attempt": ctx.attempt})
        return await handle.result()

    parent = workflow("print-job").step(
        "print", print_it, retry=Retry(max_attempts=2, initial_delay=0)
    )
    async with _engine(storage, parent, printer) as engine:
        run = await engine.enqueue(parent, None)
        assert await engine.result(run.id, timeout=15) == "printed"
        status = await engine.get_run_status(run.id)
    assert [(c.id.rsplit(":", 2)[-2:], c.status) for c in status.children] == [
        (["1", "0"], "failed"),
        (["2", "0"], "completed"),
    ]
    assert status.steps["print"].attempts == 2


async def test_a_failed_child_without_retries_fails_the_parent_naming_it(
    storage: Storage,
) -> None:
    def broken(ctx: StepContext[Any, Any]) -> None:
        raise KeyError("sku")

    child_wf = workflow("broken-child").step("pick", broken)
    parent = workflow("broken-parent").child("fulfil", child_wf)
    async with _engine(storage, parent, child_wf) as engine:
        run = await engine.enqueue(parent, None)
        with pytest.raises(RunFailedError) as caught:
            await engine.result(run.id, timeout=15)
        status = await engine.get_run_status(run.id)
    error = caught.value
    assert error.step == "fulfil"
    assert error.error_type == "reflow_core.errors.ChildFailedError"
    (child,) = status.children
    assert child.status == "failed"
    assert child.id in str(error)
    assert "broken-child" in str(error)
    assert "at step 'pick'" in str(error)
    assert "KeyError" in str(error)
    # The child's own traceback travels with the parent's failure.
    assert error.traceback is not None
    assert "broken" in error.traceback


async def test_child_failed_error_is_what_the_handler_sees(storage: Storage) -> None:
    child_wf = workflow("refusing").step("no", lambda ctx: 1 / 0)
    seen: list[BaseException] = []

    async def careful(ctx: StepContext[Any, Any]) -> str:
        handle = await ctx.start_child(child_wf, None)
        try:
            return await handle.result()
        except ChildFailedError as exc:
            seen.append(exc)
            return "fallback"

    parent = workflow("careful").step("try", careful)
    async with _engine(storage, parent, child_wf) as engine:
        run = await engine.enqueue(parent, None)
        assert await engine.result(run.id, timeout=15) == "fallback"
    (error,) = seen
    assert isinstance(error, ChildFailedError)
    assert (error.workflow, error.status) == ("refusing", "failed")
    assert error.info is not None
    assert error.info["type"] == "builtins.ZeroDivisionError"
    assert error.child_run_id == f"{run.id}:try:1:0"


async def test_cancelling_a_parent_cancels_its_children_and_theirs(storage: Storage) -> None:
    started = asyncio.Event()
    interrupted = asyncio.Event()

    async def forever(ctx: StepContext[Any, Any]) -> None:
        started.set()
        try:
            await ctx.signal.wait_async()
        finally:
            interrupted.set()

    leaf = workflow("leaf").step("spin", forever)
    middle = workflow("middle").child("leaf", leaf)
    root = workflow("root").child("middle", middle)
    async with _engine(storage, root, middle, leaf) as engine:
        run = await engine.enqueue(root, None)
        await asyncio.wait_for(started.wait(), 15)
        (mid,) = (await engine.get_run_status(run.id)).children
        (bottom,) = (await engine.get_run_status(mid.id)).children
        assert await engine.cancel(run.id)
        for run_id in (run.id, mid.id, bottom.id):
            record = await storage.get_run(run_id)
            assert record is not None
            assert record.status == "cancelled", run_id
        # The grandchild's step runs in this engine: it is interrupted at
        # once, not at its next heartbeat (a third of the 30 s lease away).
        await asyncio.wait_for(interrupted.wait(), 3)
        assert not await engine.cancel(mid.id)


async def test_a_child_never_outlives_its_parents_deadline(storage: Storage) -> None:
    child_wf = workflow("slow", timeout="1h").step("wait", lambda ctx: None)

    async def start(ctx: StepContext[Any, Any]) -> str:
        handle = await ctx.start_child(child_wf, None, timeout="2h")
        return handle.run_id

    parent = workflow("bounded", timeout="10m").step("start", start)
    async with _engine(storage, parent) as engine:
        run = await engine.enqueue(parent, None)
        child_id = await engine.result(run.id, timeout=15)
        record = await storage.get_run(run.id)
        child = await storage.get_run(child_id)
    assert record is not None
    assert child is not None
    assert record.deadline_at is not None
    assert child.deadline_at == record.deadline_at
    assert child.parent_id == run.id


async def test_a_parent_past_its_deadline_fails_while_its_child_runs(storage: Storage) -> None:
    async def forever(ctx: StepContext[Any, Any]) -> None:
        await ctx.signal.wait_async()

    child_wf = workflow("endless").step("spin", forever)
    parent = workflow("impatient", timeout="600ms").child("wait", child_wf)
    async with _engine(storage, parent, child_wf) as engine:
        run = await engine.enqueue(parent, None)
        with pytest.raises(RunFailedError) as caught:
            await engine.result(run.id, timeout=15)
        (child,) = (await engine.get_run_status(run.id)).children
        # The child inherited the deadline: it is stopped at the same time.
        with pytest.raises(RunFailedError) as child_caught:
            await engine.result(child.id, timeout=15)
    assert caught.value.error_code == "deadline_exceeded"
    assert child_caught.value.error_code == "deadline_exceeded"


async def test_a_childs_input_is_validated_before_anything_is_started(storage: Storage) -> None:
    typed = workflow("typed-child", input=int).step("double", lambda ctx: ctx.input * 2)

    async def bad(ctx: StepContext[Any, Any]) -> int:
        handle = await ctx.start_child(typed, "not a number")
        return await handle.result()

    parent = workflow("bad-parent").step("start", bad)
    async with _engine(storage, parent, typed) as engine:
        run = await engine.enqueue(parent, None)
        with pytest.raises(RunFailedError) as caught:
            await engine.result(run.id, timeout=15)
        assert await storage.list_children(run.id) == []
    assert caught.value.error_type == "reflow_core.errors.ValidationError"


async def test_start_child_is_refused_in_a_parallel_branch(storage: Storage) -> None:
    async def branch(ctx: StepContext[Any, Any]) -> str:
        handle = await ctx.start_child(LABEL, {"order": 1})
        return await handle.result()

    parent = workflow("fan").parallel({"a": branch, "b": lambda ctx: 2})
    async with _engine(storage, parent, LABEL) as engine:
        run = await engine.enqueue(parent, None)
        with pytest.raises(RunFailedError) as caught:
            await engine.result(run.id, timeout=15)
    assert caught.value.error_type == "reflow_core.errors.ConfigError"
    assert "not available in a parallel branch or map item" in str(caught.value)


async def test_a_delayed_child_starts_later(storage: Storage) -> None:
    async def later(ctx: StepContext[Any, Any]) -> str:
        handle = await ctx.start_child(LABEL, {"order": 3}, delay="300ms")
        return await handle.result()

    parent = workflow("later").step("start", later)
    async with _engine(storage, parent, LABEL) as engine:
        run = await engine.enqueue(parent, None)
        assert await engine.result(run.id, timeout=15) == "label-3"
        (child,) = await storage.list_children(run.id)
    assert child.created_at + timedelta(milliseconds=300) <= child.updated_at


def test_child_is_checked_when_the_workflow_is_defined() -> None:
    base = workflow("checked")
    with pytest.raises(ConfigError, match="must be a Workflow"):
        base.child("c", "label")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="input must be a callable"):
        base.child("c", LABEL, {"order": 1})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout"):
        base.child("c", LABEL, timeout="-1s")


async def test_children_started_together_get_ids_in_the_order_they_were_asked_for(
    storage: Storage,
) -> None:
    entries: list[int] = []

    async def ship(ctx: StepContext[Any, Any]) -> list[str]:
        entries.append(ctx.attempt)
        handles = await asyncio.gather(*(ctx.start_child(LABEL, {"order": n}) for n in range(6)))
        return [await handle.result() for handle in handles]

    batch = workflow("together").step("ship", ship)
    async with _engine(storage, batch, LABEL) as engine:
        run = await engine.enqueue(batch)
        assert await engine.result(run.id, timeout=15) == [f"label-{n}" for n in range(6)]
        children = await storage.list_children(run.id)
    assert entries == [1, 1]
    by_id = {child.id: child for child in children}
    assert len(by_id) == 6
    for n in range(6):
        child = by_id[f"{run.id}:ship:1:{n}"]
        assert child.output == f'"label-{n}"'
