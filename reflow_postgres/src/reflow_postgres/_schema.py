"""The database layout and its forward-only migrations (``schema.sql``).

Everything lives in one schema (``reflow`` unless configured). Its
``reflow_schema`` table records which migrations were applied;
``MIGRATIONS[n]`` turns version ``n`` into version ``n + 1``. Released entries
are never edited, only appended to, so every database can be brought forward
from any older version. ``{schema}`` in the statements is replaced by the
quoted schema name (an identifier, never a value).

Design notes (see docs/postgres.md):

* ``runs.wake_at`` is the due time of a claimable run (pending: when it was
  created or handed back; delayed: when its delay passes; sleeping or
  waiting: when it wakes). The claim walks
  the partial index ``runs_due`` in ``wake_at`` order, and a finished run
  leaves that index, so finished history never slows a claim. ``runs_due``
  and ``runs_running`` together hold exactly the unfinished runs, and
  ``queue_stats`` counts them through those two, so it needs no index of its
  own and the write path keeps the indexes it had.
* A delayed run is stored as ``sleeping`` with ``attempts = 0`` (only a
  claimed run sleeps, and a claim counts an attempt, so nothing else looks
  like it), and every read reports it as ``delayed`` (``protocol_status`` in
  ``queries.sql``). It is due at ``wake_at`` exactly like a sleeping run, so
  it sits in ``runs_due`` and the claim, ``next_due`` and ``queue_stats``
  find it unchanged: delayed runs needed no migration, where a new status
  would have meant a new status check and rebuilding ``runs_due``, a scan of
  the whole table that blocks writes.
* ``runs.deadline_at`` (version 4) is when a run must have finished. It is
  unindexed: a delayed, sleeping or waiting run with a deadline is due at
  the earlier of its own wake-up time and its deadline (``wake_at``), so
  ``runs_due``, the claim and ``next_due`` find it unchanged. Added nullable
  with no default, so the migration rewrites nothing.
* ``runs.parent_id``/``parent_step`` (version 5) link a child run to the run
  and step that started it; added nullable with no default, so the
  migration rewrites nothing. ``runs_children`` (partial: child runs only,
  keyed by parent, step and status) lists a parent's children, drives the
  cancel cascade, and answers "is a child of this step still open" by
  reading the open ones only. A child's end locks its parent first
  (``lock_parent``, called in the ending statement's WHERE clause, before
  the child's own row is locked: parents before children, the order the
  cancel cascade locks in too) and then calls ``child_ended``, whose own
  snapshot sees every sibling end committed before that lock, so two
  siblings ending at once cannot both miss being the last.
* ``runs.priority`` and the limit columns (version 6): ``runs_ready`` holds
  the pending runs in claim order (priority, then due time) and ``runs_due``
  the timed ones; blocked runs (``blocked_by`` set) are in neither, only in
  ``runs_blocked``, so a claim never reads them. Claims of runs holding a
  key and the writes that stop such runs take the key's advisory lock
  (``lock_limits``) and read the holders (``runs_holding1``/``2``) or the
  blocked runs after it (``claim_limited``, ``release_limits``).
* The rate columns, ``debounce_key``, ``rate_claims`` and ``rate_waits``
  (version 7): runs holding rates go through the claim's second statement
  (``claim_held``) like runs holding limits; under each rate key's advisory
  lock (a key space of its own) it reads the key's claims
  (``rate_claims_key``), blocks a due run whose rate is full (``blocked_by``
  is the protocol's prefix and the key, so it is in ``runs_blocked`` only)
  and sets the key's wait. Each claim probes ``rate_waits_due`` first and,
  when a wait is due, ``release_rates`` unblocks the runs the window has room
  for. ``runs_debounce`` (unique, open runs with a debounce key only) is the
  arbiter of a debounced create's ``INSERT ... ON CONFLICT DO UPDATE``.
* ``runs.headers`` (version 8): a run's propagation headers as one text
  column (``reflow_core.adapter.headers_column``: a JSON object, or NULL for
  none), written by every statement that inserts a run and replaced by a
  debounced create. Added nullable with no default, so the migration
  rewrites nothing; unindexed, so it costs the write path nothing more.
  ``claim_held`` returns whole ``runs`` rows, whose type is the table's row
  type: it gains the column with the table, and ``claim_limited`` reads
  those rows by column name (``{run_columns_c}``), so no function changes.
* ``runs_key_created`` (version 9): the runs created with an idempotency
  key, by key, then ``created_at`` and ``id``, so ``find_runs_by_key`` reads
  one key's newest entries and stops at its limit (``runs_idempotency``
  leads with the workflow). Partial, and on columns no write changes after
  a run's creation, so only a keyed create pays for it. The other reads of
  the dashboard need no index of their own: ``list_buffered_events`` reads
  a run's entries of ``events_buffered``, and ``finished_history`` a range
  of ``runs_finished`` (``finished_at`` is set when a run ends, in the
  statement that ends it, and cleared by a requeue).
* ``runs_ready`` and ``runs_due`` lead with the workflow (version 10,
  rebuilt under the same names and predicates), and so does
  ``schedules_workflow_due``: the claim, ``next_due`` and an engine's
  ``due_schedules`` read one range per served workflow (``LATERAL`` over
  the workflow names) and stop at their limit, so runs and schedules of
  other workflows are never read, and a workflow's own backlog only up to
  the limit.
* ``runs.version`` and ``runs.fingerprint`` (version 11): the version of
  the workflow definition that enqueued a run and the hash of its shape,
  written by every statement that inserts a run and replaced by a
  debounced create. A constant default and a nullable column, so the
  migration rewrites nothing; unindexed: a claim that serves some versions
  only filters the rows its walks of the queue indexes read
  (``claim_served``), and a claim of every version is unchanged.
* A lease lives in ``lease_expires_at``, which no index covers, and neither
  does ``updated_at``: a heartbeat or a step save that renews the lease is a
  HOT update and writes no index entries. Retention uses ``finished_at``,
  set only when a run ends.
* Event buffers are bounded: ``runs.buffered`` counts a live run's untaken
  events (the cap of ``deliver_event`` is checked against it), and a run's
  end calls ``drop_buffered_events`` only when it is above zero, so ending a
  run that holds no events never touches the events table. ``events_buffered``
  holds untaken events only, so taking and dropping them does not grow with
  the events a run has already taken.
* Text keys use the ``C`` collation: run ids sort bytewise, as on every other
  backend, and compare faster.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from reflow_core.adapter import load_queries, render_sql
from reflow_core.errors import SchemaVersionError, StorageError

from ._connections import BACKEND

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "VERSION_TABLE", "migrate"]

VERSION_TABLE = "reflow_schema"
"""The table, inside the schema, that records the applied version."""

# Loaded once; ``{schema}`` stays a slot, filled for each schema by render_sql.
_TEMPLATES = load_queries(__package__, "schema.sql", {"schema": "{schema}"})
_STEP = re.compile(r"v([1-9][0-9]*)_([0-9]+)_\w+")


def _migrations(templates: dict[str, str]) -> tuple[tuple[str, ...], ...]:
    """The ``v<N>_<step>_<what>`` statements of ``schema.sql``, by version and step."""
    steps: dict[int, list[tuple[int, str]]] = {}
    for name, text in templates.items():
        match = _STEP.fullmatch(name)
        if match is not None:
            steps.setdefault(int(match[1]), []).append((int(match[2]), text))
    if sorted(steps) != list(range(1, len(steps) + 1)):
        raise RuntimeError(f"schema.sql: migrations are not numbered 1..n: {sorted(steps)}")
    return tuple(tuple(text for _, text in sorted(steps[v])) for v in range(1, len(steps) + 1))


MIGRATIONS: Sequence[Sequence[str]] = _migrations(_TEMPLATES)
"""``MIGRATIONS[n]`` upgrades a schema at version ``n`` to ``n + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The version this code writes and expects."""


def _statement(name: str, quoted: str) -> bytes:
    return render_sql(_TEMPLATES[name], {"schema": quoted}, where=f"schema.sql:{name}").encode()


async def _schema_version(
    conn: psycopg.AsyncConnection[Any], schema: str, quoted: str
) -> int | None:
    """The schema's version; ``None`` when it has no Reflow tables yet."""
    params = {"version_table": f"{quoted}.{VERSION_TABLE}", "schema": schema}
    rows = await (await conn.execute(_statement("schema_state", quoted), params)).fetchall()
    table, relations = rows[0]
    if table is None:
        if relations:
            raise StorageError(
                f"schema {schema!r} holds tables that are not Reflow's; "
                "choose another schema (the 'schema' option); nothing was changed",
                operation="initialize",
                backend=BACKEND,
            )
        return None
    found = (await (await conn.execute(_statement("applied_version", quoted))).fetchall())[0][0]
    return int(found or 0)


def _check_not_newer(schema: str, version: int | None) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"schema {schema!r} is at version {version}, newer than this "
            f"reflow-postgres understands ({SCHEMA_VERSION}); upgrade reflow-postgres. "
            "Nothing was changed.",
            operation="initialize",
            backend=BACKEND,
        )


async def migrate(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    """Create ``schema`` or bring it forward to :data:`SCHEMA_VERSION`.

    Migrations run in one transaction under a transaction-scoped advisory
    lock, and a connection that finds the schema current takes no lock at
    all. Refuses, changing nothing, a schema written by newer code
    (:class:`~reflow_core.errors.SchemaVersionError`) and one that holds
    tables that are not Reflow's (:class:`~reflow_core.errors.StorageError`).
    """
    quoted = sql.Identifier(schema).as_string(None)
    version = await _schema_version(conn, schema, quoted)
    _check_not_newer(schema, version)
    if version == SCHEMA_VERSION:
        return
    async with conn.transaction():
        await conn.execute(
            _statement("migration_lock", quoted), {"key": f"reflow:migrate:{schema}"}
        )
        version = await _schema_version(conn, schema, quoted)
        _check_not_newer(schema, version)
        if version is None:
            cur = await conn.execute(_statement("schema_exists", quoted), {"schema": schema})
            if await cur.fetchone() is None:
                await conn.execute(_statement("create_schema", quoted))
            await conn.execute(_statement("create_version_table", quoted))
            version = 0
        for target in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[target]:
                await conn.execute(render_sql(statement, {"schema": quoted}).encode())
            await conn.execute(_statement("record_version", quoted), {"version": target + 1})
