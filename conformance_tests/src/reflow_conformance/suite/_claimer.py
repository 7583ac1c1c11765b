"""A worker process for the multi-process claim test (not a test module).

    python _claimer.py TARGET WORKFLOW RUNS OUTPUT

It rebuilds the adapter from ``TARGET`` (see
:func:`reflow_conformance.harness.load_factory`), opens a storage, prints
``ready`` and waits for a line on stdin, so every worker starts claiming at
the same moment. Then it claims runs of ``WORKFLOW`` in small batches and
finishes each with its process id as the output, until claims keep coming
back empty or it has claimed ``RUNS`` runs (as many as exist, so more would
mean claims of runs already held). ``OUTPUT`` receives one line per claimed
run: the run id, the lease epoch, the process id, and 1 if ``finish_run``
accepted the lease.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta
from pathlib import Path

from reflow_conformance.harness import load_factory
from reflow_core import codec
from reflow_core.storage import Storage

BATCH = 5
LEASE = timedelta(minutes=10)
IDLE_CLAIMS = 5
"""Empty claims in a row (a little apart) before the worker stops."""


async def _open(target: str) -> Storage:
    storage = load_factory(target).make()
    await storage.initialize()
    return storage


async def _work(storage: Storage, workflow: str, runs: int, lines: list[str]) -> None:
    pid = os.getpid()
    idle = 0
    while idle < IDLE_CLAIMS and len(lines) < runs:
        batch = await storage.claim_runs([workflow], BATCH, LEASE)
        if not batch:
            idle += 1
            await asyncio.sleep(0.02)
            continue
        idle = 0
        for claimed in batch:
            lease = claimed.lease
            done = await storage.finish_run(lease, "completed", output=codec.encode(pid))
            lines.append(f"{lease.run_id} {lease.epoch} {pid} {int(done)}\n")


def main(argv: list[str]) -> int:
    target, workflow, runs, output = argv
    with asyncio.Runner() as runner:
        storage = runner.run(_open(target))
        lines: list[str] = []
        try:
            print("ready", flush=True)
            sys.stdin.readline()
            runner.run(_work(storage, workflow, int(runs), lines))
        finally:
            runner.run(storage.close())
            Path(output).write_text("".join(lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
