"""Worker processes on one Redis prefix: one killed with SIGKILL mid-step while
it holds runs, and a single run killed mid-step and resumed elsewhere.

The workers (``_redis_worker.py``) run a three-step workflow. Every execution
of a step writes a line with a fresh random token to an append-only log
before it returns the token as part of its output, and every save of a step
result that returns writes a line saying whether the server acknowledged it.
Together with what Redis holds afterwards they show that no run is lost, that
every saved result is the output of one real execution and was saved once,
and that steps ran again only in the runs whose lease lapsed: the ones the
killed worker held.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from reflow_core import codec


def _harness() -> ModuleType:
    name = "reflow_redis_tests__redis_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("_redis_harness.py")
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


h = _harness()
STEPS = h.STEPS
CONCURRENCY = 8
pytestmark = pytest.mark.slow


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[h.Workers]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    made = h.Workers(redis_url, logdir)
    try:
        yield made
    finally:
        made.cleanup()


def test_a_worker_killed_mid_step_loses_no_run_and_saves_no_step_twice(
    workers: h.Workers, redis_url: str
) -> None:
    runs = 1000
    inputs = h.enqueue(redis_url, runs)
    common = (
        "--lease",
        "2s",
        "--concurrency",
        str(CONCURRENCY),
        "--until-idle",
        "0.5",
        "--record-saves",
    )
    # The victim runs 60 steps normally; after that every step but the first
    # blocks, so it ends up holding CONCURRENCY runs, each inside a step with
    # the steps before it saved.
    victim = workers.start(*common, "--block-after", "60")
    for _ in range(2):
        workers.start(*common)

    def held() -> set[str]:
        return {fields[1] for _pid, fields in workers.lines(victim.pid) if fields[0] == "blocked"}

    started = time.monotonic()
    workers.wait_for("the victim to hold its runs mid-step", lambda: len(held()) == CONCURRENCY)
    time.sleep(0.1)  # no other step starts there: every slot is blocked
    victim_lines = workers.lines(victim.pid)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    killed_at = time.monotonic()
    held_runs = held()
    assert len(held_runs) == CONCURRENCY
    done_at_kill = sum(1 for _pid, fields in workers.lines() if fields[0] == "ran")
    assert done_at_kill < runs * len(STEPS) * 0.8, "the load was nearly over before the kill"

    workers.finish(timeout=60)
    finished_at = time.monotonic()
    outcome = h.read_outcome(redis_url, inputs)
    executions = workers.executions()
    saves = workers.saves()
    repeated = h.check_outcome(outcome, executions, saves)

    # Nothing was written after the kill by the victim.
    assert workers.lines(victim.pid) == victim_lines
    # The runs it held were reclaimed, once each, and each one's blocked step
    # ran to the end once, elsewhere, after the steps the victim had saved.
    reclaimed = {run for run, record in outcome.runs.items() if record.reclaims}
    assert reclaimed == held_runs, "a live worker's lease lapsed, or a held run was not reclaimed"
    assert repeated == held_runs
    for run_id in held_runs:
        record = outcome.runs[run_id]
        assert (record.attempts, record.reclaims) == (2, 1)
        mine = [ex for ex in executions if ex.run == run_id]
        (blocked,) = [ex for ex in mine if ex.kind == "blocked"]
        assert blocked.pid == victim.pid
        assert blocked.step != STEPS[0]
        before = STEPS[: STEPS.index(blocked.step)]
        for ex in mine:
            if ex.step in before:
                assert (ex.kind, ex.pid) == ("ran", victim.pid), ex
            elif ex.kind == "ran":
                assert ex.pid != victim.pid, ex
        assert Counter(ex.step for ex in mine if ex.kind == "ran") == dict.fromkeys(STEPS, 1)
    # Every step result was saved once, by the execution whose output is
    # stored, and no save was refused (no live worker lost a lease).
    assert [s for s in saves if not s.ok] == []
    per_step = Counter((s.run, s.step) for s in saves)
    assert set(per_step.values()) == {1}
    assert len(per_step) == runs * len(STEPS)
    stored = {
        (run_id, name): codec.decode(step.output)["token"]
        for run_id, steps in outcome.steps.items()
        for name, step in steps.items()
    }
    assert {(s.run, s.step): s.token for s in saves} == stored
    # All three workers did work.
    assert len({ex.pid for ex in executions if ex.kind == "ran"}) == 3
    print(
        f"victim held {sorted(held_runs)}; kill after {killed_at - started:.1f}s "
        f"({done_at_kill} steps done); all done {finished_at - killed_at:.1f}s later"
    )


def test_sigkill_mid_step_resumes_at_first_unfinished_step(
    workers: h.Workers, redis_url: str
) -> None:
    """The Redis run of the SQLite engine test of the same name."""
    (run_id,) = h.enqueue(redis_url, 1)
    victim = workers.start("--lease", "1s", "--crash-in", "charge", "--record-saves")
    workers.wait_for(
        "the worker to reach the charge step",
        lambda: any(f[0] == "started" for _pid, f in workers.lines()),
    )
    outcome = h.read_outcome(redis_url, {})
    assert outcome.runs[run_id].status == "running"  # held by a worker about to die
    assert list(outcome.steps[run_id]) == ["reserve"]
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL

    rescuer = workers.start("--lease", "1s", "--until-idle", "0.3", "--record-saves")
    workers.finish(timeout=30)

    outcome = h.read_outcome(redis_url, {run_id: {"n": 0}})
    record = outcome.runs[run_id]
    assert record.status == "completed"
    assert (record.attempts, record.reclaims) == (2, 1)
    executions = workers.executions()
    h.check_outcome(outcome, executions, workers.saves())
    # reserve was saved before the kill: never run again. charge was killed
    # mid-way and ran to completion once, in the second process.
    ran = {(ex.kind, ex.step): ex.pid for ex in executions}
    assert len(ran) == len(executions)
    assert ran == {
        ("ran", "reserve"): victim.pid,
        ("started", "charge"): victim.pid,
        ("ran", "charge"): rescuer.pid,
        ("ran", "ship"): rescuer.pid,
    }
    assert Counter((s.pid, s.step, s.ok) for s in workers.saves()) == {
        (victim.pid, "reserve", True): 1,
        (rescuer.pid, "charge", True): 1,
        (rescuer.pid, "ship", True): 1,
    }
