"""The reads of a dashboard: the runs of an idempotency key
(:meth:`~reflow_core.storage.Storage.find_runs_by_key`), a run's buffered
events (:meth:`~reflow_core.storage.Storage.list_buffered_events`) and the
runs that finished in each of the last minutes
(:meth:`~reflow_core.storage.Storage.finished_history`).

``finished_history`` counts the whole store, not one workflow, so its tests
compare the history before and after what they do, minute by minute, each
run counted in the minute of the ``updated_at`` it reads back as it ended:
they expect no other client to end, requeue or purge runs in that store
while they run. One of them purges every run of the store that has
finished, as the retention tests do, and one waits for the storage clock's
next minute (up to a minute of real time): it runs only with
``--reflow-wait-minutes``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_conformance.strategies import BAD_TEXT
from reflow_core import codec
from reflow_core.storage import (
    MAX_HISTORY_MINUTES,
    BufferedEvent,
    FinishedMinute,
    NewRun,
    RunRecord,
    StepRecord,
    Storage,
)

from ._events import took
from ._retention import clear_finished
from ._util import (
    LONG,
    check_times,
    claim_only,
    create,
    create_many,
    decoded,
    read_run,
    refused,
    storage_now,
)

pytestmark = [pytest.mark.reflow_conformance, pytest.mark.reflow_area("dashboard")]

__all__ = [
    "TestBufferedEvents",
    "TestDashboardArguments",
    "TestFinishedHistory",
    "TestHistoryWindow",
    "TestRunsByKey",
]

_TICK = 0.01
"""Seconds between creates whose times must differ (a store keeps milliseconds at least)."""
_MINUTE = timedelta(minutes=1)
_ENDS = ("completed", "failed", "cancelled")

Counts = dict[datetime, tuple[int, int, int]]
"""Runs finished by minute: ``(completed, failed, cancelled)``."""


def _minute(value: datetime) -> datetime:
    """The start of the minute ``value`` falls in (UTC, seconds and microseconds zero)."""
    return value.astimezone(UTC).replace(second=0, microsecond=0)


def _show(counts: Counts) -> str:
    """Counts by minute, for a failure message."""
    if not counts:
        return "nothing"
    return ", ".join(
        f"{minute:%H:%M} completed {c} failed {f} cancelled {x}"
        for minute, (c, f, x) in sorted(counts.items())
    )


# -- the history -------------------------------------------------------------------------


@dataclass(frozen=True)
class History:
    """One reading of ``finished_history(minutes)``, checked for its shape."""

    counts: Counts
    first: datetime
    """The first minute of its window, by the storage clock read after it."""
    before: datetime
    after: datetime
    """The storage clock read just before and just after it."""

    def in_one_minute(self) -> bool:
        return _minute(self.before) == _minute(self.after)


async def _history(s: Storage, when: str, minutes: int = MAX_HISTORY_MINUTES) -> History:
    """``finished_history(minutes)``: whole minutes, oldest first, each once,
    none without a finished run, none outside the window."""
    before = await storage_now(s)
    entries = await s.finished_history(minutes)
    after = await storage_now(s)
    what = f"finished_history({minutes}) {when}"
    promise(isinstance(entries, list), P.HISTORY_COUNTS, f"{what} returned {entries!r}")
    earliest = _minute(before) - (minutes - 1) * _MINUTE
    latest = _minute(after)
    counts: Counts = {}
    previous: datetime | None = None
    for entry in entries:
        promise(
            isinstance(entry, FinishedMinute),
            P.HISTORY_COUNTS,
            f"{what}: {entry!r} is not a FinishedMinute",
        )
        check_times(entry, f"{what}, an entry")
        minute = entry.minute
        values = (entry.completed, entry.failed, entry.cancelled)
        promise(
            minute.second == 0 and minute.microsecond == 0,
            P.HISTORY_COUNTS,
            f"{what}: {minute.isoformat()} is not the start of a minute",
        )
        promise(
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values),
            P.HISTORY_COUNTS,
            f"{what}: the counts of {minute.isoformat()} are {values!r}",
        )
        promise(
            any(values),
            P.HISTORY_WINDOW,
            f"{what}: {minute.isoformat()} is listed, with no run finished in it",
        )
        promise(
            previous is None or minute > previous,
            P.HISTORY_COUNTS,
            f"{what}: {minute.isoformat()} comes after {previous}: not oldest first, each once",
        )
        promise(
            earliest <= minute <= latest,
            P.HISTORY_WINDOW,
            f"{what}: {minute.isoformat()} is outside the window of the last {minutes} "
            f"minutes, {earliest:%H:%M} to {latest:%H:%M} by the storage clock",
        )
        counts[minute] = values
        previous = minute
    return History(counts, latest - (minutes - 1) * _MINUTE, before, after)


def _changes(before: History, after: History) -> Counts:
    """How the counts changed from ``before`` to ``after``, in the minutes
    both windows hold (the minutes that did not change left out)."""
    found: Counts = {}
    for minute in set(before.counts) | set(after.counts):
        if minute < after.first:
            continue
        old = before.counts.get(minute, (0, 0, 0))
        new = after.counts.get(minute, (0, 0, 0))
        change = (new[0] - old[0], new[1] - old[1], new[2] - old[2])
        if any(change):
            found[minute] = change
    return found


def _counted(runs: Iterable[RunRecord], sign: int = 1) -> Counts:
    """Where runs that ended count: each in the minute of its ``updated_at``,
    by its status (``sign`` -1: where they no longer count)."""
    found: dict[datetime, list[int]] = {}
    for run in runs:
        slot = found.setdefault(_minute(run.updated_at), [0, 0, 0])
        slot[_ENDS.index(run.status)] += sign
    return {minute: (c, f, x) for minute, (c, f, x) in found.items() if c or f or x}


def _added(*counts: Counts) -> Counts:
    total: dict[datetime, list[int]] = {}
    for each in counts:
        for minute, values in each.items():
            slot = total.setdefault(minute, [0, 0, 0])
            for i, value in enumerate(values):
                slot[i] += value
    return {minute: (c, f, x) for minute, (c, f, x) in total.items() if c or f or x}


def _expect_changes(
    before: History, after: History, expected: Counts, name: str, what: str
) -> None:
    changes = _changes(before, after)
    promise(
        changes == expected,
        name,
        f"{what}: the history changed by {_show(changes)}; expected {_show(expected)}",
    )


async def _ended(s: Storage, run_ids: Sequence[str], status: str, name: str) -> list[RunRecord]:
    """The runs as stored, each checked to have ended with ``status`` (promise ``name``)."""
    runs = [await read_run(s, run_id) for run_id in run_ids]
    for run in runs:
        promise(run.status == status, name, f"run {run.id} is {run.status}, expected {status}")
    return runs


async def _finish_one(s: Storage, workflow: str, status: str) -> RunRecord:
    """A new run of ``workflow``, claimed and ended with ``status`` by its worker (as stored)."""
    await create(s, workflow)
    held = await claim_only(s, workflow, P.NEW_RUN_CLAIMABLE)
    if status == "completed":
        await s.finish_run(held.lease, "completed", output=codec.encode(1))
    else:
        await s.finish_run(held.lease, "failed", error=codec.encode("boom"))
    (run,) = await _ended(s, [held.run.id], status, P.FINISH_ATOMIC)
    return run


class TestFinishedHistory:
    def test_every_end_counts_in_its_minute_by_status(self, reflow: Harness) -> None:
        """Runs that end every way (finished by their worker, failed or
        cancelled from outside while running, pending or delayed, a cancel's
        cascade to children) each count once, by status, in the minute of
        their ``updated_at``; runs that have not ended do not count."""
        wf, pwf, cwf = reflow.unique(), reflow.unique("parent"), reflow.unique("child")

        async def body(s: Storage) -> None:
            before = await _history(s, "before the runs ended")
            ids = await create_many(s, wf, 7)
            held = {c.run.id: c.lease for c in await s.claim_runs([wf], 10, LONG)}
            promise(len(held) == 7, P.NO_LOST_RUNS, f"claimed {len(held)} of 7 runs")
            done, done_with_step, failed, failed_outside, cancelled, napping, waiting = ids
            pending = (await create(s, wf, "pending")).run.id
            later = (await s.create_run(NewRun(wf, codec.encode("later"), delay=LONG))).run.id
            untouched = (await create(s, wf, "untouched")).run.id
            last = StepRecord("last", "completed", output=codec.encode(2))
            await s.finish_run(held[done], "completed", output=codec.encode(1))
            await s.finish_run(held[done_with_step], "completed", output=last.output, step=last)
            await s.finish_run(held[failed], "failed", error=codec.encode("boom"))
            await s.update_run_status(failed_outside, "failed", error=codec.encode("stop"))
            await s.update_run_status(cancelled, "cancelled")
            await s.update_run_status(pending, "cancelled")
            await s.update_run_status(later, "cancelled")
            await s.sleep_run(held[napping], "nap", LONG)
            await s.wait_run(held[waiting], "hold", "never", LONG)
            ended = [
                *await _ended(s, [done, done_with_step], "completed", P.FINISH_ATOMIC),
                *await _ended(s, [failed, failed_outside], "failed", P.FINISH_ATOMIC),
                *await _ended(s, [cancelled, pending, later], "cancelled", P.CANCEL),
            ]
            if reflow.implements("children"):
                await create(s, pwf, "parent")
                parent = await claim_only(s, pwf, P.NEW_RUN_CLAIMABLE)
                kids = [f"{parent.run.id}-{i}" for i in range(2)]
                for kid in kids:
                    await s.start_child(parent.lease, "spawn", NewRun(cwf, "1", run_id=kid))
                await s.update_run_status(parent.run.id, "cancelled")
                family = [parent.run.id, *kids]
                ended += await _ended(s, family, "cancelled", P.CANCEL_CASCADES)
            after = await _history(s, "after the runs ended")
            _expect_changes(
                before,
                after,
                _counted(ended),
                P.HISTORY_COUNTS,
                f"after {len(ended)} runs ended ({untouched} pending, {napping} sleeping and "
                f"{waiting} waiting did not)",
            )

        reflow.run(body)

    def test_a_requeued_run_counts_again_only_when_it_ends_again(self, reflow: Harness) -> None:
        """A requeue takes a failed or cancelled run out of the minute it
        ended in; when it ends again it counts in the minute of that end,
        with the status it has then."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            failing, cancelling = await create_many(s, wf, 2)
            held = {c.run.id: c.lease for c in await s.claim_runs([wf], 2, LONG)}
            promise(len(held) == 2, P.NO_LOST_RUNS, f"claimed {len(held)} of 2 runs")
            await s.finish_run(held[failing], "failed", error=codec.encode("boom"))
            await s.update_run_status(cancelling, "cancelled")
            first = [
                *await _ended(s, [failing], "failed", P.FINISH_ATOMIC),
                *await _ended(s, [cancelling], "cancelled", P.CANCEL),
            ]
            ended = await _history(s, "after a run failed and one was cancelled")
            for run_id in (failing, cancelling):
                done = await s.requeue_run(run_id)
                promise(done, P.REQUEUE_ONLY_ENDED, f"requeue_run({run_id!r}) returned False")
            requeued = await _history(s, "after both were requeued")
            _expect_changes(
                ended,
                requeued,
                _counted(first, -1),
                P.HISTORY_REQUEUE,
                "requeueing a failed and a cancelled run",
            )
            await asyncio.sleep(_TICK)
            held = {c.run.id: c.lease for c in await s.claim_runs([wf], 2, LONG)}
            promise(len(held) == 2, P.DUE_CLAIMABLE, f"claimed {len(held)} of 2 requeued runs")
            await s.finish_run(held[failing], "completed", output=codec.encode("fixed"))
            await s.update_run_status(cancelling, "cancelled")
            second = [
                *await _ended(s, [failing], "completed", P.FINISH_ATOMIC),
                *await _ended(s, [cancelling], "cancelled", P.CANCEL),
            ]
            again = await _history(s, "after both ended again")
            _expect_changes(
                requeued,
                again,
                _counted(second),
                P.HISTORY_REQUEUE,
                "the requeued runs ending again, one completed and one cancelled",
            )
            _expect_changes(
                ended,
                again,
                _added(_counted(first, -1), _counted(second)),
                P.HISTORY_REQUEUE,
                "two runs ended, were requeued and ended again",
            )

        reflow.run(body)

    def test_purged_runs_no_longer_count(self, reflow: Harness) -> None:
        """Once ``purge_finished`` has deleted every run that finished, the
        history is empty, and the runs' key finds nothing."""
        wf, key = reflow.unique(), reflow.unique("key")

        async def body(s: Storage) -> None:
            await create(s, wf, key=key)
            held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            await s.finish_run(held.lease, "completed", output=codec.encode(1))
            other = (await create(s, f"{wf}-other", key=key)).run
            await s.update_run_status(other.id, "cancelled")
            counted = await _history(s, "before the purge")
            promise(counted.counts, P.HISTORY_COUNTS, "two runs ended, and none is counted")
            await clear_finished(s)
            purged = await _history(s, "after every finished run was purged")
            promise(
                not purged.counts,
                P.HISTORY_PURGE,
                f"every finished run was purged, and the history still counts "
                f"{_show(purged.counts)}",
            )
            left = await s.find_runs_by_key(key)
            promise(
                not left,
                P.RUNS_BY_KEY,
                f"the runs of key {key!r} were purged, and it still finds {[r.id for r in left]}",
            )

        reflow.run(body)


class TestHistoryWindow:
    def test_a_window_is_the_last_minutes_of_the_whole_day(self, reflow: Harness) -> None:
        """For any number of minutes, the history of the last ``minutes`` is
        the day's history from the first minute of that window on (a
        Hypothesis property; each example ends a run first)."""
        wf = reflow.unique()

        @suite_settings()
        @given(st.integers(1, MAX_HISTORY_MINUTES), st.sampled_from(_ENDS))
        def check(minutes: int, status: str) -> None:
            async def body(s: Storage) -> None:
                if status == "cancelled":
                    await s.update_run_status((await create(s, wf)).run.id, "cancelled")
                else:
                    await _finish_one(s, wf, status)
                for _ in range(3):  # read within one minute of the storage clock
                    day = await _history(s, "for the day")
                    part = await _history(s, "for the window", minutes)
                    if _minute(day.before) == _minute(part.after):
                        break
                expected = {m: c for m, c in day.counts.items() if m >= part.first}
                promise(
                    part.counts == expected,
                    P.HISTORY_WINDOW,
                    f"finished_history({minutes}) counts {_show(part.counts)}; the day's "
                    f"history from {part.first:%H:%M} on is {_show(expected)}",
                )

            reflow.run(body)

        check()

    @pytest.mark.reflow_waits_minute
    def test_a_run_that_finished_before_the_window_is_not_counted(self, reflow: Harness) -> None:
        """A run ends; once the storage clock is in a later minute, a window
        that starts after the run's minute leaves it out, and one a minute
        longer holds it. Waits for the storage clock's next minute."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            start = await _history(s, "before the first run ended")
            early = await _finish_one(s, wf, "completed")
            ended_in = _minute(early.updated_at)
            while _minute(now := await storage_now(s)) <= ended_in:
                left = ended_in + _MINUTE - now
                await asyncio.sleep(min(max(left.total_seconds(), 0.0) + 0.01, 5.0))
            lates: list[RunRecord] = []
            for _ in range(3):  # read within the minute the last run ended in
                late = await _finish_one(s, wf, "failed")
                lates.append(late)
                since = round((_minute(late.updated_at) - ended_in) / _MINUTE)
                promise(since >= 1, P.RECORD_UPDATED_ON_WRITE, f"{late} ended before {early}")
                short = await _history(s, f"{since} minute(s) after a run ended", since)
                longer = await _history(s, "with the minute it ended in", since + 1)
                if _minute(short.before) == _minute(longer.after) == _minute(late.updated_at):
                    break
            promise(
                ended_in not in short.counts,
                P.HISTORY_WINDOW,
                f"a run that ended at {early.updated_at:%H:%M:%S.%f} counts in "
                f"finished_history({since}), read at {short.after:%H:%M:%S.%f}: "
                f"{_show(short.counts)}",
            )
            expected = {m: c for m, c in _counted(lates).items() if m >= short.first}
            promise(
                short.counts == expected,
                P.HISTORY_WINDOW,
                f"finished_history({since}) counts {_show(short.counts)}; since "
                f"{ended_in + _MINUTE:%H:%M} only these runs ended: {_show(expected)}",
            )
            counted = longer.counts.get(ended_in, (0, 0, 0))
            had = start.counts.get(ended_in, (0, 0, 0))
            promise(
                counted == (had[0] + 1, had[1], had[2]),
                P.HISTORY_COUNTS,
                f"finished_history({since + 1}) counts {counted} in {ended_in:%H:%M}, the "
                f"minute a run completed in; it held {had} before",
            )

        reflow.run(body)


# -- runs by key -------------------------------------------------------------------------


def _ids(runs: Sequence[RunRecord]) -> list[str]:
    return [run.id for run in runs]


def _newest_first(runs: Iterable[RunRecord]) -> list[RunRecord]:
    return sorted(runs, key=lambda run: (run.created_at, run.id), reverse=True)


async def _found(
    s: Storage, key: str, everything: Sequence[RunRecord], limit: int | None = None
) -> None:
    """``find_runs_by_key(key)`` (with ``limit`` if given) gives the newest of
    ``everything`` (the key's runs as stored, newest first): the first
    ``limit``, or 20 without one, as stored, in that order."""
    expected = everything[: 20 if limit is None else limit]
    found = await (
        s.find_runs_by_key(key) if limit is None else s.find_runs_by_key(key, limit=limit)
    )
    what = f"find_runs_by_key({key!r}" + ("" if limit is None else f", limit={limit}") + ")"
    promise(isinstance(found, list), P.RUNS_BY_KEY, f"{what} returned {found!r}")
    for run in found:
        check_times(run, f"{what}: run {run.id}")
    if _ids(found) != _ids(expected):
        # Runs that are not the key's, or fewer than there are: the lookup
        # missed or mixed up runs. Otherwise it chose or ordered them wrong.
        strangers = set(_ids(found)) - set(_ids(everything))
        missed = strangers or len(found) < len(expected) or len(set(_ids(found))) < len(found)
        promise(
            False,
            P.RUNS_BY_KEY if missed else P.RUNS_BY_KEY_ORDER,
            f"{what} found {_ids(found)}, expected newest first {_ids(expected)}",
        )
    for got, want in zip(found, expected, strict=True):
        promise(got == want, P.RUNS_BY_KEY, f"{what} gives {got}, stored as {want}")


class TestRunsByKey:
    def test_the_runs_of_every_workflow_with_a_key_newest_first(self, reflow: Harness) -> None:
        """Runs of five workflows share a key: all are found, as stored,
        whatever their status, newest first, the first ``limit`` of them.
        Runs with a key that only resembles it (a longer one, a shorter one,
        another case, a space) and runs without a key are not."""
        key = reflow.unique("key")
        workflows = [reflow.unique() for _ in range(5)]

        async def body(s: Storage) -> None:
            created: list[str] = []
            for i, wf in enumerate(workflows):
                created.append((await create(s, wf, i, key=key)).run.id)
                await asyncio.sleep(_TICK)
            for other in (f"{key}x", key[:-1], key.upper(), f" {key}"):
                await create(s, workflows[0], other, key=other)
            await create(s, workflows[0], "no key")
            done = await claim_only(s, workflows[1], P.NEW_RUN_CLAIMABLE)
            await s.finish_run(done.lease, "completed", output=codec.encode(1))
            await s.update_run_status(created[2], "cancelled")
            await claim_only(s, workflows[3], P.NEW_RUN_CLAIMABLE)
            stored = _newest_first([await read_run(s, run_id) for run_id in created])
            promise(
                _ids(stored) == created[::-1],
                P.RECORD_CREATED_FIXED,
                f"runs created 10 ms apart have the creation times {stored}",
            )
            await _found(s, key, stored)
            for limit in (1, 2, 4, 5, 6, 1_000_000_000):
                await _found(s, key, stored, limit)
            await _found(s, reflow.unique("unknown"), [])

        reflow.run(body)

    def test_twenty_runs_by_default(self, reflow: Harness) -> None:
        """Without a ``limit``, the newest 20 of a key's runs."""
        key = reflow.unique("key")

        async def body(s: Storage) -> None:
            ids = []
            for i in range(22):
                ids.append((await create(s, reflow.unique(), i, key=key)).run.id)
                await asyncio.sleep(_TICK)
            stored = _newest_first([await read_run(s, run_id) for run_id in ids])
            await _found(s, key, stored)
            await _found(s, key, stored, 22)

        reflow.run(body)

    def test_runs_created_together_are_ordered_by_id(self, reflow: Harness) -> None:
        """Runs of one key created in quick succession (many in one
        millisecond, with ids in any order) come newest first, then by id
        (a Hypothesis property)."""
        ids = st.lists(st.text("0123456789abcdef", min_size=4, max_size=4), min_size=1, max_size=6)

        @suite_settings()
        @given(ids.map(lambda found: list(dict.fromkeys(found))), st.integers(1, 7))
        def check(suffixes: list[str], limit: int) -> None:
            async def body(s: Storage) -> None:
                key, prefix = reflow.unique("key"), uuid4().hex[:12]
                runs = []
                for suffix in suffixes:
                    new = NewRun(reflow.unique(), "1", idempotency_key=key, run_id=prefix + suffix)
                    runs.append((await s.create_run(new)).run.id)
                stored = _newest_first([await read_run(s, run_id) for run_id in runs])
                await _found(s, key, stored, limit)

            reflow.run(body)

        check()


# -- buffered events ---------------------------------------------------------------------

Sent = tuple[str, object, str | None]
"""An event as delivered: its name, its value (decoded) and its event id."""


def _shown(events: Sequence[Sent]) -> str:
    return ", ".join(
        f"{name}={value!r}" + (f"#{eid}" if eid else "") for name, value, eid in events
    )


async def _listed(
    s: Storage, run_id: str, everything: Sequence[Sent], what: str, limit: int | None = None
) -> None:
    """``list_buffered_events(run_id)`` (with ``limit`` if given) gives the
    first of ``everything`` (the run's buffered events in arrival order):
    the same events, payloads compared decoded, in that order."""
    expected = list(everything[: 100 if limit is None else limit])
    got = await (
        s.list_buffered_events(run_id)
        if limit is None
        else s.list_buffered_events(run_id, limit=limit)
    )
    call = f"list_buffered_events({run_id!r}" + ("" if limit is None else f", limit={limit}") + ")"
    promise(isinstance(got, list), P.BUFFERED_LISTED, f"{what}: {call} returned {got!r}")
    events: list[Sent] = []
    for event in got:
        promise(
            isinstance(event, BufferedEvent)
            and isinstance(event.event, str)
            and isinstance(event.payload, str),
            P.BUFFERED_LISTED,
            f"{what}: {call} gives {event!r}",
        )
        events.append((event.event, decoded(event.payload), event.event_id))
    if events == expected:
        return
    # The right events in another order, or as many as asked of the run's
    # events but not the first ones: the order is wrong, not the events.
    shown = sorted(map(repr, events))
    reordered = shown == sorted(map(repr, expected)) or (
        len(events) == len(expected) and _within(shown, sorted(map(repr, everything)))
    )
    promise(
        False,
        P.BUFFERED_ORDER if reordered else P.BUFFERED_LISTED,
        f"{what}: {call} gives {_shown(events)}; expected {_shown(expected)}",
    )


def _within(part: list[str], whole: list[str]) -> bool:
    """Whether the sorted list ``part`` is a sub-multiset of the sorted list ``whole``."""
    rest = list(whole)
    for item in part:
        if item not in rest:
            return False
        rest.remove(item)
    return True


async def _deliver(s: Storage, run_id: str, event: Sent) -> None:
    name, value, event_id = event
    sent = await s.deliver_event(run_id, name, codec.encode(value), event_id=event_id)
    promise(sent, P.EVENT_BUFFERED, f"delivering {name!r} to live run {run_id} returned False")


class TestBufferedEvents:
    def test_listed_in_arrival_order_until_taken(self, reflow: Harness) -> None:
        """Events of three names come in the order they arrived, each with its
        payload and event id; a repeated id adds nothing; another run's
        events are not listed; a taken event is gone and later ones follow
        the rest; the first ``limit`` come with a limit."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            other = (await create(s, f"{wf}-other")).run.id
            sent: list[Sent] = [
                ("b", 1, "first"),
                ("a", {"n": 2}, None),
                ("b", "three", None),
                ("c", [4], "fourth"),
                ("a", None, None),
            ]
            for event in sent:
                await _deliver(s, run_id, event)
            await _deliver(s, run_id, ("b", "again", "first"))  # a retry: a no-op
            await _deliver(s, other, ("a", "elsewhere", None))
            await _listed(s, run_id, sent, "five events delivered to a pending run")
            for limit in (1, 2, 3, 5, 6, 1_000_000_000):
                await _listed(s, run_id, sent, "five events", limit)
            held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            take = await s.take_event(held.lease, "take-b", "b")
            promise(took(take, 1), P.EVENT_ONCE_IN_ORDER, f"took {take}, expected 1")
            rest = [sent[1], *sent[2:]]
            await _listed(s, run_id, rest, "after the first b was taken")
            take = await s.take_event(held.lease, "take-a", "a")
            promise(took(take, {"n": 2}), P.EVENT_ONCE_IN_ORDER, f"took {take}, expected n=2")
            await _deliver(s, run_id, ("a", "late", "last"))
            rest = [*sent[2:], ("a", "late", "last")]
            await _listed(s, run_id, rest, "after the first a was taken and another arrived")
            await s.sleep_run(held.lease, "nap", LONG)
            await _listed(s, run_id, rest, "once the run sleeps")
            await _listed(s, other, [("a", "elsewhere", None)], "the other run's")

        reflow.run(body)

    def test_nothing_for_a_finished_or_missing_run(self, reflow: Harness) -> None:
        """A run that completed, failed or was cancelled lists no event,
        whatever it held; after a requeue it lists only what arrives then.
        A missing run lists nothing."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            completed, failed, cancelled = await create_many(s, wf, 3)
            unclaimed = (await create(s, f"{wf}-unclaimed")).run.id
            for i, run_id in enumerate((completed, failed, cancelled, unclaimed)):
                await _deliver(s, run_id, ("e", i, f"id-{i}"))
                await _deliver(s, run_id, ("f", i, None))
            held = {c.run.id: c.lease for c in await s.claim_runs([wf], 3, LONG)}
            promise(len(held) == 3, P.NO_LOST_RUNS, f"claimed {len(held)} of 3 runs")
            await s.finish_run(held[completed], "completed", output=codec.encode(1))
            await s.finish_run(held[failed], "failed", error=codec.encode("boom"))
            await s.update_run_status(cancelled, "cancelled")
            await s.update_run_status(unclaimed, "cancelled")
            await _ended(s, [completed], "completed", P.FINISH_ATOMIC)
            await _ended(s, [failed], "failed", P.FINISH_ATOMIC)
            await _ended(s, [cancelled, unclaimed], "cancelled", P.CANCEL)
            for run_id, how in [
                (completed, "completed"),
                (failed, "failed"),
                (cancelled, "cancelled running"),
                (unclaimed, "cancelled pending"),
            ]:
                await _listed(s, run_id, [], f"a {how} run that held two events")
            for run_id in (failed, cancelled):
                requeued = await s.requeue_run(run_id)
                promise(requeued, P.REQUEUE_ONLY_ENDED, f"requeue_run({run_id!r}) returned False")
                await _listed(s, run_id, [], "a requeued run")
                await _deliver(s, run_id, ("e", "after", None))
                await _listed(s, run_id, [("e", "after", None)], "a requeued run, sent one event")
            await _listed(s, reflow.unique("missing"), [], "a missing run")

        reflow.run(body)

    def test_listing_follows_deliveries_and_takes(self, reflow: Harness) -> None:
        """Any sequence of deliveries (three names, some with repeated event
        ids) and takes leaves listed exactly the events not taken, in arrival
        order (a Hypothesis property, checked against a model)."""
        op = st.tuples(
            st.sampled_from(["deliver", "deliver", "take", "list"]),
            st.sampled_from("abc"),
            st.sampled_from([None, None, "x", "y"]),
            st.integers(1, 4),
        )

        @suite_settings()
        @given(st.lists(op, max_size=20))
        def check(ops: list[tuple[str, str, str | None, int]]) -> None:
            async def body(s: Storage) -> None:
                wf = reflow.unique()
                run_id = (await create(s, wf)).run.id
                held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
                model: list[Sent] = []
                seen: set[str] = set()
                for i, (kind, name, event_id, limit) in enumerate(ops):
                    if kind == "deliver":
                        await _deliver(s, run_id, (name, i, event_id))
                        if event_id is None or event_id not in seen:
                            model.append((name, i, event_id))
                        if event_id is not None:
                            seen.add(event_id)
                    elif kind == "take":
                        await s.take_event(held.lease, f"take-{i}", name)
                        first = next((e for e in model if e[0] == name), None)
                        if first is not None:
                            model.remove(first)
                    else:
                        await _listed(s, run_id, model, f"after op {i}", limit)
                await _listed(s, run_id, model, f"after {len(ops)} operations")
                await s.finish_run(held.lease, "completed", output=codec.encode(None))

            reflow.run(body)

        check()


# -- arguments ---------------------------------------------------------------------------

_BAD_LIMITS: list[Any] = [0, -1, -(2**70), True, False, 1.0, 2.5, "3", None, [1]]
_BAD_MINUTES: list[Any] = [
    0,
    -1,
    MAX_HISTORY_MINUTES + 1,
    10**30,
    True,
    60.0,
    "60",
    None,
    timedelta(minutes=60),
]


class TestDashboardArguments:
    def test_bad_limits_minutes_keys_and_ids_are_refused_and_write_nothing(
        self, reflow: Harness
    ) -> None:
        """A ``limit`` that is not an int of at least 1, ``minutes`` outside 1 to
        ``MAX_HISTORY_MINUTES`` or not an int, a bad key or run id: each is
        refused with ``ConfigError``, and the store reads back as before."""
        wf, key = reflow.unique(), reflow.unique("key")

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf, key=key)).run.id
            await _deliver(s, run_id, ("e", 1, "one"))
            before = (
                await read_run(s, run_id),
                await s.list_buffered_events(run_id),
                await s.find_runs_by_key(key),
            )
            calls: list[tuple[str, Any]] = []
            for bad in _BAD_LIMITS:
                calls.append(
                    (
                        f"find_runs_by_key(limit={bad!r})",
                        functools.partial(s.find_runs_by_key, key, limit=bad),
                    )
                )
                calls.append(
                    (
                        f"list_buffered_events(limit={bad!r})",
                        functools.partial(s.list_buffered_events, run_id, limit=bad),
                    )
                )
            for bad in _BAD_MINUTES:
                calls.append(
                    (f"finished_history({bad!r})", functools.partial(s.finished_history, bad))
                )
            bad_text: list[Any] = list(BAD_TEXT)
            for bad in bad_text:
                calls.append(
                    (f"find_runs_by_key({bad!r})", functools.partial(s.find_runs_by_key, bad))
                )
                calls.append(
                    (
                        f"list_buffered_events({bad!r})",
                        functools.partial(s.list_buffered_events, bad),
                    )
                )
            for what, call in calls:
                await refused(call, what, P.DASHBOARD_ARGS)
            after = (
                await read_run(s, run_id),
                await s.list_buffered_events(run_id),
                await s.find_runs_by_key(key),
            )
            promise(after == before, P.DASHBOARD_ARGS, f"refused reads left {after}, not {before}")
            for minutes in (1, MAX_HISTORY_MINUTES):
                await _history(s, "with a good number of minutes", minutes)

        reflow.run(body)

    def test_any_minutes_outside_the_range_are_refused(self, reflow: Harness) -> None:
        """Every int below 1 or above ``MAX_HISTORY_MINUTES``, and every limit
        below 1, is refused (a Hypothesis property)."""
        outside = st.one_of(
            st.integers(max_value=0), st.integers(min_value=MAX_HISTORY_MINUTES + 1)
        )

        @suite_settings()
        @given(outside, st.integers(max_value=0))
        def check(minutes: int, limit: int) -> None:
            async def body(s: Storage) -> None:
                await refused(
                    functools.partial(s.finished_history, minutes),
                    f"finished_history({minutes})",
                    P.DASHBOARD_ARGS,
                )
                await refused(
                    functools.partial(s.find_runs_by_key, "k", limit=limit),
                    f"find_runs_by_key(limit={limit})",
                    P.DASHBOARD_ARGS,
                )
                await refused(
                    functools.partial(s.list_buffered_events, "r", limit=limit),
                    f"list_buffered_events(limit={limit})",
                    P.DASHBOARD_ARGS,
                )

            reflow.run(body)

        check()
