"""Throughput on the shared workload: N runs of a K-step workflow, concurrency 25.

    python benchmarks/throughput.py [--runs 2000] [--steps 1 5] [--passes 3]
                                    [--backends memory sqlite postgres redis]
                                    [--synchronous NORMAL]
                                    [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                    [--redis-url redis://127.0.0.1:6379/0]
                                    [--pool-size 25] [--overlapped] [--batch 500] [--json]

For each backend and K, after one warm-up pass, each pass:

* enqueues N runs one after another (``enqueue/s``: the enqueue loop alone);
* starts one engine (``concurrency=25``) and times from the start of the
  worker until the last run is durably completed (``runs/s`` and ``steps/s``);
* reports the end-to-end figure (first enqueue to last completion);
* with ``--overlapped``, also times ``overlapped`` passes: the worker runs
  while 25 concurrent tasks enqueue, from the first enqueue to the last
  completion (the shape of DBOS's ``start_workflow_async`` benchmark);
* with ``--batch B``, also enqueues the N runs through
  ``Engine.enqueue_many(wf, inputs)``, B inputs per call (``batch
  enqueue/s``: those calls alone), into a fresh store of its own made before
  the sequential part of the pass. Those runs are not drained: the drain
  figures are always those of the runs enqueued one at a time, so they stay
  comparable with passes without ``--batch``, and the store the drain works
  on holds only its own N runs.

Every step returns a small dict. Each pass uses a fresh store (a new SQLite
file, a new PostgreSQL schema). Figures are the best and the median of the
passes, with the spread (min-max), so compare ratios measured in one run: the
machine is shared. SQLite runs with ``journal_mode=WAL`` and the
``synchronous`` level given (NORMAL by default, like reflow-ts).

PostgreSQL: the benchmark connects to ``--postgres-url`` (a maintenance
database such as ``postgres``), creates its own database
``reflow_bench_<pid>``, gives each pass a fresh schema (dropped after the
pass) and drops the database at the end, also when a pass fails. The storage
gets ``pool_max_size=--pool-size`` (25, one connection per run in flight) and
the engine its ``LISTEN``/``NOTIFY`` wake-ups; the server runs with its own
settings (``synchronous_commit``, ``fsync``), which the header reports.

Redis: each pass gets a fresh key prefix on ``--redis-url`` (its keys are
deleted after the pass), ``max_connections=--pool-size`` and pub/sub
wake-ups; the header reports the server's persistence settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from reflow_core import Engine, Storage, open_storage, workflow

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


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

    def close(self) -> None:
        """Unwrap ``finish_run`` (for a storage that outlives the count)."""
        del self.storage.finish_run


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
    batch_enqueue_per_s: float | None = None
    """With a batch size: runs per second through ``Engine.enqueue_many``."""

    def as_dict(self) -> dict[str, float]:
        """The figures for ``--json`` (``batch_enqueue_per_s`` only when measured)."""
        figures = dict(self.__dict__)
        if self.batch_enqueue_per_s is None:
            del figures["batch_enqueue_per_s"]
        return figures


Dispose = Callable[[Storage], Awaitable[None]]


async def _nothing(storage: Storage) -> None:
    return None


def _engine(storage: Storage, wf: Any, plugins: Sequence[object] = ()) -> Engine:
    return Engine(
        storage=storage,
        workflows=[wf],
        concurrency=25,
        lease="60s",
        poll_interval="50ms",
        plugins=list(plugins),
        load_entry_points=False,
    )


async def batch_enqueue_pass(
    make_storage: Callable[[], Storage],
    runs: int,
    steps: int,
    batch: int,
    dispose: Dispose = _nothing,
) -> float:
    """Runs per second enqueueing ``runs`` runs through ``Engine.enqueue_many``,
    ``batch`` inputs per call, into a fresh store (timed from the first call to
    the last one's return; the runs are not drained). Checks that every run
    was created."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    wf = build_workflow(steps)
    storage = make_storage()
    engine = _engine(storage, wf)
    await storage.initialize()
    created = 0
    t0 = time.perf_counter()
    for low in range(0, runs, batch):
        made = await engine.enqueue_many(wf, [{"n": i} for i in range(low, min(low + batch, runs))])
        created += sum(1 for run in made if run.created)
    elapsed = time.perf_counter() - t0
    await storage.close()
    await dispose(storage)
    if created != runs:
        raise RuntimeError(f"enqueue_many created {created} runs of {runs}")
    return runs / elapsed


async def one_pass(
    make_storage: Callable[[], Storage],
    runs: int,
    steps: int,
    dispose: Dispose = _nothing,
    plugins: Sequence[object] = (),
    batch: int | None = None,
) -> PassResult:
    """Enqueue ``runs`` runs, then time the worker draining them; ``plugins``
    (none by default) are the engine's only plugins. With ``batch``, first
    time :func:`batch_enqueue_pass` on a store of its own."""
    batch_rate = (
        None
        if batch is None
        else await batch_enqueue_pass(make_storage, runs, steps, batch, dispose)
    )
    wf = build_workflow(steps)
    storage = make_storage()
    done = _Completion(storage, runs)
    engine = _engine(storage, wf, plugins)
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
    await dispose(storage)
    drain = t_done - t_enqueued
    return PassResult(
        enqueue_per_s=runs / (t_enqueued - t0),
        runs_per_s=runs / drain,
        steps_per_s=runs * steps / drain,
        end_to_end_runs_per_s=runs / (t_done - t0),
        batch_enqueue_per_s=batch_rate,
    )


async def overlapped_pass(
    make_storage: Callable[[], Storage],
    runs: int,
    steps: int,
    dispose: Dispose = _nothing,
    producers: int = 25,
) -> float:
    """Runs per second with the worker already running while ``producers``
    concurrent tasks enqueue the ``runs`` (on the same engine), timed from the
    first enqueue to the last durable completion: the shape of DBOS's
    ``start_workflow_async`` under a 25-slot semaphore."""
    wf = build_workflow(steps)
    storage = make_storage()
    done = _Completion(storage, runs)
    engine = Engine(
        storage=storage, workflows=[wf], concurrency=25, lease="60s", poll_interval="50ms"
    )
    await storage.initialize()
    await engine.start()
    numbers = iter(range(runs))

    async def produce() -> None:
        for i in numbers:
            await engine.enqueue(wf, {"n": i})

    t0 = time.perf_counter()
    await asyncio.gather(*(produce() for _ in range(producers)))
    await done.event.wait()
    elapsed = time.perf_counter() - t0
    await engine.stop()
    await storage.close()
    await dispose(storage)
    return runs / elapsed


# -- PostgreSQL: a throw-away database ----------------------------------------


_REFLOW_OPTIONS = {
    "schema",
    "pool_min_size",
    "pool_max_size",
    "pool_timeout",
    "notify",
    "listen",
    "prepare_threshold",
}


def with_options(url: str, *, database: str | None = None, **options: object) -> str:
    """``url`` with ``options`` added to its query, pointed at ``database`` if given."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True)]
    query += [(k, str(v)) for k, v in options.items()]
    path = parts.path if database is None else "/" + database
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))


def libpq_url(url: str) -> str:
    """``url`` without Reflow's own query options, for a plain psycopg connection."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in query if k not in _REFLOW_OPTIONS]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), ""))


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str, name: str) -> AsyncIterator[str]:
    """Create database ``name`` on the server of ``admin_url``, yield its URL (with
    ``admin_url``'s query), and drop it afterwards, whatever happened."""
    admin = libpq_url(admin_url)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_options(admin_url, database=name)
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def drop_schema(url: str, schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )


async def server_settings(url: str) -> str:
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT split_part(version(), ' ', 2), current_setting('synchronous_commit'),"
            " current_setting('fsync'), current_setting('max_connections')"
        )
        row = await cur.fetchone()
    assert row is not None
    version, sync, fsync, conns = row
    return (
        f"PostgreSQL {version}, synchronous_commit={sync}, fsync={fsync}, max_connections={conns}"
    )


# -- backends -------------------------------------------------------------------


@dataclass
class Backend:
    label: str
    make: Callable[[], Storage]
    dispose: Dispose = _nothing


def sqlite_backend(synchronous: str, tmp: Path) -> Backend:
    counter = 0

    def make() -> Storage:
        nonlocal counter
        counter += 1
        return open_storage(f"sqlite:///{tmp}/bench-{counter}.db?synchronous={synchronous}")

    return Backend(f"sqlite (WAL, synchronous={synchronous})", make)


def postgres_backend(database_url: str, pool_size: int, *, label: str = "postgres") -> Backend:
    """A fresh schema per storage on the database of ``database_url``."""
    counter = 0
    schemas: dict[int, str] = {}

    def make() -> Storage:
        nonlocal counter
        counter += 1
        schema = f"bench_{counter}"
        storage = open_storage(with_options(database_url, schema=schema, pool_max_size=pool_size))
        schemas[id(storage)] = schema
        return storage

    async def dispose(storage: Storage) -> None:
        await drop_schema(database_url, schemas.pop(id(storage)))

    return Backend(f"{label} (pool {pool_size}, LISTEN/NOTIFY)", make, dispose)


async def redis_settings(url: str) -> str:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        info = await client.info("server")
        aof = await client.config_get("appendonly")
        fsync = await client.config_get("appendfsync")
    finally:
        await client.aclose()
    return (
        f"Redis {info['redis_version']}, appendonly={aof.get('appendonly')}, "
        f"appendfsync={fsync.get('appendfsync')}"
    )


def redis_backend(server_url: str, pool_size: int) -> Backend:
    """A fresh key prefix per storage on the Redis server of ``server_url``;
    each prefix's keys are deleted after its pass."""
    counter = 0
    prefixes: dict[int, str] = {}
    tag = f"reflow_bench_{os.getpid()}"

    def make() -> Storage:
        nonlocal counter
        counter += 1
        prefix = f"{tag}_{counter}"
        storage = open_storage(f"{server_url}?prefix={prefix}&max_connections={pool_size}")
        prefixes[id(storage)] = prefix
        return storage

    async def dispose(storage: Storage) -> None:
        import redis.asyncio as aioredis

        prefix = prefixes.pop(id(storage))
        client = aioredis.Redis.from_url(server_url)
        try:
            batch = []
            async for key in client.scan_iter(match="{" + prefix + "}*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await client.delete(*batch)
                    batch = []
            if batch:
                await client.delete(*batch)
        finally:
            await client.aclose()

    return Backend(f"redis (pool {pool_size}, pub/sub wake-ups)", make, dispose)


BACKENDS = ["memory", "sqlite", "postgres", "redis"]


def add_backend_options(parser: argparse.ArgumentParser, default: list[str]) -> None:
    """``--backends``, ``--redis-url`` and the PostgreSQL options."""
    parser.add_argument("--backends", nargs="+", default=default, choices=BACKENDS)
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="the Redis server (a fresh key prefix per pass, deleted afterwards)",
    )
    add_postgres_options(parser)


async def open_backend(
    name: str,
    args: argparse.Namespace,
    stack: contextlib.AsyncExitStack,
    tmp: Path,
    *,
    synchronous: str = "NORMAL",
    database: str = "reflow_bench",
) -> Backend:
    """The backend ``name`` of a benchmark run (its server's settings printed;
    a PostgreSQL scratch database ``<database>_<pid>`` dropped when ``stack``
    closes)."""
    if name == "memory":
        return Backend("memory", lambda: open_storage("memory://"))
    if name == "sqlite":
        return sqlite_backend(synchronous, tmp)
    if name == "redis":
        print(await redis_settings(args.redis_url))
        return redis_backend(args.redis_url, args.pool_size)
    url = await stack.enter_async_context(
        scratch_database(args.postgres_url, f"{database}_{os.getpid()}")
    )
    print(await server_settings(url))
    return postgres_backend(url, args.pool_size)


def cancel_on_sigterm() -> None:
    """Let SIGTERM cancel the running main task (as Ctrl-C does), so the
    databases it created are dropped on the way out."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def summarize(values: list[float]) -> str:
    best, median, low = max(values), statistics.median(values), min(values)
    return f"{best:>9,.0f} (median {median:,.0f}, spread {low:,.0f}-{best:,.0f})"


async def measure(
    backend: Backend, runs: int, steps: int, passes: int, batch: int | None = None
) -> list[PassResult]:
    """One warm-up pass, then ``passes`` measured ones (with ``batch``, each also
    times ``Engine.enqueue_many`` in batches of that size)."""
    await one_pass(backend.make, min(runs, 200), steps, backend.dispose, batch=batch)
    return [
        await one_pass(backend.make, runs, steps, backend.dispose, batch=batch)
        for _ in range(passes)
    ]


async def measure_overlapped(backend: Backend, runs: int, steps: int, passes: int) -> list[float]:
    """``passes`` passes of :func:`overlapped_pass` (after :func:`measure`'s warm-up)."""
    return [
        await overlapped_pass(backend.make, runs, steps, backend.dispose) for _ in range(passes)
    ]


def add_postgres_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a database to connect to while creating and dropping the benchmark's own",
    )
    parser.add_argument(
        "--pool-size", type=int, default=25, help="pool_max_size of the PostgreSQL storage"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--passes", type=int, default=3)
    add_backend_options(parser, ["memory", "sqlite"])
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument(
        "--overlapped",
        action="store_true",
        help="also time enqueues by 25 concurrent tasks while the worker runs",
    )
    parser.add_argument(
        "--batch",
        type=int,
        metavar="B",
        help="also time Engine.enqueue_many, B runs per call (off by default)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line per result")
    args = parser.parse_args()
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    cancel_on_sigterm()
    version = sys.version.split()[0]
    print(f"python {version}, N={args.runs}, concurrency 25, best of {args.passes} after a warm-up")
    async with contextlib.AsyncExitStack() as stack:
        tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-bench-"))
        for name in args.backends:
            backend = await open_backend(
                name, args, stack, Path(tmpdir), synchronous=args.synchronous
            )
            label = backend.label
            for steps in args.steps:
                results = await measure(backend, args.runs, steps, args.passes, args.batch)
                overlapped = (
                    await measure_overlapped(backend, args.runs, steps, args.passes)
                    if args.overlapped
                    else []
                )
                if args.json:
                    record: dict[str, Any] = {
                        "backend": label,
                        "steps": steps,
                        "passes": [r.as_dict() for r in results],
                    }
                    if args.batch is not None:
                        record["batch"] = args.batch
                    if overlapped:
                        record["overlapped_runs_per_s"] = overlapped
                    print(json.dumps(record), flush=True)
                    continue
                print(f"\n{label}, K={steps}")
                print(f"  enqueue/s   {summarize([r.enqueue_per_s for r in results])}")
                batched = [r.batch_enqueue_per_s for r in results if r.batch_enqueue_per_s]
                if batched:
                    print(
                        f"  batch       {summarize(batched)} enqueue/s"
                        f" (enqueue_many, {args.batch} per call)"
                    )
                print(f"  runs/s      {summarize([r.runs_per_s for r in results])}")
                print(f"  steps/s     {summarize([r.steps_per_s for r in results])}")
                print(
                    f"  end-to-end  {summarize([r.end_to_end_runs_per_s for r in results])} runs/s"
                )
                if overlapped:
                    print(f"  overlapped  {summarize(overlapped)} runs/s")


if __name__ == "__main__":
    asyncio.run(main())
