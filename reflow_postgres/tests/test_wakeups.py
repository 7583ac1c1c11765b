"""LISTEN/NOTIFY wake-ups: idle workers start new work at once, not at the next poll.

Every engine here polls only every 30 seconds, so anything that happens
within a few seconds happened because a notification woke the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from reflow_core import Engine, RunFailedError, codec, open_storage, workflow
from reflow_core.storage import ClaimedRun, NewRun, Storage
from reflow_postgres import PostgresStorage

SLOW_POLL = "30s"
PROMPT = 5.0
"""Seconds within which a woken worker must have acted (the poll is 30 s)."""


def recording_workflow(name: str, started: dict[str, float]) -> Any:
    async def first(ctx: Any) -> str:
        started.setdefault(ctx.run_id, time.monotonic())
        return "ok"

    return workflow(name).step("first", first)


async def wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.005)


async def test_an_enqueue_elsewhere_wakes_an_idle_worker(postgres_url: str) -> None:
    started: dict[str, float] = {}
    wf = recording_workflow("wake", started)
    async with (
        Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL) as worker,
        Engine(storage=postgres_url, workflows=[wf], worker=False) as producer,
    ):
        await asyncio.sleep(0.3)  # the worker has polled once and gone idle
        latencies = []
        for _ in range(5):
            sent = time.monotonic()
            run = await producer.enqueue(wf, None)
            await wait_for(lambda run=run: run.id in started, PROMPT)
            latencies.append(started[run.id] - sent)
            await asyncio.sleep(0.05)
        assert worker.running
    assert max(latencies) < PROMPT


async def test_a_sleep_falling_due_wakes_the_worker(postgres_url: str) -> None:
    woke: list[float] = []

    async def after(ctx: Any) -> None:
        woke.append(time.monotonic())

    wf = workflow("nap").step("a", lambda ctx: None).sleep("nap", "400ms").step("b", after)
    async with Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL) as engine:
        await asyncio.sleep(0.2)
        began = time.monotonic()
        run = await engine.enqueue(wf, None)
        await engine.result(run.id, timeout=PROMPT)
        assert (await engine.get_run_status(run.id)).status == "completed"
    assert 0.4 <= woke[0] - began < PROMPT


async def test_a_sleep_started_before_the_worker_is_found_by_its_timer(
    postgres_url: str,
) -> None:
    """A worker that starts while a run sleeps has seen no notification: it
    asks the database for the next due time when it starts listening."""
    woke: list[float] = []
    wf = (
        workflow("late")
        .step("a", lambda ctx: None)
        .sleep("nap", "1500ms")
        .step("b", lambda ctx: woke.append(time.monotonic()))
    )
    async with Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL) as first:
        run = await first.enqueue(wf, None)
        for _ in range(200):
            if (await first.get_run_status(run.id)).status == "sleeping":
                break
            await asyncio.sleep(0.01)
    began = time.monotonic()
    async with Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL):
        await wait_for(lambda: bool(woke), PROMPT)
    assert woke[0] - began < PROMPT


async def test_a_delayed_run_wakes_the_worker_when_its_delay_passes(postgres_url: str) -> None:
    """Creating a delayed run notifies the time until it is due (one hint per
    workflow for a batch of creates, the earliest), so an idle worker starts
    each one when its delay passes, not at its next poll."""
    started: dict[str, float] = {}
    wf = recording_workflow("later", started)
    producer = PostgresStorage.from_url(postgres_url)
    await producer.initialize()
    try:
        async with Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL):
            await asyncio.sleep(0.3)  # the worker has polled once and gone idle
            sent = time.monotonic()
            made = await asyncio.gather(
                *(
                    producer.create_run(
                        NewRun("later", codec.encode(None), delay=timedelta(milliseconds=ms))
                    )
                    for ms in (400, 800, 400)
                )
            )
            assert {m.run.status for m in made} == {"delayed"}
            await wait_for(lambda: all(m.run.id in started for m in made), PROMPT)
    finally:
        await producer.close()
    waited = sorted(started[m.run.id] - sent for m in made)
    assert waited[0] >= 0.4
    assert 0.8 <= waited[2] < PROMPT


async def test_a_delayed_run_created_before_the_worker_is_found_by_its_timer(
    postgres_url: str,
) -> None:
    """A worker that starts after a delayed run was created has seen no
    notification: next_due, which it asks when it starts listening, counts
    delayed runs too."""
    started: dict[str, float] = {}
    wf = recording_workflow("before", started)
    producer = PostgresStorage.from_url(postgres_url)
    await producer.initialize()
    try:
        made = await producer.create_run(
            NewRun("before", codec.encode(None), delay=timedelta(milliseconds=1500))
        )
        sent = time.monotonic()
        async with Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL):
            await wait_for(lambda: made.run.id in started, PROMPT)
    finally:
        await producer.close()
    assert 1.4 <= started[made.run.id] - sent < PROMPT


async def test_an_event_wakes_a_waiting_run(postgres_url: str) -> None:
    got: list[Any] = []
    wf = (
        workflow("approve")
        .wait_for_event("approval")
        .step("record", lambda ctx: got.append(ctx.prev))
    )
    async with (
        Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL) as worker,
        Engine(storage=postgres_url, workflows=[wf], worker=False) as sender,
    ):
        run = await sender.enqueue(wf, None)
        for _ in range(500):
            if (await sender.get_run_status(run.id)).status == "waiting":
                break
            await asyncio.sleep(0.01)
        assert (await sender.get_run_status(run.id)).status == "waiting"
        await sender.send_event(run.id, "approval", {"ok": True})
        await wait_for(lambda: bool(got), PROMPT)
        assert worker.running
    assert got == [{"ok": True}]


@pytest.mark.parametrize("kind", ["sleeping", "waiting", "delayed"])
async def test_a_paused_run_wakes_the_worker_at_its_deadline(postgres_url: str, kind: str) -> None:
    """A run that sleeps, waits (without a timeout) or is delayed for longer
    than its deadline allows is due at its deadline, and the notification
    says so: an idle worker fails it then, not at its next poll."""
    wf: Any = workflow(f"bounded-{kind}", timeout="700ms").step("a", lambda ctx: None)
    if kind == "sleeping":
        wf = wf.sleep("nap", "1h")
    elif kind == "waiting":
        wf = wf.wait_for_event("approval")
    wf = wf.step("b", lambda ctx: None)
    async with Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL) as engine:
        await asyncio.sleep(0.3)  # the worker has polled once and gone idle
        began = time.monotonic()
        run = await engine.enqueue(wf, None, delay="1h" if kind == "delayed" else None)
        with pytest.raises(RunFailedError) as info:
            await engine.result(run.id, timeout=PROMPT)
        took = time.monotonic() - began
        done = await engine.get_run_status(run.id)
    assert info.value.error_code == "deadline_exceeded"
    assert done.status == "failed"
    assert 0.6 <= took < PROMPT


async def test_only_the_workflows_workers_are_woken(postgres_url: str) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    woken: list[str] = []
    sub_a = await store.subscribe_wakeups(["a"], lambda: woken.append("a"))
    sub_b = await store.subscribe_wakeups(["b"], lambda: woken.append("b"))
    assert store._listener is not None
    await asyncio.wait_for(store._listener.connected.wait(), PROMPT)
    await asyncio.sleep(0.1)
    woken.clear()  # the wake-up everyone gets on connecting
    producer = open_storage(postgres_url)
    await producer.initialize()
    await producer.create_run(NewRun("a", "1"))
    await wait_for(lambda: bool(woken), PROMPT)
    await asyncio.sleep(0.1)
    assert woken == ["a"]
    await sub_a.close()
    await sub_b.close()
    await producer.close()
    await store.close()


async def test_the_listener_reconnects_and_wakes_after_its_connection_dies(
    postgres_url: str, postgres_database: str
) -> None:
    started: dict[str, float] = {}
    wf = recording_workflow("reconnect", started)
    async with (
        Engine(storage=postgres_url, workflows=[wf], poll_interval=SLOW_POLL) as worker,
        Engine(storage=postgres_url, workflows=[wf], worker=False) as producer,
    ):
        store = worker.storage
        assert isinstance(store, PostgresStorage)
        listener = store._listener
        assert listener is not None
        await asyncio.wait_for(listener.connected.wait(), PROMPT)
        with psycopg.connect(postgres_database, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN %%' AND datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchall()
        assert killed
        await wait_for(lambda: listener.reconnects >= 1 and listener.connected.is_set(), PROMPT)
        run = await producer.enqueue(wf, None)
        await wait_for(lambda: run.id in started, PROMPT)


class CountingStorage:
    """The real storage, counting claims (instrumentation, not a stand-in)."""

    def __init__(self, inner: PostgresStorage) -> None:
        self._inner = inner
        self.claims = 0
        self.empty_claims = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_runs(
        self, workflows: Collection[str], limit: int, lease: timedelta
    ) -> list[ClaimedRun]:
        self.claims += 1
        claimed = await self._inner.claim_runs(workflows, limit, lease)
        if not claimed:
            self.empty_claims += 1
        return claimed

    async def subscribe_wakeups(self, workflows: Any, wake: Any) -> Any:
        return await self._inner.subscribe_wakeups(workflows, wake)


async def test_a_burst_of_notifications_does_not_stampede_the_claim(postgres_url: str) -> None:
    """300 enqueues send 300 notifications to each of three idle workers.
    Each worker folds the burst into a few claims, not one per notification."""
    done: dict[str, float] = {}
    wf = recording_workflow("burst", done)
    stores = [CountingStorage(PostgresStorage.from_url(postgres_url)) for _ in range(3)]
    engines = [
        Engine(storage=s, workflows=[wf], poll_interval=SLOW_POLL, concurrency=20)  # type: ignore[arg-type]
        for s in stores
    ]
    for engine in engines:
        await engine.start()
    producer: Storage = open_storage(postgres_url)
    await producer.initialize()
    await asyncio.sleep(0.3)
    before = sum(s.claims for s in stores)
    empty_before = sum(s.empty_claims for s in stores)
    total = 300
    for _ in range(total):
        await producer.create_run(NewRun("burst", codec.encode(None)))
    await wait_for(lambda: len(done) == total, 30)
    for engine in engines:
        await engine.stop()
        await engine.storage.close()
    await producer.close()
    claims = sum(s.claims for s in stores) - before
    empty = sum(s.empty_claims for s in stores) - empty_before
    # Every run here arrives on its own, so about one claim per run does the
    # work, and each worker is told of the 200 runs the others take. Without
    # the gap after an empty claim each of those sent it into the claim:
    # about 900 claims, 500-600 of them empty.
    assert claims < total * 2, claims
    assert empty < 2 * total * 0.4, empty


@pytest.mark.parametrize("options", ["notify=false&listen=false", "listen=false"])
async def test_without_notifications_the_engine_polls(postgres_url: str, options: str) -> None:
    started: dict[str, float] = {}
    wf = recording_workflow("poll", started)
    url = f"{postgres_url}&{options}"
    async with (
        Engine(storage=url, workflows=[wf], poll_interval="50ms") as worker,
        Engine(storage=url, workflows=[wf], worker=False) as producer,
    ):
        run = await producer.enqueue(wf, None)
        await wait_for(lambda: run.id in started, PROMPT)
        store = worker.storage
        assert isinstance(store, PostgresStorage)
        assert store._listener is not None
        assert not store._listener.connected.is_set()
