"""A fan-out with ``.map()`` and with child runs, against the same work as
separate runs, on each backend.

    python benchmarks/fanout.py [--items 10000] [--concurrency 100] [--passes 3]
                                [--backends memory sqlite postgres redis]
                                [--postgres-url ...] [--redis-url ...] [--pool-size 25]

Each pass does the same work two ways, on a fresh store each (a new SQLite
file, PostgreSQL schema or Redis key prefix, as ``throughput.py`` makes them):

* ``map``: one run of a workflow whose single node is
  ``.map("item", ..., concurrency=C)`` over N items; each item returns a small
  dict and is saved as its own step. Timed from the worker's start to the
  run's durable completion: ``items/s``.
* ``children``: one run whose step starts N child runs of the one-step
  workflow (``ctx.start_child``, all at once with ``asyncio.gather``) and
  awaits them all, the engine at
  ``concurrency=C``: the parent waits without a slot, the children run on
  the same worker. Timed from the worker's start to the parent's durable
  completion: ``children/s``.
* ``runs`` (the baseline): N runs of a one-step workflow whose step returns
  the same dict, enqueued first, the engine at ``concurrency=C``. Timed the
  same way: ``runs/s``.

The variants take turns, their order rotated every pass, after one warm-up
round of each; figures are medians with the spread, and the ratio of each
median to the runs' median. An item costs one fenced step save; a separate
run costs a create, a claim and a finish; a child costs a fenced start, a
claim and a finish that checks whether it was its parent's last open child
(the parent's resumed step reads its ended children in one call).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from throughput import (
    BACKENDS,
    Backend,
    _Completion,
    add_backend_options,
    cancel_on_sigterm,
    open_backend,
)

from reflow_core import Engine, Workflow, workflow


async def _item(ctx: Any) -> dict[str, int]:
    return {"i": ctx.prev}


def _fanout(items: int, concurrency: int) -> Any:
    return workflow("bench-fanout").map(
        "item", lambda ctx: list(range(items)), _item, concurrency=concurrency, max_items=items
    )


async def _timed(
    backend: Backend,
    workflows: list[Workflow[Any, Any]],
    concurrency: int,
    runs: list[tuple[Workflow[Any, Any], Any]],
    finishes: int,
) -> float:
    """Seconds from the worker's start to the ``finishes``-th durable end, on
    a fresh store holding ``runs``."""
    storage = backend.make()
    done = _Completion(storage, finishes)
    engine = Engine(
        storage=storage,
        workflows=workflows,
        concurrency=concurrency,
        lease="60s",
        poll_interval="50ms",
    )
    await storage.initialize()
    for wf, value in runs:
        await engine.enqueue(wf, value)
    started = time.perf_counter()
    await engine.start()
    await done.event.wait()
    took = time.perf_counter() - started
    await engine.stop()
    await storage.close()
    await backend.dispose(storage)
    return took


async def map_pass(backend: Backend, items: int, concurrency: int) -> float:
    wf = _fanout(items, concurrency)
    return items / await _timed(backend, [wf], concurrency, [(wf, None)], 1)


async def children_pass(backend: Backend, items: int, concurrency: int) -> float:
    one = workflow("bench-one").step("item", _item)

    async def spawn(ctx: Any) -> int:
        handles = await asyncio.gather(*(ctx.start_child(one, i) for i in range(items)))
        return len([await handle.result() for handle in handles])

    parent = workflow("bench-parent").step("spawn", spawn)
    # The children end, then their parent.
    took = await _timed(backend, [parent, one], concurrency, [(parent, None)], items + 1)
    return items / took


async def runs_pass(backend: Backend, items: int, concurrency: int) -> float:
    wf = workflow("bench-one").step("item", _item)
    runs = [(wf, i) for i in range(items)]
    return items / await _timed(backend, [wf], concurrency, runs, items)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):>9,.0f} (spread {min(values):,.0f}-{max(values):,.0f})"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--passes", type=int, default=3)
    add_backend_options(parser, BACKENDS)
    args = parser.parse_args()
    cancel_on_sigterm()
    print(
        f"python {sys.version.split()[0]}, N={args.items} items, concurrency "
        f"{args.concurrency}, {args.passes} passes after a warm-up, medians"
    )
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-fanout-")))
        for name in args.backends:
            backend = await open_backend(name, args, stack, tmp, database="reflow_bench_fanout")
            warm = min(args.items, 500)
            variants = {"map": map_pass, "children": children_pass, "runs": runs_pass}
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for variant in variants.values():
                await variant(backend, warm, args.concurrency)
            names = list(variants)
            for n in range(args.passes):
                for name in names[n % 3 :] + names[: n % 3]:
                    rates[name].append(await variants[name](backend, args.items, args.concurrency))
            baseline = statistics.median(rates["runs"])
            print(f"\n{backend.label}")
            print(f"  map       items/s    {_median(rates['map'])}")
            print(f"  children  children/s {_median(rates['children'])}")
            print(f"  runs      runs/s     {_median(rates['runs'])}")
            print(f"  map / runs           {statistics.median(rates['map']) / baseline:.2f}x")
            print(f"  children / runs      {statistics.median(rates['children']) / baseline:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
