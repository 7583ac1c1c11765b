"""Query plans, and the runs a claim must leave alone, for the tests that a
claim reads only what it must (``test_rates.py`` and ``test_limits.py``).

Test modules import this file relatively: with pytest's importlib import mode
the tests folder is not a package one can import from by name.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta

import psycopg
from psycopg import sql

from reflow_postgres import PostgresStorage

Admin = psycopg.Connection[tuple[object, ...]]
Node = dict[str, object]


def plan_nodes(plan: Node) -> list[Node]:
    """The plan's node and all below it, depth first."""
    nodes = [plan]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        nodes.extend(plan_nodes(child))
    return nodes


def explain(admin: Admin, statement: str, params: dict[str, object]) -> list[Node]:
    """Run ``statement`` under ``EXPLAIN ANALYZE``: the top node of its plan,
    then every node below it."""
    row = admin.execute(
        ("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement).encode(), params
    ).fetchone()
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else json.loads(str(row[0]))
    return [plan[0]["Plan"], *plan_nodes(plan[0]["Plan"])[1:]]


def explain_generic(admin: Admin, statement: str, params: dict[str, object]) -> list[Node]:
    """As :func:`explain`, with the generic plan of ``statement``: the one a
    server-side prepared statement (psycopg prepares a statement after a few
    runs) may keep using whatever its parameters. Call it in a transaction
    rolled back after: the statement runs."""
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", statement)))
    numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m[1]) + 1}", statement)
    admin.execute("SET LOCAL plan_cache_mode = force_generic_plan")
    admin.execute(("PREPARE generic_plan AS " + numbered).encode())
    try:
        values = ", ".join(["%s"] * len(names))
        row = (
            psycopg.ClientCursor(admin)
            .execute(
                f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE generic_plan({values})",
                [params[name] for name in names],
            )
            .fetchone()
        )
    finally:
        admin.execute("DEALLOCATE generic_plan")
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else json.loads(str(row[0]))
    return [plan[0]["Plan"], *plan_nodes(plan[0]["Plan"])[1:]]


def blocks(node: Node) -> int:
    """The shared blocks a node read, from the cache or not."""
    return int(str(node["Shared Hit Blocks"])) + int(str(node.get("Shared Read Blocks", 0)))


def explain_claim(admin: Admin, store: PostgresStorage, lease: timedelta) -> list[Node]:
    """The plan of a claim of up to 10 runs of ``wf`` (probing for due waits),
    rolled back: ``EXPLAIN ANALYZE`` really claims."""
    params = {"workflows": ["wf"], "limit": 10, "lease": lease, "probe": True, "skip": []}
    with admin.transaction(force_rollback=True):
        return explain(admin, store._sql["claim"].decode(), params)


def assert_index_lookup(
    admin: Admin, schema: str, query: str, params: dict[str, object], index: str
) -> None:
    """``query`` (``{}`` standing for the schema) reads ``index`` alone, and
    few blocks of it."""
    statement = sql.SQL(query).format(sql.Identifier(schema)).as_string(admin)
    top, *nodes = explain(admin, statement, params)
    used = {n.get("Index Name") for n in [top, *nodes]} - {None}
    assert used == {index}, (query, used)
    assert blocks(top) < 20


def blocked_runs(admin: Admin, schema: str) -> tuple[object, ...]:
    """The last update of the runs whose ids start with ``blocked``, and how
    many of them are blocked."""
    row = admin.execute(
        sql.SQL(
            "SELECT max(updated_at), count(*) FILTER (WHERE blocked_by IS NOT NULL)"
            " FROM {}.runs WHERE id LIKE 'blocked%%'"
        ).format(sql.Identifier(schema))
    ).fetchone()
    assert row is not None
    return row
