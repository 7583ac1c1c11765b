"""Child runs on Redis, checked in the keys themselves.

A child's hash names its parent (``pa``) and the parent's step (``ps``);
``P:children:<parent>`` lists a parent's children in creation order and
``P:open:<n>.<parent>:<step>`` holds the ones at a step that have not ended,
so the script that ends a child knows in O(1) whether its waiting parent
wakes. Purging a parent deletes both; its children stay.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import redis

from reflow_core.storage import CHILDREN_WAIT_PREFIX, NewRun, StepRecord
from reflow_redis import RedisStorage

LEASE = timedelta(seconds=30)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def child_keys(raw: redis.Redis, prefix: str) -> set[str]:
    """The children lists and open sets under the prefix, without the tag."""
    tag = "{" + prefix + "}"
    found = set()
    for pattern in (f"{tag}:children:*", f"{tag}:open:*"):
        found |= {_text(key)[len(tag) + 1 :] for key in raw.scan_iter(match=pattern, count=1000)}
    return found


def waiting(step: str) -> StepRecord:
    return StepRecord(step, "waiting")


async def test_the_layout_of_children_and_its_cleanup(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    try:
        await store.create_run(NewRun("parent", "1", run_id="p:1"))
        [claimed] = await store.claim_runs(["parent"], 1, LEASE)
        lease = claimed.lease
        for i in range(2):
            assert await store.start_child(lease, "fan", NewRun("kid", "2", run_id=f"c{i}"))
        assert child_keys(raw, prefix) == {"children:p:1", "open:3.p:1:fan"}
        tag = "{" + prefix + "}"
        assert raw.hmget(f"{tag}:run:c0", "pa", "ps") == [b"p:1", b"fan"]
        assert raw.smembers(f"{tag}:open:3.p:1:fan") == {b"c0", b"c1"}
        assert await store.wait_children(lease, waiting("fan")) is False
        kids = {c.run.id: c.lease for c in await store.claim_runs(["kid"], 5, LEASE)}
        assert await store.finish_run(kids["c0"], "completed", output="3")
        assert raw.smembers(f"{tag}:open:3.p:1:fan") == {b"c1"}
        assert await store.update_run_status("c1", "failed", lease=kids["c1"], error="4")
        # The last child's end emptied (so deleted) the open set and woke the parent.
        assert child_keys(raw, prefix) == {"children:p:1"}
        parent = await store.get_run("p:1")
        assert parent is not None
        assert parent.waiting_for == CHILDREN_WAIT_PREFIX + "fan"
        assert parent.wake_at is not None
        [again] = await store.claim_runs(["parent"], 1, LEASE)
        assert await store.finish_run(again.lease, "completed", output="5")
        # A requeued child is open again, while its parent exists.
        assert await store.requeue_run("c1")
        assert child_keys(raw, prefix) == {"children:p:1", "open:3.p:1:fan"}
        assert await store.purge_finished(timedelta(0)) == 2  # the parent and c0
        assert child_keys(raw, prefix) == set()
        c1 = await store.get_run("c1")
        assert c1 is not None
        assert (c1.parent_id, c1.status) == ("p:1", "pending")
        assert await store.list_children("p:1") == []
        # Its parent gone, a child that ends or is requeued leaves no key behind.
        assert await store.update_run_status("c1", "cancelled")
        assert await store.requeue_run("c1")
        assert child_keys(raw, prefix) == set()
    finally:
        await store.close()


async def test_a_purged_child_leaves_its_parents_list(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    try:
        await store.create_run(NewRun("parent", "1", run_id="p"))
        [claimed] = await store.claim_runs(["parent"], 1, LEASE)
        assert await store.start_child(claimed.lease, "s", NewRun("kid", "2", run_id="c"))
        assert await store.update_run_status("c", "cancelled")
        assert await store.purge_finished(timedelta(0)) == 1
        assert await store.list_children("p") == []
        assert raw.exists("{" + prefix + "}:children:p") == 0
    finally:
        await store.close()


async def test_the_last_child_s_end_publishes_a_hint_for_the_parent(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    pubsub = raw.pubsub()
    try:
        await store.create_run(NewRun("parent", "1", run_id="p"))
        [claimed] = await store.claim_runs(["parent"], 1, LEASE)
        assert await store.start_child(claimed.lease, "s", NewRun("kid", "2", run_id="c"))
        assert await store.wait_children(claimed.lease, waiting("s")) is False
        pubsub.subscribe(store.channel)
        pubsub.get_message(timeout=1)  # the subscription's confirmation
        assert await store.update_run_status("c", "failed")
        hints = []
        for _ in range(20):
            message = pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "message":
                hints.append(_text(message["data"]))
            await asyncio.sleep(0)
        assert hints == ["0|parent"]
    finally:
        pubsub.close()
        await store.close()


async def test_a_cascade_with_retention_cancels_every_descendant(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    """A retention purge that runs as the cascade ends runs cannot hide a
    descendant below a long-finished child: the cascade finds them all first."""
    store = RedisStorage.from_url(redis_url, retention=timedelta(milliseconds=1))
    await store.initialize()
    try:
        await store.create_run(NewRun("wf", "1", run_id="top"))
        [top] = await store.claim_runs(["wf"], 1, LEASE)
        assert await store.start_child(top.lease, "s", NewRun("wf", "2", run_id="mid"))
        [mid] = await store.claim_runs(["wf"], 1, LEASE)
        assert await store.start_child(mid.lease, "s", NewRun("wf", "3", run_id="low"))
        assert await store.start_child(top.lease, "t", NewRun("wf", "4", run_id="other"))
        assert await store.finish_run(mid.lease, "failed", error="5")
        await asyncio.sleep(0.01)
        assert await store.update_run_status("top", "cancelled")
        for run_id in ("low", "other"):
            record = await store.get_run(run_id)
            assert record is not None
            assert record.status == "cancelled", run_id
    finally:
        await store.close()
