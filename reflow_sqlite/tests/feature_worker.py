"""A worker process for the crash tests of sleeps, waits, parallel groups and
early completion (``test_feature_crashes.py``).

    python feature_worker.py DB LOG SCENARIO (--enqueue | --work) [--crash-in STEP]
                             [--until-idle S] [--lease D]

SCENARIO picks the workflow (see :func:`build`). Every step appends one JSON
line to LOG *before* returning and fsyncs it: ``{"t", "run", "step", "pid",
"what": "ran", "prev"}``. With ``--crash-in STEP`` that step logs
``"what": "started"`` instead and then blocks, waiting to be killed. A
worker started with ``--work`` logs ``"what": "ready"`` once it is working.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from reflow_core import Engine, StepContext, Workflow, open_storage, workflow

SCENARIOS = ("sleep", "wait", "parallel", "complete")
NAP_SECONDS = 2.0


def log_line(path: str, **fields: Any) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(fields) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def build(scenario: str, log: str, crash_in: str | None = None) -> Workflow[Any, Any]:
    """The workflow of ``scenario``; every step logs to ``log``."""

    def step(name: str, result: Any = None, *, complete: bool = False) -> Any:
        def handler(ctx: StepContext[Any, Any]) -> Any:
            entry = {"t": time.time(), "run": ctx.run_id, "step": name, "pid": os.getpid()}
            if name == crash_in:
                log_line(log, **entry, what="started", prev=ctx.prev)
                while True:  # wait here to be killed with SIGKILL
                    time.sleep(0.05)
            log_line(log, **entry, what="ran", prev=ctx.prev)
            if complete:
                ctx.complete({"early": ctx.prev})
            return {"step": name} if result is None else result

        return handler

    wf = workflow(f"crash-{scenario}")
    if scenario == "sleep":
        return (
            wf.step("before", step("before"))
            .sleep("nap", NAP_SECONDS)
            .step("after", step("after", "slept"))
        )
    if scenario == "wait":
        return (
            wf.step("before", step("before"))
            .wait_for_event("approval")
            .step("after", step("after", "approved"))
        )
    if scenario == "parallel":
        return (
            wf.step("before", step("before"))
            .parallel({"fast": step("fast", "F"), "slow": step("slow", "S")}, name="fan")
            .step("after", step("after", "joined"))
        )
    if scenario == "complete":
        return wf.step("check", step("check", complete=True)).step("never", step("never"))
    raise SystemExit(f"unknown scenario {scenario!r}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("log")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--enqueue", action="store_true")
    parser.add_argument("--work", action="store_true")
    parser.add_argument("--crash-in")
    parser.add_argument("--until-idle", type=float, default=0.3)
    parser.add_argument("--lease", default="1s")
    args = parser.parse_args()
    wf = build(args.scenario, args.log, args.crash_in)
    engine = Engine(
        storage=open_storage(f"sqlite:///{args.db}"),
        workflows=[wf],
        lease=args.lease,
        poll_interval="50ms",
        worker=False,
        load_entry_points=False,
    )
    async with engine:
        if args.enqueue:
            await engine.enqueue(wf, {"order": 1})
        if not args.work:
            return
        # Work until nothing has been unfinished for --until-idle seconds.
        await engine.start()
        log_line(args.log, t=time.time(), run=None, step=None, pid=os.getpid(), what="ready")
        idle_since: float | None = None
        while True:
            page = await engine.list_runs(
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
