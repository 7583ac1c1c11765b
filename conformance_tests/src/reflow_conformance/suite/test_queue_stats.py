"""Queue statistics: each workflow's unfinished runs counted by status, and
since when its oldest pending run has waited.

The store may hold other workflows' runs, so every test counts workflows of
its own, named: what ``queue_stats()`` gives without names is checked only
for those names (and for its order, which holds for the whole list)."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import QueueStats, Storage

from ._util import LONG, SLACK, check_times, claim_one, create, create_many

pytestmark = [pytest.mark.reflow_conformance, pytest.mark.reflow_area("queue_stats")]

__all__ = ["TestQueueStats"]

_STATUSES = ("delayed", "pending", "running", "sleeping", "waiting")
_TICK = 0.02
"""Seconds between writes whose times must differ (a store keeps milliseconds at least)."""


def _counts(stats: QueueStats | None) -> dict[str, int]:
    if stats is None:
        return {}
    return {status: getattr(stats, status) for status in _STATUSES}


def _zero(stats: QueueStats) -> bool:
    return not any(_counts(stats).values()) and stats.oldest_pending_since is None


async def _entry(s: Storage, workflow: str) -> QueueStats:
    """The one entry ``queue_stats([workflow])`` must give."""
    got = await s.queue_stats([workflow])
    promise(
        [entry.workflow for entry in got] == [workflow],
        P.STATS_ENTRIES,
        f"queue_stats([{workflow!r}]) gave entries for {[entry.workflow for entry in got]}",
    )
    check_times(got[0], f"queue stats of {workflow}")
    return got[0]


async def _expect(s: Storage, workflow: str, name: str, after: str, **counts: int) -> QueueStats:
    """The workflow's counts are ``counts`` (the statuses not given: zero)."""
    stats = await _entry(s, workflow)
    want = {status: counts.get(status, 0) for status in _STATUSES}
    promise(
        _counts(stats) == want,
        name,
        f"after {after}: counted {_counts(stats)}, expected {want}",
    )
    return stats


async def _oldest_pending(s: Storage, run_ids: list[str]) -> datetime | None:
    """The earliest ``wake_at`` of these runs that are pending, as ``get_run`` reads them."""
    stamps = []
    for run_id in run_ids:
        run = await s.get_run(run_id)
        if run is not None and run.status == "pending" and run.wake_at is not None:
            stamps.append(run.wake_at)
    return min(stamps, default=None)


async def _check_oldest(s: Storage, workflow: str, run_ids: list[str], after: str) -> None:
    stats = await _entry(s, workflow)
    want = await _oldest_pending(s, run_ids)
    got = stats.oldest_pending_since
    good = got is None if want is None else got is not None and abs(got - want) <= SLACK
    promise(
        good,
        P.STATS_OLDEST_PENDING,
        f"after {after}: oldest_pending_since is {got and got.isoformat()}, but the earliest "
        f"wake_at of the pending runs is {want and want.isoformat()}",
    )


class TestQueueStats:
    def test_counts_follow_every_transition(self, reflow: Harness) -> None:
        wf = reflow.unique()
        done = P.STATS_FINISHED_UNCOUNTED
        counted = P.STATS_COUNTS

        async def body(s: Storage) -> None:
            await _expect(s, wf, P.STATS_ENTRIES, "nothing was created", pending=0)
            ids = await create_many(s, wf, 4)
            await _expect(s, wf, counted, "four creates", pending=4)
            napper = await claim_one(s, wf)
            await _expect(s, wf, counted, "a claim", pending=3, running=1)
            await s.sleep_run(napper.lease, "nap", LONG)
            await _expect(s, wf, counted, "a sleep", pending=3, sleeping=1)
            waiter = await claim_one(s, wf)
            await s.wait_run(waiter.lease, "approval", "approved", LONG)
            await _expect(s, wf, counted, "a wait", pending=2, sleeping=1, waiting=1)
            handed = await claim_one(s, wf)
            await _expect(s, wf, counted, "a claim", pending=1, running=1, sleeping=1, waiting=1)
            await s.update_run_status(handed.run.id, "pending", lease=handed.lease)
            await _expect(s, wf, counted, "a hand back", pending=2, sleeping=1, waiting=1)
            finished = await claim_one(s, wf)
            await s.finish_run(finished.lease, "completed", output=codec.encode(1))
            await _expect(s, wf, done, "a run completed", pending=1, sleeping=1, waiting=1)
            await s.update_run_status(napper.run.id, "cancelled")
            await _expect(s, wf, done, "a sleeping run was cancelled", pending=1, waiting=1)
            await s.requeue_run(napper.run.id)
            await _expect(s, wf, counted, "a requeue", pending=2, waiting=1)
            await s.deliver_event(waiter.run.id, "approved", codec.encode(True))
            await _expect(s, wf, counted, "the awaited event arrived", pending=2, waiting=1)
            held = await s.claim_runs([wf], 10, reflow.short_lease)
            promise(len(held) == 3, P.DUE_CLAIMABLE, f"claimed {len(held)} of 3 claimable runs")
            await _expect(s, wf, counted, "claiming all three", running=3)
            await s.finish_run(held[0].lease, "failed", error=codec.encode("boom"))
            await _expect(s, wf, done, "a run failed", running=2)
            await s.update_run_status(held[1].run.id, "cancelled")
            await _expect(s, wf, done, "a running run was cancelled", running=1)
            await reflow.lapse()
            await _expect(s, wf, counted, "the last lease lapsed", running=1)
            await s.update_run_status(held[2].run.id, "cancelled")
            stats = await _expect(s, wf, done, "every run ended")
            promise(
                stats.oldest_pending_since is None,
                P.STATS_OLDEST_PENDING,
                f"no run is pending, yet oldest_pending_since is {stats.oldest_pending_since}",
            )
            await _check_oldest(s, wf, ids, "every run ended")

        reflow.run(body)

    def test_oldest_pending_since_is_the_earliest_wake_at_of_a_pending_run(
        self, reflow: Harness
    ) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await _check_oldest(s, wf, [], "nothing was created")
            first = (await create(s, wf, "first")).run.id
            await asyncio.sleep(_TICK)
            second = (await create(s, wf, "second")).run.id
            ids = [first, second]
            await _check_oldest(s, wf, ids, "two creates")
            await asyncio.sleep(_TICK)
            # The first run, handed back, is due after the second: created
            # first, it has not waited longest.
            held = await claim_one(s, wf)
            await s.update_run_status(held.run.id, "pending", lease=held.lease)
            await _check_oldest(s, wf, ids, "the first run was handed back")
            await asyncio.sleep(_TICK)
            other = await claim_one(s, wf)
            await _check_oldest(s, wf, ids, "a claim took the run that fell due first")
            await s.finish_run(other.lease, "failed", error=codec.encode("x"))
            await asyncio.sleep(_TICK)
            await s.requeue_run(other.run.id)
            await _check_oldest(s, wf, ids, "a failed run was requeued")
            for claimed in await s.claim_runs([wf], 10, LONG):
                await s.sleep_run(claimed.lease, "nap", LONG)
            await _check_oldest(s, wf, ids, "every run went to sleep")
            await _expect(s, wf, P.STATS_COUNTS, "every run went to sleep", sleeping=2)

        reflow.run(body)

    def test_one_entry_per_workflow_each_counting_its_own_runs(self, reflow: Harness) -> None:
        base = reflow.unique()
        a, b = f"{base}-a", f"{base}-b"
        longer = f"{a}-more"  # extends a's name: a prefix match would count it in a's entry
        empty, ended = f"{base}-empty", f"{base}-ended"
        want = {a: {"pending": 2}, b: {"pending": 1, "running": 1}, longer: {"pending": 1}}

        def check(entry: QueueStats) -> None:
            counts = _counts(entry)
            if entry.workflow in (empty, ended):
                name = P.STATS_ENTRIES if _zero(entry) else P.STATS_FINISHED_UNCOUNTED
                promise(
                    _zero(entry) and entry.workflow == empty,
                    name,
                    f"{entry.workflow}, with no unfinished run, has the entry {entry}",
                )
                return
            expected = {s: want[entry.workflow].get(s, 0) for s in _STATUSES}
            promise(
                counts == expected,
                P.STATS_ISOLATION,
                f"{entry.workflow} counted {counts}, expected {expected}",
            )

        async def body(s: Storage) -> None:
            await create_many(s, a, 2)
            await create_many(s, b, 2)
            await claim_one(s, b)
            await create(s, longer)
            await create(s, ended)
            done = await claim_one(s, ended)
            await s.finish_run(done.lease, "completed", output=codec.encode(None))

            named = await s.queue_stats([b, empty, a, ended, b])
            expected = sorted({a, b, empty, ended})
            got = [entry.workflow for entry in named]
            promise(
                got == expected,
                P.STATS_ENTRIES,
                f"queue_stats of {expected} (b named twice) gave entries for {got}",
            )
            for entry in named:
                check_times(entry, f"queue stats of {entry.workflow}")
                if entry.workflow in (empty, ended):
                    promise(
                        _zero(entry),
                        P.STATS_ENTRIES if entry.workflow == empty else P.STATS_FINISHED_UNCOUNTED,
                        f"{entry.workflow}, with no unfinished run, is counted as {entry}",
                    )
                else:
                    check(entry)

            every = await s.queue_stats()
            names = [entry.workflow for entry in every]
            promise(
                names == sorted(set(names)),
                P.STATS_ENTRIES,
                "queue_stats() is not one entry per workflow ordered by name: "
                + str([n for n in names if n.startswith(base)]),
            )
            mine = [entry for entry in every if entry.workflow.startswith(base)]
            promise(
                sorted(entry.workflow for entry in mine) == sorted(want)
                or any(entry.workflow == ended and not _zero(entry) for entry in mine),
                P.STATS_ENTRIES,
                f"queue_stats() gave entries for {[e.workflow for e in mine]}, expected "
                f"one for each workflow with an unfinished run: {sorted(want)}",
            )
            for entry in mine:
                check_times(entry, f"queue stats of {entry.workflow}")
                check(entry)

            none = await s.queue_stats([])
            promise(none == [], P.STATS_ENTRIES, f"queue_stats([]) gave {none}")

        reflow.run(body)
