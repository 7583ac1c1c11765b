"""Reflow's throughput next to reflow-ts's on Bun, measured in one run, as ratios.

    python benchmarks/vs_reflow_ts.py --reflow-ts-src DIR [--anchors DIR]
                                      [--backends memory sqlite postgres redis]
                                      [--batch 500]
                                      [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                      [--redis-url redis://127.0.0.1:6379/0] [--pool-size 25]

reflow-ts is not a dependency of this project and none of it enters the
repository: this script runs its own benchmark through
``reflow_ts_bench.sh SRC_DIR`` in the anchors folder (``--anchors``, by
default ``../shared/anchors`` relative to the repository root), which
installs Bun from the npm registry under ``/tmp/reflow-ts-bun`` on first use,
and reads the numbers from the table it prints. ``--reflow-ts-src`` (or the
environment variable ``REFLOW_TS_SRC``) is a plain checkout or export of
reflow-ts 0.7.

The order is: reflow-ts's benchmark, then Reflow's ``throughput.py``
workload, then reflow-ts's benchmark again, so that both sides see the
machine in the same state and the reflow-ts figures come with the range of
its two runs. Each side runs in its own process, one after the other, so they
never compete for the CPU.

The workload is the one reflow-ts's benchmark prints in its header, which
Reflow then runs too: N runs of a K-step workflow (N = 2,000; K = 1 and 5),
concurrency 25, best of 3 passes after a warm-up (reflow-ts warms up once
per storage, Reflow once per storage and K). reflow-ts times its enqueue loop
and then ``tick()`` until every run has completed; Reflow times its enqueue
loop and then a started worker until the last run is durably completed
(``throughput.one_pass``). Storages: reflow-ts's in-memory storage against
Reflow's ``memory://``, its ``bun:sqlite`` storage (WAL,
``synchronous=NORMAL``) against Reflow's SQLite (WAL, ``synchronous=NORMAL``).
PostgreSQL and Redis (``--backends``), which reflow-ts does not have, are
set against its SQLite figures, its only durable storage.

With ``--batch B`` each Reflow pass also enqueues the N runs through
``Engine.enqueue_many`` in batches of B (``throughput.py --batch``), set
against reflow-ts's enqueue loop, its only way to enqueue.

The table gives, per storage and K, reflow-ts's figure as the range of its
two runs (each the best of its 3 passes), Reflow's best and median pass, and
the ratio Reflow best / reflow-ts as a range: Reflow's best divided by
reflow-ts's higher and by its lower figure. A ratio above 1 means Reflow is
faster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from throughput import (
    PassResult,
    add_backend_options,
    cancel_on_sigterm,
    measure,
    open_backend,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ANCHORS = ROOT.parent / "shared" / "anchors"
BENCH_SCRIPT = "reflow_ts_bench.sh"
REFLOW_TS_TIMEOUT = 1800.0
CONCURRENCY = 25
"""Reflow's ``throughput.one_pass`` runs its engine at this concurrency."""

_HEADER = re.compile(
    r"^Reflow benchmarks \S+ (?P<runtime>.+?), (?P<runs>[\d,]+) runs/scenario, "
    r"concurrency (?P<concurrency>\d+), best of (?P<repeats>\d+)\s*$",
    re.MULTILINE,
)
_ROW = re.compile(
    r"^\|\s*(?P<storage>[\w-]+)\s*\|\s*(?P<steps>\d+)\s*\|\s*(?P<enqueue>[\d,]+)\s*"
    r"\|\s*(?P<runs>[\d,]+)\s*\|\s*(?P<steps_per_s>[\d,]+)\s*\|\s*(?P<spread>\d+)%\s*\|\s*$",
    re.MULTILINE,
)
TS_STORAGE = {
    "memory": "memory",
    "sqlite": "sqlite-bun",
    "postgres": "sqlite-bun",
    "redis": "sqlite-bun",
}
"""The reflow-ts storage each Reflow backend is set against."""
LABELS = {
    "memory": "memory",
    "sqlite": "SQLite (WAL, NORMAL)",
    "postgres": "PostgreSQL *",
    "redis": "Redis *",
}


class ReflowTsOutputError(Exception):
    """reflow-ts's benchmark printed something this script cannot read."""


@dataclass(frozen=True)
class TsRow:
    """One line of reflow-ts's result table (each figure its best of the passes)."""

    storage: str
    steps: int
    enqueue_per_s: float
    runs_per_s: float
    steps_per_s: float
    spread: float


@dataclass(frozen=True)
class TsRun:
    """One run of reflow-ts's benchmark: its header and its table."""

    runtime: str
    runs: int
    concurrency: int
    repeats: int
    rows: dict[tuple[str, int], TsRow]


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_reflow_ts(output: str) -> TsRun:
    """The header and result rows of reflow-ts's benchmark output."""
    header = _HEADER.search(output)
    if header is None:
        raise ReflowTsOutputError(f"no header line in reflow-ts's output:\n{output[-3000:]}")
    rows: dict[tuple[str, int], TsRow] = {}
    for found in _ROW.finditer(output):
        row = TsRow(
            storage=found["storage"],
            steps=int(found["steps"]),
            enqueue_per_s=_number(found["enqueue"]),
            runs_per_s=_number(found["runs"]),
            steps_per_s=_number(found["steps_per_s"]),
            spread=int(found["spread"]) / 100,
        )
        rows[(row.storage, row.steps)] = row
    if not rows:
        raise ReflowTsOutputError(f"no result rows in reflow-ts's output:\n{output[-3000:]}")
    return TsRun(
        runtime=header["runtime"],
        runs=int(_number(header["runs"])),
        concurrency=int(header["concurrency"]),
        repeats=int(header["repeats"]),
        rows=rows,
    )


async def run_command(*command: str | Path, timeout: float) -> str:
    """Run ``command`` in a process group of its own; its output, or SystemExit
    with its tail when it fails. The group is killed on timeout or cancellation."""
    process = await asyncio.create_subprocess_exec(
        *map(str, command),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        raise SystemExit(f"timed out after {timeout:g}s: {command}") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {command}\n{text[-3000:]}")
    return text


async def reflow_ts_run(script: Path, src: Path, which: str) -> TsRun:
    print(f"reflow-ts benchmark ({which}) ...", flush=True)
    output = await run_command("bash", script, src, timeout=REFLOW_TS_TIMEOUT)
    run = parse_reflow_ts(output)
    for row in run.rows.values():
        print(
            f"  reflow-ts {row.storage} K={row.steps}: enqueue {row.enqueue_per_s:,.0f}/s, "
            f"{row.steps_per_s:,.0f} steps/s (spread {row.spread:.0%})",
            flush=True,
        )
    return run


def span(values: Sequence[float]) -> str:
    """``low-high`` of ``values`` (one figure when they round alike)."""
    low, high = f"{min(values):,.0f}", f"{max(values):,.0f}"
    return low if low == high else f"{low}-{high}"


def best_median(values: Sequence[float]) -> str:
    return f"{max(values):,.0f} ({statistics.median(values):,.0f})"


def ratio(ours: Sequence[float], theirs: Sequence[float]) -> str:
    """Our best over their higher and their lower figure."""
    best = max(ours)
    low, high = f"{best / max(theirs):.2f}", f"{best / min(theirs):.2f}"
    return f"{low}x" if low == high else f"{low}-{high}x"


def table(
    ts_runs: Sequence[TsRun],
    reflow: dict[tuple[str, int], list[PassResult]],
    batch: int | None,
) -> list[str]:
    """The markdown table of the figures and ratios."""
    header = [
        "storage",
        "K",
        "reflow-ts steps/s",
        "Reflow steps/s best (median)",
        "x steps",
        "reflow-ts enqueue/s",
        "Reflow enqueue/s best (median)",
        "x enqueue",
    ]
    if batch is not None:
        header += [f"Reflow enqueue_many/s (batch {batch})", "x enqueue_many"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (backend, steps), passes in reflow.items():
        theirs = [run.rows[(TS_STORAGE[backend], steps)] for run in ts_runs]
        ts_steps = [row.steps_per_s for row in theirs]
        ts_enqueue = [row.enqueue_per_s for row in theirs]
        drain = [p.steps_per_s for p in passes]
        enqueue = [p.enqueue_per_s for p in passes]
        cells = [
            LABELS[backend],
            str(steps),
            span(ts_steps),
            best_median(drain),
            ratio(drain, ts_steps),
            span(ts_enqueue),
            best_median(enqueue),
            ratio(enqueue, ts_enqueue),
        ]
        if batch is not None:
            batched = [p.batch_enqueue_per_s or 0.0 for p in passes]
            cells += [best_median(batched), ratio(batched, ts_enqueue)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def source_dir(value: str | None) -> Path:
    if not value:
        raise SystemExit("give --reflow-ts-src DIR or set REFLOW_TS_SRC")
    src = Path(value).resolve()
    if not (src / "benchmarks" / "index.ts").is_file():
        raise SystemExit(f"{src} is not a reflow-ts source tree (no benchmarks/index.ts)")
    return src


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--reflow-ts-src",
        default=os.environ.get("REFLOW_TS_SRC"),
        help="a checkout or export of reflow-ts 0.7 (default: $REFLOW_TS_SRC)",
    )
    parser.add_argument(
        "--anchors",
        type=Path,
        default=DEFAULT_ANCHORS,
        help=f"the folder holding {BENCH_SCRIPT} (default: ../shared/anchors from the repo root)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        metavar="B",
        help="also time Reflow's Engine.enqueue_many, B runs per call (e.g. 500)",
    )
    add_backend_options(parser, ["memory", "sqlite"])
    args = parser.parse_args()
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    src = source_dir(args.reflow_ts_src)
    script = (args.anchors / BENCH_SCRIPT).resolve()
    if not script.is_file():
        raise SystemExit(f"no {BENCH_SCRIPT} in {args.anchors}")
    cancel_on_sigterm()

    before = await reflow_ts_run(script, src, "before")
    if before.concurrency != CONCURRENCY:
        raise SystemExit(f"reflow-ts ran at concurrency {before.concurrency}, not {CONCURRENCY}")
    ks = sorted({steps for _, steps in before.rows})
    for backend in args.backends:
        missing = [k for k in ks if (TS_STORAGE[backend], k) not in before.rows]
        if missing:
            raise SystemExit(f"reflow-ts printed no {TS_STORAGE[backend]} row for K={missing}")
    print(
        f"python {sys.version.split()[0]}, {before.runtime}; N={before.runs}, "
        f"K={' and '.join(map(str, ks))}, concurrency {CONCURRENCY}, "
        f"best of {before.repeats} on both sides",
        flush=True,
    )

    reflow: dict[tuple[str, int], list[PassResult]] = {}
    async with contextlib.AsyncExitStack() as stack:
        tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-bench-"))
        for name in args.backends:
            backend = await open_backend(name, args, stack, Path(tmpdir))
            for steps in ks:
                passes = await measure(backend, before.runs, steps, before.repeats, args.batch)
                reflow[(name, steps)] = passes
                batched = [p.batch_enqueue_per_s or 0.0 for p in passes]
                print(
                    f"  reflow {backend.label} K={steps}: enqueue "
                    f"{best_median([p.enqueue_per_s for p in passes])}/s"
                    + (f", enqueue_many {best_median(batched)}/s" if args.batch else "")
                    + f", {best_median([p.steps_per_s for p in passes])} steps/s",
                    flush=True,
                )

    after = await reflow_ts_run(script, src, "after")
    for key in before.rows:
        if key not in after.rows:
            raise SystemExit(f"reflow-ts's second run printed no row for {key}")

    print(
        f"\nreflow-ts 0.7 ({before.runtime}; its two runs, each best of {before.repeats}) and "
        f"Reflow (python {sys.version.split()[0]}; best (median) of {before.repeats}); "
        f"N={before.runs}, concurrency {CONCURRENCY}; x = Reflow best / reflow-ts\n"
    )
    print("\n".join(table([before, after], reflow, args.batch)))
    if any(name in ("postgres", "redis") for name in args.backends):
        print("\n\\* against reflow-ts's SQLite figures (it has no PostgreSQL or Redis storage)")
    noisy = max(row.spread for run in (before, after) for row in run.rows.values())
    if noisy > 0.25:
        print(f"\nreflow-ts's passes spread up to {noisy:.0%}: the machine was busy")


if __name__ == "__main__":
    asyncio.run(main())
