"""Group commit: concurrent calls share round trips, and each keeps its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

import pytest

from reflow_core.batching import GroupCommit
from reflow_core.storage import Lease, NewRun, StepRecord

from .conftest import Database

LEASE = timedelta(seconds=30)


async def test_the_first_call_goes_at_once_and_later_ones_share_a_batch() -> None:
    batches: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        await asyncio.sleep(0.01)  # a round trip
        return [i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit(flush, max_batch=4)
    results = await asyncio.gather(*(group.submit(i) for i in range(9)))
    assert results == [i * 10 for i in range(9)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert group.batches == 3
    assert await group.submit(42) == 420  # alone, it waits for nothing


async def test_a_failing_batch_fails_only_its_own_callers() -> None:
    calls = 0

    async def flush(items: Sequence[str]) -> list[str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if "bad" in items:
            raise OSError("store down")
        return list(items)

    group: GroupCommit[str, str] = GroupCommit(flush, max_batch=2)
    outcomes = await asyncio.gather(
        *(group.submit(x) for x in ["a", "bad", "c", "d"]), return_exceptions=True
    )
    assert isinstance(outcomes[0], OSError)
    assert isinstance(outcomes[1], OSError)
    assert outcomes[2:] == ["c", "d"]
    assert calls == 2


async def test_a_caller_that_gives_up_does_not_break_the_batch() -> None:
    release = asyncio.Event()

    async def flush(items: Sequence[int]) -> list[int]:
        await release.wait()
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(flush)
    first = asyncio.ensure_future(group.submit(1))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(group.submit(2))
    third = asyncio.ensure_future(group.submit(3))
    await asyncio.sleep(0)
    second.cancel()
    release.set()
    assert await first == 1
    assert await third == 3


async def test_two_batches_may_be_in_flight_at_once() -> None:
    running = 0
    most = 0
    batches: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        batches.append(list(items))
        await asyncio.sleep(0.01)
        running -= 1
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(flush, max_batch=3, in_flight=2)
    assert await asyncio.gather(*(group.submit(i) for i in range(9))) == list(range(9))
    assert most == 2
    assert sorted(i for batch in batches for i in batch) == list(range(9))
    assert all(len(batch) <= 3 for batch in batches)


def test_max_batch_must_be_positive() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        return list(items)

    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(flush, max_batch=0)
    with pytest.raises(ValueError, match="in_flight"):
        GroupCommit(flush, in_flight=0)


async def test_concurrent_saves_are_fenced_one_by_one(db: Database) -> None:
    """Twenty runs save at once (one batch on backends that group commits);
    the run whose lease was taken over is refused, the others land."""
    store = db.connect()
    await store.initialize()
    for i in range(20):
        await store.create_run(NewRun("wf", str(i)))
    claimed = await store.claim_runs(["wf"], 20, LEASE)
    assert len(claimed) == 20
    stale = Lease(claimed[7].run.id, claimed[7].lease.epoch - 1)
    leases = [c.lease for c in claimed]
    leases[7] = stale
    results = await asyncio.gather(
        *(
            store.save_step_result(lease, StepRecord("a", "completed", output=str(i)), LEASE)
            for i, lease in enumerate(leases)
        )
    )
    assert results == [i != 7 for i in range(20)]
    for i, c in enumerate(claimed):
        steps = await store.get_step_results(c.run.id)
        if i == 7:
            assert steps == {}
        else:
            assert steps["a"].output == str(i)


async def test_concurrent_finishes_are_fenced_one_by_one(db: Database) -> None:
    """Twenty runs end at once, some with a last step; the run whose lease was
    taken over is refused and keeps running, the others end as asked."""
    store = db.connect()
    await store.initialize()
    for i in range(20):
        await store.create_run(NewRun("wf", str(i)))
    claimed = await store.claim_runs(["wf"], 20, LEASE)
    leases = [c.lease for c in claimed]
    leases[3] = Lease(claimed[3].run.id, claimed[3].lease.epoch + 1)
    results = await asyncio.gather(
        *(
            store.finish_run(
                lease,
                "completed" if i % 2 else "failed",
                output=str(i) if i % 2 else None,
                error=None if i % 2 else str(i),
                step=StepRecord("last", "completed", output=str(i)) if i % 3 else None,
            )
            for i, lease in enumerate(leases)
        )
    )
    assert results == [i != 3 for i in range(20)]
    for i, c in enumerate(claimed):
        run = await store.get_run(c.run.id)
        steps = await store.get_step_results(c.run.id)
        assert run is not None
        if i == 3:
            assert run.status == "running"
            assert steps == {}
            continue
        assert run.status == ("completed" if i % 2 else "failed")
        assert (run.output, run.error) == ((str(i), None) if i % 2 else (None, str(i)))
        assert list(steps) == (["last"] if i % 3 else [])


@pytest.mark.parametrize("taken_id", [False, True], ids=["ids-free", "an-id-taken"])
async def test_concurrent_creates_keep_their_own_outcomes(db: Database, taken_id: bool) -> None:
    """Creates sent at once (one statement on backends that group them): new
    runs, a key repeated within the burst, a key whose run exists with the
    same input, one with other input, and a run id that is taken."""
    from reflow_core.errors import IdempotencyConflictError, StorageError

    store = db.connect()
    await store.initialize()
    old = await store.create_run(NewRun("wf", "1", idempotency_key="old"))
    await store.create_run(NewRun("wf", "1", run_id="taken"))
    requests = [NewRun("wf", str(i)) for i in range(10)]
    requests += [
        NewRun("wf", "2", idempotency_key="twice"),
        NewRun("wf", "1", idempotency_key="old"),
        NewRun("wf", "other", idempotency_key="old-2"),
        NewRun("other-wf", "1", idempotency_key="old"),
        NewRun("wf", "3", run_id="taken" if taken_id else "free"),
    ]
    await store.create_run(NewRun("wf", "1", idempotency_key="old-2"))
    outcomes = await asyncio.gather(
        *(store.create_run(r) for r in requests), return_exceptions=True
    )
    fresh = outcomes[:10]
    assert all(not isinstance(o, BaseException) and o.created for o in fresh)
    assert len({o.run.id for o in fresh if not isinstance(o, BaseException)}) == 10
    keyed = outcomes[10]
    assert not isinstance(keyed, BaseException)
    assert keyed.created
    same = outcomes[11]
    assert not isinstance(same, BaseException)
    assert (same.created, same.run.id) == (False, old.run.id)
    assert isinstance(outcomes[12], IdempotencyConflictError)
    other = outcomes[13]
    assert not isinstance(other, BaseException)
    assert other.created
    if taken_id:
        assert isinstance(outcomes[14], StorageError)
    else:
        assert not isinstance(outcomes[14], BaseException)
        assert outcomes[14].created
    page = await store.list_runs(limit=100)
    assert len(page.runs) == 3 + 10 + 1 + 1 + (0 if taken_id else 1)


async def test_a_key_repeated_within_one_burst_creates_one_run(db: Database) -> None:
    store = db.connect()
    await store.initialize()
    outcomes = await asyncio.gather(
        *(store.create_run(NewRun("wf", "2", idempotency_key="twice")) for _ in range(6))
    )
    assert len({o.run.id for o in outcomes}) == 1
    assert [o.created for o in outcomes].count(True) == 1
