"""Reflow on PostgreSQL side by side with DBOS Transact, on one server in one run.

    python benchmarks/vs_dbos.py [--steps 1 5] [--runs 2000] [--passes 3]
                                 [--dbos-runs 1000] [--dbos-passes 3] [--dbos-mode start]
                                 [--venv /tmp/reflow-dbos-venv]
                                 [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

DBOS is not a dependency of this project: the benchmark creates a virtual
environment under ``/tmp`` (``--venv``) and installs ``dbos`` and
``psycopg[binary]`` into it with pip (once; an existing one that imports
``dbos`` is reused). It then runs the shared anchor workload,
``../shared/anchors/dbos_bench.py`` relative to the repository root
(``--dbos-script``), for each K: N runs of a K-step workflow, concurrency 25,
each pass in a fresh database ``reflow_dbos_<pid>`` dropped afterwards. Mode
``start`` (the default) is DBOS's fastest path, ``start_workflow_async``
under a 25-slot semaphore; its time runs from the first start to the last
durable completion.

Reflow runs the workload of ``throughput.py`` on the same server (a database
``reflow_bench_<pid>``, a fresh schema per pass, one warm-up pass, dropped at
the end): ``drain`` times the worker alone (runs enqueued beforehand),
``end-to-end`` the sequential enqueue loop plus the drain, and
``overlapped`` 25 tasks enqueueing while the worker runs (``--overlapped`` of
``throughput.py``), the same shape as DBOS's figure. The ratios (``x ...``)
divide Reflow's median steps/s by DBOS's median steps/s.
Both run on the same 25-slot concurrency; DBOS runs in its own process, so
the two never compete for the CPU at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from throughput import (
    DEFAULT_POSTGRES_URL,
    cancel_on_sigterm,
    libpq_url,
    measure,
    measure_overlapped,
    postgres_backend,
    scratch_database,
    server_settings,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCRIPT = ROOT.parent / "shared" / "anchors" / "dbos_bench.py"
DEFAULT_VENV = Path("/tmp/reflow-dbos-venv")
DBOS_TIMEOUT = 1800.0
_VERSION = "import dbos, psycopg, importlib.metadata as m; print(m.version('dbos'))"
_LINE = re.compile(r"runs_per_s=(?P<runs>[\d.]+) steps_per_s=(?P<steps>[\d.]+)")


@dataclass
class Rates:
    runs_per_s: float
    steps_per_s: float


async def check(*command: str | Path, timeout: float = 900.0) -> str:
    """Run ``command``; its output, or SystemExit with it when it fails."""
    process = await asyncio.create_subprocess_exec(
        *map(str, command), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        raise SystemExit(f"timed out after {timeout:g}s: {command}") from None
    finally:
        if process.returncode is None:  # timed out or cancelled: stop it first
            process.kill()
            await process.wait()
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {command}\n{text[-3000:]}")
    return text


async def ensure_venv(venv: Path) -> Path:
    """The Python of ``venv``, with dbos and psycopg installed in it."""
    python = venv / "bin" / "python"
    if python.exists():
        with contextlib.suppress(SystemExit):
            version = await check(python, "-c", _VERSION)
            print(f"dbos {version.strip()} from {venv}", flush=True)
            return python
    print(f"creating {venv} and installing dbos into it ...", flush=True)
    await check(sys.executable, "-m", "venv", venv)
    await check(python, "-m", "pip", "install", "--quiet", "dbos", "psycopg[binary]")
    version = await check(python, "-c", _VERSION)
    print(f"dbos {version.strip()} installed in {venv}", flush=True)
    return python


async def dbos_pass(
    python: Path, script: Path, admin_url: str, steps: int, runs: int, mode: str
) -> Rates:
    async with scratch_database(admin_url, f"reflow_dbos_{os.getpid()}") as database:
        out = await check(
            python,
            script,
            libpq_url(database),
            str(steps),
            str(runs),
            mode,
            timeout=DBOS_TIMEOUT,
        )
    found = _LINE.search(out)
    if found is None:
        raise SystemExit(f"no result line in the DBOS output:\n{out[-3000:]}")
    return Rates(float(found["runs"]), float(found["steps"]))


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--runs", type=int, default=2000, help="N for Reflow")
    parser.add_argument("--passes", type=int, default=3, help="Reflow passes per K")
    parser.add_argument("--dbos-runs", type=int, default=1000, help="N for DBOS")
    parser.add_argument("--dbos-passes", type=int, default=3, help="DBOS passes per K")
    parser.add_argument("--dbos-mode", choices=["start", "queue"], default="start")
    parser.add_argument("--dbos-script", type=Path, default=DEFAULT_SCRIPT)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--pool-size", type=int, default=25)
    args = parser.parse_args()
    cancel_on_sigterm()
    if not args.dbos_script.exists():
        raise SystemExit(f"no DBOS benchmark script at {args.dbos_script}")
    python = await ensure_venv(args.venv)
    print(f"python {sys.version.split()[0]}, concurrency 25 on both sides", flush=True)

    dbos: dict[int, list[Rates]] = {}
    for steps in args.steps:
        dbos[steps] = []
        for _ in range(args.dbos_passes):
            rates = await dbos_pass(
                python, args.dbos_script, args.postgres_url, steps, args.dbos_runs, args.dbos_mode
            )
            print(
                f"dbos K={steps} N={args.dbos_runs}: {rates.runs_per_s:,.0f} runs/s, "
                f"{rates.steps_per_s:,.0f} steps/s",
                flush=True,
            )
            dbos[steps].append(rates)

    drain: dict[int, list[float]] = {}
    end_to_end: dict[int, list[float]] = {}
    overlapped: dict[int, list[float]] = {}
    async with scratch_database(args.postgres_url, f"reflow_bench_{os.getpid()}") as database:
        print(await server_settings(database), flush=True)
        backend = postgres_backend(database, args.pool_size)
        for steps in args.steps:
            results = await measure(backend, args.runs, steps, args.passes)
            drain[steps] = [r.steps_per_s for r in results]
            end_to_end[steps] = [r.end_to_end_runs_per_s * steps for r in results]
            runs_per_s = await measure_overlapped(backend, args.runs, steps, args.passes)
            overlapped[steps] = [rate * steps for rate in runs_per_s]
            print(
                f"reflow K={steps} N={args.runs}: drain {median_spread(drain[steps])} steps/s, "
                f"end-to-end {median_spread(end_to_end[steps])} steps/s, "
                f"overlapped {median_spread(overlapped[steps])} steps/s",
                flush=True,
            )

    print(
        f"\nmedian (min-max) of {args.dbos_passes} DBOS passes (N={args.dbos_runs}, mode "
        f"{args.dbos_mode}) and {args.passes} Reflow passes (N={args.runs}); steps/s unless noted"
    )
    header = (
        f"{'K':>2}  {'DBOS runs/s':>15}  {'DBOS steps/s':>15}  {'Reflow drain':>21}"
        f"  {'Reflow end-to-end':>21}  {'Reflow overlapped':>21}  {'x drain':>7}  {'x e2e':>6}"
        f"  {'x overl.':>8}"
    )
    print(header)
    for steps in args.steps:
        dbos_steps = statistics.median(r.steps_per_s for r in dbos[steps])
        ours = (drain[steps], end_to_end[steps], overlapped[steps])
        print(
            f"{steps:>2}  {median_spread([r.runs_per_s for r in dbos[steps]]):>15}"
            f"  {median_spread([r.steps_per_s for r in dbos[steps]]):>15}"
            + "".join(f"  {median_spread(values):>21}" for values in ours)
            + "".join(
                f"  {statistics.median(values) / dbos_steps:>{width - 1}.1f}x"
                for values, width in zip(ours, (7, 6, 8), strict=True)
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
