"""Starting crash worker processes from a test, killing them, and reading what they did."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._log import Execution, Save, read_log

__all__ = ["Workers", "child_env"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on: bound, then released
    for a server the test starts (another process could take it meanwhile,
    which the kernel makes unlikely: it hands out ports in turn)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    """This process's environment, with its import path, so a worker can
    import an adapter module that pytest made importable here."""
    path = [entry for entry in sys.path if entry]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


class Workers:
    """Crash worker processes on one store, with their logs in one directory.

    ``target`` names the store (a storage URL or ``"module:callable"``);
    ``workflow``, if given, the workflow every worker started here runs.
    """

    def __init__(self, target: str, logdir: Path, *, workflow: str | None = None) -> None:
        self.target = target
        self.logdir = logdir
        self.workflow = workflow
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(
        self, command: str, target: str | None, args: Iterable[str]
    ) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        named = ["--workflow", self.workflow] if self.workflow else []
        argv = [
            sys.executable,
            "-m",
            "reflow_conformance.testsupport",
            command,
            target or self.target,
            str(self.logdir),
            *named,
            *args,
        ]
        with (
            (self.logdir / f"stdout-{n}.txt").open("wb") as out,
            (self.logdir / f"stderr-{n}.txt").open("wb") as err,
        ):
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=child_env())  # noqa: S603
        self.procs.append(proc)
        return proc

    def start(self, *args: str, target: str | None = None) -> subprocess.Popen[bytes]:
        """Start a worker (``work`` with ``args``)."""
        return self._spawn("work", target, args)

    def enqueue(self, runs: int, *args: str, target: str | None = None) -> subprocess.Popen[bytes]:
        """Start a process creating ``runs`` runs (``enqueue`` with ``args``)."""
        return self._spawn("enqueue", target, ("--runs", str(runs), *args))

    def lines(self, pid: int | None = None) -> list[dict[str, Any]]:
        """Every whole line logged (by process ``pid`` only, if given)."""
        return read_log(self.logdir, pid)

    def executions(self) -> list[Execution]:
        return [
            Execution(
                line["pid"],
                line["kind"],
                line["run"],
                line["step"],
                line["attempt"],
                line.get("token"),
                line.get("prev"),
                line["t"],
            )
            for line in self.lines()
            if line["kind"] in ("ran", "started", "blocked")
        ]

    def saves(self) -> list[Save]:
        return [
            Save(
                line["pid"],
                line["kind"] == "saved",
                line["run"],
                line["step"],
                line["token"],
                line["epoch"],
            )
            for line in self.lines()
            if line["kind"] in ("saved", "refused")
        ]

    def acked(self) -> dict[int, str]:
        """Enqueued runs the store acknowledged: n -> run id."""
        found: dict[int, str] = {}
        for line in self.lines():
            if line["kind"] == "acked":
                n, run_id = line["n"], line["run"]
                assert found.setdefault(n, run_id) == run_id, f"run {n} acknowledged as two runs"
        return found

    def logged(self, kind: str, proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
        """A condition: ``proc`` has logged a line of ``kind``."""

        def check() -> bool:
            return any(line["kind"] == kind for line in self.lines(proc.pid))

        return check

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 30) -> None:
        """Poll ``condition`` until it holds; fail if a worker fails or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            for proc in self.procs:
                code = proc.poll()
                if code not in (None, 0, -signal.SIGKILL):
                    raise AssertionError(self.failure(f"worker {proc.pid} exited with {code}"))
            if time.monotonic() > deadline:
                raise AssertionError(self.failure(f"timed out waiting for {what}"))
            time.sleep(0.02)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc`` and reap it."""
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(10)
        assert code == -signal.SIGKILL, self.failure(f"worker {proc.pid} ended with {code}")

    def signal_all(self, signum: signal.Signals) -> None:
        """Send ``signum`` to every process still running (SIGSTOP / SIGCONT)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def finish(
        self, timeout: float, procs: Iterable[subprocess.Popen[bytes]] | None = None
    ) -> None:
        """Wait for every process not killed to exit by itself, successfully."""
        deadline = time.monotonic() + timeout
        for proc in self.procs if procs is None else procs:
            if proc.returncode == -signal.SIGKILL:
                continue
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(self.failure(f"worker {proc.pid} did not finish")) from None
            if code != 0:
                raise AssertionError(self.failure(f"worker {proc.pid} exited with {code}"))

    def worker_logs(self, levels: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL")) -> list[str]:
        """The workers' log records at ``levels``, then everything they wrote to stderr."""
        found: list[str] = []
        for path in sorted(self.logdir.glob("worker-*.log")):
            found.extend(
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if any(f" {level} " in line for level in levels)
            )
        for path in sorted(self.logdir.glob("stderr-*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace")
            found.extend(f"{path.name}: {line}" for line in text.splitlines())
        return found

    def failure(self, message: str) -> str:
        logs = "\n".join(self.worker_logs()[-40:])
        return f"{message}\n-- worker logs (last 40 warnings, errors and stderr lines) --\n{logs}"

    def cleanup(self) -> None:
        """Kill and reap every process still running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
