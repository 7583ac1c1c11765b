"""The statements of ``queries.sql``, loaded once at import.

Most are complete as loaded. A few keep a slot that is filled per call with
placeholders or a fixed value, never with data: :func:`with_marks` gives
the text of a statement for a list of ``count`` values, one ``?`` each,
:func:`with_rows` for ``count`` rows of ``width`` values each, and
:func:`per_workflow` for ``count`` workflows, one subquery each.
"""

from __future__ import annotations

import functools

from reflow_core.adapter import (
    RUN_COLUMNS,
    SCHEDULE_COLUMNS,
    STEP_COLUMNS,
    WORKER_COLUMNS,
    load_queries,
    render_sql,
)

__all__ = [
    "PER_CALL_SLOTS",
    "QUERIES",
    "fill",
    "per_workflow",
    "placeholders",
    "with_marks",
    "with_rows",
]

PER_CALL_SLOTS = (
    "workflows",
    "ids",
    "rows",
    "keys",
    "arms",
    "statuses",
    "where",
    "level",
    "application_id",
    "version",
)
"""Slots left in the loaded text, filled per call (see ``queries.sql``)."""

QUERIES: dict[str, str] = load_queries(
    "reflow_sqlite",
    "queries.sql",
    {
        "run_columns": RUN_COLUMNS,
        "step_columns": STEP_COLUMNS,
        "schedule_columns": SCHEDULE_COLUMNS,
        "worker_columns": WORKER_COLUMNS,
        # Kept as they are, for fill() and with_marks().
        **{slot: "{" + slot + "}" for slot in PER_CALL_SLOTS},
    },
)
"""Every statement of ``queries.sql`` by name."""


def placeholders(count: int) -> str:
    """``count`` comma-separated ``?``."""
    return ",".join("?" * count)


def fill(name: str, **values: str) -> str:
    """Statement ``name`` with its per-call slots filled from ``values``."""
    return render_sql(QUERIES[name], values, where=f"queries.sql:{name}")


@functools.lru_cache(maxsize=1024)
def with_marks(name: str, slot: str, count: int) -> str:
    """Statement ``name`` with ``slot`` holding ``count`` placeholders (cached:
    a claim runs the same few shapes again and again)."""
    return fill(name, **{slot: placeholders(count)})


@functools.lru_cache(maxsize=64)
def with_rows(name: str, slot: str, count: int, width: int) -> str:
    """Statement ``name`` with ``slot`` holding ``count`` rows of ``width``
    placeholders each, ``(?, ?), (?, ?)`` (cached: a batch insert runs a few
    fixed shapes)."""
    row = f"({placeholders(width)})"
    return fill(name, **{slot: ",".join([row] * count)})


@functools.lru_cache(maxsize=64)
def per_workflow(name: str, count: int) -> str:
    """Statement ``name`` for ``count`` workflows: its ``{arms}`` slot holds
    statement ``name + "_arm"`` ``count`` times, joined by ``UNION ALL`` (one
    subquery per workflow, each reading the head of that workflow's rows
    through its index), and its ``{workflows}`` slot, if any, ``count``
    placeholders (cached: an engine serves the same workflows claim after
    claim)."""
    arm = QUERIES[f"{name}_arm"]
    return fill(name, arms="\nUNION ALL\n".join([arm] * count), workflows=placeholders(count))
