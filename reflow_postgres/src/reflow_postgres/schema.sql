-- The database layout, its forward-only migrations, and the statements that
-- apply them (see _schema.py). {schema} is the schema, quoted by psycopg as
-- an identifier.
--
-- A section named v<N>_<step>_<what> is one statement of the migration from
-- version N - 1 to version N; a migration runs its statements in <step>
-- order. Released migrations are never edited, only appended to, so every
-- database can be brought forward from any older version.
--
-- runs.status holds the protocol's statuses except 'delayed': a delayed run
-- is stored as 'sleeping' before its first attempt (attempts = 0), due at
-- wake_at, in runs_due; queries.sql (protocol_status) reports it as delayed.


-- Applying migrations ------------------------------------------------------------

-- name: schema_state
-- The version table if it exists, and how many tables and views the schema holds.
SELECT to_regclass(%(version_table)s), (SELECT count(*) FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'v', 'm'))

-- name: applied_version
SELECT max(version) FROM {schema}.reflow_schema

-- name: migration_lock
SELECT pg_advisory_xact_lock(hashtext(%(key)s))

-- name: schema_exists
SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %(schema)s

-- name: create_schema
-- Needs CREATE on the database, so it runs only when the schema is missing.
CREATE SCHEMA {schema}

-- name: create_version_table
CREATE TABLE {schema}.reflow_schema (version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now())

-- name: record_version
INSERT INTO {schema}.reflow_schema (version) VALUES (%(version)s)


-- Version 1 ------------------------------------------------------------------------

-- name: v1_01_runs
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

-- name: v1_02_runs_idempotency
-- At most one run per (workflow, idempotency key).
CREATE UNIQUE INDEX runs_idempotency ON {schema}.runs (workflow, idempotency_key)
    WHERE idempotency_key IS NOT NULL

-- name: v1_03_runs_due
-- Claimable by due time. Runs leave it when claimed or finished.
CREATE INDEX runs_due ON {schema}.runs (wake_at)
    WHERE status IN ('pending', 'sleeping', 'waiting')

-- name: v1_04_runs_running
-- Running runs, for the lapsed-lease scan (only as many as are in flight).
CREATE INDEX runs_running ON {schema}.runs (workflow) WHERE status = 'running'

-- name: v1_05_runs_created
-- Listing, newest first, keyset on (created_at, id), with or without a workflow.
CREATE INDEX runs_created ON {schema}.runs (created_at, id)

-- name: v1_06_runs_workflow_created
CREATE INDEX runs_workflow_created ON {schema}.runs (workflow, created_at, id)

-- name: v1_07_runs_finished
-- Retention: finished runs by when they finished. Its own column, set only
-- when a run ends, so renewals (which touch updated_at and lease_expires_at,
-- both unindexed) stay HOT updates.
CREATE INDEX runs_finished ON {schema}.runs (finished_at)
    WHERE finished_at IS NOT NULL

-- name: v1_08_steps
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

-- name: v1_09_events
CREATE TABLE {schema}.events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id     text COLLATE "C" NOT NULL,
    name       text COLLATE "C" NOT NULL,
    payload    text NOT NULL,
    event_id   text COLLATE "C",
    created_at timestamptz NOT NULL,
    taken_at   timestamptz
)

-- name: v1_10_events_dedupe
-- Delivery dedupe for as long as the run exists, taken or not.
CREATE UNIQUE INDEX events_dedupe ON {schema}.events (run_id, event_id)
    WHERE event_id IS NOT NULL

-- name: v1_11_events_run
-- The oldest buffered event of a name, and cleanup of a run's events.
CREATE INDEX events_run ON {schema}.events (run_id, name, id)

-- name: v1_12_schedules
CREATE TABLE {schema}.schedules (
    key         text COLLATE "C" PRIMARY KEY,
    workflow    text COLLATE "C" NOT NULL,
    input       text NOT NULL,
    recurrence  text NOT NULL,
    next_run_at timestamptz NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
)

-- name: v1_13_schedules_due
CREATE INDEX schedules_due ON {schema}.schedules (next_run_at, key)


-- Version 2: bounded event buffers ---------------------------------------------------

-- name: v2_01_drop_finished_buffers
-- A run that ends drops its buffered events (events with an id stay, as taken
-- and without a payload, for deduplication); runs that ended before this
-- version kept theirs.
DELETE FROM {schema}.events AS e USING {schema}.runs AS r
    WHERE e.run_id = r.id AND r.finished_at IS NOT NULL
    AND e.taken_at IS NULL AND e.event_id IS NULL

-- name: v2_02_keep_finished_event_ids
UPDATE {schema}.events AS e SET taken_at = r.finished_at, payload = ''
    FROM {schema}.runs AS r
    WHERE e.run_id = r.id AND r.finished_at IS NOT NULL AND e.taken_at IS NULL

-- name: v2_03_runs_buffered
-- How many untaken events a live run holds: deliver_event checks its cap
-- against it and adds one, take_event takes one off, and a run's end calls
-- drop_buffered_events only when it is above zero. Unindexed, so keeping it
-- is a HOT update of a row those operations lock anyway. Only kept while the
-- run lives: requeue_run sets it to zero.
ALTER TABLE {schema}.runs ADD COLUMN buffered integer NOT NULL DEFAULT 0

-- name: v2_04_count_buffered
UPDATE {schema}.runs AS r SET buffered = b.n
    FROM (SELECT run_id, count(*) AS n FROM {schema}.events
          WHERE taken_at IS NULL GROUP BY run_id) AS b
    WHERE r.id = b.run_id

-- name: v2_05_events_buffered
-- Untaken events only: taking the oldest of a name and dropping a run's
-- buffer stay proportional to what is buffered, however many events the run
-- has taken before.
CREATE INDEX events_buffered ON {schema}.events (run_id, name, id)
    WHERE taken_at IS NULL

-- name: v2_06_drop_buffered_events
-- Called by the statement that ends a run holding buffered events (see
-- queries.sql), in its transaction. Its queries take a snapshot of their
-- own, so they see an event whose delivery committed while that statement
-- waited for the run's row. Returns how many events it dropped.
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


-- Version 3: paused schedules, the worker registry ----------------------------------
-- queue_stats needs no index of its own: runs_due and runs_running together
-- hold exactly the unfinished runs, and its statement reads each through its
-- index (see queries.sql), so the write path keeps the indexes it had.

-- name: v3_01_schedules_paused
-- A constant default: PostgreSQL 11 and newer add the column without
-- rewriting the table; every schedule that exists is not paused.
ALTER TABLE {schema}.schedules ADD COLUMN paused boolean NOT NULL DEFAULT false

-- name: v3_02_drop_schedules_due
DROP INDEX {schema}.schedules_due

-- name: v3_03_schedules_due
-- Due schedules that are not paused: a paused schedule whose slot has passed
-- is not read again by every poll.
CREATE INDEX schedules_due ON {schema}.schedules (next_run_at, key) WHERE NOT paused

-- name: v3_04_workers
-- The worker registry: an entry lapses at expires_at (by the storage clock)
-- unless announced again. workflows is reflow_core.adapter.encode_workflows
-- text (a JSON array).
CREATE TABLE {schema}.workers (
    id           text COLLATE "C" PRIMARY KEY,
    host         text NOT NULL,
    pid          bigint NOT NULL,
    workflows    text NOT NULL,
    concurrency  bigint NOT NULL,
    in_flight    bigint NOT NULL,
    started_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
)

-- name: v3_05_workers_expires
-- Lapsed entries, which announce_worker deletes, and the live ones listed.
CREATE INDEX workers_expires ON {schema}.workers (expires_at)


-- Version 4: run deadlines -----------------------------------------------------------

-- name: v4_01_runs_deadline
-- When the run must have finished (NULL: no deadline). Nullable without a
-- default: PostgreSQL 11 and newer add it without rewriting the table, and
-- every run that exists has no deadline. Unindexed: a delayed, sleeping or
-- waiting run with a deadline is due at the earlier of its own wake-up time
-- and its deadline (runs.wake_at), so runs_due and the claim find it
-- unchanged.
ALTER TABLE {schema}.runs ADD COLUMN deadline_at timestamptz


-- Version 5: child runs ----------------------------------------------------------------

-- name: v5_01_runs_parent
-- A child run's parent and the parent's step that started it (both NULL for
-- a run that is not a child). Nullable without a default: added without
-- rewriting the table, and every run that exists is no child. Never changed
-- once a run is created, and a purged parent's children keep them.
ALTER TABLE {schema}.runs ADD COLUMN parent_id text COLLATE "C",
    ADD COLUMN parent_step text COLLATE "C"

-- name: v5_02_runs_children
-- A parent's children: listed, cancelled with it, and, by step and status,
-- whether one at a step is still open (the check every child's end makes,
-- which thus reads the open children of that step only, however many have
-- ended). Runs that are no child are not in it, so their writes never touch
-- it; status changes of a child are not HOT updates anyway (status is in the
-- predicate of runs_due).
CREATE INDEX runs_children ON {schema}.runs (parent_id, parent_step, status)
    WHERE parent_id IS NOT NULL

-- name: v5_03_lock_parent
-- Called in the WHERE clause of a statement that ends a child run, before
-- that statement locks the child's row: the parent's row is locked first
-- (parents before children, the order of the cancel cascade too, so the two
-- never deadlock), which serializes the ends of a parent's children with
-- each other and with the parent's wait_children. Always true (a purged
-- parent is simply not there).
CREATE FUNCTION {schema}.lock_parent(parent text)
    RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM 1 FROM {schema}.runs WHERE id = parent FOR NO KEY UPDATE;
    RETURN true;
END
$$

-- name: v5_04_child_ended
-- Called by the statement that ended child run child of parent (whose row
-- lock_parent took first), in its transaction: wakes the parent (due at
-- at) if it waits for its children at that step (waiting_for, the
-- protocol's prefix and the step) and no other child of that step is still
-- open. Its queries take a snapshot of their own, taken after the parent's
-- lock was granted, so they see every child end committed before. Sends a
-- notification on channel (NULL: none) when it wakes the parent. Returns 1
-- when it woke the parent, else 0.
CREATE FUNCTION {schema}.child_ended(parent text, waiting text, step text, child text,
    at timestamptz, channel text)
    RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    flow text;
BEGIN
    UPDATE {schema}.runs AS p SET wake_at = at, updated_at = at
        WHERE p.id = parent AND p.status = 'waiting' AND p.waiting_for = waiting
        AND NOT EXISTS (SELECT 1 FROM {schema}.runs AS c
            WHERE c.parent_id = parent AND c.parent_step = step AND c.id <> child
            AND c.status IN ('pending', 'running', 'sleeping', 'waiting'))
        RETURNING p.workflow INTO flow;
    IF flow IS NULL THEN
        RETURN 0;
    END IF;
    IF channel IS NOT NULL THEN
        PERFORM pg_notify(channel,
            '0|' || CASE WHEN octet_length(flow) <= 4000 THEN flow ELSE '' END);
    END IF;
    RETURN 1;
END
$$


-- Version 6: run priorities and concurrency limits -----------------------------------

-- name: v6_01_runs_flow_control
-- A run's priority (a constant default: PostgreSQL 11 and newer add it
-- without rewriting the table, and every run that exists has priority 0),
-- the concurrency limits it holds while it runs (at most two, each a key and
-- a max; never changed once the run is created) and, for a due run a claim
-- passed over because a limit was full, that limit's key. All nullable
-- without a default but priority: the table is not rewritten.
ALTER TABLE {schema}.runs ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN limit_key1 text COLLATE "C", ADD COLUMN limit_max1 integer,
    ADD COLUMN limit_key2 text COLLATE "C", ADD COLUMN limit_max2 integer,
    ADD COLUMN blocked_by text COLLATE "C"

-- name: v6_02_drop_runs_due
DROP INDEX {schema}.runs_due

-- name: v6_03_runs_due
-- Timed runs (delayed, stored as sleeping, sleeping and waiting) by due
-- time, blocked ones left out. Pending runs moved to runs_ready.
CREATE INDEX runs_due ON {schema}.runs (wake_at)
    WHERE status IN ('sleeping', 'waiting') AND blocked_by IS NULL

-- name: v6_04_runs_ready
-- Pending runs in the order a claim takes them: priority, highest first,
-- then due time. Blocked ones left out, so a claim never reads them.
CREATE INDEX runs_ready ON {schema}.runs (priority DESC, wake_at)
    WHERE status = 'pending' AND blocked_by IS NULL

-- name: v6_05_runs_blocked
-- Blocked runs by key, in the order a claim would take them: the one a
-- stopping holder of the key unblocks is the first entry of its key.
CREATE INDEX runs_blocked ON {schema}.runs (blocked_by, priority DESC, wake_at, id)
    WHERE blocked_by IS NOT NULL

-- name: v6_06_runs_holding1
-- The running holders of a key (by either of their two limits): counting
-- them is two index lookups. Runs without limits are in neither.
CREATE INDEX runs_holding1 ON {schema}.runs (limit_key1)
    WHERE status = 'running' AND limit_key1 IS NOT NULL

-- name: v6_07_runs_holding2
CREATE INDEX runs_holding2 ON {schema}.runs (limit_key2)
    WHERE status = 'running' AND limit_key2 IS NOT NULL

-- name: v6_08_lock_limits
-- Takes the transaction-scoped advisory lock of each key (NULLs skipped), in
-- the order of the locks themselves, so that two transactions taking locks
-- of several keys never wait for each other in a cycle. Every claim of a
-- run holding a key, and every write that stops one, takes it: they are
-- serialized per key, and each reads the holders after its lock is granted.
CREATE FUNCTION {schema}.lock_limits(keys text[])
    RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    h bigint;
BEGIN
    FOR h IN SELECT DISTINCT hashtextextended(k, 0) FROM unnest(keys) AS k
        WHERE k IS NOT NULL ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(h);
    END LOOP;
END
$$

-- name: v6_09_release_limits
-- Called, in its transaction, by the write that stopped running runs
-- holding keys (one entry per key a stopped run held, so a key held by two
-- stopped runs is twice in it): under the keys' locks, makes claimable the
-- first blocked run of each entry (priority, due time, id: what a claim
-- would take first), and wakes its workflow's workers on channel (NULL:
-- none). Its queries take snapshots of their own, after the locks are
-- granted, so they see every run a claim blocked before. Returns how many
-- runs it unblocked.
CREATE FUNCTION {schema}.release_limits(keys text[], at timestamptz, channel text)
    RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    k text;
    target text;
    flow text;
    freed integer := 0;
BEGIN
    PERFORM {schema}.lock_limits(keys);
    FOREACH k IN ARRAY keys LOOP
        CONTINUE WHEN k IS NULL;
        LOOP
            SELECT id INTO target FROM {schema}.runs WHERE blocked_by = k
                ORDER BY priority DESC, wake_at, id LIMIT 1;
            EXIT WHEN target IS NULL;
            -- Waits for a writer of that run; if it changed meanwhile (a
            -- cancel), the next one is looked for.
            UPDATE {schema}.runs SET blocked_by = NULL, updated_at = at
                WHERE id = target AND blocked_by = k RETURNING workflow INTO flow;
            IF flow IS NOT NULL THEN
                freed := freed + 1;
                IF channel IS NOT NULL THEN
                    PERFORM pg_notify(channel,
                        '0|' || CASE WHEN octet_length(flow) <= 4000 THEN flow ELSE '' END);
                END IF;
                EXIT;
            END IF;
        END LOOP;
        target := NULL;
        flow := NULL;
    END LOOP;
    RETURN freed;
END
$$

-- name: v6_10_claim_limited
-- The second half of a claim, for the due runs ids (in claim order) that
-- hold limits: under the locks of all their keys (taken at once, in order),
-- each, if still claimable and not taken by another claim meanwhile, is
-- claimed (at most budget of them) if every one of its keys has fewer than
-- its max running holders (counted after the locks are granted, so claims
-- made earlier in this call and committed by others count), else blocked
-- by the first full key. Returns the claimed runs as they now are.
CREATE FUNCTION {schema}.claim_limited(ids text[], lease interval, at timestamptz,
    budget integer)
    RETURNS SETOF {schema}.runs LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    candidate text;
    rec {schema}.runs%ROWTYPE;
    over text;
    taken integer := 0;
BEGIN
    PERFORM {schema}.lock_limits(array_agg(k)) FROM {schema}.runs AS r,
        LATERAL (VALUES (r.limit_key1), (r.limit_key2)) AS v(k)
        WHERE r.id = ANY(ids) AND k IS NOT NULL;
    FOREACH candidate IN ARRAY ids LOOP
        EXIT WHEN taken >= budget;
        SELECT * INTO rec FROM {schema}.runs WHERE id = candidate AND blocked_by IS NULL
            AND status IN ('pending', 'sleeping', 'waiting') AND wake_at <= at
            FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        over := NULL;
        IF rec.limit_key1 IS NOT NULL AND rec.limit_max1 <= (
                (SELECT count(*) FROM {schema}.runs WHERE status = 'running'
                    AND limit_key1 = rec.limit_key1)
                + (SELECT count(*) FROM {schema}.runs WHERE status = 'running'
                    AND limit_key2 = rec.limit_key1)) THEN
            over := rec.limit_key1;
        ELSIF rec.limit_key2 IS NOT NULL AND rec.limit_max2 <= (
                (SELECT count(*) FROM {schema}.runs WHERE status = 'running'
                    AND limit_key1 = rec.limit_key2)
                + (SELECT count(*) FROM {schema}.runs WHERE status = 'running'
                    AND limit_key2 = rec.limit_key2)) THEN
            over := rec.limit_key2;
        END IF;
        IF over IS NULL THEN
            UPDATE {schema}.runs SET status = 'running', lease_epoch = lease_epoch + 1,
                attempts = attempts + 1, lease_expires_at = at + lease, wake_at = NULL,
                updated_at = at
                WHERE id = candidate RETURNING * INTO rec;
            taken := taken + 1;
            RETURN NEXT rec;
        ELSE
            UPDATE {schema}.runs SET blocked_by = over, updated_at = at WHERE id = candidate;
        END IF;
    END LOOP;
END
$$

-- name: v6_11_pass_turn
-- A run that was free to be claimed (neither running nor blocked: one let
-- go by a slot, say) ended without running: under the locks of its keys,
-- each of them that has room (fewer running holders than its max, lapsed
-- leases counted) lets its first blocked run go, as release_limits does, so
-- a freed slot is never lost with it.
CREATE FUNCTION {schema}.pass_turn(keys text[], maxes integer[], at timestamptz, channel text)
    RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i integer;
    held integer;
    room text[] := '{}';
BEGIN
    PERFORM {schema}.lock_limits(keys);
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        CONTINUE WHEN keys[i] IS NULL OR maxes[i] IS NULL;
        SELECT count(*) INTO held FROM {schema}.runs
            WHERE status = 'running' AND (limit_key1 = keys[i] OR limit_key2 = keys[i]);
        IF held < maxes[i] THEN
            room := room || keys[i];
        END IF;
    END LOOP;
    IF cardinality(room) = 0 THEN
        RETURN 0;
    END IF;
    RETURN {schema}.release_limits(room, at, channel);
END
$$


-- Version 7: rate limits and debounce -------------------------------------------------

-- name: v7_01_runs_rates
-- The rate limits a run's claims are held to (at most two, each a key, a
-- max and a period in microseconds; never changed once the run is created
-- but by a debounced create) and the run's debounce key. All nullable
-- without a default: the table is not rewritten, and every run that exists
-- has no rates and no debounce key.
ALTER TABLE {schema}.runs ADD COLUMN rate_key1 text COLLATE "C",
    ADD COLUMN rate_max1 integer, ADD COLUMN rate_period1 bigint,
    ADD COLUMN rate_key2 text COLLATE "C", ADD COLUMN rate_max2 integer,
    ADD COLUMN rate_period2 bigint, ADD COLUMN debounce_key text COLLATE "C"

-- name: v7_02_runs_debounce
-- At most one open run (pending, or delayed: stored as sleeping before its
-- first attempt) per (workflow, debounce key): the arbiter of a debounced
-- create's INSERT ... ON CONFLICT, which updates the open run in place.
-- Runs without a debounce key are not in it, so their writes never touch it.
CREATE UNIQUE INDEX runs_debounce ON {schema}.runs (workflow, debounce_key)
    WHERE debounce_key IS NOT NULL AND attempts = 0 AND status IN ('pending', 'sleeping')

-- name: v7_03_rate_claims
-- One row per claim of a run holding a rate key, for each of its keys, at
-- the claim's time. A claim deletes its key's rows older than its period,
-- so a key keeps about as many rows as its max.
CREATE TABLE {schema}.rate_claims (
    key        text COLLATE "C" NOT NULL,
    claimed_at timestamptz NOT NULL
)

-- name: v7_04_rate_claims_key
CREATE INDEX rate_claims_key ON {schema}.rate_claims (key, claimed_at)

-- name: v7_05_rate_waits
-- For each rate key that blocks runs: when its window has room again. The
-- first claim at or after due_at releases the key's first blocked runs.
CREATE TABLE {schema}.rate_waits (
    key    text COLLATE "C" PRIMARY KEY,
    due_at timestamptz NOT NULL
)

-- name: v7_06_rate_waits_due
-- The probe every claim makes (is a wait due?) reads this index only.
CREATE INDEX rate_waits_due ON {schema}.rate_waits (due_at)

-- name: v7_07_lock_rates
-- Takes the transaction-scoped advisory lock of each rate key (NULLs
-- skipped), in the order of the locks. Rate keys use the two-integer key
-- space of advisory locks, which never meets the bigint one of lock_limits,
-- and a claim takes them after its limits' locks, so no two transactions
-- wait for each other in a cycle. Every claim of a run holding a rate key
-- takes its lock, and reads the key's claims after it is granted.
CREATE FUNCTION {schema}.lock_rates(keys text[])
    RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    h integer;
BEGIN
    FOR h IN SELECT DISTINCT hashtext(k) FROM unnest(keys) AS k
        WHERE k IS NOT NULL ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtext('reflow:rate'), h);
    END LOOP;
END
$$

-- name: v7_08_release_rates
-- Called at the start of a claim when a rate wait is due (its own
-- statement, before the claim chooses runs): for each key whose wait is due
-- and whose lock is free (a key another transaction holds is left for the
-- next claim), deletes the wait and unblocks the key's first blocked runs
-- (blocked_by is prefix and key; by priority, due time, id), as many as its
-- window (the max and period of the first of them) has room for, waking
-- their workflows' workers on channel (NULL: none). If blocked runs remain,
-- the wait is set again for when the oldest claim in the window leaves it
-- (or a period from now), and the first one's workflow told of it on
-- channel. Returns how many runs it unblocked.
CREATE FUNCTION {schema}.release_rates(stamp timestamptz, prefix text, channel text)
    RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    k text;
    b text;
    rmax integer;
    rperiod interval;
    held integer;
    oldest timestamptz;
    room integer;
    n integer;
    flows text[];
    flow text;
    freed integer := 0;
BEGIN
    FOR k IN SELECT w.key FROM {schema}.rate_waits AS w WHERE w.due_at <= stamp
        ORDER BY w.key LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext('reflow:rate'), hashtext(k));
        DELETE FROM {schema}.rate_waits AS w WHERE w.key = k AND w.due_at <= stamp;
        CONTINUE WHEN NOT FOUND;
        b := prefix || k;
        SELECT CASE WHEN r.rate_key1 = k THEN r.rate_max1 ELSE r.rate_max2 END,
            CASE WHEN r.rate_key1 = k THEN r.rate_period1 ELSE r.rate_period2 END
                * interval '1 microsecond'
            INTO rmax, rperiod FROM {schema}.runs AS r WHERE r.blocked_by = b
            ORDER BY r.priority DESC, r.wake_at, r.id LIMIT 1;
        CONTINUE WHEN rmax IS NULL OR rperiod IS NULL;
        SELECT count(*), min(c.claimed_at) INTO held, oldest FROM {schema}.rate_claims AS c
            WHERE c.key = k AND c.claimed_at > stamp - rperiod;
        room := rmax - held;
        WHILE room > 0 LOOP
            -- Waits for a writer of those runs; one that changed meanwhile
            -- (a cancel) is passed over, and the next ones are looked for.
            WITH f AS (
                SELECT r.id FROM {schema}.runs AS r WHERE r.blocked_by = b
                ORDER BY r.priority DESC, r.wake_at, r.id LIMIT room FOR UPDATE
            ), u AS (
                UPDATE {schema}.runs AS r SET blocked_by = NULL, updated_at = stamp
                FROM f WHERE r.id = f.id AND r.blocked_by = b RETURNING r.workflow
            ) SELECT count(*), array_agg(DISTINCT u.workflow) INTO n, flows FROM u;
            EXIT WHEN n = 0;
            room := room - n;
            freed := freed + n;
            IF channel IS NOT NULL THEN
                FOREACH flow IN ARRAY flows LOOP
                    PERFORM pg_notify(channel,
                        '0|' || CASE WHEN octet_length(flow) <= 4000 THEN flow ELSE '' END);
                END LOOP;
            END IF;
        END LOOP;
        flow := NULL;
        SELECT r.workflow INTO flow FROM {schema}.runs AS r WHERE r.blocked_by = b
            ORDER BY r.priority DESC, r.wake_at, r.id LIMIT 1;
        IF flow IS NOT NULL THEN
            INSERT INTO {schema}.rate_waits AS w (key, due_at)
                VALUES (k, coalesce(oldest, stamp) + rperiod)
                ON CONFLICT (key) DO UPDATE SET due_at = least(w.due_at, EXCLUDED.due_at);
            -- Idle workers of the first run left blocked look again then.
            IF channel IS NOT NULL THEN
                PERFORM pg_notify(channel,
                    greatest(0, ceil(extract(epoch FROM coalesce(oldest, stamp) + rperiod
                        - stamp) * 1000))::bigint
                    || '|' || CASE WHEN octet_length(flow) <= 4000 THEN flow ELSE '' END);
            END IF;
        END IF;
        rmax := NULL;
        rperiod := NULL;
    END LOOP;
    RETURN freed;
END
$$

-- name: v7_09_claim_held
-- The second half of a claim, for the picked runs ids (in claim order:
-- lapsed leases first) that hold concurrency limits or rate limits, at
-- stamp (NULL: the server's clock read once the locks are granted, so that
-- the claims of a rate key, serialized by its lock, have rising times): under
-- the locks of all their limit keys, then of all their rate keys (each set
-- taken at once, in order), each, if still claimable (due and not blocked,
-- or a lapsed lease) and not taken by another claim meanwhile, is claimed
-- (at most budget of them) if every one of its limit keys has fewer than
-- its max running holders (a lapsed lease is not asked: it holds its
-- slots) and every one of its rate keys fewer than its max claims in the
-- window of its period ending at stamp (claims of this call included).
-- Else a due run is blocked by the first full key (a rate's key behind
-- prefix, and the key's wait set for when its window has room), and a
-- lapsed lease left as it is. A claim records one claim at stamp for each
-- rate key of the run, and deletes that key's claims older than its
-- period. Returns the claimed runs as they now are, and whether each was a
-- lapsed lease. A rate wait set or moved earlier notifies channel (unless
-- NULL) with a hint for the blocked run's workflow, due when it has room.
CREATE FUNCTION {schema}.claim_held(ids text[], lease interval, stamp timestamptz,
    budget integer, prefix text, channel text)
    RETURNS TABLE (run {schema}.runs, stale integer) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    candidate text;
    rec {schema}.runs%ROWTYPE;
    over text;
    lapsed boolean;
    i integer;
    rk text;
    rm integer;
    rp interval;
    nth timestamptz;
    room_at timestamptz;
    noted timestamptz;
    trim1 boolean;
    trim2 boolean;
    taken integer := 0;
BEGIN
    PERFORM {schema}.lock_limits(array_agg(v.k)) FROM {schema}.runs AS r,
        LATERAL (VALUES (r.limit_key1), (r.limit_key2)) AS v(k)
        WHERE r.id = ANY(ids) AND v.k IS NOT NULL;
    PERFORM {schema}.lock_rates(array_agg(v.k)) FROM {schema}.runs AS r,
        LATERAL (VALUES (r.rate_key1), (r.rate_key2)) AS v(k)
        WHERE r.id = ANY(ids) AND v.k IS NOT NULL;
    stamp := coalesce(stamp, clock_timestamp());
    FOREACH candidate IN ARRAY ids LOOP
        EXIT WHEN taken >= budget;
        SELECT * INTO rec FROM {schema}.runs AS r WHERE r.id = candidate
            AND ((r.blocked_by IS NULL AND r.status IN ('pending', 'sleeping', 'waiting')
                AND r.wake_at <= stamp)
                OR (r.status = 'running' AND r.lease_expires_at <= stamp))
            FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        lapsed := rec.status = 'running';
        over := NULL;
        IF NOT lapsed THEN
            IF rec.limit_key1 IS NOT NULL AND rec.limit_max1 <= (
                    (SELECT count(*) FROM {schema}.runs AS r WHERE r.status = 'running'
                        AND r.limit_key1 = rec.limit_key1)
                    + (SELECT count(*) FROM {schema}.runs AS r WHERE r.status = 'running'
                        AND r.limit_key2 = rec.limit_key1)) THEN
                over := rec.limit_key1;
            ELSIF rec.limit_key2 IS NOT NULL AND rec.limit_max2 <= (
                    (SELECT count(*) FROM {schema}.runs AS r WHERE r.status = 'running'
                        AND r.limit_key1 = rec.limit_key2)
                    + (SELECT count(*) FROM {schema}.runs AS r WHERE r.status = 'running'
                        AND r.limit_key2 = rec.limit_key2)) THEN
                over := rec.limit_key2;
            END IF;
        END IF;
        IF over IS NOT NULL THEN
            UPDATE {schema}.runs AS r SET blocked_by = over, updated_at = stamp
                WHERE r.id = candidate;
            CONTINUE;
        END IF;
        -- The rates: a window is full when its max-th newest claim is in it;
        -- it has room again when that claim leaves it.
        trim1 := false;
        trim2 := false;
        FOR i IN 1 .. 2 LOOP
            IF i = 1 THEN
                rk := rec.rate_key1;
                rm := rec.rate_max1;
                rp := rec.rate_period1 * interval '1 microsecond';
            ELSE
                rk := rec.rate_key2;
                rm := rec.rate_max2;
                rp := rec.rate_period2 * interval '1 microsecond';
            END IF;
            CONTINUE WHEN rk IS NULL OR rm IS NULL OR rp IS NULL;
            nth := NULL;
            SELECT c.claimed_at INTO nth FROM {schema}.rate_claims AS c WHERE c.key = rk
                ORDER BY c.claimed_at DESC OFFSET rm - 1 LIMIT 1;
            IF i = 1 THEN trim1 := nth IS NOT NULL; ELSE trim2 := nth IS NOT NULL; END IF;
            IF nth IS NOT NULL AND nth > stamp - rp THEN
                over := rk;
                room_at := nth + rp;
                EXIT;
            END IF;
        END LOOP;
        IF over IS NOT NULL THEN
            IF NOT lapsed THEN
                UPDATE {schema}.runs AS r SET blocked_by = prefix || over, updated_at = stamp
                    WHERE r.id = candidate;
                noted := NULL;
                SELECT w.due_at INTO noted FROM {schema}.rate_waits AS w WHERE w.key = over;
                IF noted IS NULL OR room_at < noted THEN
                    INSERT INTO {schema}.rate_waits AS w (key, due_at) VALUES (over, room_at)
                        ON CONFLICT (key) DO UPDATE SET due_at = least(w.due_at, EXCLUDED.due_at);
                    -- Idle workers of the run's workflow look again when it has room.
                    IF channel IS NOT NULL THEN
                        PERFORM pg_notify(channel,
                            greatest(0, ceil(extract(epoch FROM room_at - stamp) * 1000))::bigint
                            || '|' || CASE WHEN octet_length(rec.workflow) <= 4000
                                THEN rec.workflow ELSE '' END);
                    END IF;
                END IF;
            END IF;
            CONTINUE;
        END IF;
        -- Record the claim; a key that held max claims already drops those
        -- that have left the window (one that held fewer has none to drop).
        IF rec.rate_key1 IS NOT NULL THEN
            IF trim1 THEN
                DELETE FROM {schema}.rate_claims AS c WHERE c.key = rec.rate_key1
                    AND c.claimed_at <= stamp - rec.rate_period1 * interval '1 microsecond';
            END IF;
            INSERT INTO {schema}.rate_claims (key, claimed_at) VALUES (rec.rate_key1, stamp);
        END IF;
        IF rec.rate_key2 IS NOT NULL THEN
            IF trim2 THEN
                DELETE FROM {schema}.rate_claims AS c WHERE c.key = rec.rate_key2
                    AND c.claimed_at <= stamp - rec.rate_period2 * interval '1 microsecond';
            END IF;
            INSERT INTO {schema}.rate_claims (key, claimed_at) VALUES (rec.rate_key2, stamp);
        END IF;
        UPDATE {schema}.runs AS r SET status = 'running', lease_epoch = r.lease_epoch + 1,
            attempts = r.attempts + 1, reclaims = r.reclaims + CASE WHEN lapsed THEN 1 ELSE 0 END,
            lease_expires_at = stamp + lease, wake_at = NULL, updated_at = stamp
            WHERE r.id = candidate RETURNING * INTO rec;
        taken := taken + 1;
        run := rec;
        stale := CASE WHEN lapsed THEN 1 ELSE 0 END;
        RETURN NEXT;
    END LOOP;
END
$$


-- Version 8: propagation headers ------------------------------------------------------

-- name: v8_01_runs_headers
-- The propagation headers a run was created with (trace context, baggage):
-- reflow_core.adapter.headers_column, a JSON object with sorted names, or
-- NULL for none; replaced only by a debounced create. Nullable without a
-- default: the table is not rewritten, and every run that exists has none.
-- The functions that return whole runs rows (claim_held, claim_limited)
-- return the new column too: their row type is the table's, and claim
-- reads their rows by column name.
ALTER TABLE {schema}.runs ADD COLUMN headers text


-- Version 9: runs by idempotency key --------------------------------------------------

-- name: v9_01_runs_key_created
-- The runs created with an idempotency key, by key, then newest first:
-- find_runs_by_key walks one key's entries backwards and stops at its
-- limit. runs_idempotency (workflow first, the arbiter of an idempotent
-- create) cannot serve a lookup by key alone. Runs without a key are not in
-- it, and none of its columns ever changes once a run is created, so it
-- costs a keyed create one index entry and every other write nothing
-- (renewals stay HOT updates). Building it reads the table once, blocking
-- writes to runs meanwhile.
CREATE INDEX runs_key_created ON {schema}.runs (idempotency_key, created_at, id)
    WHERE idempotency_key IS NOT NULL


-- Version 10: claims per workflow ------------------------------------------------------
-- The claim reads each served workflow's head through its own range of the
-- queue indexes (see queries.sql), so runs of other workflows, however many
-- and however old, are never read, and a workflow's own backlog is read only
-- as far as the claim's limit. runs_ready and runs_due are rebuilt with the
-- workflow first (same predicates, same names); building them reads the
-- table once, blocking writes to runs meanwhile.

-- name: v10_01_drop_runs_ready
DROP INDEX {schema}.runs_ready

-- name: v10_02_runs_ready
-- Pending runs of a workflow in the order a claim takes them: priority,
-- highest first, then due time. A claim walks one workflow's entries from
-- their head and stops at its limit.
CREATE INDEX runs_ready ON {schema}.runs (workflow, priority DESC, wake_at)
    WHERE status = 'pending' AND blocked_by IS NULL

-- name: v10_03_drop_runs_due
DROP INDEX {schema}.runs_due

-- name: v10_04_runs_due
-- Timed runs of a workflow (delayed, stored as sleeping, sleeping and
-- waiting) by due time, blocked ones left out: a claim reads the range due
-- by now of each workflow it serves (never the runs that sleep or wait for
-- later, however many), next_due the first entry after now.
CREATE INDEX runs_due ON {schema}.runs (workflow, wake_at)
    WHERE status IN ('sleeping', 'waiting') AND blocked_by IS NULL

-- name: v10_05_schedules_workflow_due
-- Due schedules of a workflow that are not paused, earliest first: the
-- due_schedules of an engine reads the range of each workflow it serves.
CREATE INDEX schedules_workflow_due ON {schema}.schedules (workflow, next_run_at, key)
    WHERE NOT paused


-- Version 11: workflow versions --------------------------------------------------------

-- name: v11_01_runs_version
-- The version of the workflow definition that enqueued a run (an integer
-- from 1 to 2**31 - 1) and the hash of that definition's shape (NULL for
-- none), both replaced only by a debounced create. A constant default and a
-- nullable column: PostgreSQL 11 and newer add them without rewriting the
-- table or any index, and every run that exists is version 1 with no
-- fingerprint. No index: a claim that serves some versions only filters
-- the rows its walks of runs_ready, runs_due and runs_running read. The
-- functions that return whole runs rows (claim_held, claim_limited) return
-- the new columns too, as with headers in version 8.
ALTER TABLE {schema}.runs ADD COLUMN version integer NOT NULL DEFAULT 1,
    ADD COLUMN fingerprint text
