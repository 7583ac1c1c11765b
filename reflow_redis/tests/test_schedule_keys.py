"""Due schedules by workflow on Redis, checked in the keys themselves.

Each schedule's next slot is indexed in ``P:schedule-due`` (every
workflow's) and ``P:schedule-due:<workflow>`` (its workflow's), paused ones
in neither, by the same script that registers, moves, pauses, resumes, fires
or deletes it. ``due_schedules`` with workflows reads only the indexes of the
workflows named. ``initialize`` indexes the schedules of a store written by
layout 2, which had only ``P:schedule-due``, and a read mends an entry of a
workflow's index that no longer matches its schedule (a client of layout 2
still running beside this one fired, paused or moved it).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from reflow_core.storage import NewRun, ScheduleSpec
from reflow_redis import RedisStorage
from reflow_redis import _connection as connection

from ._clocked_store import Clock, open_store

START = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def workflow_indexes(raw: redis.Redis, tag: str) -> dict[str, dict[str, int]]:
    """What every ``P:schedule-due:<workflow>`` holds: workflow -> key -> slot (µs)."""
    found: dict[str, dict[str, int]] = {}
    for name in raw.scan_iter(match=f"{tag}:schedule-due:*", count=1000):
        rows: Any = raw.zrange(name, 0, -1, withscores=True)
        found[_text(name)[len(tag) + 14 :]] = {_text(m): int(s) for m, s in rows}
    return {wf: keys for wf, keys in found.items() if keys}


def expected_indexes(raw: redis.Redis, tag: str) -> dict[str, dict[str, int]]:
    """The same, computed from the schedule hashes; also checks ``P:schedule-due``."""
    expected: dict[str, dict[str, int]] = {}
    every: dict[str, int] = {}
    for key in raw.zrange(f"{tag}:schedule-keys", 0, -1):
        fields = {_text(k): _text(v) for k, v in raw.hgetall(f"{tag}:sched:{_text(key)}").items()}  # type: ignore[union-attr]
        if fields.get("p") != "1":
            expected.setdefault(fields["wf"], {})[_text(key)] = int(fields["next"])
            every[_text(key)] = int(fields["next"])
    rows: Any = raw.zrange(f"{tag}:schedule-due", 0, -1, withscores=True)
    assert {_text(m): int(s) for m, s in rows} == every
    return expected


def check_indexes(raw: redis.Redis, tag: str) -> dict[str, dict[str, int]]:
    found = workflow_indexes(raw, tag)
    assert found == expected_indexes(raw, tag)
    return found


def spec(key: str, workflow: str, at: datetime) -> ScheduleSpec:
    return ScheduleSpec(key, workflow, '"x"', "every:60000", at)


async def test_the_indexes_follow_register_move_pause_resume_fire_and_delete(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    due = START - MINUTE
    async with open_store(redis_url, clock) as store:
        await store.upsert_schedule(spec("a", "wf1", due))
        await store.upsert_schedule(spec("b", "wf1", due + timedelta(seconds=1)))
        await store.upsert_schedule(spec("c", "wf2", due))
        assert check_indexes(raw, tag) == {
            "wf1": {"a": _us(due), "b": _us(due) + 1_000_000},
            "wf2": {"c": _us(due)},
        }
        await store.upsert_schedule(spec("b", "wf2", START))  # moved: same cadence, same slot
        assert check_indexes(raw, tag) == {
            "wf1": {"a": _us(due)},
            "wf2": {"b": _us(due) + 1_000_000, "c": _us(due)},
        }
        await store.set_schedule_paused("c", True)
        await store.upsert_schedule(spec("c", "wf3", START))  # paused: stays out
        assert check_indexes(raw, tag) == {
            "wf1": {"a": _us(due)},
            "wf2": {"b": _us(due) + 1_000_000},
        }
        assert [s.key for s in await store.due_schedules(10, ["wf2", "wf3"])] == ["b"]
        await store.set_schedule_paused("c", False, next_run_at=START)
        assert check_indexes(raw, tag)["wf3"] == {"c": _us(START)}
        fired = await store.claim_schedule_slot(
            "a", due, START + MINUTE, NewRun("wf1", '"x"', f"schedule:a:{_us(due)}")
        )
        assert fired is not None
        assert check_indexes(raw, tag)["wf1"] == {"a": _us(START + MINUTE)}
        assert await store.delete_schedule("b")
        assert check_indexes(raw, tag) == {
            "wf1": {"a": _us(START + MINUTE)},
            "wf3": {"c": _us(START)},
        }
        assert [s.key for s in await store.due_schedules(10, ["wf1", "wf2", "wf3"])] == ["c"]
        assert [s.key for s in await store.due_schedules(10)] == ["c"]


def _drop_v3_indexes(raw: redis.Redis, tag: str) -> None:
    """Leave the store as layout 2 left it: version 2, no P:schedule-due:<workflow>."""
    doomed = [_text(k) for k in raw.scan_iter(match=f"{tag}:schedule-due:*", count=1000)]
    if doomed:
        raw.delete(*doomed)
    raw.set(f"{tag}:version", "2")


async def test_initialize_indexes_the_schedules_of_a_layout_2_store(
    redis_url: str, tag: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        for i in range(7):
            await store.upsert_schedule(spec(f"s{i}", f"wf{i % 3}", START - i * MINUTE))
        await store.set_schedule_paused("s3", True)
        before = check_indexes(raw, tag)
        due_before = await store.due_schedules(10, ["wf0", "wf2"])
    assert sorted(before) == ["wf0", "wf1", "wf2"]
    assert "s3" not in before["wf0"]
    assert [s.key for s in due_before] == ["s6", "s5", "s2", "s0"]
    _drop_v3_indexes(raw, tag)
    monkeypatch.setattr(connection, "MIGRATION_BATCH", 2)  # seven schedules: four batches
    stores = [RedisStorage.from_url(redis_url, clock=clock) for _ in range(2)]
    try:
        # Two processes starting at once share the walk.
        await asyncio.gather(*(s.initialize() for s in stores))
        assert check_indexes(raw, tag) == before
        assert raw.get(f"{tag}:version") == str(connection.LAYOUT_VERSION).encode()
        assert raw.exists(f"{tag}:migrating") == 0
        for store in stores:
            assert await store.due_schedules(10, ["wf0", "wf2"]) == due_before
    finally:
        for store in stores:
            await store.close()


async def test_an_interrupted_schedule_walk_resumes_where_it_stopped(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        for i in range(5):
            await store.upsert_schedule(spec(f"s{i}", f"wf{i % 2}", START - MINUTE))
    before = check_indexes(raw, tag)
    _drop_v3_indexes(raw, tag)
    migrate = connection._load_scripts()["migrate"]
    reply = raw.eval(migrate, 1, f"{tag}:idx", tag, "", "0", "0", "3", "2")  # type: ignore[arg-type]
    assert reply == [1, b"2"]
    assert raw.get(f"{tag}:migrating") == b"s1"
    assert workflow_indexes(raw, tag) == {
        "wf0": {"s0": _us(START - MINUTE)},
        "wf1": {"s1": _us(START - MINUTE)},
    }
    async with open_store(redis_url, clock):
        assert check_indexes(raw, tag) == before
    assert raw.get(f"{tag}:version") == b"3"
    assert raw.exists(f"{tag}:migrating") == 0


async def test_a_read_mends_entries_a_layout_2_client_left_behind(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    """A client of layout 2 fires, pauses and moves schedules without
    touching the workflow indexes: the read gives none of them by a slot
    they no longer have, and puts each entry right."""
    clock = Clock(START)
    due = START - MINUTE
    async with open_store(redis_url, clock) as store:
        for key in ("fired", "paused", "moved", "kept"):
            await store.upsert_schedule(spec(key, "wf", due))
        # What layout 2's scripts change, and no more.
        raw.hset(f"{tag}:sched:fired", "next", str(_us(START + MINUTE)))
        raw.zadd(f"{tag}:schedule-due", {"fired": _us(START + MINUTE)})
        raw.hset(f"{tag}:sched:paused", "p", "1")
        raw.zrem(f"{tag}:schedule-due", "paused")
        raw.hset(f"{tag}:sched:moved", "wf", "other")
        assert [s.key for s in await store.due_schedules(10, ["wf"])] == ["kept"]
        assert [s.key for s in await store.due_schedules(10, ["other"])] == ["moved"]
        assert check_indexes(raw, tag) == {
            "wf": {"fired": _us(START + MINUTE), "kept": _us(due)},
            "other": {"moved": _us(due)},
        }


_COUNTING = """
local touched, seen = {}, {}
local function counted(cmd, key, ...)
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
return {touched, reply}
"""


async def test_a_read_for_some_workflows_never_touches_other_workflows_schedules(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    clock = Clock(START)
    async with open_store(redis_url, clock) as store:
        for i in range(50):
            await store.upsert_schedule(
                spec(f"other{i:02}", f"unserved{i % 5}", START - 2 * MINUTE)
            )
        await store.upsert_schedule(spec("mine", "served", START - MINUTE))
        await store.upsert_schedule(spec("later", "served", START + MINUTE))
    text = connection._load_scripts()["due_schedules"].replace("redis.call(", "counted(")
    touched, reply = raw.eval(  # type: ignore[misc]
        _COUNTING % text, 1, f"{tag}:idx", tag, str(_us(START)), "0", "0", "100", "0", "served"
    )
    assert {_text(k)[len(tag) + 1 :] for k in touched} == {
        "schedule-due:served",
        "sched:mine",
    }
    assert [_text(row[0]) for row in reply] == ["mine"]
