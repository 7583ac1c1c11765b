"""The crash worker process: ``python -m reflow_conformance.testsupport work|enqueue``.

``work`` runs a real :class:`~reflow_core.Engine` on the store an adapter
target names until no run is left unfinished; ``enqueue`` creates runs of the
``steps`` scenario. Both log what they do to ``LOGDIR/exec-<pid>.log``
(:class:`~reflow_conformance.testsupport.ExecutionLog`), and the engine's and
the driver's logs go to ``LOGDIR/worker-<pid>.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

from reflow_conformance.harness import load_factory
from reflow_core import Engine, codec
from reflow_core.errors import ReflowError
from reflow_core.storage import Lease, NewRun, RunStatus, StepRecord, Storage

from ._log import ExecutionLog
from ._workflows import SCENARIOS, build

__all__ = ["main"]


def _token(step: StepRecord | None) -> str | None:
    """The token in a step result of the ``steps`` scenario, else ``None``."""
    if step is None or step.output is None:
        return None
    value = codec.decode(step.output)
    token = value.get("token") if isinstance(value, dict) else None
    return token if isinstance(token, str) else None


def _record_saves(storage: Storage, log: ExecutionLog) -> None:
    """Log every step save ``storage`` acknowledged (``saved``) or refused (``refused``)."""
    save = storage.save_step_result
    finish = storage.finish_run

    def note(ok: bool, lease: Lease, step: StepRecord) -> None:
        kind = "saved" if ok else "refused"
        log.write(kind, run=lease.run_id, step=step.name, token=_token(step), epoch=lease.epoch)

    async def save_step_result(lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        ok = await save(lease, step, extend)
        note(ok, lease, step)
        return ok

    async def finish_run(
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        ok = await finish(lease, status, output=output, error=error, step=step)
        if step is not None:
            note(ok, lease, step)
        return ok

    try:
        setattr(storage, "save_step_result", save_step_result)  # noqa: B010
        setattr(storage, "finish_run", finish_run)  # noqa: B010
    except AttributeError:
        # No instance attributes (``__slots__``): a subclass of the adapter's
        # class that adds no attributes of its own takes the instance over.
        async def save_method(_self: Any, *args: Any, **kwargs: Any) -> bool:
            return await save_step_result(*args, **kwargs)

        async def finish_method(_self: Any, *args: Any, **kwargs: Any) -> bool:
            return await finish_run(*args, **kwargs)

        cls = type(storage)
        methods = {"__slots__": (), "save_step_result": save_method, "finish_run": finish_method}
        object.__setattr__(storage, "__class__", type(cls.__name__, (cls,), methods))


_UNFINISHED: list[RunStatus] = ["pending", "running", "sleeping", "waiting"]


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _wait_for_file(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


async def _work(args: argparse.Namespace) -> None:
    log = ExecutionLog(args.logdir)
    wf = build(
        args.scenario,
        args.workflow,
        log,
        crash_in=args.crash_in,
        block_after=args.block_after,
        step_delay=args.step_delay,
    )
    storage = load_factory(args.target).make()
    _record_saves(storage, log)
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
        if args.enqueue:
            await engine.enqueue(wf, {"order": 1})
        if args.go_file:
            log.write("opened")
            await asyncio.to_thread(_wait_for_file, args.go_file)
        await engine.start()
        log.write("ready")
        idle_since: float | None = None
        while True:
            try:
                page = await engine.storage.list_runs(status=_UNFINISHED, workflow=wf.name, limit=1)
            except ReflowError as exc:  # the store is away: look again later
                logging.getLogger("reflow.crash_worker").warning("looking for work: %s", exc)
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


async def _enqueue(args: argparse.Namespace) -> None:
    log = ExecutionLog(args.logdir)
    store = load_factory(args.target).make()
    while True:
        try:
            await store.initialize()
            break
        except ReflowError:  # the store is away: try again
            await asyncio.sleep(0.05)
    try:
        for n in range(args.runs):
            new = NewRun(args.workflow, codec.encode({"n": n}), idempotency_key=f"load-{n}")
            while True:
                try:
                    result = await store.create_run(new)
                    break
                except ReflowError as exc:  # the store is away: create the same run again
                    logging.getLogger("reflow.crash_worker").warning("enqueue %d: %s", n, exc)
                    await asyncio.sleep(0.05)
            log.write("acked", n=n, run=result.run.id)
            if args.pace:
                await asyncio.sleep(args.pace)
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The crash worker's command line (see :mod:`reflow_conformance.testsupport`)."""
    parser = argparse.ArgumentParser(prog="python -m reflow_conformance.testsupport")
    commands = parser.add_subparsers(dest="command", required=True)
    work = commands.add_parser("work", help="run an engine until no run is left unfinished")
    enqueue = commands.add_parser("enqueue", help="create runs of the steps scenario")
    for command in (work, enqueue):
        command.add_argument("target", help="a storage URL or 'module:callable'")
        command.add_argument("logdir")
        command.add_argument("--workflow", help="the workflow's name (default crash-SCENARIO)")
    work.add_argument("--scenario", choices=SCENARIOS, default="steps")
    work.add_argument("--lease", default="2s")
    work.add_argument("--concurrency", type=int, default=8)
    work.add_argument(
        "--until-idle", type=float, default=0.5, help="stop after this long with nothing unfinished"
    )
    work.add_argument("--go-file", help="start working once this file exists")
    work.add_argument("--stop-file", help="do not stop before this file exists")
    work.add_argument("--block-after", type=int, help="block later steps after this many")
    work.add_argument("--crash-in", help="block in this step")
    work.add_argument("--step-delay", type=float, default=0.0)
    work.add_argument("--enqueue", action="store_true", help='first create one run, {"order": 1}')
    enqueue.add_argument("--runs", type=int, required=True)
    enqueue.add_argument("--pace", type=float, default=0.0, help="seconds between creates")
    args = parser.parse_args(argv)
    if args.command == "enqueue":
        args.workflow = args.workflow or "crash-steps"
    logging.basicConfig(
        filename=os.path.join(args.logdir, f"worker-{os.getpid()}.log"),
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(_work(args) if args.command == "work" else _enqueue(args))
    return 0
