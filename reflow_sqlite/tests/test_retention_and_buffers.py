"""Bounded event buffers and retention on SQLite, checked in the file itself.

A run that ends drops its buffered events in the transaction that ends it
(events with an id stay, as taken and without a payload, so a redelivery of
the id stays a no-op); ``purge_finished`` deletes runs by the finish time
stored when they ended. Runs under both transaction drivers.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reflow_core import Engine, EventBufferFullError, StepContext, codec, workflow
from reflow_core.errors import ConfigError, StorageError
from reflow_core.storage import ClaimedRun, NewRun, StepRecord
from reflow_sqlite import SQLiteStorage
from reflow_sqlite import _schema as schema_module
from reflow_sqlite import _scripts as scripts_module
from reflow_sqlite._queries import QUERIES
from reflow_sqlite._schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION

from .conftest import FakeClock, Opener

LEASE = timedelta(seconds=30)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["hook", "public"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def rows(path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    raw = sqlite3.connect(path)
    try:
        return raw.execute(sql, params).fetchall()
    finally:
        raw.close()


def us(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1)


async def claim_one(store: SQLiteStorage, wf: str = "wf") -> ClaimedRun:
    claimed = await store.claim_runs([wf], 1, LEASE)
    assert len(claimed) == 1
    return claimed[0]


async def _echo(ctx: StepContext[Any, Any]) -> Any:
    return ctx.prev


# -- event buffers ---------------------------------------------------------------------


async def test_a_completed_run_leaves_no_buffered_event_in_the_file(
    opener: Opener, db_path: Path
) -> None:
    wf = workflow("approve").step("prepare", lambda ctx: 1).wait_for_event("go").step("a", _echo)
    store = await opener()
    engine = Engine(storage=store, workflows=[wf], close_storage=False)
    try:
        run = await engine.enqueue(wf)
        for i in range(999):
            assert await engine.send_event(run.id, "go", i)
        assert await engine.send_event(run.id, "go", "with id", event_id="keep")
        with pytest.raises(EventBufferFullError):
            await engine.send_event(run.id, "go", "one too many")
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=5) == 0
    finally:
        await engine.stop(timeout=0)
    left = rows(
        db_path,
        "SELECT payload, event_id, taken_at IS NOT NULL FROM events WHERE run_id = ? ORDER BY id",
        run.id,
    )
    # The event the wait took, and the dedupe record of the one with an id.
    assert left == [("0", None, 1), ("", "keep", 1)]
    assert rows(db_path, "SELECT count(*) FROM events WHERE taken_at IS NULL") == [(0,)]
    # The id is still known: a retry after the end is refused like any event
    # to a finished run, and stores nothing.
    assert not await store.deliver_event(run.id, "go", '"again"', event_id="keep")
    assert rows(db_path, "SELECT count(*) FROM events") == [(2,)]


@pytest.mark.parametrize(
    "how", ["failed", "failed with lease", "cancelled", "cancelled with lease"]
)
async def test_ending_a_run_drops_its_buffer_in_the_same_transaction(
    opener: Opener, db_path: Path, clock: FakeClock, how: str
) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "1"))).run.id
    held = await claim_one(store)
    await store.deliver_event(run_id, "e", '"plain"')
    await store.deliver_event(run_id, "e", '"with id"', event_id="x")
    await store.deliver_event(run_id, "other", '"other"')
    if how == "failed":
        assert await store.finish_run(held.lease, "failed", error='"boom"')
    elif how == "failed with lease":
        assert await store.update_run_status(run_id, "failed", lease=held.lease, error='"x"')
    elif how == "cancelled":
        assert await store.update_run_status(run_id, "cancelled")
    else:
        assert await store.update_run_status(run_id, "cancelled", lease=held.lease)
    events = rows(
        db_path, "SELECT payload, event_id, taken_at FROM events WHERE run_id = ?", run_id
    )
    assert events == [("", "x", us(clock.now))]
    assert rows(db_path, "SELECT finished_at FROM runs WHERE id = ?", run_id) == [(us(clock.now),)]
    clock.advance(60)
    assert await store.requeue_run(run_id)
    assert rows(db_path, "SELECT finished_at FROM runs WHERE id = ?", run_id) == [(None,)]
    again = await claim_one(store)
    waited = await store.wait_run(again.lease, "w", "e", None)
    assert waited is not None
    assert not waited.ready  # nothing from before the end is buffered
    assert await store.deliver_event(run_id, "e", '"late"', event_id="x", max_buffered=1)
    assert rows(db_path, "SELECT count(*) FROM events WHERE taken_at IS NULL") == [(0,)]
    assert await store.deliver_event(run_id, "e", '"fresh"', max_buffered=1)
    assert rows(db_path, "SELECT count(*) FROM events WHERE taken_at IS NULL") == [(1,)]


async def test_a_hand_back_keeps_the_buffer(opener: Opener, db_path: Path) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "1"))).run.id
    held = await claim_one(store)
    await store.deliver_event(run_id, "e", '"kept"')
    assert await store.update_run_status(run_id, "pending", lease=held.lease)
    assert rows(db_path, "SELECT payload FROM events WHERE taken_at IS NULL") == [('"kept"',)]
    assert rows(db_path, "SELECT finished_at FROM runs") == [(None,)]


async def test_the_cap_is_counted_through_the_buffered_index(opener: Opener, db_path: Path) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "1"))).run.id
    plan = rows(db_path, "EXPLAIN QUERY PLAN " + QUERIES["count_buffered"], run_id, 1000)
    assert any("events_buffered" in str(row[-1]) for row in plan), plan
    for statement in (schema_module.DROP_BUFFERED, schema_module.RETIRE_BUFFERED):
        params = (run_id,) if statement.startswith("DELETE") else (0, run_id)
        plan = rows(db_path, "EXPLAIN QUERY PLAN " + statement, *params)
        assert any("events_buffered" in str(row[-1]) for row in plan), (statement, plan)


# -- retention -----------------------------------------------------------------------------


async def finished_run(
    store: SQLiteStorage, key: str | None = None, *, wf: str = "wf", status: str = "completed"
) -> str:
    """A run of ``wf`` that ended now, with a step, a taken event and a retired event id."""
    run_id = (await store.create_run(NewRun(wf, codec.encode(key), idempotency_key=key))).run.id
    held = await claim_one(store, wf)
    await store.deliver_event(run_id, "e", '"taken"')
    await store.deliver_event(run_id, "e", '"left"', event_id="id")
    assert await store.take_event(held.lease, "w", "e") is not None
    step = StepRecord("s", "completed", output="1")
    if status == "completed":
        assert await store.finish_run(held.lease, "completed", output="1", step=step)
    else:
        assert await store.update_run_status(run_id, "cancelled")
    return run_id


async def test_purge_deletes_old_finished_runs_with_everything_they_own(
    opener: Opener, db_path: Path, clock: FakeClock
) -> None:
    store = await opener()
    old = [await finished_run(store, f"k{i}") for i in range(4)]
    old.append(await finished_run(store, "c", status="cancelled"))
    clock.advance(2 * 86400)
    recent = await finished_run(store, "recent")
    pending = (await store.create_run(NewRun("wf", "1", idempotency_key="p"))).run.id
    running = (await store.create_run(NewRun("other", "1"))).run.id
    await claim_one(store, "other")
    counts = (
        "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM steps),"
        " (SELECT count(*) FROM events)"
    )
    assert rows(db_path, counts) == [(8, 6 * 2 - 1, 6 * 2)]  # cancelled: no last step

    assert await store.purge_finished(timedelta(days=1)) == 5
    assert await store.purge_finished(timedelta(days=1)) == 0
    assert rows(db_path, counts) == [(3, 2, 2)]
    for run_id in old:
        assert await store.get_run(run_id) is None
    for run_id in (recent, pending, running):
        assert await store.get_run(run_id) is not None
    # The keys of purged runs are free; the kept runs keep theirs.
    assert (await store.create_run(NewRun("wf", codec.encode("k0"), idempotency_key="k0"))).created
    kept = await store.create_run(NewRun("wf", codec.encode("recent"), idempotency_key="recent"))
    assert kept.run.id == recent
    assert not kept.created


async def test_purge_works_in_transactions_of_at_most_batch_runs(
    opener: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await opener()
    for _ in range(7):
        await finished_run(store)
    clock.advance(3600)
    batches: list[int] = []
    script = scripts_module.purge

    def counting(now: int, age_us: int, batch: int) -> scripts_module.Script[int]:
        deleted = yield from script(now, age_us, batch)
        batches.append(deleted)
        return deleted

    monkeypatch.setattr(scripts_module, "purge", counting)
    assert await store.purge_finished(timedelta(minutes=1), batch=3) == 7
    assert batches == [3, 3, 1]


async def test_purge_limit_deletes_exactly_the_oldest(
    opener: Opener, db_path: Path, clock: FakeClock
) -> None:
    store = await opener()
    finished = []
    for _ in range(7):
        finished.append(await finished_run(store))
        clock.advance(1)  # each one finishes a second after the one before
    clock.advance(3600)
    assert await store.purge_finished(timedelta(minutes=1), limit=3) == 3
    for run_id in finished[:3]:
        assert await store.get_run(run_id) is None
    for run_id in finished[3:]:
        assert await store.get_run(run_id) is not None
    assert rows(db_path, "SELECT count(*) FROM runs") == [(4,)]
    assert rows(db_path, "SELECT count(DISTINCT run_id) FROM steps") == [(4,)]
    assert rows(db_path, "SELECT count(DISTINCT run_id) FROM events") == [(4,)]
    # A limit above what is due deletes what is due; the next call finds none.
    assert await store.purge_finished(timedelta(minutes=1), limit=100) == 4
    assert await store.purge_finished(timedelta(minutes=1), limit=1) == 0


async def test_purge_limit_bounds_the_batches_too(
    opener: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await opener()
    for _ in range(7):
        await finished_run(store)
    clock.advance(3600)
    sizes: list[int] = []
    script = scripts_module.purge

    def recording(now: int, age_us: int, batch: int) -> scripts_module.Script[int]:
        sizes.append(batch)
        return (yield from script(now, age_us, batch))

    monkeypatch.setattr(scripts_module, "purge", recording)
    # Transactions of at most batch runs, the last one cut to what the limit leaves.
    assert await store.purge_finished(timedelta(minutes=1), batch=2, limit=5) == 5
    assert sizes == [2, 2, 1]
    sizes.clear()
    assert await store.purge_finished(timedelta(minutes=1), batch=2, limit=5) == 2
    assert sizes == [2, 2]  # a full batch may have more behind it: one more look


@pytest.mark.parametrize("limit", [0, -1, 1.5, "3", True])
async def test_purge_refuses_a_bad_limit(opener: Opener, clock: FakeClock, limit: object) -> None:
    store = await opener()
    run_id = await finished_run(store)
    clock.advance(3600)
    with pytest.raises(ConfigError) as info:
        await store.purge_finished(timedelta(minutes=1), limit=limit)  # type: ignore[arg-type]
    assert info.value.option == "limit"
    assert await store.get_run(run_id) is not None  # nothing was deleted


async def test_purge_judges_a_run_by_the_time_it_finished(opener: Opener, clock: FakeClock) -> None:
    store = await opener()
    created_long_ago = (await store.create_run(NewRun("wf", "1"))).run.id
    clock.advance(10 * 86400)
    held = await claim_one(store)
    assert await store.finish_run(held.lease, "completed", output="1")  # finished now
    requeued = await finished_run(store, status="cancelled")
    clock.advance(2 * 86400)
    assert await store.requeue_run(requeued)  # pending again: not finished
    assert await store.purge_finished(timedelta(days=3)) == 0
    assert await store.purge_finished(timedelta(days=1)) == 1
    assert await store.get_run(created_long_ago) is None
    assert await store.get_run(requeued) is not None
    # finished_at < now - older_than: a run that finished at the cut-off stays.
    again = await claim_one(store)
    assert await store.finish_run(again.lease, "failed", error='"x"')
    assert await store.purge_finished(timedelta(0)) == 0
    clock.advance(0.000001)
    assert await store.purge_finished(timedelta(0)) == 1


async def test_a_purge_racing_finishes_never_deletes_a_run_that_finished_after_the_cut_off(
    opener: Opener, clock: FakeClock
) -> None:
    worker, cleaner = await opener(), await opener()
    old = [await finished_run(worker) for _ in range(20)]
    clock.advance(60)
    for i in range(30):
        await worker.create_run(NewRun("wf", str(i)))
    claimed = await worker.claim_runs(["wf"], 30, LEASE)
    results = await asyncio.gather(
        cleaner.purge_finished(timedelta(0), batch=4),
        *(worker.finish_run(c.lease, "completed", output="1") for c in claimed),
        cleaner.purge_finished(timedelta(0), batch=4),
    )
    purged = results[0] + results[-1]
    assert all(results[1:-1])
    assert purged == len(old)
    for c in claimed:  # finished at the cut-off, not before it
        record = await worker.get_run(c.run.id)
        assert record is not None
        assert record.status == "completed"


@pytest.mark.parametrize(("older_than", "batch"), [(timedelta(seconds=-1), 10), (timedelta(1), 0)])
async def test_purge_refuses_bad_arguments(
    opener: Opener, older_than: timedelta, batch: int
) -> None:
    store = await opener()
    with pytest.raises(ConfigError):
        await store.purge_finished(older_than, batch=batch)


async def test_purge_on_a_closed_storage_is_a_storage_error(opener: Opener) -> None:
    store = await opener()
    await store.close()
    with pytest.raises(StorageError):
        await store.purge_finished(timedelta(days=1))


# -- the version 2 migration -----------------------------------------------------------------


def make_v1_database(path: Path, now: int) -> None:
    """A database as reflow-sqlite wrote it at schema version 1: a completed
    run holding buffered events (one with an id) and a taken one, and a
    pending run holding a buffered event."""
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        raw.execute("PRAGMA user_version = 1")
        raw.executemany(
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at, wake_at)"
            " VALUES (?, 'wf', ?, '1', ?, ?, ?)",
            [("done", "completed", now, now + 5, None), ("open", "pending", now, now, now)],
        )
        raw.executemany(
            "INSERT INTO events (run_id, name, payload, event_id, created_at, taken_at)"
            " VALUES (?, 'e', ?, ?, ?, ?)",
            [
                ("done", '"taken"', None, now + 1, now + 2),
                ("done", '"left"', None, now + 3, None),
                ("done", '"left with id"', "x", now + 4, None),
                ("open", '"waiting for it"', None, now + 1, None),
            ],
        )
    finally:
        raw.close()


async def test_a_version_1_database_is_migrated_forward(
    opener: Opener, db_path: Path, clock: FakeClock
) -> None:
    assert SCHEMA_VERSION >= 2
    start = us(clock.now) - 10 * 86400 * 1_000_000
    make_v1_database(db_path, start)
    store = await opener()
    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    runs = rows(db_path, "SELECT id, finished_at FROM runs ORDER BY id")
    assert runs == [("done", start + 5), ("open", None)]
    events = rows(
        db_path, "SELECT run_id, payload, event_id, taken_at FROM events ORDER BY run_id, id"
    )
    assert events == [
        ("done", '"taken"', None, start + 2),
        ("done", "", "x", start + 4),
        ("open", '"waiting for it"', None, None),
    ]
    held = await claim_one(store)
    assert held.run.id == "open"
    taken = await store.take_event(held.lease, "w", "e")
    assert taken is not None
    assert taken.payload == '"waiting for it"'
    assert await store.purge_finished(timedelta(days=1)) == 1
    assert rows(db_path, "SELECT run_id FROM events") == [("open",)]
