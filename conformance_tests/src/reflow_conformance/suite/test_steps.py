"""Step results: saving and overwriting them, finishing a run with its last
step in one write, and requeueing failed or cancelled runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import RunRecord, StepRecord, Storage

from ._util import claim_one, claim_only, create, decoded, read_run, step_differences

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestFinishRun", "TestRequeue", "TestSaveStep"]

_LONG_AGO = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)


async def _run(storage: Storage, run_id: str) -> RunRecord:
    return await read_run(storage, run_id)


async def _check_steps(
    storage: Storage, run_id: str, expected: list[StepRecord], name: str = P.STEP_SAVED
) -> None:
    """The run's saved steps are exactly ``expected``, field by field, or
    promise ``name`` is broken."""
    stored = await storage.get_step_results(run_id)
    promise(
        set(stored) == {step.name for step in expected},
        name,
        f"saved {sorted(stored)}, expected {sorted(step.name for step in expected)}",
    )
    for step in expected:
        diff = step_differences(stored.get(step.name), step)
        promise(not diff, name, f"{step.name!r}: " + "; ".join(diff))


class TestSaveStep:
    def test_a_saved_step_reads_back_as_written(self, reflow: Harness) -> None:
        wf = reflow.unique()
        steps = [
            StepRecord("fetch", "completed", output=codec.encode({"rows": [1, 2.5, "x"]})),
            StepRecord("charge", "failed", error=codec.encode({"type": "Declined"}), attempts=3),
            StepRecord("notify", "skipped", attempts=2),
            StepRecord("empty", "completed", output=codec.encode(None), completed_at=_LONG_AGO),
        ]

        async def body(s: Storage) -> None:
            created = (await create(s, wf)).run
            held = await claim_one(s, wf)
            for step in steps:
                saved = await s.save_step_result(held.lease, step, reflow.long_lease)
                promise(saved, P.LIVE_LEASE_ACCEPTED, f"save of {step.name!r} refused")
            await _check_steps(s, created.id, steps)
            stored = await s.get_step_results(created.id)
            for step in stored.values():
                stamp = step.completed_at
                promise(
                    stamp is not None
                    and stamp.utcoffset() == timedelta(0)
                    and stamp > created.created_at - timedelta(seconds=5),
                    P.STEP_SAVED,
                    f"{step.name!r}: completed_at {stamp!r} is not the time it was stored",
                )

        reflow.run(body)

    def test_saving_a_step_again_overwrites_it(self, reflow: Harness) -> None:
        wf = reflow.unique()
        other = StepRecord("other", "completed", output=codec.encode("untouched"))
        failed = StepRecord("charge", "failed", error=codec.encode("timeout"), attempts=1)
        retried = StepRecord("charge", "completed", output=codec.encode({"id": 7}), attempts=2)

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            for step in (other, failed, retried):
                saved = await s.save_step_result(held.lease, step, reflow.long_lease)
                promise(saved, P.LIVE_LEASE_ACCEPTED, f"save of {step.name!r} refused")
            await _check_steps(s, run_id, [other, retried])

        reflow.run(body)


class TestFinishRun:
    def test_finish_completed_stores_the_last_step_and_the_output(self, reflow: Harness) -> None:
        wf = reflow.unique()
        first = StepRecord("first", "completed", output=codec.encode(1))
        last = StepRecord("last", "completed", output=codec.encode([2, 3]), attempts=2)

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            await s.save_step_result(held.lease, first, reflow.long_lease)
            done = await s.finish_run(
                held.lease, "completed", output=codec.encode({"total": 5}), step=last
            )
            promise(done, P.LIVE_LEASE_ACCEPTED, "finish_run with a live lease refused")
            run = await _run(s, run_id)
            promise(run.status == "completed", P.FINISH_ATOMIC, f"status {run.status!r}")
            promise(decoded(run.output) == {"total": 5}, P.FINISH_ATOMIC, f"output {run.output!r}")
            promise(run.error is None, P.FINISH_ATOMIC, f"error {run.error!r}")
            await _check_steps(s, run_id, [first, last], P.FINISH_ATOMIC)

        reflow.run(body)

    def test_finish_failed_stores_the_failed_step_and_the_error(self, reflow: Harness) -> None:
        wf = reflow.unique()
        error = {"type": "StepError", "step": "charge", "attempts": 3}
        last = StepRecord("charge", "failed", error=codec.encode({"type": "Declined"}), attempts=3)

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            done = await s.finish_run(held.lease, "failed", error=codec.encode(error), step=last)
            promise(done, P.LIVE_LEASE_ACCEPTED, "finish_run with a live lease refused")
            run = await _run(s, run_id)
            promise(run.status == "failed", P.FINISH_ATOMIC, f"status {run.status!r}")
            promise(decoded(run.error) == error, P.FINISH_ATOMIC, f"error {run.error!r}")
            promise(run.output is None, P.FINISH_ATOMIC, f"output {run.output!r}")
            await _check_steps(s, run_id, [last], P.FINISH_ATOMIC)

        reflow.run(body)

    def test_finish_without_a_step_leaves_the_steps(self, reflow: Harness) -> None:
        wf = reflow.unique()
        first = StepRecord("first", "completed", output=codec.encode("a"))

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            await s.save_step_result(held.lease, first, reflow.long_lease)
            done = await s.finish_run(held.lease, "completed", output=codec.encode(None))
            promise(done, P.LIVE_LEASE_ACCEPTED, "finish_run with a live lease refused")
            run = await _run(s, run_id)
            promise(run.status == "completed", P.FINISH_ATOMIC, f"status {run.status!r}")
            await _check_steps(s, run_id, [first], P.FINISH_ATOMIC)

        reflow.run(body)

    def test_a_finished_run_has_no_lease_left(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            await s.finish_run(held.lease, "completed", output=codec.encode(1))
            finished = await _run(s, run_id)
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(not beat, P.STALE_LEASE_REFUSED, "heartbeat accepted on a finished run")
            step = StepRecord("late", "completed")
            late = await s.save_step_result(held.lease, step, reflow.long_lease)
            promise(not late, P.STALE_LEASE_REFUSED, "step saved on a finished run")
            again = await s.finish_run(held.lease, "failed", error=codec.encode("x"), step=step)
            promise(not again, P.STALE_LEASE_REFUSED, "a finished run was finished again")
            changed = await _run(s, run_id) != finished
            promise(not changed, P.STALE_LEASE_REFUSED, "refused writes changed the finished run")
            promise(await s.get_step_results(run_id) == {}, P.STALE_LEASE_REFUSED, "step saved")
            claimed = await s.claim_runs([wf], 10, reflow.long_lease)
            promise(claimed == [], P.TERMINAL_STAYS, f"claimed a finished run: {claimed}")

        reflow.run(body)


class TestRequeue:
    def test_requeue_a_failed_run(self, reflow: Harness) -> None:
        wf = reflow.unique()
        done = StepRecord("a", "completed", output=codec.encode({"k": 1}), attempts=2)
        skipped = StepRecord("b", "skipped")
        broken = StepRecord("c", "failed", error=codec.encode("boom"), attempts=3)

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            first = await claim_one(s, wf, reflow.short_lease)
            for step in (done, skipped):
                await s.save_step_result(first.lease, step, reflow.short_lease)
            await reflow.lapse()
            other = await reflow.open()
            second = await claim_only(other, wf, P.RECLAIM_AFTER_LAPSE)
            promise(second.run.reclaims == 1, P.RECLAIM_AFTER_LAPSE, f"{second.run}")
            ended = await other.finish_run(
                second.lease, "failed", error=codec.encode({"type": "StepError"}), step=broken
            )
            promise(ended, P.LIVE_LEASE_ACCEPTED, "finish_run with a live lease refused")
            requeued = await s.requeue_run(run_id)
            promise(requeued, P.REQUEUE, "requeue of a failed run returned False")
            run = await _run(s, run_id)
            promise(
                (run.status, run.error, run.reclaims) == ("pending", None, 0),
                P.REQUEUE,
                f"status {run.status!r}, error {run.error!r}, reclaims {run.reclaims}",
            )
            await _check_steps(s, run_id, [done, skipped], P.REQUEUE)
            again = await claim_only(s, wf, P.REQUEUE)
            promise(not again.reclaimed, P.REQUEUE, "the claim after a requeue is a reclaim")
            promise(set(again.steps) == {"a", "b"}, P.REQUEUE, f"{dict(again.steps)}")

        reflow.run(body)

    def test_requeue_a_cancelled_run(self, reflow: Harness) -> None:
        wf = reflow.unique()
        done = StepRecord("a", "completed", output=codec.encode("kept"))
        broken = StepRecord("c", "failed", error=codec.encode("boom"))

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            for step in (done, broken):
                await s.save_step_result(held.lease, step, reflow.long_lease)
            await s.update_run_status(run_id, "cancelled", error=codec.encode("stop"))
            requeued = await s.requeue_run(run_id)
            promise(requeued, P.REQUEUE, "requeue of a cancelled run returned False")
            run = await _run(s, run_id)
            promise(
                (run.status, run.error) == ("pending", None),
                P.REQUEUE,
                f"status {run.status!r}, error {run.error!r}",
            )
            await _check_steps(s, run_id, [done], P.REQUEUE)
            again = await claim_only(s, wf, P.REQUEUE)
            promise(again.run.id == run_id, P.REQUEUE, "the requeued run is not claimable")

        reflow.run(body)

    def test_requeue_refuses_runs_that_did_not_fail(self, reflow: Harness) -> None:
        wf = reflow.unique()
        step = StepRecord("a", "failed", error=codec.encode("kept while not requeued"))

        async def body(s: Storage) -> None:
            pending = (await create(s, wf)).run.id
            ids = [(await create(s, wf, i)).run.id for i in range(4)]
            claimed = {c.run.id: c for c in await s.claim_runs([wf], 10, reflow.long_lease)}
            promise(len(claimed) == 5, P.NO_LOST_RUNS, f"claimed {len(claimed)} of 5")
            pending_again = claimed.pop(pending)
            await s.update_run_status(pending, "pending", lease=pending_again.lease)
            running, completed, sleeping, waiting = (claimed[run_id] for run_id in ids)
            for held in claimed.values():
                await s.save_step_result(held.lease, step, reflow.long_lease)
            await s.finish_run(completed.lease, "completed", output=codec.encode(1))
            await s.sleep_run(sleeping.lease, "nap", reflow.long_lease)
            await s.wait_run(waiting.lease, "hold", "never-sent", reflow.long_lease)
            for run_id in (pending, *ids):
                before = await _run(s, run_id)
                steps = await s.get_step_results(run_id)
                requeued = await s.requeue_run(run_id)
                promise(not requeued, P.REQUEUE_ONLY_ENDED, f"requeued a {before.status} run")
                promise(await _run(s, run_id) == before, P.REQUEUE_ONLY_ENDED, f"{before.status}")
                after = await s.get_step_results(run_id)
                promise(after == steps, P.REQUEUE_ONLY_ENDED, f"{before.status}: {sorted(after)}")
            missing = reflow.unique("run")
            promise(not await s.requeue_run(missing), P.REQUEUE_ONLY_ENDED, "missing run")
            promise(await s.get_run(missing) is None, P.MISSING_IS_NONE, "requeue made a run")
            beat = await s.heartbeat_run(running.lease, reflow.long_lease)
            promise(beat, P.REQUEUE_ONLY_ENDED, "requeue broke a running run's lease")

        reflow.run(body)
