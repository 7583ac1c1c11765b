"""Result latency: how soon ``result()`` returns after a run ends in another process.

    python benchmarks/result_latency.py [--backends postgres redis sqlite]
                                        [--steps 0 0.1 2.5] [--samples 40]
                                        [--concurrent 4] [--gap 0.05 0.15] [--json]
                                        [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                        [--redis-url redis://127.0.0.1:6379/0]

Two OS processes share one store: a worker (this script started again with
``--worker``: one engine, ``concurrency=25``) that runs a one-step workflow,
and the producer (this process) that enqueues runs and waits for each with
``engine.result(run_id)`` on an ``Engine(..., worker=False)`` with the
default poll interval (1 s). The step sleeps ``--steps`` seconds (0, 100 ms
and 2.5 s by default) and returns ``time.time()`` read just before it
returns; the producer reads ``time.time()`` as soon as ``result()`` returns
that value. The latency of a sample is the difference: the worker's
``finish_run`` and its commit, the finish hint (or the next poll) reaching
the producer, the producer's read and ``result()`` returning. Both clocks
are the machine's own.

Each round enqueues ``--concurrent`` runs at once (each of them waited for
right after its own enqueue) and waits for all of them, after an idle gap
of ``--gap`` (50-150 ms), so that the processes go idle between rounds as
they would between real requests. ``--samples`` samples per step duration
and variant.

Variants, measured in the same run on the same store and worker, their
rounds alternating (A B, B A, ...):

* ``hints``: the producer's storage as configured by default: on a backend
  with a finish channel (PostgreSQL ``LISTEN``, Redis pub/sub) the engine
  subscribes to it and reads a run again as soon as a hint names it;
* ``polling``: the producer's storage opened with ``listen=false``: it
  never hears a hint, and its reader finds the end by reading again, 10 ms
  after the waiter arrived and then backing off, doubling up to the poll
  interval (1 s). The baseline.

SQLite has no channel between processes: it has the polling variant alone.
The worker's storage is the same in both (its hints on); its poll interval
(``--worker-poll``, 0.1 s) only decides how soon a SQLite worker claims a
run, which is not part of the latency.

Each row also says how many samples had ended before their ``result()``
was called (``early``: a run that ends before its waiter arrives is found by
the waiter's first read, not by a hint) and how many finish hints the
producer's storage delivered while the row was measured (``hints``, for the
runs of both producers, which share the store; 0 when the storage has no
finish channel or does not listen).

PostgreSQL runs in a database of its own, ``reflow_result_latency_<pid>``
(schema ``result_latency``), dropped at the end, also on failure or
Ctrl-C/SIGTERM; Redis under the key prefix ``reflow_result_latency_<pid>``,
deleted afterwards; SQLite in a temporary file. A warm-up round of each
variant (not counted) comes first, so connections and subscriptions are up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatch_latency import delete_prefix, percentile
from throughput import (
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    cancel_on_sigterm,
    redis_settings,
    scratch_database,
    server_settings,
    with_options,
)

from reflow_core import Engine, Storage, open_storage, workflow
from reflow_core.storage import FinishSource

SCRIPT = str(Path(__file__).resolve())
WORKFLOW = "result-latency"
READY = "ready"
"""What the worker process prints once its engine runs."""
START_TIMEOUT = 60.0
RESULT_TIMEOUT = 60.0
"""A ``result()`` that has not returned after this many seconds fails the benchmark."""


def build_workflow() -> Any:
    async def step(ctx: Any) -> float:
        seconds = float(ctx.input["sleep"])
        if seconds > 0:
            await asyncio.sleep(seconds)
        return time.time()

    return workflow(WORKFLOW).step("s0", step)


# -- the worker process ---------------------------------------------------------


async def run_worker(url: str, concurrency: int, poll: float) -> None:
    """Run the workflow on ``url`` until standard input closes (or SIGTERM)."""
    cancel_on_sigterm()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    engine = Engine(
        storage=url,
        workflows=[build_workflow()],
        concurrency=concurrency,
        lease="60s",
        poll_interval=poll,
        load_entry_points=False,
    )
    async with engine:
        print(READY, flush=True)
        await stdin.read()  # the producer closes it when done


@contextlib.asynccontextmanager
async def worker_process(url: str, concurrency: int, poll: float) -> AsyncIterator[None]:
    """The worker process on ``url``, started and ready; stopped afterwards."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--worker",
        url,
        "--worker-concurrency",
        str(concurrency),
        "--worker-poll",
        str(poll),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        if line.decode().strip() != READY:
            raise RuntimeError(f"the worker process did not start (exit code {proc.returncode})")
        yield
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.terminate()
            await proc.wait()


# -- the producer -----------------------------------------------------------------


@dataclass
class Variant:
    name: str
    label: str
    url: str


@dataclass
class Backend:
    name: str
    label: str
    worker_url: str
    variants: list[Variant]


@dataclass
class Producer:
    """One variant's engine, with the finish hints its storage delivered."""

    variant: Variant
    engine: Engine
    channel: bool
    """Whether the storage has a finish channel (is a ``FinishSource``)."""
    hints: int = 0
    latencies: dict[float, list[float]] = field(default_factory=dict)
    early: dict[float, int] = field(default_factory=dict)


def count_hints(storage: Storage, producer: Producer) -> None:
    """Count the finish hints ``storage`` delivers to the engine's reader."""
    subscribe = getattr(storage, "subscribe_finishes", None)
    if subscribe is None:
        return

    async def counted(notify: Callable[[Collection[str] | None], None]) -> Any:
        def counting(run_ids: Collection[str] | None) -> None:
            producer.hints += 1
            notify(run_ids)

        return await subscribe(counting)

    storage.subscribe_finishes = counted  # type: ignore[attr-defined]


@dataclass
class Result:
    backend: str
    variant: str
    label: str
    step_s: float
    samples: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    early: int
    hints: int


async def one_sample(producer: Producer, wf: Any, seconds: float) -> tuple[float, bool]:
    """Enqueue one run and wait for it: the latency in ms, and whether the run
    had already ended when ``result()`` was called."""
    engine = producer.engine
    run = await engine.enqueue(wf, {"sleep": seconds})
    called = time.time()
    ended = await engine.result(run.id, timeout=RESULT_TIMEOUT)
    returned = time.time()
    return (returned - float(ended)) * 1000, float(ended) <= called


async def one_round(producer: Producer, wf: Any, seconds: float, concurrent: int) -> None:
    samples = await asyncio.gather(*(one_sample(producer, wf, seconds) for _ in range(concurrent)))
    latencies = producer.latencies.setdefault(seconds, [])
    for latency, early in samples:
        latencies.append(latency)
        producer.early[seconds] = producer.early.get(seconds, 0) + early


async def measure(backend: Backend, args: argparse.Namespace) -> list[Result]:
    wf = build_workflow()
    results: list[Result] = []
    async with contextlib.AsyncExitStack() as stack:
        producers: list[Producer] = []
        for variant in backend.variants:
            storage = open_storage(variant.url)
            engine = Engine(storage=storage, workflows=[wf], worker=False, load_entry_points=False)
            producer = Producer(variant, engine, isinstance(storage, FinishSource))
            count_hints(storage, producer)
            # The producers create the schema before the worker starts.
            await stack.enter_async_context(engine)
            producers.append(producer)
        await stack.enter_async_context(
            worker_process(backend.worker_url, args.worker_concurrency, args.worker_poll)
        )
        for producer in producers:  # warm-up: connections, subscriptions
            await one_round(producer, wf, 0.0, args.concurrent)
            producer.latencies.clear()
            producer.early.clear()
        rounds = math.ceil(args.samples / args.concurrent)
        for seconds in args.steps:
            hints_before = {id(p): p.hints for p in producers}
            for n in range(rounds):
                for producer in producers if n % 2 == 0 else producers[::-1]:
                    await asyncio.sleep(random.uniform(*args.gap))
                    await one_round(producer, wf, seconds, args.concurrent)
            for producer in producers:
                latencies = producer.latencies[seconds]
                label = producer.variant.label
                if producer.variant.name == "hints":
                    label += " (finish hints)" if producer.channel else " (no finish channel)"
                results.append(
                    Result(
                        backend=backend.name,
                        variant=producer.variant.name,
                        label=f"{backend.label}, {label}",
                        step_s=seconds,
                        samples=len(latencies),
                        p50_ms=percentile(latencies, 50),
                        p95_ms=percentile(latencies, 95),
                        p99_ms=percentile(latencies, 99),
                        max_ms=max(latencies),
                        early=producer.early.get(seconds, 0),
                        hints=producer.hints - hints_before[id(producer)],
                    )
                )
    return results


HEADER = (
    f"{'backend, producer':<64} {'step s':>6} {'samples':>7} {'p50 ms':>8} {'p95 ms':>8}"
    f" {'p99 ms':>8} {'max ms':>8} {'early':>5} {'hints':>6}"
)


def report(result: Result) -> None:
    print(
        f"{result.label:<64} {result.step_s:>6g} {result.samples:>7} {result.p50_ms:>8.1f}"
        f" {result.p95_ms:>8.1f} {result.p99_ms:>8.1f} {result.max_ms:>8.1f}"
        f" {result.early:>5} {result.hints:>6}",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    cancel_on_sigterm()
    print(
        f"python {sys.version.split()[0]}, producer poll_interval 1s (the default), "
        f"{args.concurrent} run(s) per round, idle gaps {args.gap[0] * 1000:.0f}-"
        f"{args.gap[1] * 1000:.0f} ms; latency from the step's end (its time.time()) "
        "to result() returning in the producer process"
    )
    async with contextlib.AsyncExitStack() as stack:
        tmpdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-result-latency-"))
        )
        backends: list[Backend] = []
        for name in args.backends:
            if name == "postgres":
                database = await stack.enter_async_context(
                    scratch_database(args.postgres_url, f"reflow_result_latency_{os.getpid()}")
                )
                print(await server_settings(database))
                url = with_options(database, schema="result_latency", pool_max_size=5)
                backends.append(
                    Backend(
                        name,
                        "postgres",
                        url,
                        [
                            Variant("hints", "listening", url),
                            Variant(
                                "polling",
                                "listen=false (polling)",
                                with_options(url, listen="false"),
                            ),
                        ],
                    )
                )
            elif name == "redis":
                print(await redis_settings(args.redis_url))
                prefix = f"reflow_result_latency_{os.getpid()}"
                stack.push_async_callback(delete_prefix, args.redis_url, prefix)
                url = f"{args.redis_url}?prefix={prefix}&max_connections=5"
                backends.append(
                    Backend(
                        name,
                        "redis",
                        url,
                        [
                            Variant("hints", "listening", url),
                            Variant("polling", "listen=false (polling)", f"{url}&listen=false"),
                        ],
                    )
                )
            else:
                url = f"sqlite:///{tmpdir}/result-latency.db"
                backends.append(
                    Backend(
                        name, "sqlite (WAL)", url, [Variant("polling", "polling (no channel)", url)]
                    )
                )
        if not args.json:
            print(f"\n{HEADER}")
        for backend in backends:
            for result in await measure(backend, args):
                if args.json:
                    print(json.dumps(result.__dict__), flush=True)
                else:
                    report(result)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["postgres", "redis", "sqlite"],
        choices=["postgres", "redis", "sqlite"],
    )
    parser.add_argument(
        "--steps",
        type=float,
        nargs="+",
        default=[0.0, 0.1, 2.5],
        help="how long the step takes, seconds (one row each)",
    )
    parser.add_argument(
        "--samples", type=int, default=40, help="samples per step duration and variant"
    )
    parser.add_argument(
        "--concurrent", type=int, default=4, help="runs enqueued and awaited at once per round"
    )
    parser.add_argument(
        "--gap", type=float, nargs=2, default=[0.05, 0.15], help="idle gap range, seconds"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="the Redis server to use")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a database to connect to while creating and dropping the benchmark's own",
    )
    parser.add_argument(
        "--worker-concurrency", type=int, default=25, help="the worker process's concurrency"
    )
    parser.add_argument(
        "--worker-poll",
        type=float,
        default=0.1,
        help="the worker process's poll interval, seconds (how soon SQLite claims)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line per result")
    parser.add_argument(
        "--worker", metavar="URL", help=argparse.SUPPRESS
    )  # the worker process's mode
    args = parser.parse_args()
    if args.samples < 1 or args.concurrent < 1:
        parser.error("--samples and --concurrent must be at least 1")
    if any(s < 0 for s in args.steps):
        parser.error("--steps must be at least 0")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        asyncio.run(
            run_worker(arguments.worker, arguments.worker_concurrency, arguments.worker_poll)
        )
    else:
        asyncio.run(main(arguments))
