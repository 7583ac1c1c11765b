"""The schema: created and migrated by initialize(), refused when it is not ours."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from reflow_core import SchemaVersionError, StorageError, open_storage
from reflow_core.storage import (
    RATE_BLOCK_PREFIX,
    ConcurrencyLimit,
    NewRun,
    RateLimit,
    ScheduleSpec,
    StepRecord,
)
from reflow_postgres import PostgresStorage
from reflow_postgres import _schema as schema_module
from reflow_postgres._schema import SCHEMA_VERSION

Admin = psycopg.Connection[tuple[object, ...]]


def tables(admin: Admin, schema: str) -> set[str]:
    rows = admin.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
    ).fetchall()
    return {str(row[0]) for row in rows}


def assert_every_version_recorded(admin: Admin, schema: str) -> None:
    """The schema records one row per migration, 1 to SCHEMA_VERSION."""
    versions = admin.execute(
        sql.SQL("SELECT version FROM {}.reflow_schema ORDER BY version").format(
            sql.Identifier(schema)
        )
    ).fetchall()
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # one row per migration


def runs_file(admin: Admin, schema: str) -> tuple[object, ...] | None:
    """The file that holds the runs table: rewriting the table gives it a new one."""
    return admin.execute(
        "SELECT c.relfilenode FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = 'runs'",
        (schema,),
    ).fetchone()


async def initialize_old_schema(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """Creates the schema as the given older version of the backend did."""
    assert version < SCHEMA_VERSION
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", version)
    old = PostgresStorage.from_url(postgres_url)
    await old.initialize()
    await old.close()


@asynccontextmanager
async def migrated(
    postgres_url: str,
    schema: str,
    admin: Admin,
    monkeypatch: pytest.MonkeyPatch,
    *,
    in_place: bool = True,
) -> AsyncIterator[list[PostgresStorage]]:
    """Four workers starting together on the old schema migrate it once to
    SCHEMA_VERSION (with in_place, without rewriting the runs table); yields
    their stores and closes them after."""
    file_before = runs_file(admin, schema) if in_place else None
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", SCHEMA_VERSION)
    stores = [PostgresStorage.from_url(postgres_url) for _ in range(4)]
    await asyncio.gather(*(s.initialize() for s in stores))
    try:
        assert_every_version_recorded(admin, schema)
        if in_place:
            assert runs_file(admin, schema) == file_before  # not rewritten
        yield stores
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_initialize_creates_the_versioned_schema(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    store = open_storage(postgres_url)
    await store.initialize()
    await store.initialize()  # idempotent
    await store.close()
    assert tables(admin, schema) == {
        "runs",
        "steps",
        "events",
        "schedules",
        "workers",
        "rate_claims",
        "rate_waits",
        "reflow_schema",
    }
    assert_every_version_recorded(admin, schema)


async def test_many_workers_starting_at_once_migrate_once(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    stores = [open_storage(postgres_url) for _ in range(8)]
    await asyncio.gather(*(s.initialize() for s in stores))
    run = await stores[0].create_run(NewRun("wf", '"x"'))
    assert (await stores[7].get_run(run.run.id)) == run.run
    await asyncio.gather(*(s.close() for s in stores))
    assert_every_version_recorded(admin, schema)


async def test_a_newer_schema_is_refused_and_left_alone(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    store = open_storage(postgres_url)
    await store.initialize()
    await store.close()
    admin.execute(
        sql.SQL("INSERT INTO {}.reflow_schema (version) VALUES (%s)").format(
            sql.Identifier(schema)
        ),
        (SCHEMA_VERSION + 1,),
    )
    before = tables(admin, schema)
    newer = open_storage(postgres_url)
    with pytest.raises(SchemaVersionError, match="newer") as caught:
        await newer.initialize()
    await newer.close()
    assert caught.value.operation == "initialize"
    assert tables(admin, schema) == before


async def test_a_schema_holding_other_tables_is_refused_untouched(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    ident = sql.Identifier(schema)
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
    admin.execute(sql.SQL("CREATE TABLE {}.invoices (id int)").format(ident))
    store = open_storage(postgres_url)
    with pytest.raises(StorageError, match="not Reflow's"):
        await store.initialize()
    await store.close()
    assert tables(admin, schema) == {"invoices"}


async def test_an_existing_empty_schema_is_used(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    store = open_storage(postgres_url)
    await store.initialize()
    await store.close()
    assert "runs" in tables(admin, schema)


def _plan_nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    nodes = [plan]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        nodes.extend(_plan_nodes(child))
    return nodes


async def test_the_claim_never_scans_finished_history(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """With many finished runs and a few runnable ones (and delayed ones not
    yet due), the claim reads the partial indexes only: its cost does not
    grow with history."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at)"
            " SELECT 'done' || i, 'wf', 'completed', '1', now(), now()"
            " FROM generate_series(1, 50000) AS i"
        ).format(ident)
    )
    for _ in range(5):
        await store.create_run(NewRun("wf", "1"))
        await store.create_run(NewRun("wf", "1", delay=timedelta(hours=1)))
    admin.execute(sql.SQL("ANALYZE {}.runs").format(ident))
    statement = store._sql["claim"].decode()
    params = {
        "workflows": ["wf"],
        "limit": 10,
        "lease": timedelta(seconds=30),
        "probe": True,
        "skip": [],
    }
    with admin.transaction(force_rollback=True):  # EXPLAIN ANALYZE really claims
        row = admin.execute(
            ("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement).encode(), params
        ).fetchone()
        assert row is not None
        plan = row[0] if isinstance(row[0], list) else json.loads(str(row[0]))
        nodes = _plan_nodes(plan[0]["Plan"])
        scans = {
            (n.get("Node Type"), n.get("Index Name"))
            for n in nodes
            if n.get("Relation Name") == "runs"
        }
    await store.close()
    assert ("Seq Scan", None) not in scans, scans
    used = {index for _, index in scans}
    assert "runs_due" in used
    assert "runs_running" in used
    # The claim read only a handful of pages, not the 50k finished runs.
    top = plan[0]["Plan"]
    assert top["Shared Hit Blocks"] + top.get("Shared Read Blocks", 0) < 200


async def test_queue_stats_never_scan_finished_history(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """With many finished runs and a few unfinished ones, queue_stats reads
    the partial indexes that hold the unfinished runs only (runs_ready,
    runs_due, runs_blocked and runs_running), with and without a list of
    workflows. Delayed runs are among them: stored as sleeping before their
    first attempt, they sit in runs_due."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at,"
            " finished_at) SELECT 'done' || i, 'wf' || (i % 3),"
            " (ARRAY['completed', 'failed', 'cancelled'])[1 + i % 3], '1', now(), now(), now()"
            " FROM generate_series(1, 50000) AS i"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at, wake_at,"
            " lease_expires_at, attempts) SELECT 'open' || i, 'wf' || (i % 3),"
            " (ARRAY['pending', 'running', 'sleeping', 'waiting'])[1 + i % 4], '1', now(), now(),"
            " CASE WHEN i % 4 <> 1 THEN now() END, CASE WHEN i % 4 = 1 THEN now() END,"
            " CASE WHEN i % 4 = 0 THEN 0 ELSE 1 END"
            " FROM generate_series(1, 24) AS i"
        ).format(ident)
    )
    for i in range(5):
        await store.create_run(NewRun(f"wf{i % 3}", "1", delay=timedelta(minutes=i + 1)))
    admin.execute(sql.SQL("ANALYZE {}.runs").format(ident))
    try:
        for name, params in (
            ("queue_stats", {}),
            ("queue_stats_of", {"workflows": ["wf0", "wf1"]}),
        ):
            row = admin.execute(
                ("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + store._sql[name].decode()).encode(),
                params,
            ).fetchone()
            assert row is not None
            plan = row[0] if isinstance(row[0], list) else json.loads(str(row[0]))
            nodes = _plan_nodes(plan[0]["Plan"])
            scans = [n.get("Node Type") for n in nodes if n.get("Relation Name") == "runs"]
            assert scans, name
            assert "Seq Scan" not in scans, (name, scans)
            used = {n.get("Index Name") for n in nodes if n.get("Index Name")}
            assert used == {"runs_ready", "runs_due", "runs_blocked", "runs_running"}, (name, used)
            top = plan[0]["Plan"]
            assert top["Shared Hit Blocks"] + top.get("Shared Read Blocks", 0) < 100, name
        stats = {s.workflow: s for s in await store.queue_stats()}
        assert sorted(stats) == ["wf0", "wf1", "wf2"]
        assert sum(s.pending + s.running + s.sleeping + s.waiting for s in stats.values()) == 24
        assert [stats[w].delayed for w in ("wf0", "wf1", "wf2")] == [2, 2, 1]
        assert all(s.sleeping == 2 for s in stats.values())
    finally:
        await store.close()


async def test_a_version_2_schema_with_a_schedule_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 3 adds schedules.paused, the workers table and a schedules_due
    index that leaves paused schedules out: a schedule stored before keeps
    everything it had, is not paused, and is still due; workers starting
    together migrate once. Delayed runs need no migration of their own: on
    the migrated schema (whose runs table, status check and runs_due are
    those of version 1) they are created, counted, listed and claimed when
    due, next to runs stored before."""
    await initialize_old_schema(postgres_url, monkeypatch, 2)
    ident = sql.Identifier(schema)
    assert "workers" not in tables(admin, schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at, wake_at)"
            " VALUES ('old-pending', 'wf', 'pending', '1', now() - interval '1 hour',"
            " now() - interval '1 hour', now() - interval '1 hour')"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.schedules (key, workflow, input, recurrence, next_run_at,"
            " created_at, updated_at) VALUES ('nightly', 'wf', '\"in\"', 'every:60',"
            " now() - interval '1 minute', now() - interval '1 day', now() - interval '1 hour')"
        ).format(ident)
    )
    before = admin.execute(
        sql.SQL(
            "SELECT key, workflow, input, recurrence, next_run_at, created_at, updated_at"
            " FROM {}.schedules"
        ).format(ident)
    ).fetchall()
    async with migrated(postgres_url, schema, admin, monkeypatch, in_place=False) as stores:
        store = stores[0]
        assert "workers" in tables(admin, schema)
        [kept] = await store.list_schedules()
        assert not kept.paused
        row = before[0]
        assert (kept.key, kept.workflow, kept.input, kept.recurrence) == row[:4]
        assert (kept.next_run_at, kept.created_at, kept.updated_at) == row[4:]
        assert await store.due_schedules(10) == [kept]
        paused = await store.set_schedule_paused("nightly", True)
        assert paused is not None
        assert paused.paused
        assert await store.due_schedules(10) == []
        spec = ScheduleSpec("nightly", "wf", '"in"', "every:60", kept.next_run_at)
        assert (await store.upsert_schedule(spec)).paused

        late = await stores[1].create_run(NewRun("wf", "2", delay=timedelta(milliseconds=300)))
        assert late.run.status == "delayed"
        before_v3 = await store.get_run("old-pending")
        assert before_v3 is not None
        assert before_v3.status == "pending"
        [stats] = await store.queue_stats(["wf"])
        assert (stats.pending, stats.delayed, stats.sleeping) == (1, 1, 0)
        listed = await store.list_runs(status=["delayed"])
        assert [r.id for r in listed.runs] == [late.run.id]
        [first] = await store.claim_runs(["wf"], 10, timedelta(seconds=30))
        assert first.run.id == "old-pending"
        await asyncio.sleep(0.35)
        [second] = await stores[2].claim_runs(["wf"], 10, timedelta(seconds=30))
        assert second.run.id == late.run.id
        assert (second.run.status, second.reclaimed) == ("running", False)


async def test_renewing_a_lease_is_a_hot_update(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """Heartbeats and step saves touch only unindexed columns of the run, so
    PostgreSQL updates the row in place (HOT) and writes no index entries.
    The backend's own statements run here in one transaction, whose counters
    PostgreSQL reports at once."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    await store.create_run(NewRun("wf", "1"))
    [claimed] = await store.claim_runs(["wf"], 1, timedelta(seconds=30))
    await store.close()
    lease = {"id": claimed.run.id, "epoch": claimed.lease.epoch, "extend": timedelta(seconds=30)}
    counters = (
        "SELECT pg_stat_get_xact_tuples_updated(c.oid), pg_stat_get_xact_tuples_hot_updated(c.oid)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = 'runs'"
    )
    with admin.transaction(force_rollback=True):
        for i in range(20):
            cur = admin.execute(store._sql["heartbeat"], lease)
            assert cur.rowcount == 1
            step = {
                "name": f"s{i}",
                "step_status": "completed",
                "step_output": "1",
                "step_error": None,
                "step_attempts": 1,
                "step_wake_at": None,
            }
            cur = admin.execute(store._sql["save_step"], {**lease, **step})
            assert cur.rowcount == 1
        row = admin.execute(counters, (schema,)).fetchone()
    assert row == (40, 40)


async def test_a_version_3_schema_with_runs_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 4 adds runs.deadline_at: nullable, with no default, so the
    table is not rewritten (its file stays the same) and every run stored
    before has no deadline and keeps its status and due time; workers
    starting together migrate once. New runs then get their deadline, and a
    delayed run whose deadline comes first is due at it."""
    await initialize_old_schema(postgres_url, monkeypatch, 3)
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, waiting_for,"
            " created_at, updated_at, wake_at) VALUES"
            " ('old-pending', 'wf', 'pending', '1', 0, NULL, now(), now(),"
            "  now() - interval '1 hour'),"
            " ('old-waiting', 'wf', 'waiting', '1', 1, 'go', now(), now(), NULL),"
            " ('old-sleeping', 'wf', 'sleeping', '1', 1, NULL, now(), now(),"
            "  now() + interval '1 hour'),"
            " ('old-delayed', 'wf', 'sleeping', '1', 0, NULL, now(), now(),"
            "  now() + interval '1 hour')"
        ).format(ident)
    )
    due_before: dict[object, object] = {
        row[0]: row[1]
        for row in admin.execute(sql.SQL("SELECT id, wake_at FROM {}.runs").format(ident))
    }
    async with migrated(postgres_url, schema, admin, monkeypatch) as stores:
        store = stores[0]
        column = admin.execute(
            "SELECT data_type, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'runs' AND column_name = 'deadline_at'",
            (schema,),
        ).fetchone()
        assert column == ("timestamp with time zone", "YES", None)

        olds = {r.id: r for r in (await store.list_runs(workflow="wf")).runs}
        assert {i: (r.status, r.deadline_at) for i, r in olds.items()} == {
            "old-pending": ("pending", None),
            "old-waiting": ("waiting", None),
            "old-sleeping": ("sleeping", None),
            "old-delayed": ("delayed", None),
        }
        assert {i: r.wake_at for i, r in olds.items()} == due_before  # kept

        bounded = await stores[1].create_run(
            NewRun("wf", "2", delay=timedelta(hours=2), deadline=timedelta(milliseconds=300))
        )
        record = bounded.run
        assert record.status == "delayed"
        assert record.deadline_at == record.created_at + timedelta(milliseconds=300)
        assert record.wake_at == record.deadline_at  # due at its deadline, before its delay
        [first] = await store.claim_runs(["wf"], 10, timedelta(seconds=30))
        assert first.run.id == "old-pending"
        assert first.run.deadline_at is None
        await asyncio.sleep(0.35)
        [second] = await stores[2].claim_runs(["wf"], 10, timedelta(seconds=30))
        assert second.run.id == record.id
        assert second.run.deadline_at == record.deadline_at
        assert await stores[3].claim_runs(["wf"], 10, timedelta(seconds=30)) == []


async def test_a_version_4_schema_with_runs_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 5 adds runs.parent_id and runs.parent_step (nullable, no
    default: the table is not rewritten), the partial index runs_children
    and the functions a child's end calls. Every run stored before is no
    child, keeps its status, due time and deadline, and has no children;
    workers starting together migrate once. A run stored before then starts
    children, waits for them and is woken by the last one's end."""
    await initialize_old_schema(postgres_url, monkeypatch, 4)
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, waiting_for,"
            " created_at, updated_at, wake_at, deadline_at) VALUES"
            " ('old-pending', 'wf', 'pending', '1', 0, NULL, now(), now(),"
            "  now() - interval '1 hour', now() + interval '1 hour'),"
            " ('old-waiting', 'wf', 'waiting', '1', 1, 'go', now(), now(), NULL, NULL),"
            " ('old-delayed', 'wf', 'sleeping', '1', 0, NULL, now(), now(),"
            "  now() + interval '1 hour', NULL)"
        ).format(ident)
    )
    before = {
        row[0]: row[1:]
        for row in admin.execute(
            sql.SQL("SELECT id, status, wake_at, deadline_at FROM {}.runs").format(ident)
        )
    }
    async with migrated(postgres_url, schema, admin, monkeypatch) as stores:
        store = stores[0]
        columns = admin.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = 'runs'"
            " AND column_name IN ('parent_id', 'parent_step') ORDER BY column_name",
            (schema,),
        ).fetchall()
        assert columns == [
            ("parent_id", "text", "YES", None),
            ("parent_step", "text", "YES", None),
        ]
        [index] = admin.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = 'runs_children'",
            (schema,),
        ).fetchall()
        assert "WHERE (parent_id IS NOT NULL)" in str(index[0])
        after = {
            row[0]: row[1:]
            for row in admin.execute(
                sql.SQL("SELECT id, status, wake_at, deadline_at FROM {}.runs").format(ident)
            )
        }
        assert after == before
        olds = {r.id: r for r in (await store.list_runs(workflow="wf")).runs}
        assert {i: (r.status, r.parent_id, r.parent_step) for i, r in olds.items()} == {
            "old-pending": ("pending", None, None),
            "old-waiting": ("waiting", None, None),
            "old-delayed": ("delayed", None, None),
        }
        assert await store.list_children("old-pending") == []

        [parent] = await stores[1].claim_runs(["wf"], 10, timedelta(seconds=30))
        assert parent.run.id == "old-pending"
        child = await stores[1].start_child(
            parent.lease, "fan", NewRun("kid", "2", run_id="old-pending.0")
        )
        assert child is not None
        assert (child.parent_id, child.parent_step) == ("old-pending", "fan")
        assert child.deadline_at == olds["old-pending"].deadline_at  # the parent's
        assert await stores[2].list_children("old-pending") == [child]
        step = StepRecord("fan", "waiting")
        assert await stores[1].wait_children(parent.lease, step) is False
        [kid] = await stores[3].claim_runs(["kid"], 10, timedelta(seconds=30))
        assert await stores[3].finish_run(kid.lease, "completed", output="3")
        [woken] = await store.claim_runs(["wf"], 10, timedelta(seconds=30))
        assert woken.run.id == "old-pending"
        assert await store.wait_children(woken.lease, step) is True


async def test_a_version_5_schema_with_runs_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 6 adds runs.priority (default 0), the limit columns and
    blocked_by (nullable, no default: the table is not rewritten), rebuilds
    runs_due for timed runs only, adds runs_ready, runs_blocked and the
    holder indexes, and the functions of the limits. Every run stored before
    has priority 0, no limits and is not blocked, and keeps its status and
    due time; workers starting together migrate once. Runs stored before
    are then claimed by priority alongside new ones, and new runs are held
    to their limits."""
    await initialize_old_schema(postgres_url, monkeypatch, 5)
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, waiting_for,"
            " created_at, updated_at, wake_at, lease_expires_at) VALUES"
            " ('old-pending', 'wf', 'pending', '1', 0, NULL, now(), now(),"
            "  now() - interval '1 hour', NULL),"
            " ('old-running', 'wf', 'running', '1', 1, NULL, now(), now(), NULL,"
            "  now() + interval '1 hour'),"
            " ('old-waiting', 'wf', 'waiting', '1', 1, 'go', now(), now(), NULL, NULL),"
            " ('old-delayed', 'wf', 'sleeping', '1', 0, NULL, now(), now(),"
            "  now() + interval '1 hour', NULL)"
        ).format(ident)
    )
    read = sql.SQL("SELECT id, status, wake_at, lease_expires_at FROM {}.runs").format(ident)
    before = {row[0]: row[1:] for row in admin.execute(read)}
    async with migrated(postgres_url, schema, admin, monkeypatch) as stores:
        store = stores[0]
        columns = admin.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = 'runs'"
            " AND column_name IN ('priority', 'limit_key1', 'limit_max1', 'limit_key2',"
            " 'limit_max2', 'blocked_by') ORDER BY column_name",
            (schema,),
        ).fetchall()
        assert columns == [
            ("blocked_by", "text", "YES", None),
            ("limit_key1", "text", "YES", None),
            ("limit_key2", "text", "YES", None),
            ("limit_max1", "integer", "YES", None),
            ("limit_max2", "integer", "YES", None),
            ("priority", "integer", "NO", "0"),
        ]
        indexes = {
            str(row[0]): str(row[1])
            for row in admin.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s"
                " AND indexname IN ('runs_due', 'runs_ready', 'runs_blocked',"
                " 'runs_holding1', 'runs_holding2')",
                (schema,),
            )
        }
        assert sorted(indexes) == [
            "runs_blocked",
            "runs_due",
            "runs_holding1",
            "runs_holding2",
            "runs_ready",
        ]
        assert "blocked_by IS NULL" in str(indexes["runs_due"])
        assert "'pending'" not in str(indexes["runs_due"])
        assert "priority DESC" in str(indexes["runs_ready"])
        assert {row[0]: row[1:] for row in admin.execute(read)} == before
        olds = {r.id: r for r in (await store.list_runs(workflow="wf")).runs}
        assert {i: (r.status, r.priority, r.limits, r.blocked_by) for i, r in olds.items()} == {
            "old-pending": ("pending", 0, (), None),
            "old-running": ("running", 0, (), None),
            "old-waiting": ("waiting", 0, (), None),
            "old-delayed": ("delayed", 0, (), None),
        }
        urgent = await stores[1].create_run(NewRun("wf", "2", priority=9))
        claimed = await stores[2].claim_runs(["wf"], 10, timedelta(seconds=30))
        assert [c.run.id for c in claimed] == [urgent.run.id, "old-pending"]
        limit = (ConcurrencyLimit("k", 1),)
        first = await store.create_run(NewRun("lim", "1", limits=limit))
        second = await store.create_run(NewRun("lim", "2", limits=limit))
        [held] = await stores[3].claim_runs(["lim"], 10, timedelta(seconds=30))
        assert held.run.id == first.run.id
        blocked = await store.get_run(second.run.id)
        assert blocked is not None
        assert blocked.blocked_by == "k"
        assert await stores[3].finish_run(held.lease, "completed", output="1")
        [then] = await store.claim_runs(["lim"], 10, timedelta(seconds=30))
        assert then.run.id == second.run.id


async def test_a_version_6_schema_with_runs_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 7 adds the rate columns and debounce_key (nullable, no
    default: the table is not rewritten), the unique index of open runs by
    debounce key, the tables of rate claims and rate waits, and the
    functions of the rates. Every run stored before has no rates and no
    debounce key, and keeps its status, due time, limits and block; workers
    starting together migrate once. New runs are then held to their rates
    and debounced, next to runs stored before."""
    await initialize_old_schema(postgres_url, monkeypatch, 6)
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, waiting_for,"
            " created_at, updated_at, wake_at, lease_expires_at, priority, limit_key1,"
            " limit_max1, blocked_by) VALUES"
            " ('old-pending', 'wf', 'pending', '1', 0, NULL, now(), now(),"
            "  now() - interval '1 hour', NULL, 3, NULL, NULL, NULL),"
            " ('old-running', 'wf', 'running', '1', 1, NULL, now(), now(), NULL,"
            "  now() + interval '1 hour', 0, 'k', 1, NULL),"
            " ('old-blocked', 'wf', 'pending', '1', 0, NULL, now(), now(),"
            "  now() - interval '1 hour', NULL, 0, 'k', 1, 'k'),"
            " ('old-delayed', 'wf', 'sleeping', '1', 0, NULL, now(), now(),"
            "  now() + interval '1 hour', NULL, 0, NULL, NULL, NULL)"
        ).format(ident)
    )
    read = sql.SQL(
        "SELECT id, status, wake_at, lease_expires_at, priority, limit_key1, blocked_by"
        " FROM {}.runs"
    ).format(ident)
    before = {row[0]: row[1:] for row in admin.execute(read)}
    assert "rate_claims" not in tables(admin, schema)
    async with migrated(postgres_url, schema, admin, monkeypatch) as stores:
        store = stores[0]
        assert {"rate_claims", "rate_waits"} <= tables(admin, schema)
        columns = admin.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = 'runs'"
            " AND (column_name LIKE 'rate%%' OR column_name = 'debounce_key')"
            " ORDER BY column_name",
            (schema,),
        ).fetchall()
        assert columns == [
            ("debounce_key", "text", "YES", None),
            ("rate_key1", "text", "YES", None),
            ("rate_key2", "text", "YES", None),
            ("rate_max1", "integer", "YES", None),
            ("rate_max2", "integer", "YES", None),
            ("rate_period1", "bigint", "YES", None),
            ("rate_period2", "bigint", "YES", None),
        ]
        indexes = {
            str(row[0]): str(row[1])
            for row in admin.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s"
                " AND indexname IN ('runs_debounce', 'rate_claims_key', 'rate_waits_due')",
                (schema,),
            )
        }
        assert sorted(indexes) == ["rate_claims_key", "rate_waits_due", "runs_debounce"]
        assert "UNIQUE" in indexes["runs_debounce"]
        assert "attempts = 0" in indexes["runs_debounce"]
        assert {row[0]: row[1:] for row in admin.execute(read)} == before
        olds = {r.id: r for r in (await store.list_runs(workflow="wf")).runs}
        assert {i: (r.status, r.rates, r.debounce_key, r.blocked_by) for i, r in olds.items()} == {
            "old-pending": ("pending", (), None, None),
            "old-running": ("running", (), None, None),
            "old-blocked": ("pending", (), None, "k"),
            "old-delayed": ("delayed", (), None, None),
        }

        rate = (RateLimit("r", 1, timedelta(hours=1)),)
        first = await stores[1].create_run(NewRun("wf", "2", rates=rate))
        second = await stores[1].create_run(NewRun("wf", "3", rates=rate))
        claimed = await stores[2].claim_runs(["wf"], 10, timedelta(seconds=30))
        assert [c.run.id for c in claimed] == ["old-pending", first.run.id]
        assert claimed[1].run.rates == rate
        held = await store.get_run(second.run.id)
        assert held is not None
        assert held.blocked_by == RATE_BLOCK_PREFIX + "r"

        one = await stores[3].create_run(NewRun("wf", "a", debounce_key="d"))
        two = await stores[3].create_run(NewRun("wf", "b", debounce_key="d"))
        assert one.created
        assert not two.created
        assert (two.run.id, two.run.input, two.run.debounce_key) == (one.run.id, "b", "d")


async def test_a_version_7_schema_with_runs_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 8 adds runs.headers (nullable, no default: the table is not
    rewritten). Every run stored before has no headers and keeps its status,
    due time, limits, rates, block and debounce key; workers starting
    together migrate once. New runs keep their headers however they are
    created, a debounced create replaces them, and claims return them,
    through claim_held too, whose rows (of the table's row type) gain the
    column with the table, even in a session that ran it before."""
    await initialize_old_schema(postgres_url, monkeypatch, 7)
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, created_at, updated_at,"
            " wake_at, lease_expires_at, priority, limit_key1, limit_max1, rate_key1, rate_max1,"
            " rate_period1, blocked_by, debounce_key) VALUES"
            " ('old-pending', 'wf', 'pending', '1', 0, now(), now(),"
            "  now() - interval '1 hour', NULL, 3, NULL, NULL, NULL, NULL, NULL, NULL, 'd'),"
            " ('old-running', 'wf', 'running', '1', 1, now(), now(), NULL,"
            "  now() + interval '1 hour', 0, 'k', 1, NULL, NULL, NULL, NULL, NULL),"
            " ('old-rated', 'wf', 'pending', '1', 0, now(), now(),"
            "  now() - interval '1 hour', NULL, 0, NULL, NULL, 'r', 1, 3600000000, NULL, NULL),"
            " ('old-held', 'held', 'pending', '1', 0, now(), now(),"
            "  now() - interval '1 hour', NULL, 0, NULL, NULL, 'h', 5, 3600000000, NULL, NULL),"
            " ('old-held2', 'held', 'pending', '1', 0, now(), now(),"
            "  now() - interval '1 hour', NULL, 0, NULL, NULL, 'h', 5, 3600000000, NULL, NULL)"
        ).format(ident)
    )
    read = sql.SQL(
        "SELECT id, status, wake_at, lease_expires_at, priority, limit_key1, rate_key1,"
        " blocked_by, debounce_key FROM {}.runs WHERE id <> 'old-held'"
    ).format(ident)
    before = {row[0]: row[1:] for row in admin.execute(read)}
    claim_held = sql.SQL(
        "SELECT (h.run).id, to_jsonb(h.run) FROM {}.claim_held(%s::text[],"
        " interval '30 seconds', NULL::timestamptz, 10, %s, NULL::text) AS h"
    ).format(ident)
    # This session runs claim_held on the old schema, then again on the new one.
    [(held_id, held_row)] = admin.execute(claim_held, (["old-held"], RATE_BLOCK_PREFIX)).fetchall()
    assert held_id == "old-held"
    assert isinstance(held_row, dict)
    assert "headers" not in held_row
    async with migrated(postgres_url, schema, admin, monkeypatch) as stores:
        store = stores[0]
        columns = admin.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = 'runs'"
            " AND column_name = 'headers'",
            (schema,),
        ).fetchall()
        assert columns == [("headers", "text", "YES", None)]
        assert {row[0]: row[1:] for row in admin.execute(read)} == before
        olds = {r.id: r for r in (await store.list_runs(workflow="wf")).runs}
        assert {i: r.headers for i, r in olds.items()} == {
            "old-pending": {},
            "old-running": {},
            "old-rated": {},
        }
        assert olds["old-pending"].debounce_key == "d"

        admin.execute(
            sql.SQL("UPDATE {}.runs SET headers = %s WHERE id = 'old-held2'").format(ident),
            ('{"traceparent":"t"}',),
        )
        [(held_id, held_row)] = admin.execute(
            claim_held, (["old-held2"], RATE_BLOCK_PREFIX)
        ).fetchall()
        assert held_id == "old-held2"
        assert isinstance(held_row, dict)
        assert held_row["headers"] == '{"traceparent":"t"}'
        assert held_row["status"] == "running"

        trace = {"traceparent": "00-abc-def-01", "baggage": "a=1"}
        # One at a time, and many together (their creates share a statement).
        alone = await stores[1].create_run(NewRun("new", "1", headers=trace))
        many = await asyncio.gather(
            *(
                stores[1].create_run(NewRun("new", str(i), headers={"tracestate": str(i)}))
                for i in range(5)
            )
        )
        bare = await stores[1].create_run(NewRun("new", "x"))
        assert alone.run.headers == trace
        assert [c.run.headers for c in many] == [{"tracestate": str(i)} for i in range(5)]
        assert bare.run.headers == {}
        for created in (alone, *many, bare):
            assert await store.get_run(created.run.id) == created.run

        # A debounced create replaces them, absent ones included.
        one = await stores[2].create_run(NewRun("wf", "a", debounce_key="e", headers=trace))
        two = await stores[2].create_run(
            NewRun("wf", "b", debounce_key="e", headers={"baggage": "b=2"})
        )
        assert not two.created
        assert two.run.id == one.run.id
        assert two.run.headers == {"baggage": "b=2"}
        three = await stores[2].create_run(NewRun("wf", "c", debounce_key="e"))
        assert three.run.headers == {}
        four = await stores[2].create_run(NewRun("wf", "a", debounce_key="d", headers=trace))
        assert (four.created, four.run.id, four.run.headers) == (False, "old-pending", trace)

        # Claimed through claim (no rates) and claim_held (rates), with children.
        rate = (RateLimit("q", 5, timedelta(hours=1)),)
        rated = await store.create_run(NewRun("claims", "r", rates=rate, headers=trace))
        plain = await store.create_run(NewRun("claims", "p", headers={"baggage": "p"}))
        claimed = await stores[3].claim_runs(["claims"], 10, timedelta(seconds=30))
        assert {c.run.id: c.run.headers for c in claimed} == {
            rated.run.id: trace,
            plain.run.id: {"baggage": "p"},
        }
        parent = next(c for c in claimed if c.run.id == plain.run.id)
        child = await stores[3].start_child(
            parent.lease, "spawn", NewRun("kids", "c", run_id="kid-1", headers=trace)
        )
        assert child is not None
        assert child.headers == trace
        assert await store.get_run("kid-1") == child
        assert [c.headers for c in await store.list_children(plain.run.id)] == [trace]

        # A schedule's slot creates its run with the run's headers.
        slot = datetime(2020, 1, 1, tzinfo=UTC)
        schedule = await store.upsert_schedule(
            ScheduleSpec("every", "sched", "1", "every:3600", slot)
        )
        fired = await store.claim_schedule_slot(
            "every",
            schedule.next_run_at,
            schedule.next_run_at + timedelta(hours=1),
            NewRun("sched", "1", idempotency_key="slot-1", headers=trace),
        )
        assert fired is not None
        assert fired.headers == trace
        assert await store.get_run(fired.id) == fired


async def test_a_version_8_schema_with_runs_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 9 adds the partial index runs_key_created (runs with an
    idempotency key, by key, then creation), and nothing else: the table is
    not rewritten, every run stored before keeps what it had, and workers
    starting together migrate once. Runs stored before are then found by
    their key, newest first, next to new ones, and the key still makes a
    create idempotent within its workflow."""
    await initialize_old_schema(postgres_url, monkeypatch, 8)
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, idempotency_key, attempts,"
            " created_at, updated_at, wake_at, finished_at) VALUES"
            " ('old-a', 'wf1', 'pending', '1', 'k', 0, now() - interval '2 hours',"
            "  now() - interval '2 hours', now() - interval '2 hours', NULL),"
            " ('old-b', 'wf2', 'completed', '2', 'k', 1, now() - interval '1 hour',"
            "  now() - interval '1 hour', NULL, now() - interval '1 hour'),"
            " ('old-c', 'wf1', 'pending', '3', NULL, 0, now(), now(), now(), NULL),"
            " ('old-d', 'wf1', 'pending', '4', 'other', 0, now(), now(), now(), NULL)"
        ).format(ident)
    )
    read = sql.SQL(
        "SELECT id, workflow, status, idempotency_key, created_at, updated_at, wake_at,"
        " finished_at FROM {}.runs"
    ).format(ident)
    before = {row[0]: row[1:] for row in admin.execute(read)}
    index_of = "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s"
    assert admin.execute(index_of, (schema, "runs_key_created")).fetchone() is None
    async with migrated(postgres_url, schema, admin, monkeypatch) as stores:
        store = stores[0]
        index = admin.execute(index_of, (schema, "runs_key_created")).fetchone()
        assert index is not None
        assert "(idempotency_key, created_at, id)" in str(index[0])
        assert "WHERE (idempotency_key IS NOT NULL)" in str(index[0])
        assert {row[0]: row[1:] for row in admin.execute(read)} == before

        assert [r.id for r in await store.find_runs_by_key("k")] == ["old-b", "old-a"]
        assert [r.id for r in await stores[1].find_runs_by_key("other")] == ["old-d"]
        again = await stores[2].create_run(NewRun("wf1", "1", idempotency_key="k"))
        assert (again.created, again.run.id) == (False, "old-a")
        new = await stores[2].create_run(NewRun("wf3", "5", idempotency_key="k"))
        assert new.created
        found = await stores[3].find_runs_by_key("k")
        assert [r.id for r in found] == [new.run.id, "old-b", "old-a"]
        assert [r.status for r in found] == ["pending", "completed", "pending"]
        assert [r.id for r in await store.find_runs_by_key("k", limit=1)] == [new.run.id]


async def test_a_version_9_schema_with_runs_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 10 rebuilds runs_ready and runs_due with the workflow first
    (same names, same predicates) and adds schedules_workflow_due: the table
    is not rewritten, every run and schedule stored before keeps what it
    had, and workers starting together migrate once. Runs stored before are
    then claimed in claim order (lapsed leases, then priority and due time,
    pending and timed runs together), never those of another workflow;
    next_due finds the workflow's next timed run and due_schedules the due
    schedules of the workflows it is given."""
    await initialize_old_schema(postgres_url, monkeypatch, 9)
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, priority, created_at,"
            " updated_at, wake_at, lease_expires_at, lease_epoch) VALUES"
            " ('other', 'wf2', 'pending', '1', 0, 9, now() - interval '2 hours',"
            "  now() - interval '2 hours', now() - interval '2 hours', NULL, 0),"
            " ('low', 'wf', 'pending', '2', 0, 0, now() - interval '20 minutes',"
            "  now() - interval '20 minutes', now() - interval '20 minutes', NULL, 0),"
            " ('high', 'wf', 'pending', '3', 0, 5, now() - interval '1 minute',"
            "  now() - interval '1 minute', now() - interval '1 minute', NULL, 0),"
            " ('woke', 'wf', 'sleeping', '4', 1, 0, now() - interval '1 hour',"
            "  now() - interval '1 hour', now() - interval '30 minutes', NULL, 1),"
            " ('later', 'wf', 'waiting', '5', 1, 0, now() - interval '1 hour',"
            "  now() - interval '1 hour', now() + interval '1 hour', NULL, 1),"
            " ('lapsed', 'wf', 'running', '6', 1, 0, now() - interval '1 hour',"
            "  now() - interval '1 hour', NULL, now() - interval '1 minute', 1)"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.schedules (key, workflow, input, recurrence, next_run_at,"
            " created_at, updated_at, paused) VALUES"
            " ('theirs', 'wf2', '1', 'every:60', now() - interval '2 hours', now(), now(), false),"
            " ('ours', 'wf', '1', 'every:60', now() - interval '1 hour', now(), now(), false),"
            " ('held', 'wf', '1', 'every:60', now() - interval '3 hours', now(), now(), true)"
        ).format(ident)
    )
    read = sql.SQL(
        "SELECT id, workflow, status, priority, attempts, created_at, updated_at, wake_at"
        " FROM {}.runs"
    ).format(ident)
    before = {row[0]: row[1:] for row in admin.execute(read)}
    index_of = "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s"
    assert admin.execute(index_of, (schema, "schedules_workflow_due")).fetchone() is None
    async with migrated(postgres_url, schema, admin, monkeypatch) as stores:
        store = stores[0]
        indexes = {}
        for name in ("runs_ready", "runs_due", "schedules_workflow_due"):
            row = admin.execute(index_of, (schema, name)).fetchone()
            assert row is not None, name
            indexes[name] = str(row[0])
        assert "(workflow, priority DESC, wake_at)" in indexes["runs_ready"]
        assert (
            "WHERE ((status = 'pending'::text) AND (blocked_by IS NULL))" in (indexes["runs_ready"])
        )
        assert "(workflow, wake_at)" in indexes["runs_due"]
        assert "blocked_by IS NULL" in indexes["runs_due"]
        assert "'sleeping'" in indexes["runs_due"]
        assert "(workflow, next_run_at, key)" in indexes["schedules_workflow_due"]
        assert "WHERE (NOT paused)" in indexes["schedules_workflow_due"]
        assert {row[0]: row[1:] for row in admin.execute(read)} == before

        claimed = await store.claim_runs(["wf"], 10, timedelta(seconds=30))
        assert [(c.run.id, c.reclaimed) for c in claimed] == [
            ("lapsed", True),
            ("high", False),
            ("woke", False),
            ("low", False),
        ]
        assert await stores[1].claim_runs(["wf"], 10, timedelta(seconds=30)) == []
        due = await stores[1]._next_due(["wf"])
        assert due is not None
        assert 3500 < due <= 3600
        [other] = await stores[2].claim_runs(["wf2", "wf"], 10, timedelta(seconds=30))
        assert other.run.id == "other"

        assert [s.key for s in await store.due_schedules(10, ["wf"])] == ["ours"]
        assert [s.key for s in await store.due_schedules(10)] == ["theirs", "ours"]
        assert [s.key for s in await store.due_schedules(1, ["wf2", "wf"])] == ["theirs"]


async def test_a_version_10_schema_with_runs_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 11 adds runs.version (integer, NOT NULL, default 1) and
    runs.fingerprint (text, nullable): the table is not rewritten, every run
    stored before keeps what it had and reads as version 1 with no
    fingerprint, and workers starting together migrate once. A claim serving
    another version leaves the old runs as they are, lapsed lease included,
    and one serving version 1 takes them. New runs keep their version and
    fingerprint however they are created, a debounced create replaces an
    old open run's, and claims return them, through claim_held too, whose
    rows (of the table's row type) gain the columns with the table, even in
    a session that ran it before."""
    await initialize_old_schema(postgres_url, monkeypatch, 10)
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, created_at, updated_at,"
            " wake_at, lease_expires_at, lease_epoch, rate_key1, rate_max1, rate_period1,"
            " debounce_key) VALUES"
            " ('old-due', 'wf', 'pending', '1', 0, now() - interval '1 hour',"
            "  now() - interval '1 hour', now() - interval '1 hour', NULL, 0, NULL, NULL, NULL,"
            "  NULL),"
            " ('old-lapsed', 'wf', 'running', '2', 1, now() - interval '2 hours',"
            "  now() - interval '2 hours', NULL, now() - interval '1 minute', 1, NULL, NULL,"
            "  NULL, NULL),"
            " ('old-open', 'wf', 'pending', '3', 0, now() - interval '30 minutes',"
            "  now() - interval '30 minutes', now() - interval '30 minutes', NULL, 0, NULL,"
            "  NULL, NULL, 'd'),"
            " ('old-held', 'held', 'pending', '4', 0, now(), now(), now() - interval '1 hour',"
            "  NULL, 0, 'h', 5, 3600000000, NULL),"
            " ('old-held2', 'held', 'pending', '5', 0, now(), now(), now() - interval '1 hour',"
            "  NULL, 0, 'h', 5, 3600000000, NULL)"
        ).format(ident)
    )
    read = sql.SQL(
        "SELECT id, workflow, status, input, attempts, created_at, updated_at, wake_at,"
        " lease_expires_at, lease_epoch, debounce_key FROM {}.runs WHERE id LIKE 'old-%%'"
        " AND id <> 'old-held'"
    ).format(ident)
    before = {row[0]: row[1:] for row in admin.execute(read)}
    claim_held = sql.SQL(
        "SELECT (h.run).id, to_jsonb(h.run) FROM {}.claim_held(%s::text[],"
        " interval '30 seconds', NULL::timestamptz, 10, %s, NULL::text) AS h"
    ).format(ident)
    # This session runs claim_held on the old schema, then again on the new one.
    [(held_id, held_row)] = admin.execute(claim_held, (["old-held"], RATE_BLOCK_PREFIX)).fetchall()
    assert held_id == "old-held"
    assert isinstance(held_row, dict)
    assert "version" not in held_row
    async with migrated(postgres_url, schema, admin, monkeypatch) as stores:
        store = stores[0]
        columns = admin.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = 'runs'"
            " AND column_name IN ('version', 'fingerprint') ORDER BY column_name",
            (schema,),
        ).fetchall()
        assert columns == [
            ("fingerprint", "text", "YES", None),
            ("version", "integer", "NO", "1"),
        ]
        assert {row[0]: row[1:] for row in admin.execute(read)} == before
        olds = {r.id: r for r in (await store.list_runs(workflow="wf")).runs}
        assert {i: (r.version, r.fingerprint) for i, r in olds.items()} == {
            "old-due": (1, None),
            "old-lapsed": (1, None),
            "old-open": (1, None),
        }
        lease = timedelta(seconds=30)
        assert await stores[1].claim_runs(["wf"], 10, lease, versions={"wf": [2]}) == []
        assert {row[0]: row[1:] for row in admin.execute(read)} == before

        [(held_id, held_row)] = admin.execute(
            claim_held, (["old-held2"], RATE_BLOCK_PREFIX)
        ).fetchall()
        assert held_id == "old-held2"
        assert isinstance(held_row, dict)
        assert (held_row["version"], held_row["fingerprint"]) == (1, None)
        assert held_row["status"] == "running"

        # One at a time, many together (their creates share a statement), in a batch.
        alone = await stores[1].create_run(NewRun("new", "1", version=2, fingerprint="a2"))
        many = await asyncio.gather(
            *(
                stores[1].create_run(NewRun("new", str(i), version=3 + i, fingerprint=f"m{i}"))
                for i in range(5)
            )
        )
        batch = await stores[1].create_runs(
            [
                NewRun("new", "b", version=9, fingerprint="b9"),
                NewRun("new", "c", version=2, delay=timedelta(hours=1)),
                NewRun("new", "x"),
            ]
        )
        bare = await stores[1].create_run(NewRun("new", "x"))
        assert (alone.run.version, alone.run.fingerprint) == (2, "a2")
        assert [(c.run.version, c.run.fingerprint) for c in many] == [
            (3 + i, f"m{i}") for i in range(5)
        ]
        made = [o for o in batch if not isinstance(o, Exception)]
        assert [(o.run.version, o.run.fingerprint) for o in made] == [
            (9, "b9"),
            (2, None),
            (1, None),
        ]
        assert (bare.run.version, bare.run.fingerprint) == (1, None)
        for created in (alone, *many, *made, bare):
            assert await store.get_run(created.run.id) == created.run

        # A debounced create gives the old open run its version and fingerprint.
        again = await stores[2].create_run(
            NewRun("wf", "6", debounce_key="d", version=2, fingerprint="d2")
        )
        assert (again.created, again.run.id) == (False, "old-open")
        assert (again.run.version, again.run.fingerprint) == (2, "d2")

        # Claimed through claim (no rates) and claim_held (rates), with children.
        rate = (RateLimit("q", 5, timedelta(hours=1)),)
        rated = await store.create_run(
            NewRun("claims", "r", rates=rate, version=4, fingerprint="r4")
        )
        plain = await store.create_run(NewRun("claims", "p", version=4, fingerprint="p4"))
        other = await store.create_run(NewRun("claims", "o", version=5, fingerprint="o5"))
        claimed = await stores[3].claim_runs(["claims"], 10, lease, versions={"claims": [4]})
        assert {c.run.id: (c.run.version, c.run.fingerprint) for c in claimed} == {
            rated.run.id: (4, "r4"),
            plain.run.id: (4, "p4"),
        }
        assert await store.get_run(other.run.id) == other.run
        parent = next(c for c in claimed if c.run.id == plain.run.id)
        child = await stores[3].start_child(
            parent.lease, "spawn", NewRun("kids", "c", run_id="kid-1", version=7, fingerprint="k")
        )
        assert child is not None
        assert (child.version, child.fingerprint) == (7, "k")
        assert await store.get_run("kid-1") == child

        # A schedule's slot creates its run with the run's version.
        slot = datetime(2020, 1, 1, tzinfo=UTC)
        schedule = await store.upsert_schedule(
            ScheduleSpec("every", "sched", "1", "every:3600", slot)
        )
        fired = await store.claim_schedule_slot(
            "every",
            schedule.next_run_at,
            schedule.next_run_at + timedelta(hours=1),
            NewRun("sched", "1", idempotency_key="slot-1", version=6, fingerprint="s6"),
        )
        assert fired is not None
        assert (fired.version, fired.fingerprint) == (6, "s6")
        assert await store.get_run(fired.id) == fired

        # Version 1 takes the old runs, the lapsed lease first.
        claimed = await store.claim_runs(["wf"], 10, lease, versions={"wf": [1]})
        assert [(c.run.id, c.reclaimed) for c in claimed] == [
            ("old-lapsed", True),
            ("old-due", False),
        ]
        [taken] = await store.claim_runs(["wf"], 10, lease)
        assert taken.run.id == "old-open"
