"""The statements of ``queries.sql``, loaded once at import.

Most are complete as loaded. A few keep a slot that is filled per call with
placeholders or a fixed value, never with data: :func:`with_marks` gives
the text of a statement for a list of ``count`` values, one ``?`` each,
:func:`with_rows` for ``count`` rows of ``width`` values each,
:func:`per_workflow` for ``count`` workflows, one subquery each, and
:func:`lapsed_served` for a claim of lapsed leases that serves some versions
only of some of its workflows.
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
    "lapsed_served",
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
    "served",
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


Served = tuple[int, ...]
"""What a claim serves of each of its workflows, in their order: how many
versions, or 0 for every version."""


def _version_in(count: int) -> str:
    """The ``{served}`` of one workflow's arm: ``count`` versions, or none
    (empty) for every version."""
    return f" AND version IN ({placeholders(count)})" if count else ""


def _version_case(served: Served) -> str:
    """The ``{served}`` of a statement over several workflows: for each one
    that serves ``n`` versions (in order), a ``WHEN ?`` (the workflow) ``THEN
    version IN (?, ...)`` (its versions); empty when every workflow takes
    every version."""
    arms = "".join(f" WHEN ? THEN version IN ({placeholders(n)})" for n in served if n)
    return f" AND CASE workflow{arms} ELSE 1 END" if arms else ""


@functools.lru_cache(maxsize=256)
def per_workflow(name: str, count: int, served: Served | None = None) -> str:
    """Statement ``name`` for ``count`` workflows: its ``{arms}`` slot holds
    statement ``name + "_arm"`` ``count`` times, joined by ``UNION ALL`` (one
    subquery per workflow, each reading the head of that workflow's rows
    through its index), and its ``{workflows}`` slot, if any, ``count``
    placeholders (cached: an engine serves the same workflows claim after
    claim). With ``served`` (one entry per workflow, see :data:`Served`),
    the ``{served}`` slots of the arms and of the statement filter the
    versions; without it, or with none filtered, they are empty and the
    statement is the one every claim of every version runs."""
    arm = QUERIES[f"{name}_arm"]
    shape = served if served is not None and any(served) else (0,) * count
    if len(shape) != count:
        raise ValueError(f"{name}: {count} workflows, but versions for {len(shape)}")
    arms = [
        render_sql(arm, {"served": _version_in(n)}, where=f"queries.sql:{name}_arm") for n in shape
    ]
    return fill(
        name,
        arms="\nUNION ALL\n".join(arms),
        workflows=placeholders(count),
        served=_version_case(shape),
    )


@functools.lru_cache(maxsize=256)
def lapsed_served(served: Served) -> str:
    """``claim_lapsed_served`` for workflows that serve ``served`` (one entry
    per workflow, see :data:`Served`; at least one of them not 0)."""
    return fill(
        "claim_lapsed_served", workflows=placeholders(len(served)), served=_version_case(served)
    )
