"""Workflow versions on Redis, checked in the keys themselves.

A run stores its version in ``v`` (absent for 1) and its fingerprint in
``fp`` (absent without). Due runs of version 1 live where they always did
(``P:due:<wf>``, ``P:pdue:<pr>:<wf>`` listed in ``P:prios:<wf>``); those of
another version ``v`` in ``P:vdue:<v>:<pr>:<wf>``, listed (member
``<v>:<pr>``, score the priority) in ``P:vprios:<wf>``. A claim serving some
versions walks only their sets, so runs of other versions are never read,
blocked or changed by it, however many come first.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import redis

from reflow_core.storage import ConcurrencyLimit, Lease, NewRun, RateLimit, StepRecord
from reflow_redis import RedisStorage

from ._clocked_store import Clock, open_store

LEASE = timedelta(seconds=30)
T0 = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def keys(raw: redis.Redis, tag: str) -> set[str]:
    """Every key under the tag, without it (``create_runs``'s marks left out)."""
    found = {_text(key)[len(tag) + 1 :] for key in raw.scan_iter(match=f"{tag}:*", count=1000)}
    return {key for key in found if not key.startswith("batch:")}


def due_keys(raw: redis.Redis, tag: str) -> set[str]:
    """The due sets and their indexes under the tag, without it."""
    return {
        key
        for key in keys(raw, tag)
        if key.split(":", 1)[0] in ("due", "pdue", "prios", "vdue", "vprios")
    }


def zset(raw: redis.Redis, key: str) -> list[tuple[str, float]]:
    rows: list[tuple[bytes, float]] = list(
        raw.zrange(key, 0, -1, withscores=True)  # type: ignore[arg-type]
    )
    return [(_text(member), score) for member, score in rows]


def run_hash(raw: redis.Redis, tag: str, run_id: str) -> dict[str, str]:
    found: dict[bytes, bytes] = raw.hgetall(f"{tag}:run:{run_id}")  # type: ignore[assignment]
    return {_text(k): _text(v) for k, v in found.items()}


async def claim_ids(
    store: RedisStorage, limit: int, versions: dict[str, list[int]] | None = None
) -> list[str]:
    claimed = await store.claim_runs(["wf"], limit, LEASE, versions=versions)
    return [c.run.id for c in claimed]


async def test_version_and_fingerprint_are_stored_in_short_fields(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        await store.create_run(NewRun("wf", "1", run_id="one"))
        await store.create_run(NewRun("wf", "2", run_id="two", version=2, fingerprint="f00"))
        # Concurrent creates share one create_many call.
        await asyncio.gather(
            store.create_run(NewRun("wf", "3", run_id="g1", version=7, priority=2)),
            store.create_run(NewRun("wf", "4", run_id="g2", fingerprint="z9")),
            store.create_run(NewRun("wf", "5", run_id="g3")),
        )
        made = await store.create_runs(
            [
                NewRun("wf", "6", run_id="b1", version=3, fingerprint="abc"),
                NewRun("wf", "7", run_id="b2", version=3, fingerprint="abc"),
                NewRun("wf", "8", run_id="b3", version=1, fingerprint="abc"),
                NewRun("wf", "9", run_id="b4"),
            ]
        )
        assert [(r.run.version, r.run.fingerprint) for r in made] == [  # type: ignore[union-attr]
            (3, "abc"),
            (3, "abc"),
            (1, "abc"),
            (1, None),
        ]
        expected = {
            "one": (1, None),
            "two": (2, "f00"),
            "g1": (7, None),
            "g2": (1, "z9"),
            "g3": (1, None),
            "b1": (3, "abc"),
            "b2": (3, "abc"),
            "b3": (1, "abc"),
            "b4": (1, None),
        }
        runs = await store.get_runs(list(expected))
        assert {i: (r.version, r.fingerprint) for i, r in runs.items()} == expected
        for run_id, (version, fingerprint) in expected.items():
            fields = run_hash(raw, tag, run_id)
            assert fields.get("v") == (None if version == 1 else str(version))
            assert fields.get("fp") == fingerprint
        # Version 1 in today's keys, the others in their own.
        assert due_keys(raw, tag) == {
            "due:wf",
            "vdue:2:0:wf",
            "vdue:7:2:wf",
            "vdue:3:0:wf",
            "vprios:wf",
        }
        assert sorted(m for m, _ in zset(raw, f"{tag}:due:wf")) == ["b3", "b4", "g2", "g3", "one"]
        assert sorted(zset(raw, f"{tag}:vprios:wf")) == [("2:0", 0), ("3:0", 0), ("7:2", 2)]
        # A claim reads them back as stored.
        claimed = await store.claim_runs(["wf"], 20, LEASE)
        assert {c.run.id: (c.run.version, c.run.fingerprint) for c in claimed} == expected
        assert due_keys(raw, tag) == set()


async def test_a_claim_of_version_2_takes_it_from_behind_500_runs_of_version_1(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(T0)
    async with open_store(redis_url, clock) as store:
        # A holder fills limit key k: a claim reading the runs of version 1
        # would block every one of them.
        await store.create_run(
            NewRun("hold", "0", run_id="holder", limits=(ConcurrencyLimit("k", 1),))
        )
        [holder] = await store.claim_runs(["hold"], 1, LEASE)
        made = await store.create_runs(
            [
                NewRun("wf", str(i), run_id=f"old{i:03}", limits=(ConcurrencyLimit("k", 1),))
                for i in range(500)
            ]
        )
        assert len(made) == 500
        clock.now += SECOND
        await store.create_run(NewRun("wf", "new", run_id="new", version=2))
        clock.now += SECOND
        before = {f"old{i:03}": run_hash(raw, tag, f"old{i:03}") for i in range(500)}
        due_before = zset(raw, f"{tag}:due:wf")
        assert len(due_before) == 500

        assert await claim_ids(store, 1, {"wf": [2]}) == ["new"]
        assert {run_id: run_hash(raw, tag, run_id) for run_id in before} == before
        assert zset(raw, f"{tag}:due:wf") == due_before
        assert due_keys(raw, tag) == {"due:wf"}
        assert raw.exists(f"{tag}:blocked:k", f"{tag}:blocked-wf:wf") == 0
        runs = await store.get_runs(list(before))
        assert {(r.status, r.attempts, r.blocked_by) for r in runs.values()} == {
            ("pending", 0, None)
        }
        # Nothing more of version 2, and still nothing of version 1 touched.
        assert await claim_ids(store, 10, {"wf": [2]}) == []
        assert {run_id: run_hash(raw, tag, run_id) for run_id in before} == before
        # Serving version 1 reads them: they are blocked by the full key.
        assert await claim_ids(store, 10, {"wf": [1]}) == []
        assert raw.zcard(f"{tag}:blocked-wf:wf") == 500
        assert await store.finish_run(holder.lease, "completed", output="1")
        assert await claim_ids(store, 10, {"wf": [1, 2]}) == ["old000"]


async def test_a_lapsed_lease_behind_many_of_a_version_not_served_is_taken_over(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(T0)
    async with open_store(redis_url, clock) as store:
        await store.create_runs([NewRun("wf", str(i), run_id=f"old{i:03}") for i in range(300)])
        assert len(await claim_ids(store, 1000)) == 300
        clock.now += SECOND
        await store.create_run(NewRun("wf", "new", run_id="new", version=2))
        assert await claim_ids(store, 1) == ["new"]
        clock.now += LEASE + 2 * SECOND  # every lease lapsed, the 300 first
        before = {f"old{i:03}": run_hash(raw, tag, f"old{i:03}") for i in range(300)}
        running_before = zset(raw, f"{tag}:running:wf")

        [taken] = await store.claim_runs(["wf"], 1, LEASE, versions={"wf": [2]})
        assert (taken.run.id, taken.reclaimed, taken.run.attempts) == ("new", True, 2)
        assert {run_id: run_hash(raw, tag, run_id) for run_id in before} == before
        assert [row for row in zset(raw, f"{tag}:running:wf") if row[0] != "new"] == [
            row for row in running_before if row[0] != "new"
        ]
        assert await claim_ids(store, 5, {"wf": [2]}) == []
        # Without versions, the oldest lapsed leases go first.
        assert await claim_ids(store, 2) == ["old000", "old001"]


async def test_lapsed_leases_over_a_full_rate_never_hide_one_that_can_be_taken(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    """Lapsed leases a claim cannot take over (their rate is full) come first
    in the running index: the claim reads on past them."""
    clock = Clock(T0)
    rate = (RateLimit("r", 3, timedelta(hours=1)),)
    async with open_store(redis_url, clock) as store:
        for run_id in ("a1", "a2", "a3"):
            await store.create_run(NewRun("wf", "{}", run_id=run_id, rates=rate))
        await store.create_run(NewRun("wf", "{}", run_id="z1"))
        await store.create_run(NewRun("wf", "{}", run_id="z2", rates=rate))
        await store.create_run(NewRun("wf", "{}", run_id="z3"))
        assert sorted(await claim_ids(store, 10)) == ["a1", "a2", "a3", "z1", "z3"]
        clock.now += LEASE + SECOND  # every lease lapsed at the same time
        before = {i: run_hash(raw, tag, i) for i in ("a1", "a2", "a3")}
        assert await claim_ids(store, 1) == ["z1"]
        assert await claim_ids(store, 5) == ["z3"]
        assert {i: run_hash(raw, tag, i) for i in before} == before
        assert zset(raw, f"{tag}:blocked-wf:wf") == [("z2", T0.timestamp() * 1e6)]


async def test_priorities_order_runs_across_versions(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(T0)
    async with open_store(redis_url, clock) as store:
        for run_id, version, priority in [
            ("a", 1, 0),
            ("b", 2, 5),
            ("c", 3, -1),
            ("d", 1, 5),
            ("e", 2, 0),
            ("f", 3, 5),
            ("g", 1, -1),
        ]:
            await store.create_run(
                NewRun("wf", "{}", run_id=run_id, version=version, priority=priority)
            )
            clock.now += SECOND
        assert zset(raw, f"{tag}:prios:wf") == [("-1", -1), ("5", 5)]
        assert sorted(zset(raw, f"{tag}:vprios:wf")) == [
            ("2:0", 0),
            ("2:5", 5),
            ("3:-1", -1),
            ("3:5", 5),
        ]
        # One at a time, then all at once: by priority, then due time.
        order = ["b", "d", "f", "a", "e", "c", "g"]
        assert [(await claim_ids(store, 1))[0] for _ in range(3)] == order[:3]
        assert await claim_ids(store, 10) == order[3:]
        assert due_keys(raw, tag) == set()


async def test_priorities_order_runs_of_the_versions_served(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(T0)
    async with open_store(redis_url, clock) as store:
        for run_id, version, priority in [
            ("a", 1, 0),
            ("b", 2, 5),
            ("c", 3, 9),
            ("d", 1, 5),
            ("e", 3, 0),
        ]:
            await store.create_run(
                NewRun("wf", "{}", run_id=run_id, version=version, priority=priority)
            )
            clock.now += SECOND
        assert await claim_ids(store, 1, {"wf": [1, 3]}) == ["c"]
        assert await claim_ids(store, 10, {"wf": [1, 3]}) == ["d", "a", "e"]
        assert due_keys(raw, tag) == {"vdue:2:5:wf", "vprios:wf"}
        # A workflow that versions does not name takes any version.
        await store.create_run(NewRun("other", "{}", run_id="o", version=4))
        claimed = await store.claim_runs(["wf", "other"], 10, LEASE, versions={"wf": [3]})
        assert [c.run.id for c in claimed] == ["o"]
        assert await claim_ids(store, 10, {"wf": [2]}) == ["b"]


async def _claim_one(store: RedisStorage, version: int) -> Lease:
    """The one run a claim serving ``version`` takes; a claim serving
    version 1 alone takes nothing first."""
    assert await claim_ids(store, 10, {"wf": [1]}) == []
    [claimed] = await store.claim_runs(["wf"], 10, LEASE, versions={"wf": [version]})
    return claimed.lease


async def test_a_version_2_run_keeps_to_its_own_sets_through_its_life(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(T0)
    set_key = f"{tag}:vdue:2:3:wf"
    key = (ConcurrencyLimit("k", 1),)
    async with open_store(redis_url, clock) as store:
        await store.create_run(
            NewRun("wf", "{}", run_id="s", version=2, fingerprint="fp1", priority=3, limits=key)
        )
        assert due_keys(raw, tag) == {"vdue:2:3:wf", "vprios:wf"}
        assert zset(raw, f"{tag}:vprios:wf") == [("2:3", 3)]
        lease = await _claim_one(store, 2)
        assert due_keys(raw, tag) == set()

        # A sleep: due in its own set when it wakes.
        wake = await store.sleep_run(lease, "nap", timedelta(minutes=5))
        assert wake == T0 + timedelta(minutes=5)
        assert due_keys(raw, tag) == {"vdue:2:3:wf", "vprios:wf"}
        assert [m for m, _ in zset(raw, set_key)] == ["s"]
        assert await claim_ids(store, 10, {"wf": [2]}) == []  # not due yet
        clock.now += timedelta(minutes=6)
        lease = await _claim_one(store, 2)
        assert await store.save_step_result(
            lease,
            StepRecord("nap", "completed", None, None, 1, None, clock.now),
            LEASE,
        )

        # A wait without a timeout: in no due set until its event comes.
        ready = await store.wait_run(lease, "w", "go", None)
        assert ready is not None
        assert not ready.ready
        assert due_keys(raw, tag) == set()
        assert await store.deliver_event("s", "go", '"x"')
        assert [m for m, _ in zset(raw, set_key)] == ["s"]
        lease = await _claim_one(store, 2)

        # Blocked by its limit behind another run of version 2, then unblocked.
        await store.create_run(NewRun("wf", "{}", run_id="t", version=2, priority=3, limits=key))
        assert await claim_ids(store, 10, {"wf": [2]}) == []
        assert run_hash(raw, tag, "t")["bb"] == "k"
        assert due_keys(raw, tag) == set()
        assert [m for m, _ in zset(raw, f"{tag}:blocked-wf:wf")] == ["t"]
        assert await store.finish_run(lease, "completed", output="1")
        assert "bb" not in run_hash(raw, tag, "t")
        assert raw.exists(f"{tag}:blocked:k", f"{tag}:blocked-wf:wf") == 0
        assert [m for m, _ in zset(raw, set_key)] == ["t"]
        lease = await _claim_one(store, 2)

        # Back to pending, failed, requeued: its own set each time.
        assert await store.update_run_status("t", "pending", lease=lease)
        assert [m for m, _ in zset(raw, set_key)] == ["t"]
        lease = await _claim_one(store, 2)
        assert await store.update_run_status("t", "failed", lease=lease, error="boom")
        assert due_keys(raw, tag) == set()
        assert await store.requeue_run("t")
        assert [m for m, _ in zset(raw, set_key)] == ["t"]
        assert zset(raw, f"{tag}:vprios:wf") == [("2:3", 3)]
        stats = {s.workflow: s for s in await store.queue_stats(["wf"])}
        assert stats["wf"].pending == 1
        lease = await _claim_one(store, 2)
        assert await store.finish_run(lease, "completed", output="2")

        # A cancel of a due run takes it out of its set.
        await store.create_run(NewRun("wf", "{}", run_id="u", version=2, priority=3))
        assert await store.update_run_status("u", "cancelled")
        assert due_keys(raw, tag) == set()

        # A child of version 2, started by a run of version 1.
        await store.create_run(NewRun("wf", "{}", run_id="p"))
        [claimed] = await store.claim_runs(["wf"], 10, LEASE, versions={"wf": [1]})
        parent = claimed.lease
        child = await store.start_child(
            parent, "spawn", NewRun("wf", "{}", run_id="c", version=2, fingerprint="kid")
        )
        assert child is not None
        assert (child.version, child.fingerprint) == (2, "kid")
        assert [m for m, _ in zset(raw, f"{tag}:vdue:2:0:wf")] == ["c"]
        assert await store.finish_run(parent, "completed", output="3")
        [kid] = await store.claim_runs(["wf"], 10, LEASE, versions={"wf": [2]})
        assert await store.finish_run(kid.lease, "completed", output="4")

        # Purged, nothing of them is left.
        clock.now += timedelta(hours=1)
        assert await store.purge_finished(timedelta(0)) == 5
        assert await store.queue_stats() == []
        assert keys(raw, tag) <= {"version"}


async def test_a_debounced_create_moves_the_run_to_its_new_version(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        first = await store.create_run(NewRun("wf", "1", run_id="d", debounce_key="k"))
        assert first.created
        again = await store.create_run(
            NewRun("wf", "2", debounce_key="k", version=2, fingerprint="abc", priority=4)
        )
        assert not again.created
        assert (again.run.id, again.run.version, again.run.fingerprint) == ("d", 2, "abc")
        assert due_keys(raw, tag) == {"vdue:2:4:wf", "vprios:wf"}
        assert run_hash(raw, tag, "d")["v"] == "2"
        back = await store.create_run(NewRun("wf", "3", debounce_key="k"))
        assert (back.run.id, back.run.version, back.run.fingerprint) == ("d", 1, None)
        fields = run_hash(raw, tag, "d")
        assert "v" not in fields
        assert "fp" not in fields
        assert due_keys(raw, tag) == {"due:wf"}
        # In a batch too.
        [batched] = await store.create_runs([NewRun("wf", "4", debounce_key="k", version=5)])
        assert (batched.run.id, batched.run.version) == ("d", 5)  # type: ignore[union-attr]
        assert due_keys(raw, tag) == {"vdue:5:0:wf", "vprios:wf"}
        assert await claim_ids(store, 5, {"wf": [1]}) == []
        assert await claim_ids(store, 5, {"wf": [5]}) == ["d"]


async def test_a_run_in_a_due_set_not_its_own_goes_back_to_its_own(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    """A process that knew no versions puts a run back into the due set of
    its priority alone; a claim serving other versions moves it to its own
    set, changing nothing else."""
    async with open_store(redis_url) as store:
        await store.create_run(NewRun("wf", "{}", run_id="a", version=2))
        score = raw.zscore(f"{tag}:vdue:2:0:wf", "a")
        assert score is not None
        raw.zrem(f"{tag}:vdue:2:0:wf", "a")
        raw.zrem(f"{tag}:vprios:wf", "2:0")
        raw.zadd(f"{tag}:due:wf", {"a": score})
        before = run_hash(raw, tag, "a")
        assert await claim_ids(store, 5, {"wf": [1]}) == []
        assert run_hash(raw, tag, "a") == before
        assert zset(raw, f"{tag}:vdue:2:0:wf") == [("a", score)]
        assert due_keys(raw, tag) == {"vdue:2:0:wf", "vprios:wf"}
        assert await claim_ids(store, 5, {"wf": [2]}) == ["a"]


async def test_runs_stored_without_a_version_read_as_version_1(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        await store.create_run(NewRun("wf", "{}", run_id="a"))
        fields = run_hash(raw, tag, "a")
        assert "v" not in fields
        assert "fp" not in fields
        run = await store.get_run("a")
        assert run is not None
        assert (run.version, run.fingerprint) == (1, None)
        assert await claim_ids(store, 5, {"wf": [2]}) == []
        assert await claim_ids(store, 5, {"wf": [1]}) == ["a"]
