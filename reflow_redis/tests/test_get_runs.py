"""``get_runs`` on Redis: one ``get_runs.lua`` call reads every run's hash,
decoded the way ``get_run`` decodes it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from reflow_core import codec
from reflow_core.errors import ConfigError, StorageError
from reflow_core.storage import (
    MAX_GET_RUNS,
    ConcurrencyLimit,
    CreateResult,
    Lease,
    NewRun,
    RateLimit,
    RunRecord,
)
from reflow_redis import RedisStorage

from . import _redis_harness as h
from ._clocked_store import open_store


async def _claim(store: RedisStorage, workflow: str) -> Lease:
    (claimed,) = await store.claim_runs([workflow], 1, timedelta(minutes=5))
    return claimed.lease


async def _runs_in_every_state(store: RedisStorage) -> list[str]:
    """Runs pending, delayed, running, completed, failed, cancelled, sleeping,
    waiting and a child, some with limits, rates, headers and a deadline."""
    ids: list[str] = []

    async def create(workflow: str, **options: Any) -> str:
        made = await store.create_run(NewRun(workflow, codec.encode(workflow), **options))
        ids.append(made.run.id)
        return made.run.id

    await create(
        "pending",
        idempotency_key="key-1",
        priority=3,
        headers={"traceparent": "00-abc-def-01", "baggage": "a=1"},
    )
    await create("pending", debounce_key="d1")
    await create("delayed", delay=timedelta(hours=1), deadline=timedelta(days=1))
    await create(
        "running",
        limits=(ConcurrencyLimit("tenant:a", 2), ConcurrencyLimit("global", 5)),
        rates=(RateLimit("api", 10, timedelta(seconds=1)),),
    )
    await _claim(store, "running")
    await create("completed")
    lease = await _claim(store, "completed")
    assert await store.finish_run(lease, "completed", output=codec.encode({"ok": [1, "é"]}))
    await create("failed")
    lease = await _claim(store, "failed")
    assert await store.finish_run(lease, "failed", error='{"type": "Boom", "message": "x"}')
    cancelled = await create("cancelled")
    assert await store.update_run_status(cancelled, "cancelled")
    await create("sleeping")
    lease = await _claim(store, "sleeping")
    assert await store.sleep_run(lease, "nap", timedelta(minutes=10)) is not None
    await create("waiting")
    lease = await _claim(store, "waiting")
    waited = await store.wait_run(lease, "w", "approve", timedelta(minutes=3))
    assert waited is not None
    assert not waited.ready
    await create("parent")
    lease = await _claim(store, "parent")
    child = await store.start_child(lease, "spawn", NewRun("child", "1", run_id="child-of-parent"))
    assert child is not None
    ids.append(child.id)
    return ids


async def test_matches_get_run_for_every_state(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        ids = await _runs_in_every_state(store)
        statuses = {(await store.get_run(i)).status for i in ids}  # type: ignore[union-attr]
        assert statuses == {
            "pending",
            "delayed",
            "running",
            "completed",
            "failed",
            "cancelled",
            "sleeping",
            "waiting",
        }
        asked = [*ids, "missing-1", ids[0], "missing-2", ids[4], "missing-1"]
        found = await store.get_runs(asked)
        expected: dict[str, RunRecord] = {}
        for run_id in asked:
            run = await store.get_run(run_id)
            if run is not None:
                expected[run_id] = run
        assert found == expected
        assert list(found) == ids  # in the order first asked
        running = found[ids[3]]
        assert running.status == "running"
        assert running.lease_expires_at is not None
        assert len(running.limits) == 2
        assert len(running.rates) == 1
        assert found[ids[0]].idempotency_key == "key-1"
        assert found[ids[1]].debounce_key == "d1"
        assert found[ids[0]].headers == {"traceparent": "00-abc-def-01", "baggage": "a=1"}
        # Any collection of ids, and nothing at all.
        assert await store.get_runs(frozenset(ids[:2])) == {i: expected[i] for i in ids[:2]}
        assert await store.get_runs(["missing-1"]) == {}
        assert await store.get_runs([]) == {}


async def test_a_thousand_ids_in_one_call(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        made = await store.create_runs([NewRun("wf", codec.encode(n)) for n in range(600)])
        created = [m.run for m in made if isinstance(m, CreateResult)]
        asked = [run.id for run in created] + [f"absent-{n}" for n in range(400)]
        assert len(asked) == MAX_GET_RUNS
        found = await store.get_runs(asked)
        assert found == {run.id: run for run in created}
        with pytest.raises(ConfigError):
            await store.get_runs([*asked, "one-more"])
        # Ids named again count once towards the bound.
        assert len(await store.get_runs(asked + asked[:10])) == 600


async def test_refuses_bad_ids_before_reading(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        for bad in ("run-id", ["ok", ""], ["a\x00b"], [1]):
            with pytest.raises(ConfigError):
                await store.get_runs(bad)  # type: ignore[arg-type]


async def test_foreign_data_is_reported_as_get_run_reports_it(
    redis_url: str, raw: redis.Redis, tag: str
) -> None:
    async with open_store(redis_url) as store:
        raw.hset(f"{tag}:run:odd", mapping={"st": "running", "wf": "x"})
        with pytest.raises(StorageError, match="unexpected data") as one:
            await store.get_run("odd")
        with pytest.raises(StorageError, match="unexpected data") as many:
            await store.get_runs(["odd"])
        assert str(many.value).replace("get_runs", "get_run") == str(one.value)


async def test_closed_store_refuses(redis_url: str) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    await store.close()
    with pytest.raises(StorageError):
        await store.get_runs(["a"])
    with pytest.raises(StorageError):
        await store.get_runs([])


async def test_one_script_call_for_the_whole_set(tmp_path: Path) -> None:
    """Counted on a redis-server of the test's own: any number of ids is one
    EVALSHA (the script reads the server's TIME, as every script does) and
    one HGETALL per distinct id, nothing else; no ids sends nothing."""
    server = h.RedisServer(h.need_redis_server(), tmp_path, "--save", "", "--appendonly", "no")
    server.start()
    try:
        store = RedisStorage.from_url(f"{server.url}?prefix=count")
        await store.initialize()
        try:
            made = await store.create_runs([NewRun("wf", codec.encode(n)) for n in range(500)])
            ids = [m.run.id for m in made if isinstance(m, CreateResult)]
            with server.client() as probe:

                def calls() -> dict[str, int]:
                    stats = probe.info("commandstats")
                    return {name[8:]: int(v["calls"]) for name, v in stats.items()}

                for asked in (ids + [f"x{n}" for n in range(500)], ids[:1] * 3, ["x"], []):
                    before = calls()
                    found = await store.get_runs(asked)
                    after = calls()
                    assert len(found) == len(set(asked) & set(ids))
                    delta = {k: n - before.get(k, 0) for k, n in after.items()}
                    delta = {k: n for k, n in delta.items() if n and k != "info"}
                    if not asked:
                        assert delta == {}
                    else:
                        assert delta == {"evalsha": 1, "time": 1, "hgetall": len(set(asked))}
        finally:
            await store.close()
    finally:
        server.stop()
