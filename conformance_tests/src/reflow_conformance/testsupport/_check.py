"""What the workers left in the store, checked against their logs (:func:`check_outcome`)."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from reflow_conformance import promises as P
from reflow_conformance.harness import load_factory, promise
from reflow_core import codec
from reflow_core.storage import NewRun, RunRecord, StepRecord, Storage

from ._log import Execution, Save
from ._workflows import STEPS

T = TypeVar("T")

__all__ = [
    "RUNS_COMPLETE",
    "RUN_ONCE",
    "SAVED_ONCE",
    "STEP_FROM_EXECUTION",
    "Outcome",
    "check_outcome",
    "create_runs",
    "enqueue_runs",
    "read_outcome",
    "read_outcome_at",
]


@dataclass
class Outcome:
    """The runs of one workflow and their steps, once the workers are done."""

    runs: dict[str, RunRecord]
    steps: dict[str, dict[str, StepRecord]]
    inputs: dict[str, Any]
    """The input of every run that should be there, by run id."""


async def create_runs(storage: Storage, workflow: str, count: int) -> dict[str, Any]:
    """Create ``count`` runs of ``workflow`` with the inputs ``{"n": 0}``, ...; id -> input."""
    made: dict[str, Any] = {}
    for first in range(0, count, 50):
        batch = [{"n": n} for n in range(first, min(first + 50, count))]
        results = await asyncio.gather(
            *(storage.create_run(NewRun(workflow, codec.encode(value))) for value in batch)
        )
        made.update((r.run.id, value) for r, value in zip(results, batch, strict=True))
    return made


async def read_outcome(storage: Storage, workflow: str, inputs: dict[str, Any]) -> Outcome:
    """Every run of ``workflow`` in the store, with its steps."""
    runs: dict[str, RunRecord] = {}
    cursor = None
    while True:
        page = await storage.list_runs(workflow=workflow, limit=500, cursor=cursor)
        runs.update((r.id, r) for r in page.runs)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    ids = sorted(runs)
    steps: dict[str, dict[str, StepRecord]] = {}
    for first in range(0, len(ids), 100):
        chunk = ids[first : first + 100]
        found = await asyncio.gather(*(storage.get_step_results(run_id) for run_id in chunk))
        steps.update(zip(chunk, found, strict=True))
    return Outcome(runs, steps, inputs)


def with_storage(target: str, body: Callable[[Storage], Awaitable[T]]) -> T:
    """``body`` on an initialized storage of the store ``target`` names (a
    URL or ``"module:callable"``), from synchronous code; closed after."""

    async def main() -> T:
        storage = load_factory(target).make()
        await storage.initialize()
        try:
            return await body(storage)
        finally:
            await storage.close()

    return asyncio.run(main())


def enqueue_runs(target: str, workflow: str, count: int) -> dict[str, Any]:
    """:func:`create_runs` on the store ``target`` names, from synchronous code."""
    return with_storage(target, lambda s: create_runs(s, workflow, count))


def read_outcome_at(target: str, workflow: str, inputs: dict[str, Any]) -> Outcome:
    """:func:`read_outcome` on the store ``target`` names, from synchronous code."""
    return with_storage(target, lambda s: read_outcome(s, workflow, inputs))


RUNS_COMPLETE = "every run completes, those a killed worker held once their leases lapse"
STEP_FROM_EXECUTION = (
    "a saved step is the output of an execution of that step, given the saved step before it"
)
SAVED_ONCE = "an acknowledged step save is never lost, repeated or replaced by another result"
RUN_ONCE = "a step runs more than once only in a run reclaimed after its lease lapsed"


def _few(items: Collection[Any], limit: int = 10) -> str:
    shown = sorted(items, key=str)[:limit]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{shown}{more}"


def check_outcome(
    outcome: Outcome,
    executions: Sequence[Execution],
    saves: Sequence[Save],
    *,
    steps: Sequence[str] = STEPS,
    may_repeat: Collection[str] | None = None,
) -> set[str]:
    """Check the runs of the ``steps`` scenario against what the workers logged.

    Every run that should be there is, none other, and it completed; each of
    its steps is stored once, completed, with the output of an execution of
    that step that was given the stored step before it (the run's input for
    the first); the run's output is its last step's. Every save the store
    acknowledged is the result in place, and no (run, step) was acknowledged
    twice. A run nobody reclaimed was claimed once and ran each step once.
    With ``may_repeat``, a step ran more than once only in those runs.

    Returns the runs in which some step ran more than once.
    """
    runs = outcome.runs
    lost = set(outcome.inputs) - set(runs)
    extra = set(runs) - set(outcome.inputs)
    promise(
        not lost and not extra,
        P.NO_LOST_RUNS,
        f"runs were lost ({len(lost)}: {_few(lost)}) or appeared ({len(extra)}: {_few(extra)})",
    )
    unfinished = {run_id: r.status for run_id, r in runs.items() if r.status != "completed"}
    promise(not unfinished, RUNS_COMPLETE, f"not completed: {_few(unfinished.items())}")

    by_step: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for ex in executions:
        by_step[ex.run, ex.step].append(ex)
    tokens = Counter(ex.token for ex in executions if ex.token is not None)
    twice = [token for token, n in tokens.items() if n > 1]
    assert not twice, f"the log is corrupt: tokens logged twice: {twice[:5]}"
    acked: dict[tuple[str, str], list[str | None]] = defaultdict(list)
    for save in saves:
        if save.ok:
            acked[save.run, save.step].append(save.token)

    for run_id, record in runs.items():
        stored = outcome.steps.get(run_id, {})
        promise(
            set(stored) == set(steps),
            RUNS_COMPLETE,
            f"{run_id}: steps stored {sorted(stored)}, expected {sorted(steps)}",
        )
        prev: Any = outcome.inputs[run_id]
        for name in steps:
            step = stored[name]
            where = f"{run_id} step {name!r}"
            promise(step.status == "completed", RUNS_COMPLETE, f"{where}: {step}")
            value = codec.decode(step.output or "null")
            ran = [ex.token for ex in by_step[run_id, name] if ex.kind == "ran"]
            promise(
                isinstance(value, dict) and value.get("step") == name and value.get("token") in ran,
                STEP_FROM_EXECUTION,
                f"{where}: stored {value!r}, executions returned tokens {ran}",
            )
            promise(
                value.get("prev") == prev,
                STEP_FROM_EXECUTION,
                f"{where}: was given {value.get('prev')!r}, the stored step before it is {prev!r}",
            )
            mine = acked[run_id, name]
            promise(
                set(mine) <= {value["token"]} and len(mine) <= 1,
                SAVED_ONCE,
                f"{where}: stored token {value['token']}, saves acknowledged with {mine}",
            )
            prev = value
        output = None if record.output is None else codec.decode(record.output)
        promise(
            output == prev,
            P.FINISH_ATOMIC,
            f"{run_id}: output {output!r}, its last step's {prev!r}",
        )
        if record.reclaims == 0:
            counts = {name: len(by_step[run_id, name]) for name in steps}
            promise(
                record.attempts == 1 and set(counts.values()) == {1},
                RUN_ONCE,
                f"{run_id}: never reclaimed, yet claimed {record.attempts} times and its steps "
                f"executed {counts} times",
            )

    strays = {ex.run for ex in executions} | {save.run for save in saves}
    assert strays <= set(runs), f"the workers ran runs not in the store: {_few(strays - set(runs))}"
    repeated = {run for (run, _step), found in by_step.items() if len(found) > 1}
    if may_repeat is not None:
        promise(
            repeated <= set(may_repeat),
            P.ONE_LIVE_LEASE,
            f"steps ran more than once in runs no killed worker held: "
            f"{_few(repeated - set(may_repeat))}",
        )
    return repeated
