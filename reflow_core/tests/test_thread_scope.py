"""``reflow_thread_scope``: a plugin's context manager entered in the worker
thread itself, around each call of a plain ``def`` step, branch or map item
and of an ``on_failure`` handler; never around a coroutine."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from reflow_core import (
    Engine,
    FailureContext,
    MemoryStorage,
    RunFailedError,
    StepContext,
    workflow,
)
from reflow_core.hookspecs import hookimpl
from reflow_core.tracing import StepScope


class Recorder:
    """Records (event, thread, step) for each enter and exit of its scope."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str | None]] = []

    @hookimpl
    def reflow_thread_scope(
        self, scope: StepScope | None
    ) -> contextlib.AbstractContextManager[None]:
        return self._scope(scope)

    @contextlib.contextmanager
    def _scope(self, scope: StepScope | None) -> Iterator[None]:
        name = None if scope is None else scope.step
        self.seen.append(("enter", threading.get_ident(), name))
        try:
            yield
        finally:
            self.seen.append(("exit", threading.get_ident(), name))


ran_in: dict[str, int] = {}


def plain(ctx: StepContext[Any, Any]) -> str:
    ran_in["plain"] = threading.get_ident()
    return "plain"


async def coroutine(ctx: StepContext[Any, Any]) -> str:
    return "coroutine"


def item(ctx: StepContext[Any, int]) -> int:
    return ctx.prev * 2


def broken(ctx: StepContext[Any, Any]) -> None:
    raise ValueError("no")


def handler(ctx: FailureContext[Any]) -> None:
    ran_in["handler"] = threading.get_ident()


async def test_the_scope_is_entered_in_the_thread_that_runs_the_step() -> None:
    recorder = Recorder()
    flows = [
        workflow("flow")
        .step("plain", plain)
        .step("coroutine", coroutine)
        .map("double", lambda ctx: [1, 2], item),
        workflow("failing").step("broken", broken).on_failure(handler),
    ]
    async with Engine(
        storage=MemoryStorage(), workflows=flows, plugins=[recorder], load_entry_points=False
    ) as engine:
        run = await engine.enqueue("flow")
        assert await engine.result(run.id, timeout="10s") == [2, 4]
        failing = await engine.enqueue("failing")
        with pytest.raises(RunFailedError):
            await engine.result(failing.id, timeout="10s")

    plain_scope = [e for e in recorder.seen if e[2] == "plain"]
    assert plain_scope == [
        ("enter", ran_in["plain"], "plain"),
        ("exit", ran_in["plain"], "plain"),
    ]
    # Never on the event loop's thread, never around a coroutine.
    assert all(thread != threading.get_ident() for _, thread, _ in recorder.seen)
    assert not any(e[2] == "coroutine" for e in recorder.seen)
    assert sorted(e[2] for e in recorder.seen if e[0] == "enter" and e[2] and "[" in e[2]) == [
        "double[0]",
        "double[1]",
    ]
    # The on_failure handler: no step scope.
    assert ("enter", ran_in["handler"], None) in recorder.seen
    assert ("exit", ran_in["handler"], None) in recorder.seen
