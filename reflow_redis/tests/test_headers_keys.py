"""Propagation headers on Redis, checked in the keys themselves.

A run's headers are its ``hd`` field, one JSON object with sorted names,
written only when the run has headers, by every script that creates a run;
a debounced create replaces it, or drops it when the new create has none.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import redis

from reflow_core.errors import StorageError
from reflow_core.storage import NewRun, ScheduleSpec

from ._clocked_store import open_store

LEASE = timedelta(seconds=30)
TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
BOTH = {"tracestate": "a=1", **TRACE}


async def test_headers_round_trip_through_every_create(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        made = await store.create_run(NewRun("wf", "1", run_id="one", headers=BOTH))
        assert made.run.headers == BOTH
        # The names are sorted in the stored text, whatever order they came in.
        assert raw.hget(f"{tag}:run:one", "hd") == (
            b'{"traceparent":"' + TRACE["traceparent"].encode() + b'","tracestate":"a=1"}'
        )
        await store.create_run(NewRun("wf", "2", run_id="bare"))
        assert raw.hget(f"{tag}:run:bare", "hd") is None
        bare = await store.get_run("bare")
        assert bare is not None
        assert bare.headers == {}

        # Concurrent creates share one script call (create_many).
        many = await asyncio.gather(
            *(
                store.create_run(NewRun("wf", str(i), run_id=f"m{i}", headers={"n": str(i)}))
                for i in range(5)
            ),
            store.create_run(NewRun("wf", "x", run_id="m-bare")),
        )
        assert [r.run.headers for r in many] == [{"n": str(i)} for i in range(5)] + [{}]
        for i in range(5):
            stored = await store.get_run(f"m{i}")
            assert stored is not None
            assert stored.headers == {"n": str(i)}
        assert raw.hget(f"{tag}:run:m-bare", "hd") is None

        # A child run (start_child).
        await store.create_run(NewRun("parent", "1", run_id="p"))
        [claimed] = await store.claim_runs(["parent"], 1, LEASE)
        child = await store.start_child(
            claimed.lease, "fan", NewRun("kid", "2", run_id="c", headers=TRACE)
        )
        assert child is not None
        assert child.headers == TRACE
        # Starting it again finds the same child, headers included.
        again = await store.start_child(
            claimed.lease, "fan", NewRun("kid", "2", run_id="c", headers=TRACE)
        )
        assert again is not None
        assert again.headers == TRACE

        # A schedule's slot (claim_slot).
        slot = datetime(2030, 1, 1, tzinfo=UTC)
        await store.upsert_schedule(ScheduleSpec("s", "wf", "3", "every:60", slot))
        fired = await store.claim_schedule_slot(
            "s",
            slot,
            slot + timedelta(minutes=1),
            NewRun("wf", "3", run_id="sr", idempotency_key="s@slot", headers=TRACE),
        )
        assert fired is not None
        assert fired.headers == TRACE
        stored = await store.get_run("sr")
        assert stored is not None
        assert stored.headers == TRACE

        # Claimed and listed runs carry them too.
        claimed_runs = {c.run.id: c.run for c in await store.claim_runs(["wf"], 20, LEASE)}
        assert claimed_runs["one"].headers == BOTH
        assert claimed_runs["bare"].headers == {}
        page = await store.list_runs(workflow="kid")
        assert [r.headers for r in page.runs] == [TRACE]


async def test_a_debounced_create_replaces_the_headers(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        first = await store.create_run(NewRun("wf", "1", debounce_key="k", headers=BOTH))
        run_id = first.run.id
        key = f"{tag}:run:{run_id}"

        replaced = await store.create_run(NewRun("wf", "2", debounce_key="k", headers={"x": "y"}))
        assert not replaced.created
        assert replaced.run.id == run_id
        assert replaced.run.headers == {"x": "y"}
        assert raw.hget(key, "hd") == b'{"x":"y"}'

        # A debounced create without headers drops them.
        dropped = await store.create_run(NewRun("wf", "3", debounce_key="k"))
        assert dropped.run.id == run_id
        assert dropped.run.headers == {}
        assert raw.hget(key, "hd") is None

        # And one with headers brings them back.
        back = await store.create_run(
            NewRun("wf", "4", debounce_key="k", delay=timedelta(hours=1), headers=TRACE)
        )
        assert back.run.id == run_id
        assert back.run.headers == TRACE
        stored = await store.get_run(run_id)
        assert stored is not None
        assert stored.headers == TRACE
        assert stored.input == "4"


@pytest.mark.parametrize("text", ["not json", "[1]", "null"])
async def test_malformed_headers_are_a_storage_error(
    redis_url: str, tag: str, raw: redis.Redis, text: str
) -> None:
    async with open_store(redis_url) as store:
        await store.create_run(NewRun("wf", "1", run_id="r", headers=TRACE))
        raw.hset(f"{tag}:run:r", "hd", text)
        with pytest.raises(StorageError, match="malformed headers"):
            await store.get_run("r")
