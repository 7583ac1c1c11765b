"""PostgreSQL across processes: the server restarted in the middle of a load,
and a wait killed after taking its event.

A worker killed with SIGKILL mid-step while it holds runs is the conformance
suite's ``TestProcessCrash``, which runs on PostgreSQL with the rest of the
suite (``conformance_tests/tests``).

The workers are :mod:`reflow_conformance.testsupport`'s crash workers, on the
test's schema. Their logs say which steps ran, where and how often, and which
saves the server acknowledged; a trigger on the schema's ``steps`` table
appends every write of a step row (insert or update) to a ``step_writes``
table, so the database says how often each step result was written and
whether a saved one was ever replaced. Together they show that no run is
lost, that every saved result is the output of one real execution, that a
step is saved once and never overwritten, and that steps run again only in
the runs whose lease lapsed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from reflow_conformance.testsupport import (
    STEPS,
    Outcome,
    Workers,
    build,
    check_outcome,
    enqueue_runs,
    free_port,
    read_outcome_at,
)
from reflow_core import Engine, Run

WORKFLOW = "crash-steps"
CONCURRENCY = 8
pytestmark = pytest.mark.slow

Writes = dict[tuple[str, str], list[tuple[str, str | None, int]]]
"""(run, step) -> every write of its row: (op, output, the run's lease epoch)."""


@pytest.fixture
def workers(postgres_url: str, tmp_path: Path) -> Iterator[Workers]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    made = Workers(postgres_url, logdir)
    try:
        yield made
    finally:
        made.cleanup()


# -- the database -------------------------------------------------------------------------


def _split(url: str) -> tuple[str, str]:
    base, schema = url.split("?schema=", 1)
    return base, schema


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(_split(url)[0], autocommit=True, connect_timeout=10)


def enqueue(url: str, runs: int) -> dict[str, Any]:
    """Create ``runs`` runs and start recording step writes; return id -> input."""
    made = enqueue_runs(url, WORKFLOW, runs)
    s = sql.Identifier(_split(url)[1])
    with _connect(url) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {s}.step_writes (seq bigserial PRIMARY KEY, op text NOT NULL,"
                " run_id text NOT NULL, name text NOT NULL, status text NOT NULL, output text,"
                " epoch bigint, at timestamptz NOT NULL DEFAULT clock_timestamp())"
            ).format(s=s)
        )
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {s}.record_step_write() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN INSERT INTO {s}.step_writes (op, run_id, name, status, output, epoch)"
                " VALUES (TG_OP, NEW.run_id, NEW.name, NEW.status, NEW.output,"
                "  (SELECT lease_epoch FROM {s}.runs WHERE id = NEW.run_id));"
                " RETURN NULL; END $$"
            ).format(s=s)
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER record_step_write AFTER INSERT OR UPDATE ON {s}.steps"
                " FOR EACH ROW EXECUTE FUNCTION {s}.record_step_write()"
            ).format(s=s)
        )
    return made


def read_writes(url: str) -> Writes:
    s = sql.Identifier(_split(url)[1])
    writes: Writes = defaultdict(list)
    query = "SELECT run_id, name, op, output, epoch FROM {s}.step_writes ORDER BY seq"
    with _connect(url) as conn:
        for run_id, name, op, output, epoch in conn.execute(sql.SQL(query).format(s=s)):
            writes[run_id, name].append((op, output, epoch))
    return dict(writes)


def check_writes(outcome: Outcome, writes: Writes) -> None:
    """Every step row was written once; a later write of it can only be a retry
    of that save (same lease, same result), never another result."""
    for run_id, steps in outcome.steps.items():
        for name, step in steps.items():
            written = writes[run_id, name]
            assert written[0][0] == "INSERT", (run_id, name, written)
            assert written[0][1] == step.output, (run_id, name, written)
            retry = ("UPDATE", step.output, written[0][2])
            assert set(written[1:]) <= {retry}, (run_id, name, written)
    assert set(writes) == {(r, name) for r, steps in outcome.steps.items() for name in steps}


def writes_per_step(writes: Writes) -> Counter[int]:
    return Counter(len(written) for written in writes.values())


# -- server restart -------------------------------------------------------------------------


class PrivateServer:
    """A PostgreSQL server of the test's own (``initdb`` into a temporary
    directory, listening on a free port of 127.0.0.1), so that restarting
    it disturbs no other test using the shared server. Run as the
    ``postgres`` user when the tests run as root, which PostgreSQL refuses."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="reflow-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres", group="postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    def _ctl(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        return self._run(
            "pg_ctl",
            action,
            "-D",
            str(self.data),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            *args,
        )

    def start(self) -> None:
        done = self._ctl("start")
        assert done.returncode == 0, done.stdout + done.stderr + self.log()

    def restart(self) -> subprocess.CompletedProcess[str]:
        """A fast shutdown (every connection is ended), then a start."""
        return self._ctl("restart", "-m", "fast")

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _bindir() -> Path:
    """The directory of the newest installed PostgreSQL's ``initdb`` and ``pg_ctl``."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parent)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        message = "needs PostgreSQL's server programs (initdb, pg_ctl)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(initdb).parent


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    server = PrivateServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def restart_workers(private_server: PrivateServer, tmp_path: Path) -> Iterator[Workers]:
    """Crash workers on a schema of the private server."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    made = Workers(f"{private_server.url}?schema=restart", logdir)
    try:
        yield made
    finally:
        made.cleanup()


def test_a_server_restart_mid_load_loses_no_run_and_saves_no_step_twice(
    private_server: PrivateServer, restart_workers: Workers
) -> None:
    workers = restart_workers
    postgres_url = workers.target
    runs = 600
    inputs = enqueue(postgres_url, runs)
    common = ("--lease", "5s", "--concurrency", str(CONCURRENCY), "--until-idle", "0.5")
    for _ in range(2):
        workers.start(*common, "--step-delay", "0.03")

    def ran() -> int:
        return sum(1 for line in workers.lines() if line["kind"] == "ran")

    try:
        workers.wait_for("the load to get going", lambda: ran() >= runs * len(STEPS) // 5)
        before = ran()
        started, began = time.monotonic(), datetime.now(UTC)
        restart = private_server.restart()
        took = time.monotonic() - started
        assert restart.returncode == 0, restart.stdout + restart.stderr + private_server.log()
        after = ran()
        # A good part of the load is left for after the restart.
        assert after <= runs * len(STEPS) * 0.8, "the load was nearly over before the restart"
        workers.finish(timeout=90)
    except BaseException:
        print(private_server.log())
        raise

    with _connect(postgres_url) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert row is not None
    assert row[0] > began, "the server was not restarted"
    # The workers' pooled connections broke under them and were replaced.
    info = workers.worker_logs(levels=("INFO",))
    assert any("connection lost during" in line for line in info), "no connection broke"

    outcome = read_outcome_at(postgres_url, WORKFLOW, inputs)
    repeated = check_outcome(outcome, workers.executions(), workers.saves())
    writes = read_writes(postgres_url)
    check_writes(outcome, writes)
    reclaimed = {run_id for run_id, record in outcome.runs.items() if record.reclaims}
    assert repeated <= reclaimed
    summary = {
        "restart_seconds": round(took, 2),
        "steps_ran_before_restart": before,
        "steps_ran_when_restarted": after,
        "reclaimed": len(reclaimed),
        "repeated": len(repeated),
        "writes_per_step": dict(writes_per_step(writes)),
    }
    print(json.dumps(summary))
    for line in workers.worker_logs():
        print(line)


# -- a wait, killed after taking the event ---------------------------------------------


def _wait_run(url: str) -> Run:
    async def read() -> Run:
        engine = Engine(storage=url, worker=False, load_entry_points=False)
        async with engine:
            (record,) = (await engine.list_runs(limit=10)).runs
            return await engine.get_run_status(record.id)

    return asyncio.run(read())


def _send_event(url: str, run_id: str, payload: Any) -> bool:
    async def send() -> bool:
        engine = Engine(
            storage=url, workflows=[build("wait")], worker=False, load_entry_points=False
        )
        async with engine:
            return await engine.send_event(run_id, "approval", payload)

    return asyncio.run(send())


def test_killed_after_taking_the_event_the_event_is_not_taken_twice(
    workers: Workers, postgres_url: str
) -> None:
    """The PostgreSQL run of the SQLite feature-crash scenario of the same name."""
    url = postgres_url

    def logged(kind: str, step: str) -> list[dict[str, Any]]:
        return [x for x in workers.lines() if x["kind"] == kind and x.get("step") == step]

    victim = workers.start(
        "--scenario", "wait", "--enqueue", "--crash-in", "after", "--lease", "1s"
    )
    workers.wait_for(
        "the run to wait",
        lambda: bool(logged("ran", "before")) and (_wait_run(url).status == "waiting"),
    )
    run_id = _wait_run(url).id
    assert _send_event(url, run_id, {"n": 1})
    workers.wait_for("the next step to start", lambda: bool(logged("started", "after")))
    # A second event arrives while the first is being handled; it must not
    # replace the first when the run is picked up again.
    assert _send_event(url, run_id, {"n": 2})
    workers.kill(victim)

    rescuer = workers.start("--scenario", "wait", "--lease", "1s", "--until-idle", "0.3")
    workers.finish(timeout=30)

    done = _wait_run(url)
    assert done.status == "completed"
    assert done.output == "approved"
    assert done.reclaims == 1
    assert done.steps["approval"].output == {"n": 1}
    (started,) = logged("started", "after")
    assert started["pid"] == victim.pid
    assert started["prev"] == {"n": 1}
    (after,) = logged("ran", "after")
    assert after["pid"] == rescuer.pid
    assert after["prev"] == {"n": 1}  # the saved event, consumed once
    (before,) = logged("ran", "before")
    assert before["pid"] == victim.pid
    ran = Counter((ex.kind, ex.step) for ex in workers.executions())
    assert ran == {("ran", "before"): 1, ("started", "after"): 1, ("ran", "after"): 1}
