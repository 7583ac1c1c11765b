"""The reads of a dashboard on SQLite: runs by idempotency key, a run's
buffered events, and the runs that finished per minute.

The promises themselves are the conformance suite's
(``reflow_conformance.suite.test_dashboard_reads``), on the real clock.
These tests move the storage clock by hand, to the microsecond, across
minute boundaries and a day of history, and look at how the backend reads:
each read seeks an index, and what it costs does not grow with the rest of
the store. Runs under both transaction drivers.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reflow_core.errors import ConfigError
from reflow_core.storage import MAX_HISTORY_MINUTES, FinishedMinute, NewRun
from reflow_sqlite import SQLiteStorage
from reflow_sqlite import _scripts as scripts
from reflow_sqlite._queries import QUERIES, with_marks
from reflow_sqlite._scripts import MINUTE_US, Params, Row, Script
from reflow_sqlite._thread import drive

from .conftest import CLOCK_START, FakeClock, Opener, database, writes_index

LEASE = timedelta(seconds=30)


@pytest.fixture(params=["hook", "public"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def at(minute: int, second: float = 0) -> datetime:
    """A time ``minute`` minutes and ``second`` seconds after the clock's start (a whole minute)."""
    return CLOCK_START + timedelta(minutes=minute, seconds=second)


def minute(offset: int, completed: int = 0, failed: int = 0, cancelled: int = 0) -> FinishedMinute:
    return FinishedMinute(at(offset), completed, failed, cancelled)


async def end(store: SQLiteStorage, clock: FakeClock, when: datetime, how: str) -> str:
    """A run of ``wf`` that ends at ``when`` by the storage clock: ``completed``
    or ``failed`` by its worker, or ``cancelled`` from outside."""
    clock.now = when
    run_id = (await store.create_run(NewRun("wf", "1"))).run.id
    if how == "cancelled":
        assert await store.update_run_status(run_id, "cancelled")
        return run_id
    (claimed,) = await store.claim_runs(["wf"], 1, LEASE)
    ended = (
        await store.finish_run(claimed.lease, "completed", output="1")
        if how == "completed"
        else await store.finish_run(claimed.lease, "failed", error='"no"')
    )
    assert ended
    return run_id


async def test_runs_count_in_the_minute_they_finished_by_the_storage_clock(
    opener: Opener, clock: FakeClock
) -> None:
    """A run counts in the minute of its finish, to the microsecond: the last
    microsecond of a minute is in it, the next one in the next minute. A
    window of ``n`` minutes is the current one and the ``n - 1`` before it,
    wherever in its minute the clock stands."""
    store = await opener()
    await end(store, clock, at(0, 0), "completed")
    await end(store, clock, at(0, 59.999999), "failed")
    await end(store, clock, at(1, 0), "cancelled")
    await end(store, clock, at(3, 10), "completed")
    await end(store, clock, at(3, 10.5), "completed")

    clock.now = at(3, 59.999999)
    assert await store.finished_history(1) == [minute(3, completed=2)]
    assert await store.finished_history(3) == [minute(1, cancelled=1), minute(3, completed=2)]
    every = [minute(0, completed=1, failed=1), minute(1, cancelled=1), minute(3, completed=2)]
    assert await store.finished_history(4) == every
    assert await store.finished_history(MAX_HISTORY_MINUTES) == every
    # A minute later the window has moved on by one: 12:00 has left the last four.
    clock.now = at(4)
    assert await store.finished_history(4) == every[1:]
    assert await store.finished_history(1) == []
    # A day after the first finish, only the minutes of the last day are left.
    clock.now = at(MAX_HISTORY_MINUTES)
    assert await store.finished_history(MAX_HISTORY_MINUTES) == every[1:]
    clock.now = at(MAX_HISTORY_MINUTES + 2, 59.999999)
    assert await store.finished_history(MAX_HISTORY_MINUTES) == every[2:]
    clock.now = at(MAX_HISTORY_MINUTES + 3)
    assert await store.finished_history(MAX_HISTORY_MINUTES) == []


async def test_a_finish_after_the_current_minute_is_not_counted(
    opener: Opener, clock: FakeClock
) -> None:
    """Another process whose clock runs ahead stored a finish in a minute that
    has not begun by this storage's clock: no minute of the window holds it."""
    store = await opener()
    await end(store, clock, at(5, 1), "completed")
    clock.now = at(4, 59)
    assert await store.finished_history(MAX_HISTORY_MINUTES) == []
    clock.now = at(5)
    assert await store.finished_history(1) == [minute(5, completed=1)]


async def test_requeues_and_purges_take_runs_out_of_the_history(
    opener: Opener, clock: FakeClock
) -> None:
    """A requeued run leaves the minute it finished in and counts again,
    with its new status, in the minute it finishes again; a purged run
    leaves its minute for good."""
    store = await opener()
    failed = await end(store, clock, at(0, 5), "failed")
    cancelled = await end(store, clock, at(0, 6), "cancelled")
    await end(store, clock, at(1, 5), "completed")
    clock.now = at(2, 5)
    assert await store.requeue_run(failed)
    assert await store.requeue_run(cancelled)
    assert await store.finished_history(3) == [minute(1, completed=1)]
    # Both requeued runs are due at once: which comes first is up to their ids.
    claims = await store.claim_runs(["wf"], 2, LEASE)
    (claimed,) = [claim for claim in claims if claim.run.id == failed]
    assert await store.finish_run(claimed.lease, "completed", output="2")
    assert await store.update_run_status(cancelled, "cancelled")
    history = [minute(1, completed=1), minute(2, completed=1, cancelled=1)]
    assert await store.finished_history(3) == history

    clock.now = at(2, 30)
    assert await store.purge_finished(timedelta(minutes=1)) == 1
    assert await store.finished_history(3) == history[1:]
    assert await store.purge_finished(timedelta(0)) == 2
    assert await store.finished_history(MAX_HISTORY_MINUTES) == []


async def test_key_lookup_orders_runs_of_one_instant_by_id(
    opener: Opener, clock: FakeClock
) -> None:
    """Runs created at the same microsecond come newest first by id, as
    ``list_runs`` orders them; runs with another key (a longer one, or the
    same with other letters' case) are never found."""
    store = await opener()
    for workflow, run_id in [("a", "r2"), ("b", "r1"), ("c", "r3")]:
        await store.create_run(NewRun(workflow, "1", idempotency_key="key", run_id=run_id))
    clock.advance(0.000001)
    await store.create_run(NewRun("d", "1", idempotency_key="key", run_id="r0"))
    for other in ("key2", "Key", "ke"):
        await store.create_run(NewRun("a", "1", idempotency_key=other))
    await store.create_run(NewRun("a", "1"))

    found = await store.find_runs_by_key("key")
    assert [r.id for r in found] == ["r0", "r3", "r2", "r1"]
    assert found == [await store.get_run(r.id) for r in found]
    assert [r.id for r in await store.find_runs_by_key("key", limit=2)] == ["r0", "r3"]
    assert [r.id for r in await store.find_runs_by_key("key", limit=2**70)] == [
        "r0",
        "r3",
        "r2",
        "r1",
    ]
    assert await store.find_runs_by_key("k") == []
    listed = [r.id for r in (await store.list_runs()).runs if r.idempotency_key == "key"]
    assert listed == [r.id for r in found]


async def test_bad_counts_are_refused_before_the_database_is_read(opener: Opener) -> None:
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "1", idempotency_key="k"))).run.id
    bad_limits: list[Any] = [0, -1, True, 2.0, "3", None]
    for bad in bad_limits:
        with pytest.raises(ConfigError, match=f"limit must be an int of at least 1, got {bad!r}"):
            await store.find_runs_by_key("k", limit=bad)
        with pytest.raises(ConfigError, match="limit must be an int"):
            await store.list_buffered_events(run_id, limit=bad)
    bad_minutes: list[Any] = [0, MAX_HISTORY_MINUTES + 1, False, 1.5]
    for bad in bad_minutes:
        with pytest.raises(ConfigError, match=f"minutes must be an int from 1 to 1440, got {bad}"):
            await store.finished_history(bad)


async def test_buffered_events_follow_arrival_across_names_and_retirement(
    opener: Opener,
) -> None:
    """A run's buffered events come in the order they arrived, whatever
    their names; a taken one is gone; a repeated event id adds nothing; the
    events a run's end retired (kept, taken, for their ids) are not listed."""
    store = await opener()
    run_id = (await store.create_run(NewRun("wf", "1"))).run.id
    other = (await store.create_run(NewRun("wf", "1"))).run.id
    sent = [("b", '"1"', "x"), ("a", '"2"', None), ("b", '"3"', None), ("c", '"4"', "y")]
    for name, payload, event_id in sent:
        assert await store.deliver_event(run_id, name, payload, event_id=event_id)
    assert await store.deliver_event(run_id, "b", '"again"', event_id="x")
    assert await store.deliver_event(other, "b", '"elsewhere"')
    listed = await store.list_buffered_events(run_id)
    assert [(e.event, e.payload, e.event_id) for e in listed] == sent
    assert await store.list_buffered_events(run_id, limit=3) == listed[:3]

    (claimed,) = [c for c in await store.claim_runs(["wf"], 2, LEASE) if c.run.id == run_id]
    taken = await store.take_event(claimed.lease, "w", "b")
    assert taken is not None
    assert taken.payload == '"1"'
    assert await store.list_buffered_events(run_id) == listed[1:]
    assert await store.finish_run(claimed.lease, "completed", output="1")
    assert await store.list_buffered_events(run_id) == []
    assert len(await store.list_buffered_events(other)) == 1
    assert await store.list_buffered_events("missing") == []


# -- how the reads reach the rows -------------------------------------------------------

NOW = 1_900_000_020_000_000  # microseconds since the epoch, a whole minute
HISTORY = 30_000


def fill(raw: sqlite3.Connection, *, history: bool) -> None:
    """The runs every read below looks for: ten of the key ``wanted``, of
    ten workflows, one finished in each of the last ten minutes, and the
    waiting run ``busy`` with five buffered events of two names. With
    ``history``, also 30,000 runs that finished during the day before the
    last hour, each with a key of its own and a buffered and a taken event."""
    rows: list[tuple[object, ...]] = []
    for i in range(10):
        done = NOW - (i + 1) * MINUTE_US + 1
        rows.append((f"w{i}", f"wf{i}", "completed", "wanted", done, done))
    rows.append(("busy", "wf", "waiting", None, NOW - 5, None))
    events: list[tuple[object, ...]] = [("busy", f"e{i % 2}", str(i), None) for i in range(5)]
    if history:
        for i in range(HISTORY):
            done = NOW - 3_600_000_000 - i * 2_000_000
            rows.append((f"h{i:05d}", "old", "failed", f"k{i:05d}", done, done))
            events.append((f"h{i:05d}", "e", str(i), None))
            events.append((f"h{i:05d}", "e", str(i), done))
    raw.executemany(
        "INSERT INTO runs (id, workflow, status, input, idempotency_key, created_at, updated_at,"
        " finished_at) VALUES (?, ?, ?, '1', ?, ?, ?, ?)",
        [(run_id, wf, status, key, t, t, done) for run_id, wf, status, key, t, done in rows],
    )
    raw.executemany(
        "INSERT INTO events (run_id, name, payload, created_at, taken_at) VALUES (?, ?, ?, 1, ?)",
        events,
    )
    raw.execute("ANALYZE")


def run(raw: sqlite3.Connection, script: Script[object]) -> tuple[object, int]:
    """Run a read ``script``: its result, and the virtual machine instructions
    SQLite ran for it (a measure of the entries and rows it visited)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    def execute(sql: str, params: Params) -> list[Row]:
        return raw.execute(sql, params).fetchall()

    raw.set_progress_handler(count, 1)
    try:
        return drive(script, execute), steps
    finally:
        raw.set_progress_handler(None, 1)


def plan(raw: sqlite3.Connection, name: str, params: tuple[object, ...]) -> list[str]:
    return [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {QUERIES[name]}", params)]


def reads() -> dict[str, Script[object]]:
    return {
        "find_by_key": scripts.find_by_key(NOW, "wanted", 20),
        "buffered_events": scripts.buffered_events(NOW, "busy", 100),
        "finished_history": scripts.finished_history(NOW, 60),
    }


def test_each_read_seeks_its_index() -> None:
    """Never a scan: the runs of a key are a seek in runs_key, read in order
    (no sort); a run's buffered events a seek in events_buffered (sorting
    only that run's); the runs of the last minutes a range of runs_finished."""
    with database() as raw:
        fill(raw, history=True)
        assert plan(raw, "find_by_key", ("wanted", 20)) == [
            "SEARCH runs USING INDEX runs_key (idempotency_key=?)"
        ]
        assert plan(raw, "buffered_events", ("busy", 100)) == [
            "SEARCH events USING INDEX events_buffered (run_id=?)",
            "USE TEMP B-TREE FOR ORDER BY",
        ]
        assert plan(raw, "finished_history", (NOW - MINUTE_US, NOW)) == [
            "SEARCH runs USING INDEX runs_finished (finished_at>? AND finished_at<?)",
            "USE TEMP B-TREE FOR GROUP BY",
        ]


def test_what_a_read_costs_does_not_grow_with_the_rest_of_the_store() -> None:
    """Each read gives the same answer, at about the same cost, with or
    without 30,000 older finished runs (each with a key of its own and
    events of its own): the reads never visit them."""
    with database() as raw:
        fill(raw, history=False)
        alone = {name: run(raw, script) for name, script in reads().items()}
    with database() as raw:
        fill(raw, history=True)
        crowded = {name: run(raw, script) for name, script in reads().items()}
    for name, (result, cost) in alone.items():
        assert crowded[name][0] == result, name
        # Deeper B-trees cost a few instructions per seek; a scan would cost thousands.
        assert crowded[name][1] < cost * 1.5 + 200, (name, cost, crowded[name][1])
    history, _ = alone["finished_history"]
    assert history == [
        FinishedMinute(datetime.fromtimestamp((NOW - i * MINUTE_US) / 1e6, UTC), 1, 0, 0)
        for i in range(10, 0, -1)
    ]


def test_only_creating_and_deleting_a_run_write_the_key_index() -> None:
    """The index of keys costs the hot path nothing: no claim, step save,
    sleep, wait, hand-back, wake, end or requeue writes one of its columns,
    so SQLite does not even open it for them."""
    with database() as raw:

        def writes_the_index(sql: str) -> bool:
            return writes_index(raw, "runs_key", sql)

        untouched = [
            "extend",
            "hand_back",
            "sleep",
            "wait",
            "wait_ready",
            "wake",
            "took_event",
            "finish",
            "end_fenced",
            "end_unfenced",
            "requeue",
            "debounce_run",
            "block",
        ]
        assert [name for name in untouched if writes_the_index(QUERIES[name])] == []
        assert not writes_the_index(with_marks("claim_update", "ids", 3))
        assert writes_the_index(QUERIES["insert_run"])
        assert writes_the_index(with_marks("purge_runs", "ids", 3))
