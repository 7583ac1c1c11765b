"""``reflow workers ls``, ``reflow stats`` and ``reflow schedules pause|resume``
against real stores of each test's own (``CliRunner``, in process)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from reflow_core import Engine, codec, open_storage, workflow
from reflow_core.cli import build_cli
from reflow_core.storage import NewRun, Storage, WorkerInfo

OK = workflow("ok").step("add", lambda ctx: ctx.input)
NAP = workflow("nap").sleep("nap", "1h").step("after", lambda ctx: None)


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cli.db'}"
    return str(request.getfixturevalue(f"{request.param}_url"))


def reflow(*args: str) -> Result:
    return CliRunner().invoke(build_cli(plugins=False), list(args), catch_exceptions=True)


def lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def on_store(url: str, work: Any) -> Any:
    async def main() -> Any:
        store = open_storage(url)
        await store.initialize()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_workers_ls_lists_live_workers_oldest_first(url: str) -> None:
    assert reflow("--url", url, "workers", "ls").stdout.strip() == "no live workers"

    async def announce(store: Storage) -> None:
        await store.announce_worker(
            WorkerInfo("w-one", "host-a", 101, ("ok", "nap"), 8, 3), timedelta(minutes=5)
        )
        await asyncio.sleep(0.01)
        await store.announce_worker(
            WorkerInfo("w-two", "host-b", 202, ("ok",), 4, 0), timedelta(minutes=5)
        )
        await store.announce_worker(
            WorkerInfo("w-gone", "host-c", 303, ("ok",), 1, 0), timedelta(minutes=5)
        )
        assert await store.remove_worker("w-gone")

    on_store(url, announce)
    found = lines(reflow("--url", url, "--json", "workers", "ls"))
    assert [(w["id"], w["host"], w["pid"]) for w in found] == [
        ("w-one", "host-a", 101),
        ("w-two", "host-b", 202),
    ]
    assert found[0]["workflows"] == ["ok", "nap"]
    assert (found[0]["concurrency"], found[0]["in_flight"]) == (8, 3)
    assert found[0]["started_at"] <= found[0]["last_seen_at"] < found[0]["expires_at"]
    table = reflow("--url", url, "workers", "ls").stdout.splitlines()
    assert table[0].split() == [
        "ID",
        "HOST",
        "PID",
        "IN",
        "FLIGHT",
        "STARTED",
        "LAST",
        "SEEN",
        "WORKFLOWS",
    ]
    assert table[1].split()[:4] == ["w-one", "host-a", "101", "3/8"]
    assert table[1].endswith("ok, nap")
    assert "w-gone" not in "\n".join(table)


def test_stats_counts_unfinished_runs_and_who_serves_them(url: str) -> None:
    async def seed(store: Storage) -> None:
        async with Engine(
            storage=store, workflows=[OK, NAP], worker=False, close_storage=False
        ) as client:
            for i in range(2):
                await client.enqueue(NAP, i)
            await client.enqueue(OK, 0)
            while await client.tick():  # ok completes; the naps go to sleep
                pass
            for i in range(3):
                await client.enqueue(OK, i)
            delayed = await client.enqueue(OK, 9, delay="1h")
            assert delayed.status == "delayed"
        await store.create_run(NewRun(workflow="orphan", input=codec.encode(None)))
        await store.announce_worker(WorkerInfo("w", "h", 1, ("ok",), 2, 0), timedelta(minutes=5))

    on_store(url, seed)
    found = {q["workflow"]: q for q in lines(reflow("--url", url, "--json", "stats"))}
    assert set(found) == {"ok", "nap", "orphan"}
    ok = found["ok"]
    assert (ok["delayed"], ok["pending"], ok["running"], ok["sleeping"], ok["waiting"]) == (
        1,
        3,
        0,
        0,
        0,
    )
    assert ok["workers"] == 1
    assert ok["oldest_pending_age"] >= 0
    assert (found["nap"]["sleeping"], found["nap"]["pending"]) == (2, 0)
    assert found["nap"]["oldest_pending_since"] is None
    assert found["orphan"]["workers"] == 0

    only = lines(reflow("--url", url, "--json", "stats", "--workflow", "ok", "-w", "none-such"))
    assert [(q["workflow"], q["pending"]) for q in only] == [("none-such", 0), ("ok", 3)]

    table = reflow("--url", url, "stats").stdout.splitlines()
    assert table[0].split() == [
        "WORKFLOW",
        "DELAYED",
        "PENDING",
        "RUNNING",
        "SLEEPING",
        "WAITING",
        "OLDEST",
        "PENDING",
        "WORKERS",
    ]
    rows = {row.split()[0]: row.split() for row in table[1:]}
    assert rows["ok"][1:6] == ["1", "3", "0", "0", "0"]
    assert rows["nap"][-2:] == ["-", "0"]


def test_stats_of_a_store_with_nothing_queued(url: str) -> None:
    assert reflow("--url", url, "stats").stdout.strip() == "no unfinished runs"
    assert reflow("--url", url, "--json", "stats").stdout == ""


def test_schedules_pause_and_resume(url: str) -> None:
    async def schedule(store: Storage) -> None:
        async with Engine(
            storage=store, workflows=[OK], worker=False, close_storage=False
        ) as engine:
            await engine.schedule(OK, 1, every="1h", key="hourly")

    on_store(url, schedule)
    paused = reflow("--url", url, "schedules", "pause", "hourly")
    assert paused.exit_code == 0, paused.output
    assert paused.stdout == "paused schedule 'hourly'\n"
    [listed] = lines(reflow("--url", url, "--json", "schedules", "ls"))
    assert listed["paused"] is True
    row = reflow("--url", url, "schedules", "ls").stdout.splitlines()[1].split()
    assert row[:5] == ["hourly", "ok", "every", "1h", "paused"]

    async def due(store: Storage) -> list[Any]:
        return await store.due_schedules(10)

    resumed = lines(reflow("--url", url, "--json", "schedules", "resume", "hourly"))
    assert resumed[0]["paused"] is False
    assert resumed[0]["next_run_at"] == listed["next_run_at"]  # not due yet: kept
    assert on_store(url, due) == []
    row = reflow("--url", url, "schedules", "ls").stdout.splitlines()[1].split()
    assert row[4] == "active"

    for command in ("pause", "resume"):
        missing = reflow("--url", url, "schedules", command, "nope")
        assert missing.exit_code == 1
        assert "no schedule with key 'nope'" in missing.stderr
