"""Fenced writes racing the operations that take a run away from its holder.

A fence must be checked in the same atomic step as the write it guards. An
adapter that checks it in one round trip and writes in the next lets a cancel,
a requeue or a reclaim land in between, and then both sides report success:
the cancel is lost, or two workers hold the run. Each test starts many such
races at once on two connections, half of them with the fenced write sent
first and half with the other side sent first, and checks every outcome
against the orders a correct store may have chosen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import ClaimedRun, Lease, StepRecord, Storage

from ._util import LONG, create, read_run

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestFencedWriteRaces"]

PAIRS = 50
"""Races per test, all in flight at once."""

_Write = Callable[[Storage, Lease], Awaitable[bool]]


async def _finish(s: Storage, lease: Lease) -> bool:
    last = StepRecord("last", "completed", output=codec.encode("last"))
    return await s.finish_run(lease, "completed", output=codec.encode("done"), step=last)


async def _save(s: Storage, lease: Lease) -> bool:
    step = StepRecord("step", "completed", output=codec.encode("saved"))
    return await s.save_step_result(lease, step, LONG)


async def _heartbeat(s: Storage, lease: Lease) -> bool:
    return await s.heartbeat_run(lease, LONG)


async def _sleep(s: Storage, lease: Lease) -> bool:
    return await s.sleep_run(lease, "nap", LONG) is not None


async def _wait(s: Storage, lease: Lease) -> bool:
    return await s.wait_run(lease, "approval", "approved", LONG) is not None


_WRITES: dict[str, _Write] = {
    "finish_run": _finish,
    "save_step_result": _save,
    "heartbeat_run": _heartbeat,
    "sleep_run": _sleep,
    "wait_run": _wait,
}


async def _race(
    pairs: list[tuple[Awaitable[object], Awaitable[object]]],
) -> list[tuple[object, object]]:
    """Run every pair at once, the fenced write first in even pairs and last
    in odd ones; each pair's results as (fenced write, other side)."""
    calls: list[Awaitable[object]] = []
    for i, (write, other) in enumerate(pairs):
        calls.extend((write, other) if i % 2 == 0 else (other, write))
    results = await asyncio.gather(*calls)
    outcomes = []
    for i in range(len(pairs)):
        first, second = results[2 * i], results[2 * i + 1]
        outcomes.append((first, second) if i % 2 == 0 else (second, first))
    return outcomes


def _order(i: int) -> str:
    return "fenced write sent first" if i % 2 == 0 else "fenced write sent second"


async def _claim_all(reflow: Harness, s: Storage, workflows: list[str]) -> list[ClaimedRun]:
    """Create a run of each workflow given (repeats make several) and claim
    them all; the claims in the order of ``workflows``."""
    for wf in workflows:
        await create(s, wf)
    claimed = await s.claim_runs(sorted(set(workflows)), len(workflows), reflow.long_lease)
    promise(
        len(claimed) == len(workflows),
        P.NEW_RUN_CLAIMABLE,
        f"claimed {len(claimed)} of {len(workflows)} new runs",
    )
    return sorted(claimed, key=lambda c: workflows.index(c.run.workflow))


class TestFencedWriteRaces:
    @pytest.mark.parametrize("operation", sorted(_WRITES))
    def test_a_fenced_write_racing_a_cancel_never_undoes_it(
        self, reflow: Harness, operation: str
    ) -> None:
        """Whatever the order, a cancel that reported success leaves the run
        cancelled, holding no lease; a finish that reported success means the
        cancel found the run finished and reported failure."""
        wf = reflow.unique()
        write = _WRITES[operation]

        async def body(s: Storage) -> None:
            other = await reflow.open()
            held = await _claim_all(reflow, s, [wf] * PAIRS)
            reason = codec.encode({"type": "Cancelled", "message": "racing"})
            outcomes = await _race(
                [
                    (
                        write(s, c.lease),
                        other.update_run_status(c.run.id, "cancelled", error=reason),
                    )
                    for c in held
                ]
            )
            for i, (c, (wrote, cancelled)) in enumerate(zip(held, outcomes, strict=True)):
                run = await read_run(other, c.run.id)
                seen = (
                    f"race {i} ({_order(i)}): {operation} returned {wrote}, cancel returned "
                    f"{cancelled}; the run is {run.status!r}, lease_expires_at "
                    f"{run.lease_expires_at}"
                )
                if operation == "finish_run":
                    promise(
                        bool(wrote) != bool(cancelled),
                        P.FENCE_RACES_CANCEL,
                        f"not one winner: {seen}",
                    )
                else:
                    promise(cancelled, P.CANCEL, f"cancelling a run that was not finished: {seen}")
                if cancelled:
                    promise(
                        run.status == "cancelled" and run.lease_expires_at is None,
                        P.FENCE_RACES_CANCEL,
                        f"the write landed after the cancel: {seen}",
                    )
                else:
                    promise(run.status == "completed", P.FENCE_RACES_CANCEL, seen)

        reflow.run(body)

    def test_a_finish_racing_a_cancel_and_requeue_never_undoes_them(self, reflow: Harness) -> None:
        """Another connection cancels the run and requeues it while its holder
        finishes it: either the finish lands first (and neither the cancel nor
        the requeue applies), or it is refused and the run is pending again."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            other = await reflow.open()
            held = await _claim_all(reflow, s, [wf] * PAIRS)

            async def cancel_and_requeue(run_id: str) -> tuple[bool, bool]:
                cancelled = await other.update_run_status(run_id, "cancelled")
                return cancelled, await other.requeue_run(run_id)

            outcomes = await _race(
                [(_finish(s, c.lease), cancel_and_requeue(c.run.id)) for c in held]
            )
            for i, (c, (finished, other_side)) in enumerate(zip(held, outcomes, strict=True)):
                assert isinstance(other_side, tuple)
                cancelled, requeued = other_side
                run = await read_run(other, c.run.id)
                seen = (
                    f"race {i} ({_order(i)}): finish_run returned {finished}, cancel {cancelled}, "
                    f"requeue {requeued}; the run is {run.status!r}"
                )
                promise(
                    bool(finished) != bool(cancelled),
                    P.FENCE_RACES_CANCEL,
                    f"not one winner: {seen}",
                )
                promise(requeued == cancelled, P.REQUEUE_ONLY_ENDED, seen)
                expected = "pending" if requeued else "completed"
                promise(
                    run.status == expected,
                    P.FENCE_RACES_CANCEL,
                    f"the run should be {expected!r}: {seen}",
                )

        reflow.run(body)

    def test_a_finish_racing_a_reclaim_has_one_winner(self, reflow: Harness) -> None:
        """The holder's lease lapses (a heartbeat of zero length ends it now)
        and another claimer reclaims the run while the holder's finish_run is
        in flight: either the finish lands first and the claim finds nothing,
        or the reclaim takes the run and the finish is refused."""
        workflows = [reflow.unique() for _ in range(PAIRS)]

        async def body(s: Storage) -> None:
            other = await reflow.open()
            held = await _claim_all(reflow, s, workflows)

            async def lapse_and_reclaim(c: ClaimedRun) -> list[ClaimedRun]:
                await other.heartbeat_run(c.lease, timedelta(0))
                return await other.claim_runs([c.run.workflow], 1, reflow.long_lease)

            outcomes = await _race([(_finish(s, c.lease), lapse_and_reclaim(c)) for c in held])
            for i, (c, (finished, claims)) in enumerate(zip(held, outcomes, strict=True)):
                assert isinstance(claims, list)
                run = await read_run(other, c.run.id)
                seen = (
                    f"race {i} ({_order(i)}): finish_run returned {finished}, the claim took "
                    f"{[(x.run.id, x.lease.epoch) for x in claims]}; the run is {run.status!r} "
                    f"under epoch {run.lease_epoch} (the holder's was {c.lease.epoch})"
                )
                promise(not (finished and claims), P.FENCE_RACES_RECLAIM, f"both won: {seen}")
                if finished:
                    promise(run.status == "completed", P.FENCE_RACES_RECLAIM, seen)
                elif claims:
                    promise(
                        run.status == "running" and run.lease_epoch == c.lease.epoch + 1,
                        P.FENCE_RACES_RECLAIM,
                        f"the reclaimed run is not held by its new lease: {seen}",
                    )

        reflow.run(body)
