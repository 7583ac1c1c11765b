"""A worker process for the crash and multi-process tests.

    python engine_worker.py DB LOG (--enqueue N | --work) [--crash-in STEP] [--until-idle S]

Every step appends ``<run_id> <step> <pid>`` to LOG *before* doing its work
and fsyncs, so the parent sees exactly which steps ran, where, and how often.
With ``--crash-in STEP`` the worker announces ``<run_id> <step> <pid> started``
and then blocks inside that step, waiting to be killed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from reflow_core import Engine, StepContext, open_storage, workflow

STEPS = ("reserve", "charge", "ship")


def _log(path: str, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def build(log: str, crash_in: str | None) -> Any:
    wf: Any = workflow("crash-test")
    for name in STEPS:

        def handler(ctx: StepContext[Any, Any], _name: str = name) -> dict[str, Any]:
            if _name == crash_in:
                _log(log, f"{ctx.run_id} {_name} {os.getpid()} started")
                while True:  # wait here to be killed with SIGKILL
                    time.sleep(0.05)
            _log(log, f"{ctx.run_id} {_name} {os.getpid()}")
            return {"step": _name, "prev": ctx.prev}

        wf = wf.step(name, handler)
    return wf


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("log")
    parser.add_argument("--enqueue", type=int, default=0)
    parser.add_argument("--work", action="store_true")
    parser.add_argument("--crash-in")
    parser.add_argument("--until-idle", type=float, default=2.0)
    parser.add_argument("--lease", default="1s")
    args = parser.parse_args()
    wf = build(args.log, args.crash_in)
    engine = Engine(
        storage=open_storage(f"sqlite:///{args.db}"),
        workflows=[wf],
        concurrency=8,
        lease=args.lease,
        poll_interval="50ms",
        worker=False,
    )
    async with engine:
        for i in range(args.enqueue):
            await engine.enqueue(wf, {"n": i})
        if not args.work:
            return
        # Work until nothing has been unfinished for --until-idle seconds.
        await engine.start()
        idle_since: float | None = None
        while True:
            page = await engine.storage.list_runs(
                status=["pending", "running", "sleeping", "waiting"], limit=1
            )
            if page.runs:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > args.until_idle:
                break
            await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())
