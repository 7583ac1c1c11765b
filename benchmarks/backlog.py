"""Backlog: one engine's drain rate with a deep queue of other runs, per backend.

    python benchmarks/backlog.py [--backends sqlite postgres redis]
                                 [--sizes 10000 100000 1000000]
                                 [--runs 2000] [--passes 3] [--largest-budget 60]
                                 [--redis-url redis://127.0.0.1:6379/1]
                                 [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                 [--pool-size 25] [--tmp /tmp] [--out benchmarks/results]
    python benchmarks/backlog.py --plot-only benchmarks/results/backlog.json

The drain rate of ``--runs`` (2,000) one-step runs (``bench-1``, the shared
workload of ``throughput.py``) by one engine (concurrency 25), timed from
the engine's start to the ``--runs``-th run its storage's ``finish_run``
completes (as ``throughput.py`` counts), in three shapes of store:

* ``none``: no backlog; the measured runs are the only unfinished runs;
* ``same``: N pending runs of the same workflow created *after* the
  measured runs. Claims take due runs oldest first, so the measured runs are
  the head of one queue of N + ``--runs`` runs: before each pass the queue
  is topped up at its tail to exactly that, and the pass drains its head
  (the runs a pass completes are identical ``bench-1`` runs, and N stay
  behind them throughout);
* ``other``: N pending runs of a workflow this engine does not serve
  (``backlog-other``), created *before* the measured runs (older): each
  pass enqueues its ``--runs`` runs after the backlog, then drains them.

Each backend gets one store per shape, kept for the whole series: the
backlogs grow in place from one size to the next (10k, then 90k more, then
900k more), so the largest size costs its own runs only. Every run, backlog
and measured alike, is created the way ``Engine.enqueue_many`` creates runs
(it is what creates them: one ``Storage.create_runs`` call per 1,000 runs),
so the rows are exactly those of the real enqueue path. Each size's
backlog is checked with ``queue_stats`` before it is measured (the
``other`` store: exactly N pending ``backlog-other`` runs and none of
``bench-1``; the ``same`` store: exactly N + ``--runs`` pending ``bench-1``
runs, none running, before every pass). The store is left as the runs
leave it: no ``VACUUM`` on PostgreSQL beyond what its server's autovacuum
does (the header says whether it is on); with autovacuum off, an ``ANALYZE``
of each store after each bulk load, as autovacuum's auto-analyze would do
on a server that has it (without statistics PostgreSQL plans the engine's
look for runs nobody serves, a listing of the newest pending runs, as a
read of the whole table: about a second at 1M, once after every engine
start).

At each size, an untimed engine first drains 200 runs in each shape, then
``--passes`` (3) passes measure the three shapes in turn, rotating which
goes first. At the largest size a pass of a slow shape can take minutes,
so a further pass (of all three shapes) starts only while the passes there
have taken less than ``--largest-budget`` seconds (60): at least one pass,
at most ``--passes``; the results say how many. Each figure is the median
of its passes, the spread beside it, and the ratio is to the ``none``
median of the same size, so every ratio compares figures measured within
minutes of each other. The
1-minute load average before and after each size is recorded; the machine
is usually shared.

Stores: SQLite files (WAL, ``synchronous=NORMAL``) under ``--tmp``,
deleted at the end; PostgreSQL, a database of its own (``reflow_backlog_<pid>``)
on the server of ``--postgres-url`` with a schema per shape, dropped when the
backend is done, also on failure, Ctrl-C or SIGTERM (the user needs
``CREATEDB``); Redis, key prefixes ``reflow_backlog_<pid>_<shape>`` on
``--redis-url``, deleted when the backend is done. The default Redis
database is 1, not 0: two million pending runs are about six million keys,
which other clients' ``SCAN``\\ s of database 0 would walk through.

Output in ``--out`` (``benchmarks/results``): ``backlog.json`` (every pass,
the seeding times, the checks, the command) and ``backlog.png`` (drain rate
against backlog, log x axis, one line per backend and shape; the ``none``
line is the baseline measured beside each size). The plot needs matplotlib
(``python3 -m uv sync --frozen --group bench``); without it, the figures
are measured and saved, and ``--plot-only`` draws them later.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from throughput import (
    _Completion,
    add_postgres_options,
    build_workflow,
    cancel_on_sigterm,
    libpq_url,
    redis_settings,
    scratch_database,
    server_settings,
    with_options,
)

from reflow_core import Engine, Storage, open_storage, workflow
from reflow_core.storage import MAX_CREATE_BATCH

SHAPES = ("none", "same", "other")
SHAPE_TITLES = {
    "none": "no backlog",
    "same": "N pending, same workflow, after the measured runs",
    "other": "N pending of a workflow not served, older than the measured runs",
}
BACKENDS = ["memory", "sqlite", "postgres", "redis"]
LABELS = {"memory": "memory", "sqlite": "SQLite", "postgres": "PostgreSQL", "redis": "Redis"}
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/1"
CONCURRENCY = 25
WARM_RUNS = 200
OTHER = "backlog-other"
SLOW_STOP = 15.0
"""An ``Engine.stop()`` slower than this is logged."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load() -> float:
    return os.getloadavg()[0]


async def _noop(ctx: Any) -> None:
    return None


# -- the stores ------------------------------------------------------------------------


@dataclass
class ShapeStore:
    """One shape's store: its storage, an engine that only enqueues, and what is in it."""

    shape: str
    storage: Storage
    producer: Engine
    backlog: int = 0
    """Backlog runs pending (``other``: ``backlog-other`` runs; ``same``: the
    queue behind the measured runs after the last top-up)."""
    enqueued: int = 0
    """Runs created so far (their inputs are numbered)."""


@dataclass
class Backend:
    name: str
    settings: str
    urls: dict[str, str]
    analyze: str | None = None
    """PostgreSQL with autovacuum off: the database to ``ANALYZE`` after each
    bulk load, as autovacuum's auto-analyze would (see the module's docs)."""


async def analyze(url: str) -> None:
    """``ANALYZE`` every shape's runs table: with autovacuum off nothing else
    gives the planner statistics after a bulk load, and a plan made without
    them (the engine's look for runs nobody serves, say) reads the backlog."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for shape in SHAPES:
            await conn.execute(f"ANALYZE backlog_{shape}.runs")  # our own fixed names


def sqlite_urls(tmp: Path) -> dict[str, str]:
    return {s: f"sqlite:///{tmp}/backlog-{s}.db?synchronous=NORMAL" for s in SHAPES}


@contextlib.asynccontextmanager
async def open_backend(name: str, args: argparse.Namespace, tmp: Path) -> AsyncIterator[Backend]:
    """The three stores' URLs of backend ``name``; their data is gone afterwards."""
    if name == "memory":
        yield Backend(name, "memory", dict.fromkeys(SHAPES, "memory://"))
    elif name == "sqlite":
        directory = Path(tempfile.mkdtemp(prefix="reflow-backlog-", dir=tmp))
        try:
            yield Backend(name, "SQLite (WAL, synchronous=NORMAL)", sqlite_urls(directory))
        finally:
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
    elif name == "postgres":
        async with scratch_database(
            args.postgres_url, f"reflow_backlog_{os.getpid()}"
        ) as database_url:
            settings = await server_settings(database_url)
            async with await psycopg.AsyncConnection.connect(
                libpq_url(database_url), autocommit=True
            ) as conn:
                cur = await conn.execute(
                    "SELECT current_setting('autovacuum'), current_setting('shared_buffers')"
                )
                row = await cur.fetchone()
            assert row is not None
            settings += f", autovacuum={row[0]}, shared_buffers={row[1]}"
            yield Backend(
                name,
                settings,
                {
                    s: with_options(
                        database_url, schema=f"backlog_{s}", pool_max_size=args.pool_size
                    )
                    for s in SHAPES
                },
                analyze=libpq_url(database_url) if row[0] == "off" else None,
            )
    else:
        prefixes = {s: f"reflow_backlog_{os.getpid()}_{s}" for s in SHAPES}
        try:
            yield Backend(
                name,
                await redis_settings(args.redis_url),
                {
                    s: f"{args.redis_url}?prefix={p}&max_connections={args.pool_size}"
                    for s, p in prefixes.items()
                },
            )
        finally:
            await delete_redis_prefixes(args.redis_url, list(prefixes.values()))


async def delete_redis_prefixes(server_url: str, prefixes: Sequence[str]) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(server_url)
    try:
        for prefix in prefixes:
            batch: list[bytes] = []
            async for key in client.scan_iter(match="{" + prefix + "}*", count=10_000):
                batch.append(key)
                if len(batch) >= 10_000:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)
        # Large sets are freed in the background: let that finish first.
        for _ in range(600):
            info = await client.info("memory")
            if int(info.get("lazyfree_pending_objects", 0)) == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


# -- enqueueing, counting, draining ----------------------------------------------------


async def enqueue(store: ShapeStore, wf: Any, count: int) -> float:
    """Create ``count`` runs of ``wf`` through ``Engine.enqueue_many`` (one
    ``create_runs`` call per 1,000), inputs ``{"n": i}``; seconds taken."""
    started = time.perf_counter()
    left = count
    logged = time.perf_counter()
    while left > 0:
        if time.perf_counter() - logged > 30:
            logged = time.perf_counter()
            log(f"  {store.shape}: {count - left:,} of {count:,} created")
        n = min(left, MAX_CREATE_BATCH)
        first = store.enqueued
        runs = await store.producer.enqueue_many(wf, [{"n": first + i} for i in range(n)])
        if len(runs) != n or not all(r.created for r in runs):
            raise RuntimeError(f"enqueue_many created fewer than {n} runs")
        store.enqueued += n
        left -= n
    return time.perf_counter() - started


async def counts(storage: Storage, name: str) -> tuple[int, int]:
    """Pending (due or delayed) and running runs of workflow ``name``."""
    (stats,) = await storage.queue_stats([name])
    return stats.pending + stats.delayed, stats.running + stats.sleeping + stats.waiting


@dataclass
class Stop:
    """An ``Engine.stop()`` after a drain (untimed for the figures)."""

    seconds: float


async def drain(storage: Storage, wf: Any, runs: int) -> tuple[float, Stop]:
    """Runs/s of one engine from its start to the ``runs``-th completion, and
    its ``stop()``."""
    done = _Completion(storage, runs)
    engine = Engine(
        storage=storage,
        workflows=[wf],
        concurrency=CONCURRENCY,
        lease="60s",
        poll_interval="50ms",
        load_entry_points=False,
        close_storage=False,
    )
    try:
        started = time.perf_counter()
        await engine.start()
        await done.event.wait()
        elapsed = time.perf_counter() - started
        stopping = time.perf_counter()
        stop = asyncio.ensure_future(engine.stop())
        while not (await asyncio.wait({stop}, timeout=SLOW_STOP))[0]:
            log(f"  Engine.stop() has not returned after {SLOW_STOP:.0f}s; still waiting")
        await stop
        stopped = time.perf_counter() - stopping
    finally:
        done.close()
    return runs / elapsed, Stop(stopped)


# -- one backend --------------------------------------------------------------------


@dataclass
class SizeResult:
    size: int
    passes: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SHAPES})
    order: list[list[str]] = field(default_factory=list)
    seeding_s: dict[str, float] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    stops_s: list[float] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)
    seconds: float = 0.0

    def median(self, shape: str) -> float:
        return statistics.median(self.passes[shape])


async def prepare(store: ShapeStore, wf: Any, size: int, runs: int) -> None:
    """Make ``store`` ready for a pass of ``runs`` runs at backlog ``size``."""
    if store.shape == "same":
        pending, running = await counts(store.storage, wf.name)
        if running:
            raise RuntimeError(f"same: {running} bench-1 runs unfinished but not pending")
        want = size + runs
        if pending > want:
            raise RuntimeError(f"same: {pending:,} pending, more than {want:,}")
        await enqueue(store, wf, want - pending)
        pending, _ = await counts(store.storage, wf.name)
        if pending != want:
            raise RuntimeError(f"same: {pending:,} pending after the top-up, not {want:,}")
        store.backlog = size
        return
    pending, running = await counts(store.storage, wf.name)
    if pending or running:
        raise RuntimeError(f"{store.shape}: {pending} pending and {running} other bench-1 runs")
    await enqueue(store, wf, runs)


async def measure_backend(
    name: str,
    args: argparse.Namespace,
    tmp: Path,
    record: dict[str, Any],
    save: Callable[[], object],
) -> list[SizeResult]:
    wf = build_workflow(1)
    other_wf: Any = workflow(OTHER).step("s0", _noop)
    results: list[SizeResult] = []
    async with open_backend(name, args, tmp) as backend, contextlib.AsyncExitStack() as stack:
        log(f"{name}: {backend.settings}")
        record["settings"] = backend.settings
        stores: dict[str, ShapeStore] = {}
        for shape in SHAPES:
            storage = open_storage(backend.urls[shape])
            stack.push_async_callback(storage.close)
            await storage.initialize()
            producer = Engine(
                storage=storage,
                workflows=[wf],
                worker=False,
                load_entry_points=False,
                close_storage=False,
            )
            stores[shape] = ShapeStore(shape, storage, producer)
        for index, size in enumerate(args.sizes):
            largest = index == len(args.sizes) - 1
            passes = args.passes
            result = SizeResult(size)
            began = time.perf_counter()
            load_before = load()
            other = stores["other"]
            log(f"{name}: growing the backlogs to {size:,}")
            grow_other = enqueue(other, other_wf, size - other.backlog)
            same = stores["same"]
            grow_same = prepare(same, wf, size, args.runs)
            timed = await asyncio.gather(_timed(grow_other), _timed(grow_same))
            result.seeding_s = {"other": timed[0], "same": timed[1]}
            if backend.analyze is not None:
                await analyze(backend.analyze)
            other.backlog = size
            other_pending, other_running = await counts(other.storage, OTHER)
            if (other_pending, other_running) != (size, 0):
                raise RuntimeError(
                    f"other: {other_pending:,} pending {OTHER} runs, {other_running} others;"
                    f" expected {size:,}"
                )
            result.checks = {
                "other_pending_backlog": other_pending,
                "same_pending_before_each_pass": [],
            }
            log(
                f"{name}: backlogs at {size:,} (other {timed[0]:.1f}s, same {timed[1]:.1f}s);"
                " warm-up"
            )
            for shape in SHAPES:
                store = stores[shape]
                if shape != "same":
                    await enqueue(store, wf, WARM_RUNS)
                _, stopped = await drain(store.storage, wf, WARM_RUNS)
                result.stops_s.append(stopped.seconds)
                if shape == "same":
                    await prepare(store, wf, size, args.runs)
                else:
                    await settle(store, wf)
            measuring = time.perf_counter()
            for p in range(passes):
                if largest and p and time.perf_counter() - measuring > args.largest_budget:
                    log(f"  {name} N={size:,}: {p} passes (--largest-budget)")
                    break
                order = list(SHAPES[p % 3 :] + SHAPES[: p % 3])
                result.order.append(order)
                for shape in order:
                    store = stores[shape]
                    await prepare(store, wf, size, args.runs)
                    if shape == "same":
                        pending, _ = await counts(store.storage, wf.name)
                        result.checks["same_pending_before_each_pass"].append(pending)
                    rate, stopped = await drain(store.storage, wf, args.runs)
                    result.stops_s.append(stopped.seconds)
                    if shape != "same":
                        await settle(store, wf)
                    result.passes[shape].append(rate)
                    log(f"  {name} N={size:,} pass {p + 1}/{passes} {shape}: {rate:,.0f} runs/s")
            result.load = (load_before, load())
            result.seconds = time.perf_counter() - began
            results.append(result)
            record.setdefault("sizes", []).append(size_record(result))
            save()
            print_size(name, result)
    return results


async def settle(store: ShapeStore, wf: Any) -> None:
    """After a drain on a store with only its own runs: none of them left."""
    pending, running = await counts(store.storage, wf.name)
    if pending or running:
        raise RuntimeError(f"{store.shape}: {pending} bench-1 runs pending, {running} running")


async def _timed(work: Any) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


# -- reporting ------------------------------------------------------------------------


def size_record(r: SizeResult) -> dict[str, Any]:
    return {
        "size": r.size,
        "runs_per_s": r.passes,
        "median_runs_per_s": {s: r.median(s) for s in SHAPES},
        "ratio_to_none": {s: r.median(s) / r.median("none") for s in SHAPES},
        "pass_order": r.order,
        "seeding_s": r.seeding_s,
        "checks": r.checks,
        "engine_stop_s": r.stops_s,
        "load_1min": list(r.load),
        "seconds": r.seconds,
    }


def human(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k"
    return f"{size:,}"


def figure(values: Sequence[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.0f}"
    return f"{med:,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def print_size(name: str, r: SizeResult) -> None:
    none = r.median("none")
    cells = [figure(r.passes["none"])]
    for shape in ("same", "other"):
        cells.append(f"{figure(r.passes[shape])} {r.median(shape) / none:.2f}x")
    log(
        f"{name} N={human(r.size)} ({len(r.passes['none'])} passes,"
        f" load {r.load[0]:.1f}-{r.load[1]:.1f}, {r.seconds:.0f}s): " + " | ".join(cells)
    )


def table(data: dict[str, Any]) -> str:
    """The issue's table, one row per backend and size, as Markdown."""
    lines = [
        "| backend | N | passes | no backlog runs/s | "
        + " | ".join(SHAPE_TITLES[s] for s in ("same", "other"))
        + " | load |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, backend in data["backends"].items():
        for s in backend.get("sizes", []):
            runs = s["runs_per_s"]
            ratio = s["ratio_to_none"]
            cells = [
                LABELS.get(name, name),
                human(s["size"]),
                str(len(runs["none"])),
                figure(runs["none"]),
                f"{figure(runs['same'])}, **{ratio['same']:.2f}x**",
                f"{figure(runs['other'])}, **{ratio['other']:.2f}x**",
                f"{s['load_1min'][0]:.1f}-{s['load_1min'][1]:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (python3 -m uv sync --frozen --group bench): no plot")
        return None
    colors = {"memory": "tab:gray", "sqlite": "tab:blue", "postgres": "tab:orange"}
    colors["redis"] = "tab:red"
    styles = {"none": ":", "same": "-", "other": "--"}
    markers = {"none": "o", "same": "s", "other": "^"}
    fig, (rates, ratios) = plt.subplots(1, 2, figsize=(13, 5.2))
    for name, backend in data["backends"].items():
        sizes = backend.get("sizes", [])
        if not sizes:
            continue
        xs = [s["size"] for s in sizes]
        for shape in SHAPES:
            label = f"{LABELS.get(name, name)}, {shape}"
            rates.plot(
                xs,
                [s["median_runs_per_s"][shape] for s in sizes],
                linestyle=styles[shape],
                marker=markers[shape],
                color=colors.get(name, "black"),
                label=label,
            )
            if shape != "none":
                ratios.plot(
                    xs,
                    [s["ratio_to_none"][shape] for s in sizes],
                    linestyle=styles[shape],
                    marker=markers[shape],
                    color=colors.get(name, "black"),
                    label=label,
                )
    for ax in (rates, ratios):
        ax.set_xscale("log")
        ax.set_xlabel("pending runs in the backlog (N)")
        ax.grid(True, which="both", alpha=0.3)
    rates.set_ylabel("runs/s (median), one engine, concurrency 25")
    rates.set_ylim(bottom=0)
    rates.set_title("drain rate of 2,000 one-step runs")
    ratios.set_ylabel("ratio to no backlog at the same N")
    ratios.set_ylim(bottom=0)
    ratios.axhline(0.8, color="black", linewidth=0.8, alpha=0.5)
    ratios.axhline(0.6, color="black", linewidth=0.8, alpha=0.5, linestyle="--")
    ratios.set_title("same / other against none (lines at 0.8x and 0.6x)")
    rates.legend(fontsize=7, ncol=2)
    fig.suptitle(
        "none: no backlog; same: N pending of the same workflow behind the measured runs;"
        " other: N older pending runs of a workflow not served",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / "backlog.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- main ---------------------------------------------------------------------------------


def tree() -> dict[str, Any]:
    """The commit checked out and the files changed since (read-only git)."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], cwd=root, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed": git("status", "--short").splitlines()}


def save(data: dict[str, Any], out: Path) -> Path:
    """Write the figures so far to ``out/backlog.json`` (after every size)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "backlog.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cancel_on_sigterm()
    out = Path(args.out)
    data: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
        "tree": tree(),
        "runs": args.runs,
        "passes": args.passes,
        "largest_budget_s": args.largest_budget,
        "sizes": args.sizes,
        "backends": {},
    }
    began = time.perf_counter()
    for name in args.backends:
        record: dict[str, Any] = {}
        data["backends"][name] = record
        started = time.perf_counter()
        await measure_backend(name, args, Path(args.tmp), record, lambda: save(data, out))
        record["seconds"] = time.perf_counter() - started
        save(data, out)
        log(f"{name}: done in {record['seconds']:.0f}s (stores dropped)")
    data["seconds"] = time.perf_counter() - began
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres", "redis"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=2000, help="measured runs per pass")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument(
        "--largest-budget",
        type=float,
        default=60.0,
        help="seconds: no further pass at the largest size once its passes took this long",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    add_postgres_options(parser)
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="for the SQLite files")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--plot-only", metavar="JSON", help="draw the plot from saved figures")
    args = parser.parse_args()
    out = Path(args.out)
    if args.plot_only:
        data = json.loads(Path(args.plot_only).read_text())
        print(table(data))
        path = plot(data, Path(args.plot_only).parent)
        if path is not None:
            log(f"wrote {path}")
        return
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        parser.error(f"unknown backends {bad}; choose from {BACKENDS}")
    if sorted(args.sizes) != args.sizes or len(set(args.sizes)) != len(args.sizes):
        parser.error("--sizes must be increasing (the backlogs grow in place)")
    if min(args.sizes) < 1 or args.runs < 1 or args.passes < 1:
        parser.error("sizes, --runs and --passes must be positive")
    log(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.runs} one-step runs"
        f" a pass, concurrency {CONCURRENCY}, sizes {args.sizes}"
    )
    data = asyncio.run(run(args))
    path = save(data, out)
    log(f"done in {data['seconds']:.0f}s; wrote {path}")
    print(table(data))
    png = plot(data, out)
    if png is not None:
        log(f"wrote {png}")


if __name__ == "__main__":
    main()
