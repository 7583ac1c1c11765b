"""``get_runs`` on PostgreSQL: what the conformance suite cannot see from
outside.

The answer is what ``get_run`` reads, run by run, for runs in every status
and with every option, whatever mix of existing, missing and repeated ids is
asked for; and it is one statement in one round trip, for 1000 ids as for
two, observed in the connection's own protocol trace (libpq's). No ids, or
ids refused by the check, send nothing.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import pytest

from reflow_core import codec
from reflow_core.errors import ConfigError, StorageError
from reflow_core.storage import (
    MAX_GET_RUNS,
    ConcurrencyLimit,
    NewRun,
    RateLimit,
    RunRecord,
    StepRecord,
)
from reflow_postgres import PostgresStorage

from ._trace import Trace

HOUR = timedelta(hours=1)


def _new(value: object, workflow: str = "wf", **options: Any) -> NewRun:
    return NewRun(workflow, codec.encode(value), **options)


async def _open(url: str, **options: Any) -> PostgresStorage:
    store = PostgresStorage.from_url(url, **options)
    await store.initialize()
    return store


async def _runs_in_every_status(store: PostgresStorage) -> list[str]:
    """Runs of ``wf``: pending, running under a lease, completed with an
    output and a step, failed with an error, delayed, sleeping, waiting,
    cancelled, a child, and pending runs holding limits, rates, headers,
    a priority, a deadline and keys. Returns their ids."""
    for name in ("done", "broken", "sleepy", "waits", "cancelled", "leased", "parent"):
        await store.create_run(_new(name, "work", run_id=name))
    claimed = {c.run.id: c.lease for c in await store.claim_runs(["work"], 10, HOUR)}
    assert len(claimed) == 7
    step = StepRecord("s", "completed", output=codec.encode([1, "two"]))
    assert await store.finish_run(
        claimed["done"], "completed", output=codec.encode({"ok": True}), step=step
    )
    assert await store.finish_run(
        claimed["broken"], "failed", error=codec.encode({"type": "ValueError", "message": "no"})
    )
    assert await store.sleep_run(claimed["sleepy"], "nap", HOUR) is not None
    waited = await store.wait_run(claimed["waits"], "w", "go", HOUR)
    assert waited is not None
    assert not waited.ready
    assert await store.update_run_status("cancelled", "cancelled")
    assert await store.save_step_result(claimed["leased"], StepRecord("a", "completed"), HOUR)
    child = await store.start_child(claimed["parent"], "spawn", _new("child", run_id="child"))
    assert child is not None

    plain = (await store.create_run(_new("pending"))).run.id
    delayed = (await store.create_run(_new("later", delay=HOUR, deadline=2 * HOUR))).run.id
    held = await store.create_run(
        _new(
            "held",
            priority=7,
            idempotency_key="key",
            limits=(ConcurrencyLimit("k", 2), ConcurrencyLimit("k2", 1)),
            rates=(RateLimit("r", 3, timedelta(minutes=1)),),
            headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "baggage": "x=1"},
        )
    )
    debounced = await store.create_run(_new("soon", debounce_key="d", delay=HOUR))
    return [*claimed, "child", plain, delayed, held.run.id, debounced.run.id]


async def test_the_answer_is_what_get_run_reads(postgres_url: str) -> None:
    store = await _open(postgres_url)
    ids = await _runs_in_every_status(store)
    asked = ["missing-1", *ids, ids[0], "missing-2", ids[3], ids[-1]]
    expected: dict[str, RunRecord] = {}
    for run_id in asked:
        record = await store.get_run(run_id)
        if record is not None:
            expected[run_id] = record
    answer = await store.get_runs(asked)
    assert answer == expected
    assert list(answer) == ids  # in the order first given, each once
    statuses = {record.status for record in answer.values()}
    assert statuses == {
        "pending",
        "running",
        "completed",
        "failed",
        "delayed",
        "sleeping",
        "waiting",
        "cancelled",
    }
    # Any collection of ids: a set, a tuple, a dict's keys.
    assert await store.get_runs(set(asked)) == expected
    assert await store.get_runs(tuple(asked)) == expected
    assert await store.get_runs(dict.fromkeys(asked).keys()) == expected
    assert await store.get_runs(["missing-1", "missing-2"]) == {}
    await store.close()


async def test_a_thousand_ids_are_one_statement_in_one_round_trip(postgres_url: str) -> None:
    store = await _open(postgres_url, pool_min_size=1, pool_max_size=1)
    created = await store.create_runs([_new(n) for n in range(600)])
    ids = [outcome.run.id for outcome in created if not isinstance(outcome, Exception)]
    asked = ids + [f"missing-{n}" for n in range(MAX_GET_RUNS - len(ids))]
    assert len(asked) == MAX_GET_RUNS
    expected = {record.id: record for record in (await store.list_runs(limit=1000)).runs}
    trace = Trace(store)
    answer = await trace.run(lambda: store.get_runs(asked))
    assert answer == expected
    assert list(answer) == ids
    assert trace.syncs == 1
    assert trace.executed == 1
    await store.close()


async def test_no_ids_and_refused_ids_send_nothing(postgres_url: str) -> None:
    store = await _open(postgres_url, pool_min_size=1, pool_max_size=1)
    run_id = (await store.create_run(_new(1))).run.id
    trace = Trace(store)
    assert await trace.run(lambda: store.get_runs([])) == {}
    refused: list[Any] = [
        run_id,  # one id as a string, not a collection of them
        [run_id, ""],
        [run_id, 5],
        [f"id-{n}" for n in range(MAX_GET_RUNS + 1)],
    ]
    for bad in refused:
        with pytest.raises(ConfigError):
            await trace.run(functools.partial(store.get_runs, bad))
    assert trace.sent == []
    # 1001 ids of which 1000 are distinct are within the bound.
    many = [run_id, *(f"id-{n}" for n in range(MAX_GET_RUNS - 1)), run_id]
    assert list(await store.get_runs(many)) == [run_id]
    await store.close()


async def test_a_closed_or_new_storage_refuses(postgres_url: str) -> None:
    fresh = PostgresStorage.from_url(postgres_url)
    with pytest.raises(StorageError):
        await fresh.get_runs(["a"])
    store = await _open(postgres_url)
    await store.close()
    with pytest.raises(StorageError):
        await store.get_runs(["a"])
    with pytest.raises(StorageError):
        await store.get_runs([])
