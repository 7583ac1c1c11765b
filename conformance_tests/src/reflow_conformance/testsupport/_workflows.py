"""The workflows of the crash worker (see :func:`build`)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from reflow_core import StepContext, Workflow, workflow

from ._log import ExecutionLog

__all__ = ["MAP", "MAP_CONCURRENCY", "MAP_ITEMS", "NAP_SECONDS", "SCENARIOS", "STEPS", "build"]

STEPS = ("reserve", "charge", "ship")
"""The steps of the ``steps`` scenario, in order."""

SCENARIOS = ("steps", "sleep", "wait", "parallel", "complete", "map")
"""The workflows a worker can run (see :func:`build`)."""

NAP_SECONDS = 2.0
"""How long the ``sleep`` scenario sleeps between its steps."""

MAP = "m"
"""The map of the ``map`` scenario: its items are steps ``m[0]``, ``m[1]``, ...,
its list of items the engine record ``reflow:map:m``."""

MAP_ITEMS = 1000
"""How many items the ``map`` scenario maps over (unless the input's ``items`` says)."""

MAP_CONCURRENCY = 50
"""How many items of the ``map`` scenario run at once."""


class _Blocking:
    """When steps block: ``--crash-in STEP`` and ``--block-after K``."""

    def __init__(self, crash_in: str | None, block_after: int | None) -> None:
        self.crash_in = crash_in
        self.block_after = block_after
        self._ran = 0
        self._lock = threading.Lock()
        self._forever = threading.Event()

    def before(self, log: ExecutionLog, ctx: StepContext[Any, Any], first: bool) -> None:
        """Block here, for good, if this step is to be killed in."""
        if ctx.step == self.crash_in:
            log.write("started", run=ctx.run_id, step=ctx.step, attempt=ctx.attempt, prev=ctx.prev)
            self._forever.wait()  # until SIGKILL
        if not first and self.block_after is not None:
            with self._lock:
                blocking = self._ran >= self.block_after
            if blocking:
                log.write("blocked", run=ctx.run_id, step=ctx.step, attempt=ctx.attempt)
                self._forever.wait()  # until SIGKILL

    def ran(self) -> None:
        with self._lock:
            self._ran += 1


def build(
    scenario: str,
    name: str | None = None,
    log: ExecutionLog | None = None,
    *,
    crash_in: str | None = None,
    block_after: int | None = None,
    step_delay: float = 0.0,
) -> Workflow[Any, Any]:
    """The workflow of ``scenario``, named ``name`` (default ``crash-<scenario>``).

    * ``steps``: :data:`STEPS`, each returning ``{"step", "token", "prev"}``.
    * ``sleep``: ``before``, a sleep ``nap`` of :data:`NAP_SECONDS`, ``after`` (``"slept"``).
    * ``wait``: ``before``, a wait for the event ``approval``, ``after`` (``"approved"``).
    * ``parallel``: ``before``, the group ``fan`` of ``fast`` (``"F"``) and
      ``slow`` (``"S"``), ``after`` (``"joined"``).
    * ``complete``: ``check`` completes the run early with ``{"early": prev}``;
      ``never`` never runs.
    * ``map``: the map :data:`MAP` over ``{"i": i, "list": token}`` for ``i`` in
      ``range(input["items"])`` (default :data:`MAP_ITEMS`), ``token`` fresh
      each time the list is computed, which logs a ``ran`` line of step
      ``reflow:map:m``. Each item sleeps 0.5 to 1.5 times ``step_delay`` (so
      that items end out of order), then returns ``{"step": "m[i]", "token":
      token, "prev": item}``; :data:`MAP_CONCURRENCY` run at once. The run's
      output is the list of their results.

    Every step logs to ``log`` (``None`` only where the workflow is just
    registered, as to send an event, and never run).
    """
    blocking = _Blocking(crash_in, block_after)

    def step(label: str, result: Any = None, *, first: bool = False, complete: bool = False) -> Any:
        def handler(ctx: StepContext[Any, Any]) -> Any:
            if log is None:
                raise RuntimeError("this workflow was built without a log to run with")
            if step_delay:
                time.sleep(step_delay)
            blocking.before(log, ctx, first)
            token = uuid.uuid4().hex
            fields = {"run": ctx.run_id, "step": label, "attempt": ctx.attempt, "prev": ctx.prev}
            log.write("ran", token=token, **fields)
            blocking.ran()
            if complete:
                ctx.complete({"early": ctx.prev})
            if scenario == "steps":
                return {"step": label, "token": token, "prev": ctx.prev}
            return {"step": label} if result is None else result

        return handler

    def items(ctx: StepContext[Any, Any]) -> list[dict[str, Any]]:
        if log is None:
            raise RuntimeError("this workflow was built without a log to run with")
        token = uuid.uuid4().hex
        count = ctx.input.get("items", MAP_ITEMS) if isinstance(ctx.input, dict) else MAP_ITEMS
        record = f"reflow:map:{MAP}"
        log.write("ran", token=token, run=ctx.run_id, step=record, attempt=ctx.attempt, prev=None)
        return [{"i": i, "list": token} for i in range(count)]

    async def item(ctx: StepContext[Any, Any]) -> dict[str, Any]:
        if log is None:
            raise RuntimeError("this workflow was built without a log to run with")
        if step_delay:  # 0.5 to 1.5 times step_delay, so that items end out of order
            await asyncio.sleep(step_delay * (0.5 + ctx.prev["i"] * 37 % 100 / 100))
        token = uuid.uuid4().hex
        fields = {"run": ctx.run_id, "step": ctx.step, "attempt": ctx.attempt, "prev": ctx.prev}
        log.write("ran", token=token, **fields)
        return {"step": ctx.step, "token": token, "prev": ctx.prev}

    wf: Any = workflow(name or f"crash-{scenario}")
    built: Workflow[Any, Any]
    if scenario == "steps":
        for index, label in enumerate(STEPS):
            wf = wf.step(label, step(label, first=index == 0))
        built = wf
    elif scenario == "sleep":
        built = (
            wf.step("before", step("before", first=True))
            .sleep("nap", NAP_SECONDS)
            .step("after", step("after", "slept"))
        )
    elif scenario == "wait":
        built = (
            wf.step("before", step("before", first=True))
            .wait_for_event("approval")
            .step("after", step("after", "approved"))
        )
    elif scenario == "parallel":
        built = (
            wf.step("before", step("before", first=True))
            .parallel({"fast": step("fast", "F"), "slow": step("slow", "S")}, name="fan")
            .step("after", step("after", "joined"))
        )
    elif scenario == "complete":
        built = wf.step("check", step("check", first=True, complete=True)).step(
            "never", step("never")
        )
    elif scenario == "map":
        built = wf.map(MAP, items, item, concurrency=MAP_CONCURRENCY)
    else:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    return built
