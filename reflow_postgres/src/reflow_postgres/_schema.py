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

# Version 2: bounded event buffers.
_V2: Sequence[str] = (
    # A run that ends drops its buffered events (events with an id stay, as
    # taken and without a payload, for deduplication); runs that ended before
    # this version kept theirs.
    """
    DELETE FROM {schema}.events AS e USING {schema}.runs AS r
        WHERE e.run_id = r.id AND r.finished_at IS NOT NULL
        AND e.taken_at IS NULL AND e.event_id IS NULL
    """,
    """
    UPDATE {schema}.events AS e SET taken_at = r.finished_at, payload = ''
        FROM {schema}.runs AS r
        WHERE e.run_id = r.id AND r.finished_at IS NOT NULL AND e.taken_at IS NULL
    """,
    # How many untaken events a live run holds: deliver_event checks its cap
    # against it and adds one, take_event takes one off, and a run's end
    # calls drop_buffered_events only when it is above zero. Unindexed, so
    # keeping it is a HOT update of a row those operations lock anyway. Only
    # kept while the run lives: requeue_run sets it to zero.
    "ALTER TABLE {schema}.runs ADD COLUMN buffered integer NOT NULL DEFAULT 0",
    """
    UPDATE {schema}.runs AS r SET buffered = b.n
        FROM (SELECT run_id, count(*) AS n FROM {schema}.events
              WHERE taken_at IS NULL GROUP BY run_id) AS b
        WHERE r.id = b.run_id
    """,
    # Untaken events only: taking the oldest of a name and dropping a run's
    # buffer stay proportional to what is buffered, however many events the
    # run has taken before.
    """
    CREATE INDEX events_buffered ON {schema}.events (run_id, name, id)
        WHERE taken_at IS NULL
    """,
    # Called by the statement that ends a run holding buffered events (see
    # _sql.py), in its transaction. Its queries take a snapshot of their own,
    # so they see an event whose delivery committed while that statement
    # waited for the run's row. Returns how many events it dropped.
    """
    CREATE FUNCTION {schema}.drop_buffered_events(run text, at timestamptz)
        RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        dropped integer;
        kept integer;
    BEGIN
        DELETE FROM {schema}.events
            WHERE run_id = run AND taken_at IS NULL AND event_id IS NULL;
        GET DIAGNOSTICS dropped = ROW_COUNT;
        UPDATE {schema}.events SET taken_at = at, payload = ''
            WHERE run_id = run AND taken_at IS NULL;
        GET DIAGNOSTICS kept = ROW_COUNT;
        RETURN dropped + kept;
    END
    $$
    """,
)

MIGRATIONS: Sequence[Sequence[str]] = (_V1, _V2)
"""``MIGRATIONS[n]`` upgrades a schema at version ``n`` to ``n + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The version this code writes and expects."""
