"""Priorities and concurrency limits on Redis, checked in the keys themselves.

A due run of priority 0 is in ``P:due:<wf>``, one of another priority in
``P:pdue:<pr>:<wf>``, and ``P:prios:<wf>`` lists the priorities other than 0
with a non-empty due set. ``P:holders:<key>`` holds the running runs of a
limit key; a run a claim passes over because a limit is full leaves its due
set for ``P:blocked:<key>`` (and ``P:blocked-wf:<wf>``), so no later claim
reads it until a holder of the key stops running.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import timedelta

import redis

from reflow_core.storage import ConcurrencyLimit, Lease, NewRun
from reflow_redis import RedisStorage

from ._clocked_store import open_store

LEASE = timedelta(seconds=30)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def limit_keys(raw: redis.Redis, tag: str) -> set[str]:
    """The priority, holder and blocked keys under the tag, without it."""
    found = set()
    for kind in ("pdue", "prios", "holders", "blocked", "blocked-wf"):
        pattern = f"{tag}:{kind}:*"
        found |= {_text(key)[len(tag) + 1 :] for key in raw.scan_iter(match=pattern, count=1000)}
    return found


def members(raw: redis.Redis, key: str) -> list[str]:
    return [_text(m) for m in raw.zrange(key, 0, -1)]


async def test_the_layout_of_priorities_and_limits_and_its_cleanup(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        one = (ConcurrencyLimit("k:1", 1),)
        await store.create_run(NewRun("wf", "1", run_id="low", priority=-3))
        await store.create_run(NewRun("wf", "2", run_id="zero"))
        await store.create_run(NewRun("wf", "3", run_id="high", priority=5, limits=one))
        await store.create_run(
            NewRun("wf", "4", run_id="two", priority=5, limits=(*one, ConcurrencyLimit("b", 2)))
        )
        assert limit_keys(raw, tag) == {"pdue:5:wf", "pdue:-3:wf", "prios:wf"}
        assert members(raw, f"{tag}:prios:wf") == ["-3", "5"]
        assert members(raw, f"{tag}:due:wf") == ["zero"]
        assert raw.hmget(f"{tag}:run:two", "pr", "k1", "m1", "k2", "m2") == [
            b"5",
            b"k:1",
            b"1",
            b"b",
            b"2",
        ]
        assert raw.hget(f"{tag}:run:zero", "pr") is None  # priority 0 is not stored

        # Priority 5 first; "two" finds k:1 full and is blocked.
        [high] = await store.claim_runs(["wf"], 1, LEASE)
        assert high.run.id == "high"
        claimed = await store.claim_runs(["wf"], 2, LEASE)
        assert [c.run.id for c in claimed] == ["zero", "low"]
        assert limit_keys(raw, tag) == {"holders:k:1", "blocked:k:1", "blocked-wf:wf"}
        assert raw.smembers(f"{tag}:holders:k:1") == {b"high"}
        entries: list[tuple[bytes, float]] = list(
            raw.zrange(f"{tag}:blocked:k:1", 0, -1, withscores=True)  # type: ignore[arg-type]
        )
        [(member, score)] = entries
        assert _text(member).endswith(":two")
        assert score == -5
        assert raw.hget(f"{tag}:run:two", "bb") == b"k:1"
        blocked = await store.get_run("two")
        assert blocked is not None
        assert blocked.blocked_by == "k:1"
        assert blocked.status == "pending"
        stats = {s.workflow: s for s in await store.queue_stats(["wf"])}
        assert stats["wf"].pending == 1
        assert stats["wf"].running == 3

        # Finishing the holder unblocks "two" in the same script.
        assert await store.finish_run(high.lease, "completed", output="5")
        assert limit_keys(raw, tag) == {"pdue:5:wf", "prios:wf"}
        assert raw.hget(f"{tag}:run:two", "bb") is None
        [two] = await store.claim_runs(["wf"], 5, LEASE)
        assert two.run.id == "two"
        assert two.run.blocked_by is None
        assert raw.smembers(f"{tag}:holders:k:1") == {b"two"}
        assert raw.smembers(f"{tag}:holders:b") == {b"two"}
        for done in (two, *claimed):
            assert await store.finish_run(done.lease, "completed", output="6")
        assert limit_keys(raw, tag) == set()
        assert await store.purge_finished(timedelta(0)) == 4
        assert set(raw.scan_iter(match=f"{tag}:run:*")) == set()
        assert limit_keys(raw, tag) == set()


async def test_every_stop_of_a_holder_releases_it_and_cancel_unlists_the_blocked(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        key = (ConcurrencyLimit("k", 1),)
        for i in range(6):
            await store.create_run(NewRun("wf", str(i), run_id=f"r{i}", limits=key))
        [first] = await store.claim_runs(["wf"], 6, LEASE)
        assert first.run.id == "r0"
        assert members(raw, f"{tag}:blocked-wf:wf") == [f"r{i}" for i in range(1, 6)]
        # Cancelling a blocked run takes it out of the blocked indexes.
        assert await store.update_run_status("r3", "cancelled")
        assert len(members(raw, f"{tag}:blocked:k")) == 4
        assert raw.hget(f"{tag}:run:r3", "bb") is None

        async def next_holder() -> Lease:
            [claimed] = await store.claim_runs(["wf"], 6, LEASE)
            assert raw.smembers(f"{tag}:holders:k") == {claimed.run.id.encode()}
            return claimed.lease

        # Each of these stops lets exactly the next blocked run go.
        assert await store.sleep_run(first.lease, "nap", timedelta(hours=1)) is not None
        lease = await next_holder()
        assert lease.run_id == "r1"
        ready = await store.wait_run(lease, "ev", "go", None)
        assert ready is not None
        assert not ready.ready
        lease = await next_holder()
        assert lease.run_id == "r2"
        assert await store.update_run_status(lease.run_id, "pending", lease=lease)
        # r2 is due again from now, r4 (unblocked) since its creation: r4 goes
        # first and r2 is blocked again.
        lease = await next_holder()
        assert lease.run_id == "r4"
        assert await store.update_run_status(lease.run_id, "failed", lease=lease, error="x")
        lease = await next_holder()
        assert lease.run_id == "r5"
        assert await store.update_run_status(lease.run_id, "cancelled")
        assert raw.scard(f"{tag}:holders:k") == 0


async def _create_all(store: RedisStorage, runs: Sequence[NewRun]) -> None:
    for start in range(0, len(runs), 1000):
        await asyncio.gather(*(store.create_run(run) for run in runs[start : start + 1000]))


async def test_a_claim_never_reads_runs_blocked_by_full_keys(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    """9,000 keys at their limit, 1,000 free: the first claim moves the 9,000
    blocked runs out of the due set; later claims never read them again."""
    async with open_store(redis_url) as store:
        full = 9000
        await _create_all(
            store,
            [NewRun("hold", "0", limits=(ConcurrencyLimit(f"k{i}", 1),)) for i in range(full)],
        )
        held = 0
        while held < full:
            held += len(await store.claim_runs(["hold"], 1000, LEASE))
        await _create_all(
            store,
            [
                NewRun("wf", "1", run_id=f"b{i}", limits=(ConcurrencyLimit(f"k{i}", 1),))
                for i in range(full)
            ],
        )
        await _create_all(
            store,
            [
                NewRun("wf", "2", run_id=f"f{i}", limits=(ConcurrencyLimit(f"free{i}", 1),))
                for i in range(1000)
            ],
        )
        claimed = await store.claim_runs(["wf"], 1000, LEASE)
        assert sorted(c.run.id for c in claimed) == sorted(f"f{i}" for i in range(1000))
        assert raw.zcard(f"{tag}:due:wf") == 0
        assert raw.zcard(f"{tag}:blocked-wf:wf") == full
        assert raw.zcard(f"{tag}:blocked:k17") == 1
        # Make every blocked run unreadable for a claim: one that looked at
        # its limits would fail on the max.
        pipe = raw.pipeline(transaction=False)
        for i in range(full):
            pipe.hset(f"{tag}:run:b{i}", "m1", "not a number")
        pipe.execute()
        await _create_all(store, [NewRun("wf", "3", run_id=f"n{i}") for i in range(10)])
        again = await store.claim_runs(["wf"], 1000, LEASE)
        assert sorted(c.run.id for c in again) == [f"n{i}" for i in range(10)]
        assert raw.zcard(f"{tag}:blocked-wf:wf") == full
        assert raw.zcard(f"{tag}:due:wf") == 0


async def test_concurrent_claimers_and_finishers_never_exceed_a_limit(redis_url: str) -> None:
    """Engines on separate connection pools claim, finish, hand back and
    sleep runs sharing keys with max=1; no key ever has two holders."""
    keys = ["a", "b", "c"]
    runs = []
    for i in range(90):
        first = keys[i % 3]
        limits: tuple[ConcurrencyLimit, ...] = (ConcurrencyLimit(first, 1),)
        if i % 4 == 0:
            limits += (ConcurrencyLimit(keys[(i + 1) % 3], 1),)
        runs.append(NewRun(f"wf{i % 2}", str(i), run_id=f"r{i}", priority=i % 3, limits=limits))
    async with AsyncExitStack() as opened:
        stores = [await opened.enter_async_context(open_store(redis_url)) for _ in range(4)]
        await _create_all(stores[0], runs)
        holding: Counter[str] = Counter()
        worst = 0
        done: set[str] = set()
        rng = random.Random(7)

        async def worker(store: RedisStorage) -> None:
            nonlocal worst
            while len(done) < len(runs):
                claimed = await store.claim_runs(["wf0", "wf1"], 3, LEASE)
                if not claimed:
                    await asyncio.sleep(0.001)
                    continue
                for c in claimed:
                    for limit in c.run.limits:
                        holding[limit.key] += 1
                        worst = max(worst, holding[limit.key])
                await asyncio.sleep(rng.random() / 500)
                for c in claimed:
                    for limit in c.run.limits:
                        holding[limit.key] -= 1  # before the store releases it
                    roll = rng.random()
                    if roll < 0.15 and c.run.attempts < 3:
                        assert await store.update_run_status(c.run.id, "pending", lease=c.lease)
                    elif roll < 0.25 and c.run.attempts < 3:
                        assert await store.sleep_run(c.lease, f"s{c.run.attempts}", timedelta(0))
                    else:
                        assert await store.finish_run(c.lease, "completed", output="1")
                        done.add(c.run.id)

        await asyncio.wait_for(
            asyncio.gather(*(worker(s) for s in stores for _ in range(2))), timeout=45
        )
        assert worst == 1
        for run in runs:
            record = await stores[0].get_run(run.run_id or "")
            assert record is not None
            assert record.status == "completed"
            assert record.blocked_by is None
