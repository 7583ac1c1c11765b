"""Helpers of ``test_retention``: pausing on the storage clock, putting a
purge's cut-off between two groups of runs, and the randomised scenario
(runs brought to any status on either side of a cut-off, then one purge).

Time is real. A cut-off goes between two groups of runs by a reading of the
storage's ``now()`` taken between them, with a pause on either side far
longer than one call takes (a share of the harness's short lease); a purge
then asks for ``older_than = now() - that reading``, which puts its cut-off
inside the pause, a little after the reading.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import Lease, RunRecord, StepRecord, Storage

from ._util import LONG, create_many

__all__ = [
    "ERROR",
    "FATES",
    "FINISHING",
    "HOUR",
    "OUTPUT",
    "TICK",
    "claim_all",
    "clear_finished",
    "cut",
    "end_as",
    "gap_of",
    "labelled",
    "missing_runs",
    "pinned",
    "purge_a_mix",
    "purge_since",
    "settle",
    "skip_unless_pinned",
    "status_of",
]

TICK = timedelta(milliseconds=3)
"""Longer than the millisecond a store may round a stored time by."""
HOUR = timedelta(hours=1)
OUTPUT = codec.encode("done")
ERROR = codec.encode("broke")


async def settle(s: Storage, span: timedelta = TICK) -> datetime:
    """Wait until the storage clock is ``span`` past a reading taken now, so
    every time stored before the call is older than every *now* after it;
    returns that reading."""
    start = await s.now()
    while True:
        left = span - (await s.now() - start)
        if left <= timedelta(0):
            return start
        await asyncio.sleep(max(left.total_seconds(), 0.001))


async def cut(s: Storage, gap: timedelta) -> datetime:
    """A storage time with nothing stored within ``gap`` after it, and
    nothing stored before the call later than it: the cut-off between the
    runs finished before the call and those finished after it."""
    await settle(s)
    return await settle(s, gap)


async def purge_since(s: Storage, mark: datetime, **kwargs: Any) -> tuple[int, timedelta]:
    """``purge_finished`` with its cut-off at ``mark``, or a little after it
    (the purge reads the clock after this call does): what it returned, and
    how far past ``mark`` its cut-off may be."""
    before = await s.now()
    deleted = await s.purge_finished(max(before - mark, timedelta(0)), **kwargs)
    return deleted, await s.now() - before


def pinned(slack: timedelta, gap: timedelta) -> bool:
    """A cut-off at most ``slack`` past a mark falls within the ``gap``
    after it (the purge did not take most of the gap)."""
    return slack < gap - 2 * TICK


def skip_unless_pinned(slack: timedelta, gap: timedelta) -> None:
    if not pinned(slack, gap):
        pytest.skip(
            f"a purge took {slack}, too long to tell which side of a {gap} gap its cut-off "
            "fell; raise --reflow-short-lease"
        )


async def clear_finished(s: Storage) -> None:
    """Purge every run of the store that finished before this call."""
    await settle(s)
    await s.purge_finished(timedelta(0))


def gap_of(reflow: Harness, share: int) -> timedelta:
    """A pause around a cut-off: ``1/share`` of the harness's short lease
    (which a store answers well within), and at least 10 ms."""
    return max(reflow.short_lease / share, timedelta(milliseconds=10))


async def claim_all(s: Storage, workflow: str, count: int) -> dict[str, Lease]:
    claimed = await s.claim_runs([workflow], count, LONG)
    promise(len(claimed) == count, P.NO_LOST_RUNS, f"claimed {len(claimed)} of {count}")
    return {c.run.id: c.lease for c in claimed}


async def missing_runs(s: Storage, ids: list[str]) -> list[str]:
    """The runs of ``ids`` that no longer exist, in the order of ``ids``."""
    return [run_id for run_id in ids if await s.get_run(run_id) is None]


def labelled(ids: list[str], labels: dict[str, str]) -> str:
    return ", ".join(labels[run_id] for run_id in ids) or "none"


def status_of(record: RunRecord | None) -> str:
    return "missing" if record is None else record.status


FATES = (
    "running",
    "sleeping",
    "waiting",
    "handed back",
    "requeued",
    "completed",
    "failed",
    "cancelled",
    "refinished",
)
"""Where a run ends up; ``refinished`` finished, was requeued and finished again."""
FINISHING = frozenset({"completed", "failed", "cancelled", "refinished"})


async def end_as(s: Storage, fate: str, run_id: str, lease: Lease) -> None:
    """The last transition of a run meant for ``fate``."""
    if fate == "running":
        await s.heartbeat_run(lease, LONG)
    elif fate == "sleeping":
        await s.sleep_run(lease, "nap", HOUR)
    elif fate == "waiting":
        await s.wait_run(lease, "hold", "never", None)
    elif fate == "handed back":
        await s.update_run_status(run_id, "pending", lease=lease)
    elif fate == "requeued":
        await s.requeue_run(run_id)
    elif fate in ("completed", "refinished"):
        await s.finish_run(lease, "completed", output=OUTPUT)
    elif fate == "failed":
        await s.finish_run(lease, "failed", error=ERROR)
    else:
        await s.update_run_status(run_id, "cancelled", error=ERROR)


async def purge_a_mix(
    s: Storage,
    wf: str,
    runs: list[tuple[str, bool]],
    batch: int,
    limit: int | None,
    gap: timedelta,
) -> None:
    """Bring each run to its fate, before the cut-off (``old``) or after it,
    purge once with ``batch`` and ``limit``, and check what went."""
    await clear_finished(s)
    ids = await create_many(s, wf, len(runs))
    fates = dict(zip(ids, runs, strict=True))
    labels = {
        run_id: f"#{i + 1} {fate} {'before' if old else 'after'}"
        for i, (run_id, (fate, old)) in enumerate(fates.items())
    }
    leases = await claim_all(s, wf, len(ids))
    for lease in leases.values():
        await s.save_step_result(lease, StepRecord("s", "completed", output=OUTPUT), LONG)
    for run_id, (fate, _) in fates.items():
        if fate in ("requeued", "refinished"):
            await s.finish_run(leases[run_id], "failed", error=ERROR)
        if fate == "refinished":
            await s.requeue_run(run_id)
    leases.update(await claim_all(s, wf, sum(fate == "refinished" for fate, _ in runs)))
    due = [run_id for run_id, (fate, old) in fates.items() if old and fate in FINISHING]
    apart = limit is not None and limit < len(due)
    for run_id, (fate, old) in fates.items():
        if old:
            if apart and fate in FINISHING:
                await settle(s)
            await end_as(s, fate, run_id, leases[run_id])
    mark = await cut(s, gap)
    for run_id, (fate, old) in fates.items():
        if not old:
            await end_as(s, fate, run_id, leases[run_id])
    before = {run_id: await s.get_run(run_id) for run_id in ids}
    kwargs: dict[str, Any] = {"batch": batch} if limit is None else {"batch": batch, "limit": limit}
    deleted, slack = await purge_since(s, mark, **kwargs)
    assume(pinned(slack, gap))
    gone = await missing_runs(s, ids)
    expected = due if limit is None else due[:limit]
    what = f"purge(batch={batch}, limit={limit}) of {len(due)} runs due"
    for run_id in gone:
        fate, old = fates[run_id]
        promise(
            fate in FINISHING,
            P.PURGE_UNFINISHED_KEPT,
            f"{what} deleted run {labels[run_id]}, which is {status_of(before[run_id])}",
        )
        promise(
            old,
            P.PURGE_BY_FINISH_TIME,
            f"{what} deleted run {labels[run_id]}, which finished after the cut-off",
        )
    if limit is not None:
        promise(len(gone) <= limit, P.PURGE_LIMIT, f"{what} deleted {labelled(gone, labels)}")
    if len(gone) < len(expected):
        name = P.PURGE_BY_FINISH_TIME
        if limit is not None:
            name = P.PURGE_LIMIT
        elif batch < len(due):
            name = P.PURGE_BATCHES
        promise(False, name, f"{what} deleted only {labelled(gone, labels)}")
    promise(
        gone == expected,
        P.PURGE_OLDEST_FIRST,
        f"{what} deleted {labelled(gone, labels)}, not {labelled(expected, labels)}",
    )
    promise(deleted == len(gone), P.PURGE_COUNT, f"{what} deleted {len(gone)}, returned {deleted}")
    for run_id in ids:
        after = await s.get_run(run_id)
        if after is None:
            steps = await s.get_step_results(run_id)
            promise(
                steps == {},
                P.PURGE_LEAVES_NOTHING,
                f"purged run {labels[run_id]} still has steps {sorted(steps)}",
            )
        else:
            promise(
                after == before[run_id],
                P.PURGE_UNFINISHED_KEPT if fates[run_id][0] not in FINISHING else P.PURGE_COUNT,
                f"run {labels[run_id]} was {before[run_id]}, after the purge {after}",
            )
