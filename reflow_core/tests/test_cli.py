"""The ``reflow`` command against real stores: SQLite files, PostgreSQL
schemas and Redis key prefixes of each test's own.

Most tests drive the click group in process with ``CliRunner``; those marked
``slow`` run ``python -m reflow_core`` and the installed ``reflow`` script.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from reflow_core import Engine, Limit, open_storage, workflow
from reflow_core.cli import _common, build_cli
from reflow_core.cli._plugins import register_commands
from reflow_core.cli.reference import BEGIN, END, render
from reflow_core.hookspecs import hookimpl
from reflow_core.options import url_secrets
from reflow_core.storage import RunRecord, StepRecord

ROOT = Path(__file__).resolve().parents[2]


# -- workflows and stores --------------------------------------------------------------


def _add(ctx: Any) -> dict[str, int]:
    return {"n": (ctx.input or {}).get("n", 0) + 1}


def _charge_card(ctx: Any) -> None:
    try:
        {}["card"]  # a KeyError to chain from
    except KeyError as exc:
        raise ValueError("card declined") from exc


def _approved(ctx: Any) -> Any:
    return {"approved_with": ctx.prev}


OK = workflow("ok").step("add", _add)
FAILING = workflow("failing").step("charge", _charge_card)
WAITER = workflow("waiter").wait_for_event("approval").step("after", _approved)
WORKFLOWS = [OK, FAILING, WAITER]


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store of this test's own on each real backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cli.db'}"
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def _engine(url: str) -> Engine:
    return Engine(storage=url, workflows=WORKFLOWS, worker=False, load_entry_points=False)


async def _drain(engine: Engine) -> None:
    while await engine.tick():
        pass


def seed(
    url: str, *, ok: int = 0, failing: int = 0, waiting: int = 0, pending: int = 0
) -> dict[str, list[str]]:
    """Runs in a known state: ``ok`` completed, ``failing`` failed (with a
    traceback), ``waiting`` waiting for "approval", ``pending`` never claimed."""

    async def work() -> dict[str, list[str]]:
        ids: dict[str, list[str]] = {"ok": [], "failing": [], "waiting": [], "pending": []}
        async with _engine(url) as engine:
            for i in range(ok):
                ids["ok"].append((await engine.enqueue(OK, {"n": i})).id)
            for _ in range(failing):
                ids["failing"].append((await engine.enqueue(FAILING)).id)
            for _ in range(waiting):
                ids["waiting"].append((await engine.enqueue(WAITER)).id)
            await _drain(engine)
        # Pending runs go in through the storage of a workflow no engine here serves.
        async with Engine(storage=url, worker=False, load_entry_points=False) as client:
            for i in range(pending):
                run = await client.storage.create_run(_new_run("idle", i))
                ids["pending"].append(run.run.id)
        return ids

    return asyncio.run(work())


def _new_run(name: str, i: int) -> Any:
    from reflow_core import codec
    from reflow_core.storage import NewRun

    return NewRun(workflow=name, input=codec.encode({"i": i}))


def get_run(url: str, run_id: str) -> RunRecord | None:
    async def work() -> RunRecord | None:
        store = open_storage(url)
        await store.initialize()
        try:
            return await store.get_run(run_id)
        finally:
            await store.close()

    return asyncio.run(work())


def steps_of(url: str, run_id: str) -> dict[str, StepRecord]:
    async def work() -> dict[str, StepRecord]:
        store = open_storage(url)
        await store.initialize()
        try:
            return await store.get_step_results(run_id)
        finally:
            await store.close()

    return asyncio.run(work())


def reflow(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """``reflow ARGS...`` in process, without plugin commands."""
    return CliRunner().invoke(
        build_cli(plugins=False), list(args), input=input, env=env, catch_exceptions=True
    )


def lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Standard input is a terminal: confirmations are asked."""
    monkeypatch.setattr(_common, "stdin_is_terminal", lambda: True)


# -- runs ls ---------------------------------------------------------------------------


def test_ls_pages_through_every_run_once(url: str) -> None:
    ids = seed(url, ok=5, failing=1)
    seen: list[str] = []
    cursor: list[str] = []
    pages = 0
    while True:
        result = reflow("--url", url, "--json", "runs", "ls", "--limit", "2", *cursor)
        assert result.exit_code == 0, result.output
        *runs, tail = lines(result)
        assert len(runs) <= 2
        seen += [r["id"] for r in runs]
        pages += 1
        if tail["next_cursor"] is None:
            break
        cursor = ["--before", tail["next_cursor"]]
    assert pages >= 3
    assert sorted(seen) == sorted(ids["ok"] + ids["failing"])
    assert len(seen) == len(set(seen))


def test_ls_filters_and_prints_a_table_with_the_next_cursor(url: str) -> None:
    ids = seed(url, ok=3, failing=1)
    result = reflow("--url", url, "runs", "ls", "--limit", "2", "--workflow", "ok")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert header == ["ID", "WORKFLOW", "STATUS", "ATTEMPTS", "CREATED", "UPDATED"]
    assert "next page: --before " in result.stdout
    assert "failing" not in result.stdout
    failed = reflow("--url", url, "--json", "runs", "ls", "--status", "failed")
    *runs, tail = lines(failed)
    assert [r["id"] for r in runs] == ids["failing"]
    assert runs[0]["status"] == "failed"
    assert runs[0]["attempts"] == 1
    assert tail == {"next_cursor": None}


def test_ls_with_a_malformed_cursor_is_a_usage_error(url: str) -> None:
    result = reflow("--url", url, "runs", "ls", "--before", "not-a-cursor")
    assert result.exit_code == 2
    assert "--before" in result.stderr


def test_ls_of_an_empty_store(sqlite_url: str) -> None:
    result = reflow("--url", sqlite_url, "runs", "ls")
    assert result.exit_code == 0
    assert result.stdout.strip() == "no runs"


# -- runs show -------------------------------------------------------------------------


def test_show_a_failed_step_with_its_traceback_and_causes(url: str) -> None:
    (run_id,) = seed(url, failing=1)["failing"]
    result = reflow("--url", url, "runs", "show", run_id)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert run_id in out
    assert "failed" in out
    assert "step 'charge' failed" in out
    assert "Traceback (most recent call last)" in out
    assert "_charge_card" in out
    assert "ValueError: card declined" in out
    assert "caused by KeyError" in out

    shown = reflow("--url", url, "--json", "runs", "show", run_id)
    (data,) = lines(shown)
    assert data["id"] == run_id
    assert data["status"] == "failed"
    (step,) = data["steps"]
    assert step["name"] == "charge"
    assert step["status"] == "failed"
    assert step["attempts"] == 1
    assert "_charge_card" in step["error"]["traceback"]
    assert step["error"]["causes"][0]["type"].endswith("KeyError")
    assert data["error"]["message"] == "card declined"


def test_show_a_completed_run_with_input_and_output(url: str) -> None:
    (run_id,) = seed(url, ok=1)["ok"]
    (data,) = lines(reflow("--url", url, "--json", "runs", "show", run_id))
    assert data["input"] == {"n": 0}
    assert data["output"] == {"n": 1}
    assert [s["name"] for s in data["steps"]] == ["add"]
    assert data["steps"][0]["completed_at"] is not None
    text = reflow("--url", url, "runs", "show", run_id).stdout
    assert '"n": 1' in text
    assert "add" in text


def test_show_the_links_between_a_parent_and_its_children(url: str) -> None:
    parent_wf = workflow("parent").child("make", OK, lambda ctx: {"n": 41})

    async def work() -> tuple[str, str]:
        engine = Engine(
            storage=url, workflows=[parent_wf, OK], worker=False, load_entry_points=False
        )
        async with engine:
            run = await engine.enqueue(parent_wf)
            await engine.tick()  # the parent starts its child, and waits
            waiting = await engine.get_run_status(run.id)
            assert waiting.status == "waiting"
            (child,) = waiting.children
            return run.id, child.id

    parent_id, child_id = asyncio.run(work())
    waiting = reflow("--url", url, "runs", "show", parent_id).stdout
    assert "the child runs of step 'make'" in waiting
    assert "children (1)" in waiting
    assert child_id in waiting
    (data,) = lines(reflow("--url", url, "--json", "runs", "show", parent_id))
    assert data["parent_id"] is None
    assert [(c["id"], c["workflow"], c["step"], c["status"]) for c in data["children"]] == [
        (child_id, "ok", "make", "pending")
    ]
    child_text = reflow("--url", url, "runs", "show", child_id).stdout
    assert f"{parent_id} (step make)" in child_text
    (child,) = lines(reflow("--url", url, "--json", "runs", "show", child_id))
    assert (child["parent_id"], child["parent_step"], child["children"]) == (parent_id, "make", [])


def test_ls_and_show_say_why_a_run_waits_for_a_slot(url: str) -> None:
    exclusive = workflow("exclusive", concurrency=Limit(key=lambda i: i, max=1), priority=2)
    exclusive = exclusive.step("s", lambda ctx: None)

    async def work() -> tuple[str, str]:
        engine = Engine(storage=url, workflows=[exclusive], worker=False, load_entry_points=False)
        async with engine:
            holder = await engine.enqueue(exclusive, "k")
            waiter = await engine.enqueue(exclusive, "k")
            # One claim: the holder starts (and is left running), the waiter is blocked.
            claimed = await engine.storage.claim_runs(["exclusive"], 5, timedelta(minutes=5))
            assert [c.run.id for c in claimed] == [holder.id]
            return holder.id, waiter.id

    holder_id, waiter_id = asyncio.run(work())
    listed = reflow("--url", url, "runs", "ls").stdout
    assert "pending (blocked)" in listed
    text = reflow("--url", url, "runs", "show", waiter_id).stdout
    assert "held back" in text
    assert "blocked by limit 'exclusive:k' (at most 1 at once): waits for a running run" in text
    assert "exclusive:k (max 1)" in text
    (data,) = lines(reflow("--url", url, "--json", "runs", "show", waiter_id))
    assert data["blocked_by"] == "exclusive:k"
    assert data["priority"] == 2
    assert data["limits"] == [{"key": "exclusive:k", "max": 1}]
    (held,) = lines(reflow("--url", url, "--json", "runs", "show", holder_id))
    assert (held["status"], held["blocked_by"]) == ("running", None)


def test_ls_and_show_say_when_a_rate_or_a_debounce_holds_a_run_back(url: str) -> None:
    rated = workflow("rated", rate="1/1h").step("s", lambda ctx: None)
    settled = workflow("settled").step("s", lambda ctx: None)

    async def work() -> tuple[str, str]:
        engine = Engine(
            storage=url, workflows=[rated, settled], worker=False, load_entry_points=False
        )
        async with engine:
            first = await engine.enqueue(rated, 1)
            second = await engine.enqueue(rated, 2)
            claimed = await engine.storage.claim_runs(["rated"], 5, timedelta(minutes=5))
            assert [c.run.id for c in claimed] == [first.id]
            await engine.enqueue(settled, 1, debounce_key="doc-1", debounce="1h")
            debounced = await engine.enqueue(settled, 2, debounce_key="doc-1", debounce="1h")
            return second.id, debounced.id

    rated_id, debounced_id = asyncio.run(work())
    listed = reflow("--url", url, "runs", "ls").stdout
    assert "pending (rate)" in listed
    assert "delayed (debounced)" in listed
    text = reflow("--url", url, "runs", "show", rated_id).stdout
    assert "blocked by rate 'reflow:workflow:rated' (1/1h): waits for its window" in text
    assert "reflow:workflow:rated (1/1h)" in text
    (data,) = lines(reflow("--url", url, "--json", "runs", "show", rated_id))
    assert data["blocked_by"] == "reflow:rate:reflow:workflow:rated"
    assert data["rates"] == [{"key": "reflow:workflow:rated", "max": 1, "period_ms": 3_600_000}]
    assert data["held_back"].startswith("blocked by rate")
    text = reflow("--url", url, "runs", "show", debounced_id).stdout
    assert "debounced by key 'doc-1': starts at" in text
    (data,) = lines(reflow("--url", url, "--json", "runs", "show", debounced_id))
    assert (data["debounce_key"], data["input"]) == ("doc-1", 2)


def test_show_a_missing_run_is_exit_status_1_on_one_line(sqlite_url: str) -> None:
    result = reflow("--url", sqlite_url, "runs", "show", "nope")
    assert result.exit_code == 1
    assert result.stderr == "Error: no run with id 'nope' [run_not_found]\n"
    assert result.stdout == ""
    assert "Traceback" not in result.output


def test_debug_lets_the_traceback_through(sqlite_url: str) -> None:
    result = reflow("--url", sqlite_url, "--debug", "runs", "show", "nope")
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "RunNotFoundError"


# -- cancel / resume -------------------------------------------------------------------


def test_cancel_and_resume_single_runs(url: str) -> None:
    ids = seed(url, pending=1, ok=1)
    (run_id,) = ids["pending"]
    result = reflow("--url", url, "runs", "cancel", run_id)
    assert result.exit_code == 0, result.output
    assert "cancelled 1, skipped 0" in result.stdout
    record = get_run(url, run_id)
    assert record is not None
    assert record.status == "cancelled"

    again = reflow("--url", url, "runs", "cancel", run_id, ids["ok"][0], "missing")
    assert again.exit_code == 1
    assert f"skipped {run_id}: already cancelled" in again.stdout
    assert "skipped missing: not found" in again.stdout
    assert "Error: 3 of 3 run(s) not cancelled" in again.stderr

    resumed = reflow("--url", url, "--json", "runs", "resume", run_id)
    assert resumed.exit_code == 0, resumed.output
    assert lines(resumed) == [
        {"id": run_id, "changed": True, "reason": None},
        {"changed": 1, "skipped": 0},
    ]
    record = get_run(url, run_id)
    assert record is not None
    assert record.status == "pending"

    not_failed = reflow("--url", url, "runs", "resume", ids["ok"][0])
    assert not_failed.exit_code == 1
    assert "is completed, not failed or cancelled" in not_failed.stdout


def test_bulk_cancel_is_refused_without_a_terminal_unless_yes(url: str) -> None:
    ids = seed(url, pending=3)
    refused = reflow("--url", url, "runs", "cancel", "--workflow", "idle")
    assert refused.exit_code == 1
    assert "standard input is not a terminal; pass --yes" in refused.stderr
    assert all(get_run(url, i).status == "pending" for i in ids["pending"])  # type: ignore[union-attr]

    done = reflow("--url", url, "runs", "cancel", "--workflow", "idle", "--yes")
    assert done.exit_code == 0, done.output
    assert "cancelled 3, skipped 0" in done.stdout
    assert all(get_run(url, i).status == "cancelled" for i in ids["pending"])  # type: ignore[union-attr]


@pytest.mark.usefixtures("tty")
def test_bulk_resume_asks_first(url: str) -> None:
    ids = seed(url, failing=2, ok=1)
    declined = reflow(
        "--url", url, "runs", "resume", "--status", "failed", "--workflow", "failing", input="n\n"
    )
    assert declined.exit_code == 1
    assert "Resume 2 run(s) (status failed, workflow 'failing')?" in declined.stderr
    assert "not confirmed" in declined.stderr
    assert all(get_run(url, i).status == "failed" for i in ids["failing"])  # type: ignore[union-attr]

    accepted = reflow("--url", url, "runs", "resume", "--status", "failed", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert "resumed 2, skipped 0" in accepted.stdout
    for run_id in ids["failing"]:
        assert get_run(url, run_id).status == "pending"  # type: ignore[union-attr]
        assert steps_of(url, run_id) == {}  # the failed step record is dropped


def test_bulk_change_reports_runs_it_skipped(sqlite_url: str) -> None:
    seed(sqlite_url, ok=2)
    result = reflow(
        "--url", sqlite_url, "--json", "runs", "cancel", "--status", "completed", "--yes"
    )
    assert result.exit_code == 0  # a selection skipping runs is no refusal
    *per_run, summary = lines(result)
    assert summary == {"changed": 0, "skipped": 2}
    assert {r["reason"] for r in per_run} == {"already completed"}


def test_cancel_needs_ids_or_a_filter_not_both(sqlite_url: str) -> None:
    assert reflow("--url", sqlite_url, "runs", "cancel").exit_code == 2
    both = reflow("--url", sqlite_url, "runs", "cancel", "x", "--workflow", "ok")
    assert both.exit_code == 2
    assert "not both" in both.stderr


# -- purge -----------------------------------------------------------------------------


def test_purge_deletes_finished_runs_only(url: str) -> None:
    ids = seed(url, ok=3, failing=1, pending=1)
    young = reflow("--url", url, "runs", "purge", "--older-than", "1d", "--yes")
    assert young.exit_code == 0, young.output
    assert "deleted 0 run(s)" in young.stdout

    refused = reflow("--url", url, "runs", "purge", "--older-than", "0s")
    assert refused.exit_code == 1
    assert get_run(url, ids["ok"][0]) is not None

    result = reflow("--url", url, "--json", "runs", "purge", "--older-than", "0s", "--yes")
    assert result.exit_code == 0, result.output
    assert lines(result) == [{"deleted": 4, "older_than": 0.0}]
    for run_id in ids["ok"] + ids["failing"]:
        assert get_run(url, run_id) is None
    assert get_run(url, ids["pending"][0]) is not None


def test_purge_rejects_a_malformed_duration(sqlite_url: str) -> None:
    result = reflow("--url", sqlite_url, "runs", "purge", "--older-than", "soon", "--yes")
    assert result.exit_code == 2
    assert "is not a duration" in result.stderr


# -- events ----------------------------------------------------------------------------


def test_events_send_wakes_a_waiting_run(url: str) -> None:
    (run_id,) = seed(url, waiting=1)["waiting"]
    assert get_run(url, run_id).status == "waiting"  # type: ignore[union-attr]
    result = reflow(
        "--url", url, "events", "send", run_id, "approval", '{"by": "ada"}', "--id", "e-1"
    )
    assert result.exit_code == 0, result.output
    assert f"sent event 'approval' to run {run_id}" in result.stdout
    again = reflow(
        "--url", url, "events", "send", run_id, "approval", '{"by": "bob"}', "--id", "e-1"
    )
    assert again.exit_code == 0  # the same id again is a no-op

    async def finish() -> Any:
        async with _engine(url) as engine:
            await _drain(engine)
            return await engine.result(run_id, timeout=5)

    assert asyncio.run(finish()) == {"approved_with": {"by": "ada"}}
    finished = reflow("--url", url, "events", "send", run_id, "approval")
    assert finished.exit_code == 1
    assert "not found or already finished" in finished.stderr


def test_events_send_refuses_a_payload_that_is_not_json(sqlite_url: str) -> None:
    result = reflow("--url", sqlite_url, "events", "send", "r", "approval", "{nope")
    assert result.exit_code == 2
    assert "not JSON" in result.stderr


# -- schedules -------------------------------------------------------------------------


def test_schedules_ls_trigger_and_rm(url: str) -> None:
    async def schedule() -> None:
        async with _engine(url) as engine:
            await engine.schedule(OK, {"n": 41}, every="1h", key="hourly")
            await engine.schedule(OK, {"n": 1}, cron="0 3 * * *", key="nightly")

    asyncio.run(schedule())
    listed = reflow("--url", url, "--json", "schedules", "ls")
    assert listed.exit_code == 0, listed.output
    found = lines(listed)
    assert [s["key"] for s in found] == ["hourly", "nightly"]
    assert found[0]["input"] == {"n": 41}
    assert found[0]["workflow"] == "ok"
    table = reflow("--url", url, "schedules", "ls").stdout
    assert "every 1h" in table
    assert "cron 0 3 * * *" in table

    triggered = reflow("--url", url, "--json", "schedules", "trigger", "hourly")
    assert triggered.exit_code == 0, triggered.output
    (data,) = lines(triggered)
    run = get_run(url, data["run_id"])
    assert run is not None
    assert run.workflow == "ok"
    assert run.status == "pending"
    assert json.loads(run.input) == {"n": 41}
    assert (
        lines(reflow("--url", url, "--json", "schedules", "ls"))[0]["next_run_at"]
        == (found[0]["next_run_at"])
    )

    removed = reflow("--url", url, "schedules", "rm", "hourly")
    assert removed.exit_code == 0, removed.output
    assert [s["key"] for s in lines(reflow("--url", url, "--json", "schedules", "ls"))] == [
        "nightly"
    ]
    assert reflow("--url", url, "schedules", "rm", "hourly").exit_code == 1
    missing = reflow("--url", url, "schedules", "trigger", "hourly")
    assert missing.exit_code == 1
    assert "no schedule with key 'hourly'" in missing.stderr


# -- storage ---------------------------------------------------------------------------


def test_storage_init_and_check(url: str) -> None:
    init = reflow("storage", "init", url)
    assert init.exit_code == 0, init.output
    assert "is initialized" in init.stdout
    result = reflow("--url", url, "--json", "storage", "check")
    assert result.exit_code == 0, result.output
    (report,) = lines(result)
    assert report["ok"] is True
    assert report["backend"]["scheme"] == url.split("://")[0]
    assert report["now_round_trip_ms"] >= 0
    assert abs(report["clock_skew_ms"]) < 60_000
    scheme = url.split("://")[0]
    if scheme.startswith("sqlite"):
        from reflow_sqlite._schema import SCHEMA_VERSION as version
    elif scheme.startswith("postgres"):
        from reflow_postgres._schema import SCHEMA_VERSION as version
    else:
        version = None  # Redis keeps no schema version
    assert report["schema_version"] == version
    text = reflow("--url", url, "storage", "check").stdout
    assert "now() round trip" in text
    assert "health" in text


def test_storage_init_creates_the_sqlite_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    result = reflow("storage", "init", f"sqlite:///{path}")
    assert result.exit_code == 0, result.output
    assert path.exists()
    assert reflow("--url", f"sqlite:///{path}", "runs", "ls").exit_code == 0


def test_storage_check_of_a_store_that_is_not_reflows_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    path.write_bytes(b"this is not a SQLite database at all" * 100)
    result = reflow("--url", f"sqlite:///{path}", "storage", "check")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1
    assert "[storage_error]" in result.stderr


# -- global options, exit codes, secrets -----------------------------------------------


def test_the_url_may_come_from_the_environment(sqlite_url: str) -> None:
    seed(sqlite_url, ok=1)
    result = reflow("--json", "runs", "ls", env={"REFLOW_URL": sqlite_url})
    assert result.exit_code == 0, result.output
    assert len(lines(result)) == 2


def test_usage_errors_are_exit_status_2() -> None:
    no_url = reflow("runs", "ls", env={"REFLOW_URL": ""})
    assert no_url.exit_code == 2
    assert "no storage given" in no_url.stderr
    assert reflow("runs", "ls", "--status", "bogus").exit_code == 2
    assert reflow("nosuchcommand").exit_code == 2
    assert reflow("runs", "show").exit_code == 2


def test_an_unknown_scheme_is_exit_status_1() -> None:
    result = reflow("--url", "nosuchdb://x/y", "runs", "ls")
    assert result.exit_code == 1
    assert "[backend_not_found]" in result.stderr


def test_a_password_is_never_printed(postgres_url: str, redis_session_prefix: str) -> None:
    secret = f"pw{uuid.uuid4().hex[:10]}"
    # Local PostgreSQL trusts 127.0.0.1, so the password is accepted and ignored.
    pg = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@")
    assert secret in pg
    for args in (
        ["--url", pg, "storage", "check"],
        ["--url", pg, "--json", "storage", "check"],
        ["storage", "init", pg],
        ["--url", pg, "runs", "show", "missing"],
    ):
        result = reflow(*args)
        assert secret not in result.output, args
        assert result.exit_code in (0, 1)
    assert "***" in reflow("--url", pg, "storage", "check").stdout
    rd = f"redis://:{secret}@127.0.0.1:6379/0?prefix={redis_session_prefix}.pw"
    for args in (
        ["--url", rd, "storage", "check"],
        ["--url", rd, "--json", "runs", "ls"],
        ["--url", rd, "runs", "show", "missing"],
        ["--url", rd, "--debug", "runs", "show", "missing"],
    ):
        result = reflow(*args)
        assert secret not in result.output, args
        assert secret not in str(result.exception or ""), args
    assert "redis://:***@127.0.0.1" in reflow("--url", rd, "storage", "check").stdout


def test_version_and_help() -> None:
    version = reflow("--version")
    assert version.exit_code == 0
    assert version.stdout.startswith("reflow, version ")
    help_text = reflow("--help").stdout
    for name in ("runs", "events", "schedules", "storage", "worker"):
        assert name in help_text
    assert "REFLOW_URL" in help_text


# -- plugins ---------------------------------------------------------------------------


def test_the_conformance_plugin_adds_its_command() -> None:
    root = build_cli()
    assert "conformance" in root.commands
    result = CliRunner().invoke(root, ["conformance", "--help"])
    assert result.exit_code == 0
    assert "--storage MODULE:FACTORY" in result.stdout


def test_reflow_conformance_passes_every_argument_through(monkeypatch: pytest.MonkeyPatch) -> None:
    import reflow_conformance.cli

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    monkeypatch.setattr(reflow_conformance.cli, "main", fake_main)
    args = ["--url", "sqlite:///x.db", "--without", "schedules", "-x", "-k", "claims"]
    result = CliRunner().invoke(build_cli(), ["conformance", *args])
    assert seen == [args]
    assert result.exit_code == 3


def test_plugin_commands_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "conformance" not in build_cli().commands


def test_a_plugin_that_raises_is_skipped_with_a_warning() -> None:
    class Broken:
        @hookimpl
        def reflow_register_commands(self, cli: click.Group) -> None:
            raise RuntimeError("boom")

    class Good:
        @hookimpl
        def reflow_register_commands(self, cli: click.Group) -> None:
            @cli.command("hello")
            def hello() -> None:
                click.echo("hi")

    group = click.Group("reflow")
    with pytest.warns(RuntimeWarning, match="failed to add its commands"):
        register_commands(group, [Broken(), Good()])
    assert CliRunner().invoke(group, ["hello"]).stdout == "hi\n"


# -- docs ------------------------------------------------------------------------------


def test_the_reference_in_docs_cli_md_is_generated_from_the_commands() -> None:
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = page[page.index(BEGIN) + len(BEGIN) : page.index(END)].strip()
    assert section == render().strip(), (
        "docs/cli.md is out of date: run python -m reflow_core.cli.reference docs/cli.md"
    )


def test_relative_times() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert _common.relative(None, now) == "-"
    assert _common.relative(now, now) == "just now"
    assert _common.relative(now - timedelta(seconds=5), now) == "5s ago"
    assert _common.relative(now - timedelta(minutes=90), now) == "1h ago"
    assert _common.relative(now + timedelta(days=3), now) == "in 3d"


# -- real processes --------------------------------------------------------------------


def _script() -> str:
    path = Path(sys.executable).with_name("reflow")
    assert path.exists(), f"the reflow script is not installed next to {sys.executable}"
    return str(path)


def _run(
    command: Sequence[str], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", ["module", "script"])
def test_real_processes(url: str, how: str) -> None:
    command = [sys.executable, "-m", "reflow_core"] if how == "module" else [_script()]
    ids = seed(url, ok=2, failing=1)
    listed = _run(command, "--json", "runs", "ls", "--limit", "2", env={"REFLOW_URL": url})
    assert listed.returncode == 0, listed.stderr
    *runs, tail = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(runs) == 2
    rest = _run(command, "--url", url, "--json", "runs", "ls", "--before", tail["next_cursor"])
    *more, last = [json.loads(line) for line in rest.stdout.splitlines()]
    assert sorted(r["id"] for r in runs + more) == sorted(ids["ok"] + ids["failing"])
    assert last == {"next_cursor": None}

    shown = _run(command, "--url", url, "runs", "show", ids["failing"][0])
    assert shown.returncode == 0, shown.stderr
    assert "ValueError: card declined" in shown.stdout
    assert "\x1b[" not in shown.stdout  # no colour into a pipe

    missing = _run(command, "--url", url, "runs", "show", "missing")
    assert missing.returncode == 1
    assert missing.stderr == "Error: no run with id 'missing' [run_not_found]\n"

    refused = _run(command, "--url", url, "runs", "cancel", "--status", "completed")
    assert refused.returncode == 1
    assert "pass --yes" in refused.stderr

    check = _run(command, "--url", url, "storage", "check")
    assert check.returncode == 0, check.stderr
    for secret in url_secrets(url):
        assert secret not in check.stdout + check.stderr

    usage = _run(command, "runs", "ls", env={"REFLOW_URL": ""})
    assert usage.returncode == 2


@pytest.mark.slow
def test_the_script_lists_plugin_commands() -> None:
    listed = _run([_script()], "--help")
    assert listed.returncode == 0, listed.stderr
    assert "conformance" in listed.stdout
    help_text = _run([_script()], "conformance", "--help")
    assert help_text.returncode == 0
    assert "usage: reflow-conformance" in help_text.stdout
