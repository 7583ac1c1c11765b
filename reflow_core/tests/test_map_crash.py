"""``.map()`` under a SIGKILL: a real ``reflow worker`` killed mid-fan-out.

The application serves the ``map`` scenario of
:mod:`reflow_conformance.testsupport`: one map over :data:`MAP_ITEMS` items,
:data:`MAP_CONCURRENCY` at once, each item logging a fresh token to the
process's execution log before returning it, and computing the list of items
logging one too; every step save the store acknowledged is logged as well.
So the store and the logs together show which execution each saved item came
from, and that no item saved before the kill ran again.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reflow_conformance.testsupport import (
    MAP,
    MAP_CONCURRENCY,
    MAP_ITEMS,
    RUN_ONCE,
    RUNS_COMPLETE,
    SAVED_ONCE,
    STEP_FROM_EXECUTION,
    AppFleet,
    Execution,
    Outcome,
    Save,
    enqueue_runs,
    now_and_then,
    read_outcome_at,
)
from reflow_core import codec

_APP = textwrap.dedent(
    """
    import os

    from reflow_conformance.testsupport import ExecutionLog, build
    from reflow_conformance.testsupport._worker import _record_saves
    from reflow_core import Engine, open_storage

    def make():
        log = ExecutionLog(os.environ["APP_LOGDIR"])
        fan = build(
            "map",
            os.environ["APP_WORKFLOW"],
            log,
            step_delay=float(os.environ["APP_ITEM_DELAY"]),
        )
        storage = open_storage(os.environ["APP_STORE"])
        _record_saves(storage, log)
        return Engine(
            storage=storage,
            workflows=[fan],
            concurrency=2,
            lease="1s",
            poll_interval="50ms",
            drain_timeout="10s",
            load_entry_points=False,
        )
    """
)

_WORKFLOW = "mapcrash"
_ITEMS_RECORD = f"reflow:map:{MAP}"
_KILL_AFTER = 300
"""The first worker is killed once it has logged this many item saves."""
_VICTIM_DELAY = 0.1
"""Seconds each item takes in the first worker: at most 500 items a second,
so its fan-out lasts 2 s or more and the kill lands in the middle of it."""
_RESCUER_DELAY = 0.005
"""Seconds each item takes in the second worker."""


def _item(index: int) -> str:
    return f"{MAP}[{index}]"


@pytest.fixture
def store(store_url: str) -> str:
    """A storage URL of the test's own, on each real backend."""
    return store_url


class MapFleet(AppFleet):
    """``reflow worker`` processes serving the ``map`` scenario on one store."""

    def __init__(self, tmp_path: Path, store: str) -> None:
        super().__init__(tmp_path, store, module="mapcrash_app", source=_APP, workflow=_WORKFLOW)

    def start_map(self, item_delay: float) -> subprocess.Popen[bytes]:
        return self.start(workflow=_WORKFLOW, item_delay=str(item_delay))

    def items_saved_by(self, proc: subprocess.Popen[bytes]) -> int:
        """How many item saves ``proc`` has logged as acknowledged."""
        return sum(
            1
            for line in self.workers.lines(proc.pid)
            if line["kind"] == "saved" and line["step"].startswith(f"{MAP}[")
        )


@pytest.fixture
def fleet(tmp_path: Path, store: str) -> Iterator[MapFleet]:
    made = MapFleet(tmp_path, store)
    try:
        yield made
    finally:
        made.cleanup()


def _check_map(
    outcome: Outcome,
    at_kill: Outcome,
    executions: list[Execution],
    saves: list[Save],
    victim: int,
) -> set[str]:
    """Check the run of the ``map`` scenario against what the workers logged
    (as :func:`~reflow_conformance.testsupport.check_outcome` does for the
    ``steps`` scenario), and against the store as the victim left it.

    Returns the items that ran more than once.
    """
    ((run_id, record),) = outcome.runs.items()
    assert record.status == "completed", f"{RUNS_COMPLETE}: {record}"
    stored = outcome.steps[run_id]
    expected = {_ITEMS_RECORD, *(_item(i) for i in range(MAP_ITEMS))}
    assert set(stored) == expected, (
        f"{RUNS_COMPLETE}: missing {sorted(expected - set(stored))[:10]}, "
        f"unexpected {sorted(set(stored) - expected)[:10]}"
    )
    tokens = Counter(ex.token for ex in executions if ex.token is not None)
    assert all(n == 1 for n in tokens.values()), "the log is corrupt: a token logged twice"
    by_step: dict[str, list[Execution]] = defaultdict(list)
    for ex in executions:
        assert ex.run == run_id, f"the workers ran a run not in the store: {ex}"
        assert ex.kind == "ran", ex
        by_step[ex.step].append(ex)
    acked: dict[str, list[str | None]] = defaultdict(list)
    for save in saves:
        assert save.run == run_id, f"the workers saved to a run not in the store: {save}"
        if save.ok:
            acked[save.step].append(save.token)

    # The list of items: computed once, by the victim, and saved once.
    listed = by_step[_ITEMS_RECORD]
    assert [ex.pid for ex in listed] == [victim], f"{RUN_ONCE}: the items were computed {listed}"
    items = codec.decode(stored[_ITEMS_RECORD].output or "null")
    assert items == [{"i": i, "list": listed[0].token} for i in range(MAP_ITEMS)], (
        f"{STEP_FROM_EXECUTION}: the saved items are not the list computed by {listed[0]}"
    )
    assert len(acked[_ITEMS_RECORD]) <= 1, f"{SAVED_ONCE}: {acked[_ITEMS_RECORD]}"
    assert at_kill.steps[run_id][_ITEMS_RECORD] == stored[_ITEMS_RECORD], SAVED_ONCE

    # Every item: saved once, the output of one real execution, given its item.
    values: list[Any] = []
    for index in range(MAP_ITEMS):
        name = _item(index)
        step = stored[name]
        assert step.status == "completed", f"{RUNS_COMPLETE}: {step}"
        value = codec.decode(step.output or "null")
        ran = [ex.token for ex in by_step[name]]
        where = f"{name}: stored {value!r}, executions returned {ran}"
        assert isinstance(value, dict), f"{STEP_FROM_EXECUTION}: {where}"
        assert value.get("step") == name, f"{STEP_FROM_EXECUTION}: {where}"
        assert value.get("token") in ran, f"{STEP_FROM_EXECUTION}: {where}"
        assert value.get("prev") == items[index], f"{STEP_FROM_EXECUTION}: {where}"
        mine = acked[name]
        assert set(mine) <= {value["token"]}, f"{SAVED_ONCE}: {where}, acknowledged {mine}"
        assert len(mine) <= 1, f"{SAVED_ONCE}: {where}, acknowledged {mine}"
        values.append(value)
    output = codec.decode(record.output or "null")
    assert output == values, "the run's output is not its items' results in the order of the items"

    # What the victim saved before the kill stayed, and never ran again.
    saved_at_kill = {
        name: step for name, step in at_kill.steps[run_id].items() if name.startswith(f"{MAP}[")
    }
    for name, step in saved_at_kill.items():
        assert stored[name] == step, f"{SAVED_ONCE}: {name} was {step}, is now {stored[name]}"
        assert [ex.pid for ex in by_step[name]] == [victim], (
            f"{RUN_ONCE}: {name}, saved before the kill, ran again: {by_step[name]}"
        )
    acked_by_victim = {s.step for s in saves if s.ok and s.pid == victim}
    lost = acked_by_victim - set(at_kill.steps[run_id])
    assert not lost, f"{SAVED_ONCE}: acknowledged, then lost: {sorted(lost)}"

    # Only items in flight at the kill ran twice: once there, once after.
    in_flight = {ex.step for ex in executions if ex.pid == victim} - set(at_kill.steps[run_id])
    assert len(in_flight) <= MAP_CONCURRENCY, f"{len(in_flight)} items ran but were not saved"
    repeated = {name for name, found in by_step.items() if len(found) > 1}
    assert repeated <= in_flight, f"{RUN_ONCE}: ran twice, not in flight: {repeated - in_flight}"
    for name in repeated:  # once in the victim, once in the worker that took the run over
        pids = Counter(ex.pid for ex in by_step[name])
        assert pids[victim] == 1, f"{RUN_ONCE}: {name} ran {by_step[name]}"
        assert len(pids) == 2, f"{RUN_ONCE}: {name} ran {by_step[name]}"
        assert pids.total() == 2, f"{RUN_ONCE}: {name} ran {by_step[name]}"
    return repeated


@pytest.mark.slow
def test_a_worker_killed_mid_map_leaves_only_its_unsaved_items_to_run_again(
    fleet: MapFleet,
) -> None:
    """SIGKILL a worker once it has saved some hundreds of a map's 1,000
    items; a second worker reclaims the run when its 1 s lease lapses and
    runs only the items without a saved result. The run completes with the
    results in the order of the items; each item is saved once, with the
    output of one real execution; the list of items was computed once; an
    item ran twice only if it was in flight at the kill, and none saved
    before the kill ran again."""
    workers = fleet.workers
    inputs = enqueue_runs(fleet.store, _WORKFLOW, 1)
    ((run_id, _input),) = inputs.items()

    victim = fleet.start_map(_VICTIM_DELAY)
    workers.wait_for(
        f"{_KILL_AFTER} items saved", lambda: fleet.items_saved_by(victim) >= _KILL_AFTER
    )
    workers.kill(victim)
    at_kill = read_outcome_at(fleet.store, _WORKFLOW, inputs)
    saved_at_kill = [name for name in at_kill.steps[run_id] if name.startswith(f"{MAP}[")]
    assert _KILL_AFTER <= len(saved_at_kill) < MAP_ITEMS, (
        f"the kill did not land mid-fan-out: {len(saved_at_kill)} items saved"
    )
    assert at_kill.runs[run_id].status == "running"

    rescuer = fleet.start_map(_RESCUER_DELAY)

    def completed() -> bool:
        record = fleet.run(run_id)
        return record is not None and record.status == "completed"

    workers.wait_for("the run to complete", now_and_then(completed, 0.2), timeout=20)
    fleet.stop(rescuer)

    outcome = read_outcome_at(fleet.store, _WORKFLOW, inputs)
    executions = workers.executions()
    repeated = _check_map(outcome, at_kill, executions, workers.saves(), victim.pid)
    record = outcome.runs[run_id]
    assert record.reclaims == 1, f"reclaimed {record.reclaims} times, expected once"
    rescued = {ex.step for ex in executions if ex.pid == rescuer.pid}
    assert rescued == {_item(i) for i in range(MAP_ITEMS)} - set(saved_at_kill)
    print(  # shown with -s: how the kill landed
        f"saved at the kill: {len(saved_at_kill)}, run by the second worker: {len(rescued)}, "
        f"ran twice: {len(repeated)}"
    )
