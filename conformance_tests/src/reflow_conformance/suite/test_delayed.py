"""Delayed runs: ``NewRun.delay`` creates a run ``delayed`` until the storage's
now at its creation plus the delay, then claimable like a pending run.

Every time is judged by the storage's clock: the tests bracket creates
between readings of ``now()``, and let a delay of one ``--reflow-short-lease``
pass in real time before expecting its run to be claimable."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import CreateResult, NewRun, RunRecord, Storage

from ._util import LONG, SLACK, check_times, off_bracket, read_run, storage_now

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestDelayedRuns"]

_TICK = 0.02
"""Seconds between creates whose times must differ (a store keeps milliseconds at least)."""


async def _create(
    s: Storage,
    workflow: str,
    value: object = None,
    *,
    delay: timedelta | None,
    key: str | None = None,
) -> CreateResult:
    return await s.create_run(NewRun(workflow, codec.encode(value), key, delay=delay))


def _show(value: datetime | None) -> str:
    return "None" if value is None else value.isoformat()


def _delayed_shape(run: RunRecord, delay: timedelta, where: str) -> None:
    """A run just created with a positive ``delay``: delayed, never claimed,
    due at its ``created_at`` plus the delay."""
    promise(
        (run.status, run.attempts, run.reclaims, run.lease_epoch, run.lease_expires_at)
        == ("delayed", 0, 0, 0, None),
        P.CREATE_DELAYED,
        f"{where}: a run created with delay {delay} is {run.status!r}, attempts "
        f"{run.attempts}, reclaims {run.reclaims}, epoch {run.lease_epoch}, lease "
        f"{_show(run.lease_expires_at)}",
    )
    want = run.created_at + delay
    promise(
        run.wake_at is not None and abs(run.wake_at - want) <= SLACK,
        P.DELAY_FROM_STORAGE_CLOCK,
        f"{where}: wake_at is {_show(run.wake_at)}, not created_at "
        f"{run.created_at.isoformat()} plus the delay {delay}, {want.isoformat()}",
    )


class TestDelayedRuns:
    def test_a_delayed_run_is_recorded_delayed_until_its_delay_has_passed(
        self, reflow: Harness
    ) -> None:
        """A positive delay makes the run ``delayed``, due at its ``created_at``
        (the storage's now) plus the delay, and no claim takes it meanwhile;
        no delay or a zero one makes it ``pending``, due at once."""
        late, zero, none = reflow.unique(), reflow.unique(), reflow.unique()

        async def body(s: Storage) -> None:
            before = await storage_now(s)
            result = await _create(s, late, "later", delay=LONG)
            after = await storage_now(s)
            promise(result.created, P.CREATE_DELAYED, f"created={result.created}")
            check_times(result.run, "the delayed run create_run returned")
            _delayed_shape(result.run, LONG, "as create_run returned it")
            stored = await read_run(s, result.run.id)
            _delayed_shape(stored, LONG, "as get_run reads it")
            wrong = off_bracket(stored.created_at, before, after)
            promise(not wrong, P.RECORD_CREATED_FIXED, f"created_at {wrong}")
            promise(
                stored.updated_at == stored.created_at,
                P.RECORD_UPDATED_ON_WRITE,
                f"updated_at {stored.updated_at.isoformat()} is not created_at "
                f"{stored.created_at.isoformat()}",
            )
            claimed = await s.claim_runs([late], 10, LONG)
            promise(
                not claimed,
                P.DELAYED_NOT_CLAIMABLE,
                f"a claim right after creating a run delayed by {LONG} took "
                f"{[(c.run.id, c.run.status) for c in claimed]}",
            )
            promise(
                (await read_run(s, stored.id)) == stored,
                P.DELAYED_NOT_CLAIMABLE,
                "a claim that took nothing changed the delayed run",
            )
            for workflow, delay in ((zero, timedelta(0)), (none, None)):
                run = (await _create(s, workflow, "now", delay=delay)).run
                stored = await read_run(s, run.id)
                promise(
                    (stored.status, stored.wake_at) == ("pending", stored.created_at),
                    P.CREATE_DELAYED,
                    f"a run created with delay {delay} is {stored.status!r}, wake_at "
                    f"{_show(stored.wake_at)}, created_at {stored.created_at.isoformat()}",
                )
                taken = await s.claim_runs([workflow], 10, LONG)
                promise(
                    [c.run.id for c in taken] == [run.id],
                    P.CREATE_DELAYED,
                    f"a claim after creating a run with delay {delay} took "
                    f"{[c.run.id for c in taken]}",
                )

        reflow.run(body)

    def test_delayed_runs_fall_due_by_the_storage_clock_in_wake_at_order(
        self, reflow: Harness
    ) -> None:
        """Runs delayed by a fraction of the short lease are not claimable at
        first; once the delays have passed they are, as first claims, one at a
        time in ``wake_at`` order among the workflow's due runs: a pending run
        created after them but due before them first, one created once they
        are due last."""
        wf = reflow.unique()
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            delays = {}
            later = (await _create(s, wf, "later", delay=short * 2 / 3)).run.id
            delays[later] = short * 2 / 3
            await asyncio.sleep(_TICK)
            sooner = (await _create(s, wf, "sooner", delay=short / 3)).run.id
            delays[sooner] = short / 3
            early = await s.claim_runs([wf], 10, LONG)
            checked = await storage_now(s)
            for c in early:
                created = (await read_run(s, c.run.id)).created_at
                promise(
                    checked + SLACK >= created + delays[c.run.id],
                    P.DELAYED_NOT_CLAIMABLE,
                    f"run {c.run.id}, created at {created.isoformat()} with delay "
                    f"{delays[c.run.id]}, was claimed by a claim that ended by "
                    f"{checked.isoformat()}",
                )
            if early:
                pytest.skip("a delay passed before the first claim: the store is too slow")
            first = (await _create(s, wf, "first", delay=None)).run.id
            await reflow.lapse(short)
            records = {run_id: await read_run(s, run_id) for run_id in (later, sooner, first)}
            now = await storage_now(s)
            for run_id in (later, sooner):
                wake = records[run_id].wake_at
                promise(
                    wake is not None and wake <= now,
                    P.DELAY_FROM_STORAGE_CLOCK,
                    f"run {run_id}, delayed by {delays[run_id]}, is due at {_show(wake)}, "
                    f"still after now() {now.isoformat()} {short * 1.5} later",
                )
            last = (await _create(s, wf, "last", delay=None)).run.id
            records[last] = await read_run(s, last)
            order = sorted(records, key=lambda i: (records[i].wake_at or now, i))
            taken: list[str] = []
            for _ in order:
                got = await s.claim_runs([wf], 1, LONG)
                promise(
                    len(got) == 1,
                    P.DELAYED_CLAIMABLE if {later, sooner} - set(taken) else P.NEW_RUN_CLAIMABLE,
                    f"after {taken} a claim of one took {[c.run.id for c in got]}; due by "
                    f"wake_at: {order}",
                )
                c = got[0]
                taken.append(c.run.id)
                if c.run.id in (later, sooner):
                    promise(
                        (c.run.status, c.reclaimed, c.run.reclaims, c.run.attempts)
                        == ("running", False, 0, 1),
                        P.DELAYED_CLAIMABLE,
                        f"a due delayed run was claimed as {c.run.status!r}, reclaimed="
                        f"{c.reclaimed}, reclaims {c.run.reclaims}, attempts {c.run.attempts}",
                    )
                    promise(
                        c.run.wake_at is None,
                        P.CLAIMED_RUNNING,
                        f"a claimed delayed run keeps wake_at {_show(c.run.wake_at)}",
                    )
            promise(
                taken == order,
                P.DUE_ORDER,
                f"claimed {taken} one at a time; by wake_at they fell due as {order} "
                + str({i: _show(records[i].wake_at) for i in order}),
            )

        reflow.run(body)

    def test_a_delayed_run_is_listed_counted_cancelled_and_requeued(self, reflow: Harness) -> None:
        """``list_runs(status=["delayed"])`` finds delayed runs only; queue
        statistics count them as delayed, due or not, never as pending; a
        cancel without a lease ends one, and a requeue makes it pending."""
        wf = reflow.unique()
        stats = reflow.implements("queue_stats")

        async def expect_stats(s: Storage, after: str, delayed: int, pending: int) -> None:
            if not stats:
                return
            entry = (await s.queue_stats([wf]))[0]
            check_times(entry, f"queue stats of {wf}")
            promise(
                (entry.delayed, entry.pending, entry.running) == (delayed, pending, 0),
                P.STATS_DELAYED,
                f"after {after}: counted delayed {entry.delayed}, pending {entry.pending}, "
                f"running {entry.running}; expected delayed {delayed}, pending {pending}",
            )
            pending_ids = (await s.list_runs(status=["pending"], workflow=wf)).runs
            want = min((r.wake_at for r in pending_ids if r.wake_at is not None), default=None)
            got = entry.oldest_pending_since
            promise(
                got is None if want is None else got is not None and abs(got - want) <= SLACK,
                P.STATS_DELAYED,
                f"after {after}: oldest_pending_since is {_show(got)}, but the earliest "
                f"wake_at of the pending runs is {_show(want)}",
            )

        async def listed(s: Storage, status: str) -> list[str]:
            page = await s.list_runs(status=[status], workflow=wf)  # type: ignore[list-item]
            return [run.id for run in page.runs]

        async def body(s: Storage) -> None:
            waiting = (await _create(s, wf, "waiting", delay=LONG)).run.id
            due = (await _create(s, wf, "due", delay=timedelta(milliseconds=1))).run.id
            await asyncio.sleep(_TICK)
            await expect_stats(s, "creating two delayed runs, one of them due", 2, 0)
            await asyncio.sleep(_TICK)
            pending = (await _create(s, wf, "pending", delay=None)).run.id
            await expect_stats(s, "creating a pending run", 2, 1)
            got = await listed(s, "delayed")
            promise(
                sorted(got) == sorted([waiting, due]),
                P.LIST_FILTERS,
                f"list_runs(status=['delayed']) gave {got}, expected {[due, waiting]}",
            )
            got = await listed(s, "pending")
            promise(
                got == [pending],
                P.LIST_FILTERS,
                f"list_runs(status=['pending']) gave {got}, expected {[pending]}",
            )
            cancelled = await s.update_run_status(waiting, "cancelled")
            promise(cancelled, P.CANCEL, "cancelling a delayed run without a lease was refused")
            run = await read_run(s, waiting)
            promise(
                (run.status, run.wake_at, run.lease_expires_at) == ("cancelled", None, None),
                P.CANCEL,
                f"a cancelled delayed run reads {run.status!r}, wake_at {_show(run.wake_at)}, "
                f"lease {_show(run.lease_expires_at)}",
            )
            await expect_stats(s, "cancelling the delayed run not yet due", 1, 1)
            requeued = await s.requeue_run(waiting)
            promise(requeued, P.REQUEUE_ONLY_ENDED, "requeue of a cancelled delayed run refused")
            run = await read_run(s, waiting)
            promise(run.status == "pending", P.REQUEUE, f"requeued, it is {run.status!r}")
            await expect_stats(s, "requeuing it", 1, 2)
            ended = await s.update_run_status(due, "failed", error=codec.encode("no"))
            promise(ended, P.CANCEL, "failing a due delayed run without a lease was refused")
            await expect_stats(s, "failing the due delayed run", 0, 2)
            taken = sorted(c.run.id for c in await s.claim_runs([wf], 10, LONG))
            promise(
                taken == sorted([pending, waiting]),
                P.TERMINAL_STAYS,
                f"claimed {taken}, expected the pending and the requeued run",
            )

        reflow.run(body)

    def test_an_idempotent_hit_returns_the_run_unchanged_whatever_the_delay(
        self, reflow: Harness
    ) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            now_run = (await _create(s, wf, 1, delay=None, key="now")).run
            later_run = (await _create(s, wf, 2, delay=LONG, key="later")).run
            for first, key, value, delays in (
                (now_run, "now", 1, (LONG, timedelta(0))),
                (later_run, "later", 2, (None, timedelta(0), timedelta(hours=2))),
            ):
                before = await read_run(s, first.id)
                for delay in delays:
                    again = await _create(s, wf, value, delay=delay, key=key)
                    promise(
                        not again.created and again.run.id == first.id,
                        P.IDEMPOTENT_CREATE,
                        f"a repeat with key {key!r} and delay {delay} gave {again.run.id} "
                        f"(created={again.created}), not {first.id}",
                    )
                    promise(
                        (again.run.status, again.run.wake_at) == (before.status, before.wake_at),
                        P.DELAYED_IDEMPOTENT,
                        f"a repeat with key {key!r} and delay {delay} returned the "
                        f"{before.status} run as {again.run.status!r}, wake_at "
                        f"{_show(again.run.wake_at)} (stored: {_show(before.wake_at)})",
                    )
                    promise(
                        await read_run(s, first.id) == before,
                        P.DELAYED_IDEMPOTENT,
                        f"a repeat with key {key!r} and delay {delay} changed the stored run",
                    )
            taken = [c.run.id for c in await s.claim_runs([wf], 10, LONG)]
            promise(
                taken == [now_run.id],
                P.DELAYED_IDEMPOTENT,
                f"after the repeats a claim took {taken}, expected only the pending run "
                f"{now_run.id}",
            )

        reflow.run(body)
