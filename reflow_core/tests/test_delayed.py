"""``enqueue(..., delay=...)`` and ``run_at=``: runs that start later, on every backend.

What a backend stores and when it lets a delayed run be claimed is the
conformance suite's business; these check the engine's side: the arguments,
``run_at`` read on the storage's clock, a worker that wakes when the delay
passes, cancelling, and idempotent enqueues.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from reflow_core import ConfigError, Engine, workflow
from reflow_core.cli import build_cli
from reflow_core.storage import Storage

ECHO = workflow("delayed-echo").step("echo", lambda ctx: ctx.input)


def _engine(storage: Storage, **options: Any) -> Engine:
    options.setdefault("close_storage", False)
    return Engine(storage=storage, workflows=[ECHO], load_entry_points=False, **options)


async def test_a_delayed_run_starts_when_its_delay_has_passed(storage: Storage) -> None:
    async with _engine(storage, poll_interval="5s") as engine:
        started = time.monotonic()
        run = await engine.enqueue(ECHO, "later", delay="400ms")
        assert run.status == "delayed"
        assert run.wake_at is not None
        assert run.wake_at - run.created_at == timedelta(milliseconds=400)
        assert (await engine.get_run_status(run.id)).status == "delayed"
        assert await engine.result(run.id, timeout=4) == "later"
        took = time.monotonic() - started
    # Not before the delay; and well before the 5 s poll: the worker woke for it.
    assert 0.35 <= took < 3, took
    finished = await storage.get_run(run.id)
    assert finished is not None
    assert (finished.status, finished.attempts, finished.reclaims) == ("completed", 1, 0)


async def test_run_at_is_read_on_the_storage_clock(db: Any, clock: Any) -> None:
    storage = db.connect(clock=clock)
    async with _engine(storage, worker=False) as engine:
        run_at = clock() + timedelta(hours=1)
        run = await engine.enqueue(ECHO, 1, run_at=run_at)
        assert (run.status, run.wake_at) == ("delayed", run_at)
        assert await engine.tick() == 0
        clock.advance(3599)
        assert await engine.tick() == 0
        clock.advance(1)
        assert await engine.tick() == 1
        past = await engine.enqueue(ECHO, 2, run_at=datetime(2000, 1, 1, tzinfo=UTC))
        assert past.status == "pending"
        zero = await engine.enqueue(ECHO, 3, delay=0)
        assert zero.status == "pending"
        assert await engine.tick() == 2


async def test_a_delayed_run_can_be_cancelled_before_it_starts(db: Any, clock: Any) -> None:
    storage = db.connect(clock=clock)
    async with _engine(storage, worker=False) as engine:
        run = await engine.enqueue(ECHO, 1, delay="10m")
        assert await engine.cancel(run.id)
        clock.advance(600)
        assert await engine.tick() == 0
        assert (await engine.get_run_status(run.id)).status == "cancelled"


async def test_an_idempotent_enqueue_returns_the_delayed_run(db: Any, clock: Any) -> None:
    storage = db.connect(clock=clock)
    async with _engine(storage, worker=False) as engine:
        first = await engine.enqueue(ECHO, 1, delay="1h", idempotency_key="k")
        again = await engine.enqueue(ECHO, 1, idempotency_key="k")
        assert again.id == first.id
        assert (again.status, again.wake_at) == ("delayed", first.wake_at)
        [queue] = await engine.queue_stats([ECHO])
        assert (queue.delayed, queue.pending) == (1, 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": "1m", "run_at": datetime(2030, 1, 1, tzinfo=UTC)}, "not both"),
        ({"run_at": datetime(2030, 1, 1)}, "run_at must be a timezone-aware datetime"),
        ({"run_at": "tomorrow"}, "run_at must be a timezone-aware datetime"),
        ({"delay": -1}, "delay"),
        ({"delay": "soon"}, "delay='soon' is not a duration"),
    ],
)
async def test_bad_delays_are_refused_and_write_nothing(
    storage: Storage, options: dict[str, Any], message: str
) -> None:
    async with _engine(storage, worker=False) as engine:
        with pytest.raises(ConfigError, match=message):
            await engine.enqueue(ECHO, 1, **options)
        assert (await engine.list_runs()).runs == []


def test_the_command_line_lists_delayed_runs_and_shows_deadlines(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"

    async def seed() -> str:
        async with Engine(storage=url, workflows=[ECHO], worker=False) as engine:
            await engine.enqueue(ECHO, 1)
            run = await engine.enqueue(ECHO, 2, delay="1h", deadline="2h")
            return run.id

    run_id = asyncio.run(seed())
    cli = build_cli(plugins=False)
    listed = CliRunner().invoke(cli, ["--url", url, "--json", "runs", "ls", "--status", "delayed"])
    assert listed.exit_code == 0, listed.output
    *rows, _ = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["status"]) for r in rows] == [(run_id, "delayed")]
    assert rows[0]["deadline_at"] is not None
    shown = CliRunner().invoke(cli, ["--url", url, "runs", "show", run_id])
    assert shown.exit_code == 0, shown.output
    lines = {line.split()[0]: line for line in shown.stdout.splitlines() if line.strip()}
    assert "in 1h" in lines["wakes"] or "in 59m" in lines["wakes"]
    assert "in 1h" in lines["deadline"]


@pytest.mark.parametrize("backend", ["postgres", "redis"], indirect=True)
async def test_a_worker_elsewhere_is_woken_when_a_delayed_run_falls_due(db: Any) -> None:
    """Another engine enqueues the delayed run: on PostgreSQL and Redis the
    storage's hint wakes the idle worker when it falls due, long before its
    30 s poll (SQLite and memory send no hints: their workers poll)."""
    worker_store, client_store = db.connect(), db.connect()
    async with (
        _engine(worker_store, poll_interval="30s") as worker,
        _engine(client_store, worker=False) as client,
    ):
        await asyncio.sleep(0.3)  # the worker has subscribed and gone idle
        started = time.monotonic()
        run = await client.enqueue(ECHO, "hinted", delay="500ms")
        assert run.status == "delayed"
        assert await client.result(run.id, timeout=10) == "hinted"
        took = time.monotonic() - started
    assert 0.45 <= took < 5, took
    assert worker.in_flight == 0
