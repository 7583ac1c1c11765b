"""The engine rides out transient storage failures on its fenced writes.

The storage under test is a real backend; a thin wrapper makes some of its
writes fail with ``StorageError`` before they reach it, as a dropped
connection would.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from reflow_core import Engine, StepContext, workflow
from reflow_core.errors import StorageError
from reflow_core.storage import Storage


class FlakyWrites:
    """Delegates to a real storage; the first ``failures`` calls of each named
    operation raise ``StorageError`` without reaching it."""

    def __init__(self, inner: Storage, failures: int, operations: set[str]) -> None:
        self._inner = inner
        self._left = dict.fromkeys(operations, failures)
        self.failed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if name not in self._left:
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self._left[name] > 0:
                self._left[name] -= 1
                self.failed.append(name)
                raise StorageError("connection dropped", operation=name, backend="test")
            return await target(*args, **kwargs)

        return call


async def double(ctx: StepContext[Any, Any]) -> int:
    return int(ctx.prev) * 2


flow = workflow("faults").step("a", double).step("b", double).step("c", double)


async def test_transient_write_failures_are_retried_without_a_reclaim(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyWrites(storage, failures=2, operations={"save_step_result", "finish_run"})
    engine = Engine(storage=flaky, workflows=[flow], close_storage=False)  # type: ignore[arg-type]
    try:
        run = await engine.enqueue(flow, 1)
        with caplog.at_level(logging.WARNING, logger="reflow.engine"):
            assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    finally:
        await engine.stop(timeout=0)
    assert done.status == "completed"
    assert done.output == 8
    assert (done.attempts, done.reclaims) == (1, 0)
    assert flaky.failed == ["save_step_result"] * 2 + ["finish_run"] * 2
    assert sum("retry" in r.getMessage() for r in caplog.records) == 4


@pytest.mark.allow_error_logs
async def test_a_write_that_keeps_failing_leaves_the_run_to_be_reclaimed(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyWrites(storage, failures=100, operations={"save_step_result"})
    engine = Engine(storage=flaky, workflows=[flow], close_storage=False)  # type: ignore[arg-type]
    try:
        run = await engine.enqueue(flow, 1)
        with caplog.at_level(logging.WARNING, logger="reflow.engine"):
            assert await engine.tick() == 1
        stuck = await engine.get_run_status(run.id)
    finally:
        await engine.stop(timeout=0)
    # Never marked failed for a storage outage: it stays leased until the
    # lease lapses and another worker reclaims it.
    assert stuck.status == "running"
    assert stuck.error is None
    assert stuck.steps == {}
    assert flaky.failed == ["save_step_result"] * 4
    assert any("connection dropped" in r.getMessage() for r in caplog.records)
