"""A worker process for the multi-process test: claims and finishes runs.

Usage: ``python _claim_worker.py DB OUT READY GO``. Opens the database, touches
READY, waits for GO to exist, then claims runs of workflow ``mp`` in batches
of 10 until none are left, saving one step and finishing each run. Writes
every claim as ``[run_id, epoch, pid]`` to OUT as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from reflow_core.storage import StepRecord
from reflow_sqlite import SQLiteStorage

LEASE = timedelta(seconds=60)


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.005)


async def main(db: str, out: str, ready: str, go: str) -> None:
    store = SQLiteStorage(db)
    await store.initialize()
    await asyncio.to_thread(Path(ready).touch)
    await asyncio.to_thread(wait_for, Path(go))
    pid = os.getpid()
    claims: list[list[object]] = []
    idle = 0
    try:
        while idle < 3:
            batch = await store.claim_runs(["mp"], 10, LEASE)
            if not batch:
                idle += 1
                await asyncio.sleep(0.02)
                continue
            idle = 0
            claims.extend([c.run.id, c.lease.epoch, pid] for c in batch)
            step = StepRecord("work", "completed", output=str(pid))
            saved = await asyncio.gather(
                *(store.save_step_result(c.lease, step, LEASE) for c in batch)
            )
            finished = await asyncio.gather(
                *(store.finish_run(c.lease, "completed", output=str(pid)) for c in batch)
            )
            if not all(saved) or not all(finished):
                raise SystemExit(f"lost a lease: saved={saved} finished={finished}")
    finally:
        await store.close()
    await asyncio.to_thread(Path(out).write_text, json.dumps(claims))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
