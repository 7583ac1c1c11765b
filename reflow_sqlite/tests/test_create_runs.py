"""``create_runs`` on SQLite: one transaction per batch, written whole or not
at all, and each item's outcome that of ``create_run`` one after another.

Runs under both transaction drivers (one call on aiosqlite's worker thread,
and aiosqlite's public coroutines).
"""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reflow_core.adapter import new_run_ids
from reflow_core.errors import ConfigError, IdempotencyConflictError, StorageError
from reflow_core.storage import (
    MAX_CREATE_BATCH,
    ConcurrencyLimit,
    CreateResult,
    NewRun,
    RateLimit,
    RunRecord,
)
from reflow_sqlite import SQLiteStorage
from reflow_sqlite._scripts import INSERT_CHUNK

LEASE = timedelta(seconds=30)
Outcome = CreateResult | IdempotencyConflictError


@pytest.fixture(params=["hook", "public"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def stored_runs(path: Path) -> int:
    """How many runs the file holds, read through a connection of its own."""
    raw = sqlite3.connect(path)
    try:
        (count,) = raw.execute("SELECT count(*) FROM runs").fetchone()
        return int(count)
    finally:
        raw.close()


class Trace:
    """The statements the storage's connection runs, as SQLite reports them
    (``sqlite3.Connection.set_trace_callback``)."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, sql: str) -> None:
        self.statements.append(" ".join(sql.split()))

    def named(self, start: str) -> list[str]:
        return [sql for sql in self.statements if sql.startswith(start)]


async def traced(store: SQLiteStorage) -> Trace:
    trace = Trace()
    assert store._conn is not None
    await store._conn.set_trace_callback(trace)
    return trace


def plain(count: int, workflow: str = "wf") -> list[NewRun]:
    return [NewRun(workflow, f'{{"n":{n}}}') for n in range(count)]


# -- one transaction, few statements --------------------------------------------------------


async def test_a_batch_is_one_write_transaction_with_a_few_inserts(opener) -> None:
    store = await opener()
    trace = await traced(store)
    results = await store.create_runs(plain(MAX_CREATE_BATCH))
    assert all(isinstance(r, CreateResult) and r.created for r in results)
    assert trace.named("BEGIN") == ["BEGIN IMMEDIATE"]
    assert trace.named("COMMIT") == ["COMMIT"]
    # Full chunks, then powers of two for the rest: never one statement per run.
    inserts = trace.named("INSERT INTO runs")
    whole, rest = divmod(MAX_CREATE_BATCH, INSERT_CHUNK)
    assert len(inserts) == whole + rest.bit_count()
    assert len(trace.statements) == len(inserts) + 2
    assert stored_runs(opener.path) == MAX_CREATE_BATCH


async def test_a_mixed_batch_is_still_one_write_transaction(opener) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", '"old"', idempotency_key="taken"))
    await store.create_run(NewRun("wf", '"open"', debounce_key="d"))
    trace = await traced(store)
    batch = [
        *plain(300),
        NewRun("wf", '"old"', idempotency_key="taken"),  # hit
        NewRun("wf", '"new"', idempotency_key="taken"),  # conflict
        NewRun("wf", '"x"', idempotency_key="twice"),
        NewRun("wf", '"x"', idempotency_key="twice"),  # the run the item before made
        NewRun("wf", '"d1"', debounce_key="d"),  # updates the open run
        NewRun("wf", '"d2"', debounce_key="d"),  # and again
        NewRun("wf", '"e"', debounce_key="e"),  # makes one
        NewRun("wf", '"chosen"', run_id="chosen-id", delay=timedelta(seconds=5)),
    ]
    results = await store.create_runs(batch)
    assert trace.named("BEGIN") == ["BEGIN IMMEDIATE"]
    assert trace.named("COMMIT") == ["COMMIT"]
    assert not trace.named("ROLLBACK")
    # The taken key is read back with one query, the chosen id checked with one.
    assert len(trace.named("WITH wanted")) == 1
    assert len(trace.named("SELECT id FROM runs WHERE id IN")) == 1
    outcomes = [r.created if isinstance(r, CreateResult) else "conflict" for r in results]
    assert outcomes == [True] * 300 + [False, "conflict", True, False, False, False, True, True]


async def test_an_empty_batch_runs_no_statement(opener) -> None:
    store = await opener()
    trace = await traced(store)
    assert await store.create_runs([]) == []
    assert trace.statements == []


async def test_generated_ids_ascend_in_the_batch_order(opener) -> None:
    store = await opener()
    batch = plain(200)
    batch[50] = NewRun("wf", '"mine"', run_id="000-chosen")
    results = await store.create_runs(batch)
    ids = [r.run.id for r in results if isinstance(r, CreateResult)]
    assert ids[50] == "000-chosen"
    generated = ids[:50] + ids[51:]
    assert generated == sorted(generated)
    assert len(set(generated)) == len(generated)
    fresh = new_run_ids(1000)
    assert fresh == sorted(fresh)
    assert len(set(fresh)) == 1000
    assert all(len(i) == 26 for i in fresh)


# -- whole or not at all ----------------------------------------------------------------


async def test_a_taken_run_id_at_the_end_writes_nothing_of_the_batch(opener, clock) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", '"first"', run_id="taken-id"))
    clock.advance(1)
    await store.create_run(NewRun("wf", '"open"', debounce_key="d"))
    before = stored_runs(opener.path)
    batch = [
        *plain(400),
        NewRun("wf", '"k"', idempotency_key="k"),
        NewRun("wf", '"d"', debounce_key="d"),
        NewRun("wf", '"again"', run_id="taken-id"),
    ]
    with pytest.raises(StorageError) as caught:
        await store.create_runs(batch)
    assert "item 402" in str(caught.value)
    assert "taken-id" in str(caught.value)
    assert stored_runs(opener.path) == before
    assert await store.find_runs_by_key("k") == []
    assert [r.input for r in (await store.list_runs()).runs] == ['"open"', '"first"']


async def test_a_store_failure_late_in_the_batch_keeps_nothing(opener) -> None:
    store = await opener()
    before = stored_runs(opener.path)
    # Text SQLite cannot store (a lone surrogate is not UTF-8): the last
    # insert statement fails after the ones before it ran.
    bad = NewRun("wf", '"\ud800"')
    with pytest.raises(StorageError) as caught:
        await store.create_runs([*plain(3 * INSERT_CHUNK), bad])
    assert caught.value.operation == "create_runs"
    assert stored_runs(opener.path) == before
    # The same failure in an item done one by one, after the bulk inserts.
    with pytest.raises(StorageError):
        await store.create_runs([*plain(300), NewRun("wf", '"\ud800"', debounce_key="d")])
    assert stored_runs(opener.path) == before
    # The storage goes on working.
    assert len(await store.create_runs(plain(5))) == 5
    assert stored_runs(opener.path) == before + 5


async def test_a_locked_file_fails_the_batch_and_keeps_nothing(opener) -> None:
    store = await opener(busy_timeout=50)
    other = sqlite3.connect(opener.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError):
            await store.create_runs(plain(10))
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert stored_runs(opener.path) == 0


async def test_a_malformed_item_is_refused_before_any_statement(opener) -> None:
    store = await opener()
    trace = await traced(store)
    with pytest.raises(ConfigError, match="item 2"):
        await store.create_runs([*plain(2), NewRun("wf", '"x"', priority=10**9)])
    with pytest.raises(StorageError, match="items 0 and 2"):
        await store.create_runs(
            [NewRun("wf", '"a"', run_id="same"), *plain(1), NewRun("wf", '"b"', run_id="same")]
        )
    with pytest.raises(ConfigError):
        await store.create_runs(plain(MAX_CREATE_BATCH + 1))
    assert trace.statements == []


# -- the outcomes of create_run one after another ----------------------------------------------


async def prepare(store: SQLiteStorage) -> None:
    """The same runs in every store: keys taken, debounced runs open and claimed."""
    await store.create_run(NewRun("a", '"k1"', idempotency_key="k1", run_id="pre-1"))
    await store.create_run(NewRun("b", '"k1-b"', idempotency_key="k1", run_id="pre-2"))
    await store.create_run(NewRun("a", '"open"', debounce_key="d1", run_id="pre-3"))
    await store.create_run(NewRun("a", '"claimed"', debounce_key="d2", run_id="pre-4", priority=5))
    claimed = await store.claim_runs(["a"], 1, LEASE)
    assert [c.run.id for c in claimed] == ["pre-4"]


async def one_by_one(store: SQLiteStorage, batch: list[NewRun]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for new in batch:
        try:
            outcomes.append(await store.create_run(new))
        except IdempotencyConflictError as exc:
            outcomes.append(exc)
    return outcomes


class Ids:
    """Matches the ids one store generated with those another generated for
    the same items (chosen ids match themselves)."""

    def __init__(self) -> None:
        self.pairs: dict[str, str] = {}

    def same(self, mine: str, theirs: str) -> None:
        assert self.pairs.setdefault(mine, theirs) == theirs

    def record(self, record: RunRecord) -> RunRecord:
        return dataclasses.replace(record, id=self.pairs.get(record.id, record.id))


def assert_same_outcomes(batch: list[Outcome], sequential: list[Outcome]) -> Ids:
    assert len(batch) == len(sequential)
    ids = Ids()
    for index, (mine, theirs) in enumerate(zip(batch, sequential, strict=True)):
        assert type(mine) is type(theirs), f"item {index}: {mine!r} != {theirs!r}"
        if isinstance(mine, IdempotencyConflictError):
            assert isinstance(theirs, IdempotencyConflictError)
            assert (mine.workflow, mine.idempotency_key) == (
                theirs.workflow,
                theirs.idempotency_key,
            )
            ids.same(mine.existing_run_id, theirs.existing_run_id)
        else:
            assert isinstance(mine, CreateResult)
            assert isinstance(theirs, CreateResult)
            ids.same(mine.run.id, theirs.run.id)
            assert mine.created == theirs.created, f"item {index}"
            assert ids.record(mine.run) == theirs.run, f"item {index}"
    return ids


async def every_run(store: SQLiteStorage) -> list[RunRecord]:
    runs: list[RunRecord] = []
    cursor: str | None = None
    while True:
        page = await store.list_runs(limit=500, cursor=cursor)
        runs.extend(page.runs)
        if page.next_cursor is None:
            return runs
        cursor = page.next_cursor


async def assert_same_stores(batched: SQLiteStorage, sequential: SQLiteStorage, ids: Ids) -> None:
    mine = sorted((ids.record(r) for r in await every_run(batched)), key=lambda r: r.id)
    theirs = sorted(await every_run(sequential), key=lambda r: r.id)
    assert mine == theirs


async def test_a_mixed_batch_matches_creates_one_by_one(opener, tmp_path) -> None:
    batched = await opener()
    sequential = await opener(tmp_path / "sequential.db")
    for store in (batched, sequential):
        await prepare(store)
    minute = timedelta(minutes=1)
    batch = [
        NewRun("a", '"plain"'),
        NewRun("a", '"later"', delay=minute, deadline=timedelta(seconds=30)),
        NewRun("a", '"due"', deadline=minute, priority=3),
        NewRun("b", '"limited"', limits=(ConcurrencyLimit("x", 1), ConcurrencyLimit("y", 2))),
        NewRun("b", '"rated"', rates=(RateLimit("r", 5, timedelta(seconds=1)),)),
        NewRun("b", '"headed"', headers={"traceparent": "00-abc-def-01", "baggage": "k=v"}),
        NewRun("a", '"k1"', idempotency_key="k1"),  # hit on pre-1
        NewRun("a", '"other"', idempotency_key="k1"),  # conflict with pre-1
        NewRun("b", '"k1-b"', idempotency_key="k1", run_id="unused"),  # hit on pre-2
        NewRun("a", '"fresh"', idempotency_key="k2", delay=minute),  # created
        NewRun("a", '"fresh"', idempotency_key="k2"),  # hit on the run just made
        NewRun("a", '"stale"', idempotency_key="k2"),  # conflict with it
        NewRun("b", '"x"', idempotency_key="k3"),  # first: conflict with nothing yet
        NewRun("a", '"d1 again"', debounce_key="d1", delay=minute),  # updates pre-3
        NewRun("a", '"d2 new"', debounce_key="d2"),  # pre-4 was claimed: a new run
        NewRun("a", '"d2 newer"', debounce_key="d2", priority=2),  # updates that one
        NewRun("b", '"d1 in b"', debounce_key="d1", limits=(ConcurrencyLimit("x", 3),)),
        NewRun("a", '"chosen"', run_id="chosen-1", priority=-1),
        NewRun("b", '"y"', idempotency_key="k3"),  # conflict with item 12's run
    ]
    ids = assert_same_outcomes(
        await batched.create_runs(batch), await one_by_one(sequential, batch)
    )
    await assert_same_stores(batched, sequential, ids)


WORKFLOWS = ["a", "b"]
KEYS = [None, None, "k1", "k2", "k3", "k4"]
DEBOUNCE = ["d1", "d2", "d3"]
INPUTS = ['"one"', '"two"', '"k1"', '"open"']


def draw(rng: random.Random, index: int) -> NewRun:
    options: dict[str, Any] = {}
    if rng.random() < 0.3:
        options["debounce_key"] = rng.choice(DEBOUNCE)
    else:
        options["idempotency_key"] = rng.choice(KEYS)
    if rng.random() < 0.3:
        options["delay"] = timedelta(seconds=rng.choice([0, 1, 90]))
    if rng.random() < 0.2:
        options["deadline"] = timedelta(seconds=rng.choice([0, 30, 600]))
    if rng.random() < 0.2:
        options["priority"] = rng.choice([-2, 0, 4])
    workflow = rng.choice(WORKFLOWS)
    if workflow == "b" and rng.random() < 0.3:
        options["limits"] = (ConcurrencyLimit(rng.choice(["x", "y"]), rng.choice([1, 2])),)
    if workflow == "b" and rng.random() < 0.2:
        options["rates"] = (RateLimit("r", 3, timedelta(milliseconds=rng.choice([10, 2000]))),)
    if rng.random() < 0.1:
        options["headers"] = {"traceparent": f"00-{index:032x}-{index:016x}-01"}
    if rng.random() < 0.1:
        options["run_id"] = f"chosen-{index}"
    return NewRun(workflow, rng.choice(INPUTS), **options)


@pytest.mark.parametrize("seed", range(6))
async def test_random_batches_match_creates_one_by_one(opener, clock, tmp_path, seed) -> None:
    rng = random.Random(seed)
    batched = await opener()
    sequential = await opener(tmp_path / "sequential.db")
    for store in (batched, sequential):
        await prepare(store)
    ids = Ids()
    for round_ in range(3):
        batch = [draw(rng, round_ * 1000 + n) for n in range(rng.choice([1, 7, 60, 300]))]
        mine = await batched.create_runs(batch)
        theirs = await one_by_one(sequential, batch)
        for key, value in assert_same_outcomes(mine, theirs).pairs.items():
            ids.same(key, value)
        # Every due run of "a" is claimed (its debounce key is free again):
        # the same runs in both stores, as none of them has a limit or a
        # rate that would make a claim choose. Then time passes.
        for store in (batched, sequential):
            await store.claim_runs(["a"], 10_000, LEASE)
        clock.advance(rng.choice([0, 1, 60]))
    await assert_same_stores(batched, sequential, ids)
