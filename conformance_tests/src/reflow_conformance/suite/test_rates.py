"""Rate limits and debounced creates.

A run with ``rates`` is taken by a claim only while fewer than ``max`` claims
of runs holding each of its keys were made in the window of ``period`` ending
now; a due run passed over for a full rate is *blocked* (``blocked_by`` is
``RATE_BLOCK_PREFIX`` and the key) until the window has room again, when the
next claim lets the key's first blocked runs go, as many as there is room
for. A create with a ``debounce_key`` replaces the workflow's open run with
that key (pending or delayed, never claimed) instead of making another.

Every rate key and debounce key is unique to its test, since rates hold
across workflows and the store may be shared. Windows pass in real time:
their periods are a fraction of a second where a test waits one out
(:func:`_wait_past` waits by the storage's clock), and a minute or more where
a test needs a window to stay full. Only one test lets a lease lapse (once,
one ``--reflow-short-lease``)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import (
    MAX_RATE,
    MAX_RATE_PERIOD,
    MAX_RUN_RATES,
    RATE_BLOCK_PREFIX,
    ClaimedRun,
    ConcurrencyLimit,
    CreateResult,
    NewRun,
    RateLimit,
    RunRecord,
    ScheduleSpec,
    StepRecord,
    Storage,
)

from ._util import (
    LONG,
    SLACK,
    check_times,
    claim_only,
    far_slot,
    off_bracket,
    read_run,
    refused,
    refused_creates,
    refused_slots,
    refused_starts,
    storage_now,
)

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestDebounce", "TestRateLimits", "TestRateRaces"]

_APART = 0.003
"""Seconds between creates whose due times must differ by more than a millisecond."""
_WINDOW = timedelta(milliseconds=400)
"""The period of a rate whose window a test waits out."""
_FULL = timedelta(minutes=2)
"""The period of a rate whose window must stay full for the whole test."""
_HOUR = timedelta(hours=1)


def _block(key: str) -> str:
    """``blocked_by`` of a run blocked by the rate with ``key``."""
    return RATE_BLOCK_PREFIX + key


def _ms(value: timedelta) -> timedelta:
    """``value`` cut to whole milliseconds, as a rate's period must be."""
    return timedelta(milliseconds=value // timedelta(milliseconds=1))


async def _make(
    s: Storage,
    wf: str,
    value: object = None,
    *,
    priority: int = 0,
    limits: tuple[ConcurrencyLimit, ...] = (),
    rates: tuple[RateLimit, ...] = (),
) -> str:
    """A pending run of ``wf``; the creates of one test are kept apart in time,
    so their due order is their creation order."""
    new = NewRun(wf, codec.encode(value), priority=priority, limits=limits, rates=rates)
    made = await s.create_run(new)
    check_times(made.run, f"the run create_run returned (rates {rates})")
    await asyncio.sleep(_APART)
    return made.run.id


class _Claims:
    """The claims a test made of runs holding rate keys, by the storage's
    clock (a claimed run's ``updated_at``), to hold every window to its max."""

    def __init__(self, *rates: RateLimit) -> None:
        self.rates = {rate.key: rate for rate in rates}
        self.times: dict[str, list[datetime]] = {rate.key: [] for rate in rates}

    def add(self, claimed: Sequence[ClaimedRun]) -> None:
        for c in claimed:
            for rate in c.run.rates:
                if rate.key in self.times:
                    self.times[rate.key].append(c.run.updated_at)

    def check(self, what: str) -> None:
        """No window of a key's period holds more than ``max`` of its claims
        (give or take the millisecond a store may round to)."""
        for key, times in self.times.items():
            rate = self.rates[key]
            ordered = sorted(times)
            for first, last in zip(ordered, ordered[rate.max :], strict=False):
                promise(
                    last - first >= rate.period - SLACK,
                    P.RATE_NEVER_EXCEEDED,
                    f"{what}: {rate.max + 1} claims of a rate of max {rate.max} per "
                    f"{rate.period} within {last - first}, from {first.isoformat()} to "
                    f"{last.isoformat()}",
                )

    def last(self, key: str) -> datetime:
        return max(self.times[key])


async def _claim(
    s: Storage,
    workflows: str | Sequence[str],
    log: _Claims | None = None,
    limit: int = 10,
    lease: timedelta = LONG,
) -> list[ClaimedRun]:
    """Claim up to ``limit`` runs of ``workflows``, noting them in ``log``."""
    names = [workflows] if isinstance(workflows, str) else list(workflows)
    claimed = await s.claim_runs(names, limit, lease)
    promise(len(claimed) <= limit, P.CLAIM_LIMIT, f"limit {limit}, claimed {len(claimed)}")
    for c in claimed:
        check_times(c, f"the claim of {c.run.id}")
    if log is not None:
        log.add(claimed)
        log.check("after a claim")
    return claimed


def _ids(claimed: Sequence[ClaimedRun]) -> list[str]:
    return [c.run.id for c in claimed]


def _names(ids: Sequence[str], runs: dict[str, str]) -> list[str]:
    """Ids shown by the names the test gave their runs."""
    return [runs.get(run_id, run_id) for run_id in ids]


async def _wait_past(s: Storage, moment: datetime) -> None:
    """Sleep until the storage's clock has passed ``moment`` (and a little more)."""
    target = moment + timedelta(milliseconds=5)
    for _ in range(200):
        now = await storage_now(s)
        if now > target:
            return
        await asyncio.sleep((target - now).total_seconds() + 0.005)
    promise(False, P.STORAGE_CLOCK, f"the storage's clock never passed {moment.isoformat()}")


async def _check_blocked(s: Storage, run_id: str, by: str, name: str, why: str) -> RunRecord:
    """The run is due and not running, blocked by ``by``."""
    run = await read_run(s, run_id, name)
    promise(
        run.blocked_by == by and run.status in ("pending", "delayed"),
        name,
        f"{why}: {run_id} is {run.status!r} with blocked_by {run.blocked_by!r}, expected "
        f"pending and blocked by {by!r}",
    )
    return run


async def _check_free(s: Storage, run_id: str, name: str, why: str) -> RunRecord:
    run = await read_run(s, run_id, name)
    promise(
        run.blocked_by is None,
        name,
        f"{why}: {run_id} ({run.status}) has blocked_by {run.blocked_by!r}, expected None",
    )
    return run


def _stored(run: RunRecord, rates: tuple[RateLimit, ...], debounce: str | None, where: str) -> None:
    promise(
        tuple(run.rates) == rates,
        P.RATES_STORED,
        f"{where}: rates {run.rates!r}, expected {rates!r}",
    )
    promise(
        run.debounce_key == debounce,
        P.RATES_STORED,
        f"{where}: debounce_key {run.debounce_key!r}, expected {debounce!r}",
    )


class TestRateLimits:
    def test_rates_and_debounce_key_read_back_as_created(self, reflow: Harness) -> None:
        """``rates`` (in the order given) and ``debounce_key`` read back as
        created (none by default), from ``create_run``, ``start_child`` and
        ``claim_schedule_slot``, and no claim, save, hand-back or end changes
        them."""
        wf, cwf, swf = reflow.unique(), reflow.unique("child"), reflow.unique("slot")
        k1, k2 = reflow.unique("rate"), reflow.unique("rate")
        rates = (RateLimit(k2, MAX_RATE, timedelta(seconds=2)), RateLimit(k1, 50, _WINDOW))
        debounce = reflow.unique("debounce")

        async def body(s: Storage) -> None:
            plain = (await s.create_run(NewRun(wf, codec.encode("plain")))).run
            _stored(plain, (), None, "a run created without rates or debounce_key")
            cases: list[tuple[str, tuple[RateLimit, ...], str | None]] = [(plain.id, (), None)]
            choices: list[tuple[tuple[RateLimit, ...], str | None]] = [
                (rates, None),
                (rates[1:], debounce),
                ((RateLimit(reflow.unique("rate"), 1, MAX_RATE_PERIOD),), reflow.unique("d")),
            ]
            for chosen, key in choices:
                # Each run its own workflow: the rates of max 1 hold one claim in all.
                new = NewRun(reflow.unique(), codec.encode(key), rates=chosen, debounce_key=key)
                made = (await s.create_run(new)).run
                _stored(made, chosen, key, f"create_run (rates {chosen}) returned")
                cases.append((made.id, chosen, key))
            if reflow.implements("children"):
                await s.create_run(NewRun(swf, codec.encode("parent")))
                held = await claim_only(s, swf, P.NEW_RUN_CLAIMABLE)
                child_id = reflow.unique("c")
                new = NewRun(cwf, codec.encode("child"), run_id=child_id, rates=rates)
                child = await s.start_child(held.lease, "spawn", new)
                promise(child is not None, P.LIVE_LEASE_ACCEPTED, "start_child returned None")
                assert child is not None
                _stored(child, rates, None, "start_child returned")
                cases.append((child_id, rates, None))
                await s.finish_run(held.lease, "completed", output=codec.encode(1))
            if reflow.implements("schedules"):
                key, slot = reflow.unique("sched"), far_slot()
                await s.upsert_schedule(
                    ScheduleSpec(key, cwf, codec.encode(None), "every:60", slot)
                )
                try:
                    new = NewRun(
                        cwf,
                        codec.encode({"slot": slot}),
                        idempotency_key=f"{key}@{slot.isoformat()}",
                        rates=rates[:1],
                    )
                    fired = await s.claim_schedule_slot(key, slot, slot + timedelta(minutes=1), new)
                    promise(fired is not None, P.SCHEDULE_SLOT_FIRES, "the slot did not fire")
                    assert fired is not None
                    _stored(fired, rates[:1], None, "claim_schedule_slot returned")
                    cases.append((fired.id, rates[:1], None))
                finally:
                    await s.delete_schedule(key)
            for run_id, chosen, key in cases:
                _stored(await read_run(s, run_id), chosen, key, f"{run_id} as stored")
            workflows = [wf, cwf, *{(await read_run(s, r)).workflow for r, _, _ in cases}]
            for _ in range(2):
                for c in await s.claim_runs(workflows, 20, LONG):
                    step = StepRecord("s", "completed", output=codec.encode(1))
                    await s.save_step_result(c.lease, step, LONG)
                    if c.run.attempts == 1:
                        await s.update_run_status(c.run.id, "pending", lease=c.lease)
                    else:
                        await s.finish_run(c.lease, "completed", output=codec.encode(2))
            for run_id, chosen, key in cases:
                run = await read_run(s, run_id)
                _stored(run, chosen, key, f"{run_id} ({run.status}) after claims and writes")

        reflow.run(body)

    def test_bad_rates_are_refused_and_write_nothing(self, reflow: Harness) -> None:
        """Rates that are not a tuple of at most ``MAX_RUN_RATES``
        ``RateLimit`` with distinct good keys, a max from 1 to ``MAX_RATE``
        and a period of whole milliseconds from 1 ms to ``MAX_RATE_PERIOD``,
        and a limit key starting with ``RATE_BLOCK_PREFIX``, are refused with
        ``ConfigError`` by ``create_run`` (with a fresh key and the key of an
        existing run alike), ``start_child`` and ``claim_schedule_slot``,
        which write nothing. The ends of the ranges are accepted."""
        wf, cwf, pwf = reflow.unique(), reflow.unique("child"), reflow.unique("parent")
        second = timedelta(seconds=1)
        good = RateLimit("k", 1, second)
        bad_rates: list[Any] = [
            [good],
            tuple(RateLimit(f"k{i}", 1, second) for i in range(MAX_RUN_RATES + 1)),
            (good, RateLimit("k", 2, second)),
            (RateLimit("k", 0, second),),
            (RateLimit("k", -1, second),),
            (RateLimit("k", MAX_RATE + 1, second),),
            (RateLimit("k", True, second),),
            (RateLimit("k", 1.0, second),),  # type: ignore[arg-type]
            (RateLimit("k", 1, timedelta(0)),),
            (RateLimit("k", 1, timedelta(microseconds=999)),),
            (RateLimit("k", 1, timedelta(microseconds=1500)),),
            (RateLimit("k", 1, -second),),
            (RateLimit("k", 1, MAX_RATE_PERIOD + timedelta(milliseconds=1)),),
            (RateLimit("k", 1, 1000),),  # type: ignore[arg-type]
            (("k", 1, second),),
            (ConcurrencyLimit("k", 1),),
            (RateLimit("", 1, second),),
            (RateLimit("a\x00b", 1, second),),
            (RateLimit(5, 1, second),),  # type: ignore[arg-type]
            None,
        ]
        bad: list[tuple[str, dict[str, Any]]] = [
            (f"rates={v!r}", {"rates": v}) for v in bad_rates
        ] + [
            (
                "a limit key with the rate prefix",
                {"limits": (ConcurrencyLimit(RATE_BLOCK_PREFIX + "k", 1),)},
            )
        ]

        async def body(s: Storage) -> None:
            await refused_creates(s, wf, bad, P.RATE_ARGS)
            ends = (
                RateLimit(reflow.unique("rate"), 1, timedelta(milliseconds=1)),
                RateLimit(reflow.unique("rate"), MAX_RATE, MAX_RATE_PERIOD),
            )
            made = (await s.create_run(NewRun(wf, codec.encode("v"), rates=ends))).run
            _stored(made, ends, None, "a run with rates at the ends of the ranges")
            if reflow.implements("children"):
                starts = [(f"start_child({what})", args) for what, args in bad]
                await refused_starts(reflow, s, pwf, cwf, starts, P.RATE_ARGS)
            if reflow.implements("schedules"):
                slots = [(f"claim_schedule_slot with a NewRun of {w}", a) for w, a in bad]
                await refused_slots(reflow, s, cwf, slots, P.RATE_ARGS)
            runs = [r.id for r in (await s.list_runs(workflow=cwf)).runs]
            promise(not runs, P.RATE_ARGS, f"refused starts and slots made {runs}")

        reflow.run(body)

    def test_one_claim_takes_no_more_than_max(self, reflow: Harness) -> None:
        """One claim takes runs of a rate's key while the window has room, the
        runs it takes itself counting; it passes over the rest, left pending
        and blocked by the rate, and goes on to take runs of other keys and
        runs without rates. A run of two rates is blocked by the full one."""
        wf = reflow.unique()
        key, roomy, other = reflow.unique("rate"), reflow.unique("rate"), reflow.unique("rate")
        two = RateLimit(key, 2, _FULL)
        log = _Claims(two, RateLimit(roomy, 5, _FULL), RateLimit(other, 1, _FULL))

        async def body(s: Storage) -> None:
            keyed = [await _make(s, wf, i, rates=(two,)) for i in range(4)]
            both = await _make(s, wf, "both", rates=(log.rates[roomy], two))
            free = await _make(s, wf, "free")
            solo = await _make(s, wf, "solo", rates=(log.rates[other],))
            names = {**{r: f"k{i}" for i, r in enumerate(keyed)}, both: "both", free: "free"}
            names[solo] = "solo"
            got = _ids(await _claim(s, wf, log))
            holders = [r for r in got if r in keyed or r == both]
            promise(
                len(holders) <= 2,
                P.RATE_NEVER_EXCEEDED,
                f"one claim took {_names(holders, names)}: {len(holders)} runs of a rate of max 2",
            )
            promise(
                sorted(got) == sorted([*keyed[:2], free, solo]),
                P.RATE_BLOCKED,
                f"the claim took {_names(got, names)}; expected the first two of the key, "
                "the run without rates and the only run of another key",
            )
            for run_id in [*keyed[2:], both]:
                await _check_blocked(
                    s, run_id, _block(key), P.RATE_BLOCKED, f"{names[run_id]}, passed over"
                )
            for run_id in got:
                await _check_free(s, run_id, P.RATE_BLOCKED, f"{names[run_id]}, claimed")
            got = _ids(await _claim(s, wf, log))
            promise(not got, P.RATE_BLOCKED, f"with the window full, claimed {_names(got, names)}")

        reflow.run(body)

    def test_a_window_holds_max_claims_then_the_next_go_once_it_has_room(
        self, reflow: Harness
    ) -> None:
        """Runs of two workflows share a key of max 2: two claims, in separate
        calls and of different workflows, fill the window; the other runs are
        blocked and no claim takes them while it stays full. Once the period
        has passed since those claims, a claim takes the next two, in due
        order, and the last one stays blocked."""
        wf, owf = reflow.unique(), reflow.unique()
        key = reflow.unique("rate")
        rate = RateLimit(key, 2, _WINDOW)
        log = _Claims(rate)

        async def body(s: Storage) -> None:
            a1 = await _make(s, wf, "a1", rates=(rate,))
            b1 = await _make(s, owf, "b1", rates=(rate,))
            rest = [await _make(s, wf, f"a{i}", rates=(rate,)) for i in (2, 3, 4)]
            names = {a1: "a1", b1: "b1", **{r: f"a{i}" for i, r in enumerate(rest, 2)}}
            got = _ids(await _claim(s, wf, log, limit=1))
            promise(got == [a1], P.NEW_RUN_CLAIMABLE, f"claimed {_names(got, names)}, not a1")
            got = _ids(await _claim(s, owf, log))
            promise(
                got == [b1],
                P.RATE_NEVER_EXCEEDED if len(got) > 1 else P.NEW_RUN_CLAIMABLE,
                f"the second claim, of the other workflow, took {_names(got, names)}",
            )
            for _ in range(2):
                got = _ids(await _claim(s, [wf, owf], log))
                promise(
                    not got,
                    P.RATE_NEVER_EXCEEDED,
                    f"with two claims of a rate of max 2 in the window, took {_names(got, names)}",
                )
            for run_id in rest:
                await _check_blocked(s, run_id, _block(key), P.RATE_BLOCKED, names[run_id])
            await _wait_past(s, log.last(key) + rate.period)
            got = _ids(await _claim(s, wf, log))
            promise(
                got == rest[:2],
                P.RATE_RELEASED,
                f"once the window had room, a claim took {_names(got, names)}, expected a2, a3",
            )
            await _check_blocked(
                s, rest[2], _block(key), P.RATE_RELEASED, "a4, with the window full again"
            )

        reflow.run(body)

    def test_room_lets_the_first_blocked_runs_go_whatever_the_claim(self, reflow: Harness) -> None:
        """Once a full window has room for two, the first claim, although of
        another workflow, lets go the two blocked runs a claim takes first (by
        priority, then due time) and no other; the next claim of their
        workflow takes them, and the rest stay blocked."""
        wf, other = reflow.unique(), reflow.unique()
        key = reflow.unique("rate")
        rate = RateLimit(key, 2, _WINDOW)
        log = _Claims(rate)

        async def body(s: Storage) -> None:
            for i in range(2):
                await _make(s, wf, f"holder{i}", rates=(rate,))
            got = await _claim(s, wf, log, limit=2)
            promise(len(got) == 2, P.NEW_RUN_CLAIMABLE, f"claimed {len(got)} of two runs")
            low = await _make(s, wf, "low", priority=-1, rates=(rate,))
            early = await _make(s, wf, "early", priority=5, rates=(rate,))
            mid = await _make(s, wf, "mid", rates=(rate,))
            late = await _make(s, wf, "late", priority=5, rates=(rate,))
            names = {low: "low", early: "early", mid: "mid", late: "late"}
            got = await _claim(s, wf, log)
            promise(not got, P.RATE_NEVER_EXCEEDED, f"claimed {_names(_ids(got), names)}")
            for run_id in names:
                await _check_blocked(s, run_id, _block(key), P.RATE_BLOCKED, names[run_id])
            await _wait_past(s, log.last(key) + rate.period)
            got = await _claim(s, other, log)
            promise(not got, P.CLAIM_LIMIT, f"a claim of an empty workflow took {_ids(got)}")
            for run_id in (early, late):
                await _check_free(
                    s, run_id, P.RATE_RELEASED, f"{names[run_id]}, after a claim with room"
                )
            for run_id in (mid, low):
                await _check_blocked(
                    s,
                    run_id,
                    _block(key),
                    P.RATE_RELEASED,
                    f"{names[run_id]}, the window has room for two",
                )
            got = await _claim(s, wf, log)
            promise(
                _ids(got) == [early, late],
                P.RATE_RELEASED,
                f"the next claim took {_names(_ids(got), names)}, expected early, late",
            )
            for run_id in (mid, low):
                await _check_blocked(s, run_id, _block(key), P.RATE_BLOCKED, names[run_id])

        reflow.run(body)

    def test_a_rate_and_a_concurrency_limit_together(self, reflow: Harness) -> None:
        """Runs holding a limit of max 1 and a rate of max 2: each is blocked
        by whichever is full, the limit first when both are; a run let go by
        its limit is blocked by the rate if the window is full, and goes once
        the window has room, with the limit's room as well."""
        wf = reflow.unique()
        lkey, rkey = reflow.unique("key"), reflow.unique("rate")
        rate = RateLimit(rkey, 2, _WINDOW)
        log = _Claims(rate)
        terms: dict[str, Any] = {"limits": (ConcurrencyLimit(lkey, 1),), "rates": (rate,)}

        async def body(s: Storage) -> None:
            runs = [await _make(s, wf, f"r{i}", **terms) for i in (1, 2, 3)]
            r1, r2, r3 = runs
            names = {r: f"r{i}" for i, r in enumerate(runs, 1)}
            got = await _claim(s, wf, log)
            promise(_ids(got) == [r1], P.LIMIT_NEVER_EXCEEDED, f"claimed {_ids(got)}")
            for run_id in (r2, r3):
                await _check_blocked(s, run_id, lkey, P.LIMIT_BLOCKED, f"{names[run_id]}")
            ok = await s.finish_run(got[0].lease, "completed", output=codec.encode(1))
            promise(ok, P.LIVE_LEASE_ACCEPTED, "finishing r1 was refused")
            got = await _claim(s, wf, log)
            promise(_ids(got) == [r2], P.LIMIT_UNBLOCKED, f"after r1 ended: {_ids(got)}")
            r4 = await _make(s, wf, "r4", **terms)
            names[r4] = "r4"
            more = await _claim(s, wf, log)
            promise(not more, P.RATE_NEVER_EXCEEDED, f"claimed {_ids(more)}")
            await _check_blocked(
                s, r4, lkey, P.RATE_BLOCKED, "r4, with its limit and its rate both full"
            )
            ok = await s.finish_run(got[0].lease, "completed", output=codec.encode(2))
            promise(ok, P.LIVE_LEASE_ACCEPTED, "finishing r2 was refused")
            await _check_free(s, r3, P.LIMIT_UNBLOCKED, "r3, after r2 ended")
            more = await _claim(s, wf, log)
            promise(not more, P.RATE_NEVER_EXCEEDED, f"with the window full, {_ids(more)}")
            await _check_blocked(
                s, r3, _block(rkey), P.RATE_BLOCKED, "r3, let go by its limit, the window full"
            )
            await _check_blocked(s, r4, lkey, P.LIMIT_BLOCKED, "r4, behind r3")
            await _wait_past(s, log.last(rkey) + rate.period)
            got = await _claim(s, wf, log)
            promise(_ids(got) == [r3], P.RATE_RELEASED, f"the window had room: {_ids(got)}")
            ok = await s.finish_run(got[0].lease, "completed", output=codec.encode(3))
            promise(ok, P.LIVE_LEASE_ACCEPTED, "finishing r3 was refused")
            got = await _claim(s, wf, log)
            promise(_ids(got) == [r4], P.LIMIT_UNBLOCKED, f"after r3 ended: {_ids(got)}")

        reflow.run(body)

    def test_a_lapsed_lease_over_its_rate_stays_lapsed(self, reflow: Harness) -> None:
        """A run whose lease lapsed while its rate's window is full is not
        reclaimed, nor blocked: it stays running on its lapsed lease, and a
        due run of the key is blocked. Once the window has room, it is
        reclaimed first (before the blocked run, of a higher priority), and
        the other stays blocked."""
        wf = reflow.unique()
        key = reflow.unique("rate")
        period = _ms(reflow.short_lease * 3 + timedelta(milliseconds=100))
        rate = RateLimit(key, 1, period)
        log = _Claims(rate)

        async def body(s: Storage) -> None:
            dead = await _make(s, wf, "dead", rates=(rate,))
            got = await _claim(s, wf, log, limit=1, lease=reflow.short_lease)
            promise(_ids(got) == [dead], P.NEW_RUN_CLAIMABLE, f"claimed {_ids(got)}, not the run")
            waiting = await _make(s, wf, "waiting", priority=50, rates=(rate,))
            await reflow.lapse()
            now = await storage_now(s)
            if now >= log.last(key) + period:
                pytest.skip("the lease took longer than its rate's period to lapse")
            got = await _claim(s, wf, log)
            promise(
                not got,
                P.RATE_RECLAIM if dead in _ids(got) else P.RATE_NEVER_EXCEEDED,
                f"with the window full, a claim took {_ids(got)}",
            )
            run = await _check_free(s, dead, P.RATE_RECLAIM, "the lapsed run over its rate")
            promise(
                (run.status, run.reclaims, run.lease_epoch) == ("running", 0, 1),
                P.RATE_RECLAIM,
                f"the lapsed run over its rate is {run.status!r}, {run.reclaims} reclaims, "
                f"epoch {run.lease_epoch}",
            )
            await _check_blocked(s, waiting, _block(key), P.RATE_BLOCKED, "the due run")
            await _wait_past(s, log.last(key) + period)
            got = await _claim(s, wf, log)
            promise(
                _ids(got) == [dead] and got[0].reclaimed,
                P.RATE_RECLAIM,
                f"with room for one, a claim took {_ids(got)}, expected the lapsed run, "
                "as a reclaim",
            )
            await _check_blocked(s, waiting, _block(key), P.RATE_BLOCKED, "after the reclaim")

        reflow.run(body)

    def test_cancel_clears_a_rate_block_and_lets_nothing_go(self, reflow: Harness) -> None:
        """Cancelling (or failing) a run blocked by a rate clears its
        ``blocked_by`` and lets no other blocked run go (the window is still
        full); a requeued one is pending and not blocked, and the next claim
        blocks it again."""
        wf = reflow.unique()
        key = reflow.unique("rate")
        rate = RateLimit(key, 1, _FULL)
        log = _Claims(rate)

        async def body(s: Storage) -> None:
            await _make(s, wf, "holder", rates=(rate,))
            got = await _claim(s, wf, log)
            promise(len(got) == 1, P.NEW_RUN_CLAIMABLE, f"claimed {_ids(got)}, not the holder")
            doomed = await _make(s, wf, "doomed", priority=3, rates=(rate,))
            failed = await _make(s, wf, "failed", priority=2, rates=(rate,))
            other = await _make(s, wf, "other", rates=(rate,))
            got = await _claim(s, wf, log)
            promise(not got, P.RATE_NEVER_EXCEEDED, f"with the window full, claimed {_ids(got)}")
            for run_id in (doomed, failed, other):
                await _check_blocked(s, run_id, _block(key), P.RATE_BLOCKED, "passed over")
            ends: list[tuple[str, Literal["cancelled", "failed"]]] = [
                (doomed, "cancelled"),
                (failed, "failed"),
            ]
            for run_id, status in ends:
                ok = await s.update_run_status(run_id, status, error=codec.encode("x"))
                promise(ok, P.CANCEL, f"ending a blocked run {status} returned False")
                run = await _check_free(s, run_id, P.LIMIT_CANCEL_CLEARS, f"ended {status}")
                promise(run.status == status, P.CANCEL, f"ended {status}: {run.status}")
            await _check_blocked(
                s, other, _block(key), P.RATE_BLOCKED, "after blocked runs ended, window full"
            )
            for run_id in (doomed, failed):
                promise(await s.requeue_run(run_id), P.REQUEUE, f"requeue of {run_id} refused")
                run = await _check_free(s, run_id, P.LIMIT_CANCEL_CLEARS, "requeued")
                promise(run.status == "pending", P.REQUEUE, f"requeued: {run.status}")
            got = await _claim(s, wf, log)
            promise(not got, P.RATE_NEVER_EXCEEDED, f"with the window full, claimed {_ids(got)}")
            for run_id in (doomed, failed, other):
                await _check_blocked(
                    s, run_id, _block(key), P.RATE_BLOCKED, "requeued, passed over"
                )

        reflow.run(body)

    def test_runs_blocked_by_a_rate_do_not_delay_other_runs(self, reflow: Harness) -> None:
        """Many due runs of a high priority wait for a full rate: a claim of
        three still takes three runs without rates (the blocked runs take no
        place in it), and the next claims take the rest, leaving the blocked
        runs where they are."""
        wf = reflow.unique()
        key = reflow.unique("rate")
        rate = RateLimit(key, 1, _FULL)
        log = _Claims(rate)

        async def body(s: Storage) -> None:
            await _make(s, wf, "holder", rates=(rate,))
            got = await _claim(s, wf, log, limit=1)
            promise(len(got) == 1, P.NEW_RUN_CLAIMABLE, "the holder was not claimed")
            blocked = []
            for i in range(20):
                new = NewRun(wf, codec.encode(i), priority=9, rates=(rate,))
                blocked.append((await s.create_run(new)).run.id)
            got = await _claim(s, wf, log)
            promise(not got, P.RATE_NEVER_EXCEEDED, f"with the window full, claimed {_ids(got)}")
            others = [await _make(s, wf, f"other{i}") for i in range(5)]
            got = await _claim(s, wf, log, limit=3)
            promise(
                _ids(got) == others[:3],
                P.RATE_OTHERS_UNDELAYED,
                f"a claim of 3, with 20 runs blocked by a rate, took {len(got)} of the 5 runs "
                f"without rates{'' if _ids(got) == others[: len(got)] else ', out of order'}",
            )
            got = await _claim(s, wf, log, limit=3)
            promise(
                _ids(got) == others[3:],
                P.RATE_OTHERS_UNDELAYED,
                f"the next claim of 3 took {len(got)} of the last 2 runs without rates",
            )
            left = [r for r in blocked if (await read_run(s, r)).status != "pending"]
            promise(
                not left,
                P.RATE_BLOCKED,
                f"{len(left)} runs blocked by the rate are no longer pending",
            )

        reflow.run(body)


class TestRateRaces:
    def test_concurrent_claimers_never_exceed_a_rate(self, reflow: Harness) -> None:
        """Claimers on several connections claim and finish runs of a rate of
        max 3 per short period, of two workflows, until every run is done: no
        window of the period holds more than three of the claims (by the
        storage's clock), and every run ends up claimed."""
        wf, owf = reflow.unique(), reflow.unique()
        key = reflow.unique("rate")
        rate = RateLimit(key, 3, timedelta(milliseconds=250))
        log = _Claims(rate)
        total = 12

        async def body(s: Storage) -> None:
            made = []
            for i in range(total):
                new = NewRun((wf, owf)[i % 2], codec.encode(i), rates=(rate,))
                made.append((await s.create_run(new)).run.id)
            stores = [s, *[await reflow.open() for _ in range(2)]]
            done: set[str] = set()
            twice: list[str] = []
            deadline = asyncio.get_running_loop().time() + 10

            async def claimer(n: int) -> None:
                store = stores[n % len(stores)]
                while len(done) < total and asyncio.get_running_loop().time() < deadline:
                    batch = await store.claim_runs([owf, wf][n % 2 :], 1 + n % 3, LONG)
                    log.add(batch)
                    for c in batch:
                        if c.run.id in done:
                            twice.append(c.run.id)
                        done.add(c.run.id)
                        await store.finish_run(c.lease, "completed", output=codec.encode(n))
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(claimer(n) for n in range(6)))
            log.check("claims of six claimers on three connections")
            promise(not twice, P.ONE_LIVE_LEASE, f"claimed again after finishing: {twice}")
            left = sorted(set(made) - done)
            promise(
                not left,
                P.RATE_RELEASED,
                f"{len(left)} of {total} runs never claimed in ten seconds of a rate of 3 per "
                f"250 ms",
            )

        reflow.run(body)


async def _debounce(
    s: Storage,
    wf: str,
    key: str,
    value: object,
    *,
    delay: timedelta | None = None,
    deadline: timedelta | None = None,
    priority: int = 0,
    limits: tuple[ConcurrencyLimit, ...] = (),
    rates: tuple[RateLimit, ...] = (),
) -> CreateResult:
    new = NewRun(
        wf,
        codec.encode(value),
        delay=delay,
        deadline=deadline,
        priority=priority,
        limits=limits,
        rates=rates,
        debounce_key=key,
    )
    made = await s.create_run(new)
    check_times(made.run, f"the run a create with debounce_key {key!r} returned")
    return made


def _replaced(
    result: CreateResult, first: RunRecord, value: object, what: str, **terms: Any
) -> None:
    """``result`` is ``first`` as a debounced create with ``value`` and
    ``terms`` leaves it."""
    run = result.run
    found = []
    if result.created or run.id != first.id:
        found.append(f"created={result.created}, id {run.id}, expected {first.id} back")
    if codec.decode(run.input) != value:
        found.append(f"input {codec.decode(run.input)!r}, expected {value!r}")
    for field in ("priority", "limits", "rates"):
        want = terms.get(field, 0 if field == "priority" else ())
        if getattr(run, field) != want:
            found.append(f"{field} {getattr(run, field)!r}, expected {want!r}")
    for field in ("created_at", "deadline_at", "debounce_key", "workflow"):
        if getattr(run, field) != getattr(first, field):
            found.append(f"{field} {getattr(run, field)!r}, was {getattr(first, field)!r}")
    if (run.attempts, run.lease_epoch, run.blocked_by) != (0, 0, None):
        found.append(f"attempts {run.attempts}, epoch {run.lease_epoch}, blocked {run.blocked_by}")
    promise(not found, P.DEBOUNCE_REPLACES, f"{what}: " + "; ".join(found))


class TestDebounce:
    def test_a_create_with_an_open_runs_key_replaces_it(self, reflow: Harness) -> None:
        """Creates with the debounce key of an open run (delayed, then pending)
        return it with ``created=False``, their input, priority, limits and
        rates in place of its own, due their delay from now (never after its
        deadline), its id, creation and deadline kept; the workflow holds one
        run, which a claim takes once it is due."""
        wf = reflow.unique()
        key = reflow.unique("debounce")
        limits = (ConcurrencyLimit(reflow.unique("key"), 3),)
        rates = (RateLimit(reflow.unique("rate"), 5, _FULL),)

        async def body(s: Storage) -> None:
            first = await _debounce(s, wf, key, 1, delay=_HOUR, deadline=timedelta(minutes=30))
            promise(
                first.created and first.run.status == "delayed",
                P.CREATE_DELAYED,
                f"the first create: created={first.created}, {first.run.status}",
            )
            _stored(first.run, (), key, "the first create returned")
            await asyncio.sleep(_APART)
            before = await storage_now(s)
            second = await _debounce(s, wf, key, 2, priority=3, limits=limits, rates=rates)
            after = await storage_now(s)
            what = "a create without delay, with the key of a delayed run"
            _replaced(second, first.run, 2, what, priority=3, limits=limits, rates=rates)
            wrong = off_bracket(second.run.wake_at, before, after)
            promise(
                second.run.status == "pending" and not wrong,
                P.DEBOUNCE_REPLACES,
                f"{what}: {second.run.status}, due {wrong or 'now'}",
            )
            stored = await read_run(s, first.run.id)
            _replaced(
                CreateResult(stored, False),
                first.run,
                2,
                "as stored",
                priority=3,
                limits=limits,
                rates=rates,
            )
            before = await storage_now(s)
            third = await _debounce(s, wf, key, 3, delay=timedelta(minutes=5))
            after = await storage_now(s)
            what = "a create with a delay of 5 minutes, with the key of a pending run"
            _replaced(third, first.run, 3, what)
            five = timedelta(minutes=5)
            wrong = off_bracket(third.run.wake_at, before + five, after + five)
            promise(
                third.run.status == "delayed" and not wrong,
                P.DEBOUNCE_REPLACES,
                f"{what}: {third.run.status}, due {wrong or 'in 5 minutes'}",
            )
            fourth = await _debounce(s, wf, key, 4, delay=_HOUR)
            what = "a create with a delay past the run's deadline"
            _replaced(fourth, first.run, 4, what)
            promise(
                fourth.run.status == "delayed" and fourth.run.wake_at == first.run.deadline_at,
                P.DEBOUNCE_REPLACES,
                f"{what}: {fourth.run.status}, due {fourth.run.wake_at}, its deadline is "
                f"{first.run.deadline_at}",
            )
            got = _ids(await _claim(s, wf))
            promise(not got, P.DELAYED_NOT_CLAIMABLE, f"a claim took the delayed run: {got}")
            fifth = await _debounce(s, wf, key, 5, priority=-2)
            _replaced(fifth, first.run, 5, "a create without delay", priority=-2)
            runs = [r.id for r in (await s.list_runs(workflow=wf)).runs]
            promise(
                runs == [first.run.id],
                P.DEBOUNCE_REPLACES,
                f"five creates with one debounce key left {len(runs)} runs",
            )
            taken = await _claim(s, wf)
            promise(_ids(taken) == [first.run.id], P.DEBOUNCE_REPLACES, f"claimed {_ids(taken)}")
            value = codec.decode(taken[0].run.input)
            promise(value == 5, P.DEBOUNCE_REPLACES, f"claimed with input {value!r}, not 5")

        reflow.run(body)

    def test_a_debounced_create_unblocks_the_run(self, reflow: Harness) -> None:
        """A create with the key of an open run blocked by a full limit (or a
        full rate) clears ``blocked_by``; if it keeps the limit, the next
        claim blocks the run again; if it drops it, the next claim takes it."""
        wf, hwf = reflow.unique(), reflow.unique("holder")
        lkey, rkey = reflow.unique("key"), reflow.unique("rate")
        one = (ConcurrencyLimit(lkey, 1),)
        rate = (RateLimit(rkey, 1, _FULL),)

        async def body(s: Storage) -> None:
            for terms in ({"limits": one}, {"rates": rate}):
                by = lkey if "limits" in terms else _block(rkey)
                key = reflow.unique("debounce")
                await s.create_run(NewRun(hwf, codec.encode("holder"), **terms))
                held = await _claim(s, hwf)
                promise(len(held) == 1, P.NEW_RUN_CLAIMABLE, "the holder was not claimed")
                first = await _debounce(s, wf, key, 1, **terms)
                got = _ids(await _claim(s, wf))
                promise(not got, P.LIMIT_NEVER_EXCEEDED, f"with {by} full, claimed {got}")
                await _check_blocked(s, first.run.id, by, P.RATE_BLOCKED, "passed over")
                second = await _debounce(s, wf, key, 2, **terms)
                _replaced(second, first.run, 2, f"a create with the key, blocked by {by}", **terms)
                await _check_free(s, first.run.id, P.DEBOUNCE_REPLACES, "debounced, as stored")
                got = _ids(await _claim(s, wf))
                promise(not got, P.LIMIT_NEVER_EXCEEDED, f"with {by} full, claimed {got}")
                await _check_blocked(s, first.run.id, by, P.RATE_BLOCKED, "passed over again")
                third = await _debounce(s, wf, key, 3)
                _replaced(third, first.run, 3, f"a create with the key, without {by}")
                got = _ids(await _claim(s, wf))
                promise(
                    got == [first.run.id],
                    P.DEBOUNCE_REPLACES,
                    f"the debounced run, free of {by}, was not claimed: {got}",
                )

        reflow.run(body)

    def test_once_claimed_or_ended_the_next_create_makes_a_new_run(self, reflow: Harness) -> None:
        """A debounced run a claim took is no longer open, even handed back
        pending: the next create with its key makes a new run, which the
        creates after it replace; so does a create after the open run is
        cancelled. Other workflows, other keys and creates without a key
        never touch it."""
        wf, owf = reflow.unique(), reflow.unique()
        key, okey = reflow.unique("debounce"), reflow.unique("debounce")

        async def body(s: Storage) -> None:
            r1 = await _debounce(s, wf, key, 1)
            held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            ok = await s.update_run_status(r1.run.id, "pending", lease=held.lease)
            promise(ok, P.LIVE_LEASE_ACCEPTED, "handing the run back was refused")
            r2 = await _debounce(s, wf, key, 2)
            promise(
                r2.created and r2.run.id != r1.run.id,
                P.DEBOUNCE_AFTER_CLAIM,
                f"a create with the key of a run claimed once, handed back: created="
                f"{r2.created}, {'the same' if r2.run.id == r1.run.id else 'another'} run",
            )
            again = await _debounce(s, wf, key, 3)
            _replaced(again, r2.run, 3, "a create with the key of the new open run")
            stored = await read_run(s, r1.run.id)
            promise(
                codec.decode(stored.input) == 1,
                P.DEBOUNCE_AFTER_CLAIM,
                f"the run claimed once has input {codec.decode(stored.input)!r}, not 1",
            )
            got = await _claim(s, wf)
            promise(
                sorted(_ids(got)) == sorted([r1.run.id, r2.run.id]),
                P.NO_LOST_RUNS,
                f"claimed {_ids(got)}",
            )
            r3 = await _debounce(s, wf, key, 4)
            promise(
                r3.created and r3.run.id not in (r1.run.id, r2.run.id),
                P.DEBOUNCE_AFTER_CLAIM,
                f"a create with the key of running runs: created={r3.created}, {r3.run.id}",
            )
            ok = await s.update_run_status(r3.run.id, "cancelled", error=codec.encode("x"))
            promise(ok, P.CANCEL, "cancelling the open run refused")
            r4 = await _debounce(s, wf, key, 5)
            promise(
                r4.created and r4.run.id != r3.run.id,
                P.DEBOUNCE_AFTER_CLAIM,
                f"a create with the key of a cancelled run: created={r4.created}",
            )
            cancelled = await read_run(s, r3.run.id)
            promise(
                cancelled.status == "cancelled" and codec.decode(cancelled.input) == 4,
                P.DEBOUNCE_AFTER_CLAIM,
                f"the cancelled run is {cancelled.status}, input {cancelled.input}",
            )
            apart = [
                await _debounce(s, owf, key, 6),
                await _debounce(s, wf, okey, 7),
                await s.create_run(NewRun(wf, codec.encode(8))),
            ]
            ids = {r4.run.id, *(r.run.id for r in apart)}
            promise(
                all(r.created for r in apart) and len(ids) == 4,
                P.DEBOUNCE_AFTER_CLAIM,
                "creates of another workflow, another key or none replaced a run: created="
                f"{[r.created for r in apart]}",
            )
            stored = await read_run(s, r4.run.id)
            promise(
                codec.decode(stored.input) == 5 and stored.status == "pending",
                P.DEBOUNCE_AFTER_CLAIM,
                f"the open run is {stored.status}, input {codec.decode(stored.input)!r}, "
                "after creates of other workflows and keys",
            )

        reflow.run(body)

    def test_a_requeued_run_takes_its_key_back_only_if_no_other_holds_it(
        self, reflow: Harness
    ) -> None:
        """A debounced run cancelled before any claim and requeued is open for
        its key again when no other run holds it; when another open run took
        the key meanwhile, the requeued run lets go of its key, and creates
        with it keep replacing the other."""
        wf, lone = reflow.unique(), reflow.unique()
        key = reflow.unique("debounce")
        hour = timedelta(hours=1)

        async def body(s: Storage) -> None:
            error = codec.encode("x")
            first = await _debounce(s, wf, key, 1, delay=hour)
            await s.update_run_status(first.run.id, "cancelled", error=error)
            second = await _debounce(s, wf, key, 2, delay=hour)
            promise(second.created, P.DEBOUNCE_AFTER_CLAIM, "a create after a cancel")
            ok = await s.requeue_run(first.run.id)
            promise(ok, P.REQUEUE, "requeueing the cancelled run was refused")
            requeued = await read_run(s, first.run.id)
            promise(
                requeued.debounce_key is None and requeued.status == "pending",
                P.DEBOUNCE_REQUEUE,
                f"the requeued run, whose key another open run holds, is {requeued.status} "
                f"with debounce_key {requeued.debounce_key!r}",
            )
            third = await _debounce(s, wf, key, 3, delay=hour)
            promise(
                not third.created and third.run.id == second.run.id,
                P.DEBOUNCE_REQUEUE,
                f"a create after the requeue replaced {third.run.id}, not the open run "
                f"{second.run.id} (created={third.created})",
            )
            alone = await _debounce(s, lone, key, 1, delay=hour)
            await s.update_run_status(alone.run.id, "cancelled", error=error)
            await s.requeue_run(alone.run.id)
            back = await _debounce(s, lone, key, 2, delay=hour)
            promise(
                not back.created and back.run.id == alone.run.id,
                P.DEBOUNCE_REQUEUE,
                f"a create with the key of a requeued run no other holds: created="
                f"{back.created}, {'the same' if back.run.id == alone.run.id else 'another'} run",
            )
            promise(
                codec.decode(back.run.input) == 2,
                P.DEBOUNCE_REQUEUE,
                f"the requeued run replaced has input {codec.decode(back.run.input)!r}, not 2",
            )

        reflow.run(body)

    def test_concurrent_creates_with_one_key_leave_one_run(self, reflow: Harness) -> None:
        """Creates with one debounce key, at once on three connections, all
        return the same run; one of them created it, and the workflow holds
        that run alone, with the input of one of the creates."""
        wf = reflow.unique()
        key = reflow.unique("debounce")

        async def body(s: Storage) -> None:
            stores = [s, *[await reflow.open() for _ in range(2)]]
            results = await asyncio.gather(
                *(_debounce(stores[i % 3], wf, key, i) for i in range(9))
            )
            ids = {r.run.id for r in results}
            created = [r for r in results if r.created]
            runs = [r.id for r in (await s.list_runs(workflow=wf)).runs]
            promise(
                len(ids) == 1 and len(created) == 1 and runs == list(ids),
                P.DEBOUNCE_ONE_OPEN,
                f"9 concurrent creates returned {len(ids)} runs, {len(created)} created; "
                f"the workflow holds {len(runs)}",
            )
            stored = await read_run(s, runs[0])
            promise(
                codec.decode(stored.input) in range(9),
                P.DEBOUNCE_ONE_OPEN,
                f"input {stored.input}",
            )

        reflow.run(body)

    def test_bad_debounce_keys_are_refused_and_write_nothing(self, reflow: Harness) -> None:
        """A ``debounce_key`` with an ``idempotency_key``, or one that is not a
        good key, is refused by ``create_run`` and ``claim_schedule_slot``,
        and ``start_child`` refuses any, with ``ConfigError``, writing
        nothing: the open run of the key is left as it was."""
        wf, cwf, pwf = reflow.unique(), reflow.unique("child"), reflow.unique("parent")
        key = reflow.unique("debounce")

        async def call(c: Callable[[], Awaitable[Any]], what: str) -> None:
            await refused(c, what, P.DEBOUNCE_ARGS)

        async def body(s: Storage) -> None:
            value = codec.encode("v")
            kept = (await _debounce(s, wf, key, "kept")).run
            bad: list[tuple[str, dict[str, Any]]] = [
                ("with an idempotency key", {"debounce_key": key, "idempotency_key": "i"}),
                ("empty", {"debounce_key": ""}),
                ("with a NUL", {"debounce_key": "a\x00b"}),
                ("not a str", {"debounce_key": 5}),
            ]
            for what, args in bad:
                new = NewRun(wf, value, **args)
                await call(functools.partial(s.create_run, new), f"create_run(debounce_key {what})")
            runs = [r.id for r in (await s.list_runs(workflow=wf)).runs]
            promise(runs == [kept.id], P.DEBOUNCE_ARGS, f"refused creates left the runs {runs}")
            promise(
                await s.get_run(kept.id) == kept,
                P.DEBOUNCE_ARGS,
                "a refused create with the debounce key of an open run changed it",
            )
            if reflow.implements("children"):
                start = [("start_child with a debounce_key", {"debounce_key": key})]
                await refused_starts(reflow, s, pwf, cwf, start, P.DEBOUNCE_ARGS)
            if reflow.implements("schedules"):
                what = "claim_schedule_slot with a debounce_key and an idempotency key"
                await refused_slots(
                    reflow, s, cwf, [(what, {"debounce_key": key})], P.DEBOUNCE_ARGS
                )
            runs = [r.id for r in (await s.list_runs(workflow=cwf)).runs]
            promise(not runs, P.DEBOUNCE_ARGS, f"refused starts and slots made {runs}")

        reflow.run(body)
