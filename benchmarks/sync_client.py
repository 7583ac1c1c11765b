"""The blocking client: what a ``SyncClient`` call costs beside the same
call awaited on an ``Engine``, per backend.

    python benchmarks/sync_client.py [--backends sqlite postgres redis]
                                     [--calls 2000] [--passes 3]
                                     [--redis-url redis://127.0.0.1:6379/1]
                                     [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                     [--pool-size 25] [--tmp /tmp] [--out benchmarks/results]

A ``SyncClient`` hands each call from the calling thread to its loop thread
and waits for the outcome: one thread hop each way on top of the engine's
own call. Two shapes, ``--calls`` (2,000) ``enqueue`` calls each:

* **one caller**: one thread calling ``client.enqueue`` in a loop, against
  one coroutine awaiting ``engine.enqueue`` in a loop: the hop's latency;
* **20 callers**: 20 threads sharing one client (a WSGI server's threads),
  against 20 tasks sharing one engine: whether the threads get the
  concurrency of the engine's one connection pool.

Both sides use the same backend, a store of their own each pass, in
alternating order; each figure is the median of ``--passes`` (3) passes,
with the spread beside it. Output: the table, and ``--out/sync_client.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from backlog import DEFAULT_REDIS_URL, log, open_backend, tree
from throughput import add_postgres_options

from reflow_core import Engine, SyncClient, workflow

BACKENDS = ["sqlite", "postgres", "redis"]
NAME = "bench-sync-client"
CALLERS = (1, 20)


async def _noop(ctx: Any) -> None:
    return None


WF = workflow(NAME).step("s", _noop)


async def _async_pass(url: str, calls: int, callers: int) -> float:
    async with Engine(storage=url, workflows=[WF], worker=False, load_entry_points=False) as engine:
        for _ in range(10):  # connected and warm
            await engine.enqueue(WF, 0)

        async def caller(count: int) -> None:
            for i in range(count):
                await engine.enqueue(WF, i)

        start = time.perf_counter()
        await asyncio.gather(*(caller(calls // callers) for _ in range(callers)))
        return time.perf_counter() - start


def _sync_pass(url: str, calls: int, callers: int) -> float:
    with SyncClient(url, workflows=[WF], load_entry_points=False) as client:
        for _ in range(10):
            client.enqueue(WF, 0)
        barrier = threading.Barrier(callers + 1)

        def caller(count: int) -> None:
            barrier.wait()
            for i in range(count):
                client.enqueue(WF, i)

        threads = [
            threading.Thread(target=caller, args=(calls // callers,)) for _ in range(callers)
        ]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start


def _rate(calls: int, seconds: list[float]) -> dict[str, Any]:
    rates = [calls / s for s in seconds]
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "passes": rates,
    }


async def _measure(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with open_backend(name, args, tmp) as backend:
        urls = list(backend.urls.values())
        result["settings"] = backend.settings
        for callers in CALLERS:
            timings: dict[str, list[float]] = {"engine": [], "sync_client": []}
            for index in range(args.passes):
                url = urls[index % len(urls)]
                order = ["engine", "sync_client"] if index % 2 == 0 else ["sync_client", "engine"]
                for side in order:
                    if side == "engine":
                        seconds = await _async_pass(url, args.calls, callers)
                    else:
                        seconds = await asyncio.to_thread(_sync_pass, url, args.calls, callers)
                    timings[side].append(seconds)
                    log(f"{name} callers={callers} pass {index + 1} {side}: {seconds:.3f}s")
            engine = _rate(args.calls, timings["engine"])
            sync = _rate(args.calls, timings["sync_client"])
            result[f"callers_{callers}"] = {
                "engine": engine,
                "sync_client": sync,
                "ratio": sync["median"] / engine["median"],
            }
    return result


def _table(data: dict[str, Any]) -> str:
    lines = [
        "| backend | callers | engine.enqueue /s | SyncClient.enqueue /s | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, result in data["backends"].items():
        for callers in CALLERS:
            row = result[f"callers_{callers}"]
            engine, sync = row["engine"], row["sync_client"]
            lines.append(
                f"| {name} | {callers} | {engine['median']:,.0f} "
                f"({engine['min']:,.0f}-{engine['max']:,.0f}) | {sync['median']:,.0f} "
                f"({sync['min']:,.0f}-{sync['max']:,.0f}) | {row['ratio']:.2f}x |"
            )
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(args.tmp)
    data: dict[str, Any] = {
        "calls": args.calls,
        "passes": args.passes,
        "tree": tree(),
        "backends": {},
    }
    for name in args.backends:
        data["backends"][name] = await _measure(name, args, tmp)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    add_postgres_options(parser)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.calls % max(CALLERS):
        parser.error(f"--calls must be a multiple of {max(CALLERS)}")
    data = asyncio.run(_run(args))
    print(_table(data))
    out = Path(args.out) / "sync_client.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
