"""``.map()``: a fan-out over a list known only at run time, on every backend.

The items are saved before the first one runs; each item is saved as step
``name[i]`` as it ends, so after a crash only unfinished items run again; the
results come back in the order of the items.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from typing import Any

import pytest

from reflow_core import (
    ConfigError,
    DuplicateStepError,
    Engine,
    MapTooLargeError,
    Retry,
    RunFailedError,
    StepContext,
    Workflow,
    workflow,
)
from reflow_core.storage import Storage


def _engine(storage: Storage, *workflows: Workflow[Any, Any], **options: Any) -> Engine:
    options.setdefault("close_storage", False)
    options.setdefault("load_entry_points", False)
    options.setdefault("poll_interval", "50ms")
    return Engine(storage=storage, workflows=workflows, **options)


async def test_items_from_the_input_run_at_most_concurrency_at_once_and_come_back_in_order(
    storage: Storage,
) -> None:
    running = 0
    most = 0

    async def square(ctx: StepContext[Any, int]) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01 * (ctx.prev % 3))  # finish out of order
        running -= 1
        return ctx.prev * ctx.prev

    wf = (
        workflow("squares")
        .map("square", lambda ctx: ctx.input["numbers"], square, concurrency=3)
        .step("total", lambda ctx: sum(ctx.prev))
    )
    async with _engine(storage, wf) as engine:
        run = await engine.enqueue(wf, {"numbers": list(range(10))})
        assert await engine.result(run.id, timeout=10) == sum(n * n for n in range(10))
        done = await engine.get_run_status(run.id)
    assert most == 3
    assert done.steps["square[7]"].output == 49
    assert done.steps["square[7]"].status == "completed"
    saved = await storage.get_step_results(run.id)
    assert saved["reflow:map:square"].output == "[0,1,2,3,4,5,6,7,8,9]"


async def test_items_from_an_earlier_step_with_a_plain_def_handler(storage: Storage) -> None:
    wf = (
        workflow("pages")
        .step("list", lambda ctx: ["a", "bb", "ccc"])
        .map("measure", lambda ctx: ctx.prev, lambda ctx: {"page": ctx.item, "len": len(ctx.prev)})
    )
    async with _engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.result(run.id, timeout=10) == [
            {"page": "a", "len": 1},
            {"page": "bb", "len": 2},
            {"page": "ccc", "len": 3},
        ]
        empty = (
            workflow("nothing")
            .map("none", lambda ctx: [], lambda ctx: 1)
            .step("after", lambda ctx: ctx.prev)
        )
        engine.register(empty)
    async with _engine(storage, empty) as engine:
        run = await engine.enqueue(empty)
        assert await engine.result(run.id, timeout=10) == []


async def test_a_run_stopped_mid_map_runs_only_its_unfinished_items_again(
    storage: Storage,
) -> None:
    finished: Counter[int] = Counter()
    release = asyncio.Event()

    async def fetch(ctx: StepContext[Any, int]) -> int:
        if ctx.prev >= 4:
            await release.wait()  # the first worker stops while these hang
        finished[ctx.prev] += 1
        return ctx.prev * 10

    items_calls = 0

    def items(ctx: StepContext[Any, Any]) -> list[int]:
        nonlocal items_calls
        items_calls += 1
        return list(range(8))

    wf = workflow("resumable-map").map("fetch", items, fetch, concurrency=8)
    async with _engine(storage, wf) as first:
        run = await first.enqueue(wf)

        async def four_saved() -> bool:
            steps = await storage.get_step_results(run.id)
            return sum(1 for name in steps if name.startswith("fetch[")) == 4

        for _ in range(500):
            if await four_saved():
                break
            await asyncio.sleep(0.01)
        assert await four_saved()
        await first.stop(timeout=0)  # hands the run back mid-map
    release.set()
    async with _engine(storage, wf) as second:
        assert await second.result(run.id, timeout=10) == [n * 10 for n in range(8)]
    assert items_calls == 1  # the saved list was used again
    assert [finished[n] for n in range(4)] == [1, 1, 1, 1]  # saved items never ran again
    assert all(finished[n] >= 1 for n in range(4, 8))


async def test_an_item_that_fails_for_good_cancels_the_others_and_fails_the_run(
    storage: Storage,
) -> None:
    attempts: Counter[int] = Counter()
    cancelled: list[int] = []

    async def work(ctx: StepContext[Any, int]) -> int:
        attempts[ctx.prev] += 1
        if ctx.prev == 2:
            raise ValueError("item 2 is broken")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.prev)
            raise
        return ctx.prev

    wf = workflow("failing-map").map(
        "work",
        lambda ctx: [0, 1, 2, 3],
        work,
        concurrency=4,
        retry=Retry(max_attempts=2, initial_delay="10ms"),
    )
    async with _engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout=10)
    assert info.value.step == "work[2]"
    assert "item 2 is broken" in str(info.value)
    assert attempts[2] == 2  # retried per item
    assert sorted(cancelled) == [0, 1, 3]


async def test_items_failing_at_once_fail_the_run_and_lose_no_exception(
    storage: Storage,
) -> None:
    """Every item fails at the same moment: the run fails on one of them,
    and no other item's exception is left for asyncio to report as never
    retrieved (the autouse check fails a test that logs one)."""
    started = asyncio.Event()
    waiting: list[int] = []

    async def work(ctx: StepContext[Any, int]) -> int:
        waiting.append(ctx.prev)
        if len(waiting) == 4:
            started.set()
        await started.wait()
        raise ValueError(f"item {ctx.prev} is broken")

    wf = workflow("all-failing-map").map("work", lambda ctx: [0, 1, 2, 3], work, concurrency=4)
    async with _engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        with pytest.raises(RunFailedError, match=r"item \d is broken"):
            await engine.result(run.id, timeout=10)
    gc.collect()  # a task whose exception was never retrieved is reported when collected


@pytest.mark.parametrize(
    ("items", "code", "message"),
    [
        (lambda ctx: list(range(6)), "map_too_large", "got 6 items, more than its max_items=5"),
        (lambda ctx: "abc", "step_failed", "items must return a list"),
        (lambda ctx: [object()], "serialization_error", "not plain data"),
        (lambda ctx: 1 / 0, "step_failed", "ZeroDivisionError: division by zero"),
    ],
)
async def test_bad_items_fail_the_run_with_a_clear_error(
    storage: Storage, items: Any, code: str, message: str
) -> None:
    ran: list[Any] = []
    wf = workflow("bad-items").map("m", items, ran.append, max_items=5)
    async with _engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout=10)
    assert info.value.error_code == code
    assert message in str(info.value)
    assert info.value.step == "m"
    assert ran == []
    assert MapTooLargeError.code == "map_too_large"


def test_item_names_cannot_clash_and_options_are_checked() -> None:
    base = workflow("w").map("m", lambda ctx: [], lambda ctx: None)
    with pytest.raises(DuplicateStepError):
        base.step("m[0]", lambda ctx: None)
    with pytest.raises(DuplicateStepError):
        workflow("w").step("x[1]", lambda ctx: None).map("x", lambda ctx: [], lambda ctx: None)
    with pytest.raises(DuplicateStepError):
        base.map("m", lambda ctx: [], lambda ctx: None)
    with pytest.raises(ConfigError, match="concurrency must be a positive int"):
        workflow("w").map("m", lambda ctx: [], lambda ctx: None, concurrency=0)
    with pytest.raises(ConfigError, match="max_items must be a positive int"):
        workflow("w").map("m", lambda ctx: [], lambda ctx: None, max_items=True)
    with pytest.raises(ConfigError, match="items must be a callable"):
        workflow("w").map("m", [1, 2], lambda ctx: None)  # type: ignore[arg-type]


async def test_ctx_item_is_set_only_in_a_map_item(storage: Storage) -> None:
    def outside(ctx: StepContext[Any, Any]) -> Any:
        return ctx.item

    wf = workflow("no-item").step("plain", outside)
    async with _engine(storage, wf) as engine:
        run = await engine.enqueue(wf)
        with pytest.raises(RunFailedError) as caught:
            await engine.result(run.id, timeout=10)
    assert caught.value.error_type == "reflow_core.errors.ConfigError"
    assert "ctx.item is set only in an item of .map()" in str(caught.value)
