"""What the Redis backend keeps for run deadlines.

The behaviour itself is the conformance suite's and the engine's; these check
the Redis side: the run hash's ``dl`` field, the due set's scores, the
``parked`` scores ``queue_stats`` counts from, and hashes without ``dl``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import redis

from reflow_core import codec
from reflow_core.adapter import to_epoch_us
from reflow_core.storage import NewRun, ScheduleSpec
from reflow_redis import RedisStorage

LEASE = timedelta(seconds=30)
NOW = datetime(2030, 1, 1, tzinfo=UTC)
NOW_US = to_epoch_us(NOW)
MINUTE_US = 60_000_000


def _tag(prefix: str) -> str:
    return "{" + prefix + "}"


async def test_a_deadline_is_stored_and_caps_a_delay(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url, clock=lambda: NOW)
    await store.initialize()
    tag = _tag(prefix)
    try:
        plain = await store.create_run(NewRun("wf", codec.encode(1)))
        capped = await store.create_run(
            NewRun("wf", codec.encode(2), delay=timedelta(hours=1), deadline=timedelta(minutes=5))
        )
        short = await store.create_run(
            NewRun("wf", codec.encode(3), delay=timedelta(minutes=1), deadline=timedelta(hours=1))
        )
        assert plain.run.deadline_at is None
        assert raw.hget(f"{tag}:run:{plain.run.id}", "dl") is None
        assert capped.run.deadline_at == NOW + timedelta(minutes=5)
        assert capped.run.wake_at == NOW + timedelta(minutes=5)
        assert raw.hget(f"{tag}:run:{capped.run.id}", "dl") == str(NOW_US + 5 * MINUTE_US).encode()
        assert raw.zscore(f"{tag}:due:wf", capped.run.id) == NOW_US + 5 * MINUTE_US
        assert short.run.wake_at == NOW + timedelta(minutes=1)
        assert raw.zscore(f"{tag}:due:wf", short.run.id) == NOW_US + MINUTE_US
        for created in (plain, capped, short):
            assert await store.get_run(created.run.id) == created.run
    finally:
        await store.close()


async def test_batched_creates_and_schedule_slots_keep_their_deadlines(
    redis_url: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url, clock=lambda: NOW)
    await store.initialize()
    try:
        results = await asyncio.gather(
            *(
                store.create_run(NewRun("wf", codec.encode(i), deadline=timedelta(minutes=i + 1)))
                for i in range(5)
            )
        )
        for i, result in enumerate(results):
            assert result.run.deadline_at == NOW + timedelta(minutes=i + 1)
            stored = await store.get_run(result.run.id)
            assert stored is not None
            assert stored.deadline_at == NOW + timedelta(minutes=i + 1)
        await store.upsert_schedule(ScheduleSpec("s", "wf", codec.encode(0), "every:60", NOW))
        fired = await store.claim_schedule_slot(
            "s",
            NOW,
            NOW + timedelta(minutes=1),
            NewRun("wf", codec.encode(0), "s@1", deadline=timedelta(seconds=30)),
        )
        assert fired is not None
        assert fired.deadline_at == NOW + timedelta(seconds=30)
        assert await store.get_run(fired.id) == fired
    finally:
        await store.close()


async def test_a_sleep_and_a_wait_are_due_by_the_run_deadline(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url, clock=lambda: NOW)
    await store.initialize()
    tag = _tag(prefix)
    deadline_us = NOW_US + 10 * MINUTE_US
    try:
        sleeper = await store.create_run(
            NewRun("wf", codec.encode(1), deadline=timedelta(minutes=10))
        )
        waiter = await store.create_run(
            NewRun("wf", codec.encode(2), deadline=timedelta(minutes=10))
        )
        late = await store.create_run(NewRun("wf", codec.encode(3), deadline=timedelta(minutes=10)))
        claims = {c.run.id: c for c in await store.claim_runs(["wf"], 3, LEASE)}
        # A sleep past the deadline: the step keeps its own wake time.
        woke = await store.sleep_run(claims[sleeper.run.id].lease, "nap", timedelta(hours=1))
        assert woke == NOW + timedelta(hours=1)
        run = await store.get_run(sleeper.run.id)
        assert run is not None
        assert run.wake_at == NOW + timedelta(minutes=10)
        assert raw.zscore(f"{tag}:due:wf", sleeper.run.id) == deadline_us
        steps = await store.get_step_results(sleeper.run.id)
        assert steps["nap"].wake_at == NOW + timedelta(hours=1)
        # A wait without a timeout enters the due set at the run's deadline.
        waited = await store.wait_run(claims[waiter.run.id].lease, "ev", "go", None)
        assert waited is not None
        assert not waited.ready
        assert waited.deadline is None
        run = await store.get_run(waiter.run.id)
        assert run is not None
        assert run.wake_at == NOW + timedelta(minutes=10)
        assert raw.zscore(f"{tag}:due:wf", waiter.run.id) == deadline_us
        assert raw.zscore(f"{tag}:parked:wf", waiter.run.id) == 1
        assert (await store.get_step_results(waiter.run.id))["ev"].wake_at is None
        # A wait with a timeout before the deadline keeps its own.
        timed = await store.wait_run(claims[late.run.id].lease, "ev", "go", timedelta(minutes=2))
        assert timed is not None
        assert timed.deadline == NOW + timedelta(minutes=2)
        assert raw.zscore(f"{tag}:due:wf", late.run.id) == NOW_US + 2 * MINUTE_US
        [stats] = await store.queue_stats(["wf"])
        assert (stats.pending, stats.sleeping, stats.waiting) == (0, 1, 2)
    finally:
        await store.close()


async def test_a_requeue_drops_the_deadline_and_old_hashes_read_without_one(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url, clock=lambda: NOW)
    await store.initialize()
    tag = _tag(prefix)
    try:
        created = await store.create_run(
            NewRun("wf", codec.encode(1), deadline=timedelta(minutes=1))
        )
        assert await store.update_run_status(created.run.id, "cancelled")
        assert await store.requeue_run(created.run.id)
        run = await store.get_run(created.run.id)
        assert run is not None
        assert run.deadline_at is None
        assert raw.hget(f"{tag}:run:{created.run.id}", "dl") is None
        # Sleeping without a deadline is due at the step's own time.
        [claimed] = await store.claim_runs(["wf"], 1, LEASE)
        await store.sleep_run(claimed.lease, "nap", timedelta(hours=1))
        assert raw.zscore(f"{tag}:due:wf", created.run.id) == NOW_US + 60 * MINUTE_US
    finally:
        await store.close()
