"""Claims and due schedules under a backlog: what they read does not depend
on how many runs are pending, nor on other workflows' runs or schedules.

A claim seeks each workflow it serves in the claim indexes (which lead with
the workflow) and reads the head of its queue only; due schedules of the
workflows an engine serves are read a workflow at a time. The behaviour
itself (claim order, limits, rates) is the conformance suite's and
``test_limits``'; these tests look at the plans SQLite picks, with deep
backlogs in the file and statistics gathered, and at the virtual machine
instructions a claim costs with and without them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from reflow_core.storage import ScheduleRecord
from reflow_sqlite import _scripts as scripts
from reflow_sqlite._queries import lapsed_served, per_workflow, with_marks
from reflow_sqlite._scripts import Params, Row, Script
from reflow_sqlite._thread import drive

from .conftest import database

NOW = 1_900_000_000_000_000  # microseconds since the epoch
LEASE_US = 60_000_000
BACKLOG = 60_000  # pending runs in each backlog
CLAIMABLE = 100  # pending runs of the served workflow ahead of its backlog
OTHER_SCHEDULES = 1_600


def backlog_rows(workflow: str, prefix: str, first_wake: int) -> Iterator[tuple[object, ...]]:
    """``BACKLOG`` pending runs of ``workflow``, due from ``first_wake`` on,
    one microsecond apart."""
    for i in range(BACKLOG):
        yield (f"{prefix}{i:06d}", workflow, "pending", first_wake + i, None, 0)


def fill(raw: sqlite3.Connection, *, backlog: bool) -> None:
    """The runs a claim of ``wf`` takes: ``CLAIMABLE`` pending runs, two
    sleeping runs now due and a lapsed lease. With ``backlog``, also
    ``BACKLOG`` pending runs of ``wf`` created after them and as many of
    ``other`` (a workflow the claim does not serve) created before them,
    sleeping and lapsed runs of ``other`` due before everything of ``wf``,
    and 1,600 due schedules of ``other`` ahead of the few of ``wf``."""
    rows: list[tuple[object, ...]] = [
        (f"wf-{i:04d}", "wf", "pending", NOW - 10_000_000 + i, None, 0) for i in range(CLAIMABLE)
    ]
    rows += [
        ("wf-asleep", "wf", "sleeping", NOW - 20_000_000, None, 0),
        ("wf-asleep-high", "wf", "sleeping", NOW - 4_000_000, None, 5),
        ("wf-future", "wf", "sleeping", NOW + 60_000_000, None, 9),
        ("wf-lapsed", "wf", "running", None, NOW - 1, 0),
    ]
    schedules: list[tuple[str, str, int, int]] = [
        (f"wf-s{i}", "wf", NOW - 1_000_000 + i, 0) for i in range(3)
    ] + [("wf-paused", "wf", NOW - 10_000_000, 1), ("wf-later", "wf", NOW + 1, 0)]
    columns = "id, workflow, status, wake_at, lease_expires_at, priority"
    insert = (
        f"INSERT INTO runs ({columns}, input, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, '1', 1, 1)"
    )
    raw.execute("BEGIN")
    raw.executemany(insert, rows)
    if backlog:
        raw.executemany(insert, backlog_rows("other", "o", NOW - 3_600_000_000))
        raw.executemany(insert, backlog_rows("wf", "n", NOW - 1_000_000))
        raw.executemany(
            insert,
            [
                (f"o-asleep-{i}", "other", "sleeping", NOW - 3_000_000_000 + i, None, 9)
                for i in range(1000)
            ]
            + [
                (f"o-lapsed-{i}", "other", "running", None, NOW - 3_000_000_000 + i, 0)
                for i in range(1000)
            ],
        )
        schedules += [
            (f"o-s{i:04d}", "other", NOW - 3_600_000_000 + i, 0) for i in range(OTHER_SCHEDULES)
        ]
    raw.executemany(
        "INSERT INTO schedules (key, workflow, next_run_at, paused, input, recurrence,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, '1', 'every:60', 1, 1)",
        schedules,
    )
    raw.execute("COMMIT")
    raw.execute("ANALYZE")


def plan(raw: sqlite3.Connection, sql: str, params: Params) -> list[str]:
    """The steps of ``sql``'s query plan."""
    return [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def due_params(workflows: list[str], count: int) -> list[object]:
    """The parameters of ``claim_due`` for ``workflows``."""
    params: list[object] = [value for w in workflows for value in (w, NOW, count)]
    return [*params, *workflows, NOW, count, count]


def run(raw: sqlite3.Connection, script: Script[object]) -> tuple[object, int]:
    """Run ``script`` as one transaction: its result, and the virtual machine
    instructions SQLite ran for it (a measure of the entries and rows it
    visited)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    def execute(sql: str, params: Params) -> list[Row]:
        return raw.execute(sql, params).fetchall()

    raw.set_progress_handler(count, 1)
    raw.execute("BEGIN IMMEDIATE")
    try:
        return drive(script, execute), steps
    finally:
        raw.execute("ROLLBACK")
        raw.set_progress_handler(None, 1)


def test_claims_seek_each_served_workflow_and_never_sort_the_backlog() -> None:
    """With 60,000 pending runs of the claimed workflow behind its claimable
    runs and 60,000 older ones of a workflow nobody claims, each served
    workflow's pending runs are a seek in runs_pending, read in claim order
    and cut at the count (no sort); its due timed runs a seek and range in
    runs_due (sorted: due ones only); its lapsed leases a seek and range in
    runs_lease. No statement scans runs, and the only sorts are of those
    ranges and of the merged heads."""
    with database() as raw:
        fill(raw, backlog=True)
        for workflows in (["wf"], ["wf", "idle"], ["idle", "other", "wf"]):
            steps = plan(raw, per_workflow("claim_due", len(workflows)), due_params(workflows, 25))
            assert not [step for step in steps if step.startswith("SCAN runs")], steps
            on_runs = [step for step in steps if step.startswith("SEARCH runs")]
            assert on_runs == [
                *["SEARCH runs USING INDEX runs_pending (workflow=?)"] * len(workflows),
                "SEARCH runs USING INDEX runs_due (workflow=? AND wake_at<?)",
            ], steps
            # Sorted: the due timed runs (just after their search), then the merged heads.
            sorts = [i for i, step in enumerate(steps) if step.startswith("USE TEMP B-TREE")]
            due = steps.index(on_runs[-1])
            assert sorts == [due + 1, len(steps) - 1], steps
            assert steps[-2:] == ["SCAN heads", "USE TEMP B-TREE FOR ORDER BY"], steps

        lapsed = with_marks("claim_lapsed", "workflows", 1)
        assert plan(raw, lapsed, ("wf", NOW, 25)) == [
            "SEARCH runs USING INDEX runs_lease (workflow=? AND lease_expires_at<?)"
        ]
        lapsed = with_marks("claim_lapsed", "workflows", 2)
        assert plan(raw, lapsed, ("wf", "idle", NOW, 25)) == [
            "SEARCH runs USING INDEX runs_lease (workflow=? AND lease_expires_at<?)",
            "USE TEMP B-TREE FOR ORDER BY",
        ]


def test_what_a_claim_reads_does_not_grow_with_the_backlog() -> None:
    """A claim of 25 takes the lapsed lease, then the highest priority, then
    the earliest due, whether or not the backlogs are there, and costs
    about the same: it never reads the other workflow's runs (older, of a
    higher priority or lapsed earlier) nor the claimed workflow's backlog
    beyond the runs it takes."""
    costs: list[int] = []
    taken: list[list[str]] = []
    for backlog in (False, True):
        with database() as raw:
            fill(raw, backlog=backlog)
            claimed, cost = run(raw, scripts.claim(NOW, ["wf", "idle"], 25, LEASE_US))
            assert isinstance(claimed, list)
            taken.append([c.run.id for c in claimed])
            costs.append(cost)
    assert taken[0] == taken[1]
    assert taken[0] == [
        "wf-lapsed",
        "wf-asleep-high",
        "wf-asleep",
        *[f"wf-{i:04d}" for i in range(22)],
    ]
    alone, crowded = costs
    # Deeper B-trees cost a few instructions per seek; reading the 60,000
    # runs of either backlog would cost hundreds of thousands.
    assert crowded < alone * 1.3 + 500, (alone, crowded)


def test_due_schedules_of_served_workflows_seek_their_index() -> None:
    """Due schedules of the workflows given are a seek per workflow in
    schedules_workflow_due, in due order (no sort of their own), so the
    1,600 due schedules of another workflow, all earlier, are not read nor
    returned; without workflows, every due schedule, as before."""
    costs: list[int] = []
    for backlog in (False, True):
        with database() as raw:
            fill(raw, backlog=backlog)
            steps = plan(
                raw, per_workflow("due_schedules_of", 2), ("wf", NOW, 10, "idle", NOW, 10, 10)
            )
            assert [step for step in steps if step.startswith(("SCAN sch", "SEARCH sch"))] == [
                "SEARCH schedules USING INDEX schedules_workflow_due (workflow=? AND next_run_at<?)"
            ] * 2, steps
            assert steps[-2:] == ["SCAN heads", "USE TEMP B-TREE FOR ORDER BY"], steps
            due, cost = run(raw, scripts.due_schedules(NOW, 10, ["idle", "wf"]))
            assert isinstance(due, list)
            assert [s.key for s in due if isinstance(s, ScheduleRecord)] == [
                "wf-s0",
                "wf-s1",
                "wf-s2",
            ]
            costs.append(cost)
            every, _ = run(raw, scripts.due_schedules(NOW, 10, None))
            assert isinstance(every, list)
            expected = (
                [f"o-s{i:04d}" for i in range(10)] if backlog else ["wf-s0", "wf-s1", "wf-s2"]
            )
            assert [s.key for s in every if isinstance(s, ScheduleRecord)] == expected
            none, _ = run(raw, scripts.due_schedules(NOW, 10, []))
            assert none == []
    alone, crowded = costs
    assert crowded < alone * 1.3 + 200, (alone, crowded)


def test_many_workflows_are_read_in_chunks_and_merged() -> None:
    """A claim or due-schedules read for more workflows than one statement
    holds runs a statement per chunk and merges them in the same order."""
    workflows = [f"idle{i:03d}" for i in range(scripts.WORKFLOW_CHUNK * 2)] + ["wf"]
    with database() as raw:
        fill(raw, backlog=False)
        claimed, _ = run(raw, scripts.claim(NOW, workflows, 5, LEASE_US))
        assert isinstance(claimed, list)
        assert [c.run.id for c in claimed] == [
            "wf-lapsed",
            "wf-asleep-high",
            "wf-asleep",
            "wf-0000",
            "wf-0001",
        ]
        due, _ = run(raw, scripts.due_schedules(NOW, 2, workflows))
        assert isinstance(due, list)
        assert [s.key for s in due if isinstance(s, ScheduleRecord)] == ["wf-s0", "wf-s1"]


UNSERVED = 500  # pending runs of version 1 ahead of the run of version 2


def test_a_claim_of_some_versions_passes_the_others_over_and_leaves_them() -> None:
    """500 pending runs of version 1 of ``wf`` ahead of one of version 2,
    due sleeping runs and a lapsed lease of version 1 before everything, a
    lapsed lease of version 2, and runs of another version of ``any``, a
    workflow the claim takes every version of: a claim serving version 2 of
    ``wf`` takes the lapsed lease of version 2, then the run of version 2
    and ``any``'s runs, and leaves every other row of runs as it was. Its
    statements seek the same indexes as the claim of every version (the
    runs of other versions are passed over on the way), whose statements
    have no version in them at all."""
    with database() as raw:
        rows: list[tuple[object, ...]] = [
            (f"v1-{i:04d}", "wf", "pending", NOW - 10_000_000 + i, None, 1) for i in range(UNSERVED)
        ]
        rows += [
            ("v2", "wf", "pending", NOW - 1_000_000, None, 2),
            ("v1-asleep", "wf", "sleeping", NOW - 20_000_000, None, 1),
            ("v1-lapsed", "wf", "running", None, NOW - 30_000_000, 1),
            ("v2-lapsed", "wf", "running", None, NOW - 1, 2),
            ("any-3", "any", "pending", NOW - 5_000_000, None, 3),
            ("any-asleep", "any", "sleeping", NOW - 4_000_000, None, 1),
        ]
        raw.executemany(
            "INSERT INTO runs (id, workflow, status, wake_at, lease_expires_at, version, input,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, '1', 1, 1)",
            rows,
        )
        raw.execute("ANALYZE")
        every = "SELECT * FROM runs ORDER BY id"
        before = raw.execute(every).fetchall()

        served = (1, 0)  # of wf, any
        due = per_workflow("claim_due", 2, served)
        params = ["wf", NOW, 2, 25, "any", NOW, 25, "wf", "any", NOW, "wf", 2, 25, 25]
        steps = plan(raw, due, params)
        assert [step for step in steps if step.startswith(("SCAN runs", "SEARCH runs"))] == [
            "SEARCH runs USING INDEX runs_pending (workflow=?)",
            "SEARCH runs USING INDEX runs_pending (workflow=?)",
            "SEARCH runs USING INDEX runs_due (workflow=? AND wake_at<?)",
        ], steps
        sorts = [i for i, step in enumerate(steps) if step.startswith("USE TEMP B-TREE")]
        assert len(sorts) == 2, steps  # the due timed runs, then the merged heads
        lapsed = lapsed_served(served)
        assert plan(raw, lapsed, ("wf", "any", NOW, "wf", 2, 25))[:1] == [
            "SEARCH runs USING INDEX runs_lease (workflow=? AND lease_expires_at<?)"
        ]
        for count in (1, 2, 5):
            assert "version" not in per_workflow("claim_due", count)
            assert per_workflow("claim_due", count) == per_workflow(
                "claim_due", count, (0,) * count
            )
            assert "version" not in with_marks("claim_lapsed", "workflows", count)

        raw.execute("BEGIN IMMEDIATE")
        claimed = drive(
            scripts.claim(NOW, ["wf", "any"], 10, LEASE_US, {"wf": (2,)}),
            lambda sql, params: raw.execute(sql, params).fetchall(),
        )
        raw.execute("COMMIT")
        assert isinstance(claimed, list)
        assert [(c.run.id, c.run.version, c.reclaimed) for c in claimed] == [
            ("v2-lapsed", 2, True),
            ("any-3", 3, False),
            ("any-asleep", 1, False),
            ("v2", 2, False),
        ]
        taken = {c.run.id for c in claimed}
        after = raw.execute(every).fetchall()
        assert [row for row in after if row[0] not in taken] == [
            row for row in before if row[0] not in taken
        ]
        # The claim of every version takes the rest, lapsed lease first.
        raw.execute("BEGIN IMMEDIATE")
        rest = drive(
            scripts.claim(NOW, ["wf", "any"], 10, LEASE_US),
            lambda sql, params: raw.execute(sql, params).fetchall(),
        )
        raw.execute("COMMIT")
        assert isinstance(rest, list)
        assert [c.run.id for c in rest] == [
            "v1-lapsed",
            "v1-asleep",
            *[f"v1-{i:04d}" for i in range(8)],
        ]
