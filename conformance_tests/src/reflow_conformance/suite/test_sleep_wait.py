"""Sleeping and waiting: the lease is dropped, the deadline is the storage's
now plus the duration, fixed the first time it is reached, and the run is
claimable once it is due (or, for a wait, as soon as its event is there)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import ClaimedRun, RunRecord, StepRecord, Storage

from ._util import (
    LONG,
    STALE_EVENT,
    claim_one,
    create,
    decoded,
    fenced_writes,
    read_run,
)

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestSleep", "TestWait"]

NAP = timedelta(minutes=30)
"""A sleep or wait timeout that never elapses during a test (longer than the lease)."""

_MS = timedelta(milliseconds=1)
_LONG_AGO = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)


def _close(a: datetime | None, b: datetime | None) -> bool:
    """Equal to the contract's precision: stored times keep at least milliseconds."""
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= _MS


class _Held:
    """A claimed run and the storage's *now* at the claim, read off its lease."""

    def __init__(self, claimed: ClaimedRun, lease: timedelta) -> None:
        self.claimed = claimed
        self.lease = claimed.lease
        self.run_id = claimed.run.id
        expires = claimed.run.lease_expires_at
        self.storage_now = expires - lease if expires is not None else datetime.now(UTC)
        self._started = time.monotonic()

    def deadline_ok(self, deadline: datetime | None, duration: timedelta) -> bool:
        """``deadline`` is the storage's now plus ``duration``, now being some
        moment since the claim (a second of slack for rounding and clocks)."""
        if deadline is None:
            return False
        elapsed = timedelta(seconds=time.monotonic() - self._started)
        low = self.storage_now + duration - timedelta(seconds=1)
        return low <= deadline <= low + elapsed + timedelta(seconds=2)


async def _hold(s: Storage, wf: str, lease: timedelta = LONG) -> _Held:
    return _Held(await claim_one(s, wf, lease), lease)


async def _run(s: Storage, run_id: str) -> RunRecord:
    return await read_run(s, run_id)


async def _step(s: Storage, run_id: str, name: str) -> StepRecord | None:
    return (await s.get_step_results(run_id)).get(name)


async def _unclaimable(reflow: Harness, stores: list[Storage], wf: str, why: str) -> None:
    for store in stores:
        claimed = await store.claim_runs([wf], 10, reflow.long_lease)
        promise(claimed == [], P.NOT_DUE_NOT_CLAIMABLE, f"{why}: claimed {claimed}")


class TestSleep:
    def test_a_sleeping_run_holds_no_lease_until_it_is_due(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await _hold(s, wf)
            wake_at = await s.sleep_run(held.lease, "nap", NAP)
            promise(wake_at is not None, P.LIVE_LEASE_ACCEPTED, "sleep_run refused a live lease")
            promise(
                held.deadline_ok(wake_at, NAP),
                P.DEADLINE_FROM_DURATION,
                f"slept {NAP} from about {held.storage_now}, wake_at {wake_at}",
            )
            run = await _run(s, held.run_id)
            promise(run.status == "sleeping", P.PAUSE_RECORDED, f"status {run.status!r}")
            promise(_close(run.wake_at, wake_at), P.PAUSE_RECORDED, f"run wake_at {run.wake_at}")
            step = await _step(s, held.run_id, "nap")
            promise(
                step is not None and step.status == "sleeping" and _close(step.wake_at, wake_at),
                P.PAUSE_RECORDED,
                f"step record {step!r}, wake_at {wake_at}",
            )
            other = await reflow.open()
            await _unclaimable(reflow, [s, other], wf, "a run sleeping for 30 minutes")
            await s.deliver_event(held.run_id, STALE_EVENT, codec.encode("x"))
            accepted = await fenced_writes(s, held.lease)
            promise(
                accepted == [], P.PAUSE_DROPS_LEASE, f"the sleeper's lease still did {accepted}"
            )
            after = await _run(s, held.run_id)
            promise(
                after.status == "sleeping" and _close(after.wake_at, wake_at),
                P.PAUSE_DROPS_LEASE,
                f"the old lease changed the sleeping run: {after}",
            )
            steps = await s.get_step_results(held.run_id)
            promise(set(steps) == {"nap"}, P.PAUSE_DROPS_LEASE, f"steps {sorted(steps)}")
            await _unclaimable(reflow, [other], wf, "a sleeper after stale writes")

        reflow.run(body)

    def test_a_sleep_is_claimable_once_due_and_its_deadline_is_fixed(self, reflow: Harness) -> None:
        wf = reflow.unique()
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await _hold(s, wf)
            wake_at = await s.sleep_run(held.lease, "nap", short)
            promise(wake_at is not None, P.LIVE_LEASE_ACCEPTED, "sleep_run refused a live lease")
            await reflow.lapse(short)
            other = await reflow.open()
            claimed = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(
                [c.run.id for c in claimed] == [held.run_id],
                P.DUE_CLAIMABLE,
                f"a sleep of {short} that is over: claimed {claimed}",
            )
            again = claimed[0]
            carried = again.steps.get("nap")
            promise(
                carried is not None and carried.status == "sleeping",
                P.CLAIM_CARRIES_STEPS,
                f"the woken run carries {dict(again.steps)}",
            )
            # The same sleep reached again (a replay after the wake-up) keeps its
            # deadline, even when asked for a long one: the run sleeps once.
            second = await other.sleep_run(again.lease, "nap", NAP)
            promise(
                _close(second, wake_at),
                P.DEADLINE_FIXED,
                f"first wake_at {wake_at}, the same sleep again gave {second}",
            )
            run = await _run(s, held.run_id)
            promise(
                run.status == "sleeping" and _close(run.wake_at, wake_at),
                P.DEADLINE_FIXED,
                f"run {run.status!r} until {run.wake_at}, expected until {wake_at}",
            )
            step = await _step(s, held.run_id, "nap")
            promise(
                step is not None and _close(step.wake_at, wake_at),
                P.DEADLINE_FIXED,
                f"step record {step!r}",
            )
            third = await s.claim_runs([wf], 10, reflow.long_lease)
            promise(
                [c.run.id for c in third] == [held.run_id],
                P.DUE_CLAIMABLE,
                f"a sleep whose fixed deadline has passed: claimed {third}",
            )

        reflow.run(body)

    def test_a_zero_sleep_is_claimable_at_once(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await _hold(s, wf)
            wake_at = await s.sleep_run(held.lease, "nap", timedelta(0))
            promise(
                held.deadline_ok(wake_at, timedelta(0)),
                P.DEADLINE_FROM_DURATION,
                f"slept 0 from about {held.storage_now}, wake_at {wake_at}",
            )
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(not beat, P.PAUSE_DROPS_LEASE, "heartbeat accepted after sleep_run")
            other = await reflow.open()
            claimed = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(
                [c.run.id for c in claimed] == [held.run_id],
                P.DUE_CLAIMABLE,
                f"a zero sleep: claimed {claimed}",
            )

        reflow.run(body)

    def test_a_sleep_replaces_a_record_of_another_status(self, reflow: Harness) -> None:
        wf = reflow.unique()
        records = [
            StepRecord("nap", "failed", error=codec.encode("boom"), wake_at=_LONG_AGO),
            StepRecord("nap", "waiting", wake_at=_LONG_AGO),
        ]

        async def body(s: Storage) -> None:
            for record in records:
                await create(s, wf, record.status)
                held = await _hold(s, wf)
                saved = await s.save_step_result(held.lease, record, reflow.long_lease)
                promise(saved, P.LIVE_LEASE_ACCEPTED, "save_step_result refused a live lease")
                wake_at = await s.sleep_run(held.lease, "nap", NAP)
                promise(
                    held.deadline_ok(wake_at, NAP),
                    P.PAUSE_REPLACES_RECORD,
                    f"over a {record.status} record: wake_at {wake_at}",
                )
                step = await _step(s, held.run_id, "nap")
                promise(
                    step is not None
                    and step.status == "sleeping"
                    and _close(step.wake_at, wake_at)
                    and step.error is None,
                    P.PAUSE_REPLACES_RECORD,
                    f"over a {record.status} record: step {step!r}",
                )
                await _unclaimable(reflow, [s], wf, f"a sleeper that had a {record.status} record")

        reflow.run(body)


class TestWait:
    def test_a_wait_with_nothing_buffered_holds_no_lease(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await _hold(s, wf)
            # An event of another name does not satisfy the wait.
            await s.deliver_event(held.run_id, "other", codec.encode("not it"))
            result = await s.wait_run(held.lease, "hold", "approve", NAP)
            promise(result is not None, P.LIVE_LEASE_ACCEPTED, "wait_run refused a live lease")
            assert result is not None
            promise(not result.ready, P.EVENT_ISOLATION, "ready without an 'approve' event")
            promise(
                held.deadline_ok(result.deadline, NAP),
                P.DEADLINE_FROM_DURATION,
                f"waited {NAP} from about {held.storage_now}, deadline {result.deadline}",
            )
            run = await _run(s, held.run_id)
            promise(
                (run.status, run.waiting_for) == ("waiting", "approve")
                and _close(run.wake_at, result.deadline),
                P.PAUSE_RECORDED,
                f"run {run.status!r} for {run.waiting_for!r} until {run.wake_at}, "
                f"deadline {result.deadline}",
            )
            step = await _step(s, held.run_id, "hold")
            promise(
                step is not None
                and step.status == "waiting"
                and _close(step.wake_at, result.deadline),
                P.PAUSE_RECORDED,
                f"step record {step!r}, deadline {result.deadline}",
            )
            other = await reflow.open()
            await _unclaimable(reflow, [s, other], wf, "a run waiting for 30 minutes")
            await s.deliver_event(held.run_id, STALE_EVENT, codec.encode("x"))
            accepted = await fenced_writes(s, held.lease)
            promise(accepted == [], P.PAUSE_DROPS_LEASE, f"the waiter's lease still did {accepted}")
            after = await _run(s, held.run_id)
            promise(
                after.status == "waiting" and _close(after.wake_at, result.deadline),
                P.PAUSE_DROPS_LEASE,
                f"the old lease changed the waiting run: {after}",
            )
            await _unclaimable(reflow, [other], wf, "a waiter after stale writes")

        reflow.run(body)

    def test_a_wait_without_timeout_has_no_deadline(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await _hold(s, wf)
            result = await s.wait_run(held.lease, "hold", "approve", None)
            promise(
                result is not None and not result.ready and result.deadline is None,
                P.PAUSE_RECORDED,
                f"a wait without timeout returned {result}",
            )
            run = await _run(s, held.run_id)
            promise(
                (run.status, run.waiting_for, run.wake_at) == ("waiting", "approve", None),
                P.PAUSE_RECORDED,
                f"run {run.status!r} for {run.waiting_for!r} until {run.wake_at}",
            )
            step = await _step(s, held.run_id, "hold")
            promise(
                step is not None and step.status == "waiting" and step.wake_at is None,
                P.PAUSE_RECORDED,
                f"step record {step!r}",
            )
            await _unclaimable(reflow, [s], wf, "a run waiting without timeout")
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(not beat, P.PAUSE_DROPS_LEASE, "heartbeat accepted after wait_run")

        reflow.run(body)

    def test_a_wait_for_a_buffered_event_keeps_the_lease(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await _hold(s, wf)
            delivered = await s.deliver_event(held.run_id, "approve", codec.encode({"ok": 1}))
            promise(delivered, P.EVENT_BUFFERED, "deliver_event to a running run returned False")
            result = await s.wait_run(held.lease, "hold", "approve", NAP)
            promise(
                result is not None and result.ready,
                P.EVENT_BEFORE_WAIT,
                f"a wait for a buffered event returned {result}",
            )
            assert result is not None
            promise(
                held.deadline_ok(result.deadline, NAP),
                P.DEADLINE_FROM_DURATION,
                f"waited {NAP} from about {held.storage_now}, deadline {result.deadline}",
            )
            run = await _run(s, held.run_id)
            promise(
                run.status == "running" and run.lease_epoch == held.lease.epoch,
                P.WAIT_READY_KEEPS_LEASE,
                f"run {run.status!r} at epoch {run.lease_epoch}, lease epoch {held.lease.epoch}",
            )
            other = await reflow.open()
            stolen = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(stolen == [], P.ONE_LIVE_LEASE, f"claimed a run still held: {stolen}")
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(beat, P.WAIT_READY_KEEPS_LEASE, "heartbeat refused after a ready wait")
            step = StepRecord("after", "completed", output=codec.encode(2))
            saved = await s.save_step_result(held.lease, step, reflow.long_lease)
            promise(saved, P.WAIT_READY_KEEPS_LEASE, "save_step_result refused after a ready wait")
            taken = await s.take_event(held.lease, "hold", "approve")
            promise(
                taken is not None and taken.found and decoded(taken.payload) == {"ok": 1},
                P.EVENT_BEFORE_WAIT,
                f"take after a ready wait returned {taken}",
            )

        reflow.run(body)

    def test_a_wait_times_out_once_due_and_its_deadline_is_fixed(self, reflow: Harness) -> None:
        wf = reflow.unique()
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await _hold(s, wf)
            first = await s.wait_run(held.lease, "hold", "approve", short)
            promise(
                first is not None and not first.ready and first.deadline is not None,
                P.PAUSE_RECORDED,
                f"a wait with a timeout returned {first}",
            )
            assert first is not None
            await reflow.lapse(short)
            other = await reflow.open()
            claimed = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(
                [c.run.id for c in claimed] == [held.run_id],
                P.DUE_CLAIMABLE,
                f"a wait whose timeout of {short} is over: claimed {claimed}",
            )
            again = claimed[0]
            promise(
                again.run.waiting_for == "approve" and again.run.wake_at is None,
                P.CLAIMED_RUNNING,
                f"a claimed waiter has waiting_for {again.run.waiting_for!r} "
                f"and wake_at {again.run.wake_at} (waiting_for is kept, wake_at cleared)",
            )
            second = await other.wait_run(again.lease, "hold", "approve", NAP)
            promise(
                second is not None and not second.ready and _close(second.deadline, first.deadline),
                P.DEADLINE_FIXED,
                f"first deadline {first.deadline}, the same wait again gave {second}",
            )
            third = await s.claim_runs([wf], 10, reflow.long_lease)
            promise(
                [c.run.id for c in third] == [held.run_id],
                P.DUE_CLAIMABLE,
                f"a wait whose fixed deadline has passed: claimed {third}",
            )

        reflow.run(body)

    def test_a_wait_deadline_is_fixed_across_re_waits(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await _hold(s, wf)
            first = await s.wait_run(held.lease, "hold", "approve", NAP)
            promise(first is not None, P.LIVE_LEASE_ACCEPTED, "wait_run refused a live lease")
            assert first is not None
            await s.deliver_event(held.run_id, "approve", codec.encode("yes"))
            woken = await claim_one(s, wf, name=P.EVENT_WAKES)
            second = await s.wait_run(woken.lease, "hold", "approve", NAP * 2)
            promise(
                second is not None and second.ready,
                P.EVENT_WAKES,
                f"the wait after its event arrived returned {second}",
            )
            assert second is not None
            promise(
                _close(second.deadline, first.deadline),
                P.DEADLINE_FIXED,
                f"first deadline {first.deadline}, the same wait again gave {second.deadline}",
            )
            third = await s.wait_run(woken.lease, "hold", "approve", None)
            promise(
                third is not None and _close(third.deadline, first.deadline),
                P.DEADLINE_FIXED,
                f"first deadline {first.deadline}, a wait without timeout gave {third}",
            )
            step = await _step(s, held.run_id, "hold")
            promise(
                step is not None and _close(step.wake_at, first.deadline),
                P.DEADLINE_FIXED,
                f"step record {step!r}",
            )

        reflow.run(body)

    def test_a_wait_replaces_a_record_of_another_status(self, reflow: Harness) -> None:
        wf = reflow.unique()
        records = [
            StepRecord("hold", "failed", error=codec.encode("boom"), wake_at=_LONG_AGO),
            StepRecord("hold", "sleeping", wake_at=_LONG_AGO),
        ]

        async def body(s: Storage) -> None:
            for record in records:
                await create(s, wf, record.status)
                held = await _hold(s, wf)
                await s.save_step_result(held.lease, record, reflow.long_lease)
                result = await s.wait_run(held.lease, "hold", "approve", NAP)
                promise(
                    result is not None and held.deadline_ok(result.deadline, NAP),
                    P.PAUSE_REPLACES_RECORD,
                    f"over a {record.status} record: {result}",
                )
                assert result is not None
                step = await _step(s, held.run_id, "hold")
                promise(
                    step is not None
                    and step.status == "waiting"
                    and _close(step.wake_at, result.deadline)
                    and step.error is None,
                    P.PAUSE_REPLACES_RECORD,
                    f"over a {record.status} record: step {step!r}",
                )
                await _unclaimable(reflow, [s], wf, f"a waiter that had a {record.status} record")

        reflow.run(body)
