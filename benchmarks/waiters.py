"""Waiters: what 2,000 ``result()`` calls cost the engine that runs the runs.

    python benchmarks/waiters.py [--backends sqlite postgres redis] [--runs 2000]
                                 [--waiters 2000] [--passes 3] [--concurrency 25]
                                 [--poll-interval 1] [--settle 0.2] [--json]
                                 [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                 [--redis-url redis://127.0.0.1:6379/0]

One process, one engine (``concurrency=25``) that both executes the runs and
is waited on. Each pass enqueues ``--runs`` one-step runs (2,000, through
``enqueue_many``, untimed) into a fresh store, then, in the ``waiters``
variant, starts ``--waiters`` concurrent ``engine.result(run_id)`` calls
(2,000: one per run; more waiters than runs wait on the runs in turn) and
lets them wait ``--settle`` seconds (0.2; their reader reads the pending
runs, backing off); then it starts the worker and times the drain: from the worker's start to
the storage's ``finish_run`` of the last run returning (durably finished,
as ``throughput.py`` counts it). The ``none`` variant is the same drain
with no waiter. The variants alternate (none first in even passes, waiters
first in odd ones), after one warm-up pass of each with 200 runs.

Reads: the storage's ``get_run`` and ``get_runs`` are wrapped (on the
storage object itself, so the engine's checks of what the storage offers,
``WakeupSource`` and ``FinishSource``, see the storage as it is) and count
every call made during the drain, with the run ids each asked for. The
engine's waiters share one reader, which reads all the runs waited for at
most once per 10 ms (``get_runs`` takes up to 1,000 ids a call, so 2,000
waited runs are two calls a tick): ``reads/s`` is the calls per second of
the drain. A ``none`` pass makes no such call.

Reported per backend: the drain rate of each variant (runs/s; the median of
the passes, the spread in brackets), the ratio waiters / none, the reads a
second and run ids read a second during the drain with waiters, the share
of the drain during which a read was in flight (from its call to its
return), and how long after the last finish the last ``result()`` returned. Every ``result()``
is checked to return its run's output.

Stores: a new SQLite file per pass (WAL, ``synchronous=NORMAL``), a new
PostgreSQL schema per pass in a database of its own
(``reflow_waiters_<pid>``, dropped at the end, also on failure or
Ctrl-C/SIGTERM), a new Redis key prefix per pass (deleted after it), or
``memory://``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from throughput import (
    Backend,
    _Completion,
    add_backend_options,
    cancel_on_sigterm,
    open_backend,
)

from reflow_core import Engine, Storage, workflow
from reflow_core.storage import RunRecord

WARM_UP_RUNS = 200
ENQUEUE_BATCH = 500
DRAIN_TIMEOUT = 300.0
"""A drain that has not finished after this many seconds fails the benchmark."""


class _Reads:
    """Counts the storage's ``get_run`` and ``get_runs`` calls, the ids they
    ask for and the time from each call to its return."""

    def __init__(self, storage: Storage) -> None:
        self.calls = 0
        self.ids = 0
        self.seconds = 0.0
        get_run = storage.get_run
        get_runs = storage.get_runs

        async def counted_get_run(run_id: str) -> RunRecord | None:
            self.calls += 1
            self.ids += 1
            began = time.perf_counter()
            try:
                return await get_run(run_id)
            finally:
                self.seconds += time.perf_counter() - began

        async def counted_get_runs(run_ids: Collection[str]) -> dict[str, RunRecord]:
            self.calls += 1
            self.ids += len(run_ids)
            began = time.perf_counter()
            try:
                return await get_runs(run_ids)
            finally:
                self.seconds += time.perf_counter() - began

        storage.get_run = counted_get_run  # type: ignore[method-assign]
        storage.get_runs = counted_get_runs  # type: ignore[method-assign]

    def reset(self) -> None:
        self.calls = 0
        self.ids = 0
        self.seconds = 0.0


def build_workflow() -> Any:
    async def step(ctx: Any) -> dict[str, int]:
        return {"n": ctx.input["n"]}

    return workflow("waiters").step("s0", step)


@dataclass
class PassResult:
    variant: str
    runs: int
    waiters: int
    drain_s: float
    runs_per_s: float
    reads: int
    """``get_run``/``get_runs`` calls during the drain."""
    ids_read: int
    reads_per_s: float
    read_share: float
    """The share of the drain some read was in flight (from call to return)."""
    last_result_after_s: float | None
    """With waiters: from the last finish to the last ``result()`` returning."""


async def one_pass(
    backend: Backend,
    runs: int,
    waiters: int,
    concurrency: int,
    poll: float,
    settle: float,
) -> PassResult:
    wf = build_workflow()
    storage = backend.make()
    reads = _Reads(storage)
    done = _Completion(storage, runs)
    engine = Engine(
        storage=storage,
        workflows=[wf],
        concurrency=concurrency,
        lease="60s",
        poll_interval=poll,
        load_entry_points=False,
    )
    await storage.initialize()
    ids: list[str] = []
    for low in range(0, runs, ENQUEUE_BATCH):
        made = await engine.enqueue_many(
            wf, [{"n": n} for n in range(low, min(low + ENQUEUE_BATCH, runs))]
        )
        ids.extend(run.id for run in made)

    async def wait(n: int) -> None:
        output = await engine.result(ids[n % runs])
        if output != {"n": n % runs}:
            raise RuntimeError(f"result() of run {n % runs} returned {output!r}")

    tasks = [asyncio.create_task(wait(n)) for n in range(waiters)]
    await asyncio.sleep(settle)  # every waiter is waiting, the reader backing off
    for task in tasks:
        if task.done():
            task.result()  # a waiter that failed already
    reads.reset()
    t0 = time.perf_counter()
    await engine.start()
    await asyncio.wait_for(done.event.wait(), DRAIN_TIMEOUT)
    t_done = time.perf_counter()
    calls, ids_read, read_seconds = reads.calls, reads.ids, reads.seconds
    await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_TIMEOUT)
    t_waited = time.perf_counter()
    await engine.stop()
    await engine.close()
    await backend.dispose(storage)
    drain = t_done - t0
    return PassResult(
        variant="waiters" if waiters else "none",
        runs=runs,
        waiters=waiters,
        drain_s=drain,
        runs_per_s=runs / drain,
        reads=calls,
        ids_read=ids_read,
        reads_per_s=calls / drain,
        read_share=read_seconds / drain,
        last_result_after_s=t_waited - t_done if waiters else None,
    )


async def measure(backend: Backend, args: argparse.Namespace) -> list[PassResult]:
    """A warm-up pass of each variant, then ``passes`` of each, alternating."""
    for waiters in (0, min(args.waiters, WARM_UP_RUNS)):
        await one_pass(
            backend, WARM_UP_RUNS, waiters, args.concurrency, args.poll_interval, args.settle
        )
    results: list[PassResult] = []
    for n in range(args.passes):
        order = (0, args.waiters) if n % 2 == 0 else (args.waiters, 0)
        for waiters in order:
            results.append(
                await one_pass(
                    backend, args.runs, waiters, args.concurrency, args.poll_interval, args.settle
                )
            )
    return results


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(label: str, results: list[PassResult]) -> None:
    none = [r for r in results if r.variant == "none"]
    waited = [r for r in results if r.variant == "waiters"]
    ratio = statistics.median(r.runs_per_s for r in waited) / statistics.median(
        r.runs_per_s for r in none
    )
    lags = [r.last_result_after_s * 1000 for r in waited if r.last_result_after_s is not None]
    rows = [
        ("drain, no waiter", f"{spread([r.runs_per_s for r in none])} runs/s"),
        (
            f"drain, {waited[0].waiters:,} waiters",
            f"{spread([r.runs_per_s for r in waited])} runs/s",
        ),
        ("ratio waiters / none", f"{ratio:.2f}x (medians)"),
        (
            "reads/s, waiters",
            f"{spread([r.reads_per_s for r in waited], ',.1f')} get_run(s) calls a second",
        ),
        ("ids read/s, waiters", spread([r.ids_read / r.drain_s for r in waited])),
        (
            "reads in flight",
            f"{spread([r.read_share * 100 for r in waited], ',.0f')} % of the drain (waiters)",
        ),
        ("reads/s, no waiter", spread([r.reads_per_s for r in none], ",.1f")),
        ("last result() after", f"{spread(lags, ',.1f')} ms after the last finish"),
    ]
    print(f"\n{label}")
    for name, figure in rows:
        print(f"  {name:<22} {figure}")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2000, help="one-step runs per pass")
    parser.add_argument(
        "--waiters", type=int, default=2000, help="concurrent result() calls in a waiters pass"
    )
    parser.add_argument("--passes", type=int, default=3, help="passes of each variant")
    parser.add_argument("--concurrency", type=int, default=25, help="the engine's concurrency")
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="the engine's poll interval, seconds"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="seconds the waiters wait before the worker starts (both variants pause)",
    )
    add_backend_options(parser, ["sqlite", "postgres", "redis"])
    parser.add_argument("--json", action="store_true", help="print one JSON line per pass")
    args = parser.parse_args()
    if args.runs < 1 or args.waiters < 1 or args.passes < 1:
        parser.error("--runs, --waiters and --passes must be at least 1")
    cancel_on_sigterm()
    print(
        f"python {sys.version.split()[0]}, {args.runs:,} one-step runs, concurrency "
        f"{args.concurrency}, {args.waiters:,} waiters against none, {args.passes} passes "
        "of each, alternating, after a warm-up"
    )
    async with contextlib.AsyncExitStack() as stack:
        tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-waiters-")))
        for name in args.backends:
            backend = await open_backend(name, args, stack, tmpdir, database="reflow_waiters")
            results = await measure(backend, args)
            if args.json:
                for result in results:
                    print(json.dumps({"backend": backend.label, **result.__dict__}), flush=True)
            else:
                report(backend.label, results)


if __name__ == "__main__":
    asyncio.run(main())
