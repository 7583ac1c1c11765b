"""``reflow worker APP --processes 2`` against one process, on the shared workload.

    python benchmarks/processes.py [--runs 5000] [--steps 5] [--passes 3]
                                   [--backends redis postgres] [--processes 2]
                                   [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                   [--redis-url redis://127.0.0.1:6379/0] [--pool-size 25]

The workload is ``throughput.py``'s: N runs of a K-step workflow whose steps
return a small dict, each worker process at concurrency 25 (the engine's own
setting, so two processes keep up to 50 runs in flight). This module is also
the APP the workers load (``processes:make``, with ``--app-dir benchmarks``):
it builds that engine on the store named by ``$BENCH_STORE``.

Each pass enqueues the N runs on a fresh store (25 concurrent tasks), then
starts ``python -m reflow_core worker processes:make`` with ``--processes 1``
or ``--processes P`` and times from the moment the first worker process logs
that it works (its ``worker_ready`` line: start-up and imports are not timed;
a second process that gets ready later counts against it) to the moment no
run is left unfinished (polled every 20 ms); then it sends SIGTERM and
expects a clean exit (status 0) and N completed runs. The two variants
alternate, their order swapped every pass, after one warm-up round; figures
are medians with the spread, and the ratio of the medians.

Next to steps/s each variant shows the CPU milliseconds per 1,000 steps
used during the timed window by its worker processes and by the database
server's processes on this machine (``redis-server``, ``postgres``; from
``/proc/<pid>/stat``), and how busy the whole machine was (from
``/proc/stat``): with the server on the same cores, a machine near 100% busy
means the workers, the server and whatever else runs there compete for the
CPU, and more processes cannot help much.

PostgreSQL: a database of its own (``reflow_bench_proc_<pid>``, dropped at
the end), a fresh schema per pass, ``pool_max_size=--pool-size`` per process.
Redis: a fresh key prefix per pass, deleted after it.
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
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from throughput import (
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    build_workflow,
    cancel_on_sigterm,
    drop_schema,
    redis_settings,
    scratch_database,
    server_settings,
    with_options,
)

from reflow_core import Engine

HERE = Path(__file__).resolve().parent
CONCURRENCY = 25
_UNFINISHED = ["pending", "running", "sleeping", "waiting"]
_TICKS = os.sysconf("SC_CLK_TCK")


def make() -> Engine:
    """The APP of the worker processes: the benchmark engine on ``$BENCH_STORE``."""
    return Engine(
        storage=os.environ["BENCH_STORE"],
        workflows=[build_workflow(int(os.environ["BENCH_STEPS"]))],
        concurrency=CONCURRENCY,
        lease="60s",
        poll_interval="50ms",
        load_entry_points=False,
    )


# -- measuring ------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


_SERVERS = {"redis": "redis-server", "postgres": "postgres"}
"""The process name of each backend's server, when it runs on this machine."""


def _server_cpu(name: str) -> float:
    """CPU seconds so far of every process of this machine called ``name``."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            comm, _, rest = text.partition(" (")[2].rpartition(")")
            if comm == name:
                fields = rest.split()
                total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def _machine() -> tuple[int, int]:
    """Jiffies of all CPUs: (busy, total)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class PassResult:
    steps_per_s: float
    cpu_per_1000_steps: float
    server_per_1000_steps: float
    machine_busy: float


class _Workers:
    """``reflow worker`` in a child process, and the JSON lines it logs."""

    def __init__(self, proc: asyncio.subprocess.Process, processes: int, server: str) -> None:
        self.proc = proc
        self.processes = processes
        self.ready: list[int] = []
        self.ready_at: list[float] = []
        """When each worker logged that it works (wall clock)."""
        self.cpu0: dict[int, float] = {}
        self.machine0 = (0, 0)
        self.server = server
        self.server0 = 0.0
        self.ready_event = asyncio.Event()
        self.lines: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "worker_ready":
                    pid = int(event["pid"])
                    if not self.ready:
                        self.machine0 = _machine()
                        self.server0 = _server_cpu(self.server)
                    self.cpu0[pid] = _cpu_seconds(pid)
                    self.ready.append(pid)
                    self.ready_at.append(datetime.fromisoformat(event["time"]).timestamp())
                    if len(self.ready) == self.processes:
                        self.ready_event.set()

    def failure(self, what: str) -> RuntimeError:
        return RuntimeError(f"{what}:\n" + "\n".join(self.lines[-20:]))


async def _count(client: Engine, workflow: str, status: str) -> int:
    total, cursor = 0, None
    while True:
        page = await client.list_runs(status=status, workflow=workflow, limit=500, cursor=cursor)
        total += len(page.runs)
        if page.next_cursor is None:
            return total
        cursor = page.next_cursor


async def one_pass(backend: str, store: str, processes: int, runs: int, steps: int) -> PassResult:
    wf = build_workflow(steps)
    env = {**os.environ, "BENCH_STORE": store, "BENCH_STEPS": str(steps)}
    async with Engine(
        storage=store, workflows=[wf], worker=False, load_entry_points=False
    ) as client:
        numbers = iter(range(runs))

        async def produce() -> None:
            for i in numbers:
                await client.enqueue(wf, {"n": i})

        await asyncio.gather(*(produce() for _ in range(25)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "reflow_core",
            "worker",
            "processes:make",
            "--app-dir",
            str(HERE),
            "--processes",
            str(processes),
            "--log-format",
            "json",
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        workers = _Workers(proc, processes, _SERVERS[backend])
        try:
            try:
                async with asyncio.timeout(60):
                    await workers.ready_event.wait()
            except TimeoutError:
                raise workers.failure("the workers did not get ready") from None
            while True:  # the workers are elsewhere: poll the store
                page = await client.storage.list_runs(status=_UNFINISHED, workflow=wf.name, limit=1)
                if not page.runs:
                    break
                await asyncio.sleep(0.02)
            elapsed = time.time() - min(workers.ready_at)
            busy0, total0 = workers.machine0
            busy1, total1 = _machine()
            cpu = sum(_cpu_seconds(pid) - workers.cpu0[pid] for pid in workers.ready)
            server = _server_cpu(workers.server) - workers.server0
            completed = await _count(client, wf.name, "completed")
            if completed != runs:
                raise workers.failure(f"{completed} of {runs} runs completed")
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                code = await proc.wait()
            if code != 0:
                raise workers.failure(f"the workers exited with {code}")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await workers.reader
    return PassResult(
        steps_per_s=runs * steps / elapsed,
        cpu_per_1000_steps=cpu / (runs * steps) * 1000,
        server_per_1000_steps=server / (runs * steps) * 1000,
        machine_busy=(busy1 - busy0) / max(total1 - total0, 1),
    )


# -- stores -------------------------------------------------------------------------


class Stores:
    """A fresh store URL per pass on one backend, and its disposal."""

    def __init__(self, backend: str, url: str, pool_size: int) -> None:
        self.backend = backend
        self.url = url
        self.pool_size = pool_size
        self.count = 0

    def new(self) -> tuple[str, str]:
        self.count += 1
        if self.backend == "postgres":
            name = f"bench_proc_{self.count}"
            return name, with_options(self.url, schema=name, pool_max_size=self.pool_size)
        name = f"reflow_bench_proc_{os.getpid()}_{self.count}"
        return name, f"{self.url}?prefix={name}&max_connections={self.pool_size}"

    async def dispose(self, name: str) -> None:
        if self.backend == "postgres":
            await drop_schema(self.url, name)
            return
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url)
        try:
            keys = [key async for key in client.scan_iter(match="{" + name + "}*", count=1000)]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start : start + 500])
        finally:
            await client.aclose()


async def measure(
    stores: Stores, variants: list[int], runs: int, steps: int, passes: int
) -> dict[int, list[PassResult]]:
    results: dict[int, list[PassResult]] = {p: [] for p in variants}
    for n in range(passes + 1):
        order = variants if n % 2 == 0 else variants[::-1]
        for processes in order:
            name, url = stores.new()
            try:
                result = await one_pass(
                    stores.backend, url, processes, runs if n else min(runs, 300), steps
                )
            finally:
                await stores.dispose(name)
            if n:  # the first round warms up
                results[processes].append(result)
    return results


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):>8,.0f} (spread {min(values):,.0f}-{max(values):,.0f})"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--backends", nargs="+", default=["redis", "postgres"], choices=["redis", "postgres"]
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--pool-size", type=int, default=25, help="connections per process")
    parser.add_argument("--json", action="store_true", help="print one JSON line per backend")
    args = parser.parse_args()
    cancel_on_sigterm()
    variants = [1, args.processes]
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, N={args.runs}, K={args.steps}, "
        f"concurrency {CONCURRENCY} per process, median of {args.passes} passes after a warm-up"
    )
    async with contextlib.AsyncExitStack() as stack:
        for backend in args.backends:
            if backend == "postgres":
                database = await stack.enter_async_context(
                    scratch_database(args.postgres_url, f"reflow_bench_proc_{os.getpid()}")
                )
                print(await server_settings(database))
                stores = Stores("postgres", database, args.pool_size)
            else:
                print(await redis_settings(args.redis_url))
                stores = Stores("redis", args.redis_url, args.pool_size)
            results = await measure(stores, variants, args.runs, args.steps, args.passes)
            speed = {p: statistics.median(r.steps_per_s for r in rs) for p, rs in results.items()}
            ratio = speed[args.processes] / speed[1]
            if args.json:
                record = {
                    "backend": backend,
                    "steps": args.steps,
                    "passes": {p: [r.__dict__ for r in rs] for p, rs in results.items()},
                    "ratio": ratio,
                }
                print(json.dumps(record), flush=True)
                continue
            print(f"\n{backend}, K={args.steps}")
            for processes, rs in results.items():
                cpu = statistics.median(r.cpu_per_1000_steps for r in rs)
                server = statistics.median(r.server_per_1000_steps for r in rs)
                busy = statistics.median(r.machine_busy for r in rs)
                print(
                    f"  --processes {processes}  steps/s {_median([r.steps_per_s for r in rs])}"
                    f"  CPU ms/1000 steps: workers {cpu * 1000:.0f},"
                    f" server {server * 1000:.0f}; machine {busy:.0%} busy"
                )
            print(f"  ratio {ratio:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
