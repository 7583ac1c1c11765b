"""The database layout and its forward-only migrations.

Everything lives in one schema (``reflow`` unless configured). Its
``reflow_schema`` table records which migrations were applied;
``MIGRATIONS[n]`` turns version ``n`` into version ``n + 1``. Released entries
are never edited, only appended to, so every database can be brought forward
from any older version. ``{schema}`` in the statements is replaced by the
quoted schema name (an identifier, never a value).

Design notes (see docs/postgres.md):

* ``runs.wake_at`` is the due time of a claimable run (pending: when it was
  created or handed back; sleeping or waiting: when it wakes). The claim walks
  the partial index ``runs_due`` in ``wake_at`` order, and a finished run
  leaves that index, so finished history never slows a claim.
* A lease lives in ``lease_expires_at``, which no index covers, and neither
  does ``updated_at``: a heartbeat or a step save that renews the lease is a
  HOT update and writes no index entries. Retention uses ``finished_at``,
  set only when a run ends.
* Text keys use the ``C`` collation: run ids sort bytewise, as on every other
  backend, and compare faster.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "VERSION_TABLE"]

VERSION_TABLE = "reflow_schema"
"""The table, inside the schema, that records the applied version."""

_V1: Sequence[str] = (
    """
    CREATE TABLE {schema}.runs (
        id               text COLLATE "C" PRIMARY KEY,
        workflow         text COLLATE "C" NOT NULL,
        status           text NOT NULL CHECK (status IN (
                             'pending', 'running', 'sleeping', 'waiting',
                             'completed', 'failed', 'cancelled')),
        input            text NOT NULL,
        output           text,
        error            text,
        idempotency_key  text COLLATE "C",
        attempts         integer NOT NULL DEFAULT 0,
        reclaims         integer NOT NULL DEFAULT 0,
        lease_epoch      bigint NOT NULL DEFAULT 0,
        created_at       timestamptz NOT NULL,
        updated_at       timestamptz NOT NULL,
        wake_at          timestamptz,
        waiting_for      text COLLATE "C",
        lease_expires_at timestamptz,
        finished_at      timestamptz
    ) WITH (fillfactor = 80)
    """,
    # At most one run per (workflow, idempotency key).
    """
    CREATE UNIQUE INDEX runs_idempotency ON {schema}.runs (workflow, idempotency_key)
        WHERE idempotency_key IS NOT NULL
    """,
    # Claimable by due time. Runs leave it when claimed or finished.
    """
    CREATE INDEX runs_due ON {schema}.runs (wake_at)
        WHERE status IN ('pending', 'sleeping', 'waiting')
    """,
    # Running runs, for the lapsed-lease scan (only as many as are in flight).
    "CREATE INDEX runs_running ON {schema}.runs (workflow) WHERE status = 'running'",
    # Listing, newest first, keyset on (created_at, id), with or without a workflow.
    "CREATE INDEX runs_created ON {schema}.runs (created_at, id)",
    "CREATE INDEX runs_workflow_created ON {schema}.runs (workflow, created_at, id)",
    # Retention: finished runs by when they finished. Its own column, set
    # only when a run ends, so renewals (which touch updated_at and
    # lease_expires_at, both unindexed) stay HOT updates.
    """
    CREATE INDEX runs_finished ON {schema}.runs (finished_at)
        WHERE finished_at IS NOT NULL
    """,
    """
    CREATE TABLE {schema}.steps (
        run_id       text COLLATE "C" NOT NULL,
        name         text COLLATE "C" NOT NULL,
        seq          bigint GENERATED ALWAYS AS IDENTITY,
        status       text NOT NULL CHECK (status IN (
                         'completed', 'failed', 'skipped', 'sleeping', 'waiting')),
        output       text,
        error        text,
        attempts     integer NOT NULL DEFAULT 1,
        wake_at      timestamptz,
        completed_at timestamptz NOT NULL,
        PRIMARY KEY (run_id, name)
    )
    """,
    """
    CREATE TABLE {schema}.events (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id     text COLLATE "C" NOT NULL,
        name       text COLLATE "C" NOT NULL,
        payload    text NOT NULL,
        event_id   text COLLATE "C",
        created_at timestamptz NOT NULL,
        taken_at   timestamptz
    )
    """,
    # Delivery dedupe for as long as the run exists, taken or not.
    """
    CREATE UNIQUE INDEX events_dedupe ON {schema}.events (run_id, event_id)
        WHERE event_id IS NOT NULL
    """,
    # The oldest buffered event of a name, and cleanup of a run's events.
    "CREATE INDEX events_run ON {schema}.events (run_id, name, id)",
    """
    CREATE TABLE {schema}.schedules (
        key         text COLLATE "C" PRIMARY KEY,
        workflow    text COLLATE "C" NOT NULL,
        input       text NOT NULL,
        recurrence  text NOT NULL,
        next_run_at timestamptz NOT NULL,
        created_at  timestamptz NOT NULL,
        updated_at  timestamptz NOT NULL
    )
    """,
    "CREATE INDEX schedules_due ON {schema}.schedules (next_run_at, key)",
)

MIGRATIONS: Sequence[Sequence[str]] = (_V1,)
"""``MIGRATIONS[n]`` upgrades a schema at version ``n`` to ``n + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The version this code writes and expects."""
