"""A worker process for the multi-process PostgreSQL tests (``test_processes.py``).

    python _pg_worker.py URL LOGDIR [--lease D] [--concurrency N] [--until-idle S]
                         [--block-after K] [--step-delay S]
    python _pg_worker.py URL LOGDIR --scenario wait [--enqueue] [--crash-in STEP]

Works the three-step workflow ``pg-crash`` (or, with ``--scenario wait``, the
workflow ``pg-wait``: a step, a wait for the event ``approval``, a step) on
the storage at URL until no run has been unfinished for ``--until-idle``
seconds (storage errors while looking, as during a server restart, only
postpone the check).

Every execution of a step appends one line to ``LOGDIR/exec-<pid>.log``, in a
single ``write`` to a file opened with ``O_APPEND`` (a line written survives
the process being killed): ``ran <run_id> <step> <token>`` just before the step
returns a fresh random token, which is part of its output. With
``--block-after K``, once this process has run K steps, every later step other
than the first one (``reserve``) writes ``blocked <run_id> <step>`` and then
blocks, waiting to be killed: the worker ends up holding ``--concurrency``
runs, each one mid-step with its earlier steps saved. ``ready`` is written
once the engine works. Engine and driver logs go to ``LOGDIR/worker-<pid>.log``.

The steps of ``pg-wait`` log ``ran <run_id> <step> <prev as JSON>``; with
``--crash-in STEP`` that step logs ``started`` instead of ``ran`` and blocks,
waiting to be killed. ``--enqueue`` creates one run of it first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from reflow_core import Engine, StepContext, Workflow, open_storage, workflow
from reflow_core.errors import ReflowError

WORKFLOW = "pg-crash"
STEPS = ("reserve", "charge", "ship")
WAIT_WORKFLOW = "pg-wait"


class ExecutionLog:
    """This process's append-only log of step executions."""

    def __init__(self, logdir: str) -> None:
        path = os.path.join(logdir, f"exec-{os.getpid()}.log")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self.count = 0

    def write(self, *fields: str) -> int:
        """Append one line; return how many lines were written before it."""
        with self._lock:
            os.write(self._fd, (" ".join(fields) + "\n").encode())
            self.count += 1
            return self.count - 1


def build(log: ExecutionLog, block_after: int | None, step_delay: float) -> Workflow[Any, Any]:
    """The workflow ``pg-crash``."""
    forever = threading.Event()
    blocking = threading.Event()

    def make(name: str) -> Any:
        def handler(ctx: StepContext[Any, Any]) -> dict[str, Any]:
            if step_delay:
                time.sleep(step_delay)
            if blocking.is_set() and name != STEPS[0]:
                log.write("blocked", ctx.run_id, name)
                forever.wait()  # until SIGKILL
            token = uuid.uuid4().hex
            done = log.write("ran", ctx.run_id, name, token)
            if block_after is not None and done + 1 >= block_after:
                blocking.set()
            return {"step": name, "token": token, "prev": ctx.prev}

        return handler

    wf: Any = workflow(WORKFLOW)
    for name in STEPS:
        wf = wf.step(name, make(name))
    return wf


def build_wait(log: ExecutionLog | None, crash_in: str | None = None) -> Workflow[Any, Any]:
    """The workflow ``pg-wait`` (``log`` may be ``None`` where it only sends events)."""
    forever = threading.Event()

    def make(name: str, result: str) -> Any:
        def handler(ctx: StepContext[Any, Any]) -> str:
            assert log is not None
            prev = json.dumps(ctx.prev, separators=(",", ":"), sort_keys=True)
            if name == crash_in:
                log.write("started", ctx.run_id, name, prev)
                forever.wait()  # until SIGKILL
            log.write("ran", ctx.run_id, name, prev)
            return result

        return handler

    return (
        workflow(WAIT_WORKFLOW)
        .step("before", make("before", "B"))
        .wait_for_event("approval")
        .step("after", make("after", "approved"))
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("logdir")
    parser.add_argument("--lease", default="2s")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--until-idle", type=float, default=0.5)
    parser.add_argument("--block-after", type=int)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--scenario", choices=("steps", "wait"), default="steps")
    parser.add_argument("--enqueue", action="store_true")
    parser.add_argument("--crash-in")
    args = parser.parse_args()
    logging.basicConfig(
        filename=os.path.join(args.logdir, f"worker-{os.getpid()}.log"),
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    log = ExecutionLog(args.logdir)
    if args.scenario == "wait":
        wf = build_wait(log, args.crash_in)
    else:
        wf = build(log, args.block_after, args.step_delay)
    engine = Engine(
        storage=open_storage(args.url),
        workflows=[wf],
        concurrency=args.concurrency,
        lease=args.lease,
        poll_interval="50ms",
        worker=False,
        load_entry_points=False,
    )
    async with engine:
        if args.enqueue:
            await engine.enqueue(wf, {"order": 1})
        await engine.start()
        log.write("ready")
        idle_since: float | None = None
        while True:
            try:
                page = await engine.list_runs(
                    status=["pending", "running", "sleeping", "waiting"], limit=1
                )
            except ReflowError as exc:  # the server is away: look again later
                logging.getLogger("pg_worker").warning("looking for work failed: %s", exc)
                idle_since = None
                await asyncio.sleep(0.1)
                continue
            if page.runs:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > args.until_idle:
                break
            await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())
