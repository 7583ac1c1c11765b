"""Reflow demo: a report workflow fired by a schedule, once per slot.

    python examples/scheduled_report.py [--db PATH] [--seconds N]

Schedules the "report" workflow every second on a SQLite file, runs a worker
for a few seconds (3.5 by default), then lists the runs the schedule created:
one per slot, each with an idempotency key derived from its slot.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from reflow_core import Engine, StepContext, open_storage, workflow


async def build_report(ctx: StepContext[dict[str, str], dict[str, str]]) -> str:
    stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    return f"{ctx.input['team']} report built at {stamp}"


report = workflow("report").step("build", build_report)


async def main(db: Path, seconds: float) -> int:
    storage = open_storage(f"sqlite:///{db}")
    async with Engine(storage=storage, workflows=[report], poll_interval="200ms") as engine:
        schedule = await engine.schedule(report, {"team": "ops"}, every="1s", key="ops-report")
        assert schedule.every is not None
        print(
            f"scheduled {schedule.key!r} every {schedule.every.total_seconds():g}s, "
            f"first slot at {schedule.next_run_at:%H:%M:%S} UTC"
        )
        await asyncio.sleep(seconds)
        await engine.unschedule("ops-report")
        page = await engine.list_runs(workflow=report, limit=100)
        runs = sorted(page.runs, key=lambda r: r.idempotency_key or "")
        for run in runs:
            if run.status != "completed":  # the last slot may still be running
                await engine.result(run.id, timeout="5s")
        print(f"{len(runs)} run(s) created:")
        for run in runs:
            done = await engine.get_run(run.id)
            assert done is not None
            print(f"  {run.idempotency_key}  {done.status}: {done.output}")
    keys = [run.idempotency_key for run in runs]
    return 0 if runs and len(set(keys)) == len(keys) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    parser.add_argument("--seconds", type=float, default=3.5, help="how long the worker runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "scheduled_report.db"
        raise SystemExit(asyncio.run(main(path, args.seconds)))
