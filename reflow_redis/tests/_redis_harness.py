"""Shared by ``test_processes.py`` and ``test_durability.py``: worker processes
(``_redis_worker.py``) with their logs, a redis-server of a test's own, and
the checks of what the workers left behind.

Test modules load this file by path (see :func:`load`): with pytest's
importlib import mode the tests folder is not a package one can import from.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from reflow_core import codec
from reflow_core.storage import NewRun, RunRecord, StepRecord
from reflow_redis import RedisStorage

HERE = Path(__file__).parent
WORKER = HERE / "_redis_worker.py"
WORKFLOW = "redis-crash"
STEPS = ("reserve", "charge", "ship")


def load(name: str) -> ModuleType:
    """Import a module of this folder by its file name (without ``.py``)."""
    full = f"reflow_redis_tests_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, HERE / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


# -- what the workers did -------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One execution of a step, from a worker's log."""

    pid: int
    kind: str  # "ran" (returned ``token``), "blocked" or "started" (waited to be killed)
    run: str
    step: str
    token: str | None


@dataclass(frozen=True)
class Save:
    """One save of a step result that returned, from a worker's log (``--record-saves``)."""

    pid: int
    ok: bool  # True: acknowledged by the server; False: refused by the fence
    run: str
    step: str
    token: str
    epoch: int


class Workers:
    """Worker processes on one Redis prefix, with their logs in one directory."""

    def __init__(self, url: str, logdir: Path) -> None:
        self.url = url
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, url: str | None = None) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        with (
            (self.logdir / f"stdout-{n}.txt").open("wb") as out,
            (self.logdir / f"stderr-{n}.txt").open("wb") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), url or self.url, str(self.logdir), *args],
                stdout=out,
                stderr=err,
            )
        self.procs.append(proc)
        return proc

    def lines(self, pid: int | None = None, kind: str = "exec") -> list[tuple[int, list[str]]]:
        found: list[tuple[int, list[str]]] = []
        for path in sorted(self.logdir.glob(f"{kind}-*.log")):
            owner = int(path.stem.split("-", 1)[1])
            if pid is not None and owner != pid:
                continue
            # A line is whole once its newline is written (one write each).
            text = path.read_text()
            whole = text[: text.rfind("\n") + 1]
            found.extend((owner, line.split()) for line in whole.splitlines() if line)
        return found

    def executions(self) -> list[Execution]:
        return [
            Execution(pid, fields[0], fields[1], fields[2], fields[3] if len(fields) > 3 else None)
            for pid, fields in self.lines()
            if fields[0] in ("ran", "blocked", "started")
        ]

    def saves(self) -> list[Save]:
        return [
            Save(pid, fields[0] == "saved", fields[1], fields[2], fields[3], int(fields[4]))
            for pid, fields in self.lines()
            if fields[0] in ("saved", "refused")
        ]

    def acked(self) -> dict[int, str]:
        """Enqueued runs the server acknowledged: n -> run id."""
        found: dict[int, str] = {}
        for _pid, fields in self.lines(kind="enqueue"):
            assert fields[0] == "acked"
            n, run_id = int(fields[1]), fields[2]
            assert found.setdefault(n, run_id) == run_id, f"run {n} acknowledged twice"
        return found

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for proc in self.procs:
                code = proc.poll()
                assert code in (None, 0, -signal.SIGKILL), self.failure(f"worker {proc.pid} died")
            assert time.monotonic() < deadline, self.failure(f"timed out waiting for {what}")
            time.sleep(0.02)

    def finish(self, timeout: float, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        """Wait for every process still running to exit by itself, successfully."""
        deadline = time.monotonic() + timeout
        for proc in self.procs if procs is None else procs:
            if proc.returncode == -signal.SIGKILL:
                continue
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(self.failure(f"worker {proc.pid} did not finish")) from None
            assert code == 0, self.failure(f"worker {proc.pid} exited with {code}")

    def worker_logs(self, levels: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL")) -> list[str]:
        found: list[str] = []
        for path in sorted(self.logdir.glob("worker-*.log")):
            found.extend(
                line
                for line in path.read_text().splitlines()
                if any(f" {lv} " in line for lv in levels)
            )
        for path in sorted(self.logdir.glob("stderr-*.txt")):
            found.extend(f"{path.name}: {line}" for line in path.read_text().splitlines())
        return found

    def failure(self, message: str) -> str:
        logs = "\n".join(self.worker_logs()[-40:])
        return f"{message}\n-- worker logs (last 40 warnings/errors) --\n{logs}"

    def signal_all(self, signum: signal.Signals) -> None:
        """Send ``signum`` to every process still running (SIGSTOP / SIGCONT)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# -- a redis-server of the test's own -----------------------------------------------------


def need_redis_server() -> str:
    """The redis-server binary; skips the test without one (fails it under CI)."""
    found = shutil.which("redis-server")
    if found is None:
        message = "needs the redis-server binary on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process on 127.0.0.1, started and killed by the test."""

    def __init__(self, binary: str, directory: Path, *options: str) -> None:
        self.binary = binary
        self.directory = directory
        self.options = options
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def start(self, timeout: float = 30) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = self.directory / f"redis-{self.starts}.log"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
                "--logfile",
                str(log),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            assert code is None, f"redis-server exited with {code}: {self.log_tail(log)}"
            try:
                with self.client() as probe:
                    # Answers PING only once the data set is loaded (else LOADING).
                    if probe.ping():
                        return
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            assert time.monotonic() < deadline, f"redis-server did not start: {self.log_tail(log)}"
            time.sleep(0.02)

    def crash(self) -> None:
        """SIGKILL the server: nothing is flushed or saved on the way down."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @staticmethod
    def log_tail(path: Path) -> str:
        return path.read_text()[-2000:] if path.exists() else "(no log)"


# -- the stored runs ---------------------------------------------------------------------


@dataclass
class Outcome:
    """The runs and steps under one prefix once the workers are done."""

    runs: dict[str, RunRecord]
    steps: dict[str, dict[str, StepRecord]]  # in the order they were first saved
    inputs: dict[str, Any]


def enqueue(url: str, runs: int) -> dict[str, Any]:
    """Create ``runs`` runs of the workflow; return id -> input."""

    async def create() -> dict[str, Any]:
        store = RedisStorage.from_url(url)
        await store.initialize()
        try:
            made: dict[str, Any] = {}
            for first in range(0, runs, 100):
                batch = [{"n": n} for n in range(first, min(first + 100, runs))]
                results = await asyncio.gather(
                    *(store.create_run(NewRun(WORKFLOW, codec.encode(i))) for i in batch)
                )
                made.update((r.run.id, i) for r, i in zip(results, batch, strict=True))
            return made
        finally:
            await store.close()

    return asyncio.run(create())


def read_outcome(url: str, inputs: dict[str, Any]) -> Outcome:
    async def read() -> Outcome:
        store = RedisStorage.from_url(url)
        await store.initialize()
        try:
            runs: dict[str, RunRecord] = {}
            cursor = None
            while True:
                page = await store.list_runs(limit=500, cursor=cursor)
                runs.update((r.id, r) for r in page.runs)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            ids = sorted(runs)
            steps: dict[str, dict[str, StepRecord]] = {}
            for first in range(0, len(ids), 200):
                chunk = ids[first : first + 200]
                found = await asyncio.gather(*(store.get_step_results(i) for i in chunk))
                steps.update(zip(chunk, found, strict=True))
            return Outcome(runs, steps, inputs)
        finally:
            await store.close()

    return asyncio.run(read())


def check_outcome(outcome: Outcome, executions: list[Execution], saves: list[Save]) -> set[str]:
    """Check every run completed through real executions, each saved result being
    the output of one of them and every acknowledged save still in place.
    Returns the runs in which a step executed more than once."""
    assert set(outcome.runs) == set(outcome.inputs), "runs were lost or appeared"
    statuses = Counter(r.status for r in outcome.runs.values())
    assert statuses == {"completed": len(outcome.inputs)}, statuses
    by_step: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for ex in executions:
        by_step[ex.run, ex.step].append(ex)
    tokens = [ex.token for ex in executions if ex.kind == "ran"]
    assert len(tokens) == len(set(tokens)), "a token was handed out twice"
    acked: dict[tuple[str, str], set[str]] = defaultdict(set)
    for save in saves:
        if save.ok:
            acked[save.run, save.step].add(save.token)

    for run_id, record in outcome.runs.items():
        steps = outcome.steps[run_id]
        # Saved in workflow order, each once (a step keeps its first sequence number).
        assert list(steps) == list(STEPS), (run_id, list(steps))
        prev: Any = outcome.inputs[run_id]
        for name in STEPS:
            step = steps[name]
            assert step.status == "completed", (run_id, name, step)
            assert step.output is not None
            value = codec.decode(step.output)
            ran = [ex.token for ex in by_step[run_id, name] if ex.kind == "ran"]
            # The saved result is the output of a real execution of this step,
            # and that execution was given the saved previous step.
            assert value["step"] == name
            assert value["token"] in ran, (run_id, name, value, ran)
            assert value["prev"] == prev, (run_id, name)
            # Every save the server acknowledged is the one in place: none was
            # lost, and none was replaced by the result of another execution.
            assert acked[run_id, name] <= {value["token"]}, (run_id, name, acked[run_id, name])
            prev = value
        assert record.output is not None
        assert codec.decode(record.output) == prev
        if record.reclaims == 0:
            # Nobody's lease lapsed: claimed once, every step executed once.
            assert record.attempts == 1, (run_id, record.attempts)
            assert all(len(by_step[run_id, name]) == 1 for name in STEPS), (
                run_id,
                {name: by_step[run_id, name] for name in STEPS},
            )

    assert {ex.run for ex in executions} <= set(outcome.runs)
    assert {save.run for save in saves} <= set(outcome.runs)
    return {run for (run, _step), found in by_step.items() if len(found) > 1}
