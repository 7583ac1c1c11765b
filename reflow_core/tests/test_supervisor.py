"""The process supervisor on plain child commands, in a real supervisor process.

Each test runs a :class:`~reflow_core.supervisor.Supervisor` in a process of
its own (signals reach only a main thread), over small Python children that
write their pid to a directory and react to SIGTERM as told.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reflow_conformance.testsupport import child_env
from reflow_core.supervisor import RestartPolicy

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    directory, mode = sys.argv[1], sys.argv[2]
    with open(os.path.join(directory, f"child-{os.getpid()}"), "w") as f:
        f.write(os.environ["REFLOW_WORKER_INDEX"])
    if mode == "crash":
        sys.exit(3)
    if mode == "clean":
        sys.exit(0)
    stopped = []
    if mode == "drain":
        signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
        signal.signal(signal.SIGINT, lambda *_: stopped.append(1))
    else:  # "stubborn": ignores SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while not stopped:
        time.sleep(0.01)
    time.sleep(0.2)  # draining
    open(os.path.join(directory, f"drained-{os.getpid()}"), "w").close()
    """
)


def _supervise(
    tmp_path: Path, mode: str, processes: int = 2, **options: float
) -> subprocess.Popen[str]:
    stop_timeout = options.pop("stop_timeout", 5.0)
    script = textwrap.dedent(
        f"""
        import logging, sys
        from reflow_core.cli.worker import configure_logging
        from reflow_core.supervisor import RestartPolicy, Supervisor
        configure_logging("json", "info")
        command = [sys.executable, "-c", {_CHILD!r}, {str(tmp_path)!r}, {mode!r}]
        policy = RestartPolicy(**{options!r})
        sys.exit(Supervisor(command, {processes}, stop_timeout={stop_timeout}, policy=policy).run())
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _children(tmp_path: Path) -> dict[int, str]:
    found: dict[int, str] = {}
    for path in tmp_path.glob("child-*"):
        index = path.read_text()
        if index:
            found[int(path.name.split("-")[1])] = index
    return found


def _events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _finish(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the supervisor did not exit:\n{err}") from None
    return proc.returncode, err


def test_backoff_doubles_up_to_its_maximum() -> None:
    policy = RestartPolicy(backoff=0.5, max_backoff=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.slow
def test_sigterm_is_forwarded_and_every_child_drains(tmp_path: Path) -> None:
    proc = _supervise(tmp_path, "drain", processes=3)
    try:
        _wait(lambda: len(_children(tmp_path)) == 3, timeout=10)
        assert sorted(_children(tmp_path).values()) == ["1", "2", "3"]
        proc.send_signal(signal.SIGTERM)
        code, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert {p.name.split("-")[1] for p in tmp_path.glob("drained-*")} == {
        str(pid) for pid in _children(tmp_path)
    }
    kinds = [e["event"] for e in _events(err)]
    assert kinds.count("worker_started") == 3
    assert kinds.count("worker_stopped") == 3
    assert kinds[-1] == "supervisor_stopped"


@pytest.mark.slow
def test_a_killed_child_is_restarted_in_its_slot(tmp_path: Path) -> None:
    proc = _supervise(tmp_path, "drain", backoff=0.1)
    try:
        _wait(lambda: len(_children(tmp_path)) == 2, timeout=10)
        victim, slot = next(iter(_children(tmp_path).items()))
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len(_children(tmp_path)) == 3, timeout=10)
        replacement = [pid for pid in _children(tmp_path) if pid != victim]
        assert slot in {_children(tmp_path)[pid] for pid in replacement}
        proc.send_signal(signal.SIGINT)
        code, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    exits = [e for e in _events(err) if e["event"] == "worker_exited"]
    assert [(e["child"], e["returncode"]) for e in exits] == [(victim, -signal.SIGKILL)]
    assert "restarting in 0.1s" in err


@pytest.mark.slow
def test_a_crash_loop_stops_the_supervisor_with_exit_1(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = _supervise(tmp_path, "crash", max_crashes=3, window=30.0, backoff=0.05)
    code, err = _finish(proc)
    assert code == 1, err
    assert time.monotonic() - started < 10
    events = _events(err)
    assert events[-1]["event"] == "crash_loop"
    assert [e["returncode"] for e in events if e["event"] in ("worker_exited", "crash_loop")] == [
        3
    ] * 4
    assert "is a crash loop; stopping" in err


@pytest.mark.slow
def test_a_child_that_does_not_drain_in_time_is_killed_and_the_exit_is_1(
    tmp_path: Path,
) -> None:
    proc = _supervise(tmp_path, "stubborn", processes=1, stop_timeout=0.5)
    try:
        _wait(lambda: len(_children(tmp_path)) == 1, timeout=10)
        proc.send_signal(signal.SIGTERM)
        code, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, err
    assert "did not stop within 0.5s; killing it" in err
    assert not list(tmp_path.glob("drained-*"))


@pytest.mark.slow
def test_a_child_that_exits_cleanly_is_replaced_and_is_no_crash(tmp_path: Path) -> None:
    proc = _supervise(tmp_path, "clean", processes=1, max_crashes=0, backoff=0.1)
    try:
        _wait(lambda: len(_children(tmp_path)) >= 4, timeout=10)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert "crash_loop" not in [e["event"] for e in _events(err)]
    assert "exited cleanly" in err
