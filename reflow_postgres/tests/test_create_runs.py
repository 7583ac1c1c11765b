"""``create_runs`` on PostgreSQL: what the conformance suite cannot see from
outside.

A batch is one transaction in one round trip (one statement in autocommit
mode for the usual batch; BEGIN, the statements and COMMIT in one pipeline
for the others), observed in the connection's own protocol trace and in the
transaction ids of the rows it writes. A taken run id or a failing statement
leaves nothing of the batch and the pooled connection clean. Mixed batches
give what ``create_run`` gives item by item. A retry after a lost connection
finds what the first try committed. Concurrent batches sharing keys in
different orders wait for each other instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from reflow_core import codec
from reflow_core.adapter import new_run_ids
from reflow_core.errors import IdempotencyConflictError, StorageError
from reflow_core.storage import (
    ConcurrencyLimit,
    CreateResult,
    NewRun,
    RateLimit,
    RunRecord,
)
from reflow_postgres import PostgresStorage
from reflow_postgres._creates import _send, _send_again

from ._trace import Trace

Admin = psycopg.Connection[tuple[object, ...]]
Outcome = CreateResult | IdempotencyConflictError
HOUR = timedelta(hours=1)


def _new(value: object, workflow: str = "wf", **options: Any) -> NewRun:
    return NewRun(workflow, codec.encode(value), **options)


def _rows(admin: Admin, schema: str) -> list[tuple[object, ...]]:
    """Every run as stored, with the transaction that last wrote it."""
    query = sql.SQL(
        "SELECT id, input, status, updated_at, wake_at, xmin::text FROM {}.runs ORDER BY id"
    ).format(sql.Identifier(schema))
    return admin.execute(query).fetchall()


def _writers(admin: Admin, schema: str, ids: list[str]) -> set[object]:
    """The transactions that last wrote the runs ``ids``."""
    query = sql.SQL("SELECT xmin::text FROM {}.runs WHERE id = ANY(%s)").format(
        sql.Identifier(schema)
    )
    return {row[0] for row in admin.execute(query, (ids,)).fetchall()}


async def _open(url: str, **options: Any) -> PostgresStorage:
    store = PostgresStorage.from_url(url, **options)
    await store.initialize()
    return store


# -- all or nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    "last",
    [
        pytest.param({}, id="plain"),
        pytest.param({"idempotency_key": "k"}, id="idempotency-hit"),
        pytest.param({"debounce_key": "d", "delay": HOUR}, id="debounce-update"),
    ],
)
async def test_a_taken_run_id_in_the_last_item_writes_nothing_of_the_batch(
    postgres_url: str, schema: str, admin: Admin, last: dict[str, Any]
) -> None:
    """The last item asks for a run id that is taken: the batch (new runs,
    repeated keys, a debounced update of an open run, a delayed run) writes
    nothing, not even for the item whose idempotency or debounce key would
    have matched a stored run, and the error names the item."""
    store = await _open(postgres_url, pool_max_size=1)
    await store.create_run(_new("there", run_id="taken"))
    await store.create_run(_new("open", debounce_key="d", delay=HOUR))
    await store.create_run(_new("keyed", idempotency_key="k"))
    before = _rows(admin, schema)
    batch = [
        _new(1),
        _new(2, idempotency_key="n"),
        _new(2, idempotency_key="n"),
        _new("new input", debounce_key="d", delay=HOUR),
        _new(3, delay=HOUR),
        _new(4, debounce_key="e", delay=HOUR),
        _new("keyed", idempotency_key="k"),
        _new("keyed" if "idempotency_key" in last else "again", run_id="taken", **last),
    ]
    with pytest.raises(StorageError, match=r"^item 7: run id 'taken' already exists$") as caught:
        await store.create_runs(batch)
    assert (caught.value.operation, caught.value.backend) == ("create_runs", "postgresql")
    assert _rows(admin, schema) == before
    # The pooled connection (the only one) was left clean.
    after = await store.create_runs([_new(5), _new(6, debounce_key="d", delay=HOUR)])
    assert [o.created for o in after if isinstance(o, CreateResult)] == [True, False]
    await store.close()


async def test_a_failing_statement_writes_nothing_of_the_batch(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """The server refuses the last statement of a batch (an input holding a
    NUL, which no text column keeps): the statements before it are undone,
    and the pooled connection is left clean. The usual one-statement batch
    fails whole too."""
    store = await _open(postgres_url, pool_max_size=1)
    await store.create_run(_new("open", debounce_key="d", delay=HOUR))
    before = _rows(admin, schema)
    mixed = [
        _new(1, idempotency_key="a"),
        _new(1, idempotency_key="a"),
        _new("update", debounce_key="d", delay=HOUR),
        NewRun("wf", '"a\x00b"', idempotency_key="a"),
    ]
    with pytest.raises(StorageError):
        await store.create_runs(mixed)
    assert _rows(admin, schema) == before
    plain = [_new(n) for n in range(10)] + [NewRun("wf", '"a\x00b"')]
    with pytest.raises(StorageError):
        await store.create_runs(plain)
    assert _rows(admin, schema) == before
    done = await store.create_runs(mixed[:3])
    assert [o.created for o in done if isinstance(o, CreateResult)] == [True, False, False]
    await store.close()


# -- one transaction, one round trip -------------------------------------------


async def test_the_usual_batch_is_one_statement_in_one_round_trip(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    store = await _open(postgres_url, pool_min_size=1, pool_max_size=1)
    trace = Trace(store)
    news = [_new(n, idempotency_key=f"k{n}" if n % 2 else None) for n in range(500)]
    outcomes = await trace.run(lambda: store.create_runs(news))
    assert trace.syncs == 1
    assert [kind for kind, _ in trace.sent] == ["Parse", "Bind", "Describe", "Execute", "Sync"]
    ids = [o.run.id for o in outcomes]
    assert len(set(ids)) == 500
    assert len(_writers(admin, schema, ids)) == 1
    await store.close()


async def test_a_mixed_batch_is_one_transaction_in_one_round_trip(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """Repeated idempotency keys, debounce keys (one of them updating an
    open run twice) and a caller-chosen run id: several statements between
    one BEGIN and one COMMIT, sent with one Sync; every run the batch
    created or updated was last written by one transaction."""
    store = await _open(postgres_url, pool_min_size=1, pool_max_size=1)
    opened = await store.create_run(_new("open", debounce_key="d", delay=HOUR))
    trace = Trace(store)
    news = [
        _new(1, idempotency_key="a"),
        _new(1, idempotency_key="a"),
        _new(2, idempotency_key="a"),
        _new("second", debounce_key="d", delay=HOUR),
        _new("third", debounce_key="d", delay=HOUR),
        _new("e", debounce_key="e"),
        _new(3, run_id="chosen"),
        _new(4),
    ]
    outcomes = await trace.run(lambda: store.create_runs(news))
    assert trace.syncs == 1
    assert (trace.statements("BEGIN"), trace.statements("COMMIT")) == (1, 1)
    ids = {o.run.id for o in outcomes if isinstance(o, CreateResult)}
    assert opened.run.id in ids
    assert "chosen" in ids
    assert len(_writers(admin, schema, sorted(ids))) == 1
    await store.close()


async def test_a_batch_bypasses_the_group_commit_of_create_run(postgres_url: str) -> None:
    """A batch larger than the group's statement (200) is still one
    statement, and never waits behind, or joins, other callers' creates."""
    store = await _open(postgres_url, pool_min_size=1, pool_max_size=1)
    trace = Trace(store)
    outcomes = await trace.run(lambda: store.create_runs([_new(n) for n in range(1000)]))
    assert len(outcomes) == 1000
    assert trace.syncs == 1
    assert store._writes.creates.batches == 0
    await store.close()


# -- the outcomes of create_run, item by item -----------------------------------


async def test_a_mixed_batch_gives_what_create_run_gives_one_by_one(
    postgres_database: str,
) -> None:
    """The same stored runs and the same items on two fresh schemas with one
    fixed clock: created one by one with ``create_run`` on the first, in one
    batch on the second. Every outcome and every stored run are the same
    (ids aside, compared as which item or stored run each is)."""
    clock = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    stores = [
        await _open(f"{postgres_database}?schema=t_{uuid.uuid4().hex[:12]}", clock=lambda: clock)
        for _ in range(2)
    ]
    stored = [
        _new(1, idempotency_key="old"),
        _new("first", debounce_key="d", delay=HOUR),
        _new("busy", debounce_key="busy"),
    ]
    limited = {
        "priority": 5,
        "limits": (ConcurrencyLimit("k", 2), ConcurrencyLimit("k2", 1)),
        "rates": (RateLimit("r", 3, timedelta(minutes=1)),),
        "headers": {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "baggage": "x=1"},
    }
    items = [
        _new("plain"),
        _new(1, idempotency_key="old"),  # found
        _new(2, idempotency_key="old"),  # conflict with the stored run
        _new(3, idempotency_key="new"),  # created
        _new(3, idempotency_key="new"),  # found: item 3
        _new(4, idempotency_key="new"),  # conflict with item 3
        _new("second", debounce_key="d", delay=2 * HOUR),  # updates the stored open run
        _new("e1", debounce_key="e", delay=HOUR),  # created
        _new("e2", debounce_key="e", delay=timedelta(minutes=30)),  # updates item 7
        _new("late", delay=HOUR, deadline=timedelta(minutes=30)),
        _new("limited", **limited),
        _new("due", deadline=2 * HOUR),
        _new(1, idempotency_key="old"),  # found again
        _new("chosen", run_id="chosen-id", idempotency_key="x"),
        _new(3, "wf2", idempotency_key="new"),  # another workflow: created
        _new("zero", delay=timedelta(0)),
        _new("e3", debounce_key="e"),  # updates item 7 again, due at once
        _new("busy again", debounce_key="busy"),  # the stored run is claimed: created
        _new(5, idempotency_key="new"),  # conflict with item 3 again
    ]
    results: list[tuple[list[Any], list[Any]]] = []
    for n, store in enumerate(stores):
        labels: dict[str, str] = {}
        for index, new in enumerate(stored):
            labels[(await store.create_run(new)).run.id] = f"stored {index}"
        # The stored run with the debounce key "busy" was claimed: no longer open.
        await store.claim_runs(["wf"], 10, HOUR)
        outcomes: list[Outcome]
        if n == 0:
            outcomes = []
            for new in items:
                try:
                    outcomes.append(await store.create_run(new))
                except IdempotencyConflictError as exc:
                    outcomes.append(exc)
        else:
            outcomes = await store.create_runs(items)

        def label(run_id: str, index: int, labels: dict[str, str] = labels) -> str:
            return labels.setdefault(run_id, f"item {index}")

        shapes: list[Any] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, IdempotencyConflictError):
                shapes.append(("conflict", label(outcome.existing_run_id, index)))
            else:
                record = dataclasses.replace(outcome.run, id=label(outcome.run.id, index))
                shapes.append(("run", outcome.created, record))
        runs: list[RunRecord] = []
        for workflow in ("wf", "wf2"):
            page = await store.list_runs(workflow=workflow, limit=100)
            runs.extend(dataclasses.replace(run, id=labels[run.id]) for run in page.runs)
        results.append((shapes, sorted(runs, key=lambda run: run.id)))
        await store.close()
    (one_by_one, stored_one_by_one), (batch, stored_batch) = results
    for index, (single, batched) in enumerate(zip(one_by_one, batch, strict=True)):
        assert batched == single, f"item {index}"
    assert stored_batch == stored_one_by_one
    kinds = [shape[0] if shape[0] == "conflict" else shape[1] for shape in batch]
    assert kinds[:9] == [True, False, "conflict", True, False, "conflict", False, True, False]


# -- retries -------------------------------------------------------------------


async def test_a_retry_after_the_first_try_committed_finds_its_runs(postgres_url: str) -> None:
    """A connection that drops after the batch committed, before its reply:
    the retry (``_send_again``, with the same ids) reports the runs the first
    try created as created, and the other items as the first try did,
    writing no run twice."""
    store = await _open(postgres_url)
    db = store._db
    await store.create_run(_new("open", debounce_key="d", delay=HOUR))
    news = [
        _new(1),
        _new(2, idempotency_key="a"),
        _new(2, idempotency_key="a"),
        _new(3, idempotency_key="a"),
        _new("update", debounce_key="d", delay=HOUR),
        _new("new", debounce_key="e"),
        _new("mine", run_id="chosen"),
    ]
    ids = [new.run_id or run_id for new, run_id in zip(news, new_run_ids(len(news)), strict=True)]

    async def first(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[Outcome]:
        return await _send(db, conn, ids, news)

    async def again(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[Outcome]:
        return await _send_again(db, conn, ids, news)

    def shape(outcomes: list[Outcome]) -> list[tuple[Any, ...]]:
        return [
            ("conflict", o.existing_run_id)
            if isinstance(o, IdempotencyConflictError)
            else (o.created, o.run.id, o.run.input)
            for o in outcomes
        ]

    one = await db.run("test", first)
    count = len((await store.list_runs(limit=100)).runs)
    two = await db.run("test", again)
    assert shape(two) == shape(one)
    assert [o.created for o in one if isinstance(o, CreateResult)] == [
        True,
        True,
        False,
        False,
        True,
        True,
    ]
    assert len((await store.list_runs(limit=100)).runs) == count == 5
    await store.close()


async def test_a_retry_after_the_first_try_failed_sends_the_batch(postgres_url: str) -> None:
    """The first try did not commit: the retry sends the whole batch; a
    caller-chosen id that someone else's run holds is not mistaken for the
    first try's run, and fails the batch as taken."""
    store = await _open(postgres_url)
    db = store._db
    news = [_new(1), _new(2, idempotency_key="a"), _new("mine", run_id="chosen")]
    ids = [new.run_id or run_id for new, run_id in zip(news, new_run_ids(len(news)), strict=True)]

    async def again(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[Outcome]:
        return await _send_again(db, conn, ids, news)

    made = await db.run("test", again)
    assert [o.created for o in made if isinstance(o, CreateResult)] == [True, True, True]
    assert [o.run.id for o in made if isinstance(o, CreateResult)] == ids

    other = await _open(postgres_url)
    await other.create_run(_new("theirs", run_id="held"))
    news = [_new(3), _new("mine", run_id="held")]
    ids = [new.run_id or run_id for new, run_id in zip(news, new_run_ids(len(news)), strict=True)]
    with pytest.raises(StorageError, match="item 1: run id 'held' already exists"):
        await db.run("test", again)
    assert len((await store.list_runs(limit=100)).runs) == 4
    await store.close()
    await other.close()


async def test_a_batch_survives_its_connections_being_killed(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    store = await _open(f"{postgres_url}&application_name=batch_victim&pool_min_size=2")
    await store.create_runs([_new(0)])
    killed = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'batch_victim' AND pid <> pg_backend_pid()"
    ).fetchall()
    assert killed
    outcomes = await store.create_runs(
        [_new(n, idempotency_key=f"k{n % 5}") for n in range(10)] + [_new("d", debounce_key="d")]
    )
    assert sum(1 for o in outcomes if isinstance(o, CreateResult) and o.created) == 6
    assert len(_rows(admin, schema)) == 7
    await store.close()


# -- concurrency ---------------------------------------------------------------


async def test_concurrent_batches_sharing_keys_in_other_orders_do_not_deadlock(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """Four stores send, at once, batches over the same idempotency keys,
    or the same debounce keys, each in its own order and with keys given
    twice (batches with both kinds would wait on their first shared
    idempotency key and never meet on the debounce keys): every batch
    succeeds (none is chosen as a deadlock's victim) and each key holds one
    run."""
    stores = [await _open(postgres_url) for _ in range(4)]
    keys = [f"k{n}" for n in range(30)]
    rounds = 6
    for round_ in range(rounds):
        kind = "idempotency_key" if round_ % 2 else "debounce_key"
        batches = []
        for s in range(4):
            order = keys[s * 7 :] + keys[: s * 7]
            if s % 2:
                order.reverse()
            batch = [_new(key, **{kind: f"{round_}{key}"}) for key in order]
            batch += [_new(key, **{kind: f"{round_}{key}"}) for key in order[:5]]
            batch += [_new(s) for _ in range(5)]
            batches.append(batch)
        answers = await asyncio.gather(
            *(store.create_runs(batch) for store, batch in zip(stores, batches, strict=True))
        )
        assert all(isinstance(o, CreateResult) for answer in answers for o in answer)
    count = admin.execute(
        sql.SQL("SELECT count(*) FROM {}.runs").format(sql.Identifier(schema))
    ).fetchone()
    assert count == (rounds * (30 + 4 * 5),)
    for store in stores:
        await store.close()
