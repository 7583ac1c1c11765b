"""The dashboard's reads on PostgreSQL: what the conformance suite cannot see
from outside.

Each is one statement that reads one index, however long the history:
runs by idempotency key walk ``runs_key_created`` (one key's entries, newest
first, stopped at the limit), a run's buffered events are its entries of
``events_buffered``, and the runs finished per minute are one range of
``runs_finished``; none scans a table, under the plans PostgreSQL makes for
the given values and under the generic plan it may switch to for a
statement prepared and run many times. Minutes are counted at the storage
clock (the test clock when one is set), in UTC whatever the connection's
``TimeZone``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from reflow_core.errors import ConfigError
from reflow_core.storage import MAX_HISTORY_MINUTES, FinishedMinute, NewRun
from reflow_postgres import PostgresStorage

from ._plans import Admin, Node, blocks, explain, plan_nodes

LEASE = timedelta(seconds=60)
_PARAM = re.compile(r"%\((\w+)\)s")


class Clock:
    """A test clock that moves only when told."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def explain_generic(admin: Admin, statement: str, params: dict[str, object]) -> list[Node]:
    """The generic plan of ``statement`` (the one PostgreSQL may settle on for
    a statement prepared and run many times, made without the values of its
    parameters), run under ``EXPLAIN ANALYZE`` with ``params``: the top node,
    then every node below it."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    prepared = _PARAM.sub(number, statement)
    values = sql.SQL(", ").join(sql.Literal(params[name]) for name in names)
    with admin.transaction(force_rollback=True):
        admin.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        admin.execute(("PREPARE dashboard_read AS " + prepared).encode())
        try:
            query = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE dashboard_read ({})")
            row = admin.execute(query.format(values)).fetchone()
        finally:
            admin.execute("DEALLOCATE dashboard_read")
    assert row is not None
    plan = row[0]
    assert isinstance(plan, list)
    top: Node = plan[0]["Plan"]
    return [top, *plan_nodes(top)[1:]]


def plans(admin: Admin, statement: str, params: dict[str, object]) -> dict[str, list[Node]]:
    """The plan PostgreSQL makes for ``params`` and its generic plan, by name."""
    return {
        "custom": explain(admin, statement, params),
        "generic": explain_generic(admin, statement, params),
    }


def assert_reads_only(nodes: list[Node], index: str) -> None:
    """The plan reads through ``index`` and no other, and scans no table whole."""
    whole = [n.get("Relation Name") for n in nodes if n.get("Node Type") == "Seq Scan"]
    assert not whole, whole
    used = {n.get("Index Name") for n in nodes} - {None}
    assert used == {index}, used


async def test_runs_by_key_read_one_keys_entries_of_their_index(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """With 60,000 runs, 50,000 of them keyed (each key used by up to five
    workflows), a lookup by key reads runs_key_created alone, never the
    arbiter runs_idempotency (whose entries lead with the workflow) nor the
    table whole, and a handful of blocks; it returns the key's runs of every
    workflow, newest first, and stops at its limit."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, idempotency_key, created_at,"
            " updated_at, finished_at) SELECT 'keyed' || i, 'wf' || (i % 5), 'completed', '1',"
            " 'key' || (i / 5), now() - i * interval '1 second', now(), now()"
            " FROM generate_series(1, 50000) AS i"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at,"
            " finished_at) SELECT 'bare' || i, 'wf0', 'completed', '1', now(), now(), now()"
            " FROM generate_series(1, 10000) AS i"
        ).format(ident)
    )
    admin.execute(sql.SQL("ANALYZE {}.runs").format(ident))
    try:
        statement = store._sql["find_by_key"].decode()
        for name, (top, *nodes) in plans(admin, statement, {"key": "key77", "limit": 3}).items():
            assert_reads_only([top, *nodes], "runs_key_created")
            assert blocks(top) < 20, name
        found = await store.find_runs_by_key("key77", limit=3)
        # key77 is the key of runs 385 to 389: the lowest number is the newest.
        assert [r.id for r in found] == ["keyed385", "keyed386", "keyed387"]
        assert {r.idempotency_key for r in found} == {"key77"}
        everything = await store.find_runs_by_key("key77")
        assert [r.workflow for r in everything] == ["wf0", "wf1", "wf2", "wf3", "wf4"]
        assert await store.find_runs_by_key("key") == []
        assert await store.find_runs_by_key("nobody's") == []
    finally:
        await store.close()


async def test_runs_by_key_come_newest_first_with_ties_broken_by_id(
    postgres_url: str,
) -> None:
    """Runs created at the same instant of the storage clock (the test clock
    stands still) come by id, highest first, as the index holds them."""
    clock = Clock(datetime(2030, 1, 1, tzinfo=UTC))
    store = PostgresStorage.from_url(postgres_url, clock=clock)
    await store.initialize()
    try:
        for workflow, run_id in (("a", "r2"), ("b", "r3"), ("c", "r1")):
            await store.create_run(NewRun(workflow, "1", idempotency_key="k", run_id=run_id))
        clock.now += timedelta(seconds=1)
        await store.create_run(NewRun("d", "1", idempotency_key="k", run_id="r0"))
        assert [r.id for r in await store.find_runs_by_key("k")] == ["r0", "r3", "r2", "r1"]
        assert [r.id for r in await store.find_runs_by_key("k", limit=2)] == ["r0", "r3"]
        # Beyond a bigint, which is all LIMIT takes: every run.
        assert len(await store.find_runs_by_key("k", limit=2**64)) == 4
        for limit in (0, -1, True, 2.0, "2"):
            with pytest.raises(ConfigError):
                await store.find_runs_by_key("k", limit=limit)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            await store.find_runs_by_key("")
    finally:
        await store.close()


async def test_a_runs_buffered_events_are_read_through_events_buffered(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """With 60,000 events of 5,000 other runs, half of them taken, listing a
    run's buffered events reads its entries of events_buffered alone (never
    the primary key in id order, nor the table whole), and returns them in
    arrival order across names, as the takes take them."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.events (run_id, name, payload, event_id, created_at, taken_at)"
            " SELECT 'r' || (i % 5000), 'e' || (i % 3), '1', CASE WHEN i % 3 = 0 THEN 'id' || i"
            " END, now(), CASE WHEN i % 2 = 0 THEN now() END"
            " FROM generate_series(1, 60000) AS i"
        ).format(ident)
    )
    admin.execute(sql.SQL("ANALYZE {}.events").format(ident))
    try:
        run_id = (await store.create_run(NewRun("wf", "1"))).run.id
        for i, name in enumerate(["b", "a", "b", "c", "a"]):
            await store.deliver_event(run_id, name, str(i), event_id=f"id{i}" if i % 2 else None)
        statement = store._sql["list_buffered"].decode()
        for name, (top, *nodes) in plans(admin, statement, {"id": run_id, "limit": 3}).items():
            assert_reads_only([top, *nodes], "events_buffered")
            assert blocks(top) < 20, name
        listed = await store.list_buffered_events(run_id)
        assert [(e.event, e.payload, e.event_id) for e in listed] == [
            ("b", "0", None),
            ("a", "1", "id1"),
            ("b", "2", None),
            ("c", "3", "id3"),
            ("a", "4", None),
        ]
        assert await store.list_buffered_events(run_id, limit=2) == listed[:2]
        assert await store.list_buffered_events(run_id, limit=2**64) == listed
        [held] = await store.claim_runs(["wf"], 1, LEASE)
        assert await store.take_event(held.lease, "w", "a") is not None
        assert [e.payload for e in await store.list_buffered_events(run_id)] == [
            "0",
            "2",
            "3",
            "4",
        ]
        assert await store.finish_run(held.lease, "completed", output="1")
        assert await store.list_buffered_events(run_id) == []
        assert await store.list_buffered_events("missing") == []
        with pytest.raises(ConfigError):
            await store.list_buffered_events(run_id, limit=0)
    finally:
        await store.close()


async def test_finished_history_reads_a_range_of_runs_finished(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """With 100,000 runs that finished a week ago and more that have not
    finished, the runs finished in the last hour or the last day are counted
    through one range of runs_finished: a few blocks, whatever the history."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at,"
            " finished_at) SELECT 'old' || i, 'wf', (ARRAY['completed', 'failed',"
            " 'cancelled'])[1 + i % 3], '1', now() - interval '8 days', t, t"
            " FROM generate_series(1, 100000) AS i,"
            " LATERAL (SELECT now() - interval '7 days' - i * interval '1 second') AS l(t)"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at, wake_at)"
            " SELECT 'open' || i, 'wf', 'pending', '1', now(), now(), now()"
            " FROM generate_series(1, 20000) AS i"
        ).format(ident)
    )
    base = await store.now()
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at,"
            " finished_at) SELECT 'new' || i, 'wf', (ARRAY['completed', 'failed',"
            " 'cancelled'])[1 + i %% 3], '1', %s - interval '2 days', t, t"
            " FROM generate_series(0, 29) AS i,"
            " LATERAL (SELECT %s - i * interval '3 minutes') AS l(t)"
        ).format(ident),
        (base, base),
    )
    admin.execute(sql.SQL("ANALYZE {}.runs").format(ident))
    try:
        statement = store._sql["finished_history"].decode()
        for minutes in (60, MAX_HISTORY_MINUTES):
            for name, (top, *nodes) in plans(admin, statement, {"minutes": minutes}).items():
                assert_reads_only([top, *nodes], "runs_finished")
                assert blocks(top) < 30, (minutes, name)
        hour = await store.finished_history(60)
        day = await store.finished_history(MAX_HISTORY_MINUTES)
        # One run every 3 minutes back from base, a moment ago: 20 in the
        # last hour (the current minute included), all 30 in the day.
        assert sum(m.completed + m.failed + m.cancelled for m in hour) == 20
        assert sum(m.completed + m.failed + m.cancelled for m in day) == 30
        assert sum(m.failed for m in day) == 10
        assert hour == day[-len(hour) :]
        assert day[-1].minute == base.replace(second=0, microsecond=0)
    finally:
        await store.close()


def _counts(history: list[FinishedMinute]) -> dict[str, tuple[int, int, int]]:
    return {f"{m.minute:%H:%M}": (m.completed, m.failed, m.cancelled) for m in history}


async def _finish(store: PostgresStorage, status: str) -> str:
    """Create a run of ``wf`` and end it with ``status``, at the storage clock."""
    run_id = (await store.create_run(NewRun("wf", "1"))).run.id
    if status == "cancelled":
        assert await store.update_run_status(run_id, "cancelled")
        return run_id
    [held] = await store.claim_runs(["wf"], 1, LEASE)
    if status == "completed":
        assert await store.finish_run(held.lease, "completed", output="1")
    else:
        assert await store.finish_run(held.lease, "failed", error="boom")
    return run_id


async def _local_minute(conn: psycopg.AsyncConnection[Any], attempt: int) -> tuple[str, datetime]:
    """The connection's TimeZone, and the minute 12:00:59 UTC on 1 June 1965 falls
    in there, truncated without a zone (as finished_history does not)."""
    cur = await conn.execute(
        "SELECT current_setting('TimeZone'),"
        " date_trunc('minute', timestamptz '1965-06-01 12:00:59+00')"
    )
    row = await cur.fetchone()
    assert row is not None
    return str(row[0]), row[1]


async def test_finished_runs_count_in_the_minute_of_the_storage_clock(
    postgres_url: str,
) -> None:
    """Runs count in the UTC minute the storage clock (a test clock here, far
    from the server's) read when they finished, from minutes - 1 minutes
    before the clock's minute to that minute: the last microsecond of a
    minute counts in it, the first of the next in the next. The connection's
    TimeZone does not move the minutes, not even one 44 minutes and 30
    seconds from UTC (Monrovia's until 1972). A requeued run and a purged
    one count no more; runs whose finish the clock has not reached (it was
    turned back) are not in the last minutes."""
    clock = Clock(datetime(1965, 6, 1, 12, 0, 59, 999999, tzinfo=UTC))
    store = PostgresStorage.from_url(
        postgres_url, clock=clock, connect_kwargs={"options": "-c TimeZone=Africa/Monrovia"}
    )
    await store.initialize()
    try:
        # The store's connections are in Monrovia, where 12:00:59 UTC on that
        # day was 11:16:29 local time, and the local minute began at 12:00:30 UTC.
        zone, local_minute = await store._db.run("zone", _local_minute)
        assert zone == "Africa/Monrovia"
        assert local_minute == datetime(1965, 6, 1, 12, 0, 30, tzinfo=UTC)
        await _finish(store, "completed")
        await _finish(store, "failed")
        clock.now = datetime(1965, 6, 1, 12, 1, tzinfo=UTC)
        await _finish(store, "cancelled")
        await _finish(store, "completed")
        clock.now = datetime(1965, 6, 1, 12, 4, 30, tzinfo=UTC)
        failed = await _finish(store, "failed")
        assert _counts(await store.finished_history(5)) == {
            "12:00": (1, 1, 0),
            "12:01": (1, 0, 1),
            "12:04": (0, 1, 0),
        }
        assert _counts(await store.finished_history(4)) == {
            "12:01": (1, 0, 1),
            "12:04": (0, 1, 0),
        }
        assert _counts(await store.finished_history(1)) == {"12:04": (0, 1, 0)}
        assert all(m.minute.tzinfo is UTC for m in await store.finished_history(5))

        # The clock turned back: the runs it has not reached are not counted.
        clock.now = datetime(1965, 6, 1, 12, 1, 59, tzinfo=UTC)
        assert _counts(await store.finished_history(60)) == {
            "12:00": (1, 1, 0),
            "12:01": (1, 0, 1),
        }

        clock.now = datetime(1965, 6, 1, 12, 5, tzinfo=UTC)
        assert await store.requeue_run(failed)
        assert _counts(await store.finished_history(60)) == {
            "12:00": (1, 1, 0),
            "12:01": (1, 0, 1),
        }
        assert await store.purge_finished(timedelta(minutes=4)) == 2  # before 12:01
        assert _counts(await store.finished_history(60)) == {"12:01": (1, 0, 1)}
        clock.now = datetime(1965, 6, 2, 12, 0, tzinfo=UTC)
        assert _counts(await store.finished_history(MAX_HISTORY_MINUTES)) == {"12:01": (1, 0, 1)}
        for minutes in (0, -1, MAX_HISTORY_MINUTES + 1, True, 1.0):
            with pytest.raises(ConfigError):
                await store.finished_history(minutes)  # type: ignore[arg-type]
    finally:
        await store.close()
