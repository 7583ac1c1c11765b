"""The run record's own fields: ``created_at``, ``updated_at``, ``wake_at`` and
``lease_expires_at``, read back after every operation of a run's life.

They follow the table "The run record's fields, precisely" of the adapter
authors' guide. Each operation is bracketed between two readings of the
storage's ``now()``: a time the operation sets must lie between them, give or
take the millisecond a store may round to. A pause before every operation
keeps successive writes well over that apart, so a field left at an earlier
write's time shows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Literal, TypeVar

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import (
    ClaimedRun,
    CreateResult,
    NewRun,
    RunRecord,
    RunStatus,
    StepRecord,
    Storage,
)

from ._util import claim_only

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestRunRecordFields"]

_T = TypeVar("_T")

_SLACK = timedelta(milliseconds=1)
"""Stored times keep at least milliseconds; a store may round either way."""
_PAUSE = 0.01
"""Seconds between two operations: ten times the slack."""
_NAP = timedelta(minutes=30)

Wake = datetime | Literal["now"] | None
"""What ``wake_at`` must be: a deadline the operation returned, the
storage's now during the operation, or ``None``."""
LeaseEnd = timedelta | Literal["kept"] | None
"""What ``lease_expires_at`` must be: the storage's now during the operation
plus this lease, what it was before the operation, or ``None``."""


def _within(value: datetime | None, before: datetime, after: datetime, span: timedelta) -> str:
    """Empty if ``value`` lies within ``[before + span, after + span]`` (with
    slack), else what is wrong."""
    if value is None:
        return "is None"
    low, high = before + span - _SLACK, after + span + _SLACK
    if low <= value <= high:
        return ""
    return (
        f"{value.isoformat()} is not within [{(before + span).isoformat()}, "
        f"{(after + span).isoformat()}] (the storage's now during the operation"
        + (f" + {span})" if span else ")")
    )


class _Life:
    """One run followed through its operations, its record read back after each."""

    def __init__(self, storage: Storage, run: RunRecord) -> None:
        self.storage = storage
        self.run = run
        self.created_at = run.created_at

    @classmethod
    async def create(cls, storage: Storage, workflow: str, delay: timedelta | None = None) -> _Life:
        await asyncio.sleep(_PAUSE)
        before = await storage.now()
        result: CreateResult = await storage.create_run(
            NewRun(workflow, codec.encode(None), delay=delay)
        )
        after = await storage.now()
        run = await storage.get_run(result.run.id)
        promise(run is not None, P.NO_LOST_RUNS, f"created run {result.run.id} is missing")
        assert run is not None
        where = f"on create (run {run.id})"
        wrong = _within(run.created_at, before, after, timedelta(0))
        promise(not wrong, P.RECORD_CREATED_FIXED, f"{where}: created_at {wrong}")
        promise(
            run.updated_at == run.created_at,
            P.RECORD_UPDATED_ON_WRITE,
            f"{where}: updated_at {run.updated_at.isoformat()} is not created_at "
            f"{run.created_at.isoformat()}",
        )
        if delay:
            due = run.created_at + delay
            promise(
                run.wake_at is not None and abs(run.wake_at - due) <= _SLACK,
                P.DELAY_FROM_STORAGE_CLOCK,
                f"{where}: wake_at {_show(run.wake_at)} is not created_at "
                f"{run.created_at.isoformat()} plus the delay {delay}",
            )
        else:
            promise(
                run.wake_at == run.created_at,
                P.RECORD_WAKE_AT,
                f"{where}: wake_at {_show(run.wake_at)} is not created_at "
                f"{run.created_at.isoformat()}",
            )
        promise(
            run.lease_expires_at is None,
            P.RECORD_LEASE_EXPIRES,
            f"{where}: lease_expires_at is {_show(run.lease_expires_at)}, not None",
        )
        return cls(storage, run)

    @property
    def id(self) -> str:
        return self.run.id

    async def do(
        self,
        what: str,
        operation: Callable[[], Awaitable[_T]],
        *,
        status: RunStatus,
        wake: Wake | Callable[[_T], Wake],
        lease: LeaseEnd,
        accepted: str = P.LIVE_LEASE_ACCEPTED,
    ) -> _T:
        """Do ``operation`` (a write to this run) and check the record it leaves.

        ``wake`` may be a function of the operation's result (the deadline a
        sleep or wait returns); ``accepted`` is the promise that says the
        operation should have been accepted.
        """
        await asyncio.sleep(_PAUSE)
        s = self.storage
        before = await s.now()
        result = await operation()
        after = await s.now()
        promise(result is not None and result is not False, accepted, f"{what} was refused")
        run = await s.get_run(self.id)
        promise(
            run is not None and run.status == status,
            P.STATE_MATCHES_MODEL,
            f"after {what}: expected status {status!r}, read {run}",
        )
        assert run is not None
        where = f"after {what} (run {run.id}, {run.status})"
        promise(
            run.created_at == self.created_at,
            P.RECORD_CREATED_FIXED,
            f"{where}: created_at moved from {self.created_at.isoformat()} to "
            f"{run.created_at.isoformat()}",
        )
        wrong = _within(run.updated_at, before, after, timedelta(0))
        promise(not wrong, P.RECORD_UPDATED_ON_WRITE, f"{where}: updated_at {wrong}")
        expected = wake(result) if callable(wake) else wake
        if expected is None:
            promise(
                run.wake_at is None,
                P.RECORD_WAKE_AT,
                f"{where}: wake_at is {_show(run.wake_at)}, not None",
            )
        elif isinstance(expected, datetime):
            promise(
                run.wake_at is not None and abs(run.wake_at - expected) <= _SLACK,
                P.RECORD_WAKE_AT,
                f"{where}: wake_at is {_show(run.wake_at)}, not the deadline "
                f"{expected.isoformat()}",
            )
        else:
            wrong = _within(run.wake_at, before, after, timedelta(0))
            promise(not wrong, P.RECORD_WAKE_AT, f"{where}: wake_at {wrong}")
        if lease is None:
            promise(
                run.lease_expires_at is None,
                P.RECORD_LEASE_EXPIRES,
                f"{where}: lease_expires_at is {_show(run.lease_expires_at)}, not None",
            )
        elif isinstance(lease, timedelta):
            wrong = _within(run.lease_expires_at, before, after, lease)
            promise(not wrong, P.RECORD_LEASE_EXPIRES, f"{where}: lease_expires_at {wrong}")
        else:
            promise(
                run.lease_expires_at == self.run.lease_expires_at,
                P.RECORD_LEASE_EXPIRES,
                f"{where}: lease_expires_at moved from {_show(self.run.lease_expires_at)} "
                f"to {_show(run.lease_expires_at)}",
            )
        self.run = run
        return result

    async def claim(self, workflow: str, lease: timedelta, why: str) -> ClaimedRun:
        """Claim this run (the one claimable run of ``workflow``); ``why`` is
        the promise that says it is claimable."""
        s = self.storage
        claimed = await self.do(
            "a claim",
            lambda: claim_only(s, workflow, why, lease),
            status="running",
            wake=None,
            lease=lease,
            accepted=why,
        )
        promise(claimed.run.id == self.id, why, f"claimed {claimed.run.id}, not {self.id}")
        return claimed

    async def cancel(self) -> None:
        reason = codec.encode({"type": "Cancelled"})
        await self.do(
            f"a cancel of a {self.run.status} run",
            lambda: self.storage.update_run_status(self.id, "cancelled", error=reason),
            status="cancelled",
            wake=None,
            lease=None,
            accepted=P.CANCEL,
        )

    async def requeue(self) -> None:
        await self.do(
            f"a requeue of a {self.run.status} run",
            lambda: self.storage.requeue_run(self.id),
            status="pending",
            wake="now",
            lease=None,
            accepted=P.REQUEUE_ONLY_ENDED,
        )


def _show(value: datetime | None) -> str:
    return "None" if value is None else value.isoformat()


def _deadline(result: object) -> Wake:
    """The deadline a ``sleep_run`` or ``wait_run`` returned."""
    if isinstance(result, datetime):
        return result
    deadline = getattr(result, "deadline", None)
    assert deadline is None or isinstance(deadline, datetime)
    return deadline


class TestRunRecordFields:
    def test_a_run_through_its_whole_life(self, reflow: Harness) -> None:
        """Create, claim, heartbeat, save a step, sleep, wait for an event that
        wakes it, take the event, wait for one already there, hand it back and
        finish it: each operation leaves the four fields as the table says."""
        wf = reflow.unique()
        lease = reflow.long_lease
        step = StepRecord("a", "completed", output=codec.encode(1))
        done = codec.encode("done")

        async def body(s: Storage) -> None:
            life = await _Life.create(s, wf)
            held = await life.claim(wf, lease, P.CLAIMED_RUNNING)
            await life.do(
                "a heartbeat",
                lambda: s.heartbeat_run(held.lease, lease),
                status="running",
                wake=None,
                lease=lease,
            )
            await life.do(
                "a step save",
                lambda: s.save_step_result(held.lease, step, lease),
                status="running",
                wake=None,
                lease=lease,
            )
            await life.do(
                "a sleep of zero length",
                lambda: s.sleep_run(held.lease, "nap", timedelta(0)),
                status="sleeping",
                wake=_deadline,
                lease=None,
            )
            held = await life.claim(wf, lease, P.DUE_CLAIMABLE)
            await life.do(
                "a wait with a timeout",
                lambda: s.wait_run(held.lease, "approval", "approved", _NAP),
                status="waiting",
                wake=_deadline,
                lease=None,
            )
            await life.do(
                "the delivery of the event a run waits for",
                lambda: s.deliver_event(life.id, "approved", codec.encode("yes")),
                status="waiting",
                wake="now",
                lease=None,
                accepted=P.EVENT_WAKES,
            )
            held = await life.claim(wf, lease, P.EVENT_WAKES)
            await life.do(
                "a take of the event",
                lambda: s.take_event(held.lease, "approval", "approved"),
                status="running",
                wake=None,
                lease="kept",
            )
            await s.deliver_event(life.id, "again", codec.encode("early"))
            await life.do(
                "a wait for an event already buffered",
                lambda: s.wait_run(held.lease, "second", "again", _NAP),
                status="running",
                wake=None,
                lease="kept",
            )
            await life.do(
                "a hand back",
                lambda: s.update_run_status(life.id, "pending", lease=held.lease),
                status="pending",
                wake="now",
                lease=None,
                accepted=P.HAND_BACK,
            )
            held = await life.claim(wf, lease, P.HAND_BACK)
            last = StepRecord("last", "completed", output=done)
            await life.do(
                "finish_run('completed')",
                lambda: s.finish_run(held.lease, "completed", output=done, step=last),
                status="completed",
                wake=None,
                lease=None,
            )

        reflow.run(body)

    def test_a_run_that_fails_and_is_requeued(self, reflow: Harness) -> None:
        """A run failed by its holder, failed under its lease, or failed from
        outside holds no lease and no wake-up; requeued, it is due at once."""
        wf = reflow.unique()
        lease = reflow.long_lease
        error = codec.encode({"type": "Boom"})

        async def body(s: Storage) -> None:
            life = await _Life.create(s, wf)
            held = await life.claim(wf, lease, P.CLAIMED_RUNNING)
            await life.do(
                "finish_run('failed')",
                lambda: s.finish_run(held.lease, "failed", error=error),
                status="failed",
                wake=None,
                lease=None,
            )
            await life.requeue()
            held = await life.claim(wf, lease, P.REQUEUE)
            await life.do(
                "update_run_status('failed', lease=...)",
                lambda: s.update_run_status(life.id, "failed", lease=held.lease, error=error),
                status="failed",
                wake=None,
                lease=None,
            )
            await life.requeue()
            await life.do(
                "update_run_status('failed') of a pending run",
                lambda: s.update_run_status(life.id, "failed", error=error),
                status="failed",
                wake=None,
                lease=None,
                accepted=P.CANCEL,
            )
            await life.requeue()
            await life.claim(wf, lease, P.REQUEUE)

        reflow.run(body)

    def test_a_run_cancelled_in_each_status(self, reflow: Harness) -> None:
        """Pending, running, sleeping and waiting runs (with and without a
        timeout) each end cancelled with no lease and no wake-up; a waiting
        run without a timeout has no wake-up while it waits."""
        lease = reflow.long_lease

        async def body(s: Storage) -> None:
            wf = reflow.unique()
            pending = await _Life.create(s, wf)
            await pending.cancel()
            await pending.requeue()

            wf = reflow.unique()
            running = await _Life.create(s, wf)
            await running.claim(wf, lease, P.CLAIMED_RUNNING)
            await running.cancel()

            wf = reflow.unique()
            sleeping = await _Life.create(s, wf)
            held = await sleeping.claim(wf, lease, P.CLAIMED_RUNNING)
            await sleeping.do(
                "a sleep",
                lambda: s.sleep_run(held.lease, "nap", _NAP),
                status="sleeping",
                wake=_deadline,
                lease=None,
            )
            await sleeping.cancel()

            async def waiting(timeout: timedelta | None) -> _Life:
                wf = reflow.unique()
                life = await _Life.create(s, wf)
                held = await life.claim(wf, lease, P.CLAIMED_RUNNING)
                await life.do(
                    f"a wait with timeout {timeout}",
                    lambda: s.wait_run(held.lease, "approval", "approved", timeout),
                    status="waiting",
                    wake=_deadline,
                    lease=None,
                )
                await life.cancel()
                return life

            await waiting(_NAP)
            await (await waiting(None)).requeue()

        reflow.run(body)

    def test_a_run_woken_by_its_deadline(self, reflow: Harness) -> None:
        """A wait whose deadline has passed leaves the run claimable, its wake-up
        the deadline; claimed again, it runs under a new lease with none."""
        wf = reflow.unique()
        lease = reflow.long_lease

        async def body(s: Storage) -> None:
            life = await _Life.create(s, wf)
            held = await life.claim(wf, lease, P.CLAIMED_RUNNING)
            await life.do(
                "a wait with a zero timeout",
                lambda: s.wait_run(held.lease, "approval", "approved", timedelta(0)),
                status="waiting",
                wake=_deadline,
                lease=None,
            )
            held = await life.claim(wf, lease, P.DUE_CLAIMABLE)
            await life.do(
                "a wait reached again after its deadline",
                lambda: s.wait_run(held.lease, "approval", "approved", timedelta(0)),
                status="waiting",
                wake=_deadline,
                lease=None,
            )

        reflow.run(body)

    def test_a_delayed_run(self, reflow: Harness) -> None:
        """A run created with a delay is due at its ``created_at`` plus the
        delay; cancelled, it has no wake-up; requeued, it is due at once. One
        whose short delay has passed is claimed like a pending run."""
        lease = reflow.long_lease
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            wf = reflow.unique()
            later = await _Life.create(s, wf, delay=_NAP)
            await later.cancel()
            await later.requeue()
            await later.claim(wf, lease, P.REQUEUE)

            wf = reflow.unique()
            soon = await _Life.create(s, wf, delay=short)
            await reflow.lapse(short)
            await soon.claim(wf, lease, P.DELAYED_CLAIMABLE)

        reflow.run(body)
