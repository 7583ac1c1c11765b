"""Schema creation, migration and the refusals that must leave a file untouched."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from reflow_core.adapter import from_epoch_us, minute_of, to_epoch_us
from reflow_core.errors import SchemaVersionError, StorageError
from reflow_core.storage import (
    ConcurrencyLimit,
    FinishedMinute,
    Lease,
    NewRun,
    RateLimit,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    WorkerInfo,
)
from reflow_sqlite import SQLiteStorage
from reflow_sqlite import _schema as schema_module
from reflow_sqlite._queries import QUERIES, per_workflow, with_marks
from reflow_sqlite._schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from reflow_sqlite._scripts import Script

from .conftest import Opener, writes_index


def pragmas(path: Path) -> tuple[int, int, str]:
    raw = sqlite3.connect(path)
    try:
        app_id = raw.execute("PRAGMA application_id").fetchone()[0]
        version = raw.execute("PRAGMA user_version").fetchone()[0]
        mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
        return app_id, version, mode
    finally:
        raw.close()


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in the directory with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    """The rows of one statement, read on a connection of its own."""
    raw = sqlite3.connect(path)
    try:
        return raw.execute(sql).fetchall()
    finally:
        raw.close()


def schema_objects(path: Path) -> list[tuple[str, str, str, str]]:
    """Every object of the file's schema, with the statement that made it."""
    raw = sqlite3.connect(path)
    try:
        return raw.execute(
            "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master ORDER BY name"
        ).fetchall()
    finally:
        raw.close()


@contextmanager
def old_database(path: Path, version: int) -> Iterator[sqlite3.Connection]:
    """A file with the schema of an older version (its migrations applied and
    its marks set), open in autocommit mode for the test to write rows."""
    assert version < SCHEMA_VERSION
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        for migration in MIGRATIONS[:version]:
            for statement in migration:
                raw.execute(statement)
        raw.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        raw.execute(f"PRAGMA user_version = {version}")
        yield raw
    finally:
        raw.close()


def insert_runs(raw: sqlite3.Connection, columns: str, rows: list[tuple[object, ...]]) -> None:
    raw.executemany(f"INSERT INTO runs ({columns}) VALUES ({','.join('?' * len(rows[0]))})", rows)


def runs_root(raw: sqlite3.Connection) -> int:
    """The first page of the runs table: a rebuild moves it."""
    (root,) = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()
    return int(root)


async def migrate(opener: Opener, db_path: Path, processes: int = 1) -> SQLiteStorage:
    """Opens the old file with this version (with several processes
    initializing at once), checks it is marked as migrated and returns the
    first storage."""
    stores = [opener.build() for _ in range(processes)]
    await asyncio.gather(*(s.initialize() for s in stores))
    assert pragmas(db_path)[:2] == (APPLICATION_ID, SCHEMA_VERSION)
    return stores[0]


def assert_runs_kept(
    path: Path, columns: str, rows: list[tuple[object, ...]], root: int | None = None
) -> None:
    """Every run is as it was written (with root, in the same table: altered
    in place, not copied) and the file is sound."""
    if root is not None:
        assert query(path, "SELECT rootpage FROM sqlite_master WHERE name = 'runs'") == [(root,)]
    assert query(path, f"SELECT {columns} FROM runs ORDER BY created_at, id") == rows
    assert query(path, "PRAGMA integrity_check") == [("ok",)]


async def assert_schema_as_new(opener: Opener, db_path: Path, tmp_path: Path) -> None:
    """The same tables, indexes and trigger as a file created at this version."""
    await opener(tmp_path / "fresh.db")
    assert schema_objects(db_path) == schema_objects(tmp_path / "fresh.db")


async def migrate_rows_in_place(
    opener: Opener,
    db_path: Path,
    tmp_path: Path,
    version: int,
    columns: str,
    rows: list[tuple[object, ...]],
    unset: str,
) -> SQLiteStorage:
    """Writes ``rows`` to a file of ``version`` and migrates it, with several
    processes initializing at once: the runs are kept in the same table, none
    has a column of ``unset`` (a condition on the new columns) set, the
    schema is as new and a second initialize changes nothing. The first
    storage."""
    with old_database(db_path, version) as raw:
        insert_runs(raw, columns, rows)
        root = runs_root(raw)
    store = await migrate(opener, db_path, processes=4)
    assert_runs_kept(db_path, columns, rows, root)
    assert query(db_path, f"SELECT count(*) FROM runs WHERE {unset}") == [(0,)]
    await assert_schema_as_new(opener, db_path, tmp_path)
    before = schema_objects(db_path)
    await opener()
    assert schema_objects(db_path) == before
    return store


async def test_a_new_file_gets_the_marked_schema_in_wal_mode(opener, db_path) -> None:
    store = await opener()
    await store.initialize()  # idempotent
    await store.create_run(NewRun("wf", "{}"))
    await store.close()
    assert pragmas(db_path) == (APPLICATION_ID, SCHEMA_VERSION, "wal")
    reopened = await opener()
    assert len((await reopened.list_runs()).runs) == 1


async def test_several_processes_initializing_at_once_apply_the_schema_once(opener) -> None:
    stores = [opener.build() for _ in range(8)]
    await asyncio.gather(*(s.initialize() for s in stores))
    results = await asyncio.gather(*(s.create_run(NewRun("wf", "{}")) for s in stores))
    assert len({r.run.id for r in results}) == 8
    assert len((await stores[0].list_runs()).runs) == 8


async def test_the_synchronous_level_is_applied(opener, tmp_path) -> None:
    levels = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}
    for name, value in levels.items():
        store = await opener(tmp_path / f"{name}.db", synchronous=name.lower())
        assert store.synchronous == name

        def script(now: int) -> Script[int]:
            rows = yield ("PRAGMA synchronous", ())
            return int(rows[0][0])

        assert await store._call("test", script, "read") == value


async def test_garbage_file_is_refused_untouched(opener, tmp_path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(3000))
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="is not a SQLite database") as info:
        await opener(path)
    assert not isinstance(info.value, SchemaVersionError)
    assert info.value.operation == "initialize"
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert snapshot(tmp_path) == before


async def test_text_file_is_refused_untouched(opener, tmp_path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("SQLite format 3 is what this is not\n" * 50)
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="is not a SQLite database"):
        await opener(path)
    assert snapshot(tmp_path) == before


async def test_database_of_another_application_is_refused_untouched(opener, tmp_path) -> None:
    path = tmp_path / "other.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA application_id = 1234")
    raw.commit()
    raw.close()
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="not a Reflow database") as info:
        await opener(path)
    assert "0x000004d2" in str(info.value)
    assert snapshot(tmp_path) == before


async def test_unmarked_database_with_tables_is_refused_untouched(opener, tmp_path) -> None:
    path = tmp_path / "app.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    raw.execute("INSERT INTO users (name) VALUES ('ada')")
    raw.commit()
    raw.close()
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="not a Reflow database"):
        await opener(path)
    assert snapshot(tmp_path) == before


async def test_newer_schema_is_refused_untouched(opener, db_path, tmp_path) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    await store.close()
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    before = snapshot(tmp_path)
    with pytest.raises(SchemaVersionError, match="upgrade reflow-sqlite") as info:
        await opener()
    assert info.value.backend == "sqlite"
    assert snapshot(tmp_path) == before


async def test_an_older_schema_is_migrated_forward(opener, db_path, monkeypatch) -> None:
    store = await opener()
    run = (await store.create_run(NewRun("wf", '"kept"'))).run
    await store.close()
    extra = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"]
    monkeypatch.setattr(schema_module, "MIGRATIONS", (*schema_module.MIGRATIONS, extra))
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    upgraded = await opener()
    assert await upgraded.get_run(run.id) == run
    await upgraded.close()
    assert pragmas(db_path)[:2] == (APPLICATION_ID, SCHEMA_VERSION + 1)
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT count(*) FROM notes").fetchone() == (0,)
    raw.close()


async def test_missing_directory_is_a_storage_error(opener, tmp_path) -> None:
    with pytest.raises(StorageError) as info:
        await opener(tmp_path / "nope" / "x.db")
    assert isinstance(info.value.__cause__, sqlite3.Error)


# -- version 3: paused schedules, the worker registry, queue statistics -----------------


async def test_a_version_2_database_with_a_schedule_is_migrated_forward(
    opener, db_path, clock
) -> None:
    start = to_epoch_us(clock.now)
    with old_database(db_path, 2) as raw:
        raw.execute(
            "INSERT INTO schedules VALUES ('nightly', 'wf', '1', 'every:60', ?, ?, ?)",
            (start - 1, start - 100, start - 50),
        )
        raw.execute(
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at, wake_at)"
            " VALUES ('open', 'wf', 'pending', '1', ?, ?, ?)",
            (start - 10, start - 10, start - 10),
        )
    store = await migrate(opener, db_path)
    schedule = ScheduleRecord(
        key="nightly",
        workflow="wf",
        input="1",
        recurrence="every:60",
        next_run_at=clock.now - timedelta(microseconds=1),
        created_at=clock.now - timedelta(microseconds=100),
        updated_at=clock.now - timedelta(microseconds=50),
        paused=False,
    )
    assert await store.list_schedules() == [schedule]
    assert await store.due_schedules(10) == [schedule]
    # Re-registering keeps it running; pausing it takes it off the due list.
    spec = ScheduleSpec("nightly", "wf", "2", "every:60", clock.now)
    assert (await store.upsert_schedule(spec)).paused is False
    paused = await store.set_schedule_paused("nightly", True)
    assert paused is not None
    assert paused.paused
    assert await store.due_schedules(10) == []
    # The new tables and index serve the runs written before the migration.
    stats = await store.queue_stats()
    assert [(s.workflow, s.pending, s.oldest_pending_since) for s in stats] == [
        ("wf", 1, clock.now - timedelta(microseconds=10))
    ]
    worker = WorkerInfo("w", "host", 1, ("wf",), 2, 0)
    await store.announce_worker(worker, timedelta(seconds=10))
    assert [w.id for w in await store.list_workers()] == ["w"]


def test_queue_stats_reads_only_the_index_of_unfinished_runs(tmp_path) -> None:
    """Neither form of the stats query scans the runs table: both go through
    the partial index runs_unfinished, which holds unfinished runs only, so
    finished history costs nothing. The claim queries keep their own indexes."""
    path = tmp_path / "plan.db"
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        for migration in MIGRATIONS:
            for statement in migration:
                raw.execute(statement)
        # A long history and a few unfinished runs, with statistics gathered,
        # so the planner weighs real sizes.
        raw.executemany(
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at,"
            " wake_at, finished_at) VALUES (?, ?, ?, '1', 1, 1, ?, ?)",
            [
                (f"r{i}", f"wf{i % 7}", status, wake, finished)
                for i in range(5000)
                for status, wake, finished in [
                    ("completed", None, 1) if i % 100 else ("pending", i, None)
                ]
            ],
        )
        raw.execute("ANALYZE")

        def plan(sql: str, params: tuple[object, ...] = ()) -> list[str]:
            return [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", params)]

        for sql, params in [
            (QUERIES["queue_stats_all"], ()),
            (with_marks("queue_stats_of", "workflows", 2), ("wf1", "wf2")),
        ]:
            steps = plan(sql, params)
            on_runs = [step for step in steps if step.startswith(("SCAN runs", "SEARCH runs"))]
            assert on_runs, steps
            assert all("USING INDEX runs_unfinished" in step for step in on_runs), steps
        claims = [
            plan(per_workflow("claim_due", 1), ("wf1", 0, 5, "wf1", 0, 5, 5)),
            plan(with_marks("claim_lapsed", "workflows", 1), ("wf1", 0, 5)),
        ]
        # Pending runs in claim order from runs_pending, never sorted; due
        # timed runs from runs_due (test_claim_plans has the whole plans).
        pending, timed = (
            step for step in claims[0] if step.startswith(("SCAN runs", "SEARCH runs"))
        )
        assert pending == "SEARCH runs USING INDEX runs_pending (workflow=?)", claims[0]
        assert timed == "SEARCH runs USING INDEX runs_due (workflow=? AND wake_at<?)", claims[0]
        assert claims[1] == [
            "SEARCH runs USING INDEX runs_lease (workflow=? AND lease_expires_at<?)"
        ]
    finally:
        raw.close()


def test_only_creating_and_ending_a_run_write_the_stats_index() -> None:
    """The index of unfinished runs costs the hot path nothing: a claim, a
    step save (the lease extension), a sleep, a wait, a hand-back or a wake
    writes none of its columns, so SQLite does not even open it for them."""
    raw = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for migration in MIGRATIONS:
            for statement in migration:
                raw.execute(statement)

        def writes_the_index(sql: str) -> bool:
            return writes_index(raw, "runs_unfinished", sql)

        untouched = ["extend", "hand_back", "sleep", "wait", "wait_ready", "wake", "took_event"]
        assert not writes_the_index(with_marks("claim_update", "ids", 3))
        assert [name for name in untouched if writes_the_index(QUERIES[name])] == []
        written = ["insert_run", "finish", "end_fenced", "end_unfenced", "requeue"]
        assert all(writes_the_index(QUERIES[name]) for name in written)
    finally:
        raw.close()


# -- version 4: delayed runs -------------------------------------------------------------


# The columns of runs from version 1 to 4 (version 5 adds deadline_at).
RUN_COLUMNS = (
    "id, workflow, status, input, output, error, idempotency_key, attempts, reclaims,"
    " lease_epoch, created_at, updated_at, wake_at, waiting_for, lease_expires_at,"
    " finished_at"
)


async def test_a_version_3_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 4 rebuilds runs (a CHECK constraint cannot be altered): every
    row comes through unchanged, the indexes and the trigger are back as a new
    file has them, and delayed runs are stored, counted and claimed."""
    start = to_epoch_us(clock.now)
    rows = [
        ("due", "wf", "pending", "1", None, None, "key", 0, 0, 0, start - 9, start - 9,
         start - 9, None, None, None),
        ("held", "wf", "running", "2", None, None, None, 1, 0, 1, start - 8, start - 7,
         None, None, start + 60_000_000, None),
        ("lapsed", "wf", "running", "3", None, None, None, 2, 1, 2, start - 8, start - 7,
         None, None, start - 1, None),
        ("asleep", "wf", "sleeping", "4", None, None, None, 1, 0, 1, start - 6, start - 6,
         start - 2, None, None, None),
        ("parked", "wf", "waiting", "5", None, None, None, 1, 0, 1, start - 5, start - 5,
         None, "go", None, None),
        ("done", "wf", "completed", "6", '"ok"', None, None, 1, 0, 1, start - 4, start - 3,
         None, None, None, start - 3),
    ]  # fmt: skip
    with old_database(db_path, 3) as raw:
        insert_runs(raw, RUN_COLUMNS, rows)
        raw.execute(
            "INSERT INTO steps VALUES ('asleep', 'nap', 'sleeping', NULL, NULL, 1, ?, ?)",
            (start - 2, start - 6),
        )
        raw.execute(
            "INSERT INTO events (run_id, name, payload, event_id, created_at)"
            " VALUES ('parked', 'other', '7', NULL, ?)",
            (start - 5,),
        )
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            raw.execute(
                "INSERT INTO runs (id, workflow, status, input, created_at, updated_at)"
                " VALUES ('x', 'wf', 'delayed', '1', 1, 1)"
            )
    before = {(kind, name, table) for kind, name, table, _ in schema_objects(db_path)}
    store = await migrate(opener, db_path)
    after = {(kind, name, table) for kind, name, table, _ in schema_objects(db_path)}
    # Every index and the trigger made again, nothing left over; version 6
    # adds the index of child runs, version 7 those of priorities and
    # limits, version 8 that of debounced runs and the tables of rate limits,
    # version 10 that of runs by idempotency key, version 11 that of due
    # schedules by workflow.
    added = [
        "runs_children",
        "runs_pending",
        "runs_blocked",
        "runs_holding1",
        "runs_holding2",
        "runs_debounce",
        "runs_key",
    ]
    rate_tables = {
        ("table", "rate_claims", "rate_claims"),
        ("index", "rate_claims_key", "rate_claims"),
        ("table", "rate_waits", "rate_waits"),
        ("index", "rate_waits_at", "rate_waits"),
    }
    by_workflow = {("index", "schedules_workflow_due", "schedules")}
    assert after == before | {("index", name, "runs") for name in added} | rate_tables | by_workflow
    assert_runs_kept(db_path, RUN_COLUMNS, rows)
    await assert_schema_as_new(opener, db_path, tmp_path)

    # The rebuilt table keeps its idempotency keys and serves delayed runs.
    again = await store.create_run(NewRun("wf", "1", idempotency_key="key"))
    assert (again.created, again.run.id) == (False, "due")
    delayed = (await store.create_run(NewRun("wf", "8", delay=timedelta(seconds=1)))).run
    assert delayed.status == "delayed"
    stats = await store.queue_stats()
    assert [(s.delayed, s.pending, s.running, s.sleeping, s.waiting) for s in stats] == [
        (1, 1, 2, 1, 1)
    ]
    lease = timedelta(seconds=30)
    first = await store.claim_runs(["wf"], 10, lease)
    assert [(c.run.id, c.reclaimed) for c in first] == [
        ("lapsed", True),
        ("due", False),
        ("asleep", False),
    ]
    assert first[2].steps["nap"].status == "sleeping"
    clock.advance(1)
    assert [c.run.id for c in await store.claim_runs(["wf"], 10, lease)] == [delayed.id]
    # The trigger is back: ending a run drops its buffered events.
    assert await store.update_run_status("parked", "cancelled")
    assert query(db_path, "SELECT count(*) FROM events") == [(0,)]


# -- version 5: run deadlines ------------------------------------------------------------


async def test_a_version_4_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 5 adds runs.deadline_at in place (no rebuild): the rows written
    before it are unchanged and have no deadline, and new runs get one, which
    bounds when a delayed, sleeping or waiting run becomes claimable."""
    start = to_epoch_us(clock.now)
    rows = [
        ("due", "wf", "pending", "1", None, None, "key", 0, 0, 0, start - 9, start - 9,
         start - 9, None, None, None),
        ("later", "wf", "delayed", "2", None, None, None, 0, 0, 0, start - 8, start - 8,
         start + 60_000_000, None, None, None),
        ("parked", "wf", "waiting", "3", None, None, None, 1, 0, 1, start - 5, start - 5,
         None, "go", None, None),
        ("done", "wf", "failed", "4", None, '"no"', None, 1, 0, 1, start - 4, start - 3,
         None, None, None, start - 3),
    ]  # fmt: skip
    with old_database(db_path, 4) as raw:
        insert_runs(raw, RUN_COLUMNS, rows)
        root = runs_root(raw)
    store = await migrate(opener, db_path)
    # Altered in place: the same table (no copy), every row as it was.
    assert_runs_kept(db_path, RUN_COLUMNS, rows, root)
    assert query(db_path, "SELECT count(*) FROM runs WHERE deadline_at IS NOT NULL") == [(0,)]
    await assert_schema_as_new(opener, db_path, tmp_path)

    old = await store.get_run("later")
    assert old is not None
    assert (old.deadline_at, old.wake_at) == (None, clock.now + timedelta(seconds=60))
    # New runs: the deadline is stored, and a delayed run is due by it.
    bounded = (
        await store.create_run(
            NewRun("wf", "5", delay=timedelta(seconds=30), deadline=timedelta(seconds=10))
        )
    ).run
    assert bounded.status == "delayed"
    assert bounded.deadline_at == clock.now + timedelta(seconds=10)
    assert bounded.wake_at == bounded.deadline_at
    assert await store.get_run(bounded.id) == bounded
    # A sleep past the deadline: the step keeps its own wake_at, the run is due
    # at the deadline; a wait without a timeout is due at the deadline too.
    sleeper = (await store.create_run(NewRun("sleeper", "6", deadline=timedelta(seconds=20)))).run
    waiter = (await store.create_run(NewRun("waiter", "7", deadline=timedelta(seconds=25)))).run
    lease = timedelta(seconds=30)
    (claimed,) = await store.claim_runs(["sleeper"], 1, lease)
    wake = await store.sleep_run(claimed.lease, "nap", timedelta(minutes=5))
    assert wake == clock.now + timedelta(minutes=5)
    assert (await store.get_step_results(sleeper.id))["nap"].wake_at == wake
    slept = await store.get_run(sleeper.id)
    assert slept is not None
    assert (slept.status, slept.wake_at) == ("sleeping", sleeper.deadline_at)
    (claimed,) = await store.claim_runs(["waiter"], 1, lease)
    waited = await store.wait_run(claimed.lease, "hold", "go", None)
    assert waited is not None
    assert (waited.ready, waited.deadline) == (False, None)
    parked = await store.get_run(waiter.id)
    assert parked is not None
    assert (parked.status, parked.wake_at) == ("waiting", waiter.deadline_at)
    clock.advance(19)
    assert await store.claim_runs(["sleeper", "waiter"], 10, lease) == []
    clock.advance(1)
    assert [c.run.id for c in await store.claim_runs(["sleeper", "waiter"], 10, lease)] == [
        sleeper.id
    ]
    clock.advance(5)
    assert [c.run.id for c in await store.claim_runs(["sleeper", "waiter"], 10, lease)] == [
        waiter.id
    ]
    # A requeue clears the deadline.
    assert await store.update_run_status(waiter.id, "failed", error='"late"')
    assert await store.requeue_run(waiter.id)
    requeued = await store.get_run(waiter.id)
    assert requeued is not None
    assert (requeued.status, requeued.deadline_at) == ("pending", None)


# -- version 6: child runs ---------------------------------------------------------------


async def test_a_version_5_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 6 adds runs.parent_id and runs.parent_step in place (no
    rebuild) and the partial index of children: the rows written before it
    are unchanged and have no parent, stay readable and claimable, and can
    start, wait for and cancel children."""
    start = to_epoch_us(clock.now)
    columns = f"{RUN_COLUMNS}, deadline_at"
    rows = [
        ("due", "wf", "pending", "1", None, None, "key", 0, 0, 0, start - 9, start - 9,
         start - 9, None, None, None, start + 90_000_000),
        ("later", "wf", "delayed", "2", None, None, None, 0, 0, 0, start - 8, start - 8,
         start + 60_000_000, None, None, None, None),
        ("parked", "wf", "waiting", "3", None, None, None, 1, 0, 1, start - 5, start - 5,
         None, "go", None, None, None),
        ("done", "wf", "failed", "4", None, '"no"', None, 1, 0, 1, start - 4, start - 3,
         None, None, None, start - 3, None),
    ]  # fmt: skip
    with old_database(db_path, 5) as raw:
        insert_runs(raw, columns, rows)
        raw.execute(
            "INSERT INTO events (run_id, name, payload, event_id, created_at)"
            " VALUES ('parked', 'other', '7', NULL, ?)",
            (start - 5,),
        )
        root = runs_root(raw)
    # Several processes initializing at once migrate it once.
    store = await migrate(opener, db_path, processes=4)
    # Altered in place: the same table (no copy), every row as it was.
    assert_runs_kept(db_path, columns, rows, root)
    assert query(
        db_path, "SELECT count(*) FROM runs WHERE parent_id IS NOT NULL OR parent_step IS NOT NULL"
    ) == [(0,)]
    await assert_schema_as_new(opener, db_path, tmp_path)
    # A second initialize of the migrated file changes nothing.
    before = schema_objects(db_path)
    await opener()
    assert schema_objects(db_path) == before

    old = await store.get_run("due")
    assert old is not None
    assert (old.status, old.parent_id, old.parent_step) == ("pending", None, None)
    assert await store.list_children("due") == []
    # The run stored before the upgrade is claimed and starts children, whose
    # deadline is its own; one ends, the other is what it waits for.
    lease = timedelta(seconds=30)
    (claimed,) = await store.claim_runs(["wf"], 1, lease)
    assert claimed.run.id == "due"
    first = await store.start_child(claimed.lease, "fan", NewRun("kid", "5", run_id="due/1"))
    second = await store.start_child(claimed.lease, "fan", NewRun("kid", "6", run_id="due/2"))
    assert first is not None
    assert second is not None
    assert (first.parent_id, first.parent_step, first.deadline_at) == (
        "due",
        "fan",
        old.deadline_at,
    )
    assert await store.list_children("due") == [first, second]
    waited = await store.wait_children(claimed.lease, StepRecord("fan", "waiting", attempts=1))
    assert waited is False
    parked = await store.get_run("due")
    assert parked is not None
    assert (parked.status, parked.waiting_for) == ("waiting", "reflow:children:fan")
    kids = await store.claim_runs(["kid"], 2, lease)
    assert await store.finish_run(kids[0].lease, "completed", output='"a"')
    assert await store.claim_runs(["wf"], 10, lease) == []
    assert await store.update_run_status(kids[1].run.id, "failed", lease=kids[1].lease)
    (woken,) = await store.claim_runs(["wf"], 10, lease)
    assert (woken.run.id, woken.reclaimed) == ("due", False)
    # A cancel reaches the children of runs stored before the upgrade too.
    parked_child = await store.start_child(woken.lease, "more", NewRun("kid", "7", run_id="due/3"))
    assert parked_child is not None
    assert await store.update_run_status("due", "cancelled")
    cancelled = await store.get_run("due/3")
    assert cancelled is not None
    assert cancelled.status == "cancelled"
    # The trigger still drops a cancelled run's buffered events.
    assert await store.update_run_status("parked", "cancelled")
    assert query(db_path, "SELECT count(*) FROM events") == [(0,)]


def test_child_queries_use_the_index_of_children(tmp_path) -> None:
    """Finding a parent's open children at a step is one seek in the partial
    index runs_children, the cancel's walk and list_children go through it
    too; and no statement on the hot path of a run without a parent (a claim,
    a step save, a sleep, a wait, a hand-back, a wake) writes it."""
    raw = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for migration in MIGRATIONS:
            for statement in migration:
                raw.execute(statement)
        raw.executemany(
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at,"
            " parent_id, parent_step, finished_at) VALUES (?, 'wf', 'completed', '1', 1, 1,"
            " ?, ?, 1)",
            [(f"r{i}", f"r{i - 1}" if i % 10 == 0 else None, "s") for i in range(1, 3000)],
        )
        raw.execute("ANALYZE")

        def plan(name: str) -> list[str]:
            sql = QUERIES[name]
            return [
                row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", [None] * sql.count("?"))
            ]

        seek = (
            "SEARCH runs USING COVERING INDEX runs_children"
            " (parent_id=? AND parent_step=? AND finished_at=?)"
        )
        assert plan("open_child") == [seek]
        assert seek in plan("wake_parent")
        for name in ("cancel_below", "list_children"):
            on_children = [step for step in plan(name) if "runs_children" in step]
            assert on_children, plan(name)
            assert not [step for step in plan(name) if step.startswith("SCAN runs")], plan(name)

        def writes_the_index(sql: str) -> bool:
            return writes_index(raw, "runs_children", sql)

        untouched = [
            "extend",
            "hand_back",
            "sleep",
            "wait",
            "wait_ready",
            "wake",
            "took_event",
            "touch",
            "wait_for_children",
            "wake_parent",
        ]
        assert not writes_the_index(with_marks("claim_update", "ids", 3))
        assert [name for name in untouched if writes_the_index(QUERIES[name])] == []
    finally:
        raw.close()


# -- version 7: priorities and concurrency limits ----------------------------------------


async def test_a_version_6_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 7 adds runs.priority (0), the limit columns and blocked_by
    (NULL) in place (no rebuild), moves pending runs to an index of their
    own in claim order and adds the indexes of blocked runs and of limit
    holders: the rows written before it are unchanged, have priority 0, no
    limits and are not blocked, and are claimed, by due time, after runs of
    a higher priority and alongside runs held to limits."""
    start = to_epoch_us(clock.now)
    columns = f"{RUN_COLUMNS}, deadline_at, parent_id, parent_step"
    rows = [
        ("old-early", "wf", "pending", "1", None, None, "key", 0, 0, 0, start - 9, start - 9,
         start - 9, None, None, None, None, None, None),
        ("old-late", "wf", "pending", "2", None, None, None, 0, 0, 0, start - 8, start - 8,
         start - 8, None, None, None, None, None, None),
        ("old-sleeper", "wf", "sleeping", "3", None, None, None, 1, 0, 1, start - 7, start - 7,
         start - 1, None, None, None, None, None, None),
        ("old-later", "wf", "delayed", "4", None, None, None, 0, 0, 0, start - 6, start - 6,
         start + 60_000_000, None, None, None, None, None, None),
        ("old-done", "wf", "completed", "5", '"ok"', None, None, 1, 0, 1, start - 5, start - 4,
         None, None, None, start - 4, None, None, None),
    ]  # fmt: skip
    unset = (
        "priority <> 0 OR limit_key1 IS NOT NULL OR limit_max1 IS NOT NULL"
        " OR limit_key2 IS NOT NULL OR limit_max2 IS NOT NULL OR blocked_by IS NOT NULL"
    )
    store = await migrate_rows_in_place(opener, db_path, tmp_path, 6, columns, rows, unset)

    old = await store.get_run("old-early")
    assert old is not None
    assert (old.priority, old.limits, old.blocked_by) == (0, (), None)
    # A new run of a higher priority goes first, then the old runs by due
    # time, the due sleeper among them; two new runs share a limit of one.
    lease = timedelta(seconds=30)
    one = (ConcurrencyLimit("k", 1),)
    await store.create_run(NewRun("wf", "6", run_id="new-urgent", priority=5))
    await store.create_run(NewRun("wf", "7", run_id="new-1-held", priority=1, limits=one))
    await store.create_run(NewRun("wf", "8", run_id="new-2-blocked", priority=1, limits=one))
    claimed = await store.claim_runs(["wf"], 10, lease)
    assert [c.run.id for c in claimed] == [
        "new-urgent",
        "new-1-held",
        "old-early",
        "old-late",
        "old-sleeper",
    ]
    blocked = await store.get_run("new-2-blocked")
    assert blocked is not None
    assert (blocked.status, blocked.blocked_by) == ("pending", "k")
    # The end of the holder unblocks it, in the same write.
    held = next(c for c in claimed if c.run.id == "new-1-held")
    assert await store.finish_run(held.lease, "completed", output="1")
    (next_one,) = await store.claim_runs(["wf"], 10, lease)
    assert (next_one.run.id, next_one.run.blocked_by) == ("new-2-blocked", None)


# -- version 8: rate limits and debounce -------------------------------------------------


async def test_a_version_7_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 8 adds the rate columns and debounce_key (NULL) in place (no
    rebuild), the tables of rate claims and rate waits and the unique index
    of open debounced runs: the rows written before it are unchanged, have
    no rates and no debounce key, stay claimable (a blocked one stays
    blocked by its limit), and new runs hold rates and debounce keys."""
    start = to_epoch_us(clock.now)
    columns = (
        f"{RUN_COLUMNS}, deadline_at, parent_id, parent_step, priority, limit_key1,"
        " limit_max1, limit_key2, limit_max2, blocked_by"
    )
    rows = [
        ("old-due", "wf", "pending", "1", None, None, "key", 0, 0, 0, start - 9, start - 9,
         start - 9, None, None, None, None, None, None, 2, None, None, None, None, None),
        ("old-held", "wf", "running", "2", None, None, None, 1, 0, 1, start - 8, start - 8,
         None, None, start + 600_000_000, None, None, None, None, 0, "k", 1, None, None, None),
        ("old-blocked", "wf", "pending", "3", None, None, None, 0, 0, 0, start - 7, start - 7,
         start - 7, None, None, None, None, None, None, 0, "k", 1, None, None, "k"),
        ("old-later", "wf", "delayed", "4", None, None, None, 0, 0, 0, start - 6, start - 6,
         start + 600_000_000, None, None, None, None, None, None, 0, None, None, None, None,
         None),
        ("old-done", "wf", "completed", "5", '"ok"', None, None, 1, 0, 1, start - 5, start - 4,
         None, None, None, start - 4, None, None, None, 0, None, None, None, None, None),
    ]  # fmt: skip
    unset = (
        "rate_key1 IS NOT NULL OR rate_max1 IS NOT NULL OR rate_period1 IS NOT NULL"
        " OR rate_key2 IS NOT NULL OR rate_max2 IS NOT NULL OR rate_period2 IS NOT NULL"
        " OR debounce_key IS NOT NULL"
    )
    store = await migrate_rows_in_place(opener, db_path, tmp_path, 7, columns, rows, unset)
    assert query(db_path, "SELECT count(*) FROM rate_claims") == [(0,)]
    assert query(db_path, "SELECT count(*) FROM rate_waits") == [(0,)]

    for run_id in ("old-due", "old-held", "old-blocked", "old-later", "old-done"):
        old = await store.get_run(run_id)
        assert old is not None
        assert (old.rates, old.debounce_key) == ((), None)
    # New runs: a rate of two a minute shared by three, and a debounced run
    # whose second create replaces its input.
    lease = timedelta(minutes=5)
    two = (RateLimit("r", 2, timedelta(minutes=1)),)
    for i in range(3):
        await store.create_run(NewRun("wf", str(10 + i), run_id=f"new-{i}", rates=two))
    first = await store.create_run(NewRun("wf", "20", debounce_key="d", priority=-1))
    again = await store.create_run(NewRun("wf", "21", debounce_key="d", priority=-1))
    assert first.created
    assert (again.created, again.run.id, again.run.input) == (False, first.run.id, "21")
    claimed = await store.claim_runs(["wf"], 10, lease)
    assert [c.run.id for c in claimed] == ["old-due", "new-0", "new-1", first.run.id]
    held_back = await store.get_run("new-2")
    assert held_back is not None
    assert (held_back.blocked_by, held_back.rates) == ("reflow:rate:r", two)
    still = await store.get_run("old-blocked")
    assert still is not None
    assert still.blocked_by == "k"
    # The window has room a minute after the first claims: new-2 goes then.
    clock.advance(59)
    assert await store.claim_runs(["wf"], 10, lease) == []
    clock.advance(1)
    assert [c.run.id for c in await store.claim_runs(["wf"], 10, lease)] == ["new-2"]
    # The end of the old holder still unblocks the run its limit blocked.
    assert await store.finish_run(Lease("old-held", 1), "completed", output="1")
    assert [c.run.id for c in await store.claim_runs(["wf"], 10, lease)] == ["old-blocked"]


# -- version 9: propagation headers ------------------------------------------------------


async def test_a_version_8_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 9 adds runs.headers (NULL) in place (no rebuild): the rows
    written before it are unchanged and carry no headers, and new runs keep
    theirs, as created, as a debounced create replaces them, and as a child
    or a schedule's slot starts them."""
    start = to_epoch_us(clock.now)
    columns = (
        f"{RUN_COLUMNS}, deadline_at, parent_id, parent_step, priority, limit_key1,"
        " limit_max1, limit_key2, limit_max2, blocked_by, rate_key1, rate_max1, rate_period1,"
        " rate_key2, rate_max2, rate_period2, debounce_key"
    )
    rows = [
        ("old-due", "wf", "pending", "1", None, None, "key", 0, 0, 0, start - 9, start - 9,
         start - 9, None, None, None, None, None, None, 0, None, None, None, None, None,
         None, None, None, None, None, None, None),
        ("old-open", "wf", "pending", "2", None, None, None, 0, 0, 0, start - 8, start - 8,
         start - 8, None, None, None, None, None, None, 0, None, None, None, None, None,
         None, None, None, None, None, None, "d"),
        ("old-done", "wf", "completed", "3", '"ok"', None, None, 1, 0, 1, start - 5, start - 4,
         None, None, None, start - 4, None, None, None, 0, None, None, None, None, None,
         None, None, None, None, None, None, None),
    ]  # fmt: skip
    store = await migrate_rows_in_place(
        opener, db_path, tmp_path, 8, columns, rows, "headers IS NOT NULL"
    )

    for run_id in ("old-due", "old-open", "old-done"):
        old = await store.get_run(run_id)
        assert old is not None
        assert old.headers == {}
    # A debounced create replaces the old open run's headers.
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    again = await store.create_run(NewRun("wf", "4", debounce_key="d", headers=trace))
    assert (again.created, again.run.id, again.run.headers) == (False, "old-open", trace)
    # New runs keep theirs, stored as one JSON object with sorted names.
    both = {"tracestate": "k=v", **trace}
    new = (await store.create_run(NewRun("wf", "5", run_id="new", headers=both))).run
    assert new.headers == both
    assert query(db_path, "SELECT headers FROM runs WHERE id = 'new'") == [
        ('{"traceparent":"' + trace["traceparent"] + '","tracestate":"k=v"}',)
    ]
    bare = (await store.create_run(NewRun("wf", "6", run_id="bare"))).run
    assert bare.headers == {}
    assert query(db_path, "SELECT headers FROM runs WHERE id = 'bare'") == [(None,)]
    claims = await store.claim_runs(["wf"], 10, timedelta(minutes=1))
    (claimed,) = [c for c in claims if c.run.id == "new"]
    assert claimed.run.headers == both
    child = await store.start_child(
        claimed.lease, "spawn", NewRun("wf", "7", run_id="new-child", headers=trace)
    )
    assert child is not None
    assert child.headers == trace
    assert [c.headers for c in await store.list_children("new")] == [trace]
    slot = clock.now
    await store.upsert_schedule(ScheduleSpec("every", "wf", "8", "every:3600", slot))
    fired = await store.claim_schedule_slot(
        "every", slot, slot + timedelta(hours=1), NewRun("wf", "8", headers=trace)
    )
    assert fired is not None
    assert fired.headers == trace
    listed = {run.id: run.headers for run in (await store.list_runs()).runs}
    assert listed["old-done"] == {}
    assert listed["new"] == both


# -- version 10: the reads of a dashboard ------------------------------------------------


async def test_a_version_9_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 10 adds only the index of runs by idempotency key: the rows
    written before it are unchanged, and the runs, events and finishes
    stored before the upgrade are found by the dashboard's reads."""
    start = to_epoch_us(clock.now)
    columns = f"{RUN_COLUMNS}, deadline_at, parent_id, parent_step, priority, headers"
    rows = [
        ("old-a", "a", "completed", "1", '"ok"', None, "key", 1, 0, 1, start - 90_000_000,
         start - 70_000_000, None, None, None, start - 70_000_000, None, None, None, 0, None),
        ("old-b", "b", "waiting", "2", None, None, "key", 1, 0, 1, start - 80_000_000,
         start - 80_000_000, None, "go", None, None, None, None, None, 0, None),
        ("old-c", "c", "failed", "3", None, '"no"', "other", 1, 0, 1, start - 60_000_000,
         start - 5, None, None, None, start - 5, None, None, None, 0, None),
    ]  # fmt: skip
    with old_database(db_path, 9) as raw:
        insert_runs(raw, columns, rows)
        raw.executemany(
            "INSERT INTO events (run_id, name, payload, event_id, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [("old-b", "go", '"1"', "x", start - 3), ("old-b", "other", '"2"', None, start - 2)],
        )
        root = runs_root(raw)
    store = await migrate(opener, db_path, processes=4)
    assert_runs_kept(db_path, columns, rows, root)
    await assert_schema_as_new(opener, db_path, tmp_path)
    before = schema_objects(db_path)
    await opener()
    assert schema_objects(db_path) == before

    assert [r.id for r in await store.find_runs_by_key("key")] == ["old-b", "old-a"]
    assert [r.id for r in await store.find_runs_by_key("other")] == ["old-c"]
    events = await store.list_buffered_events("old-b")
    assert [(e.event, e.payload, e.event_id) for e in events] == [
        ("go", '"1"', "x"),
        ("other", '"2"', None),
    ]
    # The clock stands at a whole minute: old-a completed 70 s before it,
    # old-c failed a few microseconds before it.
    assert await store.finished_history(3) == [
        FinishedMinute(minute_of(from_epoch_us(start - 70_000_000)), 1, 0, 0),
        FinishedMinute(minute_of(from_epoch_us(start - 5)), 0, 1, 0),
    ]
    assert await store.finished_history(1) == []
    # A new run with a key of an old one is found with it, newest first.
    clock.advance(1)
    new = (await store.create_run(NewRun("d", "4", idempotency_key="key"))).run
    assert [r.id for r in await store.find_runs_by_key("key")] == [new.id, "old-b", "old-a"]


# -- version 11: claims per workflow -----------------------------------------------------


async def test_a_version_10_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 11 makes the claim indexes again, keyed by workflow, and adds
    the index of due schedules by workflow: the rows written before it are
    unchanged, in the same table, and the runs and schedules stored before
    the upgrade are claimed and found in the same order as before."""
    start = to_epoch_us(clock.now)
    columns = (
        f"{RUN_COLUMNS}, deadline_at, parent_id, parent_step, priority, limit_key1,"
        " limit_max1, blocked_by"
    )

    def run(
        run_id: str,
        workflow: str,
        status: str,
        wake: int | None = None,
        lease: int | None = None,
        priority: int = 0,
        key: str | None = None,
        blocked: str | None = None,
    ) -> tuple[object, ...]:
        attempts = 0 if status == "pending" else 1
        return (run_id, workflow, status, "1", None, None, None, attempts, 0, attempts,
                start - 100, start - 100, wake, None, lease, None, None, None, None, priority,
                key, None if key is None else 1, blocked)  # fmt: skip

    rows = sorted(
        [
            run("a-early", "a", "pending", start - 50),
            run("a-high", "a", "pending", start - 10, priority=3),
            run("a-late", "a", "pending", start - 5),
            run("a-asleep", "a", "sleeping", start - 20, priority=1),
            run("a-future", "a", "sleeping", start + 60_000_000, priority=9),
            run("a-lapsed", "a", "running", lease=start - 1),
            run("a-live", "a", "running", lease=start + 60_000_000),
            run("a-held", "a", "running", lease=start + 60_000_000, key="k"),
            run("a-blocked", "a", "pending", start - 90, priority=9, key="k", blocked="k"),
            run("b-old", "b", "pending", start - 99, priority=9),
            run("b-lapsed", "b", "running", lease=start - 99),
        ]
    )
    with old_database(db_path, 10) as raw:
        insert_runs(raw, columns, rows)
        raw.executemany(
            "INSERT INTO schedules (key, workflow, input, recurrence, next_run_at, created_at,"
            " updated_at, paused) VALUES (?, ?, '1', 'every:60', ?, 1, 1, ?)",
            [
                ("a-due", "a", start - 5, 0),
                ("a-first", "a", start - 9, 0),
                ("a-paused", "a", start - 99, 1),
                ("a-later", "a", start + 1, 0),
                ("b-due", "b", start - 99, 0),
            ],
        )
        root = runs_root(raw)
    store = await migrate(opener, db_path, processes=4)
    assert_runs_kept(db_path, columns, rows, root)
    await assert_schema_as_new(opener, db_path, tmp_path)
    before = schema_objects(db_path)
    await opener()
    assert schema_objects(db_path) == before
    indexes = dict(
        query(
            db_path, "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
    )
    for name in ("runs_pending", "runs_due", "runs_lease", "schedules_workflow_due"):
        assert "(workflow," in str(indexes[name]), indexes[name]

    # Only a's due schedules, earliest first; every workflow's without workflows.
    assert [s.key for s in await store.due_schedules(10, ["a"])] == ["a-first", "a-due"]
    assert [s.key for s in await store.due_schedules(1, ["a", "c"])] == ["a-first"]
    assert await store.due_schedules(10, []) == []
    assert [s.key for s in await store.due_schedules(10)] == ["b-due", "a-first", "a-due"]
    # A claim of a: the lapsed lease first, then by priority and due time;
    # never b's runs, nor the blocked, live or future ones.
    claims = await store.claim_runs(["a"], 10, timedelta(minutes=1))
    assert [(c.run.id, c.reclaimed) for c in claims] == [
        ("a-lapsed", True),
        ("a-high", False),
        ("a-asleep", False),
        ("a-early", False),
        ("a-late", False),
    ]
    assert await store.claim_runs(["a"], 10, timedelta(minutes=1)) == []
    # The blocked run is released by its key's holder stopping, and claimed.
    assert await store.update_run_status("a-held", "cancelled")
    (released,) = await store.claim_runs(["a", "c"], 10, timedelta(minutes=1))
    assert released.run.id == "a-blocked"
    assert [c.run.id for c in await store.claim_runs(["b"], 10, timedelta(minutes=1))] == [
        "b-lapsed",
        "b-old",
    ]


# -- version 12: workflow versions -------------------------------------------------------


async def test_a_version_11_database_with_runs_is_migrated_forward(
    opener, db_path, tmp_path, clock
) -> None:
    """Version 12 adds runs.version (1) and runs.fingerprint (NULL) in place
    (no rebuild): the rows written before it are unchanged and read as
    version 1 with no fingerprint, a claim serving version 1 takes them and
    one serving another version leaves them, lapsed lease included; new runs
    keep theirs however they are created, and a debounced create replaces
    an old open run's."""
    start = to_epoch_us(clock.now)
    columns = f"{RUN_COLUMNS}, deadline_at, parent_id, parent_step, priority, debounce_key"
    rows = [
        ("old-due", "wf", "pending", "1", None, None, "key", 0, 0, 0, start - 9, start - 9,
         start - 9, None, None, None, None, None, None, 0, None),
        ("old-lapsed", "wf", "running", "2", None, None, None, 1, 0, 1, start - 8, start - 8,
         None, None, start - 1, None, None, None, None, 0, None),
        ("old-open", "wf", "pending", "3", None, None, None, 0, 0, 0, start - 7, start - 7,
         start - 7, None, None, None, None, None, None, 0, "d"),
        ("old-done", "wf", "completed", "4", '"ok"', None, None, 1, 0, 1, start - 5, start - 4,
         None, None, None, start - 4, None, None, None, 0, None),
    ]  # fmt: skip
    store = await migrate_rows_in_place(
        opener, db_path, tmp_path, 11, columns, rows, "version <> 1 OR fingerprint IS NOT NULL"
    )
    assert query(db_path, "SELECT DISTINCT version, fingerprint FROM runs") == [(1, None)]
    for run_id in ("old-due", "old-lapsed", "old-open", "old-done"):
        old = await store.get_run(run_id)
        assert old is not None
        assert (old.version, old.fingerprint) == (1, None)

    lease = timedelta(minutes=1)
    # A claim of version 2 only leaves the old runs, lapsed lease included.
    assert await store.claim_runs(["wf"], 10, lease, versions={"wf": [2]}) == []
    assert_runs_kept(db_path, columns, rows)
    # New runs keep their version and fingerprint, one by one and in a batch.
    made = await store.create_run(NewRun("wf", "5", run_id="new", version=2, fingerprint="a1"))
    assert (made.run.version, made.run.fingerprint) == (2, "a1")
    batch = await store.create_runs(
        [
            NewRun("wf", "6", run_id="batch-1", version=3, fingerprint="b3"),
            NewRun("wf", "7", run_id="batch-2"),
        ]
    )
    assert [(o.run.version, o.run.fingerprint) for o in batch if not isinstance(o, Exception)] == [
        (3, "b3"),
        (1, None),
    ]
    # A debounced create gives the old open run its version and fingerprint.
    again = await store.create_run(NewRun("wf", "8", debounce_key="d", version=2, fingerprint="c"))
    assert (again.created, again.run.id) == (False, "old-open")
    assert (again.run.version, again.run.fingerprint) == (2, "c")
    assert query(
        db_path, "SELECT id, version, fingerprint FROM runs WHERE version <> 1 ORDER BY id"
    ) == [("batch-1", 3, "b3"), ("new", 2, "a1"), ("old-open", 2, "c")]
    # Version 2 takes its own two runs only (due now, the debounced one
    # again: by id); version 1 the old ones, lapsed first.
    claimed = await store.claim_runs(["wf"], 10, lease, versions={"wf": [2]})
    assert [c.run.id for c in claimed] == ["new", "old-open"]
    parent = claimed[0]
    child = await store.start_child(
        parent.lease, "spawn", NewRun("kids", "9", run_id="kid", version=5, fingerprint="k5")
    )
    assert child is not None
    assert (child.version, child.fingerprint) == (5, "k5")
    assert [(c.version, c.fingerprint) for c in await store.list_children("new")] == [(5, "k5")]
    claimed = await store.claim_runs(["wf", "kids"], 10, lease, versions={"wf": [1]})
    assert [(c.run.id, c.reclaimed) for c in claimed] == [
        ("old-lapsed", True),
        ("old-due", False),
        ("batch-2", False),
        ("kid", False),
    ]
    assert [c.run.id for c in await store.claim_runs(["wf"], 10, lease)] == ["batch-1"]


async def test_many_storages_opening_a_new_file_at_once_all_open_it(
    opener: Opener, tmp_path: Path
) -> None:
    """Switching a new file to WAL takes a lock SQLite does not wait for:
    storages initializing it at once try again instead of failing, and one
    closed while another's initialize is still running waits for it."""
    for round_ in range(10):
        path = tmp_path / f"fresh-{round_}.db"
        stores = [opener.build(path) for _ in range(8)]
        await asyncio.gather(*(store.initialize() for store in stores))
        assert pragmas(path)[:2] == (APPLICATION_ID, SCHEMA_VERSION)
        late = opener.build(path)
        opening = asyncio.ensure_future(late.initialize())
        await asyncio.sleep(0)
        await late.close()  # waits for the initialize, then closes
        await opening
        await asyncio.gather(*(store.close() for store in stores))
        assert query(path, "PRAGMA journal_mode") == [("wal",)]
