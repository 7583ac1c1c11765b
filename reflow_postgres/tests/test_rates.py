"""Rate limits and debounce on PostgreSQL: what the conformance suite cannot
see from outside.

A claim behind thousands of rate-blocked runs never reads them (they are in
no due index), and the probe for a due rate wait is an index lookup; many
claimers on many connections never put more than a key's max claims in a
window of its period (claims of a key are serialized by its advisory lock);
debounced creates from many connections at once leave one open run.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from psycopg import sql

from reflow_core.storage import RATE_BLOCK_PREFIX, NewRun, RateLimit, ScheduleSpec
from reflow_postgres import PostgresStorage

from ._plans import Admin, assert_index_lookup, blocked_runs, blocks, explain_claim

LEASE = timedelta(seconds=60)


class Clock:
    """A test clock that moves only when told."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


async def test_a_claim_behind_many_rate_blocked_runs_never_reads_them(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """9,000 runs blocked by 9,000 full rate keys (with their waits, not yet
    due) and 1,000 runnable runs holding free rate keys: the claim reads the
    runnable runs only, its probe for a due rate wait is an index lookup
    that finds none, and the blocked runs are left as they were."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at, wake_at,"
            " rate_key1, rate_max1, rate_period1, blocked_by, priority)"
            " SELECT 'blocked' || i, 'wf', 'pending', '1', now(), now(),"
            " now() - interval '1 hour', 'full' || i, 1, 3600000000, %s || 'full' || i, 10"
            " FROM generate_series(1, 9000) AS i"
        ).format(ident),
        (RATE_BLOCK_PREFIX,),
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.rate_claims (key, claimed_at)"
            " SELECT 'full' || i, now() FROM generate_series(1, 9000) AS i"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.rate_waits (key, due_at)"
            " SELECT 'full' || i, now() + interval '1 hour' FROM generate_series(1, 9000) AS i"
        ).format(ident)
    )
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, created_at, updated_at, wake_at,"
            " rate_key1, rate_max1, rate_period1)"
            " SELECT 'free' || i, 'wf', 'pending', '1', now(), now(), now() - interval '1 minute',"
            " 'free' || i, 1, 3600000000 FROM generate_series(1, 1000) AS i"
        ).format(ident)
    )
    for table in ("runs", "rate_claims", "rate_waits"):
        admin.execute(sql.SQL("ANALYZE {}.{}").format(ident, sql.Identifier(table)))
    before = blocked_runs(admin, schema)
    top, *nodes = explain_claim(admin, store, LEASE)
    assert not [n for n in nodes if n.get("Node Type") == "Seq Scan"], nodes
    ready = [n for n in nodes if n.get("Index Name") == "runs_ready"]
    assert ready
    assert all(int(str(n["Actual Rows"])) <= 10 for n in ready), ready
    probe = [n for n in nodes if n.get("Relation Name") == "rate_waits"]
    assert probe
    assert all(n.get("Index Name") == "rate_waits_due" for n in probe), probe
    assert all(int(str(n["Actual Rows"])) == 0 for n in probe), probe
    assert blocks(top) < 200

    # What claim_held and release_rates run, for a key: index lookups.
    for query, index in (
        (
            "SELECT claimed_at FROM {}.rate_claims WHERE key = %(k)s"
            " ORDER BY claimed_at DESC OFFSET 0 LIMIT 1",
            "rate_claims_key",
        ),
        (
            "SELECT id FROM {}.runs WHERE blocked_by = %(b)s"
            " ORDER BY priority DESC, wake_at, id LIMIT 1",
            "runs_blocked",
        ),
    ):
        params = {"k": "full7", "b": RATE_BLOCK_PREFIX + "full7"}
        assert_index_lookup(admin, schema, query, params, index)

    claimed = await store.claim_runs(["wf"], 10, LEASE)
    assert len(claimed) == 10
    assert all(c.run.id.startswith("free") for c in claimed)
    assert blocked_runs(admin, schema) == (before[0], 9000)  # untouched
    await store.close()


async def test_rate_blocked_runs_are_released_when_the_window_has_room(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """Max 2 claims in 10 s: of five runs two are claimed, three blocked with
    the key's wait set for when the oldest claim leaves the window; nothing
    goes before that, then the first two blocked runs (by priority) go and
    the wait is set again for the last; a lapsed lease over the rate is left
    lapsed (not blocked); the claims table keeps one period's claims only."""
    clock = Clock()
    store = PostgresStorage.from_url(postgres_url, clock=clock)
    await store.initialize()
    ident = sql.Identifier(schema)
    period = timedelta(seconds=10)
    rate = (RateLimit("k", 2, period),)
    try:
        ids = [
            (await store.create_run(NewRun("wf", str(i), priority=i, rates=rate))).run.id
            for i in range(5)
        ]
        start = clock.now
        first = await store.claim_runs(["wf"], 10, LEASE)
        assert [c.run.input for c in first] == ["4", "3"]
        for run_id in ids[:3]:
            record = await store.get_run(run_id)
            assert record is not None
            assert record.blocked_by == RATE_BLOCK_PREFIX + "k"
        waits = admin.execute(sql.SQL("SELECT key, due_at FROM {}.rate_waits").format(ident))
        assert [(str(k), d) for k, d in waits.fetchall()] == [("k", start + period)]

        clock.advance(timedelta(seconds=9))
        assert await store.claim_runs(["wf"], 10, LEASE) == []
        clock.advance(timedelta(seconds=1))
        second = await store.claim_runs(["wf"], 10, LEASE)
        assert [c.run.input for c in second] == ["2", "1"]
        waits = admin.execute(sql.SQL("SELECT key, due_at FROM {}.rate_waits").format(ident))
        assert [(str(k), d) for k, d in waits.fetchall()] == [("k", start + 2 * period)]
        held = admin.execute(
            sql.SQL("SELECT count(*) FROM {}.rate_claims WHERE key = 'k'").format(ident)
        ).fetchone()
        assert held == (2,)  # the first two were trimmed

        # A lapsed lease over a full rate stays lapsed, for a later claim.
        clock.advance(LEASE)  # every lease lapsed, and the window is empty
        again = await store.claim_runs(["wf"], 10, LEASE)
        assert len(again) == 2
        assert all(c.reclaimed for c in again)
        running = (await store.list_runs(status=["running"])).runs
        assert len(running) == 4
        stuck = [r for r in running if r.id not in {c.run.id for c in again}]
        assert len(stuck) == 2
        assert all(r.lease_expires_at is not None for r in stuck)
        assert all(r.lease_expires_at <= clock.now for r in stuck if r.lease_expires_at)
        assert all(r.blocked_by is None for r in stuck)
    finally:
        await store.close()


async def test_many_claimers_never_exceed_a_rate(postgres_url: str) -> None:
    """Eight workers on their own connections claim runs that hold a rate of
    3 claims per 300 ms (half of them also a second rate of 2 per 300 ms)
    as fast as they can: no window of 300 ms ever holds more than a key's
    max claims (claim times read from the leases the claims set), and every
    run is claimed in the end."""
    producer = PostgresStorage.from_url(postgres_url)
    await producer.initialize()
    period = timedelta(milliseconds=300)
    maxes = {"a": 3, "b": 2}
    total = 30
    for i in range(total):
        rates = (RateLimit("a", maxes["a"], period),)
        if i % 2:
            rates += (RateLimit("b", maxes["b"], period),)
        await producer.create_run(NewRun("wf", str(i), priority=i % 3, rates=rates))
    times: dict[str, list[datetime]] = {"a": [], "b": []}
    done: set[str] = set()

    async def worker() -> None:
        store = PostgresStorage.from_url(postgres_url)
        await store.initialize()
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + 20
            while len(done) < total and loop.time() < deadline:
                for claimed in await store.claim_runs(["wf"], 2, LEASE):
                    expires = claimed.run.lease_expires_at
                    assert expires is not None
                    for rate in claimed.run.rates:
                        times[rate.key].append(expires - LEASE)
                    assert await store.finish_run(claimed.lease, "completed", output="1")
                    done.add(claimed.run.id)
                await asyncio.sleep(0.005)
        finally:
            await store.close()

    await asyncio.gather(*(worker() for _ in range(8)))
    await producer.close()
    assert len(done) == total
    assert (len(times["a"]), len(times["b"])) == (total, total // 2)
    for key, most in maxes.items():
        ordered = sorted(times[key])
        for i in range(most, len(ordered)):
            # The claim most + 1 back is a whole period older, or more.
            assert ordered[i] - ordered[i - most] >= period, (key, i, ordered)


async def test_concurrent_debounced_creates_leave_one_open_run(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """Eight stores on their own connections create runs with one debounce
    key at once, 20 each: one open run is left, holding one of the inputs
    sent, created by one of the creates and returned by every other; a
    claim takes it, and the next create makes a new run."""
    stores = [PostgresStorage.from_url(postgres_url) for _ in range(8)]
    await asyncio.gather(*(s.initialize() for s in stores))
    try:
        sent = [f'"{n}-{i}"' for n in range(8) for i in range(20)]

        async def send(n: int) -> list[tuple[str, bool]]:
            out = []
            for i in range(20):
                new = NewRun("wf", f'"{n}-{i}"', debounce_key="d", delay=timedelta(hours=1))
                result = await stores[n].create_run(new)
                out.append((result.run.id, result.created))
            return out

        results = [r for batch in await asyncio.gather(*(send(n) for n in range(8))) for r in batch]
        assert len({run_id for run_id, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        rows = admin.execute(
            sql.SQL("SELECT id, input, status, attempts FROM {}.runs").format(
                sql.Identifier(schema)
            )
        ).fetchall()
        assert len(rows) == 1
        run_id, text, status, attempts = rows[0]
        assert text in sent
        assert (status, attempts) == ("sleeping", 0)  # delayed

        # Concurrent creates with the key from one store share no statement.
        both = await asyncio.gather(
            *(stores[0].create_run(NewRun("wf", f'"x{i}"', debounce_key="d")) for i in range(5))
        )
        assert {r.run.id for r in both} == {run_id}
        assert not any(r.created for r in both)
        record = await stores[1].get_run(str(run_id))
        assert record is not None
        assert record.status == "pending"
        [claimed] = await stores[1].claim_runs(["wf"], 1, LEASE)
        assert claimed.run.id == run_id
        fresh = await stores[2].create_run(NewRun("wf", '"after"', debounce_key="d"))
        assert fresh.created
        assert fresh.run.id != run_id
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_schedule_slot_with_a_debounce_key_updates_the_open_run(
    postgres_url: str,
) -> None:
    """A schedule's run with a debounce key is debounced like any create: a
    second slot fired while the first run is still open updates it."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        now = await store.now()
        spec = ScheduleSpec("tick", "wf", '"s"', "every:60", now)
        await store.upsert_schedule(spec)
        first = await store.claim_schedule_slot(
            "tick", now, now + timedelta(minutes=1), NewRun("wf", '"1"', debounce_key="d")
        )
        assert first is not None
        later = now + timedelta(minutes=1)
        second = await store.claim_schedule_slot(
            "tick", later, later + timedelta(minutes=1), NewRun("wf", '"2"', debounce_key="d")
        )
        assert second is not None
        assert (second.id, second.input, second.status) == (first.id, '"2"', "pending")
        assert len((await store.list_runs(workflow="wf")).runs) == 1
    finally:
        await store.close()


async def test_requeueing_a_never_claimed_debounced_run_keeps_one_open_run(
    postgres_url: str,
) -> None:
    """A debounced run cancelled before any claim, requeued while a newer
    open run holds its key, lets go of the key instead of failing; requeued
    while none does, it is the open run again."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        old = (await store.create_run(NewRun("wf", "1", debounce_key="d"))).run
        assert await store.update_run_status(old.id, "cancelled")
        new = (await store.create_run(NewRun("wf", "2", debounce_key="d"))).run
        assert new.id != old.id
        assert await store.requeue_run(old.id)
        again = await store.get_run(old.id)
        assert again is not None
        assert (again.status, again.debounce_key) == ("pending", None)
        assert await store.update_run_status(new.id, "cancelled")
        assert await store.requeue_run(new.id)
        latest = await store.create_run(NewRun("wf", "3", debounce_key="d"))
        assert (latest.created, latest.run.id, latest.run.input) == (False, new.id, "3")
    finally:
        await store.close()
