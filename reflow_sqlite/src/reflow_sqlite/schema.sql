-- The database layout and its forward-only migrations (see _schema.py).
--
-- Section "vN" holds the statements that take schema version N - 1 to N,
-- each ended by ";". Released sections are never edited, only new ones
-- added. Timestamps are integer microseconds since the Unix epoch, UTC.

-- name: v1
CREATE TABLE runs (
    id               TEXT    PRIMARY KEY,
    workflow         TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN (
                         'pending', 'running', 'sleeping', 'waiting',
                         'completed', 'failed', 'cancelled')),
    input            TEXT    NOT NULL,
    output           TEXT,
    error            TEXT,
    idempotency_key  TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    reclaims         INTEGER NOT NULL DEFAULT 0,
    lease_epoch      INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    wake_at          INTEGER,
    waiting_for      TEXT,
    lease_expires_at INTEGER,
    UNIQUE (workflow, idempotency_key)
);
-- Claimable by due time: pending (due when created or handed back),
-- sleeping, and waiting with a deadline or a delivered event. Completed
-- runs are not in this index, so claims stay fast as history piles up.
CREATE INDEX runs_due ON runs (wake_at, id)
    WHERE status IN ('pending', 'sleeping', 'waiting');
-- Running runs by lease expiry, to find lapsed leases.
CREATE INDEX runs_lease ON runs (lease_expires_at, id)
    WHERE status = 'running';
CREATE INDEX runs_created ON runs (created_at, id);
CREATE INDEX runs_workflow_created ON runs (workflow, created_at, id);
CREATE TABLE steps (
    run_id       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN (
                     'completed', 'failed', 'skipped', 'sleeping', 'waiting')),
    output       TEXT,
    error        TEXT,
    attempts     INTEGER NOT NULL,
    wake_at      INTEGER,
    completed_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
);
-- Events are kept after they are taken (taken_at is set) so that a
-- redelivery with the same event_id stays a no-op forever.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    payload    TEXT    NOT NULL,
    event_id   TEXT,
    created_at INTEGER NOT NULL,
    taken_at   INTEGER,
    UNIQUE (run_id, event_id)
);
CREATE INDEX events_buffered ON events (run_id, name, id)
    WHERE taken_at IS NULL;
CREATE TABLE schedules (
    key         TEXT    PRIMARY KEY,
    workflow    TEXT    NOT NULL,
    input       TEXT    NOT NULL,
    recurrence  TEXT    NOT NULL,
    next_run_at INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_run_at, key);

-- Version 2: retention and bounded event buffers.
-- name: v2
-- When a run reached a terminal status, set only then (and cleared by a
-- requeue), so retention judges a run by its finish, not its last touch.
ALTER TABLE runs ADD COLUMN finished_at INTEGER;
-- A finished run is not written again, so its last update is its finish.
UPDATE runs SET finished_at = updated_at
    WHERE status IN ('completed', 'failed', 'cancelled');
-- Retention: finished runs by finish time (unfinished runs are not in it).
CREATE INDEX runs_finished ON runs (finished_at, id)
    WHERE finished_at IS NOT NULL;
-- A run that ends drops its buffered events (its event ids are kept for
-- deduplication); runs that ended before this version kept theirs.
DELETE FROM events WHERE taken_at IS NULL AND event_id IS NULL
    AND run_id IN (SELECT id FROM runs WHERE finished_at IS NOT NULL);
UPDATE events SET taken_at = created_at, payload = ''
    WHERE taken_at IS NULL
    AND run_id IN (SELECT id FROM runs WHERE finished_at IS NOT NULL);
-- From now on a run's end does the same in the statement that ends it:
-- every end sets finished_at (a requeue clears it, which fires nothing).
-- A trigger runs inside SQLite, so ending a run costs no extra statement
-- from Python; both statements walk the partial index events_buffered.
-- Their "?" are bound to the ended run's columns (_schema.TRIGGER_VALUES).
CREATE TRIGGER runs_end_drops_buffered_events AFTER UPDATE OF finished_at ON runs
    WHEN NEW.finished_at IS NOT NULL
BEGIN
    {drop_buffered};
    {retire_buffered};
END;

-- Version 3: pausing schedules, the worker registry and queue statistics.
-- name: v3
-- A paused schedule fires no slot until it is resumed; existing ones run.
ALTER TABLE schedules ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
-- The worker registry: one row per worker id, live until expires_at by the
-- storage clock. Lapsed rows are never listed; announcing deletes them.
-- workflows is a JSON array of names (reflow_core.adapter.encode_workflows).
CREATE TABLE workers (
    id           TEXT    PRIMARY KEY,
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    workflows    TEXT    NOT NULL,
    concurrency  INTEGER NOT NULL,
    in_flight    INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
-- Queue statistics: the unfinished runs (finished_at is set exactly when a
-- run ends and cleared by a requeue), so counting them costs the number of
-- unfinished runs, never the history. Keyed on columns no claim, step save,
-- sleep, wait or hand-back writes, so those never touch it: only creating a
-- run adds an entry and ending one removes it.
CREATE INDEX runs_unfinished ON runs (workflow) WHERE finished_at IS NULL;

-- Version 4: delayed runs.
-- name: v4
-- A run created with a delay is 'delayed' until its wake_at, then claimable
-- like a due sleeping run. SQLite cannot change a CHECK constraint in place,
-- so runs is rebuilt as https://sqlite.org/lang_altertable.html#otheralter
-- says: a new table with the new CHECK and every column in the same order,
-- the rows copied, the old table dropped (its indexes and trigger with it)
-- and the new one renamed, then the indexes and the trigger made again as
-- versions 1 to 3 made them, except runs_due, which holds delayed runs too.
-- One transaction, like every migration: other processes wait for it.
CREATE TABLE runs_v4 (
    id               TEXT    PRIMARY KEY,
    workflow         TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN (
                         'delayed', 'pending', 'running', 'sleeping', 'waiting',
                         'completed', 'failed', 'cancelled')),
    input            TEXT    NOT NULL,
    output           TEXT,
    error            TEXT,
    idempotency_key  TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    reclaims         INTEGER NOT NULL DEFAULT 0,
    lease_epoch      INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    wake_at          INTEGER,
    waiting_for      TEXT,
    lease_expires_at INTEGER,
    finished_at      INTEGER,
    UNIQUE (workflow, idempotency_key)
);
INSERT INTO runs_v4 (id, workflow, status, input, output, error, idempotency_key,
    attempts, reclaims, lease_epoch, created_at, updated_at, wake_at, waiting_for,
    lease_expires_at, finished_at)
SELECT id, workflow, status, input, output, error, idempotency_key,
    attempts, reclaims, lease_epoch, created_at, updated_at, wake_at, waiting_for,
    lease_expires_at, finished_at
FROM runs;
DROP TABLE runs;
ALTER TABLE runs_v4 RENAME TO runs;
-- Claimable by due time: pending, delayed, sleeping, and waiting with a
-- deadline or a delivered event (the claim_due query names the same
-- statuses in the same order, which is how SQLite knows it may use it).
CREATE INDEX runs_due ON runs (wake_at, id)
    WHERE status IN ('delayed', 'pending', 'sleeping', 'waiting');
CREATE INDEX runs_lease ON runs (lease_expires_at, id)
    WHERE status = 'running';
CREATE INDEX runs_created ON runs (created_at, id);
CREATE INDEX runs_workflow_created ON runs (workflow, created_at, id);
CREATE INDEX runs_finished ON runs (finished_at, id)
    WHERE finished_at IS NOT NULL;
CREATE INDEX runs_unfinished ON runs (workflow) WHERE finished_at IS NULL;
CREATE TRIGGER runs_end_drops_buffered_events AFTER UPDATE OF finished_at ON runs
    WHEN NEW.finished_at IS NOT NULL
BEGIN
    {drop_buffered};
    {retire_buffered};
END;

-- Version 5: run deadlines.
-- name: v5
-- When the run must have finished (NewRun.deadline after its creation, by the
-- storage clock), NULL for none; a requeue clears it. A delayed, sleeping or
-- waiting run's wake_at is the earlier of its own and this, so the claims
-- (runs_due) find it at its deadline and the engine fails it. Adding a
-- nullable column with no default only rewrites the schema, not the rows:
-- existing runs have no deadline.
ALTER TABLE runs ADD COLUMN deadline_at INTEGER;

-- Version 6: child runs.
-- name: v6
-- A run started by another run's step (Storage.start_child) names its parent
-- and that step; NULL for every other run. Added in place like deadline_at:
-- existing runs have no parent.
ALTER TABLE runs ADD COLUMN parent_id TEXT;
ALTER TABLE runs ADD COLUMN parent_step TEXT;
-- A parent's children: by step and whether they have ended (finished_at is
-- set exactly when a run ends), so the end of a child finds in one seek
-- whether another child at its step is still unfinished, and a cancel walks
-- the runs below it. Partial: runs without a parent have no entry in it,
-- so creating, ending and requeueing them adds or moves none (SQLite only
-- tests "parent_id IS NOT NULL" on their row), and claims, step saves,
-- sleeps and waits write none of its columns.
CREATE INDEX runs_children ON runs (parent_id, parent_step, finished_at)
    WHERE parent_id IS NOT NULL;

-- Version 7: priorities and concurrency limits.
-- name: v7
-- A run's priority (NewRun.priority), its at most two concurrency limits
-- (NewRun.limits, reflow_core.adapter.limit_columns) and, for a claimable
-- run a claim passed over because a limit was full, that limit's key.
-- Added in place like deadline_at (a constant default does not rewrite the
-- rows): existing runs have priority 0, no limits and are not blocked.
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN limit_key1 TEXT;
ALTER TABLE runs ADD COLUMN limit_max1 INTEGER;
ALTER TABLE runs ADD COLUMN limit_key2 TEXT;
ALTER TABLE runs ADD COLUMN limit_max2 INTEGER;
ALTER TABLE runs ADD COLUMN blocked_by TEXT;
-- Claims take due runs by priority, then due time. Pending runs are always
-- due, so they get an index in claim order of their own (runs_pending): a
-- claim walks it from the top and stops at its limit, however long the
-- backlog. Delayed, sleeping and waiting runs stay in runs_due by due time,
-- so a claim reads only those already due (never the ones sleeping into the
-- future) and sorts just them by priority. Blocked runs are in neither
-- index (the claim queries name the same WHERE, word for word), so no
-- claim reads them: they wait in runs_blocked, by key in claim order, until
-- the write that stops a run holding the key unblocks the first of them.
DROP INDEX runs_due;
CREATE INDEX runs_pending ON runs (priority DESC, wake_at, id)
    WHERE status = 'pending' AND blocked_by IS NULL;
CREATE INDEX runs_due ON runs (wake_at, id)
    WHERE status IN ('delayed', 'sleeping', 'waiting') AND blocked_by IS NULL;
CREATE INDEX runs_blocked ON runs (blocked_by, priority DESC, wake_at, id)
    WHERE blocked_by IS NOT NULL;
-- The running runs holding each limit key, by the column it is kept in: a
-- claim counts a key's holders with two index-only seeks (status is in the
-- index so the count reads no row). Runs without limits are in neither
-- (SQLite only tests the WHERE on their row).
CREATE INDEX runs_holding1 ON runs (limit_key1, status)
    WHERE status = 'running' AND limit_key1 IS NOT NULL;
CREATE INDEX runs_holding2 ON runs (limit_key2, status)
    WHERE status = 'running' AND limit_key2 IS NOT NULL;

-- Version 8: rate limits and debounce.
-- name: v8
-- A run's at most two rate limits (NewRun.rates,
-- reflow_core.adapter.rate_columns: key, max and period in microseconds)
-- and its debounce key (NewRun.debounce_key). Added in place like
-- deadline_at (nullable, no default: no row is rewritten): existing runs
-- have no rates and no debounce key. A run a claim passed over because a
-- rate was full is blocked like one passed over for a concurrency limit
-- (blocked_by is "reflow:rate:" and the key), so it leaves runs_pending and
-- runs_due for runs_blocked, and no claim reads it until it is released.
ALTER TABLE runs ADD COLUMN rate_key1 TEXT;
ALTER TABLE runs ADD COLUMN rate_max1 INTEGER;
ALTER TABLE runs ADD COLUMN rate_period1 INTEGER;
ALTER TABLE runs ADD COLUMN rate_key2 TEXT;
ALTER TABLE runs ADD COLUMN rate_max2 INTEGER;
ALTER TABLE runs ADD COLUMN rate_period2 INTEGER;
ALTER TABLE runs ADD COLUMN debounce_key TEXT;
-- The claims of runs holding each rate key, by time: a claim counts a key's
-- window with one index-only range scan, and deletes the key's claims older
-- than its period as it records its own, so the table holds at most a
-- window's worth of claims per key.
CREATE TABLE rate_claims (
    key TEXT    NOT NULL,
    at  INTEGER NOT NULL
);
CREATE INDEX rate_claims_key ON rate_claims (key, at);
-- For each rate key with blocked runs: when its window has room again. A
-- claim looks for the waits that are due (one probe of rate_waits_at, empty
-- when no rate key waits) and releases their keys' first blocked runs.
-- WITHOUT ROWID: the key is the table's own order, so rate_waits_at holds
-- (at, key) and the probe reads no row.
CREATE TABLE rate_waits (
    key TEXT    PRIMARY KEY,
    at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX rate_waits_at ON rate_waits (at);
-- At most one open run (pending or delayed, never claimed) per workflow and
-- debounce key: a debounced create finds it with one seek and updates it.
-- Runs without a debounce key are not in it.
CREATE UNIQUE INDEX runs_debounce ON runs (workflow, debounce_key)
    WHERE debounce_key IS NOT NULL AND attempts = 0 AND status IN ('pending', 'delayed');

-- Version 9: propagation headers.
-- name: v9
-- A run's propagation headers (NewRun.headers) as one JSON object with
-- sorted names (reflow_core.adapter.headers_column), NULL for none; a
-- debounced create replaces them. Added in place like deadline_at
-- (nullable, no default: no row is rewritten): existing runs have none.
ALTER TABLE runs ADD COLUMN headers TEXT;

-- Version 10: the reads of a dashboard.
-- name: v10
-- The runs created with each idempotency key, of every workflow, newest
-- first: find_runs_by_key seeks the key and reads its runs in order, as
-- many as it asks for (the UNIQUE (workflow, idempotency_key) index cannot
-- be sought by the key alone). Partial: runs without a key are not in it.
-- Keyed on columns nothing writes after the create (a debounced run has no
-- key), so only creating and deleting a run touches it. The other reads
-- need no index of their own: a run's buffered events are found through
-- events_buffered, and the runs that finished in a span of minutes through
-- runs_finished.
CREATE INDEX runs_key ON runs (idempotency_key, created_at, id)
    WHERE idempotency_key IS NOT NULL;

-- Version 11: claims per workflow.
-- name: v11
-- The claim indexes lead with the workflow, so a claim seeks each workflow
-- it serves and reads only the head of that workflow's queue: pending runs
-- of workflows it does not serve are never read, however many and however
-- old, and a deep backlog of its own is read only as far as the claim
-- takes. runs_pending and runs_due keep their WHERE of version 7 word for
-- word (the claim queries name it too), so blocked runs stay out of both.
-- Lapsed leases likewise, by workflow: a workflow nobody serves any more
-- keeps its lapsed leases out of every claim. Nothing but the index
-- entries changes: a claim, hand-back, sleep or wait writes the same
-- entries as before, one column wider.
DROP INDEX runs_pending;
CREATE INDEX runs_pending ON runs (workflow, priority DESC, wake_at, id)
    WHERE status = 'pending' AND blocked_by IS NULL;
DROP INDEX runs_due;
CREATE INDEX runs_due ON runs (workflow, wake_at, id)
    WHERE status IN ('delayed', 'sleeping', 'waiting') AND blocked_by IS NULL;
DROP INDEX runs_lease;
CREATE INDEX runs_lease ON runs (workflow, lease_expires_at, id)
    WHERE status = 'running';
-- The due schedules of each workflow, earliest first: an engine reads those
-- of the workflows it serves (due_schedules_of) with a seek per workflow,
-- never the schedules of others. Paused schedules are never due, so they
-- are not in it.
CREATE INDEX schedules_workflow_due ON schedules (workflow, next_run_at, key)
    WHERE paused = 0;

-- Version 12: workflow versions.
-- name: v12
-- The version of the workflow definition that enqueued a run
-- (NewRun.version, 1 to 2**31 - 1) and the hash of that definition's shape
-- (NewRun.fingerprint, NULL for none); a debounced create replaces both. A
-- claim may take only the versions a worker serves: it adds "version IN
-- (...)" to its reads of runs_pending, runs_due and runs_lease, a filter on
-- the rows those indexes lead it to, so no index changes. Added in place
-- like priority (a constant default does not rewrite the rows): existing
-- runs are version 1 with no fingerprint.
ALTER TABLE runs ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN fingerprint TEXT;

-- -- what the trigger of versions 2 and 4 runs --------------------------------

-- A run that ends drops its buffered events: those without an id go, those
-- with one stay as taken with no payload (retire_buffered), so a
-- redelivery of the id stays a no-op for as long as the run exists. Both
-- walk the partial index events_buffered, which holds buffered events only
-- (the unary "+" keeps the planner off the (run_id, event_id) index, which
-- also holds taken events). Parameters: the run id.
-- name: drop_buffered
DELETE FROM events WHERE run_id = ? AND taken_at IS NULL AND +event_id IS NULL

-- Parameters: the time, the run id.
-- name: retire_buffered
UPDATE events SET taken_at = ?, payload = '' WHERE run_id = ? AND taken_at IS NULL
