"""The workers' execution logs: writing one, and reading them back.

Every worker process appends what it does to ``LOGDIR/exec-<pid>.log``, one
JSON object a line, each line written with a single ``write`` to a file
opened with ``O_APPEND``: a line written survives the process being killed,
and a line without its newline is never read as whole. The kinds of lines are
listed in :mod:`reflow_conformance.testsupport`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Execution", "ExecutionLog", "Save", "read_log"]


class ExecutionLog:
    """This process's append-only log, ``LOGDIR/exec-<pid>.log``."""

    def __init__(self, logdir: str | Path) -> None:
        path = os.path.join(logdir, f"exec-{os.getpid()}.log")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def write(self, kind: str, **fields: Any) -> None:
        """Append one line, in a single ``write``."""
        line = {"kind": kind, "pid": os.getpid(), "t": time.time(), **fields}
        data = (json.dumps(line, separators=(",", ":"), default=repr) + "\n").encode()
        with self._lock:
            os.write(self._fd, data)

    def close(self) -> None:
        os.close(self._fd)


# -- reading the logs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One execution of a step, from a worker's log."""

    pid: int
    kind: str
    """``"ran"`` (returned), ``"started"`` or ``"blocked"`` (waited to be killed)."""
    run: str
    step: str
    attempt: int
    token: str | None
    prev: Any = field(default=None, compare=False)
    t: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Save:
    """One save of a step result that returned, from a worker's log."""

    pid: int
    ok: bool
    """True: acknowledged by the store; False: refused by the fence."""
    run: str
    step: str
    token: str | None
    epoch: int


def read_log(logdir: Path, pid: int | None = None) -> list[dict[str, Any]]:
    """The whole lines of the workers' logs in ``logdir`` (of process ``pid`` only, if given)."""
    found: list[dict[str, Any]] = []
    pattern = "exec-*.log" if pid is None else f"exec-{pid}.log"
    for path in sorted(logdir.glob(pattern)):
        text = path.read_text(encoding="utf-8")
        whole = text[: text.rfind("\n") + 1]
        found.extend(json.loads(line) for line in whole.splitlines() if line)
    return found
