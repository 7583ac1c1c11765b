"""Priorities and concurrency limits at scale: blocked runs cost a claim
nothing, and runs without limits pay no statement for them.

The behaviour itself (claim order, blocking, unblocking) is the conformance
suite's (``reflow_conformance.suite.test_limits``) and the random comparison
with the memory backend's (``test_matches_memory``); these tests look at
how the SQLite backend does it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from reflow_core.storage import ConcurrencyLimit, Lease, NewRun, StepRecord
from reflow_sqlite import _scripts as scripts
from reflow_sqlite._queries import per_workflow
from reflow_sqlite._scripts import Params, Row, Script, StepRow
from reflow_sqlite._thread import drive

from .conftest import database

NOW = 1_900_000_000_000_000  # microseconds since the epoch
LEASE_US = 60_000_000
KEYS_AT_LIMIT = 9_000
FREE = 1_000


def run(raw: sqlite3.Connection, script: Script[object], seen: list[str] | None = None) -> object:
    """Run ``script`` as one transaction; ``seen`` collects its statements."""

    def execute(sql: str, params: Params) -> list[Row]:
        if seen is not None:
            seen.append(sql)
        return raw.execute(sql, params).fetchall()

    raw.execute("BEGIN IMMEDIATE")
    try:
        return drive(script, execute)
    finally:
        raw.execute("COMMIT")


def fill(raw: sqlite3.Connection, *, blocked: bool) -> None:
    """9,000 limit keys each held by a running run (at their max of 1) and,
    with ``blocked``, a run of each key that a claim passed over: blocked, and
    of a higher priority than anything else, so a claim that read them would
    meet them first. And 1,000 free runs (each with a free key of its own)."""
    columns = (
        "id, workflow, status, input, created_at, updated_at, wake_at, lease_expires_at,"
        " priority, limit_key1, limit_max1, blocked_by"
    )
    rows: list[tuple[object, ...]] = []
    for i in range(KEYS_AT_LIMIT):
        key = f"k{i:05d}"
        held = (f"held-{i:05d}", "running", None, NOW + LEASE_US, 0, key, None)
        rows.append(held)
        if blocked:
            rows.append((f"blocked-{i:05d}", "pending", 1, None, 9, key, key))
    for i in range(FREE):
        rows.append((f"free-{i:05d}", "pending", 2, None, 0, f"f{i:05d}", None))
    raw.executemany(
        f"INSERT INTO runs ({columns}) VALUES (?, 'wf', ?, '1', 1, 1, ?, ?, ?, ?, 1, ?)", rows
    )
    raw.execute("ANALYZE")


def plan(raw: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[str]:
    """The steps of ``sql``'s query plan."""
    return [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def check_claim_plan(raw: sqlite3.Connection) -> None:
    """The claim's plan: pending runs from runs_pending in claim order, due
    timed runs from runs_due."""
    steps = plan(raw, per_workflow("claim_due", 1), ("wf", NOW, 5, "wf", NOW, 5, 5))
    on_runs = [step for step in steps if step.startswith(("SCAN runs", "SEARCH runs"))]
    assert on_runs == [
        "SEARCH runs USING INDEX runs_pending (workflow=?)",
        "SEARCH runs USING INDEX runs_due (workflow=? AND wake_at<?)",
    ], steps


def claim_cost(raw: sqlite3.Connection, seen: list[str] | None = None) -> tuple[list[str], int]:
    """Claim every free run in one call: the ids claimed, and the virtual
    machine instructions SQLite ran for it (a measure of the rows visited);
    ``seen`` collects the statements it ran."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    raw.set_progress_handler(count, 1)
    try:
        claimed = run(raw, scripts.claim(NOW, ["wf"], FREE + 10, LEASE_US), seen)
    finally:
        raw.set_progress_handler(None, 1)
    assert isinstance(claimed, list)
    return sorted(c.run.id for c in claimed), steps


def test_a_claim_never_reads_blocked_runs() -> None:
    """With 9,000 keys at their limit, each blocking a run of the highest
    priority, a claim that takes the 1,000 free runs costs what it costs
    without the blocked runs at all: they are in no index the claim reads
    (runs_pending and runs_due leave them out), and none is written."""
    with database() as raw:
        fill(raw, blocked=True)
        before = raw.execute(
            "SELECT id, updated_at, blocked_by FROM runs WHERE blocked_by IS NOT NULL"
        ).fetchall()
        assert len(before) == KEYS_AT_LIMIT

        # Neither index the claim reads holds a blocked run.
        check_claim_plan(raw)
        for name in ("runs_pending", "runs_due"):
            (where,) = raw.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,))
            assert "blocked_by IS NULL" in where[0]

        claimed, cost = claim_cost(raw)
        assert claimed == [f"free-{i:05d}" for i in range(FREE)]
        after = raw.execute(
            "SELECT id, updated_at, blocked_by FROM runs WHERE blocked_by IS NOT NULL"
        ).fetchall()
        assert after == before  # not one written
    with database() as raw:
        fill(raw, blocked=False)
        claimed_alone, cost_alone = claim_cost(raw)
        assert claimed_alone == claimed
    # Reading 9,000 more index entries (and their rows) would cost far more
    # than the 10% allowed here for a larger file's deeper B-trees.
    assert cost < cost_alone * 1.1, (cost, cost_alone)


def test_runs_without_limits_pay_no_statement_for_them() -> None:
    """A finish, a hand-back, a sleep or a wait of a run without limits
    runs the statements it ran before limits existed: the keys come back
    from the statement that stops the run (RETURNING), and only a key runs
    the statement that unblocks a run. A step save is unchanged too."""

    def statements(build: Callable[[Lease], Script[object]], limits: int) -> list[str]:
        with database() as raw:
            new = NewRun(
                "wf",
                "1",
                run_id="r",
                limits=tuple(ConcurrencyLimit(f"key{i}", 1) for i in range(limits)),
            )
            run(raw, scripts.create(NOW, new, "r"))
            claimed = run(raw, scripts.claim(NOW, ["wf"], 1, LEASE_US))
            assert isinstance(claimed, list)
            seen: list[str] = []
            assert run(raw, build(claimed[0].lease), seen) not in (None, False)
            return seen

    step = StepRow.of(StepRecord("s", "completed", output="1"))
    writes: dict[str, Callable[[Lease], Script[object]]] = {
        "finish": lambda lease: scripts.finish(NOW, lease, "completed", "1", None, None),
        "hand_back": lambda lease: scripts.update_status(NOW, "r", "pending", lease, None),
        "fail": lambda lease: scripts.update_status(NOW, "r", "failed", lease, None),
        "sleep": lambda lease: scripts.sleep(NOW, lease, "z", 1_000_000),
        "wait": lambda lease: scripts.wait(NOW, lease, "w", "go", None),
        "save": lambda lease: scripts.save_step(NOW, lease, step, LEASE_US),
    }
    expected = {"finish": 1, "hand_back": 1, "fail": 1, "sleep": 3, "wait": 4, "save": 2}
    for name, build in writes.items():
        plain = statements(build, 0)
        assert len(plain) == expected[name], (name, plain)
        assert not [sql for sql in plain if "blocked_by" in sql], (name, plain)
        # A run with two limits unblocks a run of each key as it stops.
        held = statements(build, 2)
        unblocks = 0 if name == "save" else 2
        assert len(held) == len(plain) + unblocks, (name, held)


def test_claims_by_priority_then_due_time_across_statuses() -> None:
    """Pending runs (runs_pending) and due sleeping or delayed runs (runs_due)
    are merged in one order: priority, then due time, then id."""
    with database() as raw:
        rows = [
            ("p-low-early", "pending", 10, 0),
            ("p-high-late", "pending", 40, 5),
            ("s-high-early", "sleeping", 20, 5),
            ("d-mid", "delayed", 5, 1),
            ("s-future-top", "sleeping", NOW + 1, 9),  # not due yet
            ("p-low-late", "pending", 30, 0),
        ]
        raw.executemany(
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at, wake_at,"
            " priority) VALUES (?, 'wf', ?, '1', 1, 1, ?, ?)",
            rows,
        )
        order: list[str] = []
        for _ in range(6):
            claimed = run(raw, scripts.claim(NOW, ["wf"], 1, LEASE_US))
            assert isinstance(claimed, list)
            order.extend(c.run.id for c in claimed)
        assert order == ["s-high-early", "p-high-late", "d-mid", "p-low-early", "p-low-late"]
