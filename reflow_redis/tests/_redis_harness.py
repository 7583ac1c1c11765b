"""A redis-server of a test's own, for ``test_durability.py`` and
``test_secrets_and_timeouts.py``.

Test modules load this file by path: with pytest's importlib import mode the
tests folder is not a package one can import from. The worker processes and
the checks of what they left behind are :mod:`reflow_conformance.testsupport`'s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from reflow_conformance.testsupport import free_port

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
