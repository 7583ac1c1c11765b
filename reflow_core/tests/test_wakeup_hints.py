"""How the engine acts on wake-up hints from a storage that sends them.

The storage here is the real in-memory backend with the optional
``subscribe_wakeups`` added, so a test can deliver hints by hand, as a
networked backend would when another process enqueues.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from reflow_core import Engine, MemoryStorage, codec, workflow
from reflow_core.schedules import parse_recurrence
from reflow_core.storage import ClaimedRun, NewRun, ScheduleRecord, ScheduleSpec, WakeupSource
from reflow_core.wakeups import WakeupHub


class HintingMemory(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.wake: Callable[[], None] | None = None
        self.claims: list[float] = []
        self.closed_subscriptions = 0

    async def claim_runs(
        self, workflows: Collection[str], limit: int, lease: timedelta
    ) -> list[ClaimedRun]:
        self.claims.append(time.monotonic())
        return await super().claim_runs(workflows, limit, lease)

    async def subscribe_wakeups(self, workflows: Collection[str], wake: Callable[[], None]) -> Any:
        self.wake = wake
        store = self

        class Subscription:
            async def close(self) -> None:
                store.closed_subscriptions += 1

        return Subscription()


class LookingMemory(HintingMemory):
    """Also notes when the worker looks for due schedules; a look takes
    ``look_takes`` seconds, as a round trip to a slow store would."""

    def __init__(self) -> None:
        super().__init__()
        self.looks: list[float] = []
        self.look_takes = 0.0

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        self.looks.append(time.monotonic())
        await asyncio.sleep(self.look_takes)
        return await super().due_schedules(limit, workflows)


def test_the_memory_backend_sends_no_hints_but_the_test_double_does() -> None:
    assert not isinstance(MemoryStorage(), WakeupSource)
    assert isinstance(HintingMemory(), WakeupSource)


async def test_a_hint_starts_work_enqueued_elsewhere_without_waiting_for_the_poll() -> None:
    store = HintingMemory()
    started: list[float] = []
    wf = workflow("hinted").step("a", lambda ctx: started.append(time.monotonic()))
    async with Engine(storage=store, workflows=[wf], poll_interval="30s", close_storage=False):
        await asyncio.sleep(0.05)  # the first claim found nothing; now idle
        await store.create_run(NewRun("hinted", codec.encode(None)))  # as another process
        await asyncio.sleep(0.2)
        assert started == []  # nobody told the worker
        assert store.wake is not None
        store.wake()
        for _ in range(200):
            if started:
                break
            await asyncio.sleep(0.005)
        assert started
    assert store.closed_subscriptions == 1


async def test_hints_after_an_empty_claim_wait_a_short_gap() -> None:
    store = HintingMemory()
    wf = workflow("gap").step("a", lambda ctx: None)
    async with Engine(storage=store, workflows=[wf], poll_interval="30s", close_storage=False):
        await asyncio.sleep(0.05)
        assert store.wake is not None
        before = len(store.claims)
        store.wake()  # nothing is there: an empty claim
        for _ in range(100):
            if len(store.claims) > before:
                break
            await asyncio.sleep(0)
        assert len(store.claims) == before + 1
        # A burst right after the empty claim: folded into one claim, sent
        # a few milliseconds later rather than at once.
        store.wake()
        store.wake()
        store.wake()
        await asyncio.sleep(0)
        assert len(store.claims) == before + 1
        await asyncio.sleep(0.1)
        assert len(store.claims) == before + 2


async def test_local_enqueues_never_wait_for_the_gap() -> None:
    store = HintingMemory()
    done: list[float] = []
    wf = workflow("local").step("a", lambda ctx: done.append(time.monotonic()))
    async with Engine(
        storage=store, workflows=[wf], poll_interval="30s", close_storage=False
    ) as engine:
        await asyncio.sleep(0.05)
        assert store.wake is not None
        for _ in range(5):
            store.wake()  # empty claims: the gap grows
            await asyncio.sleep(0.02)
        sent = time.monotonic()
        run = await engine.enqueue(wf, None)
        await engine.result(run.id, timeout=5)
        assert done[0] - sent < 0.5


class SwallowingHub(WakeupHub):
    """A channel whose driver turns a cancellation into a connection error,
    as a client does when its connection is closed under a pending read."""

    def __init__(self) -> None:
        async def no_due(workflows: list[str]) -> None:
            return None

        super().__init__(next_due=no_due, describe="test")
        self.listens = 0

    async def listen(self) -> None:
        self.listens += 1
        self.connected_now()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionError("connection closed") from None


async def test_closing_stops_a_listener_whose_driver_swallows_the_cancellation() -> None:
    hub = SwallowingHub()
    await hub.subscribe(["wf"], lambda: None)
    await asyncio.wait_for(hub.connected.wait(), 1)
    await asyncio.wait_for(hub.close(), 2)
    assert hub.listens == 1


async def test_the_last_unsubscribe_stops_such_a_listener_too() -> None:
    hub = SwallowingHub()
    sub = await hub.subscribe(["wf"], lambda: None)
    await asyncio.wait_for(hub.connected.wait(), 1)
    task = hub._task
    assert task is not None
    await sub.close()
    await asyncio.wait({task}, timeout=2)
    assert task.done()
    assert hub.listens == 1


async def test_a_hint_claims_before_a_due_look_at_the_schedules() -> None:
    store = LookingMemory()
    started: list[tuple[float, Any]] = []

    async def step(ctx: Any) -> None:
        started.append((time.monotonic(), ctx.input))

    wf = workflow("first").step("a", step)
    async with Engine(
        storage=store, workflows=[wf], poll_interval="30s", close_storage=False
    ) as engine:
        await asyncio.sleep(0.05)  # the first look and claim found nothing; now idle
        assert len(store.looks) == 1
        # A look is due at the next turn (as a poll interval after the last
        # one), it takes a while, and it will fire a schedule another engine
        # stored.
        engine._worker._scheduler._checked_at = time.monotonic() - 60
        store.look_takes = 0.3
        await store.upsert_schedule(
            ScheduleSpec(
                key="elsewhere",
                workflow="first",
                input=codec.encode("scheduled"),
                recurrence=parse_recurrence(every="1h").canonical,
                next_run_at=datetime.now(UTC) - timedelta(seconds=1),
            )
        )
        await store.create_run(NewRun("first", codec.encode("hinted")))  # as another process
        hinted = time.monotonic()
        assert store.wake is not None
        store.wake()
        for _ in range(200):
            if len(started) == 2:
                break
            await asyncio.sleep(0.01)
        [(first, first_input), (second, second_input)] = started
        assert first_input == "hinted"
        # Claimed and started at once, before the look was sent ...
        assert first - hinted < 0.2
        assert len(store.looks) == 2
        assert store.claims[1] < first < store.looks[1]
        # ... which still fired the schedule, and its run was claimed at once.
        assert second_input == "scheduled"
        assert store.looks[1] + 0.3 <= second < store.looks[1] + 0.5
