"""Finish hints (:class:`~reflow_core.storage.FinishSource`, optional): a
store that sends them tells its subscribers of every run that ends, however
it ends, so that engines waiting for results elsewhere read it at once.

An adapter that does not implement ``subscribe_finishes`` skips these tests:
its waiters poll, which the rest of the suite covers."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import FinishSource, NewRun, StepRecord, Storage, WakeupSubscription

from ._util import LONG, claim_one, create

pytestmark = [pytest.mark.reflow_conformance]

__all__ = ["TestFinishHints"]

_WITHIN = 5.0
"""Seconds a hint may take (the promise's bound)."""


class _Hints:
    """What one subscriber was told: every id named, and when it was last
    told to look at everything (a count of ``notify(None)`` calls)."""

    def __init__(self) -> None:
        self.named: set[str] = set()
        self.everything = 0
        self.changed = asyncio.Event()

    def __call__(self, run_ids: Collection[str] | None) -> None:
        if run_ids is None:
            self.everything += 1
        else:
            self.named.update(run_ids)
        self.changed.set()

    async def told(self, run_ids: Collection[str], everything_before: int) -> bool:
        """Wait until every id of ``run_ids`` was named, or ``notify(None)``
        came after ``everything_before`` such calls; False after the bound."""
        loop = asyncio.get_running_loop()
        until = loop.time() + _WITHIN
        while not (set(run_ids) <= self.named or self.everything > everything_before):
            self.changed.clear()
            left = until - loop.time()
            if left <= 0:
                return False
            try:
                async with asyncio.timeout(left):
                    await self.changed.wait()
            except TimeoutError:
                return False
        return True


async def _subscribed(s: Storage, wf: str) -> tuple[_Hints, WakeupSubscription]:
    """A live subscription: ended probe runs until one is named, so that the
    ends the test makes next are not lost to a connection still being made."""
    if not isinstance(s, FinishSource):
        pytest.skip("the adapter sends no finish hints (FinishSource is optional)")
    hints = _Hints()
    subscription = await s.subscribe_finishes(hints)
    loop = asyncio.get_running_loop()
    until = loop.time() + _WITHIN
    while loop.time() < until:
        probe = await claim_one(s, wf) if await create(s, wf, "probe") else None
        assert probe is not None
        await s.finish_run(probe.lease, "completed", output=codec.encode("probe"))
        try:
            async with asyncio.timeout(0.5):
                while probe.run.id not in hints.named:
                    hints.changed.clear()
                    await hints.changed.wait()
            return hints, subscription
        except TimeoutError:
            continue
    await subscription.close()
    promise(False, P.FINISH_HINTED, f"no probe run's end was named in {_WITHIN}s")
    raise AssertionError("unreachable")


async def _expect(hints: _Hints, ended: dict[str, str], everything_before: int) -> None:
    for how, run_id in ended.items():
        promise(
            await hints.told([run_id], everything_before),
            P.FINISH_HINTED,
            f"run {run_id}, {how}, was not named (nor notify(None) called) in {_WITHIN}s; "
            f"named: {sorted(hints.named)[:10]}",
        )


class TestFinishHints:
    def test_every_way_a_run_ends_is_hinted(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            hints, subscription = await _subscribed(s, wf)
            try:
                everything = hints.everything
                made = [(await create(s, wf, n)).run.id for n in range(5)]
                claimed = {}
                for _ in range(3):
                    one = await claim_one(s, wf, LONG)
                    claimed[one.run.id] = one
                held = [run_id for run_id in made if run_id in claimed]
                pending = [run_id for run_id in made if run_id not in claimed]
                ended = {
                    "finished completed": held[0],
                    "finished failed with a last step": held[1],
                    "cancelled while running": held[2],
                    "cancelled while pending": pending[0],
                    "failed while pending": pending[1],
                }
                await s.finish_run(claimed[held[0]].lease, "completed", output=codec.encode(1))
                step = StepRecord("last", "failed", error=codec.encode("boom"), attempts=1)
                await s.finish_run(
                    claimed[held[1]].lease, "failed", error=codec.encode("boom"), step=step
                )
                for run_id in (held[2], pending[0]):
                    promise(await s.update_run_status(run_id, "cancelled"), P.CANCEL, run_id)
                error = codec.encode({"code": "x", "message": "gone", "step": None})
                await s.update_run_status(pending[1], "failed", error=error)
                await _expect(hints, ended, everything)
            finally:
                await subscription.close()

        reflow.run(body)

    @pytest.mark.reflow_area("children")
    def test_children_cancelled_by_their_parent_are_hinted(self, reflow: Harness) -> None:
        wf = reflow.unique()
        child_wf = reflow.unique()

        async def body(s: Storage) -> None:
            hints, subscription = await _subscribed(s, wf)
            try:
                everything = hints.everything
                await create(s, wf, "parent")
                parent = await claim_one(s, wf, LONG)
                child_ids = [reflow.unique("child") for _ in range(2)]
                for child_id in child_ids:
                    new = NewRun(child_wf, codec.encode("child"), run_id=child_id)
                    promise(
                        await s.start_child(parent.lease, "spawn", new) is not None,
                        P.LIVE_LEASE_ACCEPTED,
                        f"start_child of {child_id} under a live lease returned None",
                    )
                promise(await s.update_run_status(parent.run.id, "cancelled"), P.CANCEL, "parent")
                ended = {"the parent, cancelled": parent.run.id}
                ended.update(
                    {f"child {n}, cancelled by the cascade": c for n, c in enumerate(child_ids)}
                )
                await _expect(hints, ended, everything)
            finally:
                await subscription.close()

        reflow.run(body)

    def test_a_closed_subscription_is_told_nothing_more(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            hints, subscription = await _subscribed(s, wf)
            other, still = await _subscribed(s, wf)
            try:
                await subscription.close()
                await subscription.close()  # idempotent
                named, everything = set(hints.named), hints.everything
                await create(s, wf, "late")
                late = await claim_one(s, wf, LONG)
                await s.finish_run(late.lease, "completed", output=codec.encode("late"))
                # The other subscriber hears of it; by then the closed one would have too.
                await _expect(
                    other,
                    {"finished after the first subscription closed": late.run.id},
                    other.everything,
                )
                await asyncio.sleep(0.05)
                promise(
                    hints.named == named and hints.everything == everything,
                    P.FINISH_HINT_CLOSED,
                    f"a closed subscription was told {sorted(hints.named - named)}",
                )
            finally:
                await still.close()

        reflow.run(body)
