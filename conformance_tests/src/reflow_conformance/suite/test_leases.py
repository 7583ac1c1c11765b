"""Leases and fencing: heartbeats, reclaims after a lapse, refused writes from
lost leases, handing a run back, cancelling it, and terminal runs staying put."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.errors import ConfigError
from reflow_core.storage import Lease, StepRecord, Storage

from ._util import LONG, STALE_EVENT, claim_one, claim_only, create, fenced_writes, read_run

pytestmark = pytest.mark.reflow_conformance

_ENDINGS: tuple[Literal["cancelled", "failed"], ...] = ("cancelled", "failed")

__all__ = [
    "TestCancel",
    "TestFencing",
    "TestHandBack",
    "TestHeartbeat",
    "TestReclaim",
    "TestStatusUpdateArguments",
    "TestTerminalRuns",
]


class TestHeartbeat:
    def test_a_heartbeat_extends_a_live_lease(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await claim_one(s, wf, reflow.short_lease)
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(beat, P.LIVE_LEASE_ACCEPTED, "heartbeat of a fresh lease refused")
            run = await read_run(s, held.run.id)
            before, after = held.run.lease_expires_at, run.lease_expires_at
            promise(
                before is not None and after is not None and after > before,
                P.HEARTBEAT_EXTENDS,
                f"lease_expires_at {before} -> {after}",
            )
            await reflow.lapse()
            other = await reflow.open()
            stolen = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(stolen == [], P.HEARTBEAT_EXTENDS, "claimed after its lease was extended")
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(beat, P.HEARTBEAT_EXTENDS, "the extended lease was lost")

        reflow.run(body)

    def test_regular_heartbeats_keep_a_run_held(self, reflow: Harness) -> None:
        wf = reflow.unique()
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            await create(s, wf)
            other = await reflow.open()
            held = await claim_one(s, wf, short)
            for beat in range(7):  # every third of a lease, for more than two leases
                await asyncio.sleep(short.total_seconds() / 3)
                alive = await s.heartbeat_run(held.lease, short)
                promise(alive, P.HEARTBEAT_EXTENDS, f"heartbeat {beat + 1} refused")
                stolen = await other.claim_runs([wf], 10, reflow.long_lease)
                promise(stolen == [], P.ONE_LIVE_LEASE, f"claimed after heartbeat {beat + 1}")

        reflow.run(body)

    def test_saving_a_step_renews_the_lease(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await claim_one(s, wf, reflow.short_lease)
            step = StepRecord("a", "completed", output=codec.encode(1))
            saved = await s.save_step_result(held.lease, step, reflow.long_lease)
            promise(saved, P.LIVE_LEASE_ACCEPTED, "save with a fresh lease refused")
            await reflow.lapse()
            other = await reflow.open()
            stolen = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(stolen == [], P.SAVE_EXTENDS, "claimed after a save renewed its lease")
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(beat, P.SAVE_EXTENDS, "the renewed lease was lost")

        reflow.run(body)


class TestReclaim:
    def test_a_lapsed_lease_is_reclaimed(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            first = await claim_one(s, wf, reflow.short_lease)
            step = StepRecord("before", "completed", output=codec.encode("kept"))
            saved = await s.save_step_result(first.lease, step, reflow.short_lease)
            promise(saved, P.LIVE_LEASE_ACCEPTED, "save with a fresh lease refused")
            await reflow.lapse()
            other = await reflow.open()
            claimed = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(len(claimed) == 1, P.RECLAIM_AFTER_LAPSE, f"claimed {len(claimed)} runs")
            again = claimed[0]
            run = again.run
            promise(
                run.id == first.run.id and again.reclaimed,
                P.RECLAIM_AFTER_LAPSE,
                f"reclaimed={again.reclaimed}",
            )
            promise(
                (run.status, run.attempts, run.reclaims) == ("running", 2, 1),
                P.RECLAIM_AFTER_LAPSE,
                f"status {run.status!r}, attempts {run.attempts}, reclaims {run.reclaims}",
            )
            promise(
                again.lease.epoch == run.lease_epoch == first.lease.epoch + 1,
                P.CLAIM_COUNTS,
                f"epoch {first.lease.epoch} -> lease {again.lease}, run {run.lease_epoch}",
            )
            promise(
                set(again.steps) == {"before"}, P.CLAIM_CARRIES_STEPS, f"steps {dict(again.steps)}"
            )

        reflow.run(body)


def _step(name: str, value: object) -> StepRecord:
    return StepRecord(name, "completed", output=codec.encode(value))


class TestFencing:
    def test_a_superseded_lease_is_refused_and_writes_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            old = await claim_one(s, wf, reflow.short_lease)
            await s.deliver_event(run_id, STALE_EVENT, codec.encode({"n": 1}))
            await reflow.lapse()
            other = await reflow.open()
            new = await claim_only(other, wf, P.RECLAIM_AFTER_LAPSE)
            promise(new.reclaimed, P.RECLAIM_AFTER_LAPSE, f"reclaimed={new.reclaimed}")
            run_before = await s.get_run(run_id)
            steps_before = await s.get_step_results(run_id)
            accepted = await fenced_writes(s, old.lease)
            promise(
                not accepted, P.STALE_LEASE_REFUSED, f"accepted from a superseded lease: {accepted}"
            )
            run_after = await s.get_run(run_id)
            promise(
                run_after == run_before,
                P.STALE_LEASE_REFUSED,
                f"refused writes changed the run:\n  {run_before}\n  {run_after}",
            )
            steps_after = await s.get_step_results(run_id)
            promise(
                steps_after == steps_before,
                P.STALE_LEASE_REFUSED,
                f"refused writes changed the steps: {sorted(steps_after)}",
            )
            await _holder_still_works(other, new.lease, reflow)

        reflow.run(body)

    def test_a_superseded_lease_writing_together_with_its_successor_is_refused(
        self, reflow: Harness
    ) -> None:
        # The same run's old and new attempts save and finish at the same
        # moment through one storage, as a worker that reclaimed its own
        # lapsed run while the old attempt still ran would: a backend that
        # groups concurrent writes must still fence each by its lease.
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            old = await claim_one(s, wf, reflow.short_lease)
            await reflow.lapse()
            new = await claim_only(s, wf, P.RECLAIM_AFTER_LAPSE)
            saves = await asyncio.gather(
                s.save_step_result(old.lease, _step("s", "stale"), LONG),
                s.save_step_result(new.lease, _step("s", "live"), LONG),
                s.save_step_result(old.lease, _step("t", "stale"), LONG),
            )
            promise(
                list(saves) == [False, True, False],
                P.STALE_LEASE_REFUSED,
                f"saves from the old, new and old lease, together, answered {saves}",
            )
            steps = await s.get_step_results(run_id)
            outputs = {name: codec.decode(step.output or "null") for name, step in steps.items()}
            promise(
                outputs == {"s": "live"},
                P.STALE_LEASE_REFUSED,
                f"after saves from both leases together the run holds {outputs}",
            )
            ends = await asyncio.gather(
                s.finish_run(old.lease, "failed", error=codec.encode("stale")),
                s.finish_run(new.lease, "completed", output=codec.encode("live")),
            )
            promise(
                list(ends) == [False, True],
                P.STALE_LEASE_REFUSED,
                f"finishes from the old and new lease, together, answered {ends}",
            )
            run = await s.get_run(run_id)
            assert run is not None
            promise(
                (run.status, run.output) == ("completed", codec.encode("live")),
                P.STALE_LEASE_REFUSED,
                f"after finishes from both leases together the run is {run.status} "
                f"with output {run.output}",
            )

        reflow.run(body)

    def test_a_lapsed_lease_is_refused_before_any_reclaim(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            old = await claim_one(s, wf, reflow.short_lease)
            await s.deliver_event(run_id, STALE_EVENT, codec.encode({"n": 1}))
            await reflow.lapse()
            run_before = await s.get_run(run_id)
            accepted = await fenced_writes(s, old.lease)
            promise(
                not accepted, P.STALE_LEASE_REFUSED, f"accepted from a lapsed lease: {accepted}"
            )
            run_after = await s.get_run(run_id)
            promise(
                run_after == run_before,
                P.STALE_LEASE_REFUSED,
                f"refused writes changed the run:\n  {run_before}\n  {run_after}",
            )
            steps = await s.get_step_results(run_id)
            promise(steps == {}, P.STALE_LEASE_REFUSED, f"refused writes saved {sorted(steps)}")
            other = await reflow.open()
            new = await claim_only(other, wf, P.RECLAIM_AFTER_LAPSE)
            promise(
                new.reclaimed and new.run.reclaims == 1,
                P.RECLAIM_AFTER_LAPSE,
                f"reclaimed={new.reclaimed}, reclaims {new.run.reclaims}",
            )
            await _holder_still_works(other, new.lease, reflow)

        reflow.run(body)


async def _holder_still_works(storage: Storage, lease: Lease, reflow: Harness) -> None:
    """The current holder's writes go through, and the event a refused take
    tried to consume is still there."""
    beat = await storage.heartbeat_run(lease, reflow.long_lease)
    promise(beat, P.LIVE_LEASE_ACCEPTED, "the new holder's heartbeat was refused")
    took = await storage.take_event(lease, "take", STALE_EVENT)
    promise(
        took is not None and took.found and codec.decode(took.payload or "null") == {"n": 1},
        P.STALE_LEASE_REFUSED,
        f"the buffered event is gone after a refused take: {took}",
    )
    done = await storage.finish_run(lease, "completed", output=codec.encode("done"))
    promise(done, P.LIVE_LEASE_ACCEPTED, "the new holder's finish_run was refused")
    run = await read_run(storage, lease.run_id)
    promise(run.status == "completed", P.LIVE_LEASE_ACCEPTED, f"status {run.status!r}")


class TestHandBack:
    def test_a_run_handed_back_is_pending_and_claimable(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            step = StepRecord("kept", "completed", output=codec.encode([1]))
            await s.save_step_result(held.lease, step, reflow.long_lease)
            handed = await s.update_run_status(run_id, "pending", lease=held.lease)
            promise(handed, P.HAND_BACK, "hand back with a live lease refused")
            run = await read_run(s, run_id)
            promise(run.status == "pending", P.HAND_BACK, f"status {run.status!r}")
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(not beat, P.STALE_LEASE_REFUSED, "heartbeat accepted after hand back")
            other = await reflow.open()
            claimed = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(len(claimed) == 1, P.HAND_BACK, f"claimed {len(claimed)} runs after hand back")
            again = claimed[0]
            promise(
                not again.reclaimed and again.run.reclaims == 0,
                P.HAND_BACK,
                f"reclaimed={again.reclaimed}, reclaims {again.run.reclaims}",
            )
            promise(
                (again.run.attempts, again.lease.epoch) == (2, held.lease.epoch + 1),
                P.CLAIM_COUNTS,
                f"attempts {again.run.attempts}, epoch {again.lease.epoch}",
            )
            promise(set(again.steps) == {"kept"}, P.CLAIM_CARRIES_STEPS, f"{dict(again.steps)}")

        reflow.run(body)


class TestCancel:
    def test_cancel_ends_a_claimed_run_and_breaks_its_fence(self, reflow: Harness) -> None:
        wf = reflow.unique()
        reason = {"type": "Cancelled", "message": "by an operator"}

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            step = StepRecord("before", "completed", output=codec.encode(1))
            await s.save_step_result(held.lease, step, reflow.long_lease)
            await s.deliver_event(run_id, STALE_EVENT, codec.encode({"n": 1}))
            other = await reflow.open()
            cancelled = await other.update_run_status(
                run_id, "cancelled", error=codec.encode(reason)
            )
            promise(cancelled, P.CANCEL, "cancelling a running run returned False")
            run = await read_run(s, run_id)
            promise(run.status == "cancelled", P.CANCEL, f"status {run.status!r}")
            promise(codec.decode(run.error or "null") == reason, P.ROUND_TRIP, f"{run.error!r}")
            accepted = await fenced_writes(s, held.lease)
            promise(not accepted, P.CANCEL, f"the holder's writes went through: {accepted}")
            promise(await s.get_run(run_id) == run, P.CANCEL, "refused writes changed the run")
            steps = await s.get_step_results(run_id)
            promise(set(steps) == {"before"}, P.CANCEL, f"refused writes saved {sorted(steps)}")

        reflow.run(body)

    def test_cancel_applies_to_any_run_that_is_not_terminal(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            pending = (await create(s, wf)).run.id
            promise(await s.update_run_status(pending, "cancelled"), P.CANCEL, "pending run")
            failed = (await create(s, wf)).run.id
            promise(await s.update_run_status(failed, "failed"), P.CANCEL, "failing a pending run")
            for run_id, status in ((pending, "cancelled"), (failed, "failed")):
                run = await read_run(s, run_id)
                promise(run.status == status, P.CANCEL, f"status {run.status!r}, not {status!r}")
            promise(await s.claim_runs([wf], 10, reflow.long_lease) == [], P.TERMINAL_STAYS)
            missing = reflow.unique("run")
            promise(not await s.update_run_status(missing, "cancelled"), P.MISSING_IS_NONE)
            promise(await s.get_run(missing) is None, P.MISSING_IS_NONE, "cancel created a run")

        reflow.run(body)

    def test_a_terminal_run_cannot_be_cancelled_or_failed(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await claim_one(s, wf)
            finished = await s.finish_run(held.lease, "completed", output=codec.encode("ok"))
            promise(finished, P.LIVE_LEASE_ACCEPTED, "finish_run refused")
            cancelled = (await create(s, wf)).run.id
            await s.update_run_status(cancelled, "cancelled")
            for run_id in (held.run.id, cancelled):
                before = await s.get_run(run_id)
                for status in _ENDINGS:
                    changed = await s.update_run_status(run_id, status, error=codec.encode("x"))
                    promise(
                        not changed, P.TERMINAL_UNCHANGED, f"{status!r} on a terminal run: True"
                    )
                after = await s.get_run(run_id)
                promise(after == before, P.TERMINAL_UNCHANGED, f"{run_id} changed")

        reflow.run(body)


class TestStatusUpdateArguments:
    def test_bad_arguments_raise_config_error_and_change_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            pending = (await create(s, wf)).run.id
            await create(s, wf)
            held = await claim_one(s, wf)
            missing = reflow.unique("run")
            completed: Any = "completed"
            running: Any = "running"
            cases: list[tuple[str, Any, Lease | None]] = [
                (held.run.id, "pending", None),
                (pending, "pending", None),
                (missing, "pending", None),
                (held.run.id, completed, held.lease),
                (held.run.id, completed, None),
                (pending, running, None),
            ]
            before = {run_id: await s.get_run(run_id) for run_id in (pending, held.run.id)}
            for run_id, status, lease in cases:
                shown = f"update_run_status({status!r}, lease={lease})"
                try:
                    await s.update_run_status(run_id, status, lease=lease)
                except ConfigError:
                    pass
                except Exception as exc:
                    promise(False, P.STATUS_UPDATE_ARGS, f"{shown} raised {exc!r}")
                else:
                    promise(False, P.STATUS_UPDATE_ARGS, f"{shown} raised no ConfigError")
            for run_id, run in before.items():
                after = await s.get_run(run_id)
                promise(after == run, P.STATUS_UPDATE_ARGS, f"changed:\n  {run}\n  {after}")
            beat = await s.heartbeat_run(held.lease, reflow.long_lease)
            promise(beat, P.STATUS_UPDATE_ARGS, "the holder lost its lease")

        reflow.run(body)


class TestTerminalRuns:
    def test_a_terminal_run_is_never_claimed_again(self, reflow: Harness) -> None:
        wf = reflow.unique()
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            ids = [(await create(s, wf, i)).run.id for i in range(5)]
            held = {c.run.id: c for c in await s.claim_runs([wf], 4, short)}
            promise(len(held) == 4, P.CLAIM_LIMIT, f"claimed {len(held)} of 4")
            a, b, c, d = held.values()
            done = [
                await s.finish_run(a.lease, "completed", output=codec.encode(1)),
                await s.finish_run(b.lease, "failed", error=codec.encode("no")),
                await s.update_run_status(c.run.id, "cancelled"),
                await s.update_run_status(d.run.id, "failed", lease=d.lease),
            ]
            promise(all(done), P.LIVE_LEASE_ACCEPTED, f"ending runs: {done}")
            (never_claimed,) = set(ids) - set(held)
            await s.update_run_status(never_claimed, "cancelled")
            statuses = {run_id: (await s.get_run(run_id)) for run_id in ids}
            await reflow.lapse()  # long past every lease those runs held
            other = await reflow.open()
            claimed = await other.claim_runs([wf], 10, reflow.long_lease)
            promise(claimed == [], P.TERMINAL_STAYS, f"claimed {[c.run.status for c in claimed]}")
            for run_id, run in statuses.items():
                promise(await s.get_run(run_id) == run, P.TERMINAL_STAYS, f"{run_id} changed")

        reflow.run(body)
