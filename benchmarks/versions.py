"""Versions: what the version filter of claims costs, per backend.

    python benchmarks/versions.py [--backends sqlite postgres redis]
                                  [--sizes 10000 100000] [--runs 2000] [--passes 3]
                                  [--redis-url redis://127.0.0.1:6379/1]
                                  [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                  [--pool-size 25] [--tmp /tmp] [--out benchmarks/results]

Every claim of a worker now names the versions it serves
(``claim_runs(versions=...)``), so that it never takes a run of a newer
version, and, with ``on_incompatible="old_version"``, only runs of its own.
Two questions, one engine (concurrency 25) draining ``--runs`` (2,000)
one-step runs, timed from its start to the last run's ``finish_run``, as
``throughput.py`` and ``backlog.py`` count:

* **the hot path**: the drain as the engine does it (every claim filtered
  by version 1, the only version there is) against the same drain with the
  filter taken off (the storage's ``claim_runs`` called without
  ``versions``, as before versions existed), in alternating order;
* **a deploy in progress**: an engine of version 2 with
  ``on_incompatible="old_version"`` draining its runs behind N older
  pending runs of version 1 of the same workflow, which it must not take
  (they wait for a worker of version 1), against the same drain with no
  older runs, for N = 10k and 100k grown in place.

Each figure is the median of ``--passes`` (3) passes with the spread beside
it; ratios compare medians measured in the same minutes. Stores as in
``backlog.py`` (SQLite files, a PostgreSQL database of its own, Redis key
prefixes on database 1), dropped at the end. Output: the table, and
``--out/versions.json`` with every pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from backlog import (
    DEFAULT_REDIS_URL,
    ShapeStore,
    drain,
    enqueue,
    log,
    open_backend,
    tree,
)
from throughput import add_postgres_options, cancel_on_sigterm

from reflow_core import Engine, Storage, open_storage, workflow

BACKENDS = ["memory", "sqlite", "postgres", "redis"]
NAME = "bench-versions"


async def _noop(ctx: Any) -> None:
    return None


V1 = workflow(NAME).step("s", _noop)
V2 = workflow(NAME, version=2, on_incompatible="old_version").step("s", _noop)


async def _store(url: str, shape: str, wf: Any) -> ShapeStore:
    storage = open_storage(url)
    await storage.initialize()
    producer = Engine(
        storage=storage, workflows=[wf], worker=False, close_storage=False, load_entry_points=False
    )
    return ShapeStore(shape, storage, producer)


async def _drain_unfiltered(storage: Storage, wf: Any, runs: int) -> float:
    """:func:`backlog.drain` with every claim made without ``versions``."""
    claim = storage.claim_runs

    async def unfiltered(workflows: Any, limit: int, lease: Any, *, versions: Any = None) -> Any:
        return await claim(workflows, limit, lease)

    storage.claim_runs = unfiltered  # type: ignore[method-assign]
    try:
        rate, _ = await drain(storage, wf, runs)
    finally:
        del storage.claim_runs
    return rate


async def _analyze(url: str | None) -> None:
    if url is None:
        return
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("ANALYZE backlog_other.runs")  # our own fixed name


def figure(values: Sequence[float]) -> str:
    return f"{statistics.median(values):8.0f} ({min(values):.0f}-{max(values):.0f})"


async def measure_backend(name: str, args: argparse.Namespace, record: dict[str, Any]) -> None:
    async with open_backend(name, args, Path(args.tmp)) as backend:
        record["settings"] = backend.settings
        plain = await _store(backend.urls["none"], "none", V1)
        plain_v2 = Engine(
            storage=plain.storage,
            workflows=[V2],
            worker=False,
            close_storage=False,
            load_entry_points=False,
        )
        behind = await _store(backend.urls["other"], "other", V1)
        behind_v2 = ShapeStore(
            "other",
            behind.storage,
            Engine(
                storage=behind.storage,
                workflows=[V2],
                worker=False,
                close_storage=False,
                load_entry_points=False,
            ),
        )
        try:
            # The hot path: version 1 runs, filtered and not, alternating.
            hot: dict[str, list[float]] = {"filtered": [], "unfiltered": []}
            await enqueue(plain, V1, 200)
            await drain(plain.storage, V1, 200)  # warm up, untimed
            for p in range(args.passes):
                for mode in (
                    ("filtered", "unfiltered") if p % 2 == 0 else ("unfiltered", "filtered")
                ):
                    await enqueue(plain, V1, args.runs)
                    if mode == "filtered":
                        hot[mode].append((await drain(plain.storage, V1, args.runs))[0])
                    else:
                        hot[mode].append(await _drain_unfiltered(plain.storage, V1, args.runs))
            record["hot"] = hot
            ratio = statistics.median(hot["filtered"]) / statistics.median(hot["unfiltered"])
            log(
                f"{name}: filtered {figure(hot['filtered'])} runs/s, unfiltered "
                f"{figure(hot['unfiltered'])} runs/s, ratio {ratio:.2f}"
            )
            # A deploy in progress: version 2 behind N runs of version 1.
            record["behind"] = {}
            seeded = 0
            v2_plain = ShapeStore("none", plain.storage, plain_v2)
            for size in args.sizes:
                await enqueue(behind, V1, size - seeded)
                seeded = size
                await _analyze(backend.analyze)
                none: list[float] = []
                deep: list[float] = []
                for p in range(args.passes):
                    for shape in ("none", "behind") if p % 2 == 0 else ("behind", "none"):
                        store = v2_plain if shape == "none" else behind_v2
                        await enqueue(store, V2, args.runs)
                        rate, _ = await drain(store.storage, V2, args.runs)
                        (none if shape == "none" else deep).append(rate)
                (stats,) = await behind.storage.queue_stats([NAME])
                if stats.pending != size:
                    raise RuntimeError(
                        f"{stats.pending} runs of version 1 are pending, not {size}: "
                        "a worker of version 2 took some"
                    )
                record["behind"][str(size)] = {"none": none, "behind": deep}
                ratio = statistics.median(deep) / statistics.median(none)
                log(
                    f"{name}: N={size:,} behind {figure(deep)} runs/s, none {figure(none)} "
                    f"runs/s, ratio {ratio:.2f} (version 1 runs untouched: {stats.pending:,})"
                )
        finally:
            for engine in (plain.producer, plain_v2, behind.producer, behind_v2.producer):
                await engine.close()
            await plain.storage.close()
            await behind.storage.close()


def table(data: dict[str, Any]) -> str:
    lines = [
        "backend     hot path: filtered / unfiltered runs/s (ratio)"
        "        version 2 behind N version 1 runs / none (ratio)",
    ]
    for name, r in data["backends"].items():
        if "hot" not in r:
            continue
        hot = r["hot"]
        ratio = statistics.median(hot["filtered"]) / statistics.median(hot["unfiltered"])
        row = (
            f"{name:10}  {statistics.median(hot['filtered']):6.0f} / "
            f"{statistics.median(hot['unfiltered']):6.0f} ({ratio:.2f})"
        )
        for size, cell in r.get("behind", {}).items():
            deep, none = statistics.median(cell["behind"]), statistics.median(cell["none"])
            row += f"   N={int(size):,}: {deep:.0f} / {none:.0f} ({deep / none:.2f})"
        lines.append(row)
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cancel_on_sigterm()
    data: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
        "tree": tree(),
        "runs": args.runs,
        "passes": args.passes,
        "sizes": args.sizes,
        "backends": {},
    }
    for name in args.backends:
        data["backends"][name] = record = {}
        started = time.perf_counter()
        await measure_backend(name, args, record)
        record["seconds"] = time.perf_counter() - started
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres", "redis"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--runs", type=int, default=2000, help="measured runs per pass")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    add_postgres_options(parser)
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="for the SQLite files")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        parser.error(f"unknown backends {bad}; choose from {BACKENDS}")
    if sorted(args.sizes) != args.sizes or min(args.sizes) < 1:
        parser.error("--sizes must be positive and increasing (the backlog grows in place)")
    data = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.json").write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
