"""Priorities and concurrency limits on PostgreSQL: what the conformance
suite cannot see from outside.

Many claimers and stoppers on many connections never have more than a
key's max running (claims of a key and the writes that stop its holders are
serialized by the key's advisory lock, and count the holders after it); a
claim behind thousands of full keys never reads their blocked runs; every
kind of stop unblocks the first blocked run of each key it held, and wakes
its workflow's workers; runs without limits never pay for any of it.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta

import psycopg
from psycopg import sql

from reflow_core.storage import ClaimedRun, ConcurrencyLimit, NewRun, StepRecord
from reflow_postgres import PostgresStorage

from ._plans import Admin, assert_index_lookup, blocked_runs, blocks, explain_claim

LEASE = timedelta(seconds=60)


def _limit(key: str, most: int = 1) -> tuple[ConcurrencyLimit, ...]:
    return (ConcurrencyLimit(key, most),)


async def test_many_claimers_and_stoppers_never_exceed_a_limit(
    postgres_url: str, schema: str, postgres_database: str
) -> None:
    """Eight workers on their own connections claim runs of three keys with
    max 1 (some runs also hold a shared key with max 2) and stop them every
    way a run stops: finish (alone and batched), fail, hand back, sleep,
    wait, cancel. A sampler on its own connection never sees more than the
    max running, nor does the workers' own bookkeeping (a run counts from
    its claim until its stop is called); every run ends."""
    keys = ["k0", "k1", "k2"]
    producer = PostgresStorage.from_url(postgres_url)
    await producer.initialize()
    total = 90
    for i in range(total):
        limits: tuple[ConcurrencyLimit, ...] = (ConcurrencyLimit(keys[i % 3], 1),)
        if i % 4 == 0:
            limits += (ConcurrencyLimit("shared", 2),)
        await producer.create_run(NewRun("wf", str(i), priority=i % 5, limits=limits))
    in_hand: dict[str, int] = {}
    worst: dict[str, int] = {}
    seen_by_sampler: list[tuple[str, int]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        query = sql.SQL(
            "SELECT k, count(*) FROM {}.runs, unnest(ARRAY[limit_key1, limit_key2]) AS k"
            " WHERE status = 'running' AND k IS NOT NULL GROUP BY k"
        ).format(sql.Identifier(schema))
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            while not stop_sampling.is_set():
                for key, count in conn.execute(query).fetchall():
                    seen_by_sampler.append((str(key), int(str(count))))

    sampler = threading.Thread(target=sample)
    sampler.start()

    def held(claimed: ClaimedRun, delta: int) -> None:
        for limit in claimed.run.limits:
            in_hand[limit.key] = in_hand.get(limit.key, 0) + delta
            worst[limit.key] = max(worst.get(limit.key, 0), in_hand[limit.key])
            assert in_hand[limit.key] <= limit.max, (limit.key, in_hand[limit.key])

    async def stop(store: PostgresStorage, claimed: ClaimedRun, rng: random.Random) -> None:
        lease = claimed.lease
        await asyncio.sleep(rng.random() * 0.01)
        held(claimed, -1)  # before the stop is sent: never counted low
        kind = rng.randrange(8) if claimed.run.attempts < 3 else 0
        if kind == 0 or kind == 1:
            step = StepRecord("last", "completed", output="1") if kind == 1 else None
            assert await store.finish_run(lease, "completed", output="1", step=step)
        elif kind == 2:
            assert await store.update_run_status(lease.run_id, "failed", lease=lease, error="e")
        elif kind == 3:
            assert await store.update_run_status(lease.run_id, "pending", lease=lease)
        elif kind == 4:
            assert await store.sleep_run(lease, f"nap{claimed.run.attempts}", timedelta(0))
        elif kind == 5:
            waited = await store.wait_run(
                lease, f"w{claimed.run.attempts}", "never", timedelta(milliseconds=1)
            )
            assert waited is not None
            assert not waited.ready
        elif kind == 6:
            assert await store.update_run_status(lease.run_id, "cancelled")
        else:
            assert await store.update_run_status(lease.run_id, "cancelled", lease=lease)

    async def worker(n: int) -> None:
        rng = random.Random(n)
        store = PostgresStorage.from_url(postgres_url)
        await store.initialize()
        try:
            idle = 0
            while idle < 40:
                batch = await store.claim_runs(["wf"], rng.randrange(1, 4), LEASE)
                for claimed in batch:
                    held(claimed, +1)
                if not batch:
                    idle += 1
                    await asyncio.sleep(0.01)
                    continue
                idle = 0
                await asyncio.gather(*(stop(store, c, rng) for c in batch))
        finally:
            await store.close()

    try:
        await asyncio.gather(*(worker(n) for n in range(8)))
    finally:
        stop_sampling.set()
        sampler.join()
    ended = 0
    cursor = None
    while True:
        page = await producer.list_runs(
            workflow="wf", status=["completed", "failed", "cancelled"], cursor=cursor
        )
        ended += len(page.runs)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    await producer.close()
    assert ended == total
    maxes = {"k0": 1, "k1": 1, "k2": 1, "shared": 2}
    assert seen_by_sampler
    assert all(count <= maxes[key] for key, count in seen_by_sampler), seen_by_sampler
    assert worst.keys() == maxes.keys()
    assert all(worst[key] <= most for key, most in maxes.items()), worst
    # the keys were contended: at least one was used up to its max (on a busy
    # machine the eight claimers may not all overlap on the shared key)
    assert any(worst[key] == most for key, most in maxes.items()), worst


async def test_a_claim_behind_many_full_keys_never_reads_their_blocked_runs(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """9,000 keys at their limit, each with a blocked run, and 1,000 free
    keys with a runnable run each: the claim reads the runnable runs only
    (the blocked ones are in no due index), counting holders and finding a
    key's first blocked run are index lookups, and the blocked runs are left
    as they were."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, lease_epoch,"
            " created_at, updated_at, lease_expires_at, limit_key1, limit_max1)"
            " SELECT 'holder' || i, 'wf', 'running', '1', 1, 1, now(), now(),"
            " now() + interval '1 hour', 'full' || i, 1 FROM generate_series(1, 9000) AS i"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at, wake_at,"
            " limit_key1, limit_max1, blocked_by, priority)"
            " SELECT 'blocked' || i, 'wf', 'pending', '1', now(), now(),"
            " now() - interval '1 hour', 'full' || i, 1, 'full' || i, 10"
            " FROM generate_series(1, 9000) AS i"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at, wake_at,"
            " limit_key1, limit_max1)"
            " SELECT 'free' || i, 'wf', 'pending', '1', now(), now(), now() - interval '1 minute',"
            " 'free' || i, 1 FROM generate_series(1, 1000) AS i"
        ).format(ident)
    )
    admin.execute(sql.SQL("ANALYZE {}.runs").format(ident))
    before = blocked_runs(admin, schema)
    top, *nodes = explain_claim(admin, store, LEASE)
    scans = {(n.get("Node Type"), n.get("Index Name")) for n in nodes if n.get("Index Name")}
    # No table is scanned whole but the empty rate_waits (no blocks to read).
    seq = [n for n in nodes if n.get("Node Type") == "Seq Scan"]
    assert all(n.get("Relation Name") == "rate_waits" for n in seq), seq
    ready = [n for n in nodes if n.get("Index Name") == "runs_ready"]
    assert ready
    assert all(int(str(n["Actual Rows"])) <= 10 for n in ready), ready
    assert ("Index Scan", "runs_due") in scans or ("Index Only Scan", "runs_due") in scans
    # The search for lapsed leases reads the 9,000 running holders' rows
    # (about 190 pages); reading the 9,000 blocked runs too would double it.
    assert blocks(top) < 230

    # What claim_limited and release_limits run, for a key: index lookups.
    for query, index in (
        (
            "SELECT count(*) FROM {}.runs WHERE status = 'running' AND limit_key1 = %(k)s",
            "runs_holding1",
        ),
        (
            "SELECT count(*) FROM {}.runs WHERE status = 'running' AND limit_key2 = %(k)s",
            "runs_holding2",
        ),
        (
            "SELECT id FROM {}.runs WHERE blocked_by = %(k)s"
            " ORDER BY priority DESC, wake_at, id LIMIT 1",
            "runs_blocked",
        ),
    ):
        assert_index_lookup(admin, schema, query, {"k": "full7"}, index)

    claimed = await store.claim_runs(["wf"], 10, LEASE)
    assert len(claimed) == 10
    assert all(c.run.id.startswith("free") for c in claimed)
    assert blocked_runs(admin, schema) == (before[0], 9000)  # untouched
    await store.close()


Stop = Callable[[PostgresStorage, ClaimedRun], Awaitable[object]]


async def _finish(store: PostgresStorage, held: ClaimedRun) -> object:
    return await store.finish_run(held.lease, "completed", output="1")


async def _finish_with_step(store: PostgresStorage, held: ClaimedRun) -> object:
    step = StepRecord("last", "completed", output="1")
    return await store.finish_run(held.lease, "completed", output="1", step=step)


async def _fail(store: PostgresStorage, held: ClaimedRun) -> object:
    return await store.update_run_status(held.run.id, "failed", lease=held.lease, error="e")


async def _fail_unfenced(store: PostgresStorage, held: ClaimedRun) -> object:
    return await store.update_run_status(held.run.id, "failed", error="e")


async def _cancel(store: PostgresStorage, held: ClaimedRun) -> object:
    return await store.update_run_status(held.run.id, "cancelled", lease=held.lease)


async def _cancel_unfenced(store: PostgresStorage, held: ClaimedRun) -> object:
    return await store.update_run_status(held.run.id, "cancelled")


async def _hand_back(store: PostgresStorage, held: ClaimedRun) -> object:
    return await store.update_run_status(held.run.id, "pending", lease=held.lease)


async def _sleep(store: PostgresStorage, held: ClaimedRun) -> object:
    return await store.sleep_run(held.lease, "nap", timedelta(hours=1))


async def _wait(store: PostgresStorage, held: ClaimedRun) -> object:
    waited = await store.wait_run(held.lease, "w", "go", None)
    assert waited is not None
    assert not waited.ready
    return waited


async def _wait_children(store: PostgresStorage, held: ClaimedRun) -> object:
    child = await store.start_child(
        held.lease, "fan", NewRun("kid", "1", run_id=held.run.id + ".kid")
    )
    assert child is not None
    return (await store.wait_children(held.lease, StepRecord("fan", "waiting"))) is False


STOPS: dict[str, Stop] = {
    "finish": _finish,
    "finish_with_step": _finish_with_step,
    "fail": _fail,
    "fail_unfenced": _fail_unfenced,
    "cancel": _cancel,
    "cancel_unfenced": _cancel_unfenced,
    "hand_back": _hand_back,
    "sleep": _sleep,
    "wait": _wait,
    "wait_children": _wait_children,
}


async def test_every_kind_of_stop_unblocks_the_first_blocked_run_and_wakes_its_workers(
    postgres_url: str,
) -> None:
    """For each way a running run stops, with two keys: the first blocked
    run of each key (by priority, then due time) is unblocked in the same
    write, the others stay blocked, and the blocked runs' workers are woken."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    woken: list[str] = []
    sub = await store.subscribe_wakeups(["late"], lambda: woken.append("late"))
    assert store._listener is not None
    await asyncio.wait_for(store._listener.connected.wait(), 5)
    try:
        for name, stop in STOPS.items():
            a, b = f"{name}-a", f"{name}-b"
            limits = (ConcurrencyLimit(a, 1), ConcurrencyLimit(b, 1))
            await store.create_run(NewRun(f"hold-{name}", "1", limits=limits))
            [holder] = await store.claim_runs([f"hold-{name}"], 1, LEASE)
            low = await store.create_run(NewRun("late", "1", limits=_limit(a)))
            high = await store.create_run(NewRun("late", "2", priority=5, limits=_limit(a)))
            other = await store.create_run(NewRun("late", "3", limits=_limit(b)))
            assert await store.claim_runs(["late"], 10, LEASE) == []
            for created, key in ((low, a), (high, a), (other, b)):
                record = await store.get_run(created.run.id)
                assert record is not None, name
                assert record.blocked_by == key, name
            await asyncio.sleep(0.05)
            woken.clear()
            assert await stop(store, holder), name
            blocked = {
                created.run.id: (await store.get_run(created.run.id))
                for created in (low, high, other)
            }
            assert {i: r.blocked_by for i, r in blocked.items() if r is not None} == {
                low.run.id: a,  # the second of key a stays blocked
                high.run.id: None,
                other.run.id: None,
            }, name
            for _ in range(100):
                if woken:
                    break
                await asyncio.sleep(0.02)
            assert woken, name
            claimed = await store.claim_runs(["late"], 10, LEASE)
            assert sorted(c.run.id for c in claimed) == sorted([high.run.id, other.run.id]), name
            for c in claimed:
                assert await store.finish_run(c.lease, "completed", output="1")
            [last] = await store.claim_runs(["late"], 10, LEASE)
            assert last.run.id == low.run.id
            assert await store.finish_run(last.lease, "completed", output="1")
    finally:
        await sub.close()
        await store.close()


async def test_a_cancel_cascade_unblocks_for_every_running_descendant(
    postgres_url: str,
) -> None:
    """Cancelling a parent cancels its running children holding a key (max
    2) and a blocked child: two blocked runs of the key become claimable,
    the cancelled blocked child is blocked no more."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    await store.create_run(NewRun("parent", "1"))
    [parent] = await store.claim_runs(["parent"], 1, LEASE)
    for i in range(3):
        kid = NewRun("kid", str(i), run_id=f"kid{i}", limits=_limit("k", 2))
        assert await store.start_child(parent.lease, "fan", kid) is not None
    running = await store.claim_runs(["kid"], 10, LEASE)
    assert len(running) == 2
    blocked_kid = await store.get_run(
        ({"kid0", "kid1", "kid2"} - {c.run.id for c in running}).pop()
    )
    assert blocked_kid is not None
    assert blocked_kid.blocked_by == "k"
    outside = [
        await store.create_run(NewRun("other", str(i), limits=_limit("k", 2))) for i in range(3)
    ]
    assert await store.claim_runs(["other"], 10, LEASE) == []
    assert await store.update_run_status(parent.run.id, "cancelled")
    cancelled = await store.get_run(blocked_kid.id)
    assert cancelled is not None
    assert cancelled.status == "cancelled"
    assert cancelled.blocked_by is None
    states = [await store.get_run(c.run.id) for c in outside]
    assert sorted(r.blocked_by or "" for r in states if r is not None) == ["", "", "k"]
    assert len(await store.claim_runs(["other"], 10, LEASE)) == 2
    await store.close()


async def test_batched_finishes_of_limited_and_unlimited_runs_unblock(
    postgres_url: str,
) -> None:
    """Concurrent finishes share a statement only for runs without limits;
    those with limits end alone and unblock their keys' next runs."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    for i in range(10):
        await store.create_run(NewRun("wf", str(i), limits=_limit(f"k{i % 5}") if i % 2 else ()))
    first = await store.claim_runs(["wf"], 10, LEASE)
    assert len(first) == 10
    waiting = [
        await store.create_run(NewRun("later", str(i), limits=_limit(f"k{i}"))) for i in range(5)
    ]
    assert await store.claim_runs(["later"], 10, LEASE) == []
    results = await asyncio.gather(
        *(store.finish_run(c.lease, "completed", output="1") for c in first)
    )
    assert all(results)
    for created in waiting:
        record = await store.get_run(created.run.id)
        assert record is not None
        assert record.blocked_by is None
    assert len(await store.claim_runs(["later"], 10, LEASE)) == 5
    await store.close()


async def test_priorities_order_pending_and_timed_runs(postgres_url: str) -> None:
    """Due runs go by priority, highest first, then by due time: pending
    runs and runs whose sleep is over alike; lapsed leases come first."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    await store.create_run(NewRun("wf", "nap", priority=3))
    [napper] = await store.claim_runs(["wf"], 1, LEASE)
    assert await store.sleep_run(napper.lease, "nap", timedelta(0))
    for i, priority in enumerate([0, 5, -2, 5, 1]):
        await store.create_run(NewRun("wf", str(i), priority=priority))
    claimed = await store.claim_runs(["wf"], 10, LEASE)
    assert [(c.run.input, c.run.priority) for c in claimed] == [
        ("1", 5),
        ("3", 5),
        ("nap", 3),
        ("4", 1),
        ("0", 0),
        ("2", -2),
    ]
    await store.close()


async def test_a_higher_priority_timed_run_goes_before_an_earlier_due_one(
    postgres_url: str,
) -> None:
    """Two runs that slept and are both due: the one of the higher priority
    is claimed first, though the other fell due earlier (the claim sorts the
    due timed runs by priority, not only by due time)."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        low = await store.create_run(NewRun("timed", '"low"', priority=0))
        high = await store.create_run(NewRun("timed", '"high"', priority=1))
        claimed = {c.run.id: c for c in await store.claim_runs(["timed"], 2, timedelta(minutes=1))}
        await store.sleep_run(claimed[low.run.id].lease, "nap", timedelta(0))
        await asyncio.sleep(0.01)
        await store.sleep_run(claimed[high.run.id].lease, "nap", timedelta(0))
        (first,) = await store.claim_runs(["timed"], 1, timedelta(minutes=1))
        assert first.run.id == high.run.id
    finally:
        await store.close()
