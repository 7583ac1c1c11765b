"""Rate limits and debounce on Redis, checked in the keys themselves.

A run's rates are its ``rk1``/``rm1``/``rp1`` and ``rk2``/``rm2``/``rp2``
fields (periods in µs), its debounce key ``db``. ``P:rate:<key>`` holds the
claims of runs holding a rate key (score the claim time), trimmed to the
period and, by the server clock, expiring with the window; a run a claim
passes over because a rate is full is blocked by ``reflow:rate:<key>`` and
``P:rate-waits`` holds when the key has room again, which the first claim
from then on releases. ``P:debounce:<wf>`` maps a debounce key to the run
last created with it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import redis

from reflow_core.storage import ConcurrencyLimit, NewRun, RateLimit

from ._clocked_store import Clock, open_store

LEASE = timedelta(seconds=30)
START = datetime(2030, 1, 1, tzinfo=UTC)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def scored(raw: redis.Redis, key: str) -> list[tuple[str, int]]:
    rows: list[tuple[bytes, float]] = raw.zrange(key, 0, -1, withscores=True)  # type: ignore[assignment]
    return [(_text(member), int(score)) for member, score in rows]


def rate_keys(raw: redis.Redis, tag: str) -> set[str]:
    """The rate, rate-wait, blocked and debounce keys under the tag, without it."""
    found = set()
    for pattern in ("rate:*", "rate-waits", "blocked:*", "blocked-wf:*", "debounce:*"):
        found |= {
            _text(key)[len(tag) + 1 :]
            for key in raw.scan_iter(match=f"{tag}:{pattern}", count=1000)
        }
    return found


async def test_the_layout_of_rates_and_their_release_after_the_window(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        second = timedelta(seconds=1)
        rates = (RateLimit("api", 2, second), RateLimit("b", 5, timedelta(minutes=1)))
        for i in range(4):
            await store.create_run(NewRun("wf", str(i), run_id=f"r{i}", rates=rates))
        await store.create_run(NewRun("wf", "free", run_id="free"))
        assert raw.hmget(f"{tag}:run:r0", "rk1", "rm1", "rp1", "rk2", "rm2", "rp2") == [
            b"api",
            b"2",
            b"1000000",
            b"b",
            b"5",
            b"60000000",
        ]
        assert raw.hget(f"{tag}:run:free", "rk1") is None
        record = await store.get_run("r0")
        assert record is not None
        assert record.rates == rates

        # Two claims fill the window of "api"; r2 and r3 are blocked by it,
        # and the free run goes past them.
        claimed = await store.claim_runs(["wf"], 5, LEASE)
        assert sorted(c.run.id for c in claimed) == ["free", "r0", "r1"]
        now = _us(START)
        assert [score for _, score in scored(raw, f"{tag}:rate:api")] == [now, now]
        assert len(scored(raw, f"{tag}:rate:b")) == 2
        assert rate_keys(raw, tag) == {
            "rate:api",
            "rate:b",
            "rate-waits",
            "blocked:reflow:rate:api",
            "blocked-wf:wf",
        }
        assert scored(raw, f"{tag}:rate-waits") == [("api", now + 1_000_000)]
        assert [m.split(":", 1)[1] for m, _ in scored(raw, f"{tag}:blocked:reflow:rate:api")] == [
            "r2",
            "r3",
        ]
        blocked = await store.get_run("r2")
        assert blocked is not None
        assert blocked.blocked_by == "reflow:rate:api"
        assert await store._next_due(["other"]) == 1.0  # the wait wakes any worker

        # Until the window has room, claims leave them be.
        clock.now = START + second - timedelta(microseconds=1)
        assert await store.claim_runs(["wf"], 5, LEASE) == []
        assert scored(raw, f"{tag}:rate-waits") == [("api", now + 1_000_000)]

        # The first claim from then on releases both, whatever it asks for.
        clock.now = START + second
        assert await store.claim_runs(["other"], 5, LEASE) == []
        assert raw.exists(f"{tag}:rate-waits", f"{tag}:blocked:reflow:rate:api") == 0
        assert raw.hget(f"{tag}:run:r2", "bb") is None
        claimed = await store.claim_runs(["wf"], 5, LEASE)
        assert sorted(c.run.id for c in claimed) == ["r2", "r3"]
        # The claims that left the window are trimmed as new ones come in.
        later = _us(START + second)
        assert [score for _, score in scored(raw, f"{tag}:rate:api")] == [later, later]
        assert len(scored(raw, f"{tag}:rate:b")) == 4


async def test_a_release_lets_go_only_as_many_as_the_window_has_room_for(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        rate = (RateLimit("k", 2, timedelta(seconds=10)),)
        for i in range(5):
            await store.create_run(NewRun("wf", str(i), run_id=f"r{i}", rates=rate, priority=i))
        [a] = await store.claim_runs(["wf"], 1, LEASE)
        assert a.run.id == "r4"  # highest priority first
        clock.now = START + timedelta(seconds=4)
        claimed = await store.claim_runs(["wf"], 5, LEASE)
        assert [c.run.id for c in claimed] == ["r3"]
        # Full from 4 s: room again at 10 s, when the first claim leaves.
        assert scored(raw, f"{tag}:rate-waits") == [("k", _us(START) + 10_000_000)]
        clock.now = START + timedelta(seconds=10)
        assert await store.claim_runs(["other"], 1, LEASE) == []
        # One room: the first blocked (priority 2) goes, the rest wait for
        # the next claim in the window to leave it (4 s + 10 s).
        assert raw.hget(f"{tag}:run:r2", "bb") is None
        assert raw.hget(f"{tag}:run:r1", "bb") == b"reflow:rate:k"
        assert scored(raw, f"{tag}:rate-waits") == [("k", _us(START) + 14_000_000)]
        [b] = await store.claim_runs(["wf"], 5, LEASE)
        assert b.run.id == "r2"


async def test_claim_keys_expire_with_their_window_by_the_server_clock(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        rate = (RateLimit("short", 1, timedelta(milliseconds=200)),)
        for i in range(2):
            await store.create_run(NewRun("wf", str(i), run_id=f"r{i}", rates=rate))
        [first] = await store.claim_runs(["wf"], 5, LEASE)
        assert 0 < raw.pttl(f"{tag}:rate:short") <= 201
        assert rate_keys(raw, tag) >= {"rate:short", "rate-waits"}
        await asyncio.sleep(0.25)
        assert raw.exists(f"{tag}:rate:short") == 0
        [second] = await store.claim_runs(["wf"], 5, LEASE)
        assert {first.run.id, second.run.id} == {"r0", "r1"}
        for done in (first, second):
            assert await store.finish_run(done.lease, "completed", output="1")
        await asyncio.sleep(0.25)
        assert rate_keys(raw, tag) == set()


async def test_runs_without_rates_leave_no_rate_keys(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        for i in range(3):
            await store.create_run(NewRun("wf", str(i), limits=(ConcurrencyLimit("c", 5),)))
        claimed = await store.claim_runs(["wf"], 5, LEASE)
        assert len(claimed) == 3
        assert rate_keys(raw, tag) == set()


async def test_cancel_and_a_lapsed_lease_over_its_rate(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        rate = (RateLimit("k", 1, timedelta(minutes=1)),)
        for i in range(3):
            await store.create_run(NewRun("wf", str(i), run_id=f"r{i}", rates=rate))
        [first] = await store.claim_runs(["wf"], 1, timedelta(seconds=1))
        assert first.run.id == "r0"
        assert await store.claim_runs(["wf"], 5, LEASE) == []
        assert await store.update_run_status("r1", "cancelled")
        assert [m.split(":", 1)[1] for m, _ in scored(raw, f"{tag}:blocked:reflow:rate:k")] == [
            "r2"
        ]
        assert raw.hget(f"{tag}:run:r1", "bb") is None
        # r0's lease lapses: the window is still full, so it stays lapsed.
        clock.now = START + timedelta(seconds=5)
        assert await store.claim_runs(["wf"], 5, LEASE) == []
        lapsed = await store.get_run("r0")
        assert lapsed is not None
        assert lapsed.status == "running"
        assert lapsed.lease_epoch == 1
        assert lapsed.blocked_by is None
        # Once the window has room, the lapsed lease goes first.
        clock.now = START + timedelta(minutes=1)
        [again] = await store.claim_runs(["wf"], 5, LEASE)
        assert again.run.id == "r0"
        assert again.reclaimed
        # r2 was released, then blocked again by the reclaim's claim.
        assert raw.hget(f"{tag}:run:r2", "bb") == b"reflow:rate:k"
        assert scored(raw, f"{tag}:rate-waits") == [("k", _us(START) + 120_000_000)]


async def test_debounce_pointer_updates_in_place_and_purge_drops_it(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        first = await store.create_run(
            NewRun("wf", "1", debounce_key="d", delay=timedelta(minutes=1), priority=3)
        )
        run_id = first.run.id
        assert first.created
        assert raw.hgetall(f"{tag}:debounce:wf") == {b"d": run_id.encode()}
        assert raw.hget(f"{tag}:run:{run_id}", "db") == b"d"
        assert scored(raw, f"{tag}:parked:wf") == [(run_id, 3)]
        assert scored(raw, f"{tag}:pdue:3:wf") == [(run_id, _us(START) + 60_000_000)]

        # Another workflow's key, or another key, is another run.
        other = await store.create_run(NewRun("wf:x", "1", debounce_key="d"))
        assert other.created
        assert other.run.id != run_id

        # A debounce moves the run to its new priority and due time, pending.
        clock.now = START + timedelta(seconds=10)
        again = await store.create_run(
            NewRun("wf", "2", debounce_key="d", rates=(RateLimit("k", 1, timedelta(seconds=1)),))
        )
        assert not again.created
        assert again.run.id == run_id
        assert again.run.input == "2"
        assert again.run.status == "pending"
        assert again.run.priority == 0
        assert again.run.created_at == START
        assert again.run.wake_at == START + timedelta(seconds=10)
        assert again.run.debounce_key == "d"
        assert again.run.rates == (RateLimit("k", 1, timedelta(seconds=1)),)
        assert raw.exists(f"{tag}:pdue:3:wf", f"{tag}:prios:wf") == 0
        assert scored(raw, f"{tag}:due:wf") == [(run_id, _us(START) + 10_000_000)]
        assert raw.zscore(f"{tag}:parked:wf", run_id) is None
        assert raw.hget(f"{tag}:run:{run_id}", "pr") is None
        assert await store.get_run(run_id) == again.run

        # Claimed, the key is free: the next create makes a new run.
        [claimed] = await store.claim_runs(["wf"], 5, LEASE)
        assert claimed.run.id == run_id
        fresh = await store.create_run(NewRun("wf", "3", debounce_key="d"))
        assert fresh.created
        assert fresh.run.id != run_id
        assert raw.hget(f"{tag}:debounce:wf", "d") == fresh.run.id.encode()

        # Purging the old run leaves the new pointer; purging the new one drops it.
        assert await store.finish_run(claimed.lease, "completed", output="1")
        clock.now += timedelta(seconds=1)
        assert await store.purge_finished(timedelta(0)) == 1
        assert raw.hget(f"{tag}:debounce:wf", "d") == fresh.run.id.encode()
        assert await store.update_run_status(fresh.run.id, "cancelled")
        clock.now += timedelta(seconds=1)
        assert await store.purge_finished(timedelta(0)) == 1
        assert raw.exists(f"{tag}:debounce:wf") == 0


async def test_a_debounce_takes_a_blocked_run_out_of_the_blocked_indexes(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        rate = (RateLimit("k", 1, timedelta(minutes=1)),)
        await store.create_run(NewRun("wf", "0", run_id="0", rates=rate))
        blocked = await store.create_run(NewRun("wf", "1", debounce_key="d", rates=rate))
        [holder] = await store.claim_runs(["wf"], 5, timedelta(hours=1))
        assert holder.run.id == "0"
        run_id = blocked.run.id
        assert raw.hget(f"{tag}:run:{run_id}", "bb") == b"reflow:rate:k"
        again = await store.create_run(
            NewRun("wf", "2", debounce_key="d", delay=timedelta(seconds=5), priority=-2)
        )
        assert again.run.id == run_id
        assert not again.created
        assert again.run.blocked_by is None
        assert again.run.status == "delayed"
        assert again.run.rates == ()
        assert raw.exists(f"{tag}:blocked:reflow:rate:k", f"{tag}:blocked-wf:wf") == 0
        assert scored(raw, f"{tag}:pdue:-2:wf") == [(run_id, _us(START) + 5_000_000)]
        assert scored(raw, f"{tag}:parked:wf") == [(run_id, 3)]
        # The leftover wait finds nothing blocked and goes.
        clock.now = START + timedelta(minutes=1)
        [run] = await store.claim_runs(["wf"], 5, LEASE)
        assert run.run.id == run_id
        assert raw.exists(f"{tag}:rate-waits") == 0
