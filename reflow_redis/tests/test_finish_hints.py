"""Finish hints on Redis: the ids of the runs a script ended, on ``P:done``.

Every script that ends runs (a finish, a batch of finishes, a cancel and its
cascade to the children, a failure) publishes their ids last, one message
per script (chunked past 7,900 bytes) in the format of
:func:`reflow_core.wakeups.finish_payloads`. ``FinishChannel`` reads the
channel as published; ``Notified`` records what a storage's
``subscribe_finishes`` tells its subscriber.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from reflow_core import Engine, StorageError, workflow
from reflow_core.storage import FinishSource, Lease, NewRun
from reflow_core.wakeups import MAX_FINISH_PAYLOAD, finish_payloads
from reflow_redis import RedisStorage

from . import _redis_harness as h

LEASE = timedelta(seconds=30)
MARKER = "end of the hints so far"


class FinishChannel:
    """A plain subscriber to a prefix's finish channel."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.name = "{" + prefix + "}:done"
        self._client = aioredis.Redis.from_url(redis_url.split("?", 1)[0])
        self._pubsub = self._client.pubsub()

    async def __aenter__(self) -> FinishChannel:
        await self._pubsub.subscribe(self.name)
        # Once the server confirmed, everything published later reaches us.
        while True:
            message = await self._pubsub.get_message(timeout=5)
            assert message is not None, "the subscription was not confirmed"
            if message["type"] == "subscribe":
                return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._client.aclose()

    async def next(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no message on the finish channel"
            message = await self._pubsub.get_message(timeout=left)
            if message is not None and message["type"] == "message":
                data: bytes = message["data"]
                return data.decode()

    async def so_far(self) -> list[str]:
        """Every hint published until now: a marker published now comes
        after them, since the server handles one command at a time."""
        await self._client.publish(self.name, MARKER)
        heard = []
        while (message := await self.next()) != MARKER:
            heard.append(message)
        return heard


class Notified:
    """A ``subscribe_finishes`` subscriber: each call's run ids (sorted), or None."""

    def __init__(self) -> None:
        self.calls: list[list[str] | None] = []

    def __call__(self, run_ids: Collection[str] | None) -> None:
        self.calls.append(None if run_ids is None else sorted(run_ids))

    async def until(self, expected: list[str] | None, timeout: float = 5.0) -> None:
        """Wait for a call with ``expected``, then forget the calls so far."""
        deadline = time.monotonic() + timeout
        while expected not in self.calls:
            assert time.monotonic() < deadline, f"no notify({expected!r}); got {self.calls!r}"
            await asyncio.sleep(0.005)
        self.calls.clear()


async def opened(url: str) -> RedisStorage:
    store = RedisStorage.from_url(url)
    await store.initialize()
    return store


async def claimed(store: RedisStorage, wf: str, count: int = 1) -> dict[str, Lease]:
    return {c.run.id: c.lease for c in await store.claim_runs([wf], count, LEASE)}


async def a_family(store: RedisStorage, parent: str, children: list[str]) -> Lease:
    """A running parent of workflow "parent" with pending children of workflow "kid"."""
    await store.create_run(NewRun("parent", "1", run_id=parent))
    lease = (await claimed(store, "parent"))[parent]
    for child in children:
        assert await store.start_child(lease, "fan", NewRun("kid", "2", run_id=child))
    return lease


def test_the_finish_channel_sits_beside_the_wake_channel() -> None:
    store = RedisStorage.from_url("redis://127.0.0.1:6379/0?prefix=billing")
    assert isinstance(store, FinishSource)
    assert store.channel == "{billing}:wake"
    assert store.finish_channel == "{billing}:done"


async def test_an_engine_finishing_a_one_step_run_names_it(redis_url: str, prefix: str) -> None:
    wf = workflow("one").step("a", lambda ctx: 1)
    async with (
        FinishChannel(redis_url, prefix) as channel,
        Engine(storage=redis_url, workflows=[wf]) as engine,
    ):
        run = await engine.enqueue(wf, None)
        assert await engine.result(run.id, timeout=10) == 1
        assert await channel.so_far() == [run.id]


async def test_a_batch_of_finishes_is_one_hint_not_one_per_run(redis_url: str, prefix: str) -> None:
    runs = 20
    started = 0
    gate = asyncio.Event()

    async def together(ctx: Any) -> int:
        # Every run finishes at the same moment: their finishes share a script.
        nonlocal started
        started += 1
        if started == runs:
            gate.set()
        await gate.wait()
        return 1

    wf = workflow("many").step("a", together)
    async with (
        FinishChannel(redis_url, prefix) as channel,
        Engine(storage=redis_url, workflows=[wf], concurrency=runs) as engine,
    ):
        ids = [run.id for run in await engine.enqueue_many(wf, [None] * runs)]
        waited = await engine.wait(ids, timeout=20)
        assert waited.pending == []
        hints = await channel.so_far()
    named = [run_id for hint in hints for run_id in hint.split("\n")]
    assert sorted(named) == sorted(ids)  # each run once
    assert len(hints) < runs
    assert max(len(hint.split("\n")) for hint in hints) > 1


async def test_a_cancel_of_a_pending_run_names_it(redis_url: str, prefix: str) -> None:
    store = await opened(redis_url)
    async with FinishChannel(redis_url, prefix) as channel:
        created = await store.create_run(NewRun("wf", "1"))
        assert await store.update_run_status(created.run.id, "cancelled")
        assert not await store.update_run_status(created.run.id, "cancelled")  # no second hint
        assert await channel.so_far() == [created.run.id]
    await store.close()


async def test_a_cancel_of_a_running_run_names_it_and_a_hand_back_does_not(
    redis_url: str, prefix: str
) -> None:
    store = await opened(redis_url)
    async with FinishChannel(redis_url, prefix) as channel:
        await store.create_run(NewRun("wf", "1", run_id="handed"))
        await store.create_run(NewRun("wf", "1", run_id="running"))
        leases = await claimed(store, "wf", 2)
        assert await store.update_run_status("handed", "pending", lease=leases["handed"])
        assert await channel.so_far() == []
        assert await store.update_run_status("running", "cancelled")
        assert await channel.so_far() == ["running"]
    await store.close()


async def test_a_cancel_names_the_children_it_cascades_to_in_one_hint(
    redis_url: str, prefix: str
) -> None:
    store = await opened(redis_url)
    async with FinishChannel(redis_url, prefix) as channel:
        lease = await a_family(store, "p", ["c0", "c1"])
        kids = await claimed(store, "kid", 2)
        assert await store.finish_run(kids["c0"], "completed", output="3")
        assert await store.start_child(kids["c1"], "deeper", NewRun("kid", "4", run_id="g"))
        assert await channel.so_far() == ["c0"]
        assert await store.update_run_status("p", "cancelled")
        [hint] = await channel.so_far()
        assert sorted(hint.split("\n")) == ["c1", "g", "p"]  # c0 had finished
        assert not await store.finish_run(lease, "completed", output="5")
        assert await channel.so_far() == []
    await store.close()


async def test_a_failed_run_is_named(redis_url: str, prefix: str) -> None:
    def broken(ctx: Any) -> None:
        raise ValueError("no")

    wf = workflow("broken").step("a", broken)
    async with (
        FinishChannel(redis_url, prefix) as channel,
        Engine(storage=redis_url, workflows=[wf]) as engine,
    ):
        run = await engine.enqueue(wf, None)
        with pytest.raises(Exception, match="no"):
            await engine.result(run.id, timeout=10)
        assert (await engine.get_run_status(run.id)).status == "failed"
        assert await channel.so_far() == [run.id]
    # A failure written by a fenced status update is named too.
    store = await opened(redis_url)
    async with FinishChannel(redis_url, prefix) as channel:
        await store.create_run(NewRun("wf", "1", run_id="f"))
        lease = (await claimed(store, "wf"))["f"]
        assert await store.update_run_status("f", "failed", lease=lease, error="7")
        assert await channel.so_far() == ["f"]
    await store.close()


async def test_with_notify_off_no_finish_is_named(redis_url: str, prefix: str) -> None:
    store = await opened(f"{redis_url}&notify=false")
    async with FinishChannel(redis_url, prefix) as channel:
        await store.create_run(NewRun("wf", "1", run_id="done"))
        await store.create_run(NewRun("wf", "1", run_id="pending"))
        lease = (await claimed(store, "wf"))["done"]
        assert await store.finish_run(lease, "completed", output="1")
        assert await store.update_run_status("pending", "cancelled")
        await a_family(store, "p", ["c0", "c1"])
        assert await store.update_run_status("p", "cancelled")
        assert await channel.so_far() == []
    await store.close()


async def test_with_listen_off_a_finish_subscriber_is_never_told(redis_url: str) -> None:
    deaf = await opened(f"{redis_url}&listen=false")
    hearing = await opened(redis_url)
    unheard, heard = Notified(), Notified()
    quiet = await deaf.subscribe_finishes(unheard)
    loud = await hearing.subscribe_finishes(heard)
    await heard.until(None)  # subscribed
    created = await deaf.create_run(NewRun("wf", "1"))
    assert await deaf.update_run_status(created.run.id, "cancelled")  # notify stays on
    await heard.until([created.run.id])
    await asyncio.sleep(0.2)
    assert unheard.calls == []
    await quiet.close()
    await loud.close()
    await deaf.close()
    await hearing.close()


@pytest.mark.parametrize("odd", ["line\nbreak", "x" * 1001])
async def test_an_id_a_hint_cannot_carry_is_an_empty_entry_and_notify_none(
    redis_url: str, prefix: str, odd: str
) -> None:
    store = await opened(redis_url)
    notified = Notified()
    sub = await store.subscribe_finishes(notified)
    await notified.until(None)
    async with FinishChannel(redis_url, prefix) as channel:
        await store.create_run(NewRun("wf", "1", run_id=odd))
        assert await store.update_run_status(odd, "cancelled")
        assert await channel.so_far() == [""]
        await notified.until(None)
        # Beside ids it can carry, it still asks for a look at everything.
        await a_family(store, "p", [odd + "-child", "c"])
        assert await store.update_run_status("p", "cancelled")
        [hint] = await channel.so_far()
        assert sorted(hint.split("\n")) == ["", "c", "p"]
        await notified.until(None)
        # A run id of exactly 1,000 bytes still travels.
        edge = "y" * 1000
        await store.create_run(NewRun("wf", "1", run_id=edge))
        assert await store.update_run_status(edge, "cancelled")
        assert await channel.so_far() == [edge]
        await notified.until([edge])
    await sub.close()
    await store.close()


async def test_a_big_batch_is_chunked_as_finish_payloads_chunks_it(
    redis_url: str, prefix: str
) -> None:
    store = await opened(redis_url)
    children = [f"{i:03d}" + "c" * 600 for i in range(30)]  # about 18 kB of ids
    async with FinishChannel(redis_url, prefix) as channel:
        await a_family(store, "p", children)
        assert await store.update_run_status("p", "cancelled")
        hints = await channel.so_far()
    named = [run_id for hint in hints for run_id in hint.split("\n")]
    assert sorted(named) == sorted([*children, "p"])
    assert len(hints) == 3
    assert all(len(hint.encode()) <= MAX_FINISH_PAYLOAD for hint in hints)
    assert hints == finish_payloads(named)
    await store.close()


async def test_a_script_failing_after_ending_a_run_names_nothing(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    """Hints go last: a script that fails after a run ended sends none."""
    store = await opened(redis_url)
    async with FinishChannel(redis_url, prefix) as channel:
        await a_family(store, "p", ["c"])
        lease = (await claimed(store, "kid"))["c"]
        # The parent's hash replaced by a string: waking the parent fails
        # once the child's end is written.
        tag = "{" + prefix + "}"
        raw.delete(f"{tag}:run:p")
        raw.set(f"{tag}:run:p", "not a run")
        with pytest.raises(StorageError):
            await store.finish_run(lease, "completed", output="1")
        assert await channel.so_far() == []
    raw.delete(f"{tag}:run:p")
    await store.close()


async def test_a_wake_only_listener_connects_again_to_add_the_finish_channel(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    tag = "{" + prefix + "}"

    def subscribers(channel: str) -> int:
        [(_, count)] = raw.pubsub_numsub(channel)
        return int(count)

    async def until_subscribers(wake: int, done: int) -> None:
        deadline = time.monotonic() + 5
        while (subscribers(f"{tag}:wake"), subscribers(f"{tag}:done")) != (wake, done):
            assert time.monotonic() < deadline, "the listener's channels did not change"
            await asyncio.sleep(0.01)

    worker, producer = await opened(redis_url), await opened(redis_url)
    woken: list[int] = []
    wakes = await worker.subscribe_wakeups(["wf"], lambda: woken.append(1))
    await until_subscribers(1, 0)  # a worker alone never hears the fleet's finishes
    notified = Notified()
    finishes = await worker.subscribe_finishes(notified)
    await notified.until(None)  # connected again, on both channels
    await until_subscribers(1, 1)
    woken.clear()
    created = await producer.create_run(NewRun("wf", "1"))
    deadline = time.monotonic() + 5
    while not woken:
        assert time.monotonic() < deadline, "the worker was not woken after the restart"
        await asyncio.sleep(0.005)
    lease = (await claimed(producer, "wf"))[created.run.id]
    assert await producer.finish_run(lease, "completed", output="1")
    await notified.until([created.run.id])
    await finishes.close()
    await wakes.close()
    await worker.close()
    await producer.close()


async def test_a_result_waited_for_elsewhere_returns_on_the_hint(redis_url: str) -> None:
    """A producer polling every 30 s learns of the end from the hint."""
    gate = asyncio.Event()

    async def held(ctx: Any) -> int:
        await gate.wait()
        return 7

    wf = workflow("held").step("a", held)
    async with (
        Engine(
            storage=await opened(redis_url), workflows=[wf], worker=False, poll_interval=30
        ) as producer,
        Engine(storage=await opened(redis_url), workflows=[wf]),
    ):
        run = await producer.enqueue(wf, None)
        waiting = asyncio.create_task(producer.result(run.id, timeout=40))
        # Long enough for the waiter's reads to back off to seconds apart.
        await asyncio.sleep(3)
        assert not waiting.done()
        hinted = producer._watcher.hinted
        released = time.monotonic()
        gate.set()
        assert await waiting == 7
        assert time.monotonic() - released < 1.5
        assert producer._watcher.hinted > hinted


async def test_one_publish_per_script_counted_on_a_server_of_its_own(tmp_path: Path) -> None:
    """A group commit of finishes and a cancel with its cascade each
    publish once, whatever the number of runs they end."""
    server = h.RedisServer(h.need_redis_server(), tmp_path, "--save", "", "--appendonly", "no")
    server.start()
    try:
        store = await opened(f"{server.url}?prefix=count")
        try:
            with server.client() as probe:

                def calls() -> dict[str, int]:
                    stats = probe.info("commandstats")
                    return {name[8:]: int(v["calls"]) for name, v in stats.items()}

                for i in range(50):
                    await store.create_run(NewRun("wf", "1", run_id=f"r{i}"))
                leases = await claimed(store, "wf", 50)
                before = calls()
                done = await asyncio.gather(
                    *(store.finish_run(lease, "completed", output="1") for lease in leases.values())
                )
                after = calls()
                assert all(done)
                scripts = after["evalsha"] - before["evalsha"]
                assert scripts < 50
                assert after["publish"] - before.get("publish", 0) == scripts

                await a_family(store, "p", [f"c{i}" for i in range(20)])
                before = calls()
                assert await store.update_run_status("p", "cancelled")
                after = calls()
                assert after["evalsha"] - before["evalsha"] == 1
                assert after["publish"] - before["publish"] == 1
        finally:
            await store.close()
    finally:
        server.stop()


async def test_a_user_allowed_the_wake_channel_alone_still_ends_runs(tmp_path: Path) -> None:
    """An ACL written before finish hints (``&{prefix}:wake`` only): the
    scripts cannot publish on ``{prefix}:done``, and end the runs all the same."""
    server = h.RedisServer(h.need_redis_server(), tmp_path, "--save", "", "--appendonly", "no")
    server.start()
    try:
        with server.client() as admin:
            admin.execute_command(
                "ACL", "SETUSER", "app", "on", ">pw", "~{acl}:*", "&{acl}:wake",
                "+@all", "-@dangerous", "+info",
            )  # fmt: skip
        url = f"redis://app:pw@127.0.0.1:{server.port}/0?prefix=acl"
        store = await opened(url)
        try:
            async with FinishChannel(server.url, "acl") as channel:
                await store.create_run(NewRun("wf", "1", run_id="done"))
                await store.create_run(NewRun("wf", "1", run_id="cancelled"))
                lease = (await claimed(store, "wf"))["done"]
                assert await store.finish_run(lease, "completed", output="1")
                assert await store.update_run_status("cancelled", "cancelled")
                assert await channel.so_far() == []
            statuses = [
                (r.id, r.status) for r in (await store.get_runs(["done", "cancelled"])).values()
            ]
            assert sorted(statuses) == [("cancelled", "cancelled"), ("done", "completed")]
        finally:
            await store.close()
    finally:
        server.stop()
