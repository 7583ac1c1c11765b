"""Child runs under a SIGKILL: a real ``reflow worker`` killed while a parent
waits on :data:`_CHILDREN` children.

The application's parent workflow has one step, ``spawn``, that starts
:data:`_CHILDREN` children and returns their results in order; each child's
one step, ``work``, logs a fresh token to the process's execution log before
returning it, and every step save the store acknowledged is logged as well.
So the store and the logs together show which execution each child's saved
result came from, that no child was started twice, and that no child whose
result was saved before the kill ran again.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflow_conformance.testsupport import (
    RUN_ONCE,
    RUNS_COMPLETE,
    SAVED_ONCE,
    STEP_FROM_EXECUTION,
    AppFleet,
    Execution,
    Save,
    now_and_then,
    with_storage,
)
from reflow_core import codec
from reflow_core.storage import NewRun, RunRecord, StepRecord, Storage

_CHILDREN = 50
_PARENT = "fleet-parent"
_CHILD = "fleet-child"
_KILL_AFTER = 15
"""The first worker is killed once it has saved this many children's results."""

_APP = textwrap.dedent(
    f"""
    import asyncio
    import os
    import uuid

    from reflow_conformance.testsupport import ExecutionLog
    from reflow_conformance.testsupport._worker import _record_saves
    from reflow_core import Engine, open_storage, workflow

    def make():
        log = ExecutionLog(os.environ["APP_LOGDIR"])
        delay = float(os.environ["APP_DELAY"])

        async def work(ctx):
            await asyncio.sleep(delay)
            token = uuid.uuid4().hex
            log.write("ran", token=token, run=ctx.run_id, step="work", attempt=ctx.attempt,
                      prev=ctx.input)
            return {{"token": token, "n": ctx.input["n"]}}

        child = workflow({_CHILD!r}, input=dict).step("work", work)

        async def spawn(ctx):
            log.write("entered", run=ctx.run_id, step="spawn", attempt=ctx.attempt)
            handles = [await ctx.start_child(child, {{"n": n}}) for n in range({_CHILDREN})]
            return [await handle.result() for handle in handles]

        parent = workflow({_PARENT!r}).step("spawn", spawn)
        storage = open_storage(os.environ["APP_STORE"])
        _record_saves(storage, log)
        return Engine(
            storage=storage,
            workflows=[parent, child],
            concurrency=4,
            lease="1s",
            poll_interval="50ms",
            drain_timeout="10s",
            load_entry_points=False,
        )
    """
)


@pytest.fixture
def store(store_url: str) -> str:
    """A storage URL of the test's own, on each real backend."""
    return store_url


@pytest.fixture
def fleet(tmp_path: Path, store: str) -> Iterator[AppFleet]:
    made = AppFleet(tmp_path, store, module="children_app", source=_APP)
    try:
        yield made
    finally:
        made.cleanup()


def _children_saved_by(fleet: AppFleet, proc: subprocess.Popen[bytes]) -> int:
    return sum(
        1
        for line in fleet.workers.lines(proc.pid)
        if line["kind"] == "saved" and line["step"] == "work"
    )


class _Tree:
    """The parent, its children and their saved steps, as stored now."""

    def __init__(
        self,
        parent: RunRecord,
        children: list[RunRecord],
        steps: dict[str, dict[str, StepRecord]],
    ) -> None:
        self.parent = parent
        self.children = children
        self.steps = steps

    @classmethod
    def read(cls, store: str, parent_id: str) -> _Tree:
        async def work(storage: Storage) -> _Tree:
            parent = await storage.get_run(parent_id)
            assert parent is not None
            children = await storage.list_children(parent_id)
            steps = {c.id: await storage.get_step_results(c.id) for c in children}
            return cls(parent, children, steps)

        return with_storage(store, work)


def _enqueue_parent(store: str) -> str:
    async def work(storage: Storage) -> str:
        created = await storage.create_run(NewRun(workflow=_PARENT, input=codec.encode(None)))
        return created.run.id

    return with_storage(store, work)


def _check(
    tree: _Tree,
    at_kill: _Tree,
    executions: list[Execution],
    saves: list[Save],
    victim: int,
) -> set[str]:
    """The tree the workers left, against their logs and the store at the
    kill; returns the children whose step ran more than once."""
    parent = tree.parent
    assert parent.status == "completed", f"{RUNS_COMPLETE}: {parent}"
    # Exactly the children of attempt 1, each started once: a parent resumed
    # after the kill, and after its wait, found them instead of starting more.
    expected = [f"{parent.id}:spawn:1:{n}" for n in range(_CHILDREN)]
    assert sorted(c.id for c in tree.children) == sorted(expected), (
        f"children started: {sorted(c.id for c in tree.children)}"
    )
    assert {(c.parent_id, c.parent_step, c.workflow) for c in tree.children} == {
        (parent.id, "spawn", _CHILD)
    }
    by_id = {c.id: c for c in tree.children}
    created = {c.id: c.created_at for c in at_kill.children}
    for child_id, when in created.items():
        assert by_id[child_id].created_at == when, f"child {child_id} was created again"

    tokens = Counter(ex.token for ex in executions if ex.token is not None)
    assert all(n == 1 for n in tokens.values()), "the log is corrupt: a token logged twice"
    by_run: dict[str, list[Execution]] = defaultdict(list)
    for ex in executions:
        assert ex.step == "work", ex
        by_run[ex.run].append(ex)
    acked: dict[str, list[str | None]] = defaultdict(list)
    for save in saves:
        if save.ok and save.step == "work":
            acked[save.run].append(save.token)

    outputs = []
    for n, child_id in enumerate(expected):
        child = by_id[child_id]
        assert child.status == "completed", f"{RUNS_COMPLETE}: {child}"
        step = tree.steps[child_id]["work"]
        value = codec.decode(step.output or "null")
        ran = [ex.token for ex in by_run[child_id]]
        where = f"{child_id}: stored {value!r}, executions returned {ran}"
        assert value["token"] in ran, f"{STEP_FROM_EXECUTION}: {where}"
        assert value["n"] == n, f"{STEP_FROM_EXECUTION}: {where}"
        assert codec.decode(child.output or "null") == value, where
        mine = acked[child_id]
        assert set(mine) <= {value["token"]}, f"{SAVED_ONCE}: {where}, acknowledged {mine}"
        assert len(mine) <= 1, f"{SAVED_ONCE}: {where}, acknowledged {mine}"
        outputs.append(value)
    assert codec.decode(parent.output or "null") == outputs, (
        "the parent's output is not its children's"
    )

    # What the victim saved before the kill stayed, and never ran again.
    done_at_kill = {c.id for c in at_kill.children if c.status == "completed"}
    for child_id in done_at_kill:
        assert tree.steps[child_id] == at_kill.steps[child_id], f"{SAVED_ONCE}: {child_id}"
        assert [ex.pid for ex in by_run[child_id]] == [victim], (
            f"{RUN_ONCE}: {child_id}, completed before the kill, ran again: {by_run[child_id]}"
        )
    # Only children in flight at the kill (at most the worker's 4 slots) ran twice.
    in_flight = {ex.run for ex in executions if ex.pid == victim} - done_at_kill
    assert len(in_flight) <= 4, f"{len(in_flight)} children ran but were not saved"
    repeated = {run for run, found in by_run.items() if len(found) > 1}
    assert repeated <= in_flight, f"{RUN_ONCE}: ran twice, not in flight: {repeated - in_flight}"
    return repeated


@pytest.mark.slow
def test_a_worker_killed_while_a_parent_waits_on_50_children(fleet: AppFleet) -> None:
    """SIGKILL the worker once it has completed some of a parent's 50
    children; the parent is waiting, its lease given up, and some children
    are held by the victim. A second worker reclaims those once their 1 s
    leases lapse, runs the rest, and the last child's end wakes the parent,
    which finds its 50 children (starting none) and completes with their
    results in order. Every child completed once, its saved result from one
    real execution; only children in flight at the kill ran twice."""
    workers = fleet.workers
    parent_id = _enqueue_parent(fleet.store)

    victim = fleet.start(delay="0.15")
    workers.wait_for(
        f"{_KILL_AFTER} children done", lambda: _children_saved_by(fleet, victim) >= _KILL_AFTER
    )
    workers.kill(victim)
    at_kill = _Tree.read(fleet.store, parent_id)
    assert at_kill.parent.status == "waiting", at_kill.parent
    assert len(at_kill.children) == _CHILDREN
    done = sum(1 for c in at_kill.children if c.status == "completed")
    assert _KILL_AFTER <= done < _CHILDREN, f"the kill did not land mid-way: {done} done"

    rescuer = fleet.start(delay="0.01")

    def completed() -> bool:
        record = fleet.run(parent_id)
        return record is not None and record.status == "completed"

    workers.wait_for("the parent to complete", now_and_then(completed, 0.2), timeout=30)
    fleet.stop(rescuer)

    tree = _Tree.read(fleet.store, parent_id)
    repeated = _check(tree, at_kill, workers.executions(), workers.saves(), victim.pid)
    entered = [line for line in workers.lines() if line["kind"] == "entered"]
    # The parent's step ran once to start the children, and once per wake-up
    # after they had all ended: never in the victim after the kill.
    assert {line["attempt"] for line in entered} == {1}
    assert max(entered, key=lambda line: line["t"])["pid"] == rescuer.pid
    print(f"done at the kill: {done}, ran twice: {len(repeated)}")  # shown with -s
