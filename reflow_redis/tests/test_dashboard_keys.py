"""The dashboard's reads on Redis, checked in the keys themselves.

``P:bykey:<key>`` (the runs created with an idempotency key, of every
workflow), ``P:done:<status>`` (the stored finished runs of a status by
finish time) and ``P:evm:...`` (the arrival of each buffered event, beside
its buffer ``P:ev:...``) are kept by the scripts that create, finish,
requeue and purge runs and deliver and take events, in the same script as
the change. ``initialize`` indexes the runs of a store written before them
(no ``P:version``) and refuses a newer layout, changing nothing.
``finished_history`` costs a few commands per minute with runs, however long
the history behind the window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from reflow_core.errors import SchemaVersionError, StorageError
from reflow_core.storage import BufferedEvent, FinishedMinute, NewRun
from reflow_redis import RedisStorage
from reflow_redis import _connection as connection

from ._clocked_store import Clock, open_store

LEASE = timedelta(hours=1)
START = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)
"""Half a minute into a minute, so a test can move within it or past it."""
MINUTE = timedelta(minutes=1)
TERMINAL = ("completed", "failed", "cancelled")
CURRENT = str(connection.LAYOUT_VERSION).encode()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def indexes(raw: redis.Redis, tag: str) -> tuple[dict[str, set[str]], dict[str, dict[str, int]]]:
    """What ``P:bykey:*`` and ``P:done:*`` hold: key -> run ids, status -> id -> finish µs."""
    by_key: dict[str, set[str]] = {}
    for key in raw.scan_iter(match=f"{tag}:bykey:*", count=1000):
        members = raw.zrange(key, 0, -1)
        assert all(raw.zscore(key, m) == 0 for m in members)  # type: ignore[union-attr]
        by_key[_text(key)[len(tag) + 7 :]] = {_text(m)[18:] for m in members}  # type: ignore[union-attr]
    done: dict[str, dict[str, int]] = {}
    for status in TERMINAL:
        rows: Any = raw.zrange(f"{tag}:done:{status}", 0, -1, withscores=True)
        if rows:
            done[status] = {_text(m): int(score) for m, score in rows}
    return by_key, done


def expected_indexes(
    raw: redis.Redis, tag: str
) -> tuple[dict[str, set[str]], dict[str, dict[str, int]]]:
    """The same, computed from the run hashes stored under the tag."""
    by_key: dict[str, set[str]] = {}
    done: dict[str, dict[str, int]] = {}
    for key in raw.scan_iter(match=f"{tag}:run:*", count=1000):
        run_id = _text(key)[len(tag) + 5 :]
        fields = {_text(k): _text(v) for k, v in raw.hgetall(key).items()}  # type: ignore[union-attr]
        member = fields["c"].zfill(17) + ":" + run_id
        assert raw.zscore(f"{tag}:idx", member) == 0
        if fields.get("idem"):
            by_key.setdefault(fields["idem"], set()).add(run_id)
        if fields["st"] in TERMINAL:
            finished_at = raw.zscore(f"{tag}:finished", run_id)
            assert finished_at == int(fields["u"]), (run_id, fields)
            done.setdefault(fields["st"], {})[run_id] = int(finished_at)
    return by_key, done


def check_indexes(raw: redis.Redis, tag: str) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Assert the indexes agree with the runs; returns them, ``done`` by id -> status."""
    by_key, done = indexes(raw, tag)
    assert (by_key, done) == expected_indexes(raw, tag)
    return by_key, {run_id: status for status, ids in done.items() for run_id in ids}


async def test_indexes_follow_create_finish_requeue_cancel_and_purge(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        made = []
        for run_id, wf, key in [("a1", "a", "k"), ("b1", "b", "k"), ("c1", "a", "other")]:
            made.append(await store.create_run(NewRun(wf, "1", key, run_id=run_id)))
            clock.now += timedelta(seconds=1)
        await store.create_run(NewRun("a", "1", run_id="plain"))
        assert check_indexes(raw, tag) == ({"k": {"a1", "b1"}, "other": {"c1"}}, {})
        assert [r.id for r in await store.find_runs_by_key("k")] == ["b1", "a1"]
        assert [r.id for r in await store.find_runs_by_key("k", limit=1)] == ["b1"]
        assert await store.find_runs_by_key("nobody's") == []
        # An idempotent hit adds nothing.
        again = await store.create_run(NewRun("a", "1", "k", run_id="a1-again"))
        assert not again.created
        assert check_indexes(raw, tag)[0]["k"] == {"a1", "b1"}

        [held] = await store.claim_runs(["a"], 1, LEASE)
        assert held.run.id == "a1"
        assert await store.finish_run(held.lease, "completed", output="2")
        assert await store.update_run_status("b1", "failed", error='"x"')
        assert check_indexes(raw, tag)[1] == {"a1": "completed", "b1": "failed"}
        minute = START.replace(second=0)
        assert await store.finished_history(1) == [FinishedMinute(minute, 1, 1, 0)]

        # A requeued run no longer counts, and counts again where it ends again.
        assert await store.requeue_run("b1")
        assert check_indexes(raw, tag)[1] == {"a1": "completed"}
        assert await store.finished_history(1) == [FinishedMinute(minute, 1, 0, 0)]
        clock.now += MINUTE
        [held] = await store.claim_runs(["b"], 1, LEASE)
        assert await store.finish_run(held.lease, "completed", output="3")
        assert check_indexes(raw, tag)[1] == {"a1": "completed", "b1": "completed"}
        assert await store.finished_history(2) == [
            FinishedMinute(minute, 1, 0, 0),
            FinishedMinute(minute + MINUTE, 1, 0, 0),
        ]

        # A cancel cascades to a child: both count as cancelled.
        [parent] = await store.claim_runs(["a"], 1, LEASE)
        assert parent.run.id == "c1"
        assert await store.start_child(parent.lease, "fan", NewRun("kid", "1", run_id="kid"))
        assert await store.update_run_status("c1", "cancelled")
        assert check_indexes(raw, tag)[1] == {
            "a1": "completed",
            "b1": "completed",
            "c1": "cancelled",
            "kid": "cancelled",
        }
        assert await store.finished_history(2) == [
            FinishedMinute(minute, 1, 0, 0),
            FinishedMinute(minute + MINUTE, 1, 0, 2),
        ]

        # A purge takes the runs out of every index; their keys are free again.
        clock.now += MINUTE
        assert await store.purge_finished(timedelta(seconds=1)) == 4
        assert check_indexes(raw, tag) == ({}, {})
        assert raw.exists(f"{tag}:bykey:k", f"{tag}:bykey:other") == 0
        assert await store.find_runs_by_key("k") == []
        assert await store.finished_history(1440) == []
        fresh = await store.create_run(NewRun("a", "1", "k", run_id="a2"))
        assert fresh.created
        assert [r.id for r in await store.find_runs_by_key("k")] == ["a2"]
        assert check_indexes(raw, tag)[0] == {"k": {"a2"}}


async def test_a_retention_purge_leaves_the_indexes_too(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    store = RedisStorage.from_url(redis_url, clock=clock, retention=timedelta(minutes=5))
    await store.initialize()
    try:
        for i in range(3):
            await store.create_run(NewRun("wf", "1", f"k{i}", run_id=f"r{i}"))
        for _ in range(2):
            [held] = await store.claim_runs(["wf"], 1, LEASE)
            assert await store.finish_run(held.lease, "completed", output="1")
        assert set(check_indexes(raw, tag)[1]) == {"r0", "r1"}
        clock.now += timedelta(minutes=10)
        # Finishing the last run expires the two that finished ten minutes ago.
        assert await store.update_run_status("r2", "cancelled")
        assert check_indexes(raw, tag) == ({"k2": {"r2"}}, {"r2": "cancelled"})
        assert await store.finished_history(60) == [
            FinishedMinute(START.replace(second=0) + 10 * MINUTE, 0, 0, 1)
        ]
    finally:
        await store.close()


async def test_buffered_events_list_in_arrival_order_with_their_ids(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        run_id = (await store.create_run(NewRun("wf", "1", run_id="r"))).run.id
        assert await store.deliver_event(run_id, "a", '"1"')
        assert await store.deliver_event(run_id, "b", '"2"', event_id="id-2")
        assert await store.deliver_event(run_id, "a", '"3"', event_id="id|3")
        assert await store.deliver_event(run_id, "a", '"again"', event_id="id|3")  # seen: no-op
        assert await store.list_buffered_events(run_id) == [
            BufferedEvent("a", '"1"'),
            BufferedEvent("b", '"2"', "id-2"),
            BufferedEvent("a", '"3"', "id|3"),
        ]
        assert raw.lrange(f"{tag}:evm:1.r:a", 0, -1) == [b"1", b"3|id|3"]
        assert raw.lrange(f"{tag}:evm:1.r:b", 0, -1) == [b"2|id-2"]
        assert [e.payload for e in await store.list_buffered_events(run_id, limit=2)] == [
            '"1"',
            '"2"',
        ]
        [held] = await store.claim_runs(["wf"], 1, LEASE)
        took = await store.take_event(held.lease, "w1", "a")
        assert took is not None
        assert took.payload == '"1"'
        assert raw.lrange(f"{tag}:evm:1.r:a", 0, -1) == [b"3|id|3"]
        assert await store.list_buffered_events(run_id) == [
            BufferedEvent("b", '"2"', "id-2"),
            BufferedEvent("a", '"3"', "id|3"),
        ]
        assert await store.list_buffered_events("missing") == []
        assert await store.finish_run(held.lease, "completed", output="1")
        assert await store.list_buffered_events(run_id) == []
        assert raw.exists(f"{tag}:evm:1.r:a", f"{tag}:evm:1.r:b") == 0


async def test_events_buffered_by_the_previous_version_list_first_without_ids(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        run_id = (await store.create_run(NewRun("wf", "1", run_id="r"))).run.id
        # As version 1 buffered them: the payloads only, no arrival list.
        raw.rpush(f"{tag}:ev:1.r:z", '"old z"')
        raw.rpush(f"{tag}:ev:1.r:a", '"old a1"', '"old a2"')
        raw.sadd(f"{tag}:evnames:r", "a", "z")
        assert await store.deliver_event(run_id, "z", '"new z"', event_id="nz")
        assert await store.deliver_event(run_id, "a", '"new a"')
        listed = await store.list_buffered_events(run_id)
        assert listed == [
            BufferedEvent("a", '"old a1"'),
            BufferedEvent("a", '"old a2"'),
            BufferedEvent("z", '"old z"'),
            BufferedEvent("z", '"new z"', "nz"),
            BufferedEvent("a", '"new a"'),
        ]
        [held] = await store.claim_runs(["wf"], 1, LEASE)
        # Taking an old event leaves the arrival list alone; a new one pops it.
        for step, expected, arrivals in [
            ("w1", '"old z"', [b"1|nz"]),
            ("w2", '"new z"', []),
        ]:
            took = await store.take_event(held.lease, step, "z")
            assert took is not None
            assert took.payload == expected
            assert raw.lrange(f"{tag}:evm:1.r:z", 0, -1) == arrivals
        assert [e.payload for e in await store.list_buffered_events(run_id)] == [
            '"old a1"',
            '"old a2"',
            '"new a"',
        ]
        # An arrival list longer than its buffer (an older take popped the
        # buffer only) is trimmed to it by the next take.
        raw.lpush(f"{tag}:evm:1.r:a", "0|stale")
        raw.lpush(f"{tag}:evm:1.r:a", "0|stale")
        raw.lpush(f"{tag}:evm:1.r:a", "0|stale")
        took = await store.take_event(held.lease, "w3", "a")
        assert took is not None
        assert took.payload == '"old a1"'
        assert raw.llen(f"{tag}:evm:1.r:a") == raw.llen(f"{tag}:ev:1.r:a") == 2
        assert await store.finish_run(held.lease, "completed", output="1")
        assert raw.exists(f"{tag}:evm:1.r:a", f"{tag}:ev:1.r:a") == 0


async def _a_history(store: RedisStorage, clock: Clock) -> None:
    """Runs of every ending, over several minutes, some requeued, some pending."""
    for i in range(9):
        key = f"key{i // 3}" if i < 8 else None
        await store.create_run(NewRun(f"wf{i % 3}", "1", key, run_id=f"r{i}"))
    for i in range(3):
        clock.now += MINUTE
        [held] = await store.claim_runs(["wf0"], 1, LEASE)
        assert held.run.id == f"r{3 * i}"
        assert await store.finish_run(held.lease, "completed" if i else "failed", output="1")
    assert await store.update_run_status("r5", "cancelled")
    assert await store.update_run_status("r7", "failed")
    assert await store.requeue_run("r7")
    assert await store.update_run_status("r4", "failed")


def _drop_v2_indexes(raw: redis.Redis, tag: str) -> None:
    """Leave the store as version 1 left it: no version, no P:bykey, no P:done."""
    doomed = [f"{tag}:version"]
    for pattern in ("bykey:*", "done:*"):
        doomed += [_text(k) for k in raw.scan_iter(match=f"{tag}:{pattern}", count=1000)]
    raw.delete(*doomed)


async def test_initialize_indexes_a_store_of_the_previous_version(
    redis_url: str, tag: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        await _a_history(store, clock)
        before = check_indexes(raw, tag)
        history = await store.finished_history(60)
        found = await store.find_runs_by_key("key1")
    assert before == (
        {"key0": {"r0", "r1", "r2"}, "key1": {"r3", "r4", "r5"}, "key2": {"r6", "r7"}},
        {"r0": "failed", "r3": "completed", "r6": "completed", "r5": "cancelled", "r4": "failed"},
    )
    assert raw.get(f"{tag}:version") == CURRENT
    _drop_v2_indexes(raw, tag)
    monkeypatch.setattr(connection, "MIGRATION_BATCH", 2)  # nine runs: five batches
    stores = [RedisStorage.from_url(redis_url, clock=clock) for _ in range(2)]
    try:
        # Two processes starting at once share the walk.
        await asyncio.gather(*(s.initialize() for s in stores))
        assert check_indexes(raw, tag) == before
        assert raw.get(f"{tag}:version") == CURRENT
        assert raw.exists(f"{tag}:migrating") == 0
        for store in stores:
            assert await store.finished_history(60) == history
            assert await store.find_runs_by_key("key1") == found
    finally:
        for store in stores:
            await store.close()


async def test_an_interrupted_backfill_resumes_where_it_stopped(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        await _a_history(store, clock)
    before = check_indexes(raw, tag)
    _drop_v2_indexes(raw, tag)
    # One batch of two runs, as a process that stopped after it would leave it.
    migrate = connection._load_scripts()["migrate"]
    reply = raw.eval(migrate, 1, f"{tag}:idx", tag, "", "0", "0", "2", "2")
    assert reply == [1, b"1"]
    first_two = [_text(m) for m in raw.zrange(f"{tag}:idx", 0, 1)]
    assert raw.get(f"{tag}:migrating") == first_two[1].encode()
    assert raw.exists(f"{tag}:version") == 0
    async with open_store(redis_url, clock):
        assert check_indexes(raw, tag) == before
    assert raw.get(f"{tag}:version") == CURRENT
    assert raw.exists(f"{tag}:migrating") == 0


async def test_a_fresh_prefix_starts_at_the_current_layout(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url):
        assert raw.get(f"{tag}:version") == str(connection.LAYOUT_VERSION).encode()
    async with open_store(redis_url):
        assert raw.get(f"{tag}:version") == str(connection.LAYOUT_VERSION).encode()


def _snapshot(raw: redis.Redis, tag: str) -> dict[bytes, bytes | None]:
    keys: Sequence[bytes] = list(raw.scan_iter(match=f"{tag}:*", count=1000))
    return {key: raw.dump(key) for key in keys}  # type: ignore[misc]


NEWER = str(connection.LAYOUT_VERSION + 1)


@pytest.mark.parametrize("stored", [NEWER, "not a version", "1.5", "0"])
async def test_a_newer_or_unknown_layout_is_refused_and_left_alone(
    redis_url: str, tag: str, raw: redis.Redis, stored: str
) -> None:
    async with open_store(redis_url) as store:
        await store.create_run(NewRun("wf", "1", "k", run_id="r"))
        await store.update_run_status("r", "cancelled")
    raw.set(f"{tag}:version", stored)
    raw.delete(f"{tag}:bykey:k", f"{tag}:done:cancelled")  # would be written by a backfill
    before = _snapshot(raw, tag)
    store = RedisStorage.from_url(redis_url)
    expected = SchemaVersionError if stored == NEWER else StorageError
    with pytest.raises(expected) as caught:
        await store.initialize()
    if stored == NEWER:
        assert f"version {NEWER}" in str(caught.value)
        assert "upgrade reflow-redis" in str(caught.value)
    assert _snapshot(raw, tag) == before
    with pytest.raises(StorageError, match="not initialized"):
        await store.get_run("r")
    await store.close()


# -- cost -----------------------------------------------------------------------------

_COUNTING = """
local calls, touched, seen = 0, {}, {}
local function counted(cmd, key, ...)
  calls = calls + 1
  if key == nil then return redis.call(cmd) end
  if not seen[key] then
    seen[key] = true
    touched[#touched + 1] = key
  end
  return redis.call(cmd, key, ...)
end
local function body()
%s
end
local reply = body()
return {calls, touched, reply}
"""


def counted_call(
    raw: redis.Redis, tag: str, script: str, now: datetime, *args: object
) -> tuple[int, set[str], Any]:
    """Run one of the storage's scripts with every ``redis.call`` counted:
    how many commands it ran, the keys they named (without the tag), its reply."""
    text = connection._load_scripts()[script].replace("redis.call(", "counted(")
    calls, touched, reply = raw.eval(  # type: ignore[misc]
        _COUNTING % text, 1, f"{tag}:idx", tag, str(_us(now)), "0", "0", *args
    )
    return int(calls), {_text(k)[len(tag) + 1 :] for k in touched}, reply


async def test_the_history_costs_commands_per_minute_with_runs_never_per_older_run(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:

        async def end_runs(count: int, status: str) -> None:
            ids = [(await store.create_run(NewRun("wf", "1"))).run.id for _ in range(count)]
            if status == "completed":
                for held in await store.claim_runs(["wf"], count, LEASE):
                    assert await store.finish_run(held.lease, "completed", output="1")
            else:
                for run_id in ids:
                    assert await store.update_run_status(run_id, status)  # type: ignore[arg-type]

        # A day and more of history, every minute of it, before the last hour.
        for i in range(200):
            clock.now = START - timedelta(hours=30) + i * 6 * MINUTE
            await end_runs(2, TERMINAL[i % 3])
        # The last hour: three minutes with runs.
        for minutes_ago, count, status in [
            (50, 3, "completed"),
            (10, 2, "failed"),
            (0, 1, "cancelled"),
        ]:
            clock.now = START - minutes_ago * MINUTE
            await end_runs(count, status)
        clock.now = START
        hour = await store.finished_history(60)
        first = START.replace(second=0)
        assert hour == [
            FinishedMinute(first - 50 * MINUTE, 3, 0, 0),
            FinishedMinute(first - 10 * MINUTE, 0, 2, 0),
            FinishedMinute(first, 0, 0, 1),
        ]
        calls, touched, _ = counted_call(raw, tag, "history", START, "60")
        # Per status: a ZRANGE and a ZCOUNT per minute with runs, and one
        # ZRANGE that finds no more.
        assert calls == 3 + 2 * 3
        assert touched == {f"done:{status}" for status in TERMINAL}

        # Ten times the older history changes nothing.
        for i in range(100):
            clock.now = START - timedelta(hours=2) - i * MINUTE
            await end_runs(20, TERMINAL[i % 3])
        clock.now = START
        assert await store.finished_history(60) == hour
        assert counted_call(raw, tag, "history", START, "60")[:2] == (calls, touched)

        # Many runs in a minute of the window cost no more than one.
        clock.now = START - 10 * MINUTE
        await end_runs(50, "failed")
        clock.now = START
        assert await store.finished_history(60) == [
            hour[0],
            FinishedMinute(first - 10 * MINUTE, 0, 52, 0),
            hour[2],
        ]
        assert counted_call(raw, tag, "history", START, "60")[:2] == (calls, touched)

        # A whole day: bounded by the minutes with runs, not by the runs.
        day = await store.finished_history(1440)
        busy = sum((m.completed > 0) + (m.failed > 0) + (m.cancelled > 0) for m in day)
        assert sum(m.completed + m.failed + m.cancelled for m in day) > 2 * busy
        assert counted_call(raw, tag, "history", START, "1440")[0] == 3 + 2 * busy


async def test_finding_runs_by_key_reads_only_the_runs_of_the_key(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        for i in range(200):
            clock.now += timedelta(milliseconds=1)
            await store.create_run(NewRun(f"wf{i // 50}", "1", f"key{i % 50}", run_id=f"r{i:03}"))
        found = await store.find_runs_by_key("key7")
        assert [r.id for r in found] == ["r157", "r107", "r057", "r007"]
        assert [r.workflow for r in found] == ["wf3", "wf2", "wf1", "wf0"]
        calls, touched, _ = counted_call(raw, tag, "find_by_key", START, "key7", "20")
        assert touched == {"bykey:key7"} | {f"run:{r.id}" for r in found}
        assert calls == len(found) + 2  # two ZRANGE and an HGETALL per run
