"""``Engine.enqueue_many``: batches of runs in one write per 1,000, each item
with its own options and idempotency outcome, on every backend."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from reflow_conformance.testsupport import engine_on
from reflow_core import (
    ConfigError,
    EnqueueItem,
    IdempotencyConflictError,
    Limit,
    MemoryStorage,
    SerializationError,
    StepContext,
    ValidationError,
    workflow,
)
from reflow_core.adapter import new_run_id, new_run_ids
from reflow_core.storage import MAX_CREATE_BATCH, CreateResult, NewRun, Storage


class Order(BaseModel):
    order_id: int


def _double(ctx: StepContext[Any, Any]) -> dict[str, int]:
    return {"twice": ctx.input["n"] * 2}


plain = workflow("em-plain").step("double", _double)
typed = workflow("em-typed", input=Order).step("echo", lambda ctx: ctx.input.order_id)


async def _all_runs(storage: Storage, name: str) -> list[Any]:
    await storage.initialize()  # idempotent; a refused batch leaves it as it was
    runs: list[Any] = []
    cursor: str | None = None
    while True:
        page = await storage.list_runs(workflow=name, limit=500, cursor=cursor)
        runs.extend(page.runs)
        cursor = page.next_cursor
        if cursor is None:
            return runs


async def test_a_batch_is_enqueued_in_order_and_runs(storage: Storage) -> None:
    async with engine_on(storage, plain) as engine:
        runs = await engine.enqueue_many(plain, [{"n": n} for n in range(30)])
        assert [run.input for run in runs] == [{"n": n} for n in range(30)]
        assert all(run.status == "pending" and run.created for run in runs)
        assert len({run.id for run in runs}) == 30
        while await engine.tick():
            pass
        outputs = [await engine.result(run.id, timeout=5) for run in runs]
        assert outputs == [{"twice": 2 * n} for n in range(30)]


async def test_items_keep_their_own_idempotency_outcome(storage: Storage) -> None:
    async with engine_on(storage, plain) as engine:
        first = await engine.enqueue(plain, {"n": 1}, idempotency_key="a")
        assert first.created is True
        again = await engine.enqueue(plain, {"n": 1}, idempotency_key="a")
        assert (again.id, again.created) == (first.id, False)
        runs = await engine.enqueue_many(
            plain,
            [
                EnqueueItem({"n": 1}, idempotency_key="a"),
                EnqueueItem({"n": 2}, idempotency_key="b"),
                EnqueueItem({"n": 2}, idempotency_key="b"),
                {"n": 3},
            ],
        )
        assert [run.created for run in runs] == [False, True, False, True]
        assert runs[0].id == first.id
        assert runs[1].id == runs[2].id
        assert len(await _all_runs(storage, plain.name)) == 3


async def test_a_conflict_is_raised_after_the_others_are_written(storage: Storage) -> None:
    async with engine_on(storage, plain) as engine:
        held = await engine.enqueue(plain, {"n": 1}, idempotency_key="a")
        items = [{"n": 5}, EnqueueItem({"n": 9}, idempotency_key="a"), {"n": 6}]
        with pytest.raises(IdempotencyConflictError) as caught:
            await engine.enqueue_many(plain, items)
        assert caught.value.existing_run_id == held.id
        assert caught.value.__notes__ == [
            "1 of 3 items conflicted; the other 2 were enqueued "
            "(return_exceptions=True returns each item's outcome)"
        ]
        inputs = sorted(run.input for run in await _all_runs(storage, plain.name))
        assert inputs == ['{"n":1}', '{"n":5}', '{"n":6}']
        outcomes = await engine.enqueue_many(plain, items, return_exceptions=True)
        assert isinstance(outcomes[1], IdempotencyConflictError)
        assert outcomes[1].existing_run_id == held.id
        assert [type(o).__name__ for o in outcomes] == ["Run", "IdempotencyConflictError", "Run"]


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ({"order_id": "not a number"}, ValidationError, r"^item 2: "),
        (EnqueueItem({"order_id": 1}, idempotency_key=""), ConfigError, r"^item 2: "),
        (EnqueueItem({"order_id": 1}, delay="soon"), ConfigError, r"^item 2: "),
        (EnqueueItem({"order_id": 1}, priority=10**9), ConfigError, r"^item 2: "),
        (
            EnqueueItem({"order_id": 1}, idempotency_key="k", debounce_key="d", debounce="1s"),
            ConfigError,
            r"^item 2: give debounce_key= or idempotency_key=",
        ),
    ],
)
async def test_a_bad_item_names_its_index_and_nothing_is_written(
    storage: Storage, bad: Any, error: type[Exception], message: str
) -> None:
    async with engine_on(storage, typed) as engine:
        items = [{"order_id": 1}, Order(order_id=2), bad, {"order_id": 4}]
        with pytest.raises(error, match=message):
            await engine.enqueue_many(typed, items)
        assert await _all_runs(storage, typed.name) == []


async def test_a_value_that_is_not_plain_data_names_its_item(storage: Storage) -> None:
    async with engine_on(storage, plain) as engine:
        with pytest.raises(SerializationError, match=r"^item 1: .* at \$\.when"):
            await engine.enqueue_many(plain, [{"n": 1}, {"n": 2, "when": object()}])
        assert await _all_runs(storage, plain.name) == []


async def test_batch_options_apply_to_items_without_their_own(storage: Storage) -> None:
    async with engine_on(storage, plain) as engine:
        at = datetime.now(UTC) + timedelta(hours=5)
        runs = await engine.enqueue_many(
            plain,
            [
                {"n": 0},
                EnqueueItem({"n": 1}, delay="2h"),
                EnqueueItem({"n": 2}, run_at=at),
                EnqueueItem({"n": 3}, priority=9),
                EnqueueItem({"n": 4}, deadline="30m"),
            ],
            delay="1h",
            priority=3,
            deadline="3h",
        )
        hours = [
            round((run.wake_at - run.created_at).total_seconds() / 3600, 1)
            for run in runs
            if run.wake_at is not None
        ]
        # Delayed by the batch's hour, the item's two, until `at` (capped by
        # the batch's deadline), the batch's hour again; the last one is due
        # at its own deadline, before the hour.
        assert hours == [1.0, 2.0, 3.0, 1.0, 0.5]
        assert [run.status for run in runs] == ["delayed"] * 5
        assert [run.priority for run in runs] == [3, 3, 3, 9, 3]
        deadlines = [round((r.deadline_at - r.created_at).total_seconds() / 60) for r in runs]
        assert deadlines == [180, 180, 180, 180, 30]


async def test_headers_and_limits_reach_every_run(storage: Storage) -> None:
    limited = workflow(
        "em-limited", concurrency=Limit(key=lambda i: i["customer"], max=1), max_running=5
    ).step("noop", lambda ctx: None)
    async with engine_on(storage, limited) as engine:
        runs = await engine.enqueue_many(
            limited,
            [{"customer": "a"}, EnqueueItem({"customer": "b"}, headers={"x-tenant": "t2"})],
            headers={"x-tenant": "t1", "x-source": "import"},
        )
        stored = [await storage.get_run(run.id) for run in runs]
        assert [dict(s.headers) for s in stored if s is not None] == [
            {"x-tenant": "t1", "x-source": "import"},
            {"x-tenant": "t2", "x-source": "import"},
        ]
        assert [tuple(limit.key for limit in run.limits) for run in runs] == [
            ("reflow:workflow:em-limited", "em-limited:a"),
            ("reflow:workflow:em-limited", "em-limited:b"),
        ]


async def test_an_empty_batch_writes_nothing(storage: Storage) -> None:
    async with engine_on(storage, plain) as engine:
        assert await engine.enqueue_many(plain, []) == []
        assert await engine.enqueue_many(plain, iter(())) == []


async def test_items_may_come_from_any_iterable(storage: Storage) -> None:
    async with engine_on(storage, plain) as engine:
        runs = await engine.enqueue_many(plain, ({"n": n} for n in range(3)))
        assert [run.input for run in runs] == [{"n": 0}, {"n": 1}, {"n": 2}]
        by_name = await engine.enqueue_many(plain.name, [{"n": 7}])
        assert by_name[0].workflow == plain.name


class CountingBatches(MemoryStorage):
    """The in-memory backend, counting the batches it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        self.sizes.append(len(news))
        return await super().create_runs(news)


async def test_a_long_list_is_written_a_thousand_at_a_time() -> None:
    storage = CountingBatches()
    async with engine_on(storage, plain) as engine:
        count = 2 * MAX_CREATE_BATCH + 500
        runs = await engine.enqueue_many(plain, [{"n": n} for n in range(count)])
        assert storage.sizes == [MAX_CREATE_BATCH, MAX_CREATE_BATCH, 500]
        assert [run.input["n"] for run in runs] == list(range(count))
        assert len(await _all_runs(storage, plain.name)) == count


class WithoutBatches(MemoryStorage):
    """An adapter that has not built the ``batches`` area yet."""

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        raise NotImplementedError


async def test_without_create_runs_items_are_created_one_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = WithoutBatches()
    async with engine_on(storage, plain) as engine:
        held = await engine.enqueue(plain, {"n": 0}, idempotency_key="k")
        with caplog.at_level("INFO", logger="reflow.engine"):
            outcomes = await engine.enqueue_many(
                plain,
                [
                    EnqueueItem({"n": 0}, idempotency_key="k"),
                    EnqueueItem({"n": 1}, idempotency_key="k"),
                    {"n": 2},
                ],
                return_exceptions=True,
            )
        assert "does not implement create_runs" in caplog.text
        first, conflict, made = outcomes
        assert not isinstance(first, Exception)
        assert (first.id, first.created) == (held.id, False)
        assert isinstance(conflict, IdempotencyConflictError)
        assert not isinstance(made, Exception)
        assert made.created


async def test_a_batch_wakes_an_idle_worker_at_once() -> None:
    storage = MemoryStorage()
    done = asyncio.Event()
    seen: list[int] = []

    def note(ctx: StepContext[Any, Any]) -> None:
        seen.append(ctx.input["n"])
        if len(seen) == 3:
            done.set()

    wf = workflow("em-wake").step("note", note)
    async with engine_on(storage, wf, poll_interval="60s") as engine:
        await engine.start()
        await asyncio.sleep(0.05)  # the worker is idle, its next poll a minute away
        started = time.monotonic()
        await engine.enqueue_many(wf, [{"n": n} for n in range(3)])
        await asyncio.wait_for(done.wait(), timeout=5)
        assert time.monotonic() - started < 2
        assert sorted(seen) == [0, 1, 2]


def test_run_ids_are_ulids_that_sort_by_creation_time() -> None:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    before = time.time_ns() // 1_000_000
    ids = [new_run_id() for _ in range(200)]
    after = time.time_ns() // 1_000_000
    assert all(re.fullmatch(f"[0-7][{alphabet}]{{25}}", run_id) for run_id in ids)
    assert len(set(ids)) == len(ids)
    for run_id in ids:
        value = 0
        for char in run_id:
            value = value * 32 + alphabet.index(char)
        assert before <= value >> 80 <= after
    time.sleep(0.002)
    assert new_run_id()[:10] > ids[0][:10]


def test_ids_made_together_are_ulids_of_now_in_ascending_order() -> None:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    before = time.time_ns() // 1_000_000
    ids = new_run_ids(1000)
    after = time.time_ns() // 1_000_000
    assert all(re.fullmatch(f"[0-7][{alphabet}]{{25}}", run_id) for run_id in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000
    for run_id in ids:
        stamp = 0
        for char in run_id[:10]:
            stamp = stamp * 32 + alphabet.index(char)
        assert before <= stamp <= after
    assert new_run_ids(0) == []
