"""Bounded event buffers on PostgreSQL, checked in the tables themselves.

A run that ends drops its buffered events in the statement that ends it
(events with an id stay, as taken and without a payload, so a redelivery of
the id stays a no-op), through the partial index ``events_buffered``, which
the version 2 migration adds.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from reflow_core import Engine, EventBufferFullError, StepContext, workflow
from reflow_core.storage import NewRun
from reflow_postgres import PostgresStorage
from reflow_postgres import _schema as schema_module
from reflow_postgres._schema import SCHEMA_VERSION

Admin = psycopg.Connection[tuple[object, ...]]
LEASE = timedelta(seconds=30)


def events_of(admin: Admin, schema: str, run_id: str) -> list[tuple[object, ...]]:
    """``(payload, event_id, taken)`` of every event row of a run, oldest first."""
    query = sql.SQL(
        "SELECT payload, event_id, taken_at IS NOT NULL FROM {}.events WHERE run_id = %s"
        " ORDER BY id"
    ).format(sql.Identifier(schema))
    return admin.execute(query, (run_id,)).fetchall()


def buffered(admin: Admin, schema: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {}.events WHERE taken_at IS NULL").format(
        sql.Identifier(schema)
    )
    row = admin.execute(query).fetchone()
    assert row is not None
    return int(str(row[0]))


async def _echo(ctx: StepContext[Any, Any]) -> Any:
    return ctx.prev


async def test_a_completed_run_leaves_no_buffered_event_in_the_tables(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    wf = workflow("approve").step("prepare", lambda ctx: 1).wait_for_event("go").step("a", _echo)
    store = PostgresStorage.from_url(postgres_url)
    engine = Engine(storage=store, workflows=[wf], close_storage=False)
    try:
        run = await engine.enqueue(wf)
        for i in range(999):
            assert await engine.send_event(run.id, "go", i)
        assert await engine.send_event(run.id, "go", "with id", event_id="keep")
        with pytest.raises(EventBufferFullError) as caught:
            await engine.send_event(run.id, "go", "one too many")
        assert caught.value.limit == 1000
        assert await engine.send_event(run.id, "go", "a retry", event_id="keep")
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=10) == 0
    finally:
        await engine.stop(timeout=0)
        await store.close()
    # The event the wait took, and the dedupe record of the one with an id.
    assert events_of(admin, schema, run.id) == [("0", None, True), ("", "keep", True)]
    assert buffered(admin, schema) == 0


@pytest.mark.parametrize(
    "how", ["failed", "failed with lease", "cancelled", "cancelled with lease"]
)
async def test_every_way_of_ending_a_run_drops_its_buffer(
    postgres_url: str, schema: str, admin: Admin, how: str
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        run_id = (await store.create_run(NewRun("wf", "1"))).run.id
        [held] = await store.claim_runs(["wf"], 1, LEASE)
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
        assert events_of(admin, schema, run_id) == [("", "x", True)]
        assert await store.requeue_run(run_id)
        assert await store.deliver_event(run_id, "e", '"late"', event_id="x", max_buffered=1)
        assert buffered(admin, schema) == 0
        assert await store.deliver_event(run_id, "e", '"fresh"', max_buffered=1)
        assert buffered(admin, schema) == 1
    finally:
        await store.close()


async def test_finishes_grouped_into_one_statement_drop_every_buffer(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        for i in range(20):
            await store.create_run(NewRun("wf", str(i)))
        claimed = await store.claim_runs(["wf"], 20, LEASE)
        for c in claimed:
            for j in range(3):
                await store.deliver_event(c.run.id, "e", str(j))
        keep = claimed.pop()
        done = await asyncio.gather(
            *(store.finish_run(c.lease, "completed", output="1") for c in claimed)
        )
        assert all(done)
        assert buffered(admin, schema) == 3  # the unfinished run's, and only those
        assert [e[0] for e in events_of(admin, schema, keep.run.id)] == ["0", "1", "2"]
        assert await store.update_run_status(keep.run.id, "pending", lease=keep.lease)
        assert buffered(admin, schema) == 3  # handing a run back keeps its buffer
    finally:
        await store.close()


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_plan_nodes(child))
    return nodes


async def test_ending_a_run_that_holds_no_events_never_reads_the_events_table(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """Ending a run costs nothing more when it holds no buffered events: the
    events table is not in the plan of the statement that ends it. A run that
    holds some has them dropped through the partial index events_buffered,
    however much event history other runs have."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.events (run_id, name, payload, event_id, created_at, taken_at)"
            " SELECT 'r' || (i % 5000), 'e', '1', CASE WHEN i % 3 = 0 THEN 'id' || i END,"
            " now(), CASE WHEN i % 2 = 0 THEN now() END"
            " FROM generate_series(1, 60000) AS i"
        ).format(ident)
    )
    admin.execute(sql.SQL("ANALYZE {}.events").format(ident))
    for i in range(2):
        await store.create_run(NewRun("wf", str(i)))
    quiet, busy = await store.claim_runs(["wf"], 2, LEASE)
    await store.deliver_event(busy.run.id, "e", "1")
    await store.deliver_event(busy.run.id, "e", "2", event_id="x")
    await store.close()
    for name in ("finish", "end_fenced", "end_unfenced"):
        params = {
            "id": quiet.run.id,
            "epoch": quiet.lease.epoch,
            "status": "failed",
            "output": None,
            "error": "1",
            "release": True,
        }
        with admin.transaction(force_rollback=True):
            row = admin.execute(
                ("EXPLAIN (ANALYZE, FORMAT JSON) " + store._sql[name].decode()).encode(), params
            ).fetchone()
        assert row is not None
        plan = row[0] if isinstance(row[0], list) else json.loads(str(row[0]))
        nodes = _plan_nodes(plan[0]["Plan"])
        touched = {n.get("Relation Name") for n in nodes} - {None}
        assert touched == {"runs"}, (name, touched)
    # What drop_buffered_events runs for a run that holds events.
    for query in (
        "DELETE FROM {}.events WHERE run_id = %s AND taken_at IS NULL AND event_id IS NULL",
        "UPDATE {}.events SET taken_at = now(), payload = '' WHERE run_id = %s"
        " AND taken_at IS NULL",
    ):
        with admin.transaction(force_rollback=True):
            row = admin.execute(
                sql.SQL("EXPLAIN (FORMAT JSON) " + query).format(ident), (busy.run.id,)
            ).fetchone()
        assert row is not None
        plan = row[0] if isinstance(row[0], list) else json.loads(str(row[0]))
        nodes = _plan_nodes(plan[0]["Plan"])
        assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], (query, nodes)
        assert {n.get("Index Name") for n in nodes} - {None} == {"events_buffered"}, nodes


async def test_the_buffered_count_follows_deliveries_and_takes(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    query = sql.SQL("SELECT buffered FROM {}.runs WHERE id = %s").format(sql.Identifier(schema))

    def count(run_id: str) -> object:
        row = admin.execute(query, (run_id,)).fetchone()
        assert row is not None
        return row[0]

    try:
        run_id = (await store.create_run(NewRun("wf", "1"))).run.id
        assert await store.deliver_event(run_id, "e", "1", event_id="a")
        assert await store.deliver_event(run_id, "e", "2", event_id="a")  # a repeat
        assert await store.deliver_event(run_id, "f", "3")
        assert count(run_id) == 2
        with pytest.raises(EventBufferFullError):
            await store.deliver_event(run_id, "e", "4", max_buffered=2)
        assert count(run_id) == 2
        [held] = await store.claim_runs(["wf"], 1, LEASE)
        assert await store.take_event(held.lease, "w1", "e") is not None
        assert await store.take_event(held.lease, "w1", "e") is not None  # a retried take
        assert await store.take_event(held.lease, "w2", "e") is not None  # found nothing
        assert count(run_id) == 1
        assert await store.update_run_status(run_id, "cancelled")
        assert buffered(admin, schema) == 0
        assert await store.requeue_run(run_id)
        assert count(run_id) == 0
    finally:
        await store.close()


async def test_a_version_1_schema_is_migrated_forward(
    postgres_url: str, schema: str, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SCHEMA_VERSION >= 2
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 1)
    old = PostgresStorage.from_url(postgres_url)
    await old.initialize()
    await old.close()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at, wake_at,"
            " finished_at) VALUES"
            " ('done', 'wf', 'completed', '1', now(), now(), NULL, now() - interval '1 hour'),"
            " ('open', 'wf', 'pending', '1', now(), now(), now(), NULL)"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.events (run_id, name, payload, event_id, created_at, taken_at) VALUES"
            " ('done', 'e', '\"taken\"', NULL, now(), now()),"
            " ('done', 'e', '\"left\"', NULL, now(), NULL),"
            " ('done', 'e', '\"left with id\"', 'x', now(), NULL),"
            " ('open', 'e', '\"waiting for it\"', NULL, now(), NULL)"
        ).format(ident)
    )
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", SCHEMA_VERSION)
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        versions = admin.execute(
            sql.SQL("SELECT version FROM {}.reflow_schema ORDER BY version").format(ident)
        ).fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        index = admin.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
            (schema, "events_buffered"),
        ).fetchone()
        assert index is not None
        assert "taken_at IS NULL" in str(index[0])
        counts = admin.execute(
            sql.SQL("SELECT id, buffered FROM {}.runs ORDER BY id").format(ident)
        ).fetchall()
        assert counts == [("done", 0), ("open", 1)]
        assert events_of(admin, schema, "done") == [('"taken"', None, True), ("", "x", True)]
        assert events_of(admin, schema, "open") == [('"waiting for it"', None, False)]
        [held] = await store.claim_runs(["wf"], 1, LEASE)
        taken = await store.take_event(held.lease, "w", "e")
        assert taken is not None
        assert taken.payload == '"waiting for it"'
    finally:
        await store.close()
