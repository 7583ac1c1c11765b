"""Every storage operation's documented behaviour, on a real file.

Runs under both transaction drivers (one call on aiosqlite's worker thread,
and aiosqlite's public coroutines).
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from reflow_core.errors import ConfigError, IdempotencyConflictError, StorageError
from reflow_core.storage import ClaimedRun, EventTake, Lease, NewRun, ScheduleSpec, StepRecord
from reflow_sqlite import SQLiteStorage

LEASE = timedelta(seconds=30)


@pytest.fixture(params=["hook", "public"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def done(name: str, output: str = '"ok"') -> StepRecord:
    return StepRecord(name, "completed", output=output)


async def claim_one(store: SQLiteStorage, workflow: str = "wf") -> ClaimedRun:
    claimed = await store.claim_runs([workflow], 1, LEASE)
    assert len(claimed) == 1
    return claimed[0]


# -- create_run --------------------------------------------------------------------------


async def test_create_run_is_pending_and_claimable_at_once(opener, clock) -> None:
    store = await opener()
    result = await store.create_run(NewRun("wf", '{"a":1}'))
    run = result.run
    assert result.created
    assert (run.status, run.workflow, run.input) == ("pending", "wf", '{"a":1}')
    assert (run.attempts, run.reclaims, run.lease_epoch) == (0, 0, 0)
    assert run.created_at == run.updated_at == run.wake_at == clock.now
    assert run.created_at.tzinfo is not None
    assert (run.output, run.error, run.lease_expires_at, run.waiting_for) == (None,) * 4
    assert len(run.id) == 26
    assert await store.get_run(run.id) == run
    assert (await claim_one(store)).run.id == run.id


async def test_create_run_uses_the_callers_id_and_refuses_a_duplicate(opener) -> None:
    store = await opener()
    result = await store.create_run(NewRun("wf", "1", run_id="run-1"))
    assert result.run.id == "run-1"
    with pytest.raises(StorageError, match="already exists") as info:
        await store.create_run(NewRun("wf", "2", run_id="run-1"))
    assert not isinstance(info.value, IdempotencyConflictError)
    assert info.value.operation == "create_run"
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
    assert (await store.get_run("run-1")).input == "1"  # type: ignore[union-attr]


async def test_idempotent_create_returns_the_existing_run_unchanged(opener, clock) -> None:
    store = await opener()
    first = await store.create_run(NewRun("wf", '{"a":1}', idempotency_key="k"))
    claimed = await claim_one(store)
    clock.advance(5)
    again = await store.create_run(NewRun("wf", '{"a":1}', idempotency_key="k", run_id="other"))
    assert not again.created
    assert again.run.id == first.run.id
    assert again.run == claimed.run  # the current state, not a reset
    assert await store.get_run("other") is None
    assert (await store.list_runs()).runs == [claimed.run]


async def test_idempotency_conflict_names_the_existing_run(opener) -> None:
    store = await opener()
    first = await store.create_run(NewRun("wf", '{"a":1}', idempotency_key="k"))
    with pytest.raises(IdempotencyConflictError) as info:
        await store.create_run(NewRun("wf", '{"a":2}', idempotency_key="k"))
    assert (info.value.workflow, info.value.idempotency_key) == ("wf", "k")
    assert info.value.existing_run_id == first.run.id
    assert len((await store.list_runs()).runs) == 1


async def test_idempotency_keys_are_scoped_per_workflow(opener) -> None:
    store = await opener()
    a = await store.create_run(NewRun("a", "1", idempotency_key="k"))
    b = await store.create_run(NewRun("b", "2", idempotency_key="k"))
    assert a.created
    assert b.created
    assert a.run.id != b.run.id
    plain = [await store.create_run(NewRun("a", "1")) for _ in range(2)]
    assert plain[0].run.id != plain[1].run.id


async def test_concurrent_idempotent_creates_from_many_connections_make_one_run(opener) -> None:
    stores = [await opener() for _ in range(4)]
    results = await asyncio.gather(
        *(
            store.create_run(NewRun("wf", "{}", idempotency_key="once"))
            for store in stores
            for _ in range(5)
        )
    )
    assert sum(r.created for r in results) == 1
    assert len({r.run.id for r in results}) == 1


async def test_a_delayed_run_waits_for_its_wake_at_then_is_claimed_in_due_order(
    opener, clock
) -> None:
    store = await opener()
    created = clock.now
    later = (await store.create_run(NewRun("wf", "later", delay=timedelta(seconds=10)))).run
    assert (later.status, later.wake_at, later.created_at) == (
        "delayed",
        created + timedelta(seconds=10),
        created,
    )
    assert await store.get_run(later.id) == later
    for delay in (None, timedelta(0)):
        assert (await store.create_run(NewRun("wf", "now", delay=delay))).run.status == "pending"
    clock.advance(5)
    soon = (await store.create_run(NewRun("wf", "soon", delay=timedelta(seconds=3)))).run
    assert [r.id for r in (await store.list_runs(status=["delayed"])).runs] == [soon.id, later.id]
    stats = await store.queue_stats(["wf"])
    assert [(s.delayed, s.pending) for s in stats] == [(2, 2)]
    assert [c.run.input for c in await store.claim_runs(["wf"], 10, LEASE)] == ["now", "now"]
    clock.advance(5)  # 10 s after the first create: both delays have passed
    claimed = await store.claim_runs(["wf"], 10, LEASE)
    assert [c.run.id for c in claimed] == [soon.id, later.id]  # by wake_at
    assert [(c.run.status, c.reclaimed, c.run.reclaims) for c in claimed] == [
        ("running", False, 0)
    ] * 2


async def test_a_delayed_run_can_be_cancelled_and_an_idempotent_hit_keeps_it(opener, clock) -> None:
    store = await opener()
    new = NewRun("wf", "1", idempotency_key="k", delay=timedelta(minutes=1))
    run = (await store.create_run(new)).run
    again = await store.create_run(NewRun("wf", "1", idempotency_key="k"))
    assert (again.created, again.run) == (False, run)
    assert await store.update_run_status(run.id, "cancelled")
    assert (await store.get_run(run.id)).status == "cancelled"  # type: ignore[union-attr]
    clock.advance(120)
    assert await store.claim_runs(["wf"], 10, LEASE) == []
    with pytest.raises(ConfigError):
        await store.create_run(NewRun("wf", "1", delay=timedelta(seconds=-1)))


# -- claim_runs ----------------------------------------------------------------------------


async def test_claim_takes_runs_oldest_due_first_in_batches(opener, clock) -> None:
    store = await opener()
    ids = []
    for n in range(5):
        ids.append((await store.create_run(NewRun("wf", str(n)))).run.id)
        clock.advance(1)
    await store.create_run(NewRun("other", "x"))
    first = await store.claim_runs(["wf"], 3, LEASE)
    assert [c.run.id for c in first] == ids[:3]
    for c in first:
        assert c.run.status == "running"
        assert (c.run.attempts, c.run.lease_epoch, c.run.reclaims) == (1, 1, 0)
        assert c.lease == Lease(c.run.id, 1)
        assert c.run.lease_expires_at == clock.now + LEASE
        assert c.run.wake_at is None
        assert c.run.updated_at == clock.now
        assert not c.reclaimed
        assert c.steps == {}
        assert await store.get_run(c.run.id) == c.run
    second = await store.claim_runs(["wf", "wf"], 10, LEASE)
    assert [c.run.id for c in second] == ids[3:]
    assert await store.claim_runs(["wf"], 10, LEASE) == []
    assert await store.claim_runs([], 10, LEASE) == []
    assert await store.claim_runs(["other"], 0, LEASE) == []
    assert [c.run.workflow for c in await store.claim_runs(["other", "nope"], 5, LEASE)] == [
        "other"
    ]


async def test_equal_due_times_are_claimed_in_id_order(opener) -> None:
    store = await opener()
    for run_id in ("c", "a", "b"):
        await store.create_run(NewRun("wf", "{}", run_id=run_id))
    assert [c.run.id for c in await store.claim_runs(["wf"], 3, LEASE)] == ["a", "b", "c"]


async def test_lapsed_lease_is_reclaimed_first_and_counted(opener, clock) -> None:
    store = await opener()
    stuck = (await store.create_run(NewRun("wf", "stuck"))).run.id
    old = await claim_one(store)
    assert await store.save_step_result(old.lease, done("one"), LEASE)
    clock.advance(1)
    backlog = (await store.create_run(NewRun("wf", "new"))).run.id
    clock.advance(LEASE.total_seconds())  # the lease ends exactly now: lapsed
    assert not await store.heartbeat_run(old.lease, LEASE)
    taken = await store.claim_runs(["wf"], 1, LEASE)
    assert [c.run.id for c in taken] == [stuck]
    again = taken[0]
    assert again.reclaimed
    assert (again.run.attempts, again.run.reclaims, again.run.lease_epoch) == (2, 1, 2)
    assert list(again.steps) == ["one"]
    assert again.steps["one"].output == '"ok"'
    # The old holder's writes are all refused now.
    assert not await store.save_step_result(old.lease, done("two"), LEASE)
    assert not await store.finish_run(old.lease, "completed", output="1")
    assert list(await store.get_step_results(stuck)) == ["one"]
    nxt = await store.claim_runs(["wf"], 5, LEASE)
    assert [(c.run.id, c.reclaimed) for c in nxt] == [(backlog, False)]


async def test_live_leases_are_never_taken(opener, clock) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    c = await claim_one(store)
    clock.advance(29.999)
    assert await store.claim_runs(["wf"], 5, LEASE) == []
    assert await store.heartbeat_run(c.lease, LEASE)


async def test_real_short_lease_lapses_by_the_storage_clock(opener) -> None:
    store = await opener(clock=None)
    run = (await store.create_run(NewRun("wf", "{}"))).run
    short = timedelta(milliseconds=50)
    c = (await store.claim_runs(["wf"], 1, short))[0]
    assert await store.save_step_result(c.lease, done("a"), short)
    await asyncio.sleep(0.08)
    assert not await store.save_step_result(c.lease, done("b"), short)
    retaken = (await store.claim_runs(["wf"], 1, LEASE))[0]
    assert retaken.reclaimed
    assert retaken.run.id == run.id


# -- heartbeat, save, finish ---------------------------------------------------------------


async def test_heartbeat_extends_from_now(opener, clock) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    c = await claim_one(store)
    clock.advance(20)
    assert await store.heartbeat_run(c.lease, timedelta(seconds=60))
    run = await store.get_run(c.run.id)
    assert run is not None
    assert run.lease_expires_at == clock.now + timedelta(seconds=60)
    assert run.updated_at == clock.now
    clock.advance(59)
    assert await store.heartbeat_run(c.lease, LEASE)
    assert not await store.heartbeat_run(Lease(c.run.id, 99), LEASE)
    assert not await store.heartbeat_run(Lease("missing", 1), LEASE)


async def test_save_step_upserts_and_renews_the_lease(opener, clock) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    c = await claim_one(store)
    wake = datetime(2031, 1, 1, tzinfo=UTC)
    assert await store.save_step_result(
        c.lease, StepRecord("a", "failed", error='"boom"', attempts=1), LEASE
    )
    clock.advance(10)
    assert await store.save_step_result(c.lease, done("b"), LEASE)
    assert await store.save_step_result(
        c.lease, StepRecord("a", "completed", output="1", attempts=2, wake_at=wake), LEASE
    )
    steps = await store.get_step_results(c.run.id)
    assert list(steps) == ["a", "b"]  # first-saved order, kept by an update
    assert steps["a"] == StepRecord(
        "a", "completed", output="1", attempts=2, wake_at=wake, completed_at=clock.now
    )
    run = await store.get_run(c.run.id)
    assert run is not None
    assert run.lease_expires_at == clock.now + LEASE
    assert await store.get_step_results("missing") == {}


async def test_stale_epoch_writes_nothing(opener) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    c = await claim_one(store)
    stale = Lease(c.run.id, c.lease.epoch - 1)
    assert not await store.save_step_result(stale, done("a"), LEASE)
    assert not await store.heartbeat_run(stale, LEASE)
    assert not await store.finish_run(stale, "completed", output="1", step=done("z"))
    assert not await store.update_run_status(c.run.id, "failed", lease=stale)
    assert await store.sleep_run(stale, "nap", LEASE) is None
    assert await store.wait_run(stale, "w", "e", None) is None
    assert await store.take_event(stale, "w", "e") is None
    assert await store.get_step_results(c.run.id) == {}
    assert await store.get_run(c.run.id) == c.run


async def test_finish_run_with_last_step_is_atomic(opener, clock) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    c = await claim_one(store)
    clock.advance(1)
    assert await store.finish_run(c.lease, "completed", output='"out"', step=done("last"))
    run = await store.get_run(c.run.id)
    assert run is not None
    assert (run.status, run.output, run.error) == ("completed", '"out"', None)
    assert (run.lease_expires_at, run.wake_at, run.waiting_for) == (None, None, None)
    assert run.lease_epoch == 1
    assert run.updated_at == clock.now
    assert (await store.get_step_results(c.run.id))["last"].completed_at == clock.now
    assert not await store.finish_run(c.lease, "failed", error="x")
    assert not await store.save_step_result(c.lease, done("late"), LEASE)

    await store.create_run(NewRun("wf", "{}"))
    failed = await claim_one(store)
    assert await store.finish_run(failed.lease, "failed", error='{"code":"x"}')
    run = await store.get_run(failed.run.id)
    assert run is not None
    assert (run.status, run.error, run.output) == (
        "failed",
        '{"code":"x"}',
        None,
    )


# -- update_run_status ---------------------------------------------------------------------


async def test_hand_back_with_lease_is_claimable_and_not_a_reclaim(opener, clock) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    c = await claim_one(store)
    clock.advance(2)
    assert not await store.update_run_status("other-run", "pending", lease=c.lease)
    assert await store.update_run_status(c.run.id, "pending", lease=c.lease)
    run = await store.get_run(c.run.id)
    assert run is not None
    assert (run.status, run.lease_expires_at, run.wake_at) == ("pending", None, clock.now)
    assert not await store.save_step_result(c.lease, done("a"), LEASE)
    again = await claim_one(store)
    assert not again.reclaimed
    assert (again.run.attempts, again.run.reclaims, again.run.lease_epoch) == (2, 0, 2)


async def test_end_with_lease(opener) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    c = await claim_one(store)
    assert await store.update_run_status(c.run.id, "failed", lease=c.lease, error='"e"')
    run = await store.get_run(c.run.id)
    assert run is not None
    assert (run.status, run.error) == ("failed", '"e"')
    assert not await store.update_run_status(c.run.id, "cancelled", lease=c.lease)


async def test_cancel_without_lease_breaks_the_fence(opener) -> None:
    store = await opener()
    pending = (await store.create_run(NewRun("wf", "{}"))).run.id
    assert await store.update_run_status(pending, "cancelled")
    await store.create_run(NewRun("wf", "{}"))
    c = await claim_one(store)
    assert await store.update_run_status(c.run.id, "cancelled", error='"stop"')
    run = await store.get_run(c.run.id)
    assert run is not None
    assert (run.status, run.error, run.lease_expires_at) == ("cancelled", '"stop"', None)
    assert not await store.save_step_result(c.lease, done("a"), LEASE)
    assert not await store.finish_run(c.lease, "completed")
    assert not await store.update_run_status(c.run.id, "cancelled")  # terminal
    assert not await store.update_run_status("missing", "failed")
    assert await store.claim_runs(["wf"], 5, LEASE) == []


async def test_pending_without_lease_is_refused(opener) -> None:
    store = await opener()
    run = (await store.create_run(NewRun("wf", "{}"))).run
    with pytest.raises(ConfigError, match="requires its lease"):
        await store.update_run_status(run.id, "pending")
    with pytest.raises(ConfigError, match="requires its lease"):
        await store.update_run_status("missing", "pending")
    with pytest.raises(ConfigError, match="not 'completed'"):
        await store.update_run_status(run.id, "completed")  # type: ignore[arg-type]
    assert await store.get_run(run.id) == run


# -- sleep and wait ------------------------------------------------------------------------


async def test_sleep_deadline_is_fixed_the_first_time(opener, clock) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    c = await claim_one(store)
    wake = await store.sleep_run(c.lease, "nap", timedelta(hours=1))
    assert wake == clock.now + timedelta(hours=1)
    run = await store.get_run(run_id)
    assert run is not None
    assert (run.status, run.wake_at, run.lease_expires_at) == ("sleeping", wake, None)
    step = (await store.get_step_results(run_id))["nap"]
    assert (step.status, step.wake_at, step.completed_at) == ("sleeping", wake, clock.now)
    assert await store.heartbeat_run(c.lease, LEASE) is False
    clock.advance(3599)
    assert await store.claim_runs(["wf"], 5, LEASE) == []
    clock.advance(1)
    woken = await claim_one(store)
    assert not woken.reclaimed
    assert woken.run.wake_at is None
    assert woken.steps["nap"].wake_at == wake
    # A run that reaches the same sleep again (say, after a reclaim) keeps it.
    assert await store.sleep_run(woken.lease, "nap", timedelta(days=9)) == wake
    assert (await claim_one(store)).run.id == run_id  # already due


async def test_wait_without_event_parks_the_run_until_delivery(opener, clock) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    c = await claim_one(store)
    result = await store.wait_run(c.lease, "approval", "approved", None)
    assert result is not None
    assert (result.ready, result.deadline) == (False, None)
    run = await store.get_run(run_id)
    assert run is not None
    assert (run.status, run.waiting_for, run.wake_at) == ("waiting", "approved", None)
    assert not await store.heartbeat_run(c.lease, LEASE)
    clock.advance(10**6)
    assert await store.claim_runs(["wf"], 5, LEASE) == []
    assert await store.deliver_event(run_id, "other", '"x"')
    assert await store.claim_runs(["wf"], 5, LEASE) == []
    assert await store.deliver_event(run_id, "approved", '"yes"')
    run = await store.get_run(run_id)
    assert run is not None
    assert run.wake_at == clock.now
    woken = await claim_one(store)
    assert woken.run.waiting_for == "approved"
    again = await store.wait_run(woken.lease, "approval", "approved", timedelta(seconds=1))
    assert again is not None
    assert (again.ready, again.deadline) == (True, None)
    taken = await store.take_event(woken.lease, "approval", "approved")
    assert taken is not None
    assert (taken.found, taken.payload) == (True, '"yes"')
    run = await store.get_run(run_id)
    assert run is not None
    assert (run.status, run.waiting_for) == ("running", None)
    step = (await store.get_step_results(run_id))["approval"]
    assert (step.status, step.output) == ("completed", '"yes"')


async def test_wait_timeout_deadline_is_fixed_and_wakes_the_run(opener, clock) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    c = await claim_one(store)
    result = await store.wait_run(c.lease, "w", "e", timedelta(seconds=60))
    deadline = clock.now + timedelta(seconds=60)
    assert result is not None
    assert (result.ready, result.deadline) == (False, deadline)
    run = await store.get_run(run_id)
    assert run is not None
    assert run.wake_at == deadline
    clock.advance(60)
    woken = await claim_one(store)
    clock.advance(5)
    again = await store.wait_run(woken.lease, "w", "e", timedelta(seconds=600))
    assert again is not None
    assert (again.ready, again.deadline) == (False, deadline)
    assert (await claim_one(store)).run.id == run_id  # deadline already passed


async def test_wait_with_event_already_buffered_keeps_the_lease(opener) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    assert await store.deliver_event(run_id, "e", "1")
    c = await claim_one(store)
    result = await store.wait_run(c.lease, "w", "e", timedelta(seconds=5))
    assert result is not None
    assert result.ready
    assert await store.heartbeat_run(c.lease, LEASE)
    run = await store.get_run(run_id)
    assert run is not None
    assert (run.status, run.waiting_for) == ("running", None)


# -- events ----------------------------------------------------------------------------------


async def test_events_are_taken_in_arrival_order_per_name_and_run(opener) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    other = (await store.create_run(NewRun("wf2", "{}"))).run.id
    for n in range(3):
        assert await store.deliver_event(run_id, "e", f'"e{n}"')
        assert await store.deliver_event(run_id, "f", f'"f{n}"')
        assert await store.deliver_event(other, "e", f'"o{n}"')
    c = await claim_one(store)
    got = [await store.take_event(c.lease, f"w{n}", "e") for n in range(4)]
    assert [(t.found, t.payload) for t in got if t] == [
        (True, '"e0"'),
        (True, '"e1"'),
        (True, '"e2"'),
        (False, None),
    ]
    assert (await store.take_event(c.lease, "wf", "f")).payload == '"f0"'  # type: ignore[union-attr]
    o = await claim_one(store, "wf2")
    assert (await store.take_event(o.lease, "w", "e")).payload == '"o0"'  # type: ignore[union-attr]


async def test_take_event_is_harmless_to_retry(opener) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    await store.deliver_event(run_id, "e", '"a"')
    await store.deliver_event(run_id, "e", '"b"')
    c = await claim_one(store)
    first = await store.take_event(c.lease, "w", "e")
    retry = await store.take_event(c.lease, "w", "e")
    assert first is not None
    assert retry is not None
    assert first.payload == retry.payload == '"a"'
    nxt = await store.take_event(c.lease, "w2", "e")
    assert nxt is not None
    assert nxt.payload == '"b"'


async def test_event_ids_deduplicate_forever(opener) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    assert await store.deliver_event(run_id, "e", '"1"', event_id="x")
    assert await store.deliver_event(run_id, "e", '"2"', event_id="x")
    c = await claim_one(store)
    assert (await store.take_event(c.lease, "w1", "e")).payload == '"1"'  # type: ignore[union-attr]
    assert await store.deliver_event(run_id, "e", '"3"', event_id="x")  # after the take too
    assert await store.take_event(c.lease, "w2", "e") == EventTake(found=False)
    other = (await store.create_run(NewRun("wf", "{}"))).run.id
    assert await store.deliver_event(other, "e", '"o"', event_id="x")  # ids are per run


async def test_events_to_missing_or_finished_runs_are_refused(opener) -> None:
    store = await opener()
    assert not await store.deliver_event("missing", "e", "1")
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    c = await claim_one(store)
    assert await store.finish_run(c.lease, "failed", error="1")
    assert not await store.deliver_event(run_id, "e", "1")
    assert await store.requeue_run(run_id)
    again = await claim_one(store)
    assert (await store.take_event(again.lease, "w", "e")).found is False  # type: ignore[union-attr]


# -- requeue ---------------------------------------------------------------------------------


async def test_requeue_keeps_completed_and_skipped_steps_only(opener, clock) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "{}"))).run.id
    c = await claim_one(store)
    await store.save_step_result(c.lease, done("a"), LEASE)
    await store.save_step_result(c.lease, StepRecord("b", "skipped"), LEASE)
    await store.save_step_result(c.lease, StepRecord("c", "failed", error="1"), LEASE)
    clock.advance(LEASE.total_seconds())
    reclaimed = await claim_one(store)
    assert reclaimed.run.reclaims == 1
    assert await store.finish_run(reclaimed.lease, "failed", error='"c failed"')
    assert not await store.requeue_run("missing")
    clock.advance(1)
    assert await store.requeue_run(run_id)
    run = await store.get_run(run_id)
    assert run is not None
    assert (run.status, run.error, run.reclaims, run.attempts) == ("pending", None, 0, 2)
    assert run.wake_at == clock.now
    assert list(await store.get_step_results(run_id)) == ["a", "b"]
    assert not await store.requeue_run(run_id)  # pending now
    again = await claim_one(store)
    assert list(again.steps) == ["a", "b"]
    assert await store.finish_run(again.lease, "completed")
    assert not await store.requeue_run(run_id)  # completed runs stay completed


# -- list_runs -------------------------------------------------------------------------------


async def test_list_runs_pagination_visits_every_run_once_with_equal_times(opener) -> None:
    store = await opener()  # the clock does not move: every run has the same created_at
    ids = [(await store.create_run(NewRun("wf", str(n)))).run.id for n in range(23)]
    ids += [(await store.create_run(NewRun("other", "x"))).run.id for _ in range(4)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await store.list_runs(limit=5, cursor=cursor)
        seen += [r.id for r in page.runs]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == sorted(ids, reverse=True)
    assert pages == 6
    wf_only: list[str] = []
    cursor = None
    while True:
        page = await store.list_runs(workflow="wf", limit=4, cursor=cursor)
        wf_only += [r.id for r in page.runs]
        if not (cursor := page.next_cursor):
            break
    assert wf_only == sorted(ids[:23], reverse=True)
    exact = await store.list_runs(workflow="other", limit=4)
    assert len(exact.runs) == 4
    assert exact.next_cursor is None


async def test_list_runs_newest_first_with_filters(opener, clock) -> None:
    store = await opener()
    a = (await store.create_run(NewRun("wf", "a"))).run.id
    clock.advance(1)
    b = (await store.create_run(NewRun("wf", "b"))).run.id
    clock.advance(1)
    await store.create_run(NewRun("x", "c"))
    await store.update_run_status(a, "cancelled")
    assert [r.id for r in (await store.list_runs(workflow="wf")).runs] == [b, a]
    assert [r.id for r in (await store.list_runs(status=["cancelled"])).runs] == [a]
    assert [r.id for r in (await store.list_runs(status={"pending"}, workflow="wf")).runs] == [b]
    assert (await store.list_runs(status=[])).runs == []
    with pytest.raises(ConfigError):
        await store.list_runs(limit=0)
    with pytest.raises(ConfigError):
        await store.list_runs(cursor="not a cursor!")


# -- schedules -------------------------------------------------------------------------------


def spec(key: str, when: datetime, recurrence: str = "every:60", input: str = "{}") -> ScheduleSpec:
    return ScheduleSpec(key, "wf", input, recurrence, when)


async def test_upsert_schedule_keeps_the_cadence(opener, clock) -> None:
    store = await opener()
    t0 = clock.now + timedelta(minutes=1)
    first = await store.upsert_schedule(spec("s", t0))
    assert (first.next_run_at, first.created_at, first.updated_at) == (t0, clock.now, clock.now)
    clock.advance(10)
    kept = await store.upsert_schedule(spec("s", t0 + timedelta(hours=5), input='{"v":2}'))
    assert kept.next_run_at == t0
    assert (kept.input, kept.created_at, kept.updated_at) == (
        '{"v":2}',
        first.created_at,
        clock.now,
    )
    changed = await store.upsert_schedule(spec("s", t0 + timedelta(hours=5), "cron:0 * * * *"))
    assert changed.next_run_at == t0 + timedelta(hours=5)
    assert changed.created_at == first.created_at
    assert await store.list_schedules() == [changed]


async def test_schedules_list_due_and_delete(opener, clock) -> None:
    store = await opener()
    now = clock.now
    await store.upsert_schedule(spec("b", now - timedelta(seconds=5)))
    await store.upsert_schedule(spec("a", now + timedelta(seconds=5)))
    await store.upsert_schedule(spec("c", now - timedelta(seconds=9)))
    await store.upsert_schedule(spec("d", now))
    assert [s.key for s in await store.list_schedules()] == ["a", "b", "c", "d"]
    assert [s.key for s in await store.due_schedules(10)] == ["c", "b", "d"]
    assert [s.key for s in await store.due_schedules(2)] == ["c", "b"]
    assert await store.due_schedules(0) == []
    assert await store.delete_schedule("b")
    assert not await store.delete_schedule("b")
    assert [s.key for s in await store.list_schedules()] == ["a", "c", "d"]


async def test_claim_schedule_slot_fires_exactly_once(opener, clock) -> None:
    stores = [await opener() for _ in range(3)]
    slot = clock.now
    nxt = slot + timedelta(minutes=1)
    await stores[0].upsert_schedule(spec("s", slot))

    def run_for(n: int) -> NewRun:
        return NewRun("wf", "{}", idempotency_key="schedule:s:slot0", run_id=f"attempt-{n}")

    results = await asyncio.gather(
        *(
            store.claim_schedule_slot("s", slot, nxt, run_for(i))
            for i, store in enumerate(stores * 4)
        )
    )
    fired = [r for r in results if r is not None]
    assert len(fired) == 1
    assert fired[0].status == "pending"
    assert fired[0].idempotency_key == "schedule:s:slot0"
    assert (await stores[1].list_schedules())[0].next_run_at == nxt
    assert len((await stores[2].list_runs()).runs) == 1
    assert await stores[0].claim_schedule_slot("s", slot, nxt, run_for(99)) is None
    assert await stores[0].claim_schedule_slot("gone", slot, nxt, run_for(98)) is None


async def test_claim_schedule_slot_retry_after_crash_finds_the_same_run(opener, clock) -> None:
    store = await opener()
    slot = clock.now
    existing = await store.create_run(NewRun("wf", "{}", idempotency_key="schedule:s:1"))
    await store.upsert_schedule(spec("s", slot))
    run = await store.claim_schedule_slot(
        "s", slot, slot + timedelta(minutes=1), NewRun("wf", "{}", idempotency_key="schedule:s:1")
    )
    assert run == existing.run


async def test_claim_schedule_slot_conflict_rolls_back_the_slot(opener, clock) -> None:
    store = await opener()
    slot = clock.now
    await store.create_run(NewRun("wf", '"old"', idempotency_key="k"))
    await store.upsert_schedule(spec("s", slot))
    with pytest.raises(IdempotencyConflictError):
        await store.claim_schedule_slot(
            "s", slot, slot + timedelta(minutes=1), NewRun("wf", '"new"', idempotency_key="k")
        )
    assert (await store.list_schedules())[0].next_run_at == slot


# -- errors and lifecycle --------------------------------------------------------------------


async def test_driver_errors_become_storage_errors(opener, db_path) -> None:
    store = await opener()
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute("DROP TABLE steps")
    raw.close()
    with pytest.raises(StorageError) as info:
        await store.get_step_results("x")
    assert info.value.operation == "get_step_results"
    assert info.value.backend == "sqlite"
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)


async def test_a_held_write_lock_times_out_into_a_storage_error(opener, db_path) -> None:
    store = await opener(busy_timeout=50)
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageError, match="locked") as info:
            await store.create_run(NewRun("wf", "{}"))
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert await store.get_run("x") is None  # readers are not blocked in WAL
    finally:
        raw.execute("ROLLBACK")
        raw.close()
    assert (await store.create_run(NewRun("wf", "{}"))).created


async def test_closed_and_uninitialized_storage_refuse_work(opener, db_path) -> None:
    fresh = opener.build()
    with pytest.raises(StorageError, match="not initialized"):
        await fresh.get_run("x")
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    await store.close()
    await store.close()
    with pytest.raises(StorageError, match="closed") as info:
        await store.create_run(NewRun("wf", "{}"))
    assert info.value.operation == "create_run"
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed on close
