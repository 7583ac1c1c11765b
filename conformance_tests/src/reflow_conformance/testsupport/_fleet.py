"""``reflow worker`` processes serving an application of a test's own."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from reflow_core.storage import RunRecord

from ._check import with_storage
from ._processes import Workers, child_env

__all__ = ["AppFleet", "now_and_then"]


class AppFleet:
    """Real ``reflow worker`` processes running ``MODULE:make`` on one store.

    The application's source is written to ``<root>/<module>.py``; each
    worker gets ``APP_LOGDIR`` (where its :class:`~reflow_conformance.testsupport.ExecutionLog`
    goes), ``APP_STORE`` (the store's URL) and the ``env`` given to
    :meth:`start`. Their logs are read through :attr:`workers`, which also
    watches them (a worker that exits unasked fails a wait) and kills what is
    left at :meth:`cleanup`.
    """

    def __init__(
        self, root: Path, store: str, *, module: str, source: str, workflow: str | None = None
    ) -> None:
        self.root = root
        self.store = store
        self.module = module
        logs = root / "logs"
        logs.mkdir()
        (root / f"{module}.py").write_text(source)
        self.workers = Workers(store, logs, workflow=workflow)

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        """Start one worker, with ``APP_<NAME>`` set for each ``NAME=value`` of ``env``."""
        environ = {
            **child_env(),
            "APP_LOGDIR": str(self.workers.logdir),
            "APP_STORE": self.store,
            **{f"APP_{name.upper()}": value for name, value in env.items()},
        }
        argv = [
            *(sys.executable, "-m", "reflow_core", "worker", f"{self.module}:make"),
            *("--app-dir", str(self.root), "--log-format", "json"),
        ]
        n = len(self.workers.procs)
        with (self.workers.logdir / f"stderr-{n}.txt").open("wb") as err:
            proc = subprocess.Popen(argv, stderr=err, env=environ, cwd=self.root)  # noqa: S603
        self.workers.procs.append(proc)
        return proc

    def run(self, run_id: str) -> RunRecord | None:
        """The run as stored now."""
        return with_storage(self.store, lambda storage: storage.get_run(run_id))

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM: the worker drains and exits 0."""
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(self.workers.failure(f"{proc.pid} did not stop")) from None
        assert code == 0, self.workers.failure(f"{proc.pid} exited with {code}")

    def cleanup(self) -> None:
        self.workers.cleanup()


def now_and_then(condition: Callable[[], bool], seconds: float) -> Callable[[], bool]:
    """``condition``, asked at most every ``seconds`` (False in between): for
    a wait that reads the store, so it does not hammer it."""
    asked = [0.0]

    def check() -> bool:
        if time.monotonic() - asked[0] < seconds:
            return False
        asked[0] = time.monotonic()
        return condition()

    return check
