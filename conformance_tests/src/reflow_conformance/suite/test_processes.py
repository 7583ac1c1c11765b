"""Claimers in several processes sharing one store (capability ``multiprocess``)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.testsupport import child_env
from reflow_core import codec
from reflow_core.storage import Storage

from ._util import create_many, read_run

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestProcesses"]

_WORKER = Path(__file__).with_name("_claimer.py")
_PROCESSES = 4
_RUNS = 2000
_START_TIMEOUT = 60.0
_RUN_TIMEOUT = 120.0


@pytest.mark.reflow_requires("multiprocess")
class TestProcesses:
    def test_claimers_in_several_processes_get_disjoint_runs(
        self, reflow: Harness, tmp_path: Path
    ) -> None:
        target = reflow.process_target()
        wf = reflow.unique()
        outputs = [tmp_path / f"claims-{i}.txt" for i in range(_PROCESSES)]

        async def body(s: Storage) -> None:
            ids = set(await create_many(s, wf, _RUNS))
            workers = await _start(target, wf, outputs)
            try:
                for worker in workers:
                    assert worker.stdin is not None
                    worker.stdin.write(b"go\n")
                    await worker.stdin.drain()
                ended = await asyncio.wait_for(
                    asyncio.gather(*(w.communicate() for w in workers)), _RUN_TIMEOUT
                )
            finally:
                await _stop(workers)
            for worker, (_, err) in zip(workers, ended, strict=True):
                promise(
                    worker.returncode == 0,
                    P.CONCURRENT_ACCESS,
                    f"a claiming process failed ({worker.returncode}):\n{err.decode()[-3000:]}",
                )
            claims: list[tuple[str, int, int, bool]] = []
            for output in outputs:
                for line in output.read_text(encoding="utf-8").splitlines():
                    run_id, epoch, pid, finished = line.split()
                    claims.append((run_id, int(epoch), int(pid), finished == "1"))
            # A worker may stop while another holds runs it skipped: sweep the rest.
            for _ in range(_RUNS):
                leftovers = await s.claim_runs([wf], 100, reflow.long_lease)
                if not leftovers or len(claims) > _RUNS:
                    break
                for c in leftovers:
                    done = await s.finish_run(c.lease, "completed", output=codec.encode(0))
                    claims.append((c.run.id, c.lease.epoch, 0, done))

            claimed = [claim[0] for claim in claims]
            twice = sorted({run_id for run_id in claimed if claimed.count(run_id) > 1})
            promise(not twice, P.ONE_LIVE_LEASE, f"claimed more than once: {twice[:10]}")
            promise(
                set(claimed) == ids, P.NO_LOST_RUNS, f"never claimed: {sorted(ids - set(claimed))}"
            )
            stale = [claim for claim in claims if claim[1] != 1]
            promise(not stale, P.CLAIM_COUNTS, f"first claims with an epoch other than 1: {stale}")
            refused = [claim for claim in claims if not claim[3]]
            promise(not refused, P.LIVE_LEASE_ACCEPTED, f"finish refused: {refused[:10]}")
            holders = {run_id: pid for run_id, _, pid, _ in claims}
            for run_id in sorted(ids):
                run = await read_run(s, run_id)
                promise(
                    (run.status, run.attempts) == ("completed", 1),
                    P.ONE_LIVE_LEASE,
                    f"{run_id}: status {run.status!r} after {run.attempts} claims",
                )
                output = codec.decode(run.output or "null")
                promise(
                    output == holders.get(run_id),
                    P.ONE_LIVE_LEASE,
                    f"{run_id} finished by process {output}, claimed by {holders.get(run_id)}",
                )

        reflow.run(body)


async def _start(
    target: str, workflow: str, outputs: list[Path]
) -> list[asyncio.subprocess.Process]:
    """Start the workers and wait until each has opened the store."""
    workers: list[asyncio.subprocess.Process] = []
    env = child_env()
    try:
        for output in outputs:
            workers.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(_WORKER),
                    target,
                    workflow,
                    str(_RUNS),
                    str(output),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                )
            )
        for worker in workers:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), _START_TIMEOUT)
            if line.strip() != b"ready":
                _, err = await worker.communicate()
                promise(
                    False,
                    P.CONCURRENT_ACCESS,
                    f"a worker process could not open the store:\n{err.decode()[-3000:]}",
                )
    except BaseException:
        await _stop(workers)
        raise
    return workers


async def _stop(workers: list[asyncio.subprocess.Process]) -> None:
    """Kill the workers still running (after a failure or a timeout) and reap them."""
    for worker in workers:
        if worker.returncode is None:
            worker.kill()
            await worker.communicate()
