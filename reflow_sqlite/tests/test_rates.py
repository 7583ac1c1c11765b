"""Rate limits and debounce at scale: runs blocked by a rate cost a claim
nothing, runs without rates pay one probe for them, and a debounced create
finds its open run with one seek.

The behaviour itself (windows, blocking, release, debounce) is the
conformance suite's (``reflow_conformance.suite.test_rates``); these tests
look at how the SQLite backend does it.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta

from reflow_core.adapter import rate_block
from reflow_core.storage import NewRun, RateLimit
from reflow_sqlite import _scripts as scripts
from reflow_sqlite._queries import QUERIES

from .test_limits import FREE, LEASE_US, NOW, check_claim_plan, claim_cost, database, plan, run

RATE_BLOCKED = 10_000
KEYS = 10
PERIOD_US = 60_000_000


def fill(raw: sqlite3.Connection, *, blocked: bool) -> None:
    """With ``blocked``: 10 rate keys whose windows are full (their max of
    claims made a second ago, their waits an hour off), and 10,000 runs a
    claim blocked by them, of a higher priority than anything else, so a
    claim that read them would meet them first. And 1,000 free runs."""
    columns = (
        "id, workflow, status, input, created_at, updated_at, wake_at, priority,"
        " rate_key1, rate_max1, rate_period1, blocked_by"
    )
    rows: list[tuple[object, ...]] = []
    if blocked:
        for i in range(RATE_BLOCKED):
            key = f"r{i % KEYS}"
            rows.append((f"blocked-{i:05d}", 1, 9, key, 5, PERIOD_US, rate_block(key)))
        raw.executemany(
            "INSERT INTO rate_claims (key, at) VALUES (?, ?)",
            [(f"r{k}", NOW - 1_000_000) for k in range(KEYS) for _ in range(5)],
        )
        raw.executemany(
            "INSERT INTO rate_waits (key, at) VALUES (?, ?)",
            [(f"r{k}", NOW + 3_600_000_000) for k in range(KEYS)],
        )
    for i in range(FREE):
        rows.append((f"free-{i:05d}", 2, 0, None, None, None, None))
    raw.executemany(
        f"INSERT INTO runs ({columns}) VALUES (?, 'wf', 'pending', '1', 1, 1, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    raw.execute("ANALYZE")


def test_a_claim_never_reads_rate_blocked_runs() -> None:
    """With 10,000 runs blocked by full rates, of the highest priority, a
    claim that takes the 1,000 free runs costs what it costs without them:
    they are in no index the claim reads (runs_pending and runs_due leave
    blocked runs out), none is written, and the waits of their keys, not
    due yet, cost one probe of rate_waits_at."""
    with database() as raw:
        fill(raw, blocked=True)
        before = raw.execute(
            "SELECT id, updated_at, blocked_by FROM runs WHERE blocked_by IS NOT NULL"
        ).fetchall()
        assert len(before) == RATE_BLOCKED

        assert plan(raw, QUERIES["due_rate_waits"], (NOW,)) == [
            "SEARCH rate_waits USING COVERING INDEX rate_waits_at (at<?)"
        ]
        check_claim_plan(raw)

        seen: list[str] = []
        claimed, cost = claim_cost(raw, seen)
        assert claimed == [f"free-{i:05d}" for i in range(FREE)]
        after = raw.execute(
            "SELECT id, updated_at, blocked_by FROM runs WHERE blocked_by IS NOT NULL"
        ).fetchall()
        assert after == before  # not one written
        assert raw.execute("SELECT count(*) FROM rate_waits").fetchone() == (KEYS,)
    with database() as raw:
        fill(raw, blocked=False)
        seen_alone: list[str] = []
        claimed_alone, cost_alone = claim_cost(raw, seen_alone)
        assert claimed_alone == claimed
    assert seen == seen_alone
    # Reading 10,000 more index entries (and their rows) would cost far more
    # than the 10% allowed here for a larger file's deeper B-trees.
    assert cost < cost_alone * 1.1, (cost, cost_alone)


def test_runs_without_rates_pay_one_probe_for_them() -> None:
    """A claim of runs without rates runs the statements it ran before rates
    existed, and one more: the probe of rate waits. Neither rate table is
    written."""
    with database() as raw:
        for i in range(3):
            run(raw, scripts.create(NOW, NewRun("wf", "1"), f"r{i}"))
        seen: list[str] = []
        claimed = run(raw, scripts.claim(NOW, ["wf"], 10, LEASE_US), seen)
        assert isinstance(claimed, list)
        assert len(claimed) == 3
        assert seen[0] == QUERIES["due_rate_waits"]
        assert [sql for sql in seen if "rate_" in sql and "rate_key1" not in sql] == [seen[0]]
        assert len(seen) == 5, seen  # the probe, lapsed, due, update, steps
        assert raw.execute("SELECT count(*) FROM rate_claims").fetchone() == (0,)


def test_claims_are_recorded_trimmed_and_blocked_runs_released_in_claim_order() -> None:
    """A claim records one claim per rate key of each run it takes and trims
    the key's claims that left the window; a run over the rate is blocked and
    the key waits until the window has room; the first claim from then on
    releases as many blocked runs as there is room for, by priority then due
    time, and waits again for the rest."""
    rate = (RateLimit("r", 2, timedelta(microseconds=PERIOD_US)),)
    with database() as raw:
        raw.execute("INSERT INTO rate_claims (key, at) VALUES ('r', ?)", (NOW - PERIOD_US,))
        for i, priority in enumerate((0, 0, 1, 3, 2)):
            new = NewRun("wf", "1", priority=priority, rates=rate)
            run(raw, scripts.create(NOW - 10 + i, new, f"r{i}"))
        long_lease = 10 * PERIOD_US  # the runs taken stay held while time passes
        claimed = run(raw, scripts.claim(NOW, ["wf"], 10, long_lease))
        assert isinstance(claimed, list)
        assert [c.run.id for c in claimed] == ["r3", "r4"]
        # The claim that left the window is gone; the two made are recorded.
        assert raw.execute("SELECT key, at FROM rate_claims ORDER BY at").fetchall() == [
            ("r", NOW),
            ("r", NOW),
        ]
        blocked = raw.execute("SELECT id FROM runs WHERE blocked_by = 'reflow:rate:r'")
        assert sorted(row[0] for row in blocked) == ["r0", "r1", "r2"]
        assert raw.execute("SELECT key, at FROM rate_waits").fetchall() == [("r", NOW + PERIOD_US)]
        # Not yet: nothing is released or claimed.
        assert run(raw, scripts.claim(NOW + PERIOD_US - 1, ["other"], 10, LEASE_US)) == []
        assert raw.execute("SELECT count(*) FROM runs WHERE blocked_by IS NOT NULL").fetchone() == (
            3,
        )
        # The wait has come: a claim of another workflow releases two, the
        # first by priority then due time, and waits again for the third.
        later = NOW + PERIOD_US
        assert run(raw, scripts.claim(later, ["other"], 10, LEASE_US)) == []
        left = raw.execute("SELECT id FROM runs WHERE blocked_by IS NOT NULL").fetchall()
        assert left == [("r1",)]
        # The window of the release holds no claim (those made at NOW left it
        # just then): the next room is a period after the release.
        assert raw.execute("SELECT key, at FROM rate_waits").fetchall() == [
            ("r", later + PERIOD_US)
        ]
        claimed = run(raw, scripts.claim(later, ["wf"], 10, long_lease))
        assert isinstance(claimed, list)
        assert [c.run.id for c in claimed] == ["r2", "r0"]


def test_a_debounced_create_is_one_seek_and_a_requeue_keeps_one_open_run() -> None:
    """The open run of a debounce key is found with one seek in the unique
    index runs_debounce. A cancelled run that was never claimed, requeued
    while another open run holds its key, gives the key up: the other stays
    the one a debounced create updates."""
    with database() as raw:
        assert plan(raw, QUERIES["open_debounced"], ("wf", "d")) == [
            "SEARCH runs USING INDEX runs_debounce (workflow=? AND debounce_key=?)"
        ]
        first = run(raw, scripts.create(NOW, NewRun("wf", "1", debounce_key="d"), "a"))
        assert raw.execute("SELECT id, input FROM runs").fetchall() == [("a", "1")]
        assert run(raw, scripts.update_status(NOW, "a", "cancelled", None, None))
        second = run(raw, scripts.create(NOW, NewRun("wf", "2", debounce_key="d"), "b"))
        assert run(raw, scripts.requeue(NOW, "a"))
        third = run(raw, scripts.create(NOW, NewRun("wf", "3", debounce_key="d"), "c"))
        rows = raw.execute("SELECT id, status, input, debounce_key FROM runs ORDER BY id")
        assert rows.fetchall() == [("a", "pending", "1", None), ("b", "pending", "3", "d")]
        assert [getattr(r, "created", None) for r in (first, second, third)] == [
            True,
            True,
            False,
        ]
