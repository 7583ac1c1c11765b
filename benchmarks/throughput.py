"""Throughput on the shared workload: N runs of a K-step workflow, concurrency 25.

    python benchmarks/throughput.py [--runs 2000] [--steps 1 5] [--passes 3]
                                    [--backends memory sqlite] [--synchronous NORMAL]

For each backend and K, after one warm-up pass, each pass:

* enqueues N runs one after another (``enqueue/s``: the enqueue loop alone);
* starts one engine (``concurrency=25``) and times from the start of the
  worker until the last run is durably completed (``runs/s`` and ``steps/s``);
* reports the end-to-end figure (first enqueue to last completion).

Every step returns a small dict. Each pass uses a fresh store (a new SQLite
file). Figures are the best and the median of the passes, with the spread
(min-max), so compare ratios measured in one run: the machine is shared.
SQLite runs with ``journal_mode=WAL`` and the ``synchronous`` level given
(NORMAL by default, like reflow-ts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflow_core import Engine, Storage, open_storage, workflow


class _Completion:
    """Counts finished runs through the storage's ``finish_run`` and wakes the
    benchmark when the last one is durable (no polling in the measured loop)."""

    def __init__(self, storage: Storage, target: int) -> None:
        self.storage = storage
        self.target = target
        self.done = 0
        self.event = asyncio.Event()
        original = storage.finish_run

        async def finish_run(*args: Any, **kwargs: Any) -> bool:
            ok = await original(*args, **kwargs)
            if ok:
                self.done += 1
                if self.done >= self.target:
                    self.event.set()
            return ok

        storage.finish_run = finish_run  # type: ignore[method-assign]


def build_workflow(steps: int) -> Any:
    async def step(ctx: Any) -> dict[str, int]:
        return {"i": ctx.attempt}

    wf: Any = workflow(f"bench-{steps}")
    for k in range(steps):
        wf = wf.step(f"s{k}", step)
    return wf


@dataclass
class PassResult:
    enqueue_per_s: float
    runs_per_s: float
    steps_per_s: float
    end_to_end_runs_per_s: float


async def one_pass(make_storage: Callable[[], Storage], runs: int, steps: int) -> PassResult:
    wf = build_workflow(steps)
    storage = make_storage()
    done = _Completion(storage, runs)
    engine = Engine(
        storage=storage, workflows=[wf], concurrency=25, lease="60s", poll_interval="50ms"
    )
    await storage.initialize()
    t0 = time.perf_counter()
    for i in range(runs):
        await engine.enqueue(wf, {"n": i})
    t_enqueued = time.perf_counter()
    await engine.start()
    await done.event.wait()
    t_done = time.perf_counter()
    await engine.stop()
    await storage.close()
    drain = t_done - t_enqueued
    return PassResult(
        enqueue_per_s=runs / (t_enqueued - t0),
        runs_per_s=runs / drain,
        steps_per_s=runs * steps / drain,
        end_to_end_runs_per_s=runs / (t_done - t0),
    )


def storage_factory(backend: str, synchronous: str, tmp: Path) -> Callable[[], Storage]:
    counter = 0

    def make() -> Storage:
        nonlocal counter
        counter += 1
        if backend == "memory":
            return open_storage("memory://")
        if backend == "sqlite":
            return open_storage(f"sqlite:///{tmp}/bench-{counter}.db?synchronous={synchronous}")
        raise SystemExit(f"unknown backend {backend!r}")

    return make


def summarize(values: list[float]) -> str:
    best, median, low = max(values), statistics.median(values), min(values)
    return f"{best:>9,.0f} (median {median:,.0f}, spread {low:,.0f}-{best:,.0f})"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["memory", "sqlite"])
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--json", action="store_true", help="print one JSON line per result")
    args = parser.parse_args()
    version = sys.version.split()[0]
    print(f"python {version}, N={args.runs}, concurrency 25, best of {args.passes} after a warm-up")
    with tempfile.TemporaryDirectory(prefix="reflow-bench-") as tmpdir:
        for backend in args.backends:
            make = storage_factory(backend, args.synchronous, Path(tmpdir))
            label = (
                backend if backend != "sqlite" else f"sqlite (WAL, synchronous={args.synchronous})"
            )
            for steps in args.steps:
                await one_pass(make, min(args.runs, 200), steps)  # warm-up
                results = [await one_pass(make, args.runs, steps) for _ in range(args.passes)]
                if args.json:
                    print(
                        json.dumps(
                            {
                                "backend": label,
                                "steps": steps,
                                "passes": [r.__dict__ for r in results],
                            }
                        )
                    )
                    continue
                print(f"\n{label}, K={steps}")
                print(f"  enqueue/s   {summarize([r.enqueue_per_s for r in results])}")
                print(f"  runs/s      {summarize([r.runs_per_s for r in results])}")
                print(f"  steps/s     {summarize([r.steps_per_s for r in results])}")
                print(
                    f"  end-to-end  {summarize([r.end_to_end_runs_per_s for r in results])} runs/s"
                )


if __name__ == "__main__":
    asyncio.run(main())
