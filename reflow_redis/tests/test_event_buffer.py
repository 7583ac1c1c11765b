"""Bounded event buffers on Redis, checked in the keys themselves.

A run that ends drops its buffered events (the ``P:ev:...`` lists, their
``P:evm:...`` arrival lists, and ``P:evnames:<id>``) in the script that ends
it; the ids it has seen
(``P:evids:<id>``) stay, so a redelivery of an id stays a no-op.
``P:evnames:<id>`` lists only names with a non-empty buffer, so counting a
run's buffer against the cap is bounded by what is buffered.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis

from reflow_core import Engine, EventBufferFullError, StepContext, workflow
from reflow_core.storage import NewRun
from reflow_redis import RedisStorage

LEASE = timedelta(seconds=30)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def event_keys(raw: redis.Redis, prefix: str, run_id: str) -> dict[str, str]:
    """Every event key of a run, by kind (``ev:<name>``, ``evm:<name>``,
    ``evnames``, ``evids``) -> type."""
    tag = "{" + prefix + "}"
    found: dict[str, str] = {}
    for key in raw.scan_iter(match=f"{tag}:ev*", count=1000):
        name = _text(key)
        if f".{run_id}:" in name:
            kind = name[len(tag) + 1 :].split(":", 1)[0]
            found[kind + ":" + name.rsplit(":", 1)[1]] = _text(raw.type(key))
        elif name.endswith(f":{run_id}"):
            found[name[len(tag) + 1 :].split(":", 1)[0]] = _text(raw.type(key))
    return found


async def _echo(ctx: StepContext[Any, Any]) -> Any:
    return ctx.prev


async def test_a_completed_run_leaves_no_buffered_event_in_redis(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    wf = workflow("approve").step("prepare", lambda ctx: 1).wait_for_event("go").step("a", _echo)
    store = RedisStorage.from_url(redis_url)
    engine = Engine(storage=store, workflows=[wf], close_storage=False)
    try:
        run = await engine.enqueue(wf)
        for i in range(999):
            assert await engine.send_event(run.id, "go", i)
        assert await engine.send_event(run.id, "go", "with id", event_id="keep")
        with pytest.raises(EventBufferFullError) as caught:
            await engine.send_event(run.id, "go", "one too many")
        assert caught.value.limit == 1000
        assert await engine.send_event(run.id, "go", "a retry", event_id="keep")
        assert event_keys(raw, prefix, run.id) == {
            "ev:go": "list",
            "evm:go": "list",
            "evnames": "set",
            "evids": "set",
        }
        assert raw.llen(f"{{{prefix}}}:ev:{len(run.id)}.{run.id}:go") == 1000
        assert raw.llen(f"{{{prefix}}}:evm:{len(run.id)}.{run.id}:go") == 1000
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=10) == 0
    finally:
        await engine.stop(timeout=0)
        await store.close()
    # Only the dedupe record of the ids is left.
    assert event_keys(raw, prefix, run.id) == {"evids": "set"}
    assert raw.smembers(f"{{{prefix}}}:evids:{run.id}") == {b"keep"}


@pytest.mark.parametrize(
    "how", ["failed", "failed with lease", "cancelled", "cancelled with lease"]
)
async def test_every_way_of_ending_a_run_drops_its_buffer(
    redis_url: str, prefix: str, raw: redis.Redis, how: str
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    try:
        run_id = (await store.create_run(NewRun("wf", "1"))).run.id
        [held] = await store.claim_runs(["wf"], 1, LEASE)
        await store.deliver_event(run_id, "e", '"plain"')
        await store.deliver_event(run_id, "e", '"with id"', event_id="x")
        await store.deliver_event(run_id, "other", '"other"')
        assert set(event_keys(raw, prefix, run_id)) == {
            "ev:e",
            "evm:e",
            "ev:other",
            "evm:other",
            "evnames",
            "evids",
        }
        if how == "failed":
            assert await store.finish_run(held.lease, "failed", error='"boom"')
        elif how == "failed with lease":
            assert await store.update_run_status(run_id, "failed", lease=held.lease, error='"x"')
        elif how == "cancelled":
            assert await store.update_run_status(run_id, "cancelled")
        else:
            assert await store.update_run_status(run_id, "cancelled", lease=held.lease)
        assert event_keys(raw, prefix, run_id) == {"evids": "set"}
        assert await store.requeue_run(run_id)
        assert await store.deliver_event(run_id, "e", '"late"', event_id="x", max_buffered=1)
        assert event_keys(raw, prefix, run_id) == {"evids": "set"}
        assert await store.deliver_event(run_id, "e", '"fresh"', max_buffered=1)
        assert set(event_keys(raw, prefix, run_id)) == {"ev:e", "evm:e", "evnames", "evids"}
    finally:
        await store.close()


async def test_a_take_that_empties_a_buffer_forgets_its_name(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    try:
        run_id = (await store.create_run(NewRun("wf", "1"))).run.id
        await store.deliver_event(run_id, "a", "1")
        await store.deliver_event(run_id, "a", "2")
        await store.deliver_event(run_id, "b", "3")
        names = f"{{{prefix}}}:evnames:{run_id}"
        assert raw.smembers(names) == {b"a", b"b"}
        [held] = await store.claim_runs(["wf"], 1, LEASE)
        assert await store.take_event(held.lease, "w1", "b") is not None
        assert raw.smembers(names) == {b"a"}
        assert await store.take_event(held.lease, "w2", "a") is not None
        assert raw.smembers(names) == {b"a"}
        with pytest.raises(EventBufferFullError):
            await store.deliver_event(run_id, "b", "4", max_buffered=1)
        assert await store.take_event(held.lease, "w3", "a") is not None
        assert not raw.exists(names)
        assert await store.deliver_event(run_id, "b", "4", max_buffered=1)
    finally:
        await store.close()
