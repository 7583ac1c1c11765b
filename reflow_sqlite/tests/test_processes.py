"""Several processes sharing one database file."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from reflow_core.storage import NewRun
from reflow_sqlite import SQLiteStorage

WORKER = Path(__file__).with_name("_claim_worker.py")
PROCESSES = 4
RUNS = 2000


def wait_for(paths: list[Path], procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() not in (None, 0):
                raise AssertionError(f"worker exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("workers did not get ready in time")
        time.sleep(0.01)


async def create_runs(path: Path) -> set[str]:
    store = SQLiteStorage(path)
    await store.initialize()
    try:
        return {(await store.create_run(NewRun("mp", f'"{n}"'))).run.id for n in range(RUNS)}
    finally:
        await store.close()


@pytest.mark.slow
def test_processes_never_claim_the_same_run(db_path: Path, tmp_path: Path) -> None:
    created = asyncio.run(create_runs(db_path))

    go = tmp_path / "go"
    outs = [tmp_path / f"claims-{n}.json" for n in range(PROCESSES)]
    readies = [tmp_path / f"ready-{n}" for n in range(PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(db_path), str(out), str(ready), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for out, ready in zip(outs, readies, strict=True)
    ]
    try:
        wait_for(readies, procs, timeout=30)
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    claims = [tuple(c) for out in outs for c in json.loads(out.read_text())]
    per_run = Counter(run_id for run_id, _, _ in claims)
    assert [run_id for run_id, n in per_run.items() if n > 1] == []
    assert set(per_run) == created
    assert {epoch for _, epoch, _ in claims} == {1}
    claimed_by = {run_id: pid for run_id, _, pid in claims}
    assert len(set(claimed_by.values())) >= 2, "the processes did not run concurrently"

    raw = sqlite3.connect(db_path)
    try:
        statuses = dict(raw.execute("SELECT status, count(*) FROM runs GROUP BY status"))
        assert statuses == {"completed": RUNS}
        outputs = dict(raw.execute("SELECT id, output FROM runs"))
        steps = dict(raw.execute("SELECT run_id, output FROM steps WHERE name = 'work'"))
    finally:
        raw.close()
    # Every write landed from the process that held the lease.
    assert {run_id: int(out) for run_id, out in outputs.items()} == claimed_by
    assert {run_id: int(out) for run_id, out in steps.items()} == claimed_by


def test_a_process_that_never_closes_the_storage_still_exits(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from reflow_core.storage import NewRun\n"
        "from reflow_sqlite import SQLiteStorage\n"
        "store = SQLiteStorage(sys.argv[1])\n"
        "async def main():\n"
        "    await store.initialize()\n"
        "    await store.create_run(NewRun('wf', '{}'))\n"
        "asyncio.run(main())\n"
    )
    db = tmp_path / "left-open.db"
    done = subprocess.run(
        [sys.executable, "-c", script, str(db)], capture_output=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    finally:
        raw.close()
    assert os.path.getsize(db) > 0
