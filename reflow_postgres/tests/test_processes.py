"""Worker processes on one PostgreSQL schema: one killed with SIGKILL mid-step
while it holds runs, and the server restarted in the middle of a load.

The workers (``_pg_worker.py``) run a three-step workflow. Every execution of
a step writes a line with a fresh random token to an append-only log before it
returns the token as part of its output, so the log says which steps ran,
where and how often. A trigger on the schema's ``steps`` table appends every
write of a step row (insert or update) to a ``step_writes`` table, so the
database says how often each step result was saved and whether a saved one
was ever replaced. Together they show that no run is lost, that every saved
result is the output of one real execution, that a step is saved once and
never overwritten, and that steps run again only in the runs whose lease
lapsed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from reflow_core import Engine, Run, codec
from reflow_core.storage import NewRun
from reflow_postgres import PostgresStorage

WORKER = Path(__file__).with_name("_pg_worker.py")
WORKFLOW = "pg-crash"
STEPS = ("reserve", "charge", "ship")
CONCURRENCY = 8
pytestmark = pytest.mark.slow


# -- what the workers did -------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One execution of a step, from a worker's log."""

    pid: int
    kind: str  # "ran" (returned ``token``) or "blocked" (waited to be killed)
    run: str
    step: str
    token: str | None


@dataclass
class Outcome:
    """The schema's runs, steps and step writes once the workers are done."""

    runs: dict[str, tuple[str, int, int, str | None]]  # id -> status, attempts, reclaims, output
    steps: dict[tuple[str, str], tuple[str, str | None]]  # (run, step) -> status, output
    # (run, step) -> every write of its row: (op, output, the run's lease epoch)
    writes: dict[tuple[str, str], list[tuple[str, str | None, int]]]
    inputs: dict[str, Any]


class Workers:
    """Worker processes on one schema, with their logs in one directory."""

    def __init__(self, url: str, logdir: Path) -> None:
        self.url = url
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        with (
            (self.logdir / f"stdout-{n}.txt").open("wb") as out,
            (self.logdir / f"stderr-{n}.txt").open("wb") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), self.url, str(self.logdir), *args],
                stdout=out,
                stderr=err,
            )
        self.procs.append(proc)
        return proc

    def lines(self, pid: int | None = None) -> list[tuple[int, list[str]]]:
        found: list[tuple[int, list[str]]] = []
        for path in sorted(self.logdir.glob("exec-*.log")):
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
            if fields[0] in ("ran", "blocked")
        ]

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for proc in self.procs:
                code = proc.poll()
                assert code in (None, 0, -signal.SIGKILL), self.failure(f"worker {proc.pid} died")
            assert time.monotonic() < deadline, self.failure(f"timed out waiting for {what}")
            time.sleep(0.02)

    def finish(self, timeout: float) -> None:
        """Wait for every worker still running to exit by itself, successfully."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
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

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


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

    async def create() -> dict[str, Any]:
        store = PostgresStorage.from_url(url)
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

    made = asyncio.run(create())
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


def read_outcome(url: str, inputs: dict[str, Any]) -> Outcome:
    s = sql.Identifier(_split(url)[1])
    with _connect(url) as conn:
        runs = {
            row[0]: row[1:]
            for row in conn.execute(
                sql.SQL("SELECT id, status, attempts, reclaims, output FROM {s}.runs").format(s=s)
            )
        }
        steps = {
            (row[0], row[1]): row[2:]
            for row in conn.execute(
                sql.SQL("SELECT run_id, name, status, output FROM {s}.steps").format(s=s)
            )
        }
        writes: dict[tuple[str, str], list[tuple[str, str | None, int]]] = defaultdict(list)
        query = "SELECT run_id, name, op, output, epoch FROM {s}.step_writes ORDER BY seq"
        for run_id, name, op, output, epoch in conn.execute(sql.SQL(query).format(s=s)):
            writes[run_id, name].append((op, output, epoch))
    return Outcome(runs, steps, dict(writes), inputs)


def check_outcome(outcome: Outcome, executions: list[Execution]) -> set[str]:
    """Assert what holds after any mix of kills and restarts; return the runs
    in which some step ran more than once (each of them was reclaimed)."""
    runs, steps = outcome.runs, outcome.steps
    assert set(runs) == set(outcome.inputs), "runs were lost or invented"
    statuses = Counter(status for status, *_ in runs.values())
    assert statuses == {"completed": len(outcome.inputs)}, statuses
    assert set(steps) == {(r, s) for r in runs for s in STEPS}
    assert {status for status, _ in steps.values()} == {"completed"}

    by_step: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for ex in executions:
        by_step[ex.run, ex.step].append(ex)
    tokens = Counter(ex.token for ex in executions if ex.token is not None)
    assert set(tokens.values()) == {1}

    for run_id, (_status, attempts, reclaims, run_output) in runs.items():
        prev: Any = outcome.inputs[run_id]
        for name in STEPS:
            saved = steps[run_id, name][1]
            assert saved is not None
            value = codec.decode(saved)
            ran = [ex.token for ex in by_step[run_id, name] if ex.kind == "ran"]
            # The saved result is the output of a real execution of this
            # step, and that execution was given the saved previous step.
            assert value["step"] == name
            assert value["token"] in ran, (run_id, name, value, ran)
            assert value["prev"] == prev, (run_id, name)
            # Saved once; a later write of the row can only be a retry of
            # that save (same lease, same result), never another result.
            written = outcome.writes[run_id, name]
            assert written[0][0] == "INSERT", (run_id, name, written)
            assert written[0][1] == saved, (run_id, name, written)
            assert set(written[1:]) <= {("UPDATE", saved, written[0][2])}, (run_id, name, written)
            prev = value
        assert run_output is not None
        assert codec.decode(run_output) == prev
        if reclaims == 0:
            # Nobody's lease lapsed: claimed once, every step executed once.
            assert attempts == 1, (run_id, attempts)
            assert all(len(by_step[run_id, name]) == 1 for name in STEPS), (
                run_id,
                {name: by_step[run_id, name] for name in STEPS},
            )

    assert {ex.run for ex in executions} <= set(runs)
    return {run for (run, _step), found in by_step.items() if len(found) > 1}


def writes_per_step(outcome: Outcome) -> Counter[int]:
    return Counter(len(written) for written in outcome.writes.values())


# -- SIGKILL mid-step -----------------------------------------------------------------------


def test_a_worker_killed_mid_step_loses_no_run_and_saves_no_step_twice(
    workers: Workers, postgres_url: str
) -> None:
    inputs = enqueue(postgres_url, 1000)
    common = ("--lease", "2s", "--concurrency", str(CONCURRENCY), "--until-idle", "0.5")
    # The victim runs 60 steps normally; after that every step but the first
    # blocks, so it ends up holding CONCURRENCY runs, each inside a step with
    # the steps before it saved.
    victim = workers.start(*common, "--block-after", "60")
    for _ in range(2):
        workers.start(*common)

    def held() -> set[str]:
        return {fields[1] for _pid, fields in workers.lines(victim.pid) if fields[0] == "blocked"}

    workers.wait_for("the victim to hold its runs mid-step", lambda: len(held()) == CONCURRENCY)
    time.sleep(0.1)  # no other step starts there: every slot is blocked
    victim_lines = workers.lines(victim.pid)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    held_runs = held()
    assert len(held_runs) == CONCURRENCY

    workers.finish(timeout=60)
    outcome = read_outcome(postgres_url, inputs)
    executions = workers.executions()
    repeated = check_outcome(outcome, executions)

    # Nothing written after the kill came from the victim.
    assert workers.lines(victim.pid) == victim_lines
    # The runs it held were reclaimed, once each, and each one's blocked step
    # ran to the end once, elsewhere, after the steps the victim had saved.
    reclaimed = {run for run, (_s, _a, reclaims, _o) in outcome.runs.items() if reclaims}
    assert reclaimed == held_runs, "a live worker's lease lapsed, or a held run was not reclaimed"
    assert repeated == held_runs
    for run_id in held_runs:
        _status, attempts, reclaims, _output = outcome.runs[run_id]
        assert (attempts, reclaims) == (2, 1)
        mine = [ex for ex in executions if ex.run == run_id]
        (blocked,) = [ex for ex in mine if ex.kind == "blocked"]
        assert blocked.pid == victim.pid
        assert blocked.step != STEPS[0]
        before = STEPS[: STEPS.index(blocked.step)]
        for ex in mine:
            if ex.step in before:
                assert (ex.kind, ex.pid) == ("ran", victim.pid), ex
            elif ex.kind == "ran":
                assert ex.pid != victim.pid, ex
        assert Counter(ex.step for ex in mine if ex.kind == "ran") == dict.fromkeys(STEPS, 1)
    # Every step was written once: saves are never repeated or overwritten.
    assert writes_per_step(outcome) == {1: len(inputs) * len(STEPS)}
    # All three workers did work.
    assert len({ex.pid for ex in executions if ex.kind == "ran"}) == 3


# -- server restart -------------------------------------------------------------------------


def _cluster() -> tuple[str, str] | None:
    """The local cluster (version, name) the test server runs as, if controllable here."""
    server = os.environ.get("REFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/")
    host = urlsplit(server).hostname
    if host not in ("127.0.0.1", "localhost") or shutil.which("pg_ctlcluster") is None:
        return None
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or not os.path.isdir(f"/etc/postgresql/{versions[-1]}/main"):
        return None
    return versions[-1], "main"


def _ctl(cluster: tuple[str, str], action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, action],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _server_ready() -> bool:
    probe = subprocess.run(
        ["pg_isready", "-q", "-h", "127.0.0.1", "-t", "2"], check=False, timeout=30
    )
    return probe.returncode == 0


def _ensure_server_up(cluster: tuple[str, str]) -> None:
    deadline = time.monotonic() + 60
    while not _server_ready():
        _ctl(cluster, "start")
        assert time.monotonic() < deadline, "PostgreSQL did not come back up"
        time.sleep(0.5)


def test_a_server_restart_mid_load_loses_no_run_and_saves_no_step_twice(
    workers: Workers, postgres_url: str
) -> None:
    cluster = _cluster()
    if cluster is None:
        message = "needs a local PostgreSQL cluster controlled with pg_ctlcluster"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    runs = 600
    inputs = enqueue(postgres_url, runs)
    common = ("--lease", "5s", "--concurrency", str(CONCURRENCY), "--until-idle", "0.5")
    for _ in range(2):
        workers.start(*common, "--step-delay", "0.03")

    def ran() -> int:
        return sum(1 for _pid, fields in workers.lines() if fields[0] == "ran")

    try:
        workers.wait_for("the load to get going", lambda: ran() >= runs * len(STEPS) // 5)
        before = ran()
        started, began = time.monotonic(), datetime.now(UTC)
        restart = _ctl(cluster, "restart")
        took = time.monotonic() - started
        assert restart.returncode == 0, restart.stderr
        after = ran()
        # A good part of the load is left for after the restart.
        assert after <= runs * len(STEPS) * 0.8, "the load was nearly over before the restart"
        workers.finish(timeout=90)
    finally:
        _ensure_server_up(cluster)

    with _connect(postgres_url) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert row is not None
    assert row[0] > began, "the server was not restarted"
    # The workers' pooled connections broke under them and were replaced.
    info = workers.worker_logs(levels=("INFO",))
    assert any("connection lost during" in line for line in info), "no connection broke"

    outcome = read_outcome(postgres_url, inputs)
    executions = workers.executions()
    repeated = check_outcome(outcome, executions)
    reclaimed = {run for run, (_s, _a, reclaims, _o) in outcome.runs.items() if reclaims}
    assert repeated <= reclaimed
    summary = {
        "restart_seconds": round(took, 2),
        "steps_ran_before_restart": before,
        "steps_ran_when_restarted": after,
        "reclaimed": len(reclaimed),
        "repeated": len(repeated),
        "writes_per_step": dict(writes_per_step(outcome)),
    }
    print(json.dumps(summary))
    for line in workers.worker_logs():
        print(line)


# -- a wait, killed after taking the event ---------------------------------------------


def _load_worker_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reflow_pg_worker", WORKER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pg_worker = _load_worker_module()


def _wait_run(url: str) -> Run:
    async def read() -> Run:
        engine = Engine(storage=url, worker=False, load_entry_points=False)
        async with engine:
            (record,) = (await engine.list_runs(limit=10)).runs
            return await engine.get_run_status(record.id)

    return asyncio.run(read())


def _send_event(url: str, run_id: str, payload: Any) -> bool:
    async def send() -> bool:
        wf = pg_worker.build_wait(None)
        engine = Engine(storage=url, workflows=[wf], worker=False, load_entry_points=False)
        async with engine:
            return await engine.send_event(run_id, "approval", payload)

    return asyncio.run(send())


def test_killed_after_taking_the_event_the_event_is_not_taken_twice(
    workers: Workers, postgres_url: str
) -> None:
    """The PostgreSQL run of the SQLite feature-crash scenario of the same name."""
    url = postgres_url

    def logged(kind: str, step: str) -> list[tuple[int, list[str]]]:
        return [(pid, f) for pid, f in workers.lines() if f[0] == kind and f[2] == step]

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
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL

    rescuer = workers.start("--scenario", "wait", "--lease", "1s", "--until-idle", "0.3")
    workers.finish(timeout=30)

    done = _wait_run(url)
    assert done.status == "completed"
    assert done.output == "approved"
    assert done.reclaims == 1
    assert done.steps["approval"].output == {"n": 1}
    ((started_pid, started),) = logged("started", "after")
    assert started_pid == victim.pid
    assert json.loads(started[3]) == {"n": 1}
    ((after_pid, after),) = logged("ran", "after")
    assert after_pid == rescuer.pid
    assert json.loads(after[3]) == {"n": 1}  # the saved event, consumed once
    ((before_pid, _),) = logged("ran", "before")
    assert before_pid == victim.pid
    ran = Counter((f[0], f[2]) for _pid, f in workers.lines() if f[0] != "ready")
    assert ran == {("ran", "before"): 1, ("started", "after"): 1, ("ran", "after"): 1}
