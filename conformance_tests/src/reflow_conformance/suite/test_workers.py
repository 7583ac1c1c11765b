"""The worker registry: announcing a worker, listing the live ones, removing
one, and entries lapsing by the storage's clock.

The registry is global to the store and other workers may be in it, so every
test announces workers with ids of its own, looks only at them in what
``list_workers`` returns, and removes them when it is done. Times are held to
two readings of ``now()`` around each announcement, taken through another
connection: a backend that stamps an entry with its host's clock, not the
store's, fails by the skew."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Collection
from datetime import datetime, timedelta

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core.storage import Storage, WorkerInfo, WorkerRecord

from ._util import SLACK, check_times, off_bracket, storage_now

pytestmark = [pytest.mark.reflow_conformance, pytest.mark.reflow_area("workers")]

__all__ = ["TestWorkerLapse", "TestWorkerRegistry"]

_TTL = timedelta(minutes=7, milliseconds=321)
"""Long enough never to lapse during a test; the odd milliseconds show a rounded ttl."""
_SHORTER_TTL = timedelta(minutes=3, milliseconds=45)
_TICK = 0.012
"""Seconds between two announcements that must get different times (a store
keeps milliseconds at least)."""
_ROUNDING = 0.005
"""Seconds an entry may lapse early by rounding its times to the millisecond."""
_INFO_FIELDS = ("id", "host", "pid", "workflows", "concurrency", "in_flight")


def _worker(reflow: Harness, **changes: object) -> WorkerInfo:
    info = WorkerInfo(
        id=reflow.unique("worker"),
        host="worker-host.example",
        pid=4242,
        workflows=("zeta", "alpha"),
        concurrency=8,
        in_flight=0,
    )
    return dataclasses.replace(info, **changes)  # type: ignore[arg-type]


def _differences(record: WorkerRecord | None, info: WorkerInfo) -> list[str]:
    """How an entry differs from what was announced (times aside)."""
    if record is None:
        return [f"worker {info.id!r} is missing"]
    return [
        f"{name}: {getattr(record, name)!r} != {getattr(info, name)!r}"
        for name in _INFO_FIELDS
        if getattr(record, name) != getattr(info, name)
    ]


async def _mine(s: Storage, ids: Collection[str]) -> list[WorkerRecord]:
    """The entries ``list_workers`` gives for these ids, in its order (others are ignored)."""
    listed = [record for record in await s.list_workers() if record.id in ids]
    for record in listed:
        check_times(record, f"listed worker {record.id}")
    return listed


async def _listed(s: Storage, worker_id: str) -> WorkerRecord | None:
    found = await _mine(s, {worker_id})
    promise(len(found) <= 1, P.WORKER_STORED, f"{len(found)} entries for worker {worker_id!r}")
    return found[0] if found else None


async def _announce(
    s: Storage, clock: Storage, info: WorkerInfo, ttl: timedelta
) -> tuple[WorkerRecord, datetime, datetime]:
    """Announce ``info`` through ``s``, between two readings of ``clock.now()``;
    check what it returns against what was announced, and its times."""
    before = await storage_now(clock)
    record = await s.announce_worker(info, ttl)
    after = await storage_now(clock)
    check_times(record, f"announced worker {info.id}")
    diff = _differences(record, info)
    promise(not diff, P.WORKER_STORED, "announce_worker returned: " + "; ".join(diff))
    wrong = off_bracket(record.last_seen_at, before, after)
    promise(not wrong, P.WORKER_TIMES, f"worker {info.id}: last_seen_at {wrong}")
    gap = record.expires_at - record.last_seen_at
    promise(
        abs(gap - ttl) <= SLACK,
        P.WORKER_TIMES,
        f"worker {info.id}: expires_at {record.expires_at.isoformat()} is last_seen_at "
        f"{record.last_seen_at.isoformat()} plus {gap}, not plus the ttl {ttl}",
    )
    return record, before, after


class TestWorkerRegistry:
    def test_an_announced_worker_is_stored_and_listed_as_announced(self, reflow: Harness) -> None:
        workers = [
            _worker(
                reflow,
                host="höst-東京.example 🚀",
                pid=4_194_303,
                workflows=("zeta", "álpha", "mid dle", "Zeta"),
                concurrency=1,
                in_flight=0,
            ),
            _worker(reflow, workflows=(), concurrency=64, in_flight=64),
            _worker(reflow, workflows=("only",), pid=0, concurrency=3, in_flight=2),
        ]
        ids = {info.id for info in workers}

        async def body(s: Storage) -> None:
            other = await reflow.open()
            announced = {}
            for info in workers:
                record, before, after = await _announce(s, other, info, _TTL)
                wrong = off_bracket(record.started_at, before, after)
                promise(not wrong, P.WORKER_TIMES, f"worker {info.id}: started_at {wrong}")
                announced[info.id] = record
            for reader in (s, other):
                listed = {record.id: record for record in await _mine(reader, ids)}
                promise(
                    set(listed) == ids,
                    P.WORKER_LAPSED_UNLISTED,
                    f"live workers {sorted(ids - set(listed))} are not listed",
                )
                for info in workers:
                    diff = _differences(listed.get(info.id), info)
                    promise(not diff, P.WORKER_STORED, "listed: " + "; ".join(diff))
                    promise(
                        listed[info.id] == announced[info.id],
                        P.WORKER_STORED,
                        f"announce_worker returned {announced[info.id]}, "
                        f"list_workers gives {listed[info.id]}",
                    )
            for info in workers:
                await s.remove_worker(info.id)

        reflow.run(body)

    def test_announcing_again_keeps_started_at_and_updates_the_rest(self, reflow: Harness) -> None:
        first = _worker(reflow)
        second = dataclasses.replace(
            first, host="moved.example", pid=7, workflows=("b", "a", "c"), concurrency=2
        )
        third = dataclasses.replace(second, in_flight=2)

        async def body(s: Storage) -> None:
            other = await reflow.open()
            made, before, after = await _announce(s, other, first, _TTL)
            wrong = off_bracket(made.started_at, before, after)
            promise(not wrong, P.WORKER_TIMES, f"a new worker's started_at {wrong}")
            previous = made
            # Through the other connection, then back, with a shorter ttl:
            # expires_at is now plus the ttl given, even if that is earlier.
            turns = ((other, s, second, _SHORTER_TTL), (s, other, third, _TTL))
            for via, clock, info, ttl in turns:
                await asyncio.sleep(_TICK)
                again, _, _ = await _announce(via, clock, info, ttl)
                promise(
                    again.started_at == made.started_at,
                    P.WORKER_STARTED_KEPT,
                    f"announcing a live worker again moved started_at from "
                    f"{made.started_at.isoformat()} to {again.started_at.isoformat()}",
                )
                promise(
                    again.last_seen_at > previous.last_seen_at,
                    P.WORKER_TIMES,
                    f"last_seen_at {again.last_seen_at.isoformat()} did not move on from "
                    f"{previous.last_seen_at.isoformat()}",
                )
                listed = await _listed(s, first.id)
                promise(
                    listed == again,
                    P.WORKER_STORED,
                    f"announce_worker returned {again}, list_workers gives {listed}",
                )
                previous = again
            await s.remove_worker(first.id)

        reflow.run(body)

    def test_remove_deletes_a_live_entry_once(self, reflow: Harness) -> None:
        gone, stays = _worker(reflow), _worker(reflow)

        async def body(s: Storage) -> None:
            other = await reflow.open()
            never = await s.remove_worker(reflow.unique("worker"))
            promise(not never, P.WORKER_REMOVE, "removing a worker never announced returned True")
            made, _, _ = await _announce(s, other, gone, _TTL)
            await _announce(s, other, stays, _TTL)
            promise(
                await other.remove_worker(gone.id) is True,
                P.WORKER_REMOVE,
                "removing a live worker did not return True",
            )
            mine = [record.id for record in await _mine(s, {gone.id, stays.id})]
            promise(mine == [stays.id], P.WORKER_REMOVE, f"after removing one, listed {mine}")
            again = await s.remove_worker(gone.id)
            promise(not again, P.WORKER_REMOVE, "removing a worker twice returned True")
            # A worker removed, then announced again, is a new entry.
            await asyncio.sleep(_TICK)
            back, before, after = await _announce(other, s, gone, _TTL)
            wrong = off_bracket(back.started_at, before, after)
            promise(
                not wrong,
                P.WORKER_STARTED_RESET,
                f"a worker announced after it was removed (first started at "
                f"{made.started_at.isoformat()}): started_at {wrong}",
            )
            for info in (gone, stays):
                await s.remove_worker(info.id)

        reflow.run(body)

    def test_workers_are_listed_by_started_at_then_id(self, reflow: Harness) -> None:
        prefix = reflow.unique("worker")
        # Announced in the reverse of their ids' order: listing by id alone shows.
        order = [f"{prefix}-c", f"{prefix}-b1", f"{prefix}-b", f"{prefix}-a"]

        async def body(s: Storage) -> None:
            other = await reflow.open()
            made = []
            for worker_id in order:
                record, _, _ = await _announce(s, other, _worker(reflow, id=worker_id), _TTL)
                made.append(record)
                await asyncio.sleep(_TICK)
            # Announced again, the first keeps its place (by the started_at it
            # reports: whether it keeps it at all is another test's concern).
            again, _, _ = await _announce(other, s, _worker(reflow, id=order[0], in_flight=1), _TTL)
            made[0] = again
            expected = [r.id for r in sorted(made, key=lambda r: (r.started_at, r.id))]
            for reader in (s, other):
                listed = [record.id for record in await _mine(reader, set(order))]
                promise(
                    listed == expected,
                    P.WORKER_ORDER,
                    f"listed {listed}, expected {expected} (started at "
                    + ", ".join(f"{r.id[-2:]}: {r.started_at.isoformat()}" for r in made)
                    + ")",
                )
            for worker_id in order:
                await s.remove_worker(worker_id)

        reflow.run(body)


class TestWorkerLapse:
    def test_a_lapsed_entry_is_not_listed_and_a_new_announcement_starts_anew(
        self, reflow: Harness
    ) -> None:
        """Entries announced with the short ttl lapse by the storage's clock:
        listed while live (any list that ended before the ttl ran out, timed
        by the test's own monotonic clock), never once ``now()`` is past
        their ``expires_at``."""
        short = reflow.short_lease
        back, removed, lasting = _worker(reflow), _worker(reflow), _worker(reflow)
        ids = {back.id, removed.id, lasting.id}

        async def body(s: Storage) -> None:
            other = await reflow.open()
            await _announce(s, other, lasting, _TTL)
            a0 = time.monotonic()
            first, _, _ = await _announce(s, other, back, short)
            lapsing, _, _ = await _announce(s, other, removed, short)
            listed = {record.id for record in await _mine(other, ids)}
            ended = time.monotonic()
            promise(
                listed == ids or ended >= a0 + short.total_seconds() - _ROUNDING,
                P.WORKER_LAPSED_UNLISTED,
                f"workers announced with a ttl of {short} were not listed {ended - a0:.3f} s "
                f"later: listed {sorted(listed)} of {sorted(ids)}",
            )
            deadline = max(first.expires_at, lapsing.expires_at) + SLACK
            for _ in range(5):
                await reflow.lapse(short)
                if await storage_now(s) > deadline:
                    break
            else:
                pytest.skip(f"the storage's now() did not pass {deadline.isoformat()}")
            for reader in (s, other):
                listed = {record.id for record in await _mine(reader, ids)}
                promise(
                    listed == {lasting.id},
                    P.WORKER_LAPSED_UNLISTED,
                    f"after entries expiring at {deadline.isoformat()} lapsed by now(), "
                    f"listed {sorted(listed)}; only {lasting.id} is live",
                )
            promise(
                not await other.remove_worker(removed.id),
                P.WORKER_REMOVE,
                "removing a worker whose entry lapsed returned True",
            )
            again, before, after = await _announce(other, s, back, _TTL)
            wrong = off_bracket(again.started_at, before, after)
            promise(
                not wrong,
                P.WORKER_STARTED_RESET,
                f"a worker announced after its entry lapsed (first started at "
                f"{first.started_at.isoformat()}): started_at {wrong}",
            )
            listed = {record.id for record in await _mine(s, ids)}
            promise(
                listed == {back.id, lasting.id},
                P.WORKER_LAPSED_UNLISTED,
                f"after announcing {back.id} again, listed {sorted(listed)}",
            )
            for worker_id in ids:
                await s.remove_worker(worker_id)

        reflow.run(body)
