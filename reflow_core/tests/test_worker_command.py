"""``reflow worker APP``: real worker processes on real stores.

The application (``APP``) is a module written into the test's directory and
found through ``--app-dir``. Its factory builds an engine serving the
``steps`` workflow of :mod:`reflow_conformance.testsupport`: each step logs
a fresh token to the process's execution log before returning it, and every
step save the store acknowledged is logged too, so
:func:`~reflow_conformance.testsupport.check_outcome` shows that no run was
lost and no step saved twice across drains, kills and restarts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reflow_conformance.testsupport import (
    SAVED_ONCE,
    STEPS,
    Workers,
    check_outcome,
    child_env,
    enqueue_runs,
    read_outcome_at,
)
from reflow_core import codec
from reflow_core.cli.worker import worker
from reflow_core.storage import RunRecord

_APP = textwrap.dedent(
    """
    import os

    from reflow_conformance.testsupport import ExecutionLog, build
    from reflow_conformance.testsupport._worker import _record_saves
    from reflow_core import Engine, open_storage, workflow

    def make():
        log = ExecutionLog(os.environ["APP_LOGDIR"])
        steps = build(
            "steps",
            os.environ["APP_WORKFLOW"],
            log,
            step_delay=float(os.environ.get("APP_STEP_DELAY", "0")),
        )
        other = workflow("other").step("only", lambda ctx: None)
        storage = open_storage(os.environ["APP_STORE"])
        _record_saves(storage, log)
        return Engine(
            storage=storage,
            workflows=[steps, other],
            concurrency=int(os.environ.get("APP_CONCURRENCY", "2")),
            lease=os.environ.get("APP_LEASE", "1s"),
            poll_interval="50ms",
            drain_timeout=os.environ.get("APP_DRAIN", "10s"),
            load_entry_points=False,
        )

    not_an_engine = 42

    async def make_async():
        return make()

    def broken():
        raise RuntimeError("no configuration\\nfound")
    """
)

_WORKFLOW = "wcmd"
_COMMAND = [sys.executable, "-m", "reflow_core", "worker"]


@pytest.fixture
def store(store_url: str) -> str:
    """A storage URL of the test's own, on each real backend."""
    return store_url


class Fleet:
    """``reflow worker`` processes on one store, logging to one directory."""

    def __init__(self, tmp_path: Path, store: str, **env: str) -> None:
        self.root = tmp_path
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        (tmp_path / "wcmd_app.py").write_text(_APP)
        self.store = store
        self.env = {
            **child_env(),
            "APP_LOGDIR": str(self.logs),
            "APP_STORE": store,
            "APP_WORKFLOW": _WORKFLOW,
            **env,
        }
        self.workers = Workers(store, self.logs, workflow=_WORKFLOW)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, app: str = "wcmd_app:make") -> subprocess.Popen[bytes]:
        n = len(self.procs)
        argv = [*_COMMAND, app, "--app-dir", str(self.root), *args]
        with (self.root / f"stderr-{n}.txt").open("wb") as err:
            proc = subprocess.Popen(argv, stderr=err, env=self.env, cwd=self.root)
        self.procs.append(proc)
        return proc

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.root / f"stderr-{self.procs.index(proc)}.txt").read_text()

    def events(self, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr(proc).splitlines() if line.startswith("{")]

    def stop(self, proc: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> float:
        """Send ``signum``, expect exit 0; seconds until it exited."""
        sent = time.monotonic()
        proc.send_signal(signum)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not stop:\n{self.stderr(proc)}") from None
        assert code == 0, self.stderr(proc)
        return time.monotonic() - sent

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for proc in self.procs:
                if proc.poll() not in (None, 0, -signal.SIGKILL):
                    raise AssertionError(f"{proc.pid} exited early:\n{self.stderr(proc)}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def ran(self) -> dict[int, set[str]]:
        """The runs each process has run a step of, by pid."""
        found: dict[int, set[str]] = {}
        for line in self.workers.lines():
            if line["kind"] == "ran":
                found.setdefault(line["pid"], set()).add(line["run"])
        return found

    def runs(self, inputs: dict[str, Any]) -> dict[str, RunRecord]:
        return read_outcome_at(self.store, _WORKFLOW, inputs).runs

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(store: str, **env: str) -> Fleet:
        fleet = Fleet(tmp_path, store, **env)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.cleanup()


# -- loading APP and usage errors ------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path) -> Iterator[Path]:
    """The test app on disk, and this process's logging, sys.path and modules
    put back afterwards (the command runs in this process)."""
    (tmp_path / "wcmd_app.py").write_text(_APP)
    root = logging.getLogger()
    handlers, level, path = list(root.handlers), root.level, list(sys.path)
    yield tmp_path
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.path[:] = path
    sys.modules.pop("wcmd_app", None)
    logging.captureWarnings(False)


@pytest.mark.parametrize(
    ("app", "message"),
    [
        (
            "no_such_module:engine",
            "cannot import APP 'no_such_module:engine': "
            "ModuleNotFoundError: No module named 'no_such_module'",
        ),
        ("wcmd_app:missing", "cannot import APP 'wcmd_app:missing': module 'wcmd_app' has no "),
        ("wcmd_app:not_an_engine", "not_an_engine is not an Engine (it is a int)"),
        ("wcmd_app:broken", "calling broken() raised RuntimeError: no configuration found"),
        ("wcmd_app", "expected 'module:attribute', got 'wcmd_app'"),
        ("wcmd_app:make_async", "make_async() is a coroutine function; give a plain function"),
    ],
)
def test_an_app_that_does_not_load_exits_1_with_one_line(
    app_dir: Path, app: str, message: str
) -> None:
    result = CliRunner().invoke(worker, [app, "--app-dir", str(app_dir)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: cannot import APP"), lines
    assert message in lines[0]


def test_a_mistyped_workflow_is_a_usage_error_naming_the_known_ones(
    app_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_LOGDIR", str(tmp_path))
    monkeypatch.setenv("APP_STORE", f"sqlite:///{tmp_path}/x.db")
    monkeypatch.setenv("APP_WORKFLOW", _WORKFLOW)
    result = CliRunner().invoke(
        worker, ["wcmd_app:make", "--app-dir", str(app_dir), "--workflows", "wcmd,othre"]
    )
    assert result.exit_code == 2, result.output
    assert "unknown workflow 'othre'; wcmd_app:make has: other, wcmd" in result.output


@pytest.mark.parametrize(
    "args", [["--processes", "0"], ["--concurrency", "0"], ["--log-format", "xml"]]
)
def test_bad_options_are_usage_errors(app_dir: Path, args: list[str]) -> None:
    result = CliRunner().invoke(worker, ["wcmd_app:make", "--app-dir", str(app_dir), *args])
    assert result.exit_code == 2, result.output


def test_a_bad_app_from_a_real_process_exits_1_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*_COMMAND, "no_such_module:app", "--processes", "2"],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "Error: cannot import APP 'no_such_module:app': "
        "ModuleNotFoundError: No module named 'no_such_module'"
    ]


# -- real workers -------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_the_supervisor_drains_every_run_in_flight(
    fleet_factory: Callable[..., Fleet], store: str
) -> None:
    """Two processes, two runs each in flight, steps of 0.3 s: SIGTERM lets
    the runs in flight finish, claims no more, and exits 0; a later worker
    completes the rest. No run is lost, no step runs or is saved twice."""
    fleet = fleet_factory(store, APP_STEP_DELAY="0.3")
    inputs = enqueue_runs(store, _WORKFLOW, 12)
    supervisor = fleet.start("--processes", "2", "--log-format", "json")
    fleet.wait("both workers to run steps", lambda: len(fleet.ran()) == 2)
    drained_in = fleet.stop(supervisor)
    started = set().union(*fleet.ran().values())
    runs = fleet.runs(inputs)
    assert {r.status for r in runs.values()} <= {"completed", "pending"}
    assert {i for i, r in runs.items() if r.status == "completed"} == started
    assert 0 < len(started) < len(inputs)
    kinds = [e["event"] for e in fleet.events(supervisor)]
    assert kinds.count("draining") == 2  # each child drained
    assert kinds.count("worker_stopped") == 4  # each child said so, and so did the supervisor
    assert drained_in < 10

    rest = fleet.start("--log-format", "json")
    fleet.wait("the rest to complete", lambda: len(set().union(*fleet.ran().values())) == 12)
    fleet.wait(
        "every run to complete",
        lambda: all(r.status == "completed" for r in fleet.runs(inputs).values()),
    )
    fleet.stop(rest)
    outcome = read_outcome_at(store, _WORKFLOW, inputs)
    repeated = check_outcome(
        outcome, fleet.workers.executions(), fleet.workers.saves(), may_repeat=set()
    )
    assert not repeated


@pytest.mark.slow
def test_runs_past_the_drain_timeout_are_handed_back_and_finished_later(
    fleet_factory: Callable[..., Fleet],
    tmp_path: Path,
) -> None:
    """One process (no supervisor), steps of 1 s, drain_timeout 0.3 s: SIGTERM
    hands the runs in flight back as pending, keeping their saved steps; a
    new worker completes them, and every step is stored and acknowledged once."""
    store = f"sqlite:///{tmp_path}/store.db"
    fleet = fleet_factory(store, APP_STEP_DELAY="1", APP_DRAIN="0.3s", APP_CONCURRENCY="3")
    inputs = enqueue_runs(store, _WORKFLOW, 3)
    first = fleet.start()
    fleet.wait("the first steps to finish", lambda: len(fleet.ran().get(first.pid, ())) == 3)
    assert fleet.stop(first) < 5
    runs = fleet.runs(inputs)
    assert {r.status for r in runs.values()} == {"pending"}
    saved = read_outcome_at(store, _WORKFLOW, inputs).steps
    assert all(set(steps) == {STEPS[0]} for steps in saved.values()), saved
    assert "draining 3 runs in flight for up to 0.3s" in fleet.stderr(first)

    second = fleet.start("--concurrency", "3")
    fleet.wait(
        "the handed-back runs to complete",
        lambda: all(r.status == "completed" for r in fleet.runs(inputs).values()),
    )
    fleet.stop(second, signal.SIGINT)
    outcome = read_outcome_at(store, _WORKFLOW, inputs)
    ran = {(ex.run, ex.step, ex.token) for ex in fleet.workers.executions() if ex.kind == "ran"}
    acked = [(s.run, s.step) for s in fleet.workers.saves() if s.ok]
    assert sorted(acked) == sorted({(run, step) for run in inputs for step in STEPS}), SAVED_ONCE
    for run_id, record in outcome.runs.items():
        assert record.status == "completed"
        assert record.reclaims == 0  # handed back, not lapsed
        for name, step in outcome.steps[run_id].items():
            value = codec.decode(step.output or "null")
            assert (run_id, name, value["token"]) in ran
    # The first step ran once; the one interrupted by the drain ran again.
    first_steps = [ex for ex in fleet.workers.executions() if ex.step == STEPS[0]]
    assert len(first_steps) == 3


@pytest.mark.slow
def test_a_killed_child_is_restarted_and_its_runs_are_reclaimed(
    fleet_factory: Callable[..., Fleet], store: str
) -> None:
    """SIGKILL one of two children mid-step: the supervisor starts another,
    the killed child's runs are reclaimed once their 1 s lease lapses, and
    everything completes with no step saved twice."""
    fleet = fleet_factory(store, APP_STEP_DELAY="0.2")
    inputs = enqueue_runs(store, _WORKFLOW, 16)
    supervisor = fleet.start("--processes", "2", "--log-format", "json")
    fleet.wait("both workers to run steps", lambda: len(fleet.ran()) == 2)
    victim = min(fleet.ran())
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    fleet.wait(
        "a replacement worker",
        lambda: [e["event"] for e in fleet.events(supervisor)].count("worker_started") == 3,
    )
    fleet.wait(
        "every run to complete",
        lambda: all(r.status == "completed" for r in fleet.runs(inputs).values()),
        timeout=20,
    )
    fleet.stop(supervisor)
    executions = fleet.workers.executions()
    held = {ex.run for ex in executions if ex.pid == victim}
    outcome = read_outcome_at(store, _WORKFLOW, inputs)
    check_outcome(outcome, executions, fleet.workers.saves(), may_repeat=held)
    reclaimed = {i for i, r in outcome.runs.items() if r.reclaims}
    assert reclaimed, "the killed worker held no run mid-step"
    for run_id in reclaimed:  # only the killed worker had run steps of it before the kill
        assert {ex.pid for ex in executions if ex.run == run_id and ex.t < killed_at} <= {victim}
    exited = [e for e in fleet.events(supervisor) if e["event"] == "worker_exited"]
    assert [(e["child"], e["returncode"]) for e in exited] == [(victim, -signal.SIGKILL)]


@pytest.mark.slow
def test_children_that_keep_crashing_make_the_supervisor_exit_1(
    fleet_factory: Callable[..., Fleet], tmp_path: Path
) -> None:
    """The app loads, but its store cannot be opened: each child exits 1 at
    start, is restarted with backoff, and the crash loop ends the fleet."""
    fleet = fleet_factory(f"sqlite:///{tmp_path}/no/such/dir/store.db")
    started = time.monotonic()
    supervisor = fleet.start("--processes", "2", "--max-crashes", "3", "--log-format", "json")
    assert supervisor.wait(20) == 1, fleet.stderr(supervisor)
    assert time.monotonic() - started < 15
    events = fleet.events(supervisor)
    assert "crash_loop" in [e["event"] for e in events]
    failed = [e for e in events if e["event"] == "start_failed"]
    assert len(failed) >= 4
    assert "the worker could not start" in failed[0]["message"]


@pytest.mark.slow
def test_children_of_a_killed_supervisor_drain_and_exit(
    fleet_factory: Callable[..., Fleet], tmp_path: Path
) -> None:
    """SIGKILL to the supervisor: its children notice they are orphans,
    drain and hand back their runs instead of running on unsupervised."""
    store = f"sqlite:///{tmp_path}/store.db"
    fleet = fleet_factory(store, APP_STEP_DELAY="0.2")
    inputs = enqueue_runs(store, _WORKFLOW, 40)
    supervisor = fleet.start("--processes", "2", "--log-format", "json")
    fleet.wait("both workers to run steps", lambda: len(fleet.ran()) == 2)
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.wait(10)

    def stopped() -> list[dict[str, Any]]:
        return [
            e
            for e in fleet.events(supervisor)
            if e["event"] == "worker_stopped" and e["logger"] == "reflow.worker"
        ]

    fleet.wait("both children to stop", lambda: len(stopped()) == 2)
    assert len([e for e in fleet.events(supervisor) if e["event"] == "orphaned"]) == 2
    runs = fleet.runs(inputs)
    assert {r.status for r in runs.values()} <= {"completed", "pending"}
    assert any(r.status == "pending" for r in runs.values())


@pytest.mark.slow
def test_reflow_workers_ls_follows_the_fleet(
    fleet_factory: Callable[..., Fleet], store: str
) -> None:
    """``reflow workers ls``, run as a real process, lists both children of a
    supervisor under their own pids; a SIGKILLed child leaves the list when
    its 1 s lease lapses and its replacement joins it; a drained fleet
    leaves nothing behind."""
    fleet = fleet_factory(store, APP_CONCURRENCY="3")
    supervisor = fleet.start("--processes", "2", "--log-format", "json")

    def listed() -> list[dict[str, Any]]:
        found = subprocess.run(
            [sys.executable, "-m", "reflow_core", "--url", store, "--json", "workers", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert found.returncode == 0, found.stderr
        return [json.loads(line) for line in found.stdout.splitlines()]

    def children() -> set[int]:
        started = [e for e in fleet.events(supervisor) if e["event"] == "worker_started"]
        return {e["child"] for e in started}

    fleet.wait("both children to be listed", lambda: len(listed()) == 2, timeout=20)
    first = listed()
    assert {w["pid"] for w in first} <= children()
    for entry in first:
        assert entry["workflows"] == [_WORKFLOW, "other"]
        assert entry["concurrency"] == 3
        assert entry["host"] == socket.gethostname()
    victim = first[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    fleet.wait(
        "the killed child to lapse and its replacement to be listed",
        lambda: (lambda pids: victim not in pids and len(pids) == 2)({w["pid"] for w in listed()}),
        timeout=20,
    )
    fleet.stop(supervisor)
    assert listed() == []
