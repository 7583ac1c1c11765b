"""Schedules, end to end, on every backend.

Firing is driven by the storage's fake clock (``clock`` fixture) and an
engine clock that reads the same fake time, so slots pass instantly. The few
tests that start a dispatcher wait at most about half a second of real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydantic
import pytest

from reflow_core import (
    Clock,
    ConfigError,
    Engine,
    Schedule,
    SerializationError,
    StepContext,
    StorageError,
    ValidationError,
    Workflow,
    workflow,
)
from reflow_core.schedules import Recurrence, Scheduler, parse_recurrence, slot_key, to_epoch_ms
from reflow_core.storage import NewRun, ScheduleSpec, Storage

# -- helpers --------------------------------------------------------------------


class Report(pydantic.BaseModel):
    team: str


async def build(ctx: StepContext[Any, Any]) -> str:
    return f"report for {ctx.input.team}"


async def echo(ctx: StepContext[Any, Any]) -> Any:
    return ctx.input


report = workflow("report", input=Report).step("build", build)
plain = workflow("plain").step("echo", echo)


class FakeEngineClock(Clock):
    """The engine's clock, reading the storage's fake clock."""

    def __init__(self, storage_clock: Callable[[], datetime]) -> None:
        self._read = storage_clock

    def now(self) -> datetime:
        return self._read()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


def make_engine(
    storage: Storage, *workflows: Workflow[Any, Any], clock: Any = None, **options: Any
) -> Engine:
    """An engine that leaves the storage open (the fixture closes it)."""
    options.setdefault("close_storage", False)
    if clock is not None:
        options["clock"] = FakeEngineClock(clock)
    return Engine(storage=storage, workflows=workflows, **options)


@contextlib.asynccontextmanager
async def engines(*made: Engine) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for engine in made:
            await engine.stop(timeout=0)


async def all_runs(storage: Storage) -> list[Any]:
    await storage.initialize()
    page = await storage.list_runs(limit=1000)
    return sorted(page.runs, key=lambda r: r.idempotency_key or "")


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float = 3.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def store(db: Any, clock: Any) -> Storage:
    """A storage on the backend under test whose clock is the fake ``clock``."""
    result: Storage = db.connect(clock=clock)
    return result


def ms(moment: datetime) -> int:
    return to_epoch_ms(moment)


# -- recurrences ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cron": "not a cron"}, "'not a cron' has 3 field(s); five are required"),
        ({"cron": "61 * * * *"}, "'61 * * * *' is malformed: bad minute field"),
        ({"cron": "*/0 * * * *"}, "'*/0 * * * *' is malformed: bad minute field"),
        ({"cron": "0 0 30 2 *"}, "'0 0 30 2 *' never matches: no month in '2' has day '30'"),
        ({"cron": "0 0 31 4,6 *"}, "'0 0 31 4,6 *' never matches"),
        ({"cron": "0 0 * * * *"}, "'0 0 * * * *' has 6 field(s); five are required"),
        ({"cron": "0 0 1 1 * 2030"}, "has 6 field(s)"),
        ({"cron": "@reboot"}, "'@reboot' has 1 field(s)"),
        ({"cron": 5}, "cron must be a string"),
        ({"every": "1m", "cron": "* * * * *"}, "not both"),
        ({}, "needs every="),
        ({"every": 0}, "every must be positive"),
        ({"every": "0s"}, "every must be positive"),
        ({"every": -5}, "every must be positive"),
        ({"every": "0.1ms"}, "at least 1ms"),
        ({"every": "soon"}, "every='soon' is not a duration"),
    ],
)
def test_invalid_recurrences_are_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_recurrence(**options)
    assert message in str(info.value)


def test_canonical_recurrences() -> None:
    assert parse_recurrence(every="1h").canonical == "every:3600000"
    assert parse_recurrence(every=timedelta(milliseconds=1500)).canonical == "every:1500"
    assert parse_recurrence(every=90).canonical == "every:90000"
    assert (
        parse_recurrence(cron="  */5  9-17 * * mon-fri ").canonical == "cron:*/5 9-17 * * MON-FRI"
    )
    assert parse_recurrence(cron="@daily") == parse_recurrence(cron="0 0 * * *")
    for text in ("every:3600000", "cron:*/5 9-17 * * MON-FRI"):
        assert Recurrence.from_canonical(text).canonical == text
    for bad in ("every:0", "every:x", "hourly", "cron:0 0 30 2 *"):
        with pytest.raises(ConfigError):
            Recurrence.from_canonical(bad)


def test_every_slots_are_aligned_to_the_epoch() -> None:
    hourly = parse_recurrence(every="1h")
    now = datetime(2026, 11, 24, 12, 34, 56, 789000, tzinfo=UTC)
    assert hourly.next_after(now) == datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
    # Strictly after: a moment on a slot gives the following slot.
    on_slot = datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
    assert hourly.next_after(on_slot) == datetime(2026, 11, 24, 14, 0, tzinfo=UTC)
    odd = parse_recurrence(every="7s")
    slot = odd.next_after(now)
    assert ms(slot) % 7000 == 0
    assert now < slot <= now + timedelta(seconds=7)


def test_cron_slots_are_utc_whole_seconds_strictly_after() -> None:
    cron = parse_recurrence(cron="30 9 * * *")
    now = datetime(2026, 11, 24, 9, 30, 0, 1000, tzinfo=UTC)  # just after today's slot
    assert cron.next_after(now) == datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
    # An offset-aware moment in another zone is converted, not reinterpreted.
    paris = datetime(2026, 11, 24, 10, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=1)))
    assert cron.next_after(paris) == datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
    leap = parse_recurrence(cron="0 0 29 2 *")
    assert leap.next_after(now) == datetime(2028, 2, 29, tzinfo=UTC)


def test_next_slot_is_fast() -> None:
    recurrences = [parse_recurrence(cron="*/5 * * * *"), parse_recurrence(every="1m")]
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    started = time.perf_counter()
    for i in range(500):
        for recurrence in recurrences:
            recurrence.next_after(now + timedelta(seconds=i))
    assert time.perf_counter() - started < 1.0


def test_slot_key() -> None:
    slot = datetime(2026, 11, 24, 12, 1, tzinfo=UTC)
    assert slot_key("nightly", slot) == f"schedule:nightly:{int(slot.timestamp() * 1000)}"


# -- registering ----------------------------------------------------------------


async def test_schedule_is_stored_and_listed(store: Storage, clock: Any) -> None:
    engine = make_engine(store, report, plain, clock=clock)
    async with engines(engine):
        hourly = await engine.schedule(report, {"team": "ops"}, every="1h")
        daily = await engine.schedule(plain, [1, 2], cron="@daily", key="a-daily")
        assert isinstance(hourly, Schedule)
        assert hourly.key == "report"  # the workflow's name by default
        assert hourly.workflow == "report"
        assert hourly.input == {"team": "ops"}
        assert (hourly.every, hourly.cron) == (timedelta(hours=1), None)
        assert hourly.recurrence == "every:3600000"
        assert hourly.next_run_at == datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
        assert (daily.every, daily.cron) == (None, "0 0 * * *")
        assert daily.next_run_at == datetime(2026, 11, 25, 0, 0, tzinfo=UTC)
        listed = await engine.list_schedules()
    assert [s.key for s in listed] == ["a-daily", "report"]
    assert listed[1] == hourly
    assert listed[0].input == [1, 2]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"cron": "0 0 30 2 *"}, ConfigError),
        ({"cron": "0 0 * * * *"}, ConfigError),
        ({"cron": "0 0 * * ? *"}, ConfigError),
        ({"cron": "* * * * *", "every": "1m"}, ConfigError),
        ({"every": 0}, ConfigError),
        ({}, ConfigError),
        ({"every": "1m", "key": ""}, ConfigError),
        ({"every": "1m", "input": {"team": 5}}, ValidationError),
        ({"every": "1m", "input": {"missing": "team"}}, ValidationError),
    ],
)
async def test_invalid_registration_stores_nothing(
    store: Storage, options: dict[str, Any], error: type[Exception]
) -> None:
    options = dict(options)
    payload = options.pop("input", {"team": "ops"})
    engine = make_engine(store, report)
    async with engines(engine):
        with pytest.raises(error) as info:
            await engine.schedule(report, payload, **options)
        if "cron" in options and error is ConfigError and "every" not in options:
            assert repr(options["cron"]) in str(info.value)
        assert await engine.list_schedules() == []


async def test_input_that_is_not_plain_data_stores_nothing(store: Storage) -> None:
    engine = make_engine(store, plain)
    async with engines(engine):
        with pytest.raises(SerializationError):
            await engine.schedule(plain, {"when": object()}, every="1m")
        assert await engine.list_schedules() == []


async def test_reregistering_the_same_recurrence_keeps_the_cadence(
    store: Storage, clock: Any
) -> None:
    engine = make_engine(store, plain, clock=clock)
    async with engines(engine):
        first = await engine.schedule(plain, "v1", cron="0 * * * *", key="k")
        assert first.next_run_at == datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
        clock.advance(3 * 3600)  # a restart, hours later (nothing fired meanwhile)
        again = await engine.schedule(plain, "v2", cron=" 0  *  * * * ", key="k")
        assert again.next_run_at == first.next_run_at
        assert again.input == "v2"  # the input is replaced
        [listed] = await engine.list_schedules()
    assert listed.next_run_at == first.next_run_at
    assert listed.input == "v2"


async def test_a_changed_recurrence_starts_over(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock)
    async with engines(engine):
        first = await engine.schedule(plain, every="1h", key="k")
        clock.advance(90)
        changed = await engine.schedule(plain, every="1m", key="k")
        assert changed.next_run_at != first.next_run_at
        assert changed.next_run_at == datetime(2026, 11, 24, 12, 2, tzinfo=UTC)
        assert changed.every == timedelta(minutes=1)
        assert changed.created_at <= changed.updated_at


async def test_unschedule(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock)
    async with engines(engine):
        await engine.schedule(plain, every="1m", key="gone")
        await engine.schedule(plain, every="1m", key="kept")
        assert await engine.unschedule("gone") is True
        assert await engine.unschedule("gone") is False
        assert [s.key for s in await engine.list_schedules()] == ["kept"]
        clock.advance(120)
        await engine.tick()
    runs = await all_runs(store)
    assert [r.idempotency_key.split(":")[1] for r in runs] == ["kept"]


# -- firing -----------------------------------------------------------------------


async def test_a_due_slot_fires_one_run_with_a_slot_derived_key(store: Storage, clock: Any) -> None:
    engine = make_engine(store, report, clock=clock)
    async with engines(engine):
        schedule = await engine.schedule(report, {"team": "ops"}, every="1m", key="minutely")
        slot = schedule.next_run_at
        assert await engine.tick() == 0  # not due yet
        clock.advance(60)
        assert await engine.tick() == 1  # fired, claimed and run
        assert await engine.tick() == 0  # the same slot never fires twice
        [listed] = await engine.list_schedules()
    [run] = await all_runs(store)
    assert run.workflow == "report"
    assert run.idempotency_key == f"schedule:minutely:{ms(slot)}"
    assert run.status == "completed"
    assert listed.next_run_at == slot + timedelta(minutes=1)


async def test_missed_slots_are_skipped_not_backfilled(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock)
    async with engines(engine):
        schedule = await engine.schedule(plain, every="1m", key="k")
        clock.advance(10 * 60 + 30)  # ten slots pass while nothing runs
        assert await engine.tick() == 1
        assert await engine.tick() == 0
        [listed] = await engine.list_schedules()
    [run] = await all_runs(store)
    assert run.idempotency_key == f"schedule:k:{ms(schedule.next_run_at)}"
    now = clock()
    assert now < listed.next_run_at <= now + timedelta(minutes=1)
    assert listed.next_run_at == datetime(2026, 11, 24, 12, 11, tzinfo=UTC)


async def test_a_paused_schedule_fires_nothing_until_resumed(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock)
    async with engines(engine):
        await engine.schedule(plain, every="1m", key="k")
        assert await engine.pause_schedule("k")
        clock.advance(5 * 60 + 30)  # five slots pass while it is paused
        assert await engine.tick() == 0
        # A deploy registers the schedule again at start: it stays paused.
        assert (await engine.schedule(plain, every="1m", key="k")).paused
        assert (await engine.schedule(plain, every="2m", key="k")).paused
        assert await engine.tick() == 0
        assert await all_runs(store) == []

        assert await engine.resume_schedule("k")
        [listed] = await engine.list_schedules()
        assert not listed.paused
        now = clock()
        # The slots missed while paused are skipped, not fired on resume.
        assert now < listed.next_run_at <= now + timedelta(minutes=2)
        assert await engine.tick() == 0
        clock.advance(120)
        assert await engine.tick() == 1
    [run] = await all_runs(store)
    assert run.idempotency_key == f"schedule:k:{ms(listed.next_run_at)}"


async def test_resuming_before_the_next_slot_keeps_it(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock)
    async with engines(engine):
        schedule = await engine.schedule(plain, every="1h", key="k")
        assert await engine.pause_schedule("k")
        assert await engine.pause_schedule("k")  # pausing twice is harmless
        assert await engine.resume_schedule("k")
        assert await engine.resume_schedule("k")
        [listed] = await engine.list_schedules()
    assert listed.next_run_at == schedule.next_run_at
    assert not listed.paused


async def test_pausing_or_resuming_a_missing_schedule_is_false(store: Storage) -> None:
    engine = make_engine(store, plain)
    async with engines(engine):
        assert not await engine.pause_schedule("nope")
        assert not await engine.resume_schedule("nope")
        assert await engine.list_schedules() == []
        with pytest.raises(ConfigError, match="key must be a non-empty string"):
            await engine.pause_schedule("")


async def test_cron_schedule_fires_at_its_matches(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock)
    async with engines(engine):
        schedule = await engine.schedule(plain, "x", cron="*/15 * * * *", key="q")
        assert schedule.next_run_at == datetime(2026, 11, 24, 12, 15, tzinfo=UTC)
        for _ in range(3):
            clock.advance(15 * 60)
            assert await engine.tick() == 1
    runs = await all_runs(store)
    slots = [datetime(2026, 11, 24, 12, m, tzinfo=UTC) for m in (15, 30, 45)]
    assert [r.idempotency_key for r in runs] == [f"schedule:q:{ms(s)}" for s in slots]


async def test_only_engines_that_run_the_workflow_fire_it(db: Any, clock: Any) -> None:
    other = make_engine(db.connect(clock=clock), report, clock=clock)
    owner = make_engine(db.connect(clock=clock), plain, clock=clock)
    async with engines(other, owner):
        await other.schedule(plain, every="1m", key="k")  # registering needs no worker
        clock.advance(61)
        assert await other.tick() == 0
        assert await all_runs(owner.storage) == []
        assert await owner.tick() == 1


async def test_several_engines_fire_each_slot_exactly_once(db: Any, clock: Any) -> None:
    made = [make_engine(db.connect(clock=clock), plain, clock=clock) for _ in range(3)]
    async with engines(*made):
        schedule = await made[0].schedule(plain, every="1m", key="k")
        for _ in range(5):
            clock.advance(60)
            await asyncio.gather(*(engine.tick() for engine in made))
    runs = await all_runs(made[0].storage)
    slots = [schedule.next_run_at + timedelta(minutes=i) for i in range(5)]
    assert [r.idempotency_key for r in runs] == sorted(f"schedule:k:{ms(s)}" for s in slots)
    assert all(r.status == "completed" for r in runs)


async def test_racing_schedulers_create_one_run_per_slot(db: Any, clock: Any) -> None:
    """The firing step alone, many at once: the storage's compare-and-set
    decides, and every loser sees ``None``."""
    stores = [db.connect(clock=clock) for _ in range(3)]
    for store in stores:
        await store.initialize()
    engine = make_engine(stores[0], plain, clock=clock)
    async with engines(engine):
        await engine.schedule(plain, every="1m", key="k")
        clock.advance(60)
        schedulers = [Scheduler(interval=1.0) for _ in range(6)]
        results = await asyncio.gather(
            *(s.fire_due(stores[i % 3], {"plain"}, 10) for i, s in enumerate(schedulers))
        )
    assert sorted(len(r) for r in results) == [0, 0, 0, 0, 0, 1]
    assert len(await all_runs(stores[0])) == 1


async def test_a_fired_slot_cannot_be_claimed_or_created_again(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock)
    async with engines(engine):
        schedule = await engine.schedule(plain, {"n": 1}, every="1m", key="k")
        slot = schedule.next_run_at
        clock.advance(60)
        assert await engine.tick() == 1
        [run] = await all_runs(store)
        # A second claim of the fired slot (an engine that read it as due
        # before the first claim landed) changes nothing.
        again = await store.claim_schedule_slot(
            "k",
            slot,
            slot + timedelta(minutes=5),
            NewRun("plain", run.input, idempotency_key=slot_key("k", slot)),
        )
        assert again is None
        [listed] = await engine.list_schedules()
        assert listed.next_run_at == slot + timedelta(minutes=1)
        # Creating the slot's run again (a retry after a crash) finds the same run.
        same = await engine.enqueue(plain, {"n": 1}, idempotency_key=slot_key("k", slot))
        assert same.id == run.id
    assert len(await all_runs(store)) == 1


async def test_due_schedules_of_other_workflows_do_not_hide_ours(
    store: Storage, clock: Any
) -> None:
    await store.initialize()
    due = clock() - timedelta(minutes=1)
    for i in range(6):
        await store.upsert_schedule(
            ScheduleSpec(f"foreign-{i}", "elsewhere", '"x"', "every:60000", due)
        )
    await store.upsert_schedule(
        ScheduleSpec("mine", "plain", '"x"', "every:60000", due + timedelta(seconds=1))
    )
    fired = await Scheduler(interval=1.0).fire_due(store, {"plain"}, 2)
    assert [r.idempotency_key for r in fired] == [f"schedule:mine:{ms(due) + 1000}"]


async def test_due_schedules_of_unserved_workflows_never_starve_ours(
    store: Storage, clock: Any
) -> None:
    """1,700 due schedules of workflows nobody serves, all earlier than ours:
    more than a page of them ahead of it, however the engine pages. The
    storage filters by workflow, so ours fires at the first look."""
    await store.initialize()
    due = clock() - timedelta(hours=1)
    for i in range(1700):
        await store.upsert_schedule(
            ScheduleSpec(f"foreign-{i:04}", f"unserved-{i % 7}", '"x"', "every:3600000", due)
        )
    mine = due + timedelta(minutes=30)
    await store.upsert_schedule(ScheduleSpec("mine", "plain", '"x"', "every:3600000", mine))
    assert [s.key for s in await store.due_schedules(100, ["plain", "report"])] == ["mine"]
    assert len(await store.due_schedules(2000)) == 1701
    engine = make_engine(store, plain, report, clock=clock)
    async with engines(engine):
        assert await engine.tick() == 1
    [run] = await all_runs(store)
    assert (run.workflow, run.idempotency_key) == ("plain", slot_key("mine", mine))
    assert len(await store.due_schedules(2000)) == 1700


async def test_a_client_engine_fires_nothing(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock, worker=False, poll_interval="20ms")
    async with engine:
        await engine.schedule(plain, every="1m", key="k")
        clock.advance(120)
        await asyncio.sleep(0.1)
        assert await all_runs(store) == []


async def test_the_worker_fires_due_schedules(store: Storage, clock: Any) -> None:
    engine = make_engine(store, plain, clock=clock, poll_interval="20ms")
    async with engine:
        await engine.schedule(plain, "hi", every="1m", key="k")
        clock.advance(60)

        async def done() -> bool:
            runs = await all_runs(store)
            return len(runs) == 1 and runs[0].status == "completed"

        await wait_until(done, what="the slot's run to complete")
        await asyncio.sleep(0.1)  # no second run for the same slot
    assert len(await all_runs(store)) == 1


async def test_started_engines_fire_each_slot_once(db: Any, clock: Any) -> None:
    made = [
        make_engine(db.connect(clock=clock), plain, clock=clock, poll_interval="10ms")
        for _ in range(3)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for engine in made:
            await stack.enter_async_context(engine)
        await made[0].schedule(plain, every="1m", key="k")
        for n in range(1, 4):
            clock.advance(60)

            async def fired(n: int = n) -> bool:
                return len(await all_runs(made[0].storage)) >= n

            await wait_until(fired, what=f"slot {n}")
        await asyncio.sleep(0.1)
    assert len(await all_runs(made[0].storage)) == 3


async def test_a_slot_known_here_fires_on_time_between_polls(storage: Storage) -> None:
    """Real clocks: a schedule registered through this engine fires at its
    slot, not at the next poll (ten seconds away)."""
    engine = make_engine(storage, plain, poll_interval="10s")
    async with engine:
        await engine.schedule(plain, every="100ms", key="fast")

        async def fired() -> bool:
            return len(await all_runs(storage)) >= 2

        await wait_until(fired, timeout=0.8, what="two slots to fire")


class FlakySchedules:
    """Delegates to a real storage; the first ``failures`` calls of
    ``due_schedules`` raise ``StorageError``."""

    def __init__(self, inner: Storage, failures: int) -> None:
        self._inner = inner
        self.left = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def due_schedules(self, limit: int, workflows: Any = None) -> Any:
        if self.left > 0:
            self.left -= 1
            raise StorageError("connection dropped", operation="due_schedules", backend="test")
        return await self._inner.due_schedules(limit, workflows)


async def test_firing_errors_are_logged_and_retried(
    store: Storage, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakySchedules(store, failures=2)
    engine = make_engine(flaky, plain, clock=clock, poll_interval="20ms")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="reflow.engine"):
        async with engine:
            await engine.schedule(plain, every="1m", key="k")
            clock.advance(60)

            async def fired() -> bool:
                return len(await all_runs(store)) == 1

            await wait_until(fired, what="the slot to fire after the errors")
            assert engine.running
    assert flaky.left == 0
    assert sum("firing schedules failed" in r.getMessage() for r in caplog.records) == 2


class LimitOnlySchedules(FlakySchedules):
    """An adapter written before ``due_schedules`` took ``workflows``: it
    takes ``limit`` alone and gives the due schedules of every workflow."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner, failures=0)
        self.calls: list[int] = []

    async def due_schedules(self, limit: int) -> Any:  # type: ignore[override]
        self.calls.append(limit)
        return await self._inner.due_schedules(limit)


class FilteringSchedules(FlakySchedules):
    """An adapter of this version, noting the workflows it is asked for."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner, failures=0)
        self.asked: list[Any] = []

    async def due_schedules(self, limit: int, workflows: Any = None) -> Any:
        self.asked.append(workflows)
        return await self._inner.due_schedules(limit, workflows)


async def test_the_scheduler_passes_its_workflows_to_the_storage(
    store: Storage, clock: Any
) -> None:
    await store.initialize()
    due = clock() - timedelta(minutes=1)
    await store.upsert_schedule(ScheduleSpec("theirs", "elsewhere", '"x"', "every:60000", due))
    await store.upsert_schedule(ScheduleSpec("mine", "plain", '"x"', "every:60000", due))
    filtering = FilteringSchedules(store)
    scheduler = Scheduler(interval=1.0)
    fired = await scheduler.fire_due(filtering, {"report": 1, "plain": 2}, 5)  # type: ignore[arg-type]
    assert [r.idempotency_key for r in fired] == [f"schedule:mine:{ms(due)}"]
    assert filtering.asked == [["plain", "report"]]


async def test_an_adapter_without_the_workflows_parameter_still_fires_ours(
    store: Storage, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Decided once, by the signature (one warning): every look asks it for
    due schedules of every workflow and keeps this engine's, looking further
    while other workflows' fill the page."""
    await store.initialize()
    due = clock() - timedelta(minutes=1)
    for i in range(3):
        await store.upsert_schedule(
            ScheduleSpec(f"foreign-{i}", "elsewhere", '"x"', "every:60000", due)
        )
    await store.upsert_schedule(
        ScheduleSpec("mine", "plain", '"x"', "every:60000", due + timedelta(seconds=1))
    )
    old = LimitOnlySchedules(store)
    scheduler = Scheduler(interval=1.0)
    with caplog.at_level(logging.WARNING, logger="reflow.schedules"):
        fired = await scheduler.fire_due(old, {"plain"}, 2)  # type: ignore[arg-type]
        assert [r.idempotency_key for r in fired] == [f"schedule:mine:{ms(due) + 1000}"]
        assert old.calls == [2, 8]  # a page of foreign ones, then four times as far
        clock.advance(60)
        again = await scheduler.fire_due(old, {"plain"}, 2)  # type: ignore[arg-type]
    assert [r.workflow for r in again] == ["plain"]
    assert old.calls == [2, 8, 2, 8]
    warned = [r for r in caplog.records if "takes no workflows" in r.getMessage()]
    assert len(warned) == 1


# -- clock skew -------------------------------------------------------------------
#
# Real clocks everywhere, but the engine's runs an hour fast or slow. Slots
# follow the storage's clock: the first slot, the next slot after a firing,
# and the wake-ups for known slots (timed by the engine's clock corrected by
# the measured offset).

SKEWS = [
    pytest.param(timedelta(hours=1), id="engine-ahead"),
    pytest.param(timedelta(hours=-1), id="engine-behind"),
]


class SkewedClock(Clock):
    """The real time shifted by ``skew``; sleeps are real."""

    def __init__(self, skew: timedelta) -> None:
        self.skew = skew

    def now(self) -> datetime:
        return datetime.now(UTC) + self.skew

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class CountingChecks:
    """Delegates to a real storage, counting reads of its clock and of the
    due schedules (one of each per schedule check)."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self.now_calls = 0
        self.due_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def now(self) -> datetime:
        self.now_calls += 1
        return await self._inner.now()

    async def due_schedules(self, limit: int, workflows: Any = None) -> Any:
        self.due_calls += 1
        return await self._inner.due_schedules(limit, workflows)


@pytest.mark.parametrize("skew", SKEWS)
async def test_a_skewed_engine_registers_the_first_slot_on_the_storage_clock(
    storage: Storage, skew: timedelta
) -> None:
    engine = Engine(
        storage=storage, workflows=[plain], clock=SkewedClock(skew), close_storage=False
    )
    async with engines(engine):
        await storage.initialize()
        before = await storage.now()
        hourly = await engine.schedule(plain, every="1h", key="hourly")
        minutely = await engine.schedule(plain, cron="* * * * *", key="minutely")
        after = await storage.now()
    every = parse_recurrence(every="1h")
    assert every.next_after(before) <= hourly.next_run_at <= every.next_after(after)
    assert before < hourly.next_run_at <= after + timedelta(hours=1)
    assert before < minutely.next_run_at <= after + timedelta(minutes=1)


@pytest.mark.parametrize("skew", SKEWS)
async def test_a_skewed_scheduler_measures_the_offset_and_waits_for_the_slot(
    storage: Storage, skew: timedelta
) -> None:
    clock = SkewedClock(skew)
    await storage.initialize()
    scheduler = Scheduler(interval=10.0, clock=clock.now)
    # Nothing known and nothing due: the look costs no reading of the clock.
    assert await scheduler.fire_due(storage, {"plain"}, 10) == []
    assert scheduler.offset == timedelta(0)
    # Registering (Engine.schedule) reads it first, and measures the offset.
    await scheduler.storage_now(storage)
    assert abs(scheduler.offset + skew) < timedelta(seconds=1)
    slot = await storage.now() + timedelta(seconds=2)
    scheduler.expect("k", slot)
    # Two seconds away by the storage's clock, not an hour (or no time at
    # all); the offset errs late by at most the round trip of its reading.
    assert 1.0 < scheduler.wait(clock.now(), 10.0) < 2.1
    assert not scheduler.should_check(clock.now())
    assert scheduler.should_check(clock.now() + timedelta(seconds=2.1))


@pytest.mark.parametrize("skew", SKEWS)
async def test_a_skewed_engine_fires_once_per_slot_by_the_storage_clock(
    storage: Storage, skew: timedelta
) -> None:
    """An engine an hour fast or slow, with a poll interval longer than the
    test: it fires each slot on time (no hour of catch-up, no hour of
    silence), the schedule's next slot stays within one interval of the
    storage's now, and each run's idempotency key is its slot."""
    every = timedelta(milliseconds=400)
    duration = 2.4
    counting = CountingChecks(storage)
    engine = Engine(
        storage=counting,
        workflows=[plain],
        clock=SkewedClock(skew),
        poll_interval="10s",
        close_storage=False,
    )
    async with engine:
        schedule = await engine.schedule(plain, every=every, key="skewed")
        started = await storage.now()
        assert started - every < schedule.next_run_at <= started + every
        spread: list[timedelta] = []
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            [listed] = await storage.list_schedules()
            now = await storage.now()
            spread.append(listed.next_run_at - now)
            await asyncio.sleep(0.05)
    finished = await storage.now()  # the engine has stopped: no slot fires after it
    assert all(-every <= gap <= every for gap in spread), (min(spread), max(spread))
    # The slots from the first one on, each once and none skipped, up to
    # the storage's now: no catch-up of slots before the first, none ahead.
    runs = sorted(await all_runs(storage), key=lambda r: r.created_at)
    first = schedule.next_run_at
    expected = (finished - first) // every + 1
    slots = [first + i * every for i in range(len(runs))]
    assert [r.idempotency_key for r in runs] == [slot_key("skewed", s) for s in slots]
    assert expected - 1 <= len(runs) <= expected, (len(runs), expected)
    # Each slot fired on time: well within an interval of it.
    late = [r.created_at - s for r, s in zip(runs, slots, strict=True)]
    assert all(timedelta(0) <= d < every for d in late), late
    # One clock reading per check (plus the one of registering), and about
    # one check per slot: no busy loop towards a slot the engine's clock
    # thinks has passed.
    assert counting.now_calls <= counting.due_calls + 1
    assert counting.due_calls <= 2 * len(slots) + 3, (counting.due_calls, len(slots))


@pytest.mark.slow
def test_the_example_runs() -> None:
    pytest.importorskip("reflow_sqlite")
    example = Path(__file__).parents[2] / "examples" / "scheduled_report.py"
    out = subprocess.run(
        [sys.executable, str(example), "--seconds", "1.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "scheduled 'ops-report' every 1s" in out
    keys = re.findall(r"schedule:ops-report:(\d+)  completed: ops report built at", out)
    assert len(keys) >= 1
    assert all(int(k) % 1000 == 0 for k in keys)


class SchedulesNotBuilt(FlakySchedules):
    """A storage whose adapter has not built schedules yet: ``due_schedules``
    raises ``NotImplementedError`` (not a ReflowError) every time."""

    async def due_schedules(self, limit: int, workflows: Any = None) -> Any:
        self.left += 1
        raise NotImplementedError("due_schedules")


@pytest.mark.allow_error_logs
async def test_an_adapter_error_from_schedules_never_stops_the_worker(
    store: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """An adapter that raises something other than a StorageError while the
    worker looks for due schedules still gets its runs claimed and run; the
    error is logged with its traceback, the first time, not on every poll."""
    lacking = SchedulesNotBuilt(store, failures=0)
    engine = make_engine(lacking, plain, poll_interval="10ms")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="reflow.engine"):
        async with engine:
            run = await engine.enqueue(plain, None)
            await engine.result(run.id, timeout="5s")

            async def looked_often() -> bool:
                return lacking.left >= 12

            await wait_until(looked_often, what="the worker to look for schedules a dozen times")
            assert engine.running
    logged = [r for r in caplog.records if "firing schedules failed" in r.getMessage()]
    assert 1 <= len(logged) <= 2, [r.getMessage() for r in logged]
    assert logged[0].exc_info is not None
    assert "NotImplementedError" in caplog.text


class ClaimBreaksOnce(FlakySchedules):
    """``claim_runs`` raises ``RuntimeError`` (an adapter bug) on its first
    ``failures`` calls; schedules work."""

    async def due_schedules(self, limit: int, workflows: Any = None) -> Any:
        return await self._inner.due_schedules(limit, workflows)

    async def claim_runs(self, *args: Any, **kwargs: Any) -> Any:
        if self.left > 0:
            self.left -= 1
            raise RuntimeError("adapter bug")
        return await self._inner.claim_runs(*args, **kwargs)


@pytest.mark.allow_error_logs
async def test_an_adapter_error_from_a_claim_is_logged_and_retried(
    store: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    broken = ClaimBreaksOnce(store, failures=1)
    engine = make_engine(broken, plain, poll_interval="10ms")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="reflow.engine"):
        async with engine:
            run = await engine.enqueue(plain, None)
            await engine.result(run.id, timeout="5s")
            assert engine.running
    assert broken.left == 0
    failed = [r for r in caplog.records if "claim failed" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].exc_info is not None
