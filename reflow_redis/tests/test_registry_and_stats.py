"""What the Redis backend keeps for paused schedules, workers and queue statistics.

The behaviour itself is the conformance suite's; these check the Redis side:
data an older version wrote, the indexes the scripts keep, and the keys.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import redis

from reflow_core import codec
from reflow_core.adapter import to_epoch_us
from reflow_core.storage import NewRun, ScheduleSpec, WorkerInfo
from reflow_redis import RedisStorage

LEASE = timedelta(seconds=30)


async def test_a_schedule_stored_by_an_older_version_reads_as_running(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    try:
        now = await store.now()
        slot = now - timedelta(seconds=1)
        tag = "{" + prefix + "}"
        stamp = str(to_epoch_us(slot))
        # The hash and indexes as the previous version wrote them: no 'p' field.
        raw.hset(
            f"{tag}:sched:old",
            mapping={"wf": "wf", "in": codec.encode(1), "rec": "every:60", "next": stamp}
            | {"c": stamp, "u": stamp},
        )
        raw.zadd(f"{tag}:schedule-due", {"old": int(stamp)})
        raw.zadd(f"{tag}:schedule-keys", {"old": 0})
        [listed] = await store.list_schedules()
        assert not listed.paused
        assert [s.key for s in await store.due_schedules(5)] == ["old"]
        again = await store.upsert_schedule(
            ScheduleSpec("old", "wf", codec.encode(2), "every:60", now)
        )
        assert not again.paused
        assert again.next_run_at == slot
        paused = await store.set_schedule_paused("old", True)
        assert paused is not None
        assert paused.paused
        assert raw.zscore(f"{tag}:schedule-due", "old") is None  # out of the due index
        assert await store.due_schedules(5) == []
        resumed = await store.set_schedule_paused("old", False)
        assert resumed is not None
        assert not resumed.paused
        assert raw.zscore(f"{tag}:schedule-due", "old") == int(stamp)
        fired = await store.claim_schedule_slot(
            "old", slot, now + timedelta(minutes=1), NewRun("wf", codec.encode(2), "old@1")
        )
        assert fired is not None
    finally:
        await store.close()


async def test_lapsed_workers_leave_redis_and_new_keys_carry_the_hash_tag(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    tag = "{" + prefix + "}"
    try:
        await store.announce_worker(
            WorkerInfo("gone", "h", 1, ("wf",), 2, 0), timedelta(milliseconds=50)
        )
        await store.announce_worker(WorkerInfo("here", "h", 2, ("wf",), 2, 1), timedelta(minutes=1))
        await store.create_run(NewRun("wf", codec.encode(1)))
        [claimed] = await store.claim_runs(["wf"], 1, LEASE)
        assert await store.sleep_run(claimed.lease, "nap", timedelta(hours=1)) is not None
        await store.queue_stats()
        keys = {k.decode() for k in raw.scan_iter(match=f"*{prefix}*")}
        assert all(k.startswith(tag + ":") for k in keys), keys
        assert {f"{tag}:worker:gone", f"{tag}:workers", f"{tag}:parked:wf"} <= keys
        await asyncio.sleep(0.1)
        assert [w.id for w in await store.list_workers()] == ["here"]
        assert raw.exists(f"{tag}:worker:gone") == 0
        assert raw.zrange(f"{tag}:workers", 0, -1) == [b"here"]
        assert await store.remove_worker("here")
        assert raw.exists(f"{tag}:workers", f"{tag}:worker:here") == 0
    finally:
        await store.close()


async def test_a_workflow_leaves_the_stats_registry_once_nothing_is_unfinished(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    registry = "{" + prefix + "}:workflows"
    try:
        made = await store.create_run(NewRun("done", codec.encode(1)))
        assert raw.smembers(registry) == {b"done"}
        [claimed] = await store.claim_runs(["done"], 1, LEASE)
        assert await store.finish_run(claimed.lease, "completed", output=codec.encode(1))
        assert raw.smembers(registry) == {b"done"}  # finishing adds no work to the hot path
        assert await store.queue_stats() == []
        assert raw.exists(registry) == 0
        await store.update_run_status(made.run.id, "cancelled")  # terminal: nothing
        assert await store.requeue_run(made.run.id) is False
        [stats] = await store.queue_stats(["done"])
        assert (stats.pending, stats.running) == (0, 0)
    finally:
        await store.close()


async def test_runs_parked_by_an_older_version_do_not_pass_for_the_oldest_pending(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    try:
        await store.create_run(NewRun("wf", codec.encode(1)))
        [claimed] = await store.claim_runs(["wf"], 1, LEASE)
        assert await store.sleep_run(claimed.lease, "nap", timedelta(0)) is not None
        raw.delete("{" + prefix + "}:parked:wf")  # as if it slept before the upgrade
        [stats] = await store.queue_stats(["wf"])
        assert stats.pending == 0
        assert stats.oldest_pending_since is None
        later = await store.create_run(NewRun("wf", codec.encode(2)))
        [stats] = await store.queue_stats(["wf"])
        assert stats.oldest_pending_since == later.run.wake_at
    finally:
        await store.close()
