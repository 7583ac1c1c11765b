"""The statements of ``queries.sql``, rendered for one storage.

:func:`statements` fills the slots of the file (see its header) with this
package's own values, never with user data: the schema quoted by psycopg as
an identifier, the channels quoted by psycopg as literals, the clock
expression and the column orders of :mod:`reflow_core.adapter`'s row
mappers. Every value a statement uses is a bound ``%(name)s`` parameter.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from psycopg import sql

from reflow_core.adapter import RUN_COLUMNS, SCHEDULE_COLUMNS, WORKER_COLUMNS, load_queries
from reflow_core.storage import CHILDREN_WAIT_PREFIX, RATE_BLOCK_PREFIX

__all__ = ["Statements", "channel_name", "finish_channel_name", "list_runs_query", "statements"]

Statements = Mapping[str, bytes]
"""The rendered statements of one storage by name, as bytes ready for psycopg."""

_RUN_COLUMNS_R = ", ".join(f"r.{column}" for column in RUN_COLUMNS.split(", "))
_RUN_COLUMNS_C = ", ".join(f"c.{column}" for column in RUN_COLUMNS.split(", "))


def channel_name(schema: str) -> str:
    """The ``LISTEN``/``NOTIFY`` channel of ``schema``."""
    return f"reflow:{schema}"[:63]


def finish_channel_name(schema: str) -> str:
    """The channel of ``schema``'s finish hints (the ids of runs that ended)."""
    return f"reflow-done:{schema}"[:63]


@functools.lru_cache(maxsize=32)
def statements(schema: str, *, notify: bool, test_clock: bool) -> Statements:
    """Every statement of ``queries.sql`` for ``schema``, loaded once per
    configuration.

    ``notify`` off puts ``NULL`` in place of the notifications, wake-ups
    and finish hints alike;
    ``test_clock`` binds the clock as the ``now`` parameter instead of
    reading the server's.

    ``claim`` and ``claim_limited`` come twice: as they are for a claim of
    every version (``{served}`` empty), and, as ``claim_served`` and
    ``claim_limited_served``, for a claim that serves some versions only
    (the file rendered again with ``{served}`` and ``{held_ids}`` filtering
    the versions; see ``queries.sql``).
    """
    channel = sql.Literal(channel_name(schema)).as_string(None)
    slots = {
        "schema": sql.Identifier(schema).as_string(None),
        "now": "%(now)s::timestamptz" if test_clock else "now()",
        "locked_now": "%(now)s::timestamptz" if test_clock else "NULL::timestamptz",
        "channel": channel,
        "wake_channel": channel,
        "done_channel": sql.Literal(finish_channel_name(schema)).as_string(None),
        "children_prefix": sql.Literal(CHILDREN_WAIT_PREFIX).as_string(None),
        "rate_prefix": sql.Literal(RATE_BLOCK_PREFIX).as_string(None),
        "run_columns": RUN_COLUMNS,
        "run_columns_r": _RUN_COLUMNS_R,
        "run_columns_c": _RUN_COLUMNS_C,
        "schedule_columns": SCHEDULE_COLUMNS,
        "worker_columns": WORKER_COLUMNS,
    }
    if not notify:
        slots.update(
            notify="NULL",
            notify_ins="NULL",
            notify_at="NULL",
            wake_channel="NULL::text",
            notify_done_r="NULL",
            notify_done_f="NULL",
            notify_done_many="NULL::bigint",
        )
    queries = load_queries(__package__, "queries.sql", {**slots, "served": ""})
    versioned = load_queries(
        __package__,
        "queries.sql",
        {
            **slots,
            "served": " AND " + queries["version_served"],
            "held_ids": queries["held_ids_served"],
        },
    )
    queries["claim_served"] = versioned["claim"]
    queries["claim_limited_served"] = versioned["claim_limited"]
    return MappingProxyType({name: text.encode() for name, text in queries.items()})


_LIST_FILTERS = (
    ("statuses", "list_by_status"),
    ("workflow", "list_by_workflow"),
    ("after_at", "list_after"),
)


def list_runs_query(queries: Statements, params: Mapping[str, Any]) -> bytes:
    """The ``list_runs`` statement with the filters whose parameters ``params``
    holds (``statuses``, ``workflow``, ``after_at``/``after_id``)."""
    clauses = [queries[name] for param, name in _LIST_FILTERS if param in params]
    where = b" WHERE " + b" AND ".join(clauses) if clauses else b""
    return queries["list_runs"] + where + b" " + queries["list_runs_order"]
