"""Dropped connections, retention of finished runs, and notifications on the wire."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from reflow_core import ConfigError, codec
from reflow_core.storage import NewRun, StepRecord
from reflow_postgres import PostgresStorage

Admin = psycopg.Connection[tuple[object, ...]]
LEASE = timedelta(seconds=30)


def terminate_pool(admin: Admin, application_name: str) -> int:
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        (application_name,),
    ).fetchall()
    return len(rows)


async def test_operations_survive_their_connections_being_killed(
    postgres_url: str, admin: Admin
) -> None:
    """Every pooled connection dies (as in a server restart): reads and fenced
    writes are retried on fresh connections and each lands exactly once."""
    store = PostgresStorage.from_url(
        f"{postgres_url}&application_name=victim&pool_min_size=3&pool_max_size=3"
    )
    await store.initialize()
    created = await store.create_run(NewRun("wf", codec.encode(1)))
    [claimed] = await store.claim_runs(["wf"], 1, LEASE)
    # Hold three connections at once so the pool really has three.
    await asyncio.gather(*(store.get_run(created.run.id) for _ in range(6)))

    assert terminate_pool(admin, "victim") >= 1
    assert await store.get_run(created.run.id) is not None

    terminate_pool(admin, "victim")
    step = StepRecord("a", "completed", output=codec.encode(2))
    assert await store.save_step_result(claimed.lease, step, LEASE)

    terminate_pool(admin, "victim")
    assert await store.finish_run(claimed.lease, "completed", output=codec.encode(2))

    terminate_pool(admin, "victim")
    again = await store.create_run(NewRun("wf", codec.encode(1), run_id="fixed-id"))
    assert again.created
    steps = await store.get_step_results(created.run.id)
    assert list(steps) == ["a"]
    run = await store.get_run(created.run.id)
    assert run is not None
    assert run.status == "completed"
    await store.close()


async def test_purge_deletes_only_old_finished_runs_with_their_steps_and_events(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    finished = []
    for i in range(5):
        created = await store.create_run(NewRun("wf", codec.encode(i), idempotency_key=f"k{i}"))
        finished.append(created.run.id)
    claimed = await store.claim_runs(["wf"], 5, LEASE)
    for c in claimed:
        await store.deliver_event(c.run.id, "ev", codec.encode(1), event_id="e1")
        assert await store.finish_run(
            c.lease, "completed", output="1", step=StepRecord("a", "completed", output="1")
        )
    keep_pending = (await store.create_run(NewRun("wf", "1"))).run.id
    keep_failed_recent = (await store.create_run(NewRun("other", "1"))).run.id
    [other] = await store.claim_runs(["other"], 1, LEASE)
    await store.finish_run(other.lease, "failed", error="1")
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "UPDATE {}.runs SET finished_at = now() - interval '2 days' WHERE id = ANY(%s)"
        ).format(ident),
        (finished,),
    )

    assert await store.purge_finished(timedelta(days=1), batch=2) == 5
    assert await store.purge_finished(timedelta(days=1)) == 0
    for run_id in finished:
        assert await store.get_run(run_id) is None
        assert await store.get_step_results(run_id) == {}
    left = admin.execute(sql.SQL("SELECT count(*) FROM {}.events").format(ident)).fetchone()
    assert left == (0,)
    assert await store.get_run(keep_pending) is not None
    assert await store.get_run(keep_failed_recent) is not None
    # The idempotency key of a purged run is free again.
    reused = await store.create_run(NewRun("wf", codec.encode(0), idempotency_key="k0"))
    assert reused.created
    await store.close()


async def test_purge_refuses_a_negative_age(postgres_url: str) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    with pytest.raises(ValueError, match="older_than"):
        await store.purge_finished(timedelta(seconds=-1))
    await store.close()


async def finished_runs(store: PostgresStorage, admin: Admin, schema: str, count: int) -> list[str]:
    """``count`` completed runs that finished 2 to ``count + 1`` days ago, oldest first
    (created in the reverse order, so creation order is not finish order)."""
    ids = [(await store.create_run(NewRun("wf", codec.encode(i)))).run.id for i in range(count)]
    for claimed in await store.claim_runs(["wf"], count, LEASE):
        assert await store.finish_run(claimed.lease, "completed", output="1")
    admin.execute(
        sql.SQL(
            "UPDATE {}.runs AS r SET finished_at = now() - make_interval(days => 2 + t.n::int)"
            " FROM unnest(%s::text[]) WITH ORDINALITY AS t(id, n) WHERE r.id = t.id"
        ).format(sql.Identifier(schema)),
        (ids,),
    )
    return ids[::-1]


async def test_purge_limit_bounds_the_runs_deleted_oldest_first(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        oldest_first = await finished_runs(store, admin, schema, 7)
        assert await store.purge_finished(timedelta(days=1), batch=2, limit=3) == 3
        for run_id in oldest_first[:3]:
            assert await store.get_run(run_id) is None
        for run_id in oldest_first[3:]:
            assert await store.get_run(run_id) is not None
        assert await store.purge_finished(timedelta(days=1), limit=1) == 1
        assert await store.get_run(oldest_first[3]) is None
        # A limit above what is due deletes what is due, whatever the batch size.
        assert await store.purge_finished(timedelta(days=1), batch=1, limit=10) == 3
        assert await store.purge_finished(timedelta(days=1), limit=10) == 0
    finally:
        await store.close()


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "3"])
async def test_purge_refuses_a_bad_limit_and_deletes_nothing(
    postgres_url: str, schema: str, admin: Admin, limit: object
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        ids = await finished_runs(store, admin, schema, 3)
        with pytest.raises(ConfigError, match="limit") as caught:
            await store.purge_finished(timedelta(days=1), limit=limit)  # type: ignore[arg-type]
        assert caught.value.option == "limit"
        for run_id in ids:
            assert await store.get_run(run_id) is not None
    finally:
        await store.close()


async def test_notifications_name_the_workflow_and_the_delay(
    postgres_url: str, postgres_database: str
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    async with await psycopg.AsyncConnection.connect(postgres_database, autocommit=True) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(store.channel)))
        await store.create_run(NewRun("orders", "1"))
        [claimed] = await store.claim_runs(["orders"], 1, LEASE)
        await store.sleep_run(claimed.lease, "nap", timedelta(seconds=90))
        payloads = [n.payload async for n in conn.notifies(timeout=1.0, stop_after=2)]
    await store.close()
    assert payloads[0] == "0|orders"
    delay, _, workflow = payloads[1].partition("|")
    assert workflow == "orders"
    assert 89_000 <= int(delay) <= 90_000


async def test_step_saves_and_heartbeats_send_no_notification(
    postgres_url: str, postgres_database: str
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    await store.create_run(NewRun("orders", "1"))
    [claimed] = await store.claim_runs(["orders"], 1, LEASE)
    async with await psycopg.AsyncConnection.connect(postgres_database, autocommit=True) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(store.channel)))
        for i in range(5):
            await store.save_step_result(claimed.lease, StepRecord(f"s{i}", "completed"), LEASE)
            await store.heartbeat_run(claimed.lease, LEASE)
        await store.finish_run(claimed.lease, "completed", output="1")
        payloads = [n.payload async for n in conn.notifies(timeout=0.5)]
    await store.close()
    assert payloads == []
