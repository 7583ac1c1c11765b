"""The engine across real processes on one SQLite file: SIGKILL mid-step and
resume elsewhere; several workers draining one queue with no step run twice."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reflow_core import open_storage
from reflow_core.storage import RunRecord

WORKER = Path(__file__).with_name("engine_worker.py")
pytestmark = pytest.mark.slow


def _worker(db: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(WORKER), str(db), str(log), *args])


def _lines(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split() for line in log.read_text().splitlines() if line.strip()]


async def _runs(db: Path) -> list[RunRecord]:
    storage = open_storage(f"sqlite:///{db}")
    await storage.initialize()
    try:
        page = await storage.list_runs(limit=10_000)
        return list(page.runs)
    finally:
        await storage.close()


def test_sigkill_mid_step_resumes_at_first_unfinished_step(tmp_path: Path) -> None:
    db, log = tmp_path / "wf.db", tmp_path / "steps.log"
    subprocess.run([sys.executable, str(WORKER), str(db), str(log), "--enqueue", "1"], check=True)

    victim = _worker(db, log, "--work", "--crash-in", "charge")
    deadline = time.monotonic() + 30
    while not any(line[-1] == "started" for line in _lines(log)):
        assert victim.poll() is None, "worker exited before reaching the step"
        assert time.monotonic() < deadline, "worker never reached the charge step"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL

    (run,) = asyncio.run(_runs(db))
    assert run.status == "running"  # held by a dead worker's lease

    rescuer = _worker(db, log, "--work", "--until-idle", "0.3")
    assert rescuer.wait(60) == 0

    (run,) = asyncio.run(_runs(db))
    assert run.status == "completed"
    assert run.attempts == 2
    assert run.reclaims == 1
    ran = [(step, pid) for run_id, step, pid, *rest in _lines(log) if not rest]
    by_step = collections.Counter(step for step, _ in ran)
    # reserve was saved before the kill: never run again. charge was killed
    # mid-way and ran to completion once, in the second process.
    assert by_step == {"reserve": 1, "charge": 1, "ship": 1}
    pids = dict(ran)
    assert pids["reserve"] == str(victim.pid)
    assert pids["charge"] == pids["ship"] == str(rescuer.pid)


def test_processes_share_one_file_without_double_execution(tmp_path: Path) -> None:
    db, log = tmp_path / "wf.db", tmp_path / "steps.log"
    runs = 300
    subprocess.run(
        [sys.executable, str(WORKER), str(db), str(log), "--enqueue", str(runs)], check=True
    )
    workers = [
        _worker(db, log, "--work", "--until-idle", "0.5", "--lease", "10s") for _ in range(3)
    ]
    for proc in workers:
        assert proc.wait(120) == 0

    records = asyncio.run(_runs(db))
    assert len(records) == runs
    assert {r.status for r in records} == {"completed"}
    assert all(r.attempts == 1 for r in records), "a run was claimed twice"
    executions = collections.Counter((run_id, step) for run_id, step, _pid in _lines(log))
    assert len(executions) == runs * 3
    assert set(executions.values()) == {1}, "a step ran twice"
    pids = {pid for _run, _step, pid in _lines(log)}
    assert len(pids) >= 2, f"only {pids} did any work"
