"""Dispatch latency: how soon an idle worker starts a run another process enqueued.

    python benchmarks/dispatch_latency.py [--backends postgres postgres-poll redis sqlite]
                                          [--samples 200] [--poll-samples 30]
                                          [--poll-interval 1] [--gap 0.05 0.15]
                                          [--poll-gap LOW HIGH] [--breakdown] [--json]
                                          [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

Two engines share one store through two storage objects, as two processes
would: a producer (``worker=False``) that only enqueues, and a worker
(``concurrency=25``, ``poll_interval=--poll-interval``) that runs a one-step
workflow. Each sample waits a random idle gap (``--gap``, 50-150 ms), so the
worker is idle, then enqueues one run. The latency of a sample is the time
from just before the producer calls ``engine.enqueue(...)`` to the moment the
worker's first step starts (the step reads the clock first thing); it includes
the enqueue itself, whose duration is reported apart (``enqueue p50``), as is
the latency counted from ``enqueue`` returning (``from return p50``, which can
be below zero when the worker starts the step before the producer has read
the reply). The next gap starts once the run has durably completed. Both
engines share one event loop, so one clock times both ends.

Backends:

* ``postgres``: ``LISTEN``/``NOTIFY`` wake-ups (the default configuration);
* ``postgres-poll``: ``notify=false&listen=false``, polling only;
* ``redis``: pub/sub wake-ups, under a key prefix deleted afterwards;
* ``sqlite``: one WAL file, polling only.

Polling backends take ``--poll-samples`` samples (fewer: each one waits up to
a poll interval). A polling worker looks again one poll interval after its
last claim, and the previous sample's claim is what starts that interval, so
with gaps much shorter than the interval a sample waits about
``poll_interval - gap`` (near 900 ms with the defaults), not half an interval;
``--poll-gap 0.05 1.05`` spreads the arrivals over a whole interval instead.

``--breakdown`` also says where a sample's time goes, each stage's median
(and 90th percentile) counted from the same moment, just before
``enqueue()``, and timed through the storages' public methods:

* ``create_run``: the producer's storage is called (the engine's work
  before it: validation, encoding) and returns (the store's write and
  commit, and the reply);
* ``hint``: the worker's storage delivers the wake-up (the callback given
  to ``subscribe_wakeups``), the first one after ``enqueue()`` was called;
* ``claim sent`` / ``claim back``: the worker's ``claim_runs`` call that
  returned the run is made, and returns;
* ``step``: the step starts (the sample's latency).

PostgreSQL runs in a database of its own, ``reflow_latency_<pid>``, with a
fresh schema per backend; the database is dropped at the end, also on failure.
A few warm-up samples (not counted) come first, so connections and the
``LISTEN`` are established.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from throughput import (
    add_postgres_options,
    cancel_on_sigterm,
    scratch_database,
    server_settings,
    with_options,
)

from reflow_core import Engine, Storage, open_storage, workflow
from reflow_core.storage import ClaimedRun, CreateResult, NewRun

WARM_UP = 5
STEP_TIMEOUT = 30.0
"""A sample whose step has not started after this many seconds fails the benchmark."""
STAGES = ("create_run called", "create_run returned", "hint", "claim sent", "claim back", "step")
"""The stages ``--breakdown`` reports, in the order a sample passes them."""


@dataclass
class Config:
    name: str
    label: str
    url: str
    polling: bool


@dataclass
class Result:
    name: str
    label: str
    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    enqueue_p50_ms: float
    from_return_p50_ms: float
    stages: dict[str, list[float]] | None = None
    """For ``--breakdown``: :func:`stage_figures` of the samples."""


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class _Finished:
    """Sets an event whenever the wrapped storage durably finishes a run."""

    def __init__(self, storage: Storage) -> None:
        self.event = asyncio.Event()
        original = storage.finish_run

        async def finish_run(*args: Any, **kwargs: Any) -> bool:
            ok = await original(*args, **kwargs)
            if ok:
                self.event.set()
            return ok

        storage.finish_run = finish_run  # type: ignore[method-assign]


class _Stamps:
    """Times the stages of each sample through the storages' public methods
    (see ``--breakdown``): the producer's ``create_run``, the worker's
    wake-up callback and its ``claim_runs``."""

    def __init__(self, producer: Storage, worker: Storage) -> None:
        self.creates: list[tuple[float, float]] = []
        self.hints: list[float] = []
        self.claims: dict[str, tuple[float, float]] = {}
        create_run = producer.create_run
        claim_runs = worker.claim_runs

        async def timed_create(new: NewRun) -> CreateResult:
            began = time.perf_counter()
            result = await create_run(new)
            self.creates.append((began, time.perf_counter()))
            return result

        async def timed_claim(*args: Any, **kwargs: Any) -> list[ClaimedRun]:
            began = time.perf_counter()
            claimed = await claim_runs(*args, **kwargs)
            ended = time.perf_counter()
            for c in claimed:
                self.claims[c.run.id] = (began, ended)
            return claimed

        producer.create_run = timed_create  # type: ignore[method-assign]
        worker.claim_runs = timed_claim  # type: ignore[method-assign]
        subscribe = getattr(worker, "subscribe_wakeups", None)
        if subscribe is not None:

            async def timed_subscribe(workflows: Any, wake: Any) -> Any:
                def stamped() -> None:
                    self.hints.append(time.perf_counter())
                    wake()

                return await subscribe(workflows, stamped)

            worker.subscribe_wakeups = timed_subscribe  # type: ignore[attr-defined]

    def start(self) -> None:
        self.creates.clear()
        self.hints.clear()

    def sample(self, t_call: float, run_id: str, t_step: float) -> dict[str, float]:
        """The stages of the sample that began at ``t_call``, in ms after it."""
        ms: dict[str, float] = {}
        if self.creates:
            began, ended = self.creates[0]
            ms["create_run called"] = (began - t_call) * 1000
            ms["create_run returned"] = (ended - t_call) * 1000
        hints = [t for t in self.hints if t >= t_call]
        if hints:
            ms["hint"] = (hints[0] - t_call) * 1000
        claim = self.claims.pop(run_id, None)
        if claim is not None:
            ms["claim sent"] = (claim[0] - t_call) * 1000
            ms["claim back"] = (claim[1] - t_call) * 1000
        ms["step"] = (t_step - t_call) * 1000
        return ms


async def measure(
    config: Config,
    samples: int,
    poll: float,
    gap: tuple[float, float],
    breakdown: bool = False,
) -> Result:
    started: dict[int, asyncio.Future[float]] = {}

    async def first(ctx: Any) -> dict[str, int]:
        now = time.perf_counter()
        future = started.get(ctx.input["n"])
        if future is not None and not future.done():
            future.set_result(now)
        return {"n": ctx.input["n"]}

    wf: Any = workflow("latency").step("s0", first)
    producer_storage = open_storage(config.url)
    producer = Engine(storage=producer_storage, workflows=[wf], worker=False, poll_interval=poll)
    worker_storage = open_storage(config.url)
    finished = _Finished(worker_storage)
    stamps = _Stamps(producer_storage, worker_storage) if breakdown else None
    stages: list[dict[str, float]] = []
    worker = Engine(
        storage=worker_storage, workflows=[wf], concurrency=25, lease="60s", poll_interval=poll
    )
    latencies: list[float] = []
    enqueues: list[float] = []
    from_return: list[float] = []
    loop = asyncio.get_running_loop()
    # The producer creates the schema before the worker starts.
    async with producer, worker:
        for n in range(-WARM_UP, samples):
            await asyncio.sleep(random.uniform(*gap))
            future: asyncio.Future[float] = loop.create_future()
            started[n] = future
            finished.event.clear()
            if stamps is not None:
                stamps.start()
            t_call = time.perf_counter()
            run = await producer.enqueue(wf, {"n": n})
            t_return = time.perf_counter()
            t_step = await asyncio.wait_for(future, STEP_TIMEOUT)
            await asyncio.wait_for(finished.event.wait(), STEP_TIMEOUT)
            sample = {} if stamps is None else stamps.sample(t_call, run.id, t_step)
            if n >= 0:
                latencies.append((t_step - t_call) * 1000)
                enqueues.append((t_return - t_call) * 1000)
                from_return.append((t_step - t_return) * 1000)
                stages.append(sample)
    return Result(
        name=config.name,
        label=config.label,
        samples=samples,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies),
        enqueue_p50_ms=statistics.median(enqueues),
        from_return_p50_ms=statistics.median(from_return),
        stages=stage_figures(stages) if breakdown else None,
    )


def stage_figures(samples: list[dict[str, float]]) -> dict[str, list[float]]:
    """For each stage: its p50 and p90 in ms after the enqueue call; the p50
    and p90 of its time after the stage before it, taken in each sample
    that saw both (stages that overlap give a negative figure: a hint that
    comes before the producer has read its reply); how many samples saw it."""
    figures: dict[str, list[float]] = {}
    previous: str | None = None
    for stage in STAGES:
        seen = [s[stage] for s in samples if stage in s]
        if not seen:
            continue
        steps = [
            s[stage] - (s[previous] if previous else 0.0)
            for s in samples
            if stage in s and (previous is None or previous in s)
        ]
        figures[stage] = [
            percentile(seen, 50),
            percentile(seen, 90),
            percentile(steps, 50) if steps else float("nan"),
            percentile(steps, 90) if steps else float("nan"),
            len(seen),
        ]
        previous = stage
    return figures


def report(result: Result) -> None:
    print(
        f"{result.label:<44} {result.samples:>7} {result.p50_ms:>9.1f} {result.p90_ms:>9.1f}"
        f" {result.p99_ms:>9.1f} {result.max_ms:>9.1f} {result.enqueue_p50_ms:>11.1f}"
        f" {result.from_return_p50_ms:>16.1f}",
        flush=True,
    )


def report_stages(result: Result) -> None:
    """The ``--breakdown`` table of one backend (see :func:`stage_figures`)."""
    print(
        f"  {'stage':<22} {'p50 ms':>8} {'p90 ms':>8} {'after previous p50':>19}"
        f" {'p90':>7} {'samples':>8}"
    )
    for stage, (p50, p90, step50, step90, seen) in (result.stages or {}).items():
        print(
            f"  {stage:<22} {p50:>8.2f} {p90:>8.2f} {step50:>+19.2f} {step90:>+7.2f} {int(seen):>8}"
        )
    print(flush=True)


async def delete_prefix(server_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(server_url)
    try:
        keys = [k async for k in client.scan_iter(match="{" + prefix + "}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["postgres", "postgres-poll", "redis", "sqlite"],
        choices=["postgres", "postgres-poll", "redis", "sqlite"],
    )
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="the Redis server to use"
    )
    parser.add_argument("--samples", type=int, default=200, help="samples with wake-ups")
    parser.add_argument("--poll-samples", type=int, default=30, help="samples when polling")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds")
    parser.add_argument(
        "--gap", type=float, nargs=2, default=[0.05, 0.15], help="idle gap range, seconds"
    )
    parser.add_argument(
        "--poll-gap",
        type=float,
        nargs=2,
        default=None,
        help="idle gap range for polling backends (default: --gap)",
    )
    add_postgres_options(parser)
    parser.add_argument(
        "--breakdown", action="store_true", help="also print where each sample's time goes"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line per result")
    args = parser.parse_args()
    cancel_on_sigterm()
    gap = (args.gap[0], args.gap[1])
    print(
        f"python {sys.version.split()[0]}, poll_interval {args.poll_interval:g}s, "
        f"idle gaps {gap[0] * 1000:.0f}-{gap[1] * 1000:.0f} ms, "
        "latency from just before enqueue() to the first step starting"
    )
    async with contextlib.AsyncExitStack() as stack:
        tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-latency-")))
        database: str | None = None

        async def postgres() -> str:
            nonlocal database
            if database is None:
                database = await stack.enter_async_context(
                    scratch_database(args.postgres_url, f"reflow_latency_{os.getpid()}")
                )
                print(await server_settings(database))
            return database

        configs: list[Config] = []
        for name in args.backends:
            if name == "postgres":
                url = with_options(await postgres(), schema="latency_notify", pool_max_size=5)
                configs.append(Config(name, "postgres (LISTEN/NOTIFY)", url, polling=False))
            elif name == "postgres-poll":
                url = with_options(
                    await postgres(),
                    schema="latency_poll",
                    pool_max_size=5,
                    notify="false",
                    listen="false",
                )
                configs.append(Config(name, "postgres (notify=false, listen=false)", url, True))
            elif name == "redis":
                prefix = f"reflow_latency_{os.getpid()}"
                url = f"{args.redis_url}?prefix={prefix}&max_connections=5"
                stack.push_async_callback(delete_prefix, args.redis_url, prefix)
                configs.append(Config(name, "redis (pub/sub)", url, polling=False))
            else:
                url = f"sqlite:///{tmpdir}/latency.db"
                configs.append(Config(name, "sqlite (WAL, polling)", url, polling=True))
        if not args.json:
            print(
                f"\n{'backend':<44} {'samples':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}"
                f" {'max ms':>9} {'enqueue p50':>11} {'from return p50':>16}"
            )
        for config in configs:
            samples = args.poll_samples if config.polling else args.samples
            pause = (
                (args.poll_gap[0], args.poll_gap[1]) if config.polling and args.poll_gap else gap
            )
            result = await measure(config, samples, args.poll_interval, pause, args.breakdown)
            if args.json:
                print(json.dumps(result.__dict__), flush=True)
            else:
                report(result)
                if args.breakdown:
                    report_stages(result)


if __name__ == "__main__":
    asyncio.run(main())
