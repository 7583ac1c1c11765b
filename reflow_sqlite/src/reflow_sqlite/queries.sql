-- Every statement reflow-sqlite runs, by name, loaded once at import
-- (reflow_core.adapter.load_queries). Values are always "?" parameters.
--
-- Slots: {run_columns}, {step_columns}, {schedule_columns} and
-- {worker_columns} are the column orders of reflow_core.adapter; {fence},
-- {not_terminal} and {due_by_deadline} are the fragments below. A few statements keep a slot
-- filled per call, with "?" placeholders or a fixed value only:
-- {workflows}, {ids} and {statuses} (one "?" per value of a list), {arms}
-- (the statement of the same name and "_arm", once per workflow, joined by
-- UNION ALL), {served} (the versions a claim serves: empty when it takes
-- every version, see claim_lapsed_served and claim_due), {where}
-- (the optional filters of list_runs), {level}, {application_id} and
-- {version} (pragmas, which take no parameters).

-- name: begin_write
BEGIN IMMEDIATE

-- name: commit
COMMIT

-- name: rollback
ROLLBACK

-- -- fragments ---------------------------------------------------------------

-- The fence: still running under the same epoch, and the lease has not
-- lapsed by the storage clock. Parameters: run id, epoch, now.
-- name: fence
id = ? AND status = 'running' AND lease_epoch = ? AND lease_expires_at > ?

-- name: not_terminal
status NOT IN ('completed', 'failed', 'cancelled')

-- When a sleeping or waiting run becomes claimable: at the given wake_at
-- (NULL: only an event wakes it) or at the run's deadline_at if that comes
-- first (reflow_core.adapter.due_by_deadline). SQLite's min() of several
-- values is NULL if any is. Parameters: the wake_at, the same again.
-- name: due_by_deadline
coalesce(min(?, deadline_at), ?, deadline_at)

-- -- the file ----------------------------------------------------------------

-- name: inspect
SELECT (SELECT application_id FROM pragma_application_id()),
       (SELECT user_version FROM pragma_user_version()),
       (SELECT count(*) FROM sqlite_master)

-- name: journal_wal
PRAGMA journal_mode = WAL

-- The level is one of SYNCHRONOUS_LEVELS.
-- name: set_synchronous
PRAGMA synchronous = {level}

-- name: set_application_id
PRAGMA application_id = {application_id}

-- name: set_user_version
PRAGMA user_version = {version}

-- name: checkpoint
PRAGMA wal_checkpoint(TRUNCATE)

-- -- runs --------------------------------------------------------------------

-- The status is 'pending' (wake_at: now) or 'delayed' (wake_at: now plus
-- the delay, or the deadline_at if that is earlier).
-- name: insert_run
INSERT INTO runs (id, workflow, status, input, idempotency_key, created_at, updated_at, wake_at,
    deadline_at, priority, limit_key1, limit_max1, limit_key2, limit_max2,
    rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2, debounce_key,
    headers, version, fingerprint)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (workflow, idempotency_key) DO NOTHING
RETURNING {run_columns}

-- create_runs: many runs without a debounce key in one statement, {rows}
-- holding one "(?, ...)" of the 23 values below per run (as insert_run's,
-- less debounce_key). A run whose idempotency key is taken is left out;
-- each row returned is the id of a run inserted.
-- name: insert_runs
INSERT INTO runs (id, workflow, status, input, idempotency_key, created_at, updated_at, wake_at,
    deadline_at, priority, limit_key1, limit_max1, limit_key2, limit_max2,
    rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2, headers,
    version, fingerprint)
VALUES {rows}
ON CONFLICT (workflow, idempotency_key) DO NOTHING
RETURNING id

-- create_runs: which of the caller-chosen run ids ({ids}) are taken.
-- name: taken_ids
SELECT id FROM runs WHERE id IN ({ids})

-- create_runs: the runs holding idempotency keys, {keys} holding one
-- "(?, ?)" of workflow and key each; one seek per key in the
-- (workflow, idempotency_key) index (CROSS JOIN keeps the list outside).
-- name: runs_by_keys
WITH wanted (w, k) AS (VALUES {keys})
SELECT {run_columns} FROM wanted CROSS JOIN runs ON workflow = w AND idempotency_key = k

-- The workflow's open run with a debounce key (pending or delayed, never
-- claimed): one seek in runs_debounce, whose WHERE this one names word for
-- word. Parameters: the workflow, the debounce key.
-- name: open_debounced
SELECT {run_columns} FROM runs
WHERE workflow = ? AND debounce_key = ?
    AND debounce_key IS NOT NULL AND attempts = 0 AND status IN ('pending', 'delayed')

-- A debounced create: the open run takes the new input, priority, limits,
-- rates, headers, version and fingerprint, is no longer blocked and is due
-- again (status and wake_at as reflow_core.adapter.debounced_record
-- computes them); its id, created_at and deadline_at stay. Parameters:
-- status, input, priority, the four limit columns, the six rate columns,
-- headers, version, fingerprint, wake_at, now, the run id.
-- name: debounce_run
UPDATE runs SET status = ?, input = ?, priority = ?,
    limit_key1 = ?, limit_max1 = ?, limit_key2 = ?, limit_max2 = ?,
    rate_key1 = ?, rate_max1 = ?, rate_period1 = ?, rate_key2 = ?, rate_max2 = ?,
    rate_period2 = ?, headers = ?, version = ?, fingerprint = ?, blocked_by = NULL,
    wake_at = ?, updated_at = ?
WHERE id = ?
RETURNING {run_columns}

-- name: run_by_key
SELECT {run_columns} FROM runs WHERE workflow = ? AND idempotency_key = ?

-- name: get_run
SELECT {run_columns} FROM runs WHERE id = ?

-- get_runs: the runs among {ids}, one seek in the primary key per id. The
-- ids are padded (by repeating one) to a power of two, so the statement has
-- a few shapes only; an id given twice in IN () matches its run once.
-- name: get_runs
SELECT {run_columns} FROM runs WHERE id IN ({ids})

-- Lapsed leases first, so a backlog cannot starve a dead worker's runs, then
-- everything else by priority (highest first), then due time (a due delayed
-- run like a due sleeping one); ties broken by id. claim_lapsed seeks
-- runs_lease once per workflow ({workflows}, one "?" each) and reads only
-- its lapsed leases (never the running runs whose lease is live, nor any
-- run of another workflow), then sorts them: lapsed leases are runs that
-- were claimed, so there are never more than the dead workers held.
-- INDEXED BY makes the index a guarantee (the planner could otherwise take
-- another index that leads with the workflow, and read and sort every run
-- of it, history included). Each row: the id and the rate columns (a
-- lapsed lease is held to its rates). Parameters: the workflows, now, the
-- count.
-- name: claim_lapsed
SELECT id, rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2
FROM runs INDEXED BY runs_lease
WHERE workflow IN ({workflows}) AND status = 'running' AND lease_expires_at <= ?
ORDER BY lease_expires_at, id LIMIT ?

-- claim_lapsed for a claim that serves some versions only of some of its
-- workflows: {served} is " AND CASE workflow WHEN ? THEN version IN (?, ...)
-- ... ELSE 1 END", one WHEN for each such workflow (the workflow, then its
-- versions), so a lapsed lease of a version not served is passed over in
-- the same walk of runs_lease (it does not count towards the LIMIT) and
-- left as it is. Parameters: the workflows, now, those of {served}, the count.
-- name: claim_lapsed_served
SELECT id, rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2
FROM runs INDEXED BY runs_lease
WHERE workflow IN ({workflows}) AND status = 'running' AND lease_expires_at <= ?{served}
ORDER BY lease_expires_at, id LIMIT ?

-- The due runs a claim looks at, in claim order, up to a count, in two
-- parts merged (heads) and cut at the count again. Pending runs: {arms}
-- holds claim_due_arm once per workflow served, joined by UNION ALL; each
-- arm walks runs_pending from the workflow's first entry, which is in claim
-- order, and stops at the count, however long the workflow's backlog. Due
-- delayed, sleeping and waiting runs: one seek per workflow ({workflows},
-- one "?" each) in runs_due, which is by due time, reads only those due
-- (never the ones sleeping into the future) and sorts them. So a claim
-- never reads a run of a workflow it does not serve, and reads its own
-- pending runs only as far as it takes. Each WHERE names its index's WHERE
-- word for word (SQLite uses a partial index only for a query that implies
-- it), so blocked runs, which neither index holds, are never read; INDEXED
-- BY makes the index a guarantee. The arms are merged in a table of their
-- own (MATERIALIZED), which costs one sort of the rows they read; merged
-- as a compound SELECT, every arm would open a sort of its own. Each row:
-- the id, priority, wake_at, limit columns and rate columns. Parameters:
-- for each workflow, it, now and the count; then the workflows, now, the
-- count; then the count.
--
-- A claim that serves some versions only of a workflow fills the {served}
-- of its arm with " AND version IN (?, ...)" (its versions, after now),
-- and the {served} of the due timed runs as claim_lapsed_served's (after
-- now): a filter on the rows the same walks of the same indexes read, so
-- the runs of other versions are passed over, never blocked nor changed,
-- and never take the place of a run it serves (the LIMIT counts the runs
-- it serves). Empty for a claim of every version: the statement is then
-- the same as without versions.
-- name: claim_due_arm
SELECT * FROM (
    SELECT id, priority, wake_at, limit_key1, limit_max1, limit_key2, limit_max2,
        rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2
    FROM runs INDEXED BY runs_pending
    WHERE workflow = ? AND status = 'pending' AND blocked_by IS NULL AND wake_at <= ?{served}
    ORDER BY priority DESC, wake_at, id LIMIT ?
)

-- name: claim_due
WITH heads AS MATERIALIZED (
    {arms}
    UNION ALL
    SELECT * FROM (
        SELECT id, priority, wake_at, limit_key1, limit_max1, limit_key2, limit_max2,
            rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2
        FROM runs INDEXED BY runs_due
        WHERE workflow IN ({workflows}) AND status IN ('delayed', 'sleeping', 'waiting')
            AND blocked_by IS NULL AND wake_at <= ?{served}
        ORDER BY priority DESC, wake_at, id LIMIT ?
    )
)
SELECT * FROM heads ORDER BY priority DESC, wake_at, id LIMIT ?

-- How many running runs (lapsed leases included) hold a limit key: two
-- index-only seeks, in runs_holding1 and runs_holding2. Parameters: the
-- key, the key again.
-- name: holders
SELECT (SELECT count(*) FROM runs WHERE status = 'running' AND limit_key1 = ?)
     + (SELECT count(*) FROM runs WHERE status = 'running' AND limit_key2 = ?)

-- The running holders of several keys at once (the keys a claim's
-- candidates hold, each in {ids}, given twice): key, count, for the keys
-- that have holders.
-- name: holders_of
SELECT key, count(*) FROM (
    SELECT limit_key1 AS key FROM runs WHERE status = 'running' AND limit_key1 IN ({ids})
    UNION ALL
    SELECT limit_key2 FROM runs WHERE status = 'running' AND limit_key2 IN ({ids})
) GROUP BY key

-- A claimable run passed over because its limit of that key is full: it
-- leaves runs_pending or runs_due for runs_blocked. Parameters: the key,
-- now, the run id.
-- name: block
UPDATE runs SET blocked_by = ?, updated_at = ? WHERE id = ?

-- A run holding the key stopped running: the run blocked by it that a
-- claim would take first (one seek in runs_blocked) is claimable again.
-- Parameters: now, the key.
-- name: unblock
UPDATE runs SET blocked_by = NULL, updated_at = ?
WHERE id = (
    SELECT id FROM runs WHERE blocked_by = ? ORDER BY priority DESC, wake_at, id LIMIT 1
)

-- -- rate limits -------------------------------------------------------------

-- The rate keys whose blocked runs may go again: one probe of rate_waits_at,
-- empty (and cheap) when no key waits. Parameters: now.
-- name: due_rate_waits
SELECT key FROM rate_waits WHERE at <= ? ORDER BY at, key

-- name: drop_rate_wait
DELETE FROM rate_waits WHERE key = ?

-- A key's wait, set when it is released and some of its runs stay blocked.
-- Parameters: the key, the time.
-- name: set_rate_wait
INSERT INTO rate_waits (key, at) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET at = excluded.at

-- A claim blocked runs of the key: the wait is the earlier of the one
-- already set and the given time. Parameters: the key, the time.
-- name: wait_rate
INSERT INTO rate_waits (key, at) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET at = min(at, excluded.at)

-- The rate columns of the blocked run of a key that a claim would take
-- first (one seek in runs_blocked; none when no run is blocked by it).
-- Parameters: the blocked_by value.
-- name: first_blocked_rates
SELECT rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2 FROM runs
WHERE blocked_by = ? ORDER BY priority DESC, wake_at, id LIMIT 1

-- The first blocked runs of a key, as many as its window has room for, are
-- claimable again. Parameters: now, the blocked_by value, the count.
-- name: unblock_some
UPDATE runs SET blocked_by = NULL, updated_at = ?
WHERE id IN (
    SELECT id FROM runs WHERE blocked_by = ? ORDER BY priority DESC, wake_at, id LIMIT ?
)
RETURNING 1

-- A key's claims in the window of a period ending now: how many, and the
-- oldest (an index-only range scan of rate_claims_key). Parameters: the
-- key, now minus the period.
-- name: rate_window
SELECT count(*), min(at) FROM rate_claims WHERE key = ? AND at > ?

-- The n-th oldest claim of a key in the window (from 0): when the window
-- has room again, a period after it. Parameters: the key, now minus the
-- period, n.
-- name: rate_nth
SELECT at FROM rate_claims WHERE key = ? AND at > ? ORDER BY at LIMIT 1 OFFSET ?

-- A claim trims its key's claims that left every window. Parameters: the
-- key, now minus the period.
-- name: trim_rate_claims
DELETE FROM rate_claims WHERE key = ? AND at <= ?

-- Records n claims of a key at a time. Parameters: n, the key, the time.
-- name: record_rate_claims
WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
INSERT INTO rate_claims (key, at) SELECT ?, ? FROM n

-- Column references on the right-hand side see the row before the update,
-- so a lapsed lease (status still 'running') counts as a reclaim.
-- name: claim_update
UPDATE runs SET status = 'running', lease_epoch = lease_epoch + 1,
    attempts = attempts + 1, reclaims = reclaims + (status = 'running'),
    lease_expires_at = ?, wake_at = NULL, updated_at = ?
WHERE id IN ({ids})
RETURNING {run_columns}

-- name: claim_steps
SELECT run_id, {step_columns} FROM steps WHERE run_id IN ({ids}) ORDER BY rowid

-- name: extend
UPDATE runs SET lease_expires_at = ?, updated_at = ? WHERE {fence} RETURNING 1

-- Every write that stops a running run returns its limit keys (NULL for
-- none): it unblocks a run of each (unblock), a statement only a run with
-- limits pays for. Ending a run also returns its parent link: a child's end
-- may wake its parent (wake_parent), a statement only a child pays for. A
-- running run is never blocked, so the fenced writes leave blocked_by be.
-- name: finish
UPDATE runs SET status = ?, output = ?, error = ?, lease_expires_at = NULL,
    wake_at = NULL, waiting_for = NULL, updated_at = ?, finished_at = ?
WHERE {fence}
RETURNING parent_id, parent_step, limit_key1, limit_key2

-- name: hand_back
UPDATE runs SET status = 'pending', lease_expires_at = NULL, wake_at = ?, updated_at = ?
WHERE {fence}
RETURNING limit_key1, limit_key2

-- name: end_fenced
UPDATE runs SET status = ?, error = ?, lease_expires_at = NULL, wake_at = NULL,
    waiting_for = NULL, updated_at = ?, finished_at = ?
WHERE {fence}
RETURNING parent_id, parent_step, limit_key1, limit_key2

-- The run may be in any status but a terminal one: it ends unblocked. What
-- it was is read first (run_limits): a running run unblocks a run of each
-- key, one that was free to be claimed passes its turn on. Parameters:
-- status, error, now, now, run id.
-- name: end_unfenced
UPDATE runs SET status = ?, error = ?, lease_expires_at = NULL, wake_at = NULL,
    waiting_for = NULL, updated_at = ?, finished_at = ?, blocked_by = NULL
WHERE id = ? AND {not_terminal}
RETURNING parent_id, parent_step, limit_key1, limit_key2

-- name: run_limits
SELECT status, blocked_by, limit_key1, limit_max1, limit_key2, limit_max2 FROM runs WHERE id = ?

-- name: sleep
UPDATE runs SET status = 'sleeping', wake_at = {due_by_deadline}, lease_expires_at = NULL,
    updated_at = ?
WHERE {fence}
RETURNING limit_key1, limit_key2

-- name: wait
UPDATE runs SET status = 'waiting', waiting_for = ?, wake_at = {due_by_deadline},
    lease_expires_at = NULL, updated_at = ?
WHERE {fence}
RETURNING limit_key1, limit_key2

-- name: wait_ready
UPDATE runs SET waiting_for = NULL, updated_at = ? WHERE {fence} RETURNING 1

-- name: fence_check
SELECT 1 FROM runs WHERE {fence}

-- name: run_state
SELECT status, waiting_for FROM runs WHERE id = ?

-- name: wake
UPDATE runs SET wake_at = ?, updated_at = ? WHERE id = ?

-- A requeued run has no deadline. A run that was never claimed and has a
-- debounce key would be open again: if another open run of its workflow
-- holds that key (runs_debounce keeps one), it gives the key up, so the
-- other stays the one a debounced create updates. Parameters: now, now,
-- the run id.
-- name: requeue
UPDATE runs SET status = 'pending', error = NULL, reclaims = 0, wake_at = ?,
    waiting_for = NULL, lease_expires_at = NULL, updated_at = ?, finished_at = NULL,
    deadline_at = NULL,
    debounce_key = CASE WHEN debounce_key IS NOT NULL AND attempts = 0 AND EXISTS (
        SELECT 1 FROM runs AS other
        WHERE other.workflow = runs.workflow AND other.debounce_key = runs.debounce_key
            AND other.debounce_key IS NOT NULL AND other.attempts = 0
            AND other.status IN ('pending', 'delayed')
    ) THEN NULL ELSE debounce_key END
WHERE id = ? AND status IN ('failed', 'cancelled')
RETURNING 1

-- list_runs: {where} is empty or "WHERE" and the filters below joined by AND.
-- name: list_runs
SELECT {run_columns} FROM runs {where}ORDER BY created_at DESC, id DESC LIMIT ?

-- name: list_status
status IN ({statuses})

-- name: list_workflow
workflow = ?

-- name: list_after
(created_at, id) < (?, ?)

-- -- child runs ------------------------------------------------------------

-- The parent's fence, and its deadline_at (a child's is at the latest the
-- parent's). Parameters: the fence's.
-- name: parent_deadline
SELECT deadline_at FROM runs WHERE {fence}

-- A child is created as insert_run creates a run, with its parent link and
-- no idempotency key.
-- name: insert_child
INSERT INTO runs (id, workflow, status, input, created_at, updated_at, wake_at, deadline_at,
    parent_id, parent_step, priority, limit_key1, limit_max1, limit_key2, limit_max2,
    rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2, headers,
    version, fingerprint)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
RETURNING {run_columns}

-- Whether the run has a child at the step that has not ended: one seek in
-- runs_children. Parameters: the parent's id, the step.
-- name: open_child
SELECT 1 FROM runs WHERE parent_id = ? AND parent_step = ? AND finished_at IS NULL LIMIT 1

-- wait_children with an unfinished child: parked until the last one ends
-- (wake_parent) or its deadline. Parameters: waiting_for, now, run id.
-- name: wait_for_children
UPDATE runs SET status = 'waiting', waiting_for = ?, wake_at = deadline_at,
    lease_expires_at = NULL, updated_at = ?
WHERE id = ?
RETURNING limit_key1, limit_key2

-- name: touch
UPDATE runs SET updated_at = ? WHERE id = ?

-- The end of a child: its parent, if it waits for the children of that step
-- and none of them is unfinished any more, is claimable at once. Parameters:
-- now, now, the parent's id, the children prefix and the step, the parent's
-- id again, the step.
-- name: wake_parent
UPDATE runs SET wake_at = ?, updated_at = ?
WHERE id = ? AND status = 'waiting' AND waiting_for = ?
    AND NOT EXISTS (
        SELECT 1 FROM runs WHERE parent_id = ? AND parent_step = ? AND finished_at IS NULL
    )

-- Cancelling a run cancels every unfinished run below it, each as a cancel
-- of its own would (the trigger drops its buffered events). The walk goes
-- through finished runs too: a completed child's children are still below.
-- UNION (not UNION ALL) ends the walk even if ids ever formed a cycle.
-- Parameters: the cancelled run's id, now, now.
-- name: cancel_below
WITH RECURSIVE below (id) AS (
    SELECT id FROM runs WHERE parent_id = ?
    UNION
    SELECT runs.id FROM runs JOIN below ON runs.parent_id = below.id
)
UPDATE runs SET status = 'cancelled', lease_expires_at = NULL, wake_at = NULL,
    waiting_for = NULL, updated_at = ?, finished_at = ?, blocked_by = NULL
WHERE id IN (SELECT id FROM below) AND {not_terminal}

-- Every run below a run (as cancel_below walks them), with its parent, in
-- creation order (rowid), its status and its limit keys: when an unfinished
-- one holds a limit, the cancel goes one run at a time (run_limits, then
-- cancel_one), in the order a cancel takes them, so each one's end unblocks
-- what it would on its own. Parameters: the run id.
-- name: below_order
WITH RECURSIVE below (id) AS (
    SELECT id FROM runs WHERE parent_id = ?
    UNION
    SELECT runs.id FROM runs JOIN below ON runs.parent_id = below.id
)
SELECT id, parent_id, status, limit_key1, limit_key2 FROM runs
WHERE id IN (SELECT id FROM below)
ORDER BY rowid

-- One run of a cascade, cancelled on its own. Parameters: now, now, run id.
-- name: cancel_one
UPDATE runs SET status = 'cancelled', lease_expires_at = NULL, wake_at = NULL,
    waiting_for = NULL, updated_at = ?, finished_at = ?, blocked_by = NULL
WHERE id = ? AND {not_terminal}

-- A missing run has no children, even if runs still name it as their
-- parent (a purged parent's children are kept). Parameters: the run id twice.
-- name: list_children
SELECT {run_columns} FROM runs
WHERE parent_id = ? AND EXISTS (SELECT 1 FROM runs WHERE id = ?)
ORDER BY created_at, id

-- -- steps -------------------------------------------------------------------

-- name: upsert_step
INSERT INTO steps (run_id, name, status, output, error, attempts, wake_at, completed_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id, name) DO UPDATE SET
    status = excluded.status, output = excluded.output, error = excluded.error,
    attempts = excluded.attempts, wake_at = excluded.wake_at,
    completed_at = excluded.completed_at

-- name: get_step
SELECT status, output, wake_at FROM steps WHERE run_id = ? AND name = ?

-- name: get_steps
SELECT {step_columns} FROM steps WHERE run_id = ? ORDER BY rowid

-- name: drop_failed_steps
DELETE FROM steps WHERE run_id = ? AND status = 'failed'

-- -- events ------------------------------------------------------------------

-- name: has_event
SELECT 1 FROM events WHERE run_id = ? AND name = ? AND taken_at IS NULL LIMIT 1

-- name: oldest_event
SELECT id, payload FROM events WHERE run_id = ? AND name = ? AND taken_at IS NULL
ORDER BY id LIMIT 1

-- name: take_event
UPDATE events SET taken_at = ? WHERE id = ?

-- name: took_event
UPDATE runs SET waiting_for = NULL, updated_at = ? WHERE id = ?

-- name: seen_event_id
SELECT 1 FROM events WHERE run_id = ? AND event_id = ?

-- Counting stops at the limit, so a full buffer costs at most that many
-- index entries.
-- name: count_buffered
SELECT count(*) FROM (SELECT 1 FROM events WHERE run_id = ? AND taken_at IS NULL LIMIT ?)

-- name: insert_event
INSERT INTO events (run_id, name, payload, event_id, created_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (run_id, event_id) DO NOTHING
RETURNING id

-- -- retention ---------------------------------------------------------------

-- Walks the partial index runs_finished, oldest finish first.
-- name: purge_candidates
SELECT id FROM runs
WHERE finished_at < ? AND status IN ('completed', 'failed', 'cancelled')
ORDER BY finished_at, id LIMIT ?

-- name: purge_steps
DELETE FROM steps WHERE run_id IN ({ids})

-- name: purge_events
DELETE FROM events WHERE run_id IN ({ids})

-- name: purge_runs
DELETE FROM runs WHERE id IN ({ids})

-- -- dashboard reads ---------------------------------------------------------

-- The runs created with a key, of every workflow, newest first: a seek in
-- runs_key, walked backwards, that stops at the limit (never a sort, never
-- a scan; INDEXED BY makes that a guarantee). Parameters: the key, the limit.
-- name: find_by_key
SELECT {run_columns} FROM runs INDEXED BY runs_key
WHERE idempotency_key = ?
ORDER BY created_at DESC, id DESC LIMIT ?

-- A run's buffered events of every name, in arrival order (the order of
-- their ids, which take_event takes them in): a seek in the partial index
-- events_buffered, which holds buffered events only, then a sort of the
-- run's buffered events alone. A finished run has none (its end retired
-- them). Parameters: the run id, the limit.
-- name: buffered_events
SELECT name, payload, event_id FROM events INDEXED BY events_buffered
WHERE run_id = ? AND taken_at IS NULL
ORDER BY id LIMIT ?

-- The runs that finished in a span of time, counted by minute (of
-- finished_at, in microseconds: 60000000 to a minute) and status: a range
-- of the partial index runs_finished, which holds finished runs only, so
-- the cost is the runs that finished in the span, never the rest of the
-- history. Parameters: the span's start (included), its end (excluded).
-- name: finished_history
SELECT finished_at / 60000000, status, count(*) FROM runs INDEXED BY runs_finished
WHERE finished_at >= ? AND finished_at < ? AND status IN ('completed', 'failed', 'cancelled')
GROUP BY 1, 2

-- -- schedules ---------------------------------------------------------------

-- name: get_schedule
SELECT recurrence, next_run_at, created_at, paused FROM schedules WHERE key = ?

-- An update keeps the paused flag of the schedule it replaces.
-- name: upsert_schedule
INSERT INTO schedules ({schedule_columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    workflow = excluded.workflow, input = excluded.input,
    recurrence = excluded.recurrence, next_run_at = excluded.next_run_at,
    updated_at = excluded.updated_at

-- name: delete_schedule
DELETE FROM schedules WHERE key = ? RETURNING 1

-- name: list_schedules
SELECT {schedule_columns} FROM schedules ORDER BY key

-- Paused schedules are never due.
-- name: due_schedules
SELECT {schedule_columns} FROM schedules WHERE next_run_at <= ? AND paused = 0
ORDER BY next_run_at, key LIMIT ?

-- The due schedules of some workflows only, earliest first, then by key, up
-- to a count: {arms} holds due_schedules_of_arm once per workflow, joined by
-- UNION ALL; each arm seeks the workflow in schedules_workflow_due (whose
-- WHERE, paused = 0, it names), which is in due order, and stops at the
-- count, so the due schedules of other workflows are never read. Merged in
-- a table of their own and cut at the count again, as claim_due's heads.
-- Parameters: for each workflow, it, now and the count; then the count.
-- name: due_schedules_of_arm
SELECT * FROM (
    SELECT {schedule_columns} FROM schedules INDEXED BY schedules_workflow_due
    WHERE workflow = ? AND paused = 0 AND next_run_at <= ?
    ORDER BY next_run_at, key LIMIT ?
)

-- name: due_schedules_of
WITH heads AS MATERIALIZED (
    {arms}
)
SELECT * FROM heads ORDER BY next_run_at, key LIMIT ?

-- A paused schedule fires no slot.
-- name: advance_schedule
UPDATE schedules SET next_run_at = ?, updated_at = ?
WHERE key = ? AND next_run_at = ? AND paused = 0
RETURNING 1

-- Parameters: paused (0 or 1), the new next_run_at or NULL to keep it, now, key.
-- name: set_schedule_paused
UPDATE schedules SET paused = ?, next_run_at = coalesce(?, next_run_at), updated_at = ?
WHERE key = ?
RETURNING {schedule_columns}

-- -- workers -----------------------------------------------------------------

-- Lapsed entries are never listed; announcing deletes them (the table holds
-- one row per worker, so this is cheap). Parameters: now.
-- name: drop_lapsed_workers
DELETE FROM workers WHERE expires_at <= ?

-- After drop_lapsed_workers, a row of the same id is live: it keeps its
-- started_at. Parameters: the WORKER_COLUMNS values.
-- name: announce_worker
INSERT INTO workers ({worker_columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    host = excluded.host, pid = excluded.pid, workflows = excluded.workflows,
    concurrency = excluded.concurrency, in_flight = excluded.in_flight,
    last_seen_at = excluded.last_seen_at, expires_at = excluded.expires_at
RETURNING {worker_columns}

-- Parameters: now.
-- name: list_workers
SELECT {worker_columns} FROM workers WHERE expires_at > ? ORDER BY started_at, id

-- Deletes a lapsed entry too; the caller tells a live one by expires_at.
-- name: remove_worker
DELETE FROM workers WHERE id = ? RETURNING expires_at

-- -- queue statistics ------------------------------------------------------

-- Unfinished runs by workflow and status, with the earliest wake_at (of
-- pending runs, for the caller). "finished_at IS NULL" is the WHERE of the
-- partial index runs_unfinished, which holds unfinished runs only: the
-- query reads those and their rows, never the history. INDEXED BY makes
-- that a guarantee (SQLite refuses the query rather than plan a scan).
-- name: queue_stats_all
SELECT workflow, status, count(*), min(wake_at) FROM runs INDEXED BY runs_unfinished
WHERE finished_at IS NULL
    AND status IN ('delayed', 'pending', 'running', 'sleeping', 'waiting')
GROUP BY workflow, status

-- The same for the named workflows only (one "?" each): a seek per workflow.
-- name: queue_stats_of
SELECT workflow, status, count(*), min(wake_at) FROM runs INDEXED BY runs_unfinished
WHERE finished_at IS NULL
    AND status IN ('delayed', 'pending', 'running', 'sleeping', 'waiting')
    AND workflow IN ({workflows})
GROUP BY workflow, status
