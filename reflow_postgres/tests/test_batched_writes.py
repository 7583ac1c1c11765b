"""The group commit of step saves and finishes on PostgreSQL: concurrent
calls share one ``save_steps`` or ``finish_many`` statement, fed one JSON
parameter (``reflow_postgres._rows.save_rows`` and ``finish_rows``).

Every text a column can keep comes back exactly (any Unicode, characters
JSON escapes, text that is itself JSON with ``\\u`` escapes, big outputs);
wake-up times keep their instant to the microsecond whatever their offset;
lease extensions land to the microsecond. Each item is fenced on its own
and gets its own outcome, in order. Text no column can keep (a NUL, a lone
surrogate) fails the batch with a StorageError, and nothing of it is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg import sql

from reflow_core.errors import StorageError
from reflow_core.storage import ClaimedRun, Lease, NewRun, StepRecord
from reflow_postgres import PostgresStorage
from reflow_postgres._rows import _time

Admin = psycopg.Connection[tuple[object, ...]]
LEASE = timedelta(minutes=5)

ODD_TEXTS: list[str | None] = [
    None,
    "",
    '"\\u0000"',  # JSON text holding a NUL, as the codec writes it
    '"\\ud800\\udfff \\ud83d\\ude00 \\\\u0041"',  # JSON escapes, kept as written
    "é ü ß 中文 😀 \U0010ffff \ufeff \uffff",
    "\u2028\u2029 \x01\x1f\x7f \t\n\r\b\f",
    "quotes \" ' ` and backslashes \\ \\\\ / \\n",
    '{"a":[1,2.5,null,true],"b":"\\"x\\""}',
    "x" * 1_000_000 + "é",
]
ODD_NAMES = ["ステップ 😀", 'a"b\\c', "\x01\x1f", " ", "line\u2028sep", "é" * 300]


async def _claimed(
    store: PostgresStorage, workflow: str, count: int, lease: timedelta = LEASE
) -> list[ClaimedRun]:
    for i in range(count):
        await store.create_run(NewRun(workflow, str(i)))
    claimed = await store.claim_runs([workflow], count, lease)
    assert len(claimed) == count
    return claimed


def _lease_spans(admin: Admin, schema: str, ids: Sequence[str]) -> list[object]:
    """``lease_expires_at - updated_at`` of each run (both set by the statement
    that last renewed the lease, from one reading of the clock)."""
    query = sql.SQL(
        "SELECT lease_expires_at - updated_at FROM {}.runs WHERE id = ANY(%s)"
        " ORDER BY array_position(%s, id)"
    ).format(sql.Identifier(schema))
    return [row[0] for row in admin.execute(query, (list(ids), list(ids))).fetchall()]


async def test_odd_text_round_trips_through_batched_saves_and_finishes(
    postgres_url: str,
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        cases = [
            (ODD_NAMES[i % len(ODD_NAMES)], output, ODD_TEXTS[-1 - i])
            for i, output in enumerate(ODD_TEXTS)
        ]
        claimed = await _claimed(store, "wf", 2 * len(cases))
        saves = store._writes.saves
        before = saves.batches
        saved = await asyncio.gather(
            *(
                store.save_step_result(
                    c.lease, StepRecord(name, "failed", output, error, attempts=3), LEASE
                )
                for c, (name, output, error) in zip(claimed, cases, strict=False)
            )
        )
        assert saved == [True] * len(cases)
        assert saves.batches == before + 1  # one statement
        for c, (name, output, error) in zip(claimed, cases, strict=False):
            [step] = (await store.get_step_results(c.run.id)).values()
            assert (step.name, step.status, step.output, step.error, step.attempts) == (
                name,
                "failed",
                output,
                error,
                3,
            )

        # Finishes: with a last step and without, run output and error odd.
        finishes = store._writes.finishes
        before = finishes.batches
        last = [
            None if i % 2 else StepRecord(name + "!", "completed", error, output, attempts=2)
            for i, (name, output, error) in enumerate(cases)
        ]
        done = await asyncio.gather(
            *(
                store.finish_run(
                    c.lease,
                    "failed" if i % 3 else "completed",
                    output=cases[i][1],
                    error=cases[i][2],
                    step=last[i],
                )
                for i, c in enumerate(claimed[len(cases) :])
            )
        )
        assert done == [True] * len(cases)
        assert finishes.batches == before + 1
        for i, c in enumerate(claimed[len(cases) :]):
            run = await store.get_run(c.run.id)
            assert run is not None
            assert (run.status, run.output, run.error) == (
                "failed" if i % 3 else "completed",
                cases[i][1],
                cases[i][2],
            )
            steps = await store.get_step_results(c.run.id)
            last_step = last[i]
            if last_step is None:
                assert steps == {}
            else:
                [got] = steps.values()
                assert (got.name, got.status, got.output, got.error, got.attempts) == (
                    last_step.name,
                    "completed",
                    last_step.output,
                    last_step.error,
                    2,
                )
    finally:
        await store.close()


WAKE_TIMES = [
    datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
    datetime(2031, 5, 6, 7, 8, 9, 1, tzinfo=timezone(timedelta(hours=5, minutes=30, seconds=15))),
    datetime(2031, 5, 6, 7, 8, 9, 999999, tzinfo=timezone(-timedelta(hours=3, microseconds=7))),
    datetime(2031, 3, 9, 2, 30, tzinfo=ZoneInfo("America/St_Johns")),
    datetime(2024, 2, 29, 23, 59, 59, 500000, tzinfo=ZoneInfo("Asia/Kolkata")),
    datetime(1970, 1, 1, tzinfo=UTC) - timedelta(microseconds=1),
    datetime(9999, 12, 29, 12, tzinfo=UTC),  # a day before the read cap
]


async def test_batched_saves_fence_each_item_and_renew_each_lease(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """Saves of live leases land (their step, wake-up time to the
    microsecond, and their lease renewed by their own extension), and the
    others (a stale epoch, a lapsed lease, a finished run) are refused, each
    outcome in its place."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        live = await _claimed(store, "wf", len(WAKE_TIMES))
        [lapsed] = await _claimed(store, "lapsing", 1, lease=timedelta(0))
        [ended] = await _claimed(store, "ending", 1)
        assert await store.finish_run(ended.lease, "completed", output="1")
        stale = Lease(live[0].run.id, live[0].lease.epoch + 1)
        extends = [
            timedelta(days=3, seconds=5, microseconds=123456),
            timedelta(microseconds=1),
            timedelta(days=36500),
        ]
        items: list[tuple[Lease, StepRecord, timedelta]] = []
        for i, (c, wake_at) in enumerate(zip(live, WAKE_TIMES, strict=True)):
            step = StepRecord(f"nap {i}", "sleeping", attempts=1, wake_at=wake_at)
            items.append((c.lease, step, extends[i % 3 if i % 4 else 0]))
        items.insert(2, (stale, StepRecord("stale", "completed", "1"), LEASE))
        items.insert(4, (lapsed.lease, StepRecord("lapsed", "completed", "1"), LEASE))
        items.append((ended.lease, StepRecord("ended", "completed", "1"), LEASE))
        before = store._writes.saves.batches
        results = await asyncio.gather(
            *(store.save_step_result(lease, step, extend) for lease, step, extend in items)
        )
        assert store._writes.saves.batches == before + 1
        refused = {"stale", "lapsed", "ended"}
        assert results == [step.name not in refused for _, step, _ in items]
        for lease, step, _ in items:
            steps = await store.get_step_results(lease.run_id)
            if step.name in refused:
                assert step.name not in steps
                continue
            got = steps[step.name]
            assert got.wake_at is not None
            assert step.wake_at is not None
            # The same instant (a time in a zone's gap counts at its utcoffset(),
            # which astimezone applies: such a time equals no other zone's).
            assert got.wake_at == step.wake_at.astimezone(UTC)
        landed = [
            (lease.run_id, extend) for lease, step, extend in items if step.name not in refused
        ]
        assert _lease_spans(admin, schema, [i for i, _ in landed]) == [e for _, e in landed]
        [lapsed_span] = _lease_spans(admin, schema, [lapsed.run.id])
        assert lapsed_span == timedelta(0)  # not renewed
        run = await store.get_run(lapsed.run.id)
        assert run is not None
        assert run.status == "running"
    finally:
        await store.close()


async def test_batched_finishes_fence_each_item_in_order(postgres_url: str) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        live = await _claimed(store, "wf", 4)
        [lapsed] = await _claimed(store, "lapsing", 1, lease=timedelta(0))
        stale = Lease(live[1].run.id, live[1].lease.epoch - 1)
        wake_at = WAKE_TIMES[1]
        items: list[tuple[Lease, StepRecord | None]] = [
            (live[0].lease, None),
            (stale, StepRecord("stale", "completed", "1")),
            (live[2].lease, StepRecord("last", "waiting", attempts=4, wake_at=wake_at)),
            (lapsed.lease, StepRecord("lapsed", "completed", "1")),
            (live[3].lease, StepRecord("last", "completed", "2")),
            (live[1].lease, None),
        ]
        results = await asyncio.gather(
            *(store.finish_run(lease, "completed", output="7", step=step) for lease, step in items)
        )
        assert results == [True, False, True, False, True, True]
        for c in live:
            run = await store.get_run(c.run.id)
            assert run is not None
            assert (run.status, run.output) == ("completed", "7")
        run = await store.get_run(lapsed.run.id)
        assert run is not None
        assert (run.status, run.output) == ("running", None)
        assert await store.get_step_results(lapsed.run.id) == {}
        assert await store.get_step_results(live[0].run.id) == {}
        assert await store.get_step_results(live[1].run.id) == {}
        waiting = (await store.get_step_results(live[2].run.id))["last"]
        assert (waiting.status, waiting.attempts, waiting.wake_at) == ("waiting", 4, wake_at)
        done = (await store.get_step_results(live[3].run.id))["last"]
        assert (done.status, done.output, done.wake_at) == ("completed", "2", None)
    finally:
        await store.close()


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800", "x\udfffy"])
async def test_text_no_column_can_keep_fails_the_batch_and_writes_nothing(
    postgres_url: str, bad: str
) -> None:
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        claimed = await _claimed(store, "wf", 3)
        outputs = ["1", bad, "2"]
        saves = await asyncio.gather(
            *(
                store.save_step_result(c.lease, StepRecord("s", "completed", out), LEASE)
                for c, out in zip(claimed, outputs, strict=True)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(outcome, StorageError) for outcome in saves), saves
        finishes = await asyncio.gather(
            *(
                store.finish_run(c.lease, "failed", error=out)
                for c, out in zip(claimed, outputs, strict=True)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(outcome, StorageError) for outcome in finishes), finishes
        for c in claimed:
            assert await store.get_step_results(c.run.id) == {}
            run = await store.get_run(c.run.id)
            assert run is not None
            assert (run.status, run.error) == ("running", None)
        # The connections are fine afterwards.
        assert all(await asyncio.gather(*(store.finish_run(c.lease, "completed") for c in claimed)))
    finally:
        await store.close()


def test_wake_up_times_as_json_text_are_the_instants_psycopg_sends(admin: Admin) -> None:
    """The text a batch sends for a wake-up time is, to the server, the
    instant psycopg sends for the datetime itself, also at the ends of
    ``datetime``'s range, where the time in UTC does not fit it."""
    ends = [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        datetime(1, 1, 1, 3, tzinfo=timezone(timedelta(hours=2, seconds=1))),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(-timedelta(hours=14))),
        datetime(9999, 12, 31, 23, tzinfo=ZoneInfo("America/New_York")),
    ]
    for value in [*WAKE_TIMES, *ends]:
        row = admin.execute(
            "SELECT %s::timestamptz = %s::timestamptz, %s::timestamptz::text",
            (_time(value), value, _time(value)),
        ).fetchone()
        assert row is not None
        assert row[0] is True, (value, _time(value), row[1])
