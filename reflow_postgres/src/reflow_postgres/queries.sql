-- Every statement the PostgreSQL backend sends while it works, rendered once
-- per storage by reflow_core.adapter.load_queries. "-- name: x" starts the
-- statement x; {x} inserts the statement or fragment x of this file, or a
-- value of the storage's own (never user data):
--
-- * {schema}: the schema, quoted by psycopg as an identifier;
-- * {now}: the storage clock: now() (the server's clock, the default), or
--   the bound parameter %(now)s::timestamptz when a test clock is configured;
--   {locked_now} is NULL::timestamptz instead of now() (a function that
--   takes locks reads the server's clock once they are granted);
-- * {channel}: the notification channel, quoted by psycopg as a literal;
--   {wake_channel} is the same, or NULL::text when notifications are off;
-- * {done_channel}: the channel of finish hints, quoted by psycopg as a
--   literal (only inside the notify_done fragments, which are NULL when
--   notifications are off);
-- * {children_prefix}: reflow_core.storage.CHILDREN_WAIT_PREFIX, quoted by
--   psycopg as a literal (the waiting_for of a run waiting for its children);
-- * {rate_prefix}: reflow_core.storage.RATE_BLOCK_PREFIX, quoted by psycopg
--   as a literal (blocked_by of a run blocked by a rate limit, before the key);
-- * {run_columns}, {run_columns_r} and {run_columns_c} (each prefixed with r. or c.),
--   {schedule_columns} and {worker_columns}: the column orders of
--   reflow_core.adapter's row mappers;
-- * {served}: in claim and claim_limited, what a claim that serves some
--   versions only adds to their reads (see version_served); empty for a
--   claim of every version, whose statements are then as they were without
--   versions (reflow_postgres._sql renders both).
--
-- Every value is bound as a %(name)s parameter. Parameters that appear only
-- in a SELECT list carry an explicit cast, since the server cannot infer
-- their types there.


-- Fragments ---------------------------------------------------------------------

-- name: latest
-- The last time a datetime holds in every zone (a day before the end of year
-- 9999). Durations are bounded now, but an older version could store a
-- wake-up time in the year 33,715, which psycopg cannot load: capped in the
-- query, every read of it still works (at no cost to the loaders, which stay
-- psycopg's own).
'9999-12-30 00:00:00+00'::timestamptz

-- name: protocol_status
-- The status a run has in the storage protocol. A delayed run is stored as
-- sleeping before its first attempt: it is due at wake_at like a sleeping
-- run, so it sits in runs_due and the claim, next_due and queue_stats find it
-- through the indexes they already use (see schema.sql). Only a claimed run
-- can sleep (sleep is fenced), and a claim counts an attempt, so a sleeping
-- run that was never attempted is a delayed one, and nothing else is.
CASE WHEN status = 'sleeping' AND attempts = 0 THEN 'delayed' ELSE status END

-- name: read_columns
-- {run_columns} for reads of any run (get_run, list_runs, creates), with the
-- status of protocol_status, and the deadlines an older version may have stored
-- out of range capped (deadline_at needs no cap: no older version wrote it,
-- and run deadlines are bounded durations).
id, workflow, {protocol_status} AS status, input, output, error, idempotency_key, attempts,
reclaims, lease_epoch, created_at, updated_at,
CASE WHEN wake_at > {latest} THEN {latest} ELSE wake_at END AS wake_at,
waiting_for, CASE WHEN lease_expires_at > {latest} THEN {latest} ELSE lease_expires_at END
    AS lease_expires_at, deadline_at, parent_id, parent_step, priority, limit_key1, limit_max1,
    limit_key2, limit_max2, blocked_by, rate_key1, rate_max1, rate_period1, rate_key2, rate_max2,
    rate_period2, debounce_key, headers, version, fingerprint

-- name: step_read_columns
-- The step columns of reflow_core.adapter.STEP_COLUMNS, wake_at capped.
name, status, output, error, attempts, CASE WHEN wake_at > {latest} THEN {latest} ELSE wake_at END,
completed_at

-- name: fence
-- Still running under the presented epoch, with a lease the server clock has
-- not seen lapse.
id = %(id)s AND status = 'running' AND lease_epoch = %(epoch)s AND lease_expires_at > {now}

-- name: terminal
('completed', 'failed', 'cancelled')

-- name: insert_run
INSERT INTO {schema}.runs AS r (id, workflow, status, input, idempotency_key, created_at,
    updated_at, wake_at, deadline_at, priority, limit_key1, limit_max1, limit_key2, limit_max2,
    rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2, debounce_key,
    headers, version, fingerprint)

-- name: limit_values
-- The priority, limits, rates, debounce key, headers, version and
-- fingerprint of a new run (reflow_core.adapter.limit_columns, rate_columns
-- and headers_column; periods in microseconds, headers a JSON object or NULL).
%(priority)s::integer, %(key1)s::text, %(max1)s::integer, %(key2)s::text, %(max2)s::integer,
%(rkey1)s::text, %(rmax1)s::integer, %(rperiod1)s::bigint, %(rkey2)s::text, %(rmax2)s::integer,
%(rperiod2)s::bigint, %(debounce)s::text, %(headers)s::text, %(version)s::integer,
%(fingerprint)s::text

-- name: new_status
-- A new run with a delay (a positive interval, else NULL) is delayed: stored
-- as sleeping, never attempted (see protocol_status), due when the delay passes.
CASE WHEN %(delay)s::interval IS NULL THEN 'pending' ELSE 'sleeping' END

-- name: new_wake_at
-- When a new run is due: now, or when its delay (a positive interval, else
-- NULL) passes, or at its deadline (NULL: none) if that comes first
-- (reflow_core.adapter.due_by_deadline; least() skips a NULL).
least({now} + coalesce(%(delay)s::interval, interval '0'), {now} + %(deadline)s::interval)

-- name: on_idempotency_key
-- A run that exists with the same (workflow, idempotency key) comes back
-- instead, unchanged (whatever the delay and deadline asked for), with
-- inserted false.
ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL
DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
RETURNING {read_columns}, (xmax = 0) AS inserted

-- name: on_debounce_key
-- Debounce: the workflow's open run with the same debounce key (pending, or
-- delayed: stored as sleeping, and never claimed; the predicate of
-- runs_debounce) is updated in place instead: the new input, priority,
-- limits, rates, headers, version and fingerprint, unblocked, due the delay
-- from now (or at its own
-- deadline if that comes first; least() skips a NULL), its id, creation and
-- deadline kept; it comes back with inserted false. Concurrent creates with
-- the key are serialized by the index: one inserts, the others update.
ON CONFLICT (workflow, debounce_key)
    WHERE debounce_key IS NOT NULL AND attempts = 0 AND status IN ('pending', 'sleeping')
DO UPDATE SET status = EXCLUDED.status, input = EXCLUDED.input,
    priority = EXCLUDED.priority, limit_key1 = EXCLUDED.limit_key1,
    limit_max1 = EXCLUDED.limit_max1, limit_key2 = EXCLUDED.limit_key2,
    limit_max2 = EXCLUDED.limit_max2, rate_key1 = EXCLUDED.rate_key1,
    rate_max1 = EXCLUDED.rate_max1, rate_period1 = EXCLUDED.rate_period1,
    rate_key2 = EXCLUDED.rate_key2, rate_max2 = EXCLUDED.rate_max2,
    rate_period2 = EXCLUDED.rate_period2, headers = EXCLUDED.headers,
    version = EXCLUDED.version, fingerprint = EXCLUDED.fingerprint, blocked_by = NULL,
    wake_at = least({now} + coalesce(%(delay)s::interval, interval '0'), r.deadline_at),
    updated_at = {now}
RETURNING {read_columns}, (xmax = 0) AS inserted

-- name: insert_step
INSERT INTO {schema}.steps (run_id, name, status, output, error, attempts, wake_at,
    completed_at)

-- name: upsert_step
ON CONFLICT (run_id, name) DO UPDATE SET status = EXCLUDED.status,
    output = EXCLUDED.output, error = EXCLUDED.error, attempts = EXCLUDED.attempts,
    wake_at = EXCLUDED.wake_at, completed_at = EXCLUDED.completed_at

-- name: step_values
%(name)s::text, %(step_status)s::text, %(step_output)s::text, %(step_error)s::text,
%(step_attempts)s::integer, %(step_wake_at)s::timestamptz, {now}

-- A run that ends drops its buffered events in the statement that ends it:
-- runs.buffered counts a live run's untaken events (kept by deliver and
-- take), and only a run with some calls the schema's function
-- drop_buffered_events (see schema.sql). A run that holds none costs this
-- statement nothing more: the events table is not even in its plan. The
-- function's queries take a snapshot of their own, after this statement got
-- the run's row, so they also see an event whose delivery committed while
-- this statement waited for that row (it is counted in the row's new version).

-- name: drop_buffered_r
CASE WHEN r.buffered > 0 THEN {schema}.drop_buffered_events(r.id, {now}) END

-- name: drop_buffered_f
CASE WHEN f.buffered > 0 THEN {schema}.drop_buffered_events(f.id, {now}) END

-- A child run's end wakes its parent when the parent waits for its children
-- at the child's step and this was the last of them still open. The
-- statement that ends a run locks its parent first, in its WHERE clause
-- (lock_parent, evaluated after the fence and before the run's own row is
-- locked: parents before children, as the cancel cascade locks them), and
-- then calls the schema's function child_ended, whose queries take a
-- snapshot of their own: two children of one parent ending at once are
-- serialized by the parent's lock, and the second sees the end of the first
-- (see schema.sql). A run that is no child costs these statements a test of
-- parent_id IS NULL and nothing else: its parent is never looked up.

-- name: lock_parent
(parent_id IS NULL OR {schema}.lock_parent(parent_id))

-- name: child_ended_r
CASE WHEN r.parent_id IS NOT NULL THEN {schema}.child_ended(r.parent_id,
    {children_prefix} || r.parent_step, r.parent_step, r.id, {now}, {wake_channel}) END

-- name: child_ended_f
CASE WHEN f.parent_id IS NOT NULL THEN {schema}.child_ended(f.parent_id,
    {children_prefix} || f.parent_step, f.parent_step, f.id, {now}, {wake_channel}) END

-- A write that stops a running run holding concurrency limits (it ends, is
-- handed back, sleeps or waits) calls the schema's function release_limits
-- with the run's keys, in its transaction, after it locked the run's row:
-- under the keys' advisory locks it unblocks, for each key, the blocked run
-- a claim would take first (see schema.sql). A run without limits costs
-- these statements a test of limit_key1 IS NULL and nothing else.

-- name: release_r
CASE WHEN r.limit_key1 IS NOT NULL THEN {schema}.release_limits(
    ARRAY[r.limit_key1, r.limit_key2], {now}, {wake_channel}) END

-- name: release_f
CASE WHEN f.limit_key1 IS NOT NULL THEN {schema}.release_limits(
    ARRAY[f.limit_key1, f.limit_key2], {now}, {wake_channel}) END

-- name: release_u
CASE WHEN u.limit_key1 IS NOT NULL THEN {schema}.release_limits(
    ARRAY[u.limit_key1, u.limit_key2], {now}, {wake_channel}) END

-- The notifications that wake idle workers (the storage puts NULL in their
-- place when notifications are off). The payload names the workflow, so only
-- its workers wake; a delay (in milliseconds, by the server clock) tells them
-- when a sleep, a wait's timeout or a delayed run falls due. Names too long
-- for a payload wake every worker instead (empty name).

-- name: notify
pg_notify({channel}, '0|' || CASE WHEN octet_length(u.workflow) <= 4000 THEN u.workflow ELSE '' END)

-- name: notify_ins
-- A created run: due now (0), or when its delay passes, rounded up so that no
-- worker looks before it is due.
pg_notify({channel}, greatest(0, ceil(extract(epoch FROM ins.wake_at - {now}) * 1000))::bigint::text
    || '|' || CASE WHEN octet_length(ins.workflow) <= 4000 THEN ins.workflow ELSE '' END)

-- name: notify_at
pg_notify({channel}, greatest(0, (extract(epoch FROM u.wake_at - {now}) * 1000)::bigint)::text
    || '|' || CASE WHEN octet_length(u.workflow) <= 4000 THEN u.workflow ELSE '' END)

-- The finish hints that tell engines waiting for results that a run ended
-- (the storage puts NULL in their place when notifications are off): on the
-- finish channel, the ids of the runs, one per line, in the format of
-- reflow_core.wakeups.finish_payloads, sent by the statement that ends them
-- and delivered when it commits. An id longer than 1000 bytes or holding a
-- newline goes as an empty entry, which tells listeners to look at every
-- run they wait for. A statement that ends one run sends its id; one that
-- ends many reads them from its CTE ended (column id) and sends one hint
-- per chunk of at most 7900 bytes (PostgreSQL takes 8000), in one pass: an
-- entry goes to chunk (bytes up to its end, separators counted, - 1) / 6900,
-- so a chunk holds the entries that end in its 6900 bytes, of which only
-- the first (at most 1001 bytes with its separator) may begin before them.

-- name: notify_done_r
pg_notify({done_channel},
    CASE WHEN octet_length(r.id) <= 1000 AND strpos(r.id, E'\n') = 0 THEN r.id ELSE '' END)

-- name: notify_done_f
pg_notify({done_channel},
    CASE WHEN octet_length(f.id) <= 1000 AND strpos(f.id, E'\n') = 0 THEN f.id ELSE '' END)

-- name: notify_done_many
-- A scalar subquery: the number of hints sent.
(SELECT count(pg_notify({done_channel}, c.payload)) FROM (
    SELECT string_agg(s.entry, E'\n' ORDER BY s.id) AS payload FROM (
        SELECT e.id, e.entry,
            (sum(octet_length(e.entry) + 1) OVER (ORDER BY e.id) - 1) / 6900 AS chunk
        FROM (SELECT id, CASE WHEN octet_length(id) <= 1000 AND strpos(id, E'\n') = 0
            THEN id ELSE '' END AS entry FROM ended) AS e
    ) AS s GROUP BY s.chunk
) AS c)


-- Runs --------------------------------------------------------------------------

-- name: create
WITH ins AS (
    {insert_run}
    VALUES (%(id)s, %(workflow)s, {new_status}, %(input)s, %(key)s, {now}, {now},
        {new_wake_at}, {now} + %(deadline)s::interval, {limit_values})
    {on_idempotency_key}
) SELECT ins.*, CASE WHEN ins.inserted THEN {notify_ins} END FROM ins

-- name: create_debounced
-- create for a run with a debounce key (never batched: one statement cannot
-- update a row twice). The notification says when the run is due, whether
-- it was inserted or updated.
WITH ins AS (
    {insert_run}
    VALUES (%(id)s, %(workflow)s, {new_status}, %(input)s, %(key)s, {now}, {now},
        {new_wake_at}, {now} + %(deadline)s::interval, {limit_values})
    {on_debounce_key}
) SELECT ins.*, {notify_ins} FROM ins

-- name: create_many
-- Many creates in one statement: the creates that group commit gathers, and
-- a create_runs batch (whole, or one stretch of it). The caller makes sure
-- no two share an id or an idempotency key, and that none has a debounce key.
-- %(rows)s is a JSON array with one array per run, in order (see
-- reflow_postgres._rows.create_rows): id, workflow, input, priority,
-- idempotency key, version, fingerprint, then, only when one of them is
-- set, delay and deadline (interval text), headers, the limit columns and
-- the rate columns; a field past the end of a shorter array reads as NULL. One JSON text is far
-- cheaper to send than an array per column, whose every element the client
-- would escape one by one. Rows are inserted in (workflow, key) order, so
-- that concurrent statements sharing keys take the keys' locks (an insert's,
-- or the lock on the run a key finds) in one order: one waits for the other
-- instead of deadlocking. One notification per workflow, for the first of
-- its new runs to fall due (0 when one is due at once; next_due finds the
-- later ones).
WITH t AS (
    SELECT r->>0 AS id, r->>1 AS workflow, r->>2 AS input, (r->>3)::integer AS priority,
        r->>4 AS key, (r->>5)::integer AS version, r->>6 AS fingerprint,
        (r->>7)::interval AS delay, (r->>8)::interval AS deadline, r->>9 AS headers,
        r->>10 AS key1, (r->>11)::integer AS max1, r->>12 AS key2, (r->>13)::integer AS max2,
        r->>14 AS rkey1, (r->>15)::integer AS rmax1, (r->>16)::bigint AS rperiod1,
        r->>17 AS rkey2, (r->>18)::integer AS rmax2, (r->>19)::bigint AS rperiod2, ord
    FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS e(r, ord)
), ins AS (
    {insert_run}
    SELECT id, workflow, CASE WHEN delay IS NULL THEN 'pending' ELSE 'sleeping' END, input,
        key, {now}, {now}, least({now} + coalesce(delay, interval '0'), {now} + deadline),
        {now} + deadline, priority, key1, max1, key2, max2, rkey1, rmax1, rperiod1, rkey2,
        rmax2, rperiod2, NULL, headers, version, fingerprint FROM t ORDER BY workflow, key, ord
    {on_idempotency_key}
), woken AS (
    SELECT {notify_ins} FROM (SELECT workflow, min(wake_at) AS wake_at FROM ins
        WHERE inserted GROUP BY workflow) AS ins
) SELECT ins.*, (SELECT count(*) FROM woken) FROM ins

-- name: refuse_taken
-- The first statement of a create_runs batch with caller-chosen run ids
-- (%(ids)s): a copy of each run that already has one of them, which the
-- primary key refuses (runs_pkey), so the batch fails and writes nothing,
-- even for an item that an idempotency or debounce key would otherwise
-- have matched. The copies leave out the keys of the other unique indexes,
-- so the primary key is the one that refuses. Inserts nothing when every
-- id is free.
INSERT INTO {schema}.runs (id, workflow, status, input, created_at, updated_at)
SELECT id, workflow, status, input, created_at, updated_at FROM {schema}.runs
WHERE id = ANY(%(ids)s::text[])

-- name: get_runs
-- One statement for any number of ids (get_runs, and the checks a create_runs
-- retry makes), served by the primary key; a missing id has no row.
SELECT {read_columns} FROM {schema}.runs WHERE id = ANY(%(ids)s::text[])

-- name: get_run
SELECT {read_columns} FROM {schema}.runs WHERE id = %(id)s

-- name: flows
-- The workflows named in %(workflows)s, each once (the list may repeat
-- one): a statement reads each one's range of an index that leads with the
-- workflow (LATERAL over w), never the runs or schedules of other workflows.
(SELECT DISTINCT unnest(%(workflows)s::text[]) AS name) AS w

-- name: claim
-- Lapsed leases first (whatever the limits), then due runs by priority,
-- highest first, and due time. For each workflow served (LATERAL over
-- flows), its pending runs from the head of its range of runs_ready, in
-- that order, and its timed ones (delayed, sleeping, waiting) that are due
-- from its range of runs_due up to now (those due at this moment, sorted by
-- priority and due time); each taken with SKIP LOCKED and bounded by the
-- claim limit, so a workflow's backlog is read only as far as the limit and
-- other workflows' runs not at all. The first limit of them all, merged,
-- are the claim's: each workflow's first limit holds every one of those.
-- A row locked and not picked is let go when the statement commits.
-- Blocked runs are in neither index. Runs holding limits or
-- rates among the picked (lapsed leases holding rates too) are left for
-- claim_held: their ids come back, in claim order, in the column after the
-- steps (of every row, and of a row of NULLs when nothing else was
-- claimed). The claimed runs come back with their saved steps (times in
-- epoch microseconds, as JSON holds them). Lapsed leases in skip (held by
-- a full rate, seen by this claim already) are passed over.
--
-- With probe true, a claim first looks whether a rate wait is due (an
-- index probe of rate_waits_due, next to nothing when none is): if one is,
-- it claims nothing and says so in the last column, and the caller runs
-- release_rates and claims again, so that the runs it releases compete
-- with the others.
--
-- {served} is empty for a claim of every version. A claim that serves some
-- versions only (claim_served) adds version_served to the three reads: the
-- runs of other versions are passed over by the same walks of the same
-- indexes, before they are locked, so they are neither locked, blocked nor
-- changed, and the LIMIT of each read counts the runs it serves only.
WITH gate AS MATERIALIZED (
    SELECT %(probe)s::boolean
        AND EXISTS (SELECT 1 FROM {schema}.rate_waits WHERE due_at <= {now}) AS due
), stale AS (
    SELECT id, lease_expires_at AS k, rate_key1 IS NOT NULL AS limited FROM {schema}.runs
    WHERE status = 'running' AND lease_expires_at <= {now}
        AND workflow = ANY(%(workflows)s) AND id <> ALL(%(skip)s::text[])
        AND NOT (SELECT due FROM gate){served}
    ORDER BY lease_expires_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), ready AS (
    SELECT r.* FROM {flows} CROSS JOIN LATERAL (
        SELECT id, priority, wake_at AS k,
            limit_key1 IS NOT NULL OR rate_key1 IS NOT NULL AS limited
        FROM {schema}.runs
        WHERE workflow = w.name AND status = 'pending' AND blocked_by IS NULL
            AND wake_at <= {now}{served}
        ORDER BY priority DESC, wake_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ) AS r WHERE NOT (SELECT due FROM gate)
), timed AS (
    SELECT r.* FROM {flows} CROSS JOIN LATERAL (
        SELECT id, priority, wake_at AS k,
            limit_key1 IS NOT NULL OR rate_key1 IS NOT NULL AS limited
        FROM {schema}.runs
        WHERE workflow = w.name AND status IN ('sleeping', 'waiting') AND blocked_by IS NULL
            AND wake_at <= {now}{served}
        ORDER BY priority DESC, wake_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ) AS r WHERE NOT (SELECT due FROM gate)
), due AS (
    SELECT * FROM ready UNION ALL SELECT * FROM timed
    ORDER BY priority DESC, k LIMIT %(limit)s
), picked AS MATERIALIZED (
    SELECT id, 1 AS stale, 0 AS priority, k, limited FROM stale
    UNION ALL SELECT id, 0, priority, k, limited FROM due
    LIMIT %(limit)s
), claimed AS (
    UPDATE {schema}.runs AS r SET status = 'running', lease_epoch = r.lease_epoch + 1,
        attempts = r.attempts + 1, reclaims = r.reclaims + p.stale,
        lease_expires_at = {now} + %(lease)s, wake_at = NULL, updated_at = {now}
    FROM picked AS p WHERE r.id = p.id AND NOT p.limited
    RETURNING {run_columns_r}, p.stale, p.k
) SELECT c.*, (SELECT json_agg(json_build_array(st.name, st.status, st.output,
        st.error, st.attempts, (extract(epoch FROM st.wake_at) * 1000000)::bigint,
        (extract(epoch FROM st.completed_at) * 1000000)::bigint) ORDER BY st.seq)
    FROM {schema}.steps AS st WHERE st.run_id = c.id), l.ids, (SELECT due FROM gate)
FROM (SELECT array_agg(id ORDER BY stale DESC, priority DESC, k, id) AS ids FROM picked
    WHERE limited) AS l
LEFT JOIN claimed AS c ON true
ORDER BY c.stale DESC, c.priority DESC, c.k, c.id

-- name: version_served
-- Whether a claim that serves some versions only (%(versions)s: a JSON
-- object of each workflow it names to the versions it serves) may take a
-- run of workflow and version: the workflow is not named, or its list
-- holds the version.
coalesce((%(versions)s::jsonb -> workflow) @> to_jsonb(version), true)

-- name: held_ids
-- The ids claim_limited hands to claim_held: those claim picked.
%(ids)s::text[]

-- name: held_ids_served
-- The same for a claim that serves some versions only: those of the picked
-- runs whose version it serves, in claim order, read again when this
-- statement starts, so that a run whose version a debounced create changed
-- since claim picked it is left alone.
ARRAY(SELECT i.id FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS i(id, n)
    JOIN {schema}.runs AS r ON r.id = i.id WHERE {version_served} ORDER BY i.n)

-- name: claim_limited
-- The runs holding limits or rates that claim picked (ids, in claim
-- order), claimed or blocked by the schema's function claim_held, in this
-- statement's transaction (see schema.sql); rows as claim's. {held_ids}
-- is held_ids, or held_ids_served for a claim that serves some versions
-- only (claim_limited_served).
WITH c AS MATERIALIZED (
    SELECT (h.run).*, h.stale FROM {schema}.claim_held({held_ids}, %(lease)s::interval,
        {locked_now}, %(limit)s::integer, {rate_prefix}, {wake_channel}) AS h
) SELECT {run_columns_c}, c.stale, NULL::timestamptz AS k,
    (SELECT json_agg(json_build_array(st.name, st.status, st.output,
        st.error, st.attempts, (extract(epoch FROM st.wake_at) * 1000000)::bigint,
        (extract(epoch FROM st.completed_at) * 1000000)::bigint) ORDER BY st.seq)
    FROM {schema}.steps AS st WHERE st.run_id = c.id)
FROM c

-- name: release_rates
-- Run before a claim when its probe found a rate wait due (see claim and
-- the schema's function release_rates).
SELECT {schema}.release_rates({now}, {rate_prefix}, {wake_channel})

-- name: release
-- The end of a cancel cascade: the keys the runs it stopped held.
SELECT {schema}.release_limits(%(keys)s::text[], {now}, {wake_channel})

-- name: pass_turn
-- The end of a cancel cascade: the keys (and maxes) of the runs it ended
-- that were free to be claimed.
SELECT {schema}.pass_turn(%(keys)s::text[], %(maxes)s::integer[], {now}, {wake_channel})

-- name: heartbeat
UPDATE {schema}.runs SET lease_expires_at = {now} + %(extend)s, updated_at = {now}
WHERE {fence}

-- name: save_step
WITH f AS (
    UPDATE {schema}.runs SET lease_expires_at = {now} + %(extend)s, updated_at = {now}
    WHERE {fence} RETURNING id
) {insert_step}
SELECT f.id, {step_values} FROM f {upsert_step}

-- name: save_steps
-- Many runs' step saves in one statement (group commit): each row is fenced
-- on its own, and the run id and epoch of each lease that held come back (a
-- save under a stale epoch of a run that the same batch saves under its live
-- one is neither written nor told it was). %(rows)s is a JSON array with one
-- array per save, in order (see reflow_postgres._rows.save_rows): run id,
-- lease epoch, lease extension (interval text), and the step's name,
-- status, output, error, attempts and wake-up time (timestamptz text, or
-- null). One JSON text is far cheaper to send than an array per column,
-- whose every element the client would adapt one by one.
WITH t AS (
    SELECT r->>0 AS id, (r->>1)::bigint AS epoch, (r->>2)::interval AS extend,
        r->>3 AS name, r->>4 AS status, r->>5 AS output, r->>6 AS error,
        (r->>7)::integer AS attempts, (r->>8)::timestamptz AS wake_at
    FROM jsonb_array_elements(%(rows)s::jsonb) AS e(r)
), f AS (
    UPDATE {schema}.runs AS r SET lease_expires_at = {now} + t.extend, updated_at = {now}
    FROM t WHERE r.id = t.id AND r.status = 'running' AND r.lease_epoch = t.epoch
        AND r.lease_expires_at > {now}
    RETURNING r.id, r.lease_epoch
), ins AS (
    {insert_step}
    SELECT t.id, t.name, t.status, t.output, t.error, t.attempts, t.wake_at, {now}
    FROM t JOIN f ON f.id = t.id AND f.lease_epoch = t.epoch {upsert_step}
) SELECT id, lease_epoch FROM f

-- name: finish
UPDATE {schema}.runs AS r SET status = %(status)s, output = %(output)s,
    error = %(error)s, lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL,
    updated_at = {now}, finished_at = {now}
WHERE {fence} AND {lock_parent}
RETURNING {drop_buffered_r}, {child_ended_r}, {release_r}, {notify_done_r}

-- name: finish_with_step
WITH f AS (
    UPDATE {schema}.runs SET status = %(status)s, output = %(output)s, error = %(error)s,
        lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL, updated_at = {now},
        finished_at = {now}
    WHERE {fence} AND {lock_parent}
    RETURNING id, buffered, parent_id, parent_step, limit_key1, limit_key2
), st AS (
    {insert_step}
    SELECT f.id, {step_values} FROM f {upsert_step}
) SELECT 1, {drop_buffered_f}, {child_ended_f}, {release_f}, {notify_done_f} FROM f

-- name: finish_many
-- Many runs' ends in one statement (group commit), each fenced on its own:
-- the run id and epoch of each lease that held come back (as in save_steps).
-- Child runs are left out (their ends lock their parents first, which rows
-- of one statement could do in conflicting orders), and so are runs holding
-- limits (their ends take the keys' locks, which must be taken at once, in
-- order): the caller ends those missing from the result one by one with
-- finish or finish_with_step. %(rows)s is a JSON array with one array per
-- finish, in order (see reflow_postgres._rows.finish_rows): run id, lease
-- epoch, the run's status, output and error, then, for a finish that saves
-- a last step, the step's fields as in save_steps (a field past the end of
-- a shorter array reads as NULL: no step has no name). One finish hint for
-- the runs it ended (a chunk of them), not one per run.
WITH t AS (
    SELECT r->>0 AS id, (r->>1)::bigint AS epoch, r->>2 AS run_status,
        r->>3 AS run_output, r->>4 AS run_error, r->>5 IS NOT NULL AS has_step,
        r->>5 AS name, r->>6 AS status, r->>7 AS output, r->>8 AS error,
        (r->>9)::integer AS attempts, (r->>10)::timestamptz AS wake_at
    FROM jsonb_array_elements(%(rows)s::jsonb) AS e(r)
), f AS (
    UPDATE {schema}.runs AS r SET status = t.run_status, output = t.run_output,
        error = t.run_error, lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL,
        updated_at = {now}, finished_at = {now}
    FROM t WHERE r.id = t.id AND r.status = 'running' AND r.lease_epoch = t.epoch
        AND r.lease_expires_at > {now} AND r.parent_id IS NULL AND r.limit_key1 IS NULL
    RETURNING r.id, r.lease_epoch, r.buffered
), ins AS (
    {insert_step}
    SELECT t.id, t.name, t.status, t.output, t.error, t.attempts, t.wake_at, {now}
    FROM t JOIN f ON f.id = t.id AND f.lease_epoch = t.epoch WHERE t.has_step {upsert_step}
), ended AS (SELECT id FROM f
) SELECT f.id, f.lease_epoch, {drop_buffered_f}, {notify_done_many} FROM f

-- name: finished_already
-- Did a finish whose connection dropped land after all?
SELECT 1 FROM {schema}.runs WHERE id = %(id)s AND lease_epoch = %(epoch)s
    AND status = %(status)s

-- name: hand_back
WITH u AS (
    UPDATE {schema}.runs SET status = 'pending', lease_expires_at = NULL, wake_at = {now},
        updated_at = {now} WHERE {fence} RETURNING workflow, limit_key1, limit_key2
) SELECT {notify}, {release_u} FROM u

-- end_fenced and end_unfenced return the keys the run held if it was
-- running, and release them (release_limits) unless release is false: a
-- cancel releases the keys of every run its cascade stopped at its end, all
-- at once (the statement release), so that it takes the keys' locks in one
-- go and in order.

-- name: end_fenced
UPDATE {schema}.runs AS r SET status = %(status)s, error = %(error)s,
    lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL, updated_at = {now},
    finished_at = {now}
WHERE {fence} AND {lock_parent}
RETURNING {drop_buffered_r}, {child_ended_r},
    CASE WHEN r.limit_key1 IS NOT NULL THEN ARRAY[r.limit_key1, r.limit_key2] END,
    CASE WHEN %(release)s::boolean THEN {release_r} END, {notify_done_r}

-- name: end_unfenced
-- o locks the run (its parent first, see lock_parent) and tells whether it
-- was running (as it is once locked); a blocked run is blocked no more.
-- A run that was free to be claimed (neither running nor blocked) passes
-- its turn on (pass_turn), in this statement.
WITH o AS (
    SELECT id, status = 'running' AS held, blocked_by IS NULL AS free FROM {schema}.runs
    WHERE id = %(id)s AND status NOT IN {terminal} AND {lock_parent} FOR NO KEY UPDATE
)
UPDATE {schema}.runs AS r SET status = %(status)s, error = %(error)s,
    lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL, updated_at = {now},
    finished_at = {now}, blocked_by = NULL
FROM o WHERE r.id = o.id
RETURNING {drop_buffered_r}, {child_ended_r},
    CASE WHEN o.held AND r.limit_key1 IS NOT NULL THEN ARRAY[r.limit_key1, r.limit_key2] END,
    CASE WHEN %(release)s::boolean AND o.held THEN {release_r} END,
    CASE WHEN NOT o.held AND o.free AND r.limit_key1 IS NOT NULL THEN {schema}.pass_turn(
        ARRAY[r.limit_key1, r.limit_key2], ARRAY[r.limit_max1, r.limit_max2], {now},
        {wake_channel}) END,
    {notify_done_r}

-- name: cancel_below
-- The cancel cascade, after end_fenced or end_unfenced cancelled run id, in
-- the same transaction: every unfinished run below it, cancelled as a cancel
-- of each would (lease broken, buffered events dropped), not woken parents
-- (theirs are cancelled too). Rows are locked top down (by depth), as child
-- ends lock parents before children, so neither waits for the other in a
-- cycle. Its snapshot is taken after the run's own lock, so it sees every
-- child the run started; a child started by a run below, committed after
-- this snapshot but before that run was locked here, is found by the next
-- call: the caller repeats it until it cancels nothing (a run it cancelled
-- starts no child after: start_child waits for its lock, then finds it
-- cancelled). Returns how many it cancelled, the keys that those that
-- were running held (for the statement release), and the keys and maxes of
-- those that were free to be claimed (for the statement pass_turn), and
-- sends one finish hint for the runs it cancelled (a chunk of them).
WITH RECURSIVE d AS (
    SELECT id, 1 AS depth FROM {schema}.runs WHERE parent_id = %(id)s
    UNION ALL
    SELECT c.id, d.depth + 1 FROM {schema}.runs AS c JOIN d ON c.parent_id = d.id
), l AS (
    SELECT r.id, r.status = 'running' AS held, r.blocked_by IS NULL AS free
    FROM {schema}.runs AS r JOIN d ON r.id = d.id
    WHERE r.status NOT IN {terminal} ORDER BY d.depth, r.id FOR NO KEY UPDATE OF r
), u AS (
    UPDATE {schema}.runs AS r SET status = 'cancelled', lease_expires_at = NULL,
        wake_at = NULL, waiting_for = NULL, updated_at = {now}, finished_at = {now},
        blocked_by = NULL
    FROM l WHERE r.id = l.id
    RETURNING r.id, {drop_buffered_r},
        CASE WHEN l.held THEN ARRAY[r.limit_key1, r.limit_key2] END AS keys,
        CASE WHEN NOT l.held AND l.free THEN ARRAY[r.limit_key1, r.limit_key2] END AS turn_keys,
        CASE WHEN NOT l.held AND l.free THEN ARRAY[r.limit_max1, r.limit_max2] END AS turn_maxes
), ended AS (SELECT id FROM u
) SELECT count(*), (SELECT array_agg(k) FROM u, unnest(u.keys) AS k WHERE k IS NOT NULL),
    (SELECT array_agg(t.k ORDER BY t.k) FROM u, unnest(u.turn_keys, u.turn_maxes) AS t(k, m)
        WHERE t.k IS NOT NULL),
    (SELECT array_agg(t.m ORDER BY t.k) FROM u, unnest(u.turn_keys, u.turn_maxes) AS t(k, m)
        WHERE t.k IS NOT NULL),
    {notify_done_many}
FROM u

-- name: sleep
-- The step keeps its own wake_at (fixed when the sleep is first reached) and
-- comes back; the run is due then, or at its deadline if that comes first
-- (least() skips a NULL deadline), and the notification says when the run is due.
WITH prev AS (
    SELECT wake_at FROM {schema}.steps WHERE run_id = %(id)s AND name = %(name)s
        AND status = 'sleeping' AND wake_at IS NOT NULL
), w AS (
    SELECT coalesce((SELECT wake_at FROM prev), {now} + %(duration)s) AS step_wake_at
), u AS (
    UPDATE {schema}.runs SET status = 'sleeping',
        wake_at = least(w.step_wake_at, deadline_at),
        lease_expires_at = NULL, updated_at = {now}
    FROM w WHERE {fence}
    RETURNING id, workflow, wake_at, w.step_wake_at, limit_key1, limit_key2
), st AS (
    {insert_step}
    SELECT u.id, %(name)s::text, 'sleeping', NULL, NULL, 1, u.step_wake_at, {now} FROM u
    WHERE NOT EXISTS (SELECT 1 FROM prev) {upsert_step}
) SELECT u.step_wake_at, {notify_at}, {release_u} FROM u

-- wait_run, take_event and deliver_event lock the run row first, in a
-- statement of their own: the statements after it then see every event
-- committed before the lock was granted.

-- name: lock_fenced
SELECT workflow FROM {schema}.runs WHERE {fence} FOR NO KEY UPDATE

-- name: lock_run
SELECT status, waiting_for, workflow FROM {schema}.runs WHERE id = %(id)s FOR NO KEY UPDATE

-- name: wait
-- The step and the result keep the wait's own deadline (NULL: none); a run
-- that waits is due then, or at its deadline_at if that comes first (least()
-- skips NULLs), and the notification says when the run is due.
WITH prev AS (
    SELECT wake_at FROM {schema}.steps WHERE run_id = %(id)s AND name = %(name)s
        AND status = 'waiting'
), d AS (
    SELECT CASE WHEN EXISTS (SELECT 1 FROM prev) THEN (SELECT wake_at FROM prev)
            ELSE {now} + %(timeout)s::interval END AS deadline,
        EXISTS (SELECT 1 FROM {schema}.events WHERE run_id = %(id)s AND name = %(event)s
            AND taken_at IS NULL) AS ready,
        EXISTS (SELECT 1 FROM prev) AS seen
), u AS (
    UPDATE {schema}.runs SET
        status = CASE WHEN d.ready THEN status ELSE 'waiting' END,
        waiting_for = CASE WHEN d.ready THEN NULL ELSE %(event)s END,
        wake_at = CASE WHEN d.ready THEN NULL ELSE least(d.deadline, deadline_at) END,
        lease_expires_at = CASE WHEN d.ready THEN lease_expires_at END,
        updated_at = {now}
    FROM d WHERE id = %(id)s RETURNING workflow, wake_at, limit_key1, limit_key2
), st AS (
    {insert_step}
    SELECT %(id)s, %(name)s::text, 'waiting', NULL, NULL, 1, d.deadline, {now} FROM d
    WHERE NOT d.seen {upsert_step}
) SELECT d.ready, d.deadline,
    CASE WHEN NOT d.ready AND u.wake_at IS NOT NULL THEN {notify_at} END,
    CASE WHEN NOT d.ready THEN {release_u} END
FROM d, u

-- name: take
WITH done AS (
    SELECT output FROM {schema}.steps WHERE run_id = %(id)s AND name = %(name)s
        AND status = 'completed'
), ev AS (
    SELECT id, payload FROM {schema}.events WHERE run_id = %(id)s AND name = %(event)s
        AND taken_at IS NULL AND NOT EXISTS (SELECT 1 FROM done) ORDER BY id LIMIT 1
), t AS (
    UPDATE {schema}.events SET taken_at = {now} WHERE id IN (SELECT id FROM ev)
), st AS (
    {insert_step}
    SELECT %(id)s, %(name)s::text, 'completed', ev.payload, NULL, 1, NULL, {now}
    FROM ev {upsert_step}
), u AS (
    UPDATE {schema}.runs SET waiting_for = NULL, updated_at = {now},
        buffered = greatest(buffered - 1, 0)
    WHERE id = %(id)s AND EXISTS (SELECT 1 FROM ev)
) SELECT EXISTS (SELECT 1 FROM done), (SELECT output FROM done),
    (SELECT payload FROM ev)

-- name: deliver
-- Runs after lock_run, which serializes deliveries and takes on the run, so
-- the check (a repeated id, then the run's count of buffered events against
-- the cap) and the write see the same events. An event stored counts in
-- runs.buffered and, for a run waiting for it, makes the run due. Returns
-- (repeated id, stored, notifications sent).
WITH seen AS (
    SELECT EXISTS (SELECT 1 FROM {schema}.events WHERE run_id = %(id)s
        AND event_id = %(event_id)s::text) AS dup
), go AS (
    SELECT NOT seen.dup AND (%(cap)s::bigint IS NULL OR r.buffered < %(cap)s::bigint) AS ok
    FROM seen, {schema}.runs AS r WHERE r.id = %(id)s
), ins AS (
    INSERT INTO {schema}.events (run_id, name, payload, event_id, created_at)
    SELECT %(id)s::text, %(event)s::text, %(payload)s::text, %(event_id)s::text, {now}
    FROM go WHERE go.ok
    ON CONFLICT (run_id, event_id) WHERE event_id IS NOT NULL DO NOTHING RETURNING id
), u AS (
    UPDATE {schema}.runs SET buffered = buffered + 1,
        wake_at = CASE WHEN status = 'waiting' AND waiting_for = %(event)s THEN {now}
            ELSE wake_at END,
        updated_at = CASE WHEN status = 'waiting' AND waiting_for = %(event)s THEN {now}
            ELSE updated_at END
    WHERE id = %(id)s AND EXISTS (SELECT 1 FROM ins)
    RETURNING workflow, status = 'waiting' AND waiting_for = %(event)s AS woke
), woken AS (SELECT {notify} FROM u WHERE u.woke
) SELECT seen.dup, go.ok, (SELECT count(*) FROM woken) FROM seen, go

-- Child runs --------------------------------------------------------------------

-- name: start_child
-- Fenced on the parent's lease, whose row it locks (FOR SHARE: children
-- start side by side, but a cancel of the parent waits for them, and one
-- that came first makes the fence fail here, so its cascade misses no
-- child). The child is created as create creates a run, with the parent's
-- link and a deadline no later than the parent's (least() skips NULLs). A
-- run that exists with the id is left alone. Returns one row: the child's
-- columns and whether this statement inserted it (all NULL when it did not),
-- then whether the lease held.
WITH p AS (
    SELECT deadline_at FROM {schema}.runs WHERE {fence} FOR SHARE
), v AS (
    SELECT least({now} + %(deadline)s::interval, p.deadline_at) AS deadline_at FROM p
), ins AS (
    INSERT INTO {schema}.runs (id, workflow, status, input, created_at, updated_at, wake_at,
        deadline_at, parent_id, parent_step, priority, limit_key1, limit_max1, limit_key2,
        limit_max2, rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2,
        debounce_key, headers, version, fingerprint)
    SELECT %(child)s::text, %(workflow)s::text, {new_status}, %(input)s::text, {now}, {now},
        least({now} + coalesce(%(delay)s::interval, interval '0'), v.deadline_at),
        v.deadline_at, %(id)s::text, %(step)s::text, {limit_values} FROM v
    ON CONFLICT (id) DO NOTHING
    RETURNING {read_columns}, true AS inserted
) SELECT ins.*, EXISTS (SELECT 1 FROM p), CASE WHEN ins.id IS NOT NULL THEN {notify_ins} END
FROM (SELECT) AS one LEFT JOIN ins ON true

-- name: wait_children
-- Runs after lock_fenced, so its snapshot sees every child end committed
-- before (a child's end locks its parent first, see lock_parent): the run
-- keeps its lease if none of its children at the step is open, else waits,
-- due at its deadline (NULL: none) unless its last child wakes it first.
WITH open AS (
    SELECT EXISTS (SELECT 1 FROM {schema}.runs WHERE parent_id = %(id)s
        AND parent_step = %(name)s
        AND status IN ('pending', 'running', 'sleeping', 'waiting')) AS busy
), u AS (
    UPDATE {schema}.runs SET
        status = CASE WHEN o.busy THEN 'waiting' ELSE status END,
        waiting_for = CASE WHEN o.busy THEN %(waiting_for)s ELSE waiting_for END,
        wake_at = CASE WHEN o.busy THEN deadline_at ELSE wake_at END,
        lease_expires_at = CASE WHEN o.busy THEN NULL ELSE lease_expires_at END,
        updated_at = {now}
    FROM open AS o WHERE id = %(id)s RETURNING workflow, wake_at, limit_key1, limit_key2
), st AS (
    {insert_step}
    VALUES (%(id)s, {step_values}) {upsert_step}
) SELECT NOT o.busy, CASE WHEN o.busy AND u.wake_at IS NOT NULL THEN {notify_at} END,
    CASE WHEN o.busy THEN {release_u} END
FROM open AS o, u

-- name: list_children
-- Through runs_children; none for a missing run, whose children may remain.
SELECT {read_columns} FROM {schema}.runs
WHERE parent_id = %(id)s AND EXISTS (SELECT 1 FROM {schema}.runs WHERE id = %(id)s)
ORDER BY created_at, id

-- name: get_steps
SELECT {step_read_columns} FROM {schema}.steps WHERE run_id = %(id)s ORDER BY seq

-- name: list_runs
-- list_runs adds a WHERE clause of the filters it is given (list_by_status,
-- list_by_workflow, list_after, joined by AND) before list_runs_order.
SELECT {read_columns} FROM {schema}.runs

-- name: list_by_status
-- %(stored)s holds the stored statuses of %(statuses)s (delayed is stored as
-- sleeping): a condition on the column itself, whose statistics tell the
-- planner how many runs have the status (so that, for the pending runs of a
-- long queue, it walks runs_created from the newest and stops at the limit
-- rather than reading and sorting the whole table); protocol_status then
-- tells delayed runs from sleeping ones.
status = ANY(%(stored)s::text[]) AND {protocol_status} = ANY(%(statuses)s)

-- name: list_by_workflow
workflow = %(workflow)s

-- name: list_after
(created_at, id) < (%(after_at)s, %(after_id)s)

-- name: list_runs_order
ORDER BY created_at DESC, id DESC LIMIT %(limit)s

-- name: requeue
-- A requeued run starts with an empty buffer (its events were dropped when it
-- ended; runs.buffered is only kept up to date while a run lives) and has no
-- deadline. A run never claimed that holds a debounce key is open again, for
-- debounced creates, unless another open run holds the key already: then it
-- lets go of its key (runs_debounce holds one open run per key).
WITH u AS (
    UPDATE {schema}.runs AS r SET status = 'pending', error = NULL, reclaims = 0,
        wake_at = {now}, waiting_for = NULL, lease_expires_at = NULL, updated_at = {now},
        finished_at = NULL, buffered = 0, deadline_at = NULL, blocked_by = NULL,
        debounce_key = CASE WHEN r.debounce_key IS NOT NULL AND r.attempts = 0
            AND EXISTS (SELECT 1 FROM {schema}.runs AS o WHERE o.workflow = r.workflow
                AND o.debounce_key = r.debounce_key AND o.attempts = 0
                AND o.status IN ('pending', 'sleeping'))
            THEN NULL ELSE r.debounce_key END
    WHERE r.id = %(id)s AND r.status IN ('failed', 'cancelled') RETURNING r.id, r.workflow
), d AS (
    DELETE FROM {schema}.steps WHERE run_id IN (SELECT id FROM u) AND status = 'failed'
) SELECT {notify} FROM u

-- name: purge
-- One batch of purge_finished: the oldest finished runs first.
WITH doomed AS (
    SELECT id FROM {schema}.runs WHERE status IN {terminal}
        AND finished_at < {now} - %(age)s ORDER BY finished_at LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
), st AS (DELETE FROM {schema}.steps WHERE run_id IN (SELECT id FROM doomed)
), ev AS (DELETE FROM {schema}.events WHERE run_id IN (SELECT id FROM doomed)
) DELETE FROM {schema}.runs WHERE id IN (SELECT id FROM doomed)


-- Schedules ---------------------------------------------------------------------

-- name: upsert_schedule
-- A schedule it replaces keeps its paused flag; a new one is not paused.
INSERT INTO {schema}.schedules AS sc ({schedule_columns})
VALUES (%(key)s, %(workflow)s, %(input)s, %(recurrence)s, %(next_run_at)s, {now}, {now},
    false)
ON CONFLICT (key) DO UPDATE SET workflow = EXCLUDED.workflow,
    input = EXCLUDED.input,
    next_run_at = CASE WHEN sc.recurrence = EXCLUDED.recurrence THEN sc.next_run_at
        ELSE EXCLUDED.next_run_at END,
    recurrence = EXCLUDED.recurrence, updated_at = {now}
RETURNING {schedule_columns}

-- name: delete_schedule
DELETE FROM {schema}.schedules WHERE key = %(key)s

-- name: list_schedules
SELECT {schedule_columns} FROM {schema}.schedules ORDER BY key

-- name: due_schedules
-- Walks schedules_due, which holds the schedules that are not paused.
SELECT {schedule_columns} FROM {schema}.schedules WHERE next_run_at <= {now} AND NOT paused
ORDER BY next_run_at, key LIMIT %(limit)s

-- name: due_schedules_of
-- The due schedules of the named workflows only: for each of them, the head
-- of its range of schedules_workflow_due (not paused), up to the limit; the
-- first limit of them all, merged. Schedules of other workflows are never read.
SELECT s.* FROM {flows} CROSS JOIN LATERAL (
    SELECT {schedule_columns} FROM {schema}.schedules
    WHERE workflow = w.name AND next_run_at <= {now} AND NOT paused
    ORDER BY next_run_at, key LIMIT %(limit)s
) AS s ORDER BY s.next_run_at, s.key LIMIT %(limit)s

-- name: claim_slot
-- Advances the schedule from the slot and creates its run, in one statement:
-- no run without the advance, and only one claimant wins the slot. A paused
-- schedule fires nothing.
WITH adv AS (
    UPDATE {schema}.schedules SET next_run_at = %(next_run_at)s, updated_at = {now}
    WHERE key = %(key)s AND next_run_at = %(slot)s AND NOT paused RETURNING key
), ins AS (
    {insert_run}
    SELECT %(id)s::text, %(workflow)s::text, {new_status}, %(input)s::text, %(idem)s::text,
        {now}, {now}, {new_wake_at}, {now} + %(deadline)s::interval, {limit_values} FROM adv
    {on_idempotency_key}
) SELECT ins.*, CASE WHEN ins.inserted THEN {notify_ins} END FROM ins

-- name: claim_slot_debounced
-- claim_slot for a run with a debounce key: it updates the workflow's open
-- run with the key, if there is one, as create_debounced does.
WITH adv AS (
    UPDATE {schema}.schedules SET next_run_at = %(next_run_at)s, updated_at = {now}
    WHERE key = %(key)s AND next_run_at = %(slot)s AND NOT paused RETURNING key
), ins AS (
    {insert_run}
    SELECT %(id)s::text, %(workflow)s::text, {new_status}, %(input)s::text, %(idem)s::text,
        {now}, {now}, {new_wake_at}, {now} + %(deadline)s::interval, {limit_values} FROM adv
    {on_debounce_key}
) SELECT ins.*, {notify_ins} FROM ins


-- name: set_schedule_paused
-- With a null next_run_at the next slot stays where it is.
UPDATE {schema}.schedules SET paused = %(paused)s,
    next_run_at = coalesce(%(next_run_at)s::timestamptz, next_run_at), updated_at = {now}
WHERE key = %(key)s RETURNING {schedule_columns}


-- Workers -----------------------------------------------------------------------

-- name: announce_worker
-- Enters or refreshes the worker; started_at is kept from a live entry only.
-- Lapsed entries of other workers go in the same statement, through the
-- index on expires_at; SKIP LOCKED leaves alone an entry another announcement
-- holds (it is being refreshed, or another announcer deletes it), so two
-- announcers never wait for each other.
WITH lapsed AS (
    SELECT id FROM {schema}.workers WHERE expires_at <= {now} AND id <> %(id)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {schema}.workers WHERE id IN (SELECT id FROM lapsed)
)
INSERT INTO {schema}.workers AS w ({worker_columns})
VALUES (%(id)s, %(host)s, %(pid)s, %(workflows)s, %(concurrency)s, %(in_flight)s, {now},
    {now}, {now} + %(ttl)s)
ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,
    workflows = EXCLUDED.workflows, concurrency = EXCLUDED.concurrency,
    in_flight = EXCLUDED.in_flight,
    started_at = CASE WHEN w.expires_at > {now} THEN w.started_at
        ELSE EXCLUDED.started_at END,
    last_seen_at = EXCLUDED.last_seen_at, expires_at = EXCLUDED.expires_at
RETURNING {worker_columns}

-- name: list_workers
SELECT {worker_columns} FROM {schema}.workers WHERE expires_at > {now}
ORDER BY started_at, id

-- name: remove_worker
-- Deletes the entry, lapsed or not; it was there only if it was live.
DELETE FROM {schema}.workers WHERE id = %(id)s RETURNING expires_at > {now}


-- Queue statistics --------------------------------------------------------------

-- queue_stats counts the unfinished runs through the partial indexes that
-- hold exactly them: runs_ready (pending), runs_due (sleeping, waiting, and
-- delayed, stored as sleeping: see protocol_status), runs_blocked (blocked
-- ones of those) and runs_running. Each branch's WHERE is its index's
-- predicate, so none reads a finished run, however long the history. Rows
-- are (workflow, status, count, earliest wake_at of the pending ones), as
-- reflow_core.adapter.queue_stats_from_counts takes them.

-- name: stats_ready
SELECT workflow, status, attempts, wake_at FROM {schema}.runs
WHERE status = 'pending' AND blocked_by IS NULL

-- name: stats_timed
SELECT workflow, status, attempts, wake_at FROM {schema}.runs
WHERE status IN ('sleeping', 'waiting') AND blocked_by IS NULL

-- name: stats_blocked
SELECT workflow, status, attempts, wake_at FROM {schema}.runs WHERE blocked_by IS NOT NULL

-- name: stats_running
SELECT workflow, 'running'::text, count(*), NULL::timestamptz
FROM {schema}.runs WHERE status = 'running'

-- name: stats_due_of
-- The unfinished runs that are not running, counted (with u, the union of
-- their three indexes' branches).
SELECT workflow, {protocol_status}, count(*),
    min(CASE WHEN wake_at > {latest} THEN {latest} ELSE wake_at END)
        FILTER (WHERE status = 'pending')
FROM

-- name: queue_stats
{stats_due_of} ({stats_ready} UNION ALL {stats_timed} UNION ALL {stats_blocked}) AS u
GROUP BY 1, 2
UNION ALL
{stats_running} GROUP BY workflow

-- name: queue_stats_of
-- The named workflows only.
{stats_due_of} ({stats_ready} AND workflow = ANY(%(workflows)s)
    UNION ALL {stats_timed} AND workflow = ANY(%(workflows)s)
    UNION ALL {stats_blocked} AND workflow = ANY(%(workflows)s)) AS u
GROUP BY 1, 2
UNION ALL
{stats_running} AND workflow = ANY(%(workflows)s) GROUP BY workflow


-- Dashboard reads ---------------------------------------------------------------

-- name: find_by_key
-- The runs created with an idempotency key, of every workflow, newest first:
-- one walk of runs_key_created, backwards from the key's newest entry,
-- stopped at the limit.
SELECT {read_columns} FROM {schema}.runs WHERE idempotency_key = %(key)s
ORDER BY created_at DESC, id DESC LIMIT %(limit)s

-- name: list_buffered
-- A run's untaken events, of every name, in arrival order: by id, since the
-- deliveries to a run are serialized by its row's lock (see deliver), which
-- is the order take takes each name's events in. b reads the run's entries
-- of events_buffered (MATERIALIZED, so that the planner never walks the
-- primary key in id order hoping to meet them early); a finished run holds
-- none, since the statement that ended it dropped them.
WITH b AS MATERIALIZED (
    SELECT id, name, payload, event_id FROM {schema}.events
    WHERE run_id = %(id)s AND taken_at IS NULL
) SELECT name, payload, event_id FROM b ORDER BY id LIMIT %(limit)s

-- name: finished_history
-- The runs that finished in each of the last %(minutes)s minutes by the
-- storage clock, the current one included, counted by status: rows of
-- (minute, status, count), minutes truncated in UTC (the connection's TimeZone
-- does not matter), as reflow_core.adapter.finished_minutes_from_counts
-- takes them. One range of runs_finished: finished_at is set by the
-- statement that ends a run and cleared by a requeue (a purged run is gone),
-- so the cost follows the runs that finished in the window, never the rest
-- of the history.
SELECT date_trunc('minute', finished_at, 'UTC'), status, count(*) FROM {schema}.runs
WHERE finished_at >= date_trunc('minute', {now}, 'UTC')
        - (%(minutes)s::integer - 1) * interval '1 minute'
    AND finished_at < date_trunc('minute', {now}, 'UTC') + interval '1 minute'
    AND status IN {terminal}
GROUP BY 1, 2


-- The clock and wake-ups --------------------------------------------------------

-- name: now
SELECT {now}

-- name: next_due
-- Sleeping runs include the delayed ones (see protocol_status): the first
-- entry after now of each workflow's range of runs_due. A rate wait (of any
-- workflow's runs: it names no workflow) wakes the workers when it falls
-- due, so the next claim releases the runs it holds.
SELECT extract(epoch FROM least(
    (SELECT min(n.wake_at) FROM {flows} CROSS JOIN LATERAL (
        SELECT wake_at FROM {schema}.runs
        WHERE workflow = w.name AND status IN ('sleeping', 'waiting') AND blocked_by IS NULL
            AND wake_at > {now}
        ORDER BY wake_at LIMIT 1) AS n),
    (SELECT min(due_at) FROM {schema}.rate_waits WHERE due_at > {now})) - {now})
