"""A worker process for the Redis crash and durability tests.

    python _redis_worker.py URL LOGDIR [--lease D] [--concurrency N] [--until-idle S]
                            [--stop-file PATH] [--block-after K] [--crash-in STEP]
                            [--step-delay S] [--record-saves]
    python _redis_worker.py URL LOGDIR --enqueue N [--pace S]

Works the three-step workflow ``redis-crash`` on the storage at URL until no
run has been unfinished for ``--until-idle`` seconds (and, with
``--stop-file``, that file exists). Storage errors while looking for work, as
while the server restarts, only postpone the check.

Every line goes to ``LOGDIR/exec-<pid>.log`` in one ``write`` to a file
opened with ``O_APPEND``, so a line written survives the process being killed
and a partial line is never seen by the test as whole:

* ``ran <run_id> <step> <token>``: a step is about to return a fresh random
  token as part of its output.
* ``blocked <run_id> <step>`` (``--block-after K``): once this process has run
  K steps, every later step but the first (``reserve``) writes this line and
  blocks, waiting to be killed, so the worker ends up holding
  ``--concurrency`` runs, each mid-step with its earlier steps saved.
* ``started <run_id> <step>`` (``--crash-in STEP``): that step blocks in every
  run, waiting to be killed.
* ``saved <run_id> <step> <token> <epoch>`` / ``refused ...``
  (``--record-saves``): a ``save_step_result`` or ``finish_run`` carrying the
  step returned True (acknowledged by the server) or False (fenced off),
  written right after the call returned.
* ``ready``: the engine works.

With ``--enqueue N`` the process creates the runs ``0..N-1`` one at a time,
each with the idempotency key ``load-<n>``, ``--pace`` seconds apart, retrying
one whose create failed, and writes ``acked <n> <run_id>`` to
``LOGDIR/enqueue-<pid>.log`` once the server acknowledged it.

Engine and client logs go to ``LOGDIR/worker-<pid>.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
import uuid
from typing import Any

from reflow_core import Engine, StepContext, Workflow, codec, open_storage, workflow
from reflow_core.errors import ReflowError
from reflow_core.storage import Lease, NewRun, StepRecord, Storage

WORKFLOW = "redis-crash"
STEPS = ("reserve", "charge", "ship")


class Log:
    """One append-only log file of this process."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self.count = 0

    def write(self, *fields: str) -> int:
        """Append one line; return how many lines were written before it."""
        with self._lock:
            os.write(self._fd, (" ".join(fields) + "\n").encode())
            self.count += 1
            return self.count - 1


def build(
    log: Log, *, block_after: int | None, crash_in: str | None, step_delay: float
) -> Workflow[Any, Any]:
    """The workflow ``redis-crash``."""
    forever = threading.Event()
    blocking = threading.Event()
    ran = [0]
    lock = threading.Lock()

    def make(name: str) -> Any:
        def handler(ctx: StepContext[Any, Any]) -> dict[str, Any]:
            if step_delay:
                time.sleep(step_delay)
            if name == crash_in:
                log.write("started", ctx.run_id, name)
                forever.wait()  # until SIGKILL
            if blocking.is_set() and name != STEPS[0]:
                log.write("blocked", ctx.run_id, name)
                forever.wait()  # until SIGKILL
            token = uuid.uuid4().hex
            log.write("ran", ctx.run_id, name, token)
            with lock:
                ran[0] += 1
                if block_after is not None and ran[0] >= block_after:
                    blocking.set()
            return {"step": name, "token": token, "prev": ctx.prev}

        return handler

    wf: Any = workflow(WORKFLOW)
    for name in STEPS:
        wf = wf.step(name, make(name))
    return wf


def _token(step: StepRecord | None) -> tuple[str, str]:
    if step is None or step.output is None:
        return ("-", "-")
    return (step.name, str(codec.decode(step.output)["token"]))


def record_saves(storage: Storage, log: Log) -> None:
    """Log every step save the server acknowledged (or refused) on ``storage``."""
    save = storage.save_step_result
    finish = storage.finish_run

    async def save_step_result(lease: Lease, step: StepRecord, extend: Any) -> bool:
        ok = await save(lease, step, extend)
        log.write("saved" if ok else "refused", lease.run_id, *_token(step), str(lease.epoch))
        return ok

    async def finish_run(lease: Lease, status: Any, **kwargs: Any) -> bool:
        ok = await finish(lease, status, **kwargs)
        step = kwargs.get("step")
        if step is not None:
            log.write("saved" if ok else "refused", lease.run_id, *_token(step), str(lease.epoch))
        return ok

    storage.save_step_result = save_step_result  # type: ignore[method-assign]
    storage.finish_run = finish_run  # type: ignore[method-assign]


async def enqueue(url: str, logdir: str, runs: int, pace: float) -> None:
    log = Log(os.path.join(logdir, f"enqueue-{os.getpid()}.log"))
    store = open_storage(url)
    while True:
        try:
            await store.initialize()
            break
        except ReflowError:
            await asyncio.sleep(0.05)
    try:
        for n in range(runs):
            new = NewRun(WORKFLOW, codec.encode({"n": n}), idempotency_key=f"load-{n}")
            while True:
                try:
                    result = await store.create_run(new)
                    break
                except ReflowError as exc:  # the server is away: try the same run again
                    logging.getLogger("redis_worker").warning("enqueue %d failed: %s", n, exc)
                    await asyncio.sleep(0.05)
            log.write("acked", str(n), result.run.id)
            if pace:
                await asyncio.sleep(pace)
    finally:
        await store.close()


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def work(args: argparse.Namespace) -> None:
    log = Log(os.path.join(args.logdir, f"exec-{os.getpid()}.log"))
    wf = build(
        log, block_after=args.block_after, crash_in=args.crash_in, step_delay=args.step_delay
    )
    storage = open_storage(args.url)
    if args.record_saves:
        record_saves(storage, log)
    engine = Engine(
        storage=storage,
        workflows=[wf],
        concurrency=args.concurrency,
        lease=args.lease,
        poll_interval="50ms",
        worker=False,
        load_entry_points=False,
    )
    async with engine:
        await engine.start()
        log.write("ready")
        idle_since: float | None = None
        while True:
            try:
                page = await engine.list_runs(
                    status=["pending", "running", "sleeping", "waiting"], limit=1
                )
            except ReflowError as exc:  # the server is away: look again later
                logging.getLogger("redis_worker").warning("looking for work failed: %s", exc)
                idle_since = None
                await asyncio.sleep(0.1)
                continue
            stopped = args.stop_file is None or _exists(args.stop_file)
            if page.runs or not stopped:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > args.until_idle:
                break
            await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("logdir")
    parser.add_argument("--lease", default="2s")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--until-idle", type=float, default=0.5)
    parser.add_argument("--stop-file")
    parser.add_argument("--block-after", type=int)
    parser.add_argument("--crash-in")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--record-saves", action="store_true")
    parser.add_argument("--enqueue", type=int)
    parser.add_argument("--pace", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(
        filename=os.path.join(args.logdir, f"worker-{os.getpid()}.log"),
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    if args.enqueue is not None:
        asyncio.run(enqueue(args.url, args.logdir, args.enqueue, args.pace))
    else:
        asyncio.run(work(args))


if __name__ == "__main__":
    main()
