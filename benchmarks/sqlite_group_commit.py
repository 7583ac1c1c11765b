"""Fenced step saves with and without group commit.

25 claimed runs, one task per run, each task saving 200 steps one after the
other (as the engine does with 25 runs in flight). Prints saves per second
and the mean latency of one save for each mode and ``synchronous`` level, and
the time of a claim of 10 runs with many completed runs in the file.

    uv run python benchmarks/sqlite_group_commit.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from reflow_core.storage import NewRun, StepRecord
from reflow_sqlite import SQLiteStorage

RUNS = 25
SAVES = 200
LEASE = timedelta(seconds=60)


async def saves(path: Path, *, group_commit: bool, synchronous: str) -> float:
    storage = SQLiteStorage(path, group_commit=group_commit, synchronous=synchronous)
    await storage.initialize()
    try:
        for _ in range(RUNS):
            await storage.create_run(NewRun("bench", "{}"))
        claimed = await storage.claim_runs(["bench"], RUNS, LEASE)
        assert len(claimed) == RUNS

        async def worker(index: int) -> None:
            lease = claimed[index].lease
            for n in range(SAVES):
                step = StepRecord(f"step-{n}", "completed", output=f'{{"n":{n}}}')
                assert await storage.save_step_result(lease, step, LEASE)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(RUNS)))
        return time.perf_counter() - started
    finally:
        await storage.close()


async def claims(path: Path, completed: int, pending: int) -> list[float]:
    storage = SQLiteStorage(path)
    await storage.initialize()
    try:
        for _ in range(completed):
            await storage.create_run(NewRun("bench", "{}"))
        while batch := await storage.claim_runs(["bench"], 100, LEASE):
            for c in batch:
                await storage.finish_run(c.lease, "completed", output="null")
        for _ in range(pending):
            await storage.create_run(NewRun("bench", "{}"))
        timings = []
        while True:
            started = time.perf_counter()
            batch = await storage.claim_runs(["bench"], 10, LEASE)
            timings.append(time.perf_counter() - started)
            if not batch:
                break
        return timings
    finally:
        await storage.close()


async def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    total = RUNS * SAVES
    with tempfile.TemporaryDirectory() as tmp:
        for synchronous in ("NORMAL", "FULL"):
            for label, group in (
                ("one transaction per save", False),
                ("group commit", True),
            ):
                times = []
                for attempt in range(repeats):
                    path = Path(tmp) / f"{synchronous}-{group}-{attempt}.db"
                    times.append(await saves(path, group_commit=group, synchronous=synchronous))
                best = min(times)
                print(
                    f"synchronous={synchronous:<6} {label:<27} {total / best:8.0f} saves/s  "
                    f"{best / total * 1e6 * RUNS:7.0f} us/save latency  "
                    f"(best of {repeats}: {best:.3f}s)"
                )
        timings = await claims(Path(tmp) / "claims.db", completed=20_000, pending=1_000)
        print(
            f"claim 10 of 1000 pending with 20000 completed runs: median "
            f"{statistics.median(timings) * 1e3:.2f} ms, max {max(timings) * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
