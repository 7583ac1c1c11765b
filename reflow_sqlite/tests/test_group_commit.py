"""Group commit: concurrent step saves share transactions, each keeps its own outcome."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from reflow_core.errors import StorageError
from reflow_core.storage import ClaimedRun, Lease, NewRun, StepRecord
from reflow_sqlite import SQLiteStorage

LEASE = timedelta(seconds=30)


@pytest.fixture(params=["hook", "public"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def count_transactions(store: SQLiteStorage) -> list[str]:
    """Record the operation name of every transaction the storage runs."""
    calls: list[str] = []
    original = store._call

    async def counting(operation: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(operation)
        return await original(operation, *args, **kwargs)

    store._call = counting  # type: ignore[method-assign]
    return calls


async def claimed_runs(store: SQLiteStorage, count: int) -> list[ClaimedRun]:
    for n in range(count):
        await store.create_run(NewRun("wf", str(n)))
    claimed = await store.claim_runs(["wf"], count, LEASE)
    assert len(claimed) == count
    return claimed


async def test_concurrent_saves_share_transactions(opener) -> None:
    store = await opener()
    runs = await claimed_runs(store, 25)
    calls = count_transactions(store)

    async def worker(c: ClaimedRun) -> None:
        for n in range(4):
            assert await store.save_step_result(c.lease, StepRecord(f"s{n}", "completed"), LEASE)

    await asyncio.gather(*(worker(c) for c in runs))
    assert len(calls) <= 8  # 100 saves; one transaction per round of 25 in practice
    for c in runs:
        assert list(await store.get_step_results(c.run.id)) == ["s0", "s1", "s2", "s3"]


async def test_each_save_in_a_batch_is_fenced_on_its_own(opener, clock) -> None:
    store = await opener()
    runs = await claimed_runs(store, 10)
    # Lose half of the leases in different ways.
    assert await store.update_run_status(runs[0].run.id, "cancelled")
    assert await store.finish_run(runs[1].lease, "completed")
    stale = [Lease(runs[2].run.id, 0), Lease("missing", 1)]
    leases = [c.lease for c in runs] + stale
    calls = count_transactions(store)
    results = await asyncio.gather(
        *(store.save_step_result(lease, StepRecord("x", "completed"), LEASE) for lease in leases)
    )
    assert calls == ["save_step_result"]
    assert results == [False, False] + [True] * 8 + [False, False]
    for c, saved in zip(runs, results, strict=False):
        assert ("x" in await store.get_step_results(c.run.id)) is saved


async def test_a_failing_save_does_not_fail_its_batch(opener) -> None:
    store = await opener()
    runs = await claimed_runs(store, 5)
    bad = StepRecord("x", "completed", output='"\ud800"')  # cannot be encoded as UTF-8
    steps = [StepRecord("x", "completed", output=f'"{n}"') for n in range(5)]
    steps[2] = bad
    results = await asyncio.gather(
        *(
            store.save_step_result(c.lease, step, LEASE)
            for c, step in zip(runs, steps, strict=True)
        ),
        return_exceptions=True,
    )
    assert isinstance(results[2], StorageError)
    assert results[2].operation == "save_step_result"
    assert isinstance(results[2].__cause__, UnicodeError)
    assert [r for i, r in enumerate(results) if i != 2] == [True] * 4
    assert await store.get_step_results(runs[2].run.id) == {}
    # The failed save wrote nothing, not even the lease renewal.
    run = await store.get_run(runs[2].run.id)
    assert run == runs[2].run


async def test_saves_without_group_commit(opener) -> None:
    store = await opener(group_commit=False)
    runs = await claimed_runs(store, 5)
    calls = count_transactions(store)
    results = await asyncio.gather(
        *(store.save_step_result(c.lease, StepRecord("x", "completed"), LEASE) for c in runs)
    )
    assert results == [True] * 5
    assert len(calls) == 5


async def test_close_flushes_queued_saves(opener) -> None:
    store = await opener()
    runs = await claimed_runs(store, 3)
    saves = [
        asyncio.ensure_future(store.save_step_result(c.lease, StepRecord("x", "completed"), LEASE))
        for c in runs
    ]
    await asyncio.sleep(0)
    await store.close()
    assert [await s for s in saves] == [True] * 3
    reopened = await opener()
    for c in runs:
        assert "x" in await reopened.get_step_results(c.run.id)
