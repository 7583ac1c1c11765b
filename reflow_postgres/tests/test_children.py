"""Child runs on PostgreSQL: what the conformance suite cannot see from outside.

Concurrent ends of one parent's children, from many connections, wake the
parent exactly when the last one ends (each end locks the parent first, and
checks the other children in a snapshot taken after that lock); a cancel
cascades to every run below, also against children being started at the
same moment; a run that is no child ends without its parent ever being
looked up; the wake-ups reach the workers of the child's and of the
parent's workflow.
"""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import psycopg
from psycopg import sql

from reflow_core.storage import CHILDREN_WAIT_PREFIX, Lease, NewRun, StepRecord
from reflow_postgres import PostgresStorage

Admin = psycopg.Connection[tuple[object, ...]]
LEASE = timedelta(seconds=60)


async def _parent_with_children(
    store: PostgresStorage, workflow: str, kids: int, step: str = "fan"
) -> tuple[Lease, list[str]]:
    """A claimed run of ``workflow`` that started ``kids`` children at ``step``."""
    created = await store.create_run(NewRun(workflow, "0"))
    [claimed] = await store.claim_runs([workflow], 1, LEASE)
    assert claimed.run.id == created.run.id
    ids = []
    for i in range(kids):
        child = await store.start_child(
            claimed.lease, step, NewRun(f"{workflow}-kid", str(i), run_id=f"{created.run.id}.{i}")
        )
        assert child is not None
        ids.append(child.id)
    return claimed.lease, ids


async def _park(store: PostgresStorage, lease: Lease, step: str = "fan") -> None:
    parked = await store.wait_children(lease, StepRecord(step, "waiting"))
    assert parked is False


async def test_children_ending_at_once_from_many_connections_wake_their_parent(
    postgres_url: str,
) -> None:
    """Each round, a parent waits for 24 children, claimed by six storages
    (six pools) and ended all at the same moment in every way a run ends:
    finished (group commits of several at once among them), failed or
    cancelled, with or without a lease. However the ends interleave, the
    last one wakes the parent: it is claimable at once, and only then."""
    stores = [PostgresStorage.from_url(postgres_url, pool_max_size=8) for _ in range(6)]
    await asyncio.gather(*(s.initialize() for s in stores))
    rng = random.Random(5)
    try:
        for round_ in range(12):
            wf = f"parent{round_}"
            lease, kids = await _parent_with_children(stores[0], wf, 24)
            await _park(stores[0], lease)
            claims = []
            for store in stores:
                claims.extend((store, c) for c in await store.claim_runs([f"{wf}-kid"], 4, LEASE))
            assert sorted(c.run.id for _, c in claims) == sorted(kids)
            go = asyncio.Event()

            async def end(
                store: PostgresStorage, lease: Lease, how: int, go: asyncio.Event = go
            ) -> bool:
                await go.wait()
                if how == 0:
                    return await store.finish_run(lease, "completed", output="1")
                if how == 1:
                    return await store.finish_run(lease, "failed", error="e")
                if how == 2:
                    return await store.update_run_status(
                        lease.run_id, "failed", lease=lease, error="e"
                    )
                if how == 3:
                    return await store.update_run_status(lease.run_id, "cancelled")
                return await store.finish_run(
                    lease, "completed", output="1", step=StepRecord("last", "completed")
                )

            tasks = [
                asyncio.create_task(end(store, c.lease, rng.randrange(5))) for store, c in claims
            ]
            await asyncio.sleep(0.01)
            go.set()
            assert all(await asyncio.gather(*tasks))
            parent = await stores[1].get_run(lease.run_id)
            assert parent is not None
            assert parent.status == "waiting", round_
            assert parent.waiting_for == CHILDREN_WAIT_PREFIX + "fan"
            assert parent.wake_at is not None, f"round {round_}: the parent was not woken"
            [woken] = await stores[2].claim_runs([wf], 10, LEASE)
            assert woken.run.id == lease.run_id
            assert await stores[2].wait_children(woken.lease, StepRecord("fan", "waiting"))
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_child_ending_as_its_parent_parks_is_never_missed(postgres_url: str) -> None:
    """The parent's wait_children and its last child's end race from two
    connections: either the wait sees the child ended and keeps the lease,
    or the end sees the parent waiting and wakes it; never neither."""
    a, b = PostgresStorage.from_url(postgres_url), PostgresStorage.from_url(postgres_url)
    await asyncio.gather(a.initialize(), b.initialize())
    try:
        for round_ in range(30):
            wf = f"race{round_}"
            lease, [_kid] = await _parent_with_children(a, wf, 1)
            [claimed] = await b.claim_runs([f"{wf}-kid"], 1, LEASE)
            ready, ended = await asyncio.gather(
                a.wait_children(lease, StepRecord("fan", "waiting")),
                b.finish_run(claimed.lease, "completed", output="1"),
            )
            assert ended
            parent = await a.get_run(lease.run_id)
            assert parent is not None
            if ready:
                assert parent.status == "running"
            else:
                assert parent.status == "waiting"
                assert parent.wake_at is not None, f"round {round_}: the end was missed"
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_a_cancel_cascades_to_children_started_at_the_same_moment(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """A tree three levels deep, its runs still starting children while its
    root is cancelled from another connection: once both are done, no run
    below the root is unfinished (a start either came first and its child
    was cancelled, or found its parent cancelled and started nothing), and
    every run the cancel ended lost its buffered events."""
    a, b = PostgresStorage.from_url(postgres_url), PostgresStorage.from_url(postgres_url)
    await asyncio.gather(a.initialize(), b.initialize())
    ident = sql.Identifier(schema)
    try:
        for round_ in range(10):
            wf = f"tree{round_}"
            root, kids = await _parent_with_children(a, wf, 3)
            claimed = await a.claim_runs([f"{wf}-kid"], 10, LEASE)
            assert len(claimed) == 3
            for c in claimed:
                assert await a.deliver_event(c.run.id, "e", "1")

            async def spawn(lease: Lease, n: int) -> None:
                for i in range(n):
                    child = NewRun("leaf", "1", run_id=f"{lease.run_id}.{i}")
                    if await a.start_child(lease, "s", child) is None:
                        return

            spawning = [asyncio.create_task(spawn(c.lease, 20)) for c in claimed]
            await asyncio.sleep(0.002 * round_)
            assert await b.update_run_status(root.run_id, "cancelled")
            await asyncio.gather(*spawning)
            rows = admin.execute(
                sql.SQL(
                    "WITH RECURSIVE d AS (SELECT id FROM {}.runs WHERE parent_id = %s"
                    " UNION ALL SELECT r.id FROM {}.runs r JOIN d ON r.parent_id = d.id)"
                    " SELECT r.status, r.finished_at IS NOT NULL, r.lease_expires_at,"
                    " (SELECT count(*) FROM {}.events e WHERE e.run_id = r.id"
                    "  AND e.taken_at IS NULL)"
                    " FROM {}.runs r JOIN d ON r.id = d.id"
                ).format(ident, ident, ident, ident),
                (root.run_id,),
            ).fetchall()
            assert len(rows) >= 3
            assert {row[:3] for row in rows} == {("cancelled", True, None)}, round_
            assert all(row[3] == 0 for row in rows)
            assert [r.id for r in await a.list_children(root.run_id)] == kids
    finally:
        await asyncio.gather(a.close(), b.close())


def _scans_of_runs(admin: Admin, schema: str) -> int:
    row = admin.execute(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables"
        " WHERE schemaname = %s AND relname = 'runs'",
        (schema,),
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


async def test_a_run_that_is_no_child_ends_without_looking_up_a_parent(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """The statements that end a run (finish, with or without a last step,
    and a fenced fail) read the runs table once, for the run itself, when
    the run is no child: the parent's lock and the wake-up check cost it
    nothing. A child's end does read its parent (it locks it and checks its
    other children). The backend's own statements run here in one
    transaction, whose counters PostgreSQL reports at once."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    lease, _ = await _parent_with_children(store, "wf", 1)
    await _park(store, lease)
    [kid] = await store.claim_runs(["wf-kid"], 1, LEASE)
    for _ in range(3):
        await store.create_run(NewRun("plain", "1"))
    plain = await store.claim_runs(["plain"], 3, LEASE)
    await store.close()
    step = {
        "name": "last",
        "step_status": "completed",
        "step_output": "1",
        "step_error": None,
        "step_attempts": 1,
        "step_wake_at": None,
    }
    ends = [
        ("finish", {"status": "completed", "output": "1", "error": None}),
        ("finish_with_step", {"status": "completed", "output": "1", "error": None, **step}),
        ("end_fenced", {"status": "failed", "error": "e", "release": True}),
    ]
    with admin.transaction(force_rollback=True):
        for claimed, (name, values) in zip(plain, ends, strict=True):
            before = _scans_of_runs(admin, schema)
            params = {"id": claimed.run.id, "epoch": claimed.lease.epoch, **values}
            cur = admin.execute(store._sql[name], params)
            assert cur.rowcount == 1, name
            assert _scans_of_runs(admin, schema) - before == 1, name
        before = _scans_of_runs(admin, schema)
        params = {"id": kid.run.id, "epoch": kid.lease.epoch, **ends[0][1]}
        assert admin.execute(store._sql["finish"], params).rowcount == 1
        assert _scans_of_runs(admin, schema) - before > 1
        row = admin.execute(
            sql.SQL("SELECT wake_at IS NOT NULL FROM {}.runs WHERE id = %s").format(
                sql.Identifier(schema)
            ),
            (lease.run_id,),
        ).fetchone()
        assert row == (True,)  # the child's end woke its parent


async def test_starting_a_child_and_waking_a_parent_notify_their_workflows(
    postgres_url: str,
) -> None:
    """start_child wakes an idle worker of the child's workflow (as an enqueue
    does), and the last child's end one of the parent's (as an event that
    wakes a waiting run does), without waiting for a poll."""
    store = PostgresStorage.from_url(postgres_url)
    other = PostgresStorage.from_url(postgres_url)
    await asyncio.gather(store.initialize(), other.initialize())
    kid_woken, parent_woken = asyncio.Event(), asyncio.Event()
    subs = [
        await other.subscribe_wakeups(["boss-kid"], kid_woken.set),
        await other.subscribe_wakeups(["boss"], parent_woken.set),
    ]
    try:
        await asyncio.sleep(0.2)
        created = await store.create_run(NewRun("boss", "0"))
        [claimed] = await store.claim_runs(["boss"], 1, LEASE)
        await asyncio.wait_for(parent_woken.wait(), 5)  # the enqueue's own wake-up
        parent_woken.clear()
        kid_woken.clear()
        child = await store.start_child(
            claimed.lease, "fan", NewRun("boss-kid", "1", run_id=f"{created.run.id}.0")
        )
        assert child is not None
        await asyncio.wait_for(kid_woken.wait(), 5)
        await _park(store, claimed.lease)
        await asyncio.sleep(0.2)
        parent_woken.clear()
        [kid] = await store.claim_runs(["boss-kid"], 1, LEASE)
        assert await store.finish_run(kid.lease, "completed", output="1")
        await asyncio.wait_for(parent_woken.wait(), 5)
    finally:
        for sub in subs:
            await sub.close()
        await asyncio.gather(store.close(), other.close())
