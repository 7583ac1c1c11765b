"""``get_runs`` on SQLite: the runs among many ids, each exactly as ``get_run``
reads it, with one statement for the whole set.

Runs under both transaction drivers (one call on aiosqlite's worker thread,
and aiosqlite's public coroutines).
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from reflow_core.errors import ConfigError, StorageError
from reflow_core.storage import (
    MAX_GET_RUNS,
    ConcurrencyLimit,
    CreateResult,
    NewRun,
    RateLimit,
    RunRecord,
    StepRecord,
)
from reflow_sqlite import SQLiteStorage
from reflow_sqlite._queries import with_marks

from .conftest import database

LEASE = timedelta(seconds=30)


@pytest.fixture(params=["hook", "public"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Trace:
    """The statements the storage's connection runs, as SQLite reports them
    (``sqlite3.Connection.set_trace_callback``)."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, sql: str) -> None:
        self.statements.append(" ".join(sql.split()))


async def traced(store: SQLiteStorage) -> Trace:
    trace = Trace()
    assert store._conn is not None
    await store._conn.set_trace_callback(trace)
    return trace


async def create_many(store: SQLiteStorage, count: int) -> list[str]:
    """The ids of ``count`` new pending runs, created in one batch."""
    results = await store.create_runs([NewRun("wf", f'{{"n":{n}}}') for n in range(count)])
    return [r.run.id for r in results if isinstance(r, CreateResult)]


async def one_by_one(store: SQLiteStorage, ids: list[str]) -> dict[str, RunRecord]:
    """What ``get_runs`` must answer, read with ``get_run`` per distinct id."""
    found: dict[str, RunRecord] = {}
    for run_id in ids:
        record = await store.get_run(run_id)
        if record is not None:
            found[run_id] = record
    return found


async def runs_in_every_status(store: SQLiteStorage) -> list[str]:
    """Runs pending, delayed, running, sleeping, waiting, completed, failed,
    cancelled, a child, and one with limits, rates, headers and a deadline."""
    ids: list[str] = []

    async def create(new: NewRun) -> str:
        run_id = (await store.create_run(new)).run.id
        ids.append(run_id)
        return run_id

    for name in ("running", "sleeping", "waiting", "completed", "failed", "parent"):
        await create(NewRun(name, f'"{name}"'))
    await create(NewRun("pending", '"pending"', idempotency_key="key-1", priority=3))
    await create(NewRun("delayed", '"delayed"', delay=timedelta(minutes=5)))
    cancelled = await create(NewRun("cancelled", '"cancelled"'))
    assert await store.update_run_status(cancelled, "cancelled", error='"stop"')
    await create(
        NewRun(
            "limited",
            '"limited"',
            deadline=timedelta(hours=1),
            limits=(ConcurrencyLimit("tenant-a", 2), ConcurrencyLimit("global", 10)),
            rates=(RateLimit("api", 5, timedelta(seconds=1)),),
            headers={"traceparent": "00-abc-def-01", "baggage": "k=v"},
            debounce_key="debounced",
        )
    )

    claimed = {
        c.run.workflow: c.lease
        for c in await store.claim_runs(
            ["running", "sleeping", "waiting", "completed", "failed", "parent"], 10, LEASE
        )
    }
    assert len(claimed) == 6
    assert await store.sleep_run(claimed["sleeping"], "nap", timedelta(minutes=1)) is not None
    assert await store.wait_run(claimed["waiting"], "w", "go", timedelta(minutes=2)) is not None
    assert await store.save_step_result(
        claimed["completed"], StepRecord("s", "completed", output='"x"'), LEASE
    )
    assert await store.finish_run(claimed["completed"], "completed", output='{"done":true}')
    assert await store.finish_run(claimed["failed"], "failed", error='{"boom":1}')
    child = await store.start_child(claimed["parent"], "spawn", NewRun("child", "1", run_id="c-1"))
    assert child is not None
    ids.append(child.id)
    return ids


async def test_the_answer_is_get_run_of_each_stored_id(opener, clock) -> None:
    store = await opener()
    ids = await runs_in_every_status(store)
    clock.advance(1)
    asked = ["missing-1", *ids, ids[0], "missing-2", ids[3], ids[-1]]
    expected = await one_by_one(store, ids)
    statuses = {record.status for record in expected.values()}
    assert statuses == {
        "pending",
        "delayed",
        "running",
        "sleeping",
        "waiting",
        "completed",
        "failed",
        "cancelled",
    }
    limited = next(r for r in expected.values() if r.workflow == "limited")
    assert len(limited.limits) == 2
    assert len(limited.rates) == 1
    assert dict(limited.headers) == {"traceparent": "00-abc-def-01", "baggage": "k=v"}
    assert limited.deadline_at is not None
    running = next(r for r in expected.values() if r.workflow == "running")
    assert running.lease_expires_at is not None
    assert running.lease_epoch == 1
    completed = next(r for r in expected.values() if r.workflow == "completed")
    assert completed.output == '{"done":true}'
    failed = next(r for r in expected.values() if r.workflow == "failed")
    assert failed.error == '{"boom":1}'
    assert expected["c-1"].parent_id is not None

    got = await store.get_runs(asked)
    assert got == expected
    assert list(got) == ids  # in the order first given, each once
    assert await store.get_runs(tuple(reversed(asked))) == expected
    assert await store.get_runs({"missing-1", ids[2]}) == {ids[2]: expected[ids[2]]}


async def test_missing_ids_are_absent(opener) -> None:
    store = await opener()
    assert await store.get_runs(["nope"]) == {}
    run_id = (await store.create_run(NewRun("wf", "1"))).run.id
    assert await store.get_runs(["nope", run_id, "nope"]) == {run_id: await store.get_run(run_id)}


async def test_a_thousand_ids_are_one_statement(opener) -> None:
    store = await opener()
    created = await create_many(store, 700)
    assert len(created) == 700
    asked = [*created, *(f"missing-{n}" for n in range(MAX_GET_RUNS - len(created)))]
    assert len(asked) == MAX_GET_RUNS
    expected = await one_by_one(store, created)

    trace = await traced(store)
    got = await store.get_runs(asked)
    assert got == expected
    assert list(got) == created
    # One SELECT, no transaction statements around it: a single round trip.
    assert len(trace.statements) == 1
    assert trace.statements[0].startswith("SELECT id, workflow, status")
    assert "FROM runs WHERE id IN (" in trace.statements[0]


async def test_every_size_up_to_the_maximum_is_one_statement(opener) -> None:
    store = await opener()
    ids = await create_many(store, 5)
    trace = await traced(store)
    for size in (1, 2, 3, 5, 7, 513, MAX_GET_RUNS):
        asked = [*ids, *(f"m-{n}" for n in range(size))][:size]
        got = await store.get_runs(asked)
        assert list(got) == [i for i in asked if i in ids]
    assert len(trace.statements) == 7


async def test_no_ids_read_nothing(opener) -> None:
    store = await opener()
    trace = await traced(store)
    assert await store.get_runs([]) == {}
    assert await store.get_runs(set()) == {}
    assert trace.statements == []


async def test_bad_arguments_are_refused_before_the_read(opener) -> None:
    store = await opener()
    trace = await traced(store)
    with pytest.raises(ConfigError, match="not one string"):
        await store.get_runs("run-1")
    with pytest.raises(ConfigError, match="at most 1000"):
        await store.get_runs([f"id-{n}" for n in range(MAX_GET_RUNS + 1)])
    with pytest.raises(ConfigError):
        await store.get_runs(["ok", ""])
    assert trace.statements == []
    # Duplicates count once against the maximum.
    assert await store.get_runs(["same"] * (MAX_GET_RUNS + 1)) == {}


async def test_a_closed_storage_refuses(opener) -> None:
    store = await opener()
    await store.close()
    with pytest.raises(StorageError):
        await store.get_runs(["a"])
    with pytest.raises(StorageError):
        await store.get_runs([])


@pytest.mark.parametrize("size", [1, 16, 1024])
def test_the_read_seeks_the_primary_key(size: int) -> None:
    """One seek per id in the primary key's index, never a scan of runs."""
    with database() as raw:
        sql = with_marks("get_runs", "ids", size)
        ids = [f"id-{n}" for n in range(size)]
        plan = [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", ids)]
        assert plan == ["SEARCH runs USING INDEX sqlite_autoindex_runs_1 (id=?)"]
