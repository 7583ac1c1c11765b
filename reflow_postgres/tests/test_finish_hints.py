"""Finish hints: the statement that ends runs tells engines waiting for them.

Every way a run reaches a terminal status (a finish, a batched finish, a
cancel of a pending or a running run, the cancel cascade to its children, a
failure) sends the ids of the runs it ended on the schema's finish channel,
in that statement: one hint for a run ended alone, one per chunk of at most
7900 bytes for many. The tests read the hints as a waiting engine does
(``subscribe_finishes`` on a storage of its own) and, where their size or
shape matters, as the server sends them (a plain ``LISTEN`` connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

import reflow_postgres.storage
from reflow_core import Engine, Retry, RunFailedError, workflow
from reflow_core.storage import FinishSource, Lease, NewRun, StepRecord
from reflow_core.wakeups import MAX_FINISH_PAYLOAD, finish_payloads
from reflow_postgres import PostgresStorage
from reflow_postgres._sql import channel_name, finish_channel_name
from reflow_postgres.listener import Listener

LEASE = timedelta(seconds=60)
PROMPT = 5.0
"""Seconds within which a hint must have arrived."""
QUIET = 0.3
"""Seconds of silence after which no more hints are expected."""
SLOW_POLL = "30s"


class Hints:
    """What a finish subscription was told: each call's run ids (or ``None``)."""

    def __init__(self) -> None:
        self.calls: list[list[str] | None] = []

    def __call__(self, run_ids: Collection[str] | None) -> None:
        self.calls.append(None if run_ids is None else list(run_ids))

    def named(self) -> list[str]:
        return [run_id for call in self.calls if call is not None for run_id in call]

    async def wait_for(self, run_ids: Collection[str]) -> None:
        await wait_until(lambda: set(run_ids) <= set(self.named()))

    async def wait_for_blank(self) -> None:
        await wait_until(lambda: None in self.calls)


async def wait_until(predicate: Any, timeout: float = PROMPT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.005)


async def opened(url: str) -> PostgresStorage:
    store = PostgresStorage.from_url(url)
    await store.initialize()
    return store


async def subscribed(store: PostgresStorage) -> Hints:
    """A finish subscription on ``store``, connected, its first ``notify(None)``
    (sent on connecting) already gone."""
    hints = Hints()
    await store.subscribe_finishes(hints)
    listener = store._listener
    assert listener is not None
    await asyncio.wait_for(listener.connected.wait(), PROMPT)
    await wait_until(lambda: hints.calls == [None])
    hints.calls.clear()
    return hints


async def claimed(store: PostgresStorage, workflow_name: str, *ids: str) -> list[Lease]:
    """Runs of ``workflow_name`` with ``ids`` created and claimed, their leases in order."""
    for run_id in ids:
        await store.create_run(NewRun(workflow_name, "0", run_id=run_id))
    runs = await store.claim_runs([workflow_name], len(ids), LEASE)
    leases = {c.run.id: c.lease for c in runs}
    assert set(leases) == set(ids)
    return [leases[run_id] for run_id in ids]


class RawHints:
    """The finish channel as the server sends it: a plain ``LISTEN`` connection."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    @classmethod
    async def listen(cls, database: str, schema: str) -> RawHints:
        conn = await psycopg.AsyncConnection.connect(database, autocommit=True)
        channel = sql.Identifier(finish_channel_name(schema))
        await conn.execute(sql.SQL("LISTEN {}").format(channel))
        return cls(conn)

    async def payloads(self) -> list[str]:
        """The hints received until a pause of :data:`QUIET` seconds."""
        got = []
        async for note in self.conn.notifies(timeout=QUIET):
            got.append(note.payload)
        return got

    async def close(self) -> None:
        await self.conn.close()


def test_the_finish_channel_is_named_after_the_schema() -> None:
    assert finish_channel_name("reflow") == "reflow-done:reflow"
    assert finish_channel_name("s" * 63) == ("reflow-done:" + "s" * 63)[:63]
    assert finish_channel_name("reflow") != channel_name("reflow")


async def test_the_storage_is_a_finish_source(postgres_url: str) -> None:
    store = PostgresStorage.from_url(postgres_url)
    assert isinstance(store, FinishSource)
    assert store.finish_channel == finish_channel_name(store.schema)


# -- each way a run ends --------------------------------------------------------------


async def test_an_engine_finishing_a_run_sends_its_id(postgres_url: str) -> None:
    watcher = await opened(postgres_url)
    try:
        hints = await subscribed(watcher)
        wf = workflow("one").step("a", lambda ctx: "done")
        async with Engine(storage=postgres_url, workflows=[wf]) as engine:
            run = await engine.enqueue(wf, None)
            await hints.wait_for([run.id])
            assert await engine.result(run.id, timeout=PROMPT) == "done"
        assert [run.id] in hints.calls
    finally:
        await watcher.close()


async def test_runs_finishing_together_send_one_hint_for_the_batch(postgres_url: str) -> None:
    """Twelve runs of an engine with concurrency 12 end at the same moment:
    their finishes share one statement (group commit), which sends one hint
    naming them all, not one per run."""
    watcher = await opened(postgres_url)
    total = 12
    started: set[str] = set()
    release = asyncio.Event()

    async def hold(ctx: Any) -> str:
        started.add(ctx.run_id)
        await release.wait()
        return "ok"

    wf = workflow("together").step("a", hold)
    try:
        hints = await subscribed(watcher)
        async with Engine(storage=postgres_url, workflows=[wf], worker=False) as producer:
            runs = await producer.enqueue_many(wf, [None] * total)
        ids = [run.id for run in runs]
        async with Engine(storage=postgres_url, workflows=[wf], concurrency=total) as worker:
            await wait_until(lambda: len(started) == total)
            release.set()
            await hints.wait_for(ids)
            assert worker.running
        assert sorted(hints.named()) == sorted(ids)
        # The first finish goes out alone; the others, arrived meanwhile,
        # share the next statement and its one hint.
        assert len(hints.calls) < total
        assert max(len(call or ()) for call in hints.calls) >= 2
    finally:
        await watcher.close()


async def test_cancelling_a_pending_run_sends_its_id(postgres_url: str) -> None:
    watcher = await opened(postgres_url)
    try:
        hints = await subscribed(watcher)
        wf = workflow("unclaimed").step("a", lambda ctx: None)
        async with Engine(storage=postgres_url, worker=False) as engine:
            run = await engine.enqueue(wf, None)
            assert await engine.cancel(run.id)
            await hints.wait_for([run.id])
        assert hints.calls == [[run.id]]
    finally:
        await watcher.close()


@pytest.mark.parametrize("fenced", [False, True], ids=["by-anyone", "by-its-worker"])
async def test_cancelling_a_running_run_sends_its_id(postgres_url: str, fenced: bool) -> None:
    store, watcher = await opened(postgres_url), await opened(postgres_url)
    try:
        hints = await subscribed(watcher)
        [lease] = await claimed(store, "busy", "busy-1")
        assert await store.update_run_status(
            "busy-1", "cancelled", lease=lease if fenced else None, error="stop"
        )
        await hints.wait_for(["busy-1"])
        await asyncio.sleep(QUIET)
        assert hints.calls == [["busy-1"]]
    finally:
        await asyncio.gather(store.close(), watcher.close())


async def test_a_cancel_cascade_sends_the_ids_of_the_children_it_ended(
    postgres_url: str,
) -> None:
    """The cancelled run's id goes in a hint of its own; the runs below it,
    cancelled by one statement (a pass of the cascade), in one hint."""
    store, watcher = await opened(postgres_url), await opened(postgres_url)
    try:
        [lease] = await claimed(store, "tree", "root")
        kids = [f"root.{i}" for i in range(5)]
        for kid in kids:
            assert await store.start_child(lease, "fan", NewRun("leaf", "0", run_id=kid))
        # One child runs (it holds a lease), the others are pending.
        [busy] = await store.claim_runs(["leaf"], 1, LEASE)
        assert await store.start_child(
            busy.lease, "deeper", NewRun("leaf", "0", run_id=f"{busy.run.id}.0")
        )
        hints = await subscribed(watcher)
        assert await store.update_run_status("root", "cancelled", error="stop")
        below = [*kids, f"{busy.run.id}.0"]
        await hints.wait_for(["root", *below])
        await asyncio.sleep(QUIET)
        assert ["root"] in hints.calls
        assert [sorted(call or ()) for call in hints.calls if call != ["root"]] == [sorted(below)]
    finally:
        await asyncio.gather(store.close(), watcher.close())


async def test_a_failed_run_sends_its_id(postgres_url: str) -> None:
    watcher = await opened(postgres_url)

    def boom(ctx: Any) -> None:
        raise ValueError("no")

    wf = workflow("fails").step("a", boom, retry=Retry(max_attempts=1))
    try:
        hints = await subscribed(watcher)
        async with Engine(storage=postgres_url, workflows=[wf]) as engine:
            run = await engine.enqueue(wf, None)
            with pytest.raises(RunFailedError):
                await engine.result(run.id, timeout=PROMPT)
            await hints.wait_for([run.id])
        assert (await watcher.get_run(run.id)).status == "failed"  # type: ignore[union-attr]
    finally:
        await watcher.close()


async def test_a_run_failed_by_its_worker_or_by_anyone_sends_its_id(postgres_url: str) -> None:
    store, watcher = await opened(postgres_url), await opened(postgres_url)
    try:
        hints = await subscribed(watcher)
        first, _ = await claimed(store, "doomed", "doomed-1", "doomed-2")
        assert await store.update_run_status("doomed-1", "failed", lease=first, error="x")
        assert await store.update_run_status("doomed-2", "failed", error="x")
        await hints.wait_for(["doomed-1", "doomed-2"])
        await asyncio.sleep(QUIET)
        assert hints.calls == [["doomed-1"], ["doomed-2"]]
    finally:
        await asyncio.gather(store.close(), watcher.close())


async def test_a_finish_with_its_last_step_sends_the_id(postgres_url: str) -> None:
    store, watcher = await opened(postgres_url), await opened(postgres_url)
    try:
        hints = await subscribed(watcher)
        [lease] = await claimed(store, "stepped", "stepped-1")
        assert await store.finish_run(
            lease, "completed", output="1", step=StepRecord("last", "completed", output="1")
        )
        await hints.wait_for(["stepped-1"])
    finally:
        await asyncio.gather(store.close(), watcher.close())


async def test_a_run_that_does_not_end_sends_no_hint(postgres_url: str) -> None:
    """A fenced write that fails (a stale lease) ends nothing and tells nothing."""
    store, watcher = await opened(postgres_url), await opened(postgres_url)
    try:
        hints = await subscribed(watcher)
        [lease] = await claimed(store, "stale", "stale-1")
        stale = Lease(lease.run_id, lease.epoch + 1)
        assert not await store.finish_run(stale, "completed", output="1")
        assert not await store.update_run_status("stale-1", "failed", lease=stale)
        assert not await store.update_run_status("missing", "cancelled")
        await asyncio.sleep(QUIET)
        assert hints.calls == []
    finally:
        await asyncio.gather(store.close(), watcher.close())


# -- switched off -------------------------------------------------------------------------


async def test_no_hint_is_sent_with_notify_off(postgres_url: str) -> None:
    quiet, watcher = await opened(f"{postgres_url}&notify=false"), await opened(postgres_url)
    try:
        hints = await subscribed(watcher)
        one, two, three = await claimed(quiet, "off", "off-1", "off-2", "off-3")
        assert await quiet.finish_run(one, "completed", output="1")
        await asyncio.gather(
            quiet.finish_run(two, "completed", output="1"),
            quiet.finish_run(three, "failed", error="x"),
        )
        [lease] = await claimed(quiet, "off", "off-4")
        assert await quiet.start_child(lease, "s", NewRun("off", "0", run_id="off-4.0"))
        assert await quiet.update_run_status("off-4", "cancelled")
        assert (await quiet.get_run("off-4.0")).status == "cancelled"  # type: ignore[union-attr]
        await asyncio.sleep(QUIET)
        assert hints.calls == []
    finally:
        await asyncio.gather(quiet.close(), watcher.close())


async def test_with_listen_off_a_finish_subscription_never_fires(postgres_url: str) -> None:
    deaf, store = await opened(f"{postgres_url}&listen=false"), await opened(postgres_url)
    try:
        hints = Hints()
        sub = await deaf.subscribe_finishes(hints)
        [lease] = await claimed(store, "unheard", "unheard-1")
        assert await store.finish_run(lease, "completed", output="1")
        await asyncio.sleep(QUIET)
        assert hints.calls == []
        assert deaf._listener is not None
        assert not deaf._listener.connected.is_set()
        await sub.close()
    finally:
        await asyncio.gather(deaf.close(), store.close())


# -- ids a hint cannot carry, and big batches ------------------------------------------------


@pytest.mark.parametrize(
    "odd_id",
    ["line\nbreak", "x" * 1001, "é" * 501],
    ids=["newline", "1001-bytes", "1002-bytes-in-501-characters"],
)
async def test_an_id_a_hint_cannot_carry_asks_to_look_at_everything(
    postgres_url: str, schema: str, postgres_database: str, odd_id: str
) -> None:
    store, watcher = await opened(postgres_url), await opened(postgres_url)
    raw = await RawHints.listen(postgres_database, schema)
    try:
        hints = await subscribed(watcher)
        [alone] = await claimed(store, "odd", odd_id)
        assert await store.finish_run(alone, "completed", output="1")
        await hints.wait_for_blank()
        assert hints.calls == [None]
        assert await raw.payloads() == [""]
        # In a batch, the others are named and the odd one is a blank entry.
        hints.calls.clear()
        leases = await claimed(store, "odd", f"{odd_id}!", "plain-1", "plain-2")
        await asyncio.gather(*(store.finish_run(lease, "completed") for lease in leases))
        await hints.wait_for_blank()
        sent = await raw.payloads()
        assert sorted(entry for payload in sent for entry in payload.split("\n")) == [
            "",
            "plain-1",
            "plain-2",
        ]
        assert len(sent) < 3  # the first may go alone; the others share one hint
    finally:
        await asyncio.gather(store.close(), watcher.close(), raw.close())


async def test_an_id_of_1000_bytes_is_sent(postgres_url: str) -> None:
    store, watcher = await opened(postgres_url), await opened(postgres_url)
    try:
        hints = await subscribed(watcher)
        long_id = "é" * 500
        [lease] = await claimed(store, "long", long_id)
        assert await store.finish_run(lease, "completed")
        await hints.wait_for([long_id])
        assert None not in hints.calls
    finally:
        await asyncio.gather(store.close(), watcher.close())


def _long_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:03d}-" + "x" * 880 for i in range(count)]


@pytest.mark.parametrize("how", ["finish", "cancel"])
async def test_a_big_batch_is_sent_in_chunks(
    postgres_url: str, schema: str, postgres_database: str, how: str
) -> None:
    """Forty runs with ids of about 900 bytes end in one statement (a batched
    finish, or a cancel cascade to forty children): their ids go in a few
    hints of at most 7900 bytes each, every id in exactly one."""
    store, watcher = await opened(postgres_url), await opened(postgres_url)
    raw = await RawHints.listen(postgres_database, schema)
    try:
        hints = await subscribed(watcher)
        ids = _long_ids(how, 40)
        if how == "finish":
            leases = await claimed(store, "big", *ids)
            done = await asyncio.gather(*(store.finish_run(lease, "completed") for lease in leases))
            assert all(done)
        else:
            [lease] = await claimed(store, "big", "parent")
            for run_id in ids:
                assert await store.start_child(lease, "fan", NewRun("kid", "0", run_id=run_id))
            assert await store.update_run_status("parent", "cancelled")
            ids = ["parent", *ids]
        await hints.wait_for(ids)
        sent = await raw.payloads()
        assert all(len(payload.encode()) <= MAX_FINISH_PAYLOAD for payload in sent)
        entries = [entry for payload in sent for entry in payload.split("\n")]
        assert sorted(entries) == sorted(ids)
        # Not one hint per run: about as few as the format allows.
        assert len(sent) <= len(finish_payloads(ids)) + 3
        assert sorted(hints.named()) == sorted(ids)
        assert None not in hints.calls
    finally:
        await asyncio.gather(store.close(), watcher.close(), raw.close())


# -- the listening connection -----------------------------------------------------------------


async def test_a_finish_subscription_joins_a_wake_up_listener(postgres_url: str) -> None:
    """A storage whose connection listens for wake-ups only connects again
    when a finish subscription comes, listening to both channels: the
    finish hints arrive, and so do the wake-ups."""
    store, other = await opened(postgres_url), await opened(postgres_url)
    try:
        woken: list[str] = []
        wakes = await store.subscribe_wakeups(["w"], lambda: woken.append("w"))
        listener = store._listener
        assert listener is not None
        await asyncio.wait_for(listener.connected.wait(), PROMPT)
        assert listener.reconnects == 0
        hints = Hints()
        finishes = await store.subscribe_finishes(hints)
        assert store._listener is listener  # one connection for both
        await wait_until(lambda: listener.connected.is_set() and listener.reconnects == 1)
        # Connecting again tells everyone to look.
        await wait_until(lambda: hints.calls == [None] and bool(woken))
        hints.calls.clear()
        woken.clear()
        [lease] = await claimed(other, "w", "w-1")
        await wait_until(lambda: bool(woken))  # the create woke the subscriber
        assert await other.finish_run(lease, "completed")
        await hints.wait_for(["w-1"])
        woken.clear()
        await other.create_run(NewRun("w", "0"))
        await wait_until(lambda: bool(woken))
        # A finish subscriber alone does not need the wake-up channel.
        await wakes.close()
        await finishes.close()
        assert not listener.connected.is_set()
    finally:
        await asyncio.gather(store.close(), other.close())


# -- the engine -------------------------------------------------------------------------------


async def test_a_result_waited_for_elsewhere_comes_back_at_once(postgres_url: str) -> None:
    """A producer (no worker, polling every 30 s) waits for a run that a
    worker on another storage ends after three seconds: by then its reads
    are about 2.5 s apart, and the next would come two seconds after the
    end; the finish hint brings the result back within a fraction of it."""
    ended: list[float] = []
    release = asyncio.Event()

    async def slow(ctx: Any) -> str:
        await release.wait()
        ended.append(time.monotonic())
        return "late"

    wf = workflow("slow").step("a", slow)
    producer_store, worker_store = await opened(postgres_url), await opened(postgres_url)
    try:
        async with (
            Engine(storage=producer_store, worker=False, poll_interval=SLOW_POLL) as producer,
            Engine(storage=worker_store, workflows=[wf], poll_interval=SLOW_POLL) as worker,
        ):
            run = await producer.enqueue(wf, None)
            waiting = asyncio.create_task(producer.result(run.id, timeout=30))
            await asyncio.sleep(3.0)
            assert not waiting.done()
            hinted = producer._watcher.hinted
            release.set()
            assert await asyncio.wait_for(waiting, PROMPT) == "late"
            returned = time.monotonic()
            assert worker.running
            assert producer._watcher.hinted > hinted
        assert returned - ended[0] < 1.0
    finally:
        await asyncio.gather(producer_store.close(), worker_store.close())


async def test_wait_returns_as_runs_end_elsewhere(postgres_url: str) -> None:
    """Engine.wait on a producer that polls every 30 s: five runs, ended by a
    worker that starts three seconds into the wait, come back within a
    second of its start (the next read would come two seconds later)."""
    wf = workflow("quick").step("a", lambda ctx: ctx.input)
    producer_store = await opened(postgres_url)
    try:
        async with Engine(
            storage=producer_store, worker=False, poll_interval=SLOW_POLL
        ) as producer:
            runs = [await producer.enqueue(wf, i) for i in range(5)]
            waiting = asyncio.create_task(producer.wait([run.id for run in runs], timeout=30))
            await asyncio.sleep(3.0)
            assert not waiting.done()
            hinted = producer._watcher.hinted
            began = time.monotonic()
            async with Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL):
                waited = await asyncio.wait_for(waiting, PROMPT)
                took = time.monotonic() - began
            assert producer._watcher.hinted > hinted
        assert sorted(run.output for run in waited.done) == [0, 1, 2, 3, 4]
        assert waited.pending == []
        assert took < 1.0
    finally:
        await producer_store.close()


class _BusyListener(Listener):
    """A listener that checks its connection every millisecond, with a
    check that takes 10 ms: it spends most of its time in that query."""

    health_check = "SELECT pg_sleep(0.01)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "liveness": 0.001})


async def test_no_hint_is_lost_while_the_listener_checks_its_connection(
    postgres_url: str, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two waits for notifications the listener runs a query to
    notice a half-open connection. Notifications that arrive during that
    query are kept for its next wait (psycopg >= 3.2.4 queues them; before,
    they were dropped): with most hints arriving during the check, every
    one of 300 still reaches the subscriber."""
    monkeypatch.setattr(reflow_postgres.storage, "Listener", _BusyListener)
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    heard: set[str] = set()
    sent = [f"run-{n}" for n in range(300)]
    all_heard = asyncio.Event()

    def hear(ids: Collection[str] | None) -> None:
        heard.update(ids or ())
        if heard.issuperset(sent):
            all_heard.set()

    sub = await store.subscribe_finishes(hear)
    try:
        listener = store._listener
        assert isinstance(listener, _BusyListener)
        await asyncio.wait_for(listener.connected.wait(), PROMPT)
        channel = store._finish_channel
        async with await psycopg.AsyncConnection.connect(
            postgres_database, autocommit=True
        ) as conn:
            for index, run_id in enumerate(sent):
                await conn.execute("SELECT pg_notify(%s, %s)", (channel, run_id))
                if index % 10 == 0:
                    await asyncio.sleep(0.002)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_heard.wait(), PROMPT)
        assert sorted(set(sent) - heard) == []
    finally:
        await sub.close()
        await store.close()
