"""Every SQL statement the PostgreSQL backend sends, rendered once per storage.

The templates below hold two kinds of slots, filled by :func:`render` from
this package's own values, never from user data:

* ``{s}``, the quoted schema identifier;
* ``{now}``, the storage clock: ``now()`` (the server's clock, the default),
  or a bound ``%(now)s`` parameter when a test clock is configured;
* ``{notify}``/``{notify_at}``, a ``pg_notify`` call that wakes idle workers
  (or the constant ``NULL`` when notifications are off).

Every value is bound as a ``%(name)s`` parameter. Parameters that appear only
in a ``SELECT`` list carry an explicit cast, since the server cannot infer
their types there.
"""

# SQL text here is composed only from this module's templates and the
# package's own identifiers; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

__all__ = ["READ_COLUMNS", "RUN_COLUMNS", "Statements", "render"]

RUN_COLUMNS = (
    "id, workflow, status, input, output, error, idempotency_key, attempts, reclaims, "
    "lease_epoch, created_at, updated_at, wake_at, waiting_for, lease_expires_at"
)
_R_COLUMNS = ", ".join(f"r.{c.strip()}" for c in RUN_COLUMNS.split(","))
_STEP_COLUMNS = "name, status, output, error, attempts, wake_at, completed_at"


def _bounded(column: str) -> str:
    """``column`` capped a day before the end of year 9999, the last time a
    datetime holds in every zone. Durations are bounded now, but an older
    version could store a wake-up time in the year 33,715, which psycopg
    cannot load: capped in the query, every read of it still works (at no
    cost to the loaders, which stay psycopg's own)."""
    latest = "'9999-12-30 00:00:00+00'::timestamptz"
    return f"CASE WHEN {column} > {latest} THEN {latest} ELSE {column} END"


READ_COLUMNS = RUN_COLUMNS.replace(" wake_at,", f" {_bounded('wake_at')},").replace(
    " lease_expires_at", f" {_bounded('lease_expires_at')}"
)
""":data:`RUN_COLUMNS` for reads of any run (``get_run``, ``list_runs``),
with the deadlines an older version may have stored out of range capped."""
_STEP_READ_COLUMNS = _STEP_COLUMNS.replace(" wake_at,", f" {_bounded('wake_at')},")
_SCHEDULE_COLUMNS = "key, workflow, input, recurrence, next_run_at, created_at, updated_at"
_US = "(extract(epoch FROM {col}) * 1000000)::bigint"

# Still running under the presented epoch, with a lease the server clock has
# not seen lapse.
_FENCE = (
    "id = %(id)s AND status = 'running' AND lease_epoch = %(epoch)s AND lease_expires_at > {now}"
)
_TERMINAL = "('completed', 'failed', 'cancelled')"

_UPSERT_STEP_TAIL = (
    "ON CONFLICT (run_id, name) DO UPDATE SET status = EXCLUDED.status, "
    "output = EXCLUDED.output, error = EXCLUDED.error, attempts = EXCLUDED.attempts, "
    "wake_at = EXCLUDED.wake_at, completed_at = EXCLUDED.completed_at"
)
_STEP_VALUES = (
    "%(name)s::text, %(step_status)s::text, %(step_output)s::text, %(step_error)s::text, "
    "%(step_attempts)s::integer, %(step_wake_at)s::timestamptz, {now}"
)


# A run that ends drops its buffered events in the statement that ends it:
# ``runs.buffered`` counts a live run's untaken events (kept by deliver and
# take), and only a run with some calls the schema's function
# drop_buffered_events (see _schema.py). A run that holds none costs this
# statement nothing more: the events table is not even in its plan. The
# function's queries take a snapshot of their own, after this statement got
# the run's row, so they also see an event whose delivery committed while
# this statement waited for that row (it is counted in the row's new version).
def _drop_buffered(run: str) -> str:
    return f"CASE WHEN {run}.buffered > 0 THEN {{s}}.drop_buffered_events({run}.id, {{now}}) END"


_TEMPLATES: dict[str, str] = {
    "create": (
        "WITH ins AS ("
        " INSERT INTO {s}.runs (id, workflow, status, input, idempotency_key, created_at,"
        "  updated_at, wake_at)"
        " VALUES (%(id)s, %(workflow)s, 'pending', %(input)s, %(key)s, {now}, {now}, {now})"
        " ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL"
        " DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key"
        f" RETURNING {RUN_COLUMNS}, (xmax = 0) AS inserted"
        ") SELECT ins.*, CASE WHEN ins.inserted THEN {notify} END FROM ins"
    ),
    # Many creates in one statement (group commit); the caller makes sure no
    # two share an id or an idempotency key. One notification per workflow.
    "create_many": (
        "WITH t AS ("
        " SELECT * FROM unnest(%(ids)s::text[], %(workflows)s::text[], %(inputs)s::text[],"
        "  %(keys)s::text[]) WITH ORDINALITY AS t(id, workflow, input, key, ord)"
        "), ins AS ("
        " INSERT INTO {s}.runs (id, workflow, status, input, idempotency_key, created_at,"
        "  updated_at, wake_at)"
        " SELECT id, workflow, 'pending', input, key, {now}, {now}, {now} FROM t ORDER BY ord"
        " ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL"
        " DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key"
        f" RETURNING {RUN_COLUMNS}, (xmax = 0) AS inserted"
        "), woken AS ("
        " SELECT {notify} FROM (SELECT DISTINCT workflow FROM ins WHERE inserted) AS u"
        ") SELECT ins.*, (SELECT count(*) FROM woken) FROM ins"
    ),
    "get_run": f"SELECT {READ_COLUMNS} FROM {{s}}.runs WHERE id = %(id)s",
    "claim": (
        "WITH stale AS ("
        " SELECT id, lease_expires_at AS k FROM {s}.runs"
        " WHERE status = 'running' AND lease_expires_at <= {now}"
        "  AND workflow = ANY(%(workflows)s)"
        " ORDER BY lease_expires_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
        "), due AS ("
        " SELECT id, wake_at AS k FROM {s}.runs"
        " WHERE status IN ('pending', 'sleeping', 'waiting') AND wake_at <= {now}"
        "  AND workflow = ANY(%(workflows)s)"
        " ORDER BY wake_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
        "), picked AS MATERIALIZED ("
        " SELECT id, 1 AS stale, k FROM stale UNION ALL SELECT id, 0, k FROM due"
        " LIMIT %(limit)s"
        "), claimed AS ("
        " UPDATE {s}.runs AS r SET status = 'running', lease_epoch = r.lease_epoch + 1,"
        "  attempts = r.attempts + 1, reclaims = r.reclaims + p.stale,"
        "  lease_expires_at = {now} + %(lease)s, wake_at = NULL, updated_at = {now}"
        " FROM picked AS p WHERE r.id = p.id"
        f" RETURNING {_R_COLUMNS}, p.stale, p.k"
        ") SELECT c.*, (SELECT json_agg(json_build_array(st.name, st.status, st.output,"
        "  st.error, st.attempts, "
        + _US.format(col="st.wake_at")
        + ", "
        + _US.format(col="st.completed_at")
        + ") ORDER BY st.seq) FROM {s}.steps AS st WHERE st.run_id = c.id)"
        " FROM claimed AS c ORDER BY c.stale DESC, c.k, c.id"
    ),
    "heartbeat": (
        "UPDATE {s}.runs SET lease_expires_at = {now} + %(extend)s, updated_at = {now}"
        f" WHERE {_FENCE}"
    ),
    "save_step": (
        "WITH f AS ("
        " UPDATE {s}.runs SET lease_expires_at = {now} + %(extend)s, updated_at = {now}"
        f" WHERE {_FENCE} RETURNING id"
        ") INSERT INTO {s}.steps (run_id, name, status, output, error, attempts, wake_at,"
        " completed_at)"
        f" SELECT f.id, {_STEP_VALUES} FROM f {_UPSERT_STEP_TAIL}"
    ),
    # Many runs' step saves in one statement (group commit): each row is
    # fenced on its own, and the ids whose fence held come back.
    "save_steps": (
        "WITH t AS ("
        " SELECT * FROM unnest(%(ids)s::text[], %(epochs)s::bigint[], %(extends)s::interval[],"
        "  %(names)s::text[], %(statuses)s::text[], %(outputs)s::text[], %(errors)s::text[],"
        "  %(attempts)s::integer[], %(wakes)s::timestamptz[])"
        "  AS t(id, epoch, extend, name, status, output, error, attempts, wake_at)"
        "), f AS ("
        " UPDATE {s}.runs AS r SET lease_expires_at = {now} + t.extend, updated_at = {now}"
        " FROM t WHERE r.id = t.id AND r.status = 'running' AND r.lease_epoch = t.epoch"
        "  AND r.lease_expires_at > {now}"
        " RETURNING r.id"
        "), ins AS ("
        " INSERT INTO {s}.steps (run_id, name, status, output, error, attempts, wake_at,"
        "  completed_at)"
        " SELECT t.id, t.name, t.status, t.output, t.error, t.attempts, t.wake_at, {now}"
        " FROM t JOIN f ON f.id = t.id " + _UPSERT_STEP_TAIL + ""
        ") SELECT id FROM f"
    ),
    "finish": (
        "UPDATE {s}.runs AS r SET status = %(status)s, output = %(output)s,"
        " error = %(error)s, lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL,"
        " updated_at = {now}, finished_at = {now}"
        f" WHERE {_FENCE} RETURNING {_drop_buffered('r')}"
    ),
    "finish_with_step": (
        "WITH f AS ("
        " UPDATE {s}.runs SET status = %(status)s, output = %(output)s, error = %(error)s,"
        "  lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL, updated_at = {now},"
        "  finished_at = {now}"
        f" WHERE {_FENCE} RETURNING id, buffered"
        "), st AS ("
        " INSERT INTO {s}.steps (run_id, name, status, output, error, attempts, wake_at,"
        "  completed_at)"
        f" SELECT f.id, {_STEP_VALUES} FROM f {_UPSERT_STEP_TAIL}"
        f") SELECT 1, {_drop_buffered('f')} FROM f"
    ),
    # Many runs' ends in one statement (group commit), each fenced on its own.
    "finish_many": (
        "WITH t AS ("
        " SELECT * FROM unnest(%(ids)s::text[], %(epochs)s::bigint[], %(run_statuses)s::text[],"
        "  %(run_outputs)s::text[], %(run_errors)s::text[], %(has_step)s::boolean[],"
        "  %(names)s::text[], %(statuses)s::text[], %(outputs)s::text[], %(errors)s::text[],"
        "  %(attempts)s::integer[], %(wakes)s::timestamptz[])"
        "  AS t(id, epoch, run_status, run_output, run_error, has_step, name, status, output,"
        "  error, attempts, wake_at)"
        "), f AS ("
        " UPDATE {s}.runs AS r SET status = t.run_status, output = t.run_output,"
        "  error = t.run_error, lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL,"
        "  updated_at = {now}, finished_at = {now}"
        " FROM t WHERE r.id = t.id AND r.status = 'running' AND r.lease_epoch = t.epoch"
        "  AND r.lease_expires_at > {now}"
        " RETURNING r.id, r.buffered"
        "), ins AS ("
        " INSERT INTO {s}.steps (run_id, name, status, output, error, attempts, wake_at,"
        "  completed_at)"
        " SELECT t.id, t.name, t.status, t.output, t.error, t.attempts, t.wake_at, {now}"
        " FROM t JOIN f ON f.id = t.id WHERE t.has_step " + _UPSERT_STEP_TAIL + ""
        f") SELECT f.id, {_drop_buffered('f')} FROM f"
    ),
    "finished_already": (
        "SELECT 1 FROM {s}.runs WHERE id = %(id)s AND lease_epoch = %(epoch)s"
        " AND status = %(status)s"
    ),
    "hand_back": (
        "WITH u AS ("
        " UPDATE {s}.runs SET status = 'pending', lease_expires_at = NULL, wake_at = {now},"
        f"  updated_at = {{now}} WHERE {_FENCE} RETURNING workflow"
        ") SELECT {notify} FROM u"
    ),
    "end_fenced": (
        "UPDATE {s}.runs AS r SET status = %(status)s, error = %(error)s,"
        " lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL, updated_at = {now},"
        " finished_at = {now}"
        f" WHERE {_FENCE} RETURNING {_drop_buffered('r')}"
    ),
    "end_unfenced": (
        "UPDATE {s}.runs AS r SET status = %(status)s, error = %(error)s,"
        " lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL, updated_at = {now},"
        " finished_at = {now}"
        f" WHERE id = %(id)s AND status NOT IN {_TERMINAL} RETURNING {_drop_buffered('r')}"
    ),
    "sleep": (
        "WITH prev AS ("
        " SELECT wake_at FROM {s}.steps WHERE run_id = %(id)s AND name = %(name)s"
        "  AND status = 'sleeping' AND wake_at IS NOT NULL"
        "), u AS ("
        " UPDATE {s}.runs SET status = 'sleeping',"
        "  wake_at = coalesce((SELECT wake_at FROM prev), {now} + %(duration)s),"
        "  lease_expires_at = NULL, updated_at = {now}"
        f" WHERE {_FENCE} RETURNING id, workflow, wake_at"
        "), st AS ("
        " INSERT INTO {s}.steps (run_id, name, status, output, error, attempts, wake_at,"
        "  completed_at)"
        " SELECT u.id, %(name)s::text, 'sleeping', NULL, NULL, 1, u.wake_at, {now} FROM u"
        " WHERE NOT EXISTS (SELECT 1 FROM prev) " + _UPSERT_STEP_TAIL + ""
        ") SELECT u.wake_at, {notify_at} FROM u"
    ),
    # wait_run, take_event and deliver_event lock the run row first, in a
    # statement of their own: the statements after it then see every event
    # committed before the lock was granted.
    "lock_fenced": f"SELECT workflow FROM {{s}}.runs WHERE {_FENCE} FOR NO KEY UPDATE",
    "lock_run": (
        "SELECT status, waiting_for, workflow FROM {s}.runs WHERE id = %(id)s FOR NO KEY UPDATE"
    ),
    "wait": (
        "WITH prev AS ("
        " SELECT wake_at FROM {s}.steps WHERE run_id = %(id)s AND name = %(name)s"
        "  AND status = 'waiting'"
        "), d AS ("
        " SELECT CASE WHEN EXISTS (SELECT 1 FROM prev) THEN (SELECT wake_at FROM prev)"
        "  ELSE {now} + %(timeout)s::interval END AS deadline,"
        "  EXISTS (SELECT 1 FROM {s}.events WHERE run_id = %(id)s AND name = %(event)s"
        "   AND taken_at IS NULL) AS ready,"
        "  EXISTS (SELECT 1 FROM prev) AS seen"
        "), u AS ("
        " UPDATE {s}.runs SET"
        "  status = CASE WHEN d.ready THEN status ELSE 'waiting' END,"
        "  waiting_for = CASE WHEN d.ready THEN NULL ELSE %(event)s END,"
        "  wake_at = CASE WHEN d.ready THEN NULL ELSE d.deadline END,"
        "  lease_expires_at = CASE WHEN d.ready THEN lease_expires_at END,"
        "  updated_at = {now}"
        " FROM d WHERE id = %(id)s RETURNING workflow, wake_at"
        "), st AS ("
        " INSERT INTO {s}.steps (run_id, name, status, output, error, attempts, wake_at,"
        "  completed_at)"
        " SELECT %(id)s, %(name)s::text, 'waiting', NULL, NULL, 1, d.deadline, {now} FROM d"
        " WHERE NOT d.seen " + _UPSERT_STEP_TAIL + ""
        ") SELECT d.ready, d.deadline,"
        " CASE WHEN NOT d.ready AND u.wake_at IS NOT NULL THEN {notify_at} END"
        " FROM d, u"
    ),
    "take": (
        "WITH done AS ("
        " SELECT output FROM {s}.steps WHERE run_id = %(id)s AND name = %(name)s"
        "  AND status = 'completed'"
        "), ev AS ("
        " SELECT id, payload FROM {s}.events WHERE run_id = %(id)s AND name = %(event)s"
        "  AND taken_at IS NULL AND NOT EXISTS (SELECT 1 FROM done) ORDER BY id LIMIT 1"
        "), t AS ("
        " UPDATE {s}.events SET taken_at = {now} WHERE id IN (SELECT id FROM ev)"
        "), st AS ("
        " INSERT INTO {s}.steps (run_id, name, status, output, error, attempts, wake_at,"
        "  completed_at)"
        " SELECT %(id)s, %(name)s::text, 'completed', ev.payload, NULL, 1, NULL, {now}"
        " FROM ev " + _UPSERT_STEP_TAIL + ""
        "), u AS ("
        " UPDATE {s}.runs SET waiting_for = NULL, updated_at = {now},"
        "  buffered = greatest(buffered - 1, 0)"
        " WHERE id = %(id)s AND EXISTS (SELECT 1 FROM ev)"
        ") SELECT EXISTS (SELECT 1 FROM done), (SELECT output FROM done),"
        " (SELECT payload FROM ev)"
    ),
    # Runs after lock_run, which serializes deliveries and takes on the run,
    # so the check (a repeated id, then the run's count of buffered events
    # against the cap) and the write see the same events. An event stored
    # counts in runs.buffered and, for a run waiting for it, makes the run due.
    # Returns (repeated id, stored).
    "deliver": (
        "WITH seen AS ("
        " SELECT EXISTS (SELECT 1 FROM {s}.events WHERE run_id = %(id)s"
        "  AND event_id = %(event_id)s::text) AS dup"
        "), go AS ("
        " SELECT NOT seen.dup AND (%(cap)s::bigint IS NULL OR r.buffered < %(cap)s::bigint) AS ok"
        " FROM seen, {s}.runs AS r WHERE r.id = %(id)s"
        "), ins AS ("
        " INSERT INTO {s}.events (run_id, name, payload, event_id, created_at)"
        " SELECT %(id)s::text, %(event)s::text, %(payload)s::text, %(event_id)s::text, {now}"
        " FROM go WHERE go.ok"
        " ON CONFLICT (run_id, event_id) WHERE event_id IS NOT NULL DO NOTHING RETURNING id"
        "), u AS ("
        " UPDATE {s}.runs SET buffered = buffered + 1,"
        "  wake_at = CASE WHEN status = 'waiting' AND waiting_for = %(event)s THEN {now}"
        "   ELSE wake_at END,"
        "  updated_at = CASE WHEN status = 'waiting' AND waiting_for = %(event)s THEN {now}"
        "   ELSE updated_at END"
        " WHERE id = %(id)s AND EXISTS (SELECT 1 FROM ins)"
        " RETURNING workflow, status = 'waiting' AND waiting_for = %(event)s AS woke"
        "), woken AS (SELECT {notify} FROM u WHERE u.woke"
        ") SELECT seen.dup, go.ok, (SELECT count(*) FROM woken) FROM seen, go"
    ),
    "get_steps": (
        f"SELECT {_STEP_READ_COLUMNS} FROM {{s}}.steps WHERE run_id = %(id)s ORDER BY seq"
    ),
    # A requeued run starts with an empty buffer (its events were dropped
    # when it ended; runs.buffered is only kept up to date while a run lives).
    "requeue": (
        "WITH u AS ("
        " UPDATE {s}.runs SET status = 'pending', error = NULL, reclaims = 0, wake_at = {now},"
        "  waiting_for = NULL, lease_expires_at = NULL, updated_at = {now}, finished_at = NULL,"
        "  buffered = 0"
        " WHERE id = %(id)s AND status IN ('failed', 'cancelled') RETURNING id, workflow"
        "), d AS ("
        " DELETE FROM {s}.steps WHERE run_id IN (SELECT id FROM u) AND status = 'failed'"
        ") SELECT {notify} FROM u"
    ),
    "upsert_schedule": (
        f"INSERT INTO {{s}}.schedules AS sc ({_SCHEDULE_COLUMNS})"
        " VALUES (%(key)s, %(workflow)s, %(input)s, %(recurrence)s, %(next_run_at)s, {now},"
        " {now})"
        " ON CONFLICT (key) DO UPDATE SET workflow = EXCLUDED.workflow,"
        " input = EXCLUDED.input,"
        " next_run_at = CASE WHEN sc.recurrence = EXCLUDED.recurrence THEN sc.next_run_at"
        "  ELSE EXCLUDED.next_run_at END,"
        " recurrence = EXCLUDED.recurrence, updated_at = {now}"
        f" RETURNING {_SCHEDULE_COLUMNS}"
    ),
    "delete_schedule": "DELETE FROM {s}.schedules WHERE key = %(key)s",
    "list_schedules": f"SELECT {_SCHEDULE_COLUMNS} FROM {{s}}.schedules ORDER BY key",
    "due_schedules": (
        f"SELECT {_SCHEDULE_COLUMNS} FROM {{s}}.schedules WHERE next_run_at <= {{now}}"
        " ORDER BY next_run_at, key LIMIT %(limit)s"
    ),
    "claim_slot": (
        "WITH adv AS ("
        " UPDATE {s}.schedules SET next_run_at = %(next_run_at)s, updated_at = {now}"
        " WHERE key = %(key)s AND next_run_at = %(slot)s RETURNING key"
        "), ins AS ("
        " INSERT INTO {s}.runs (id, workflow, status, input, idempotency_key, created_at,"
        "  updated_at, wake_at)"
        " SELECT %(id)s::text, %(workflow)s::text, 'pending', %(input)s::text, %(idem)s::text,"
        "  {now}, {now}, {now} FROM adv"
        " ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL"
        " DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key"
        f" RETURNING {RUN_COLUMNS}, (xmax = 0) AS inserted"
        ") SELECT ins.*, CASE WHEN ins.inserted THEN {notify} END FROM ins"
    ),
    "now": "SELECT {now}",
    "next_due": (
        "SELECT extract(epoch FROM min(wake_at) - {now}) FROM {s}.runs"
        " WHERE status IN ('sleeping', 'waiting') AND wake_at > {now}"
        " AND workflow = ANY(%(workflows)s)"
    ),
    "purge": (
        "WITH doomed AS ("
        " SELECT id FROM {s}.runs WHERE status IN " + _TERMINAL + ""
        "  AND finished_at < {now} - %(age)s ORDER BY finished_at LIMIT %(limit)s"
        "  FOR UPDATE SKIP LOCKED"
        "), st AS (DELETE FROM {s}.steps WHERE run_id IN (SELECT id FROM doomed)"
        "), ev AS (DELETE FROM {s}.events WHERE run_id IN (SELECT id FROM doomed)"
        ") DELETE FROM {s}.runs WHERE id IN (SELECT id FROM doomed)"
    ),
}


@dataclass(frozen=True, slots=True)
class Statements:
    """The rendered statements of one storage, as bytes ready for psycopg."""

    text: dict[str, bytes]
    schema: str
    """The quoted schema identifier, for statements composed at run time."""
    now: str
    """The clock expression, for statements composed at run time."""

    def __getitem__(self, name: str) -> bytes:
        return self.text[name]


def render(schema: str, *, channel: str | None, test_clock: bool) -> Statements:
    """Render every template for ``schema``.

    ``channel`` is the notification channel, or ``None`` to send no
    notifications; ``test_clock`` binds the clock as the ``now`` parameter
    instead of reading the server's.
    """
    quoted = sql.Identifier(schema).as_string(None)
    now = "%(now)s::timestamptz" if test_clock else "now()"
    # The payload names the workflow, so only its workers wake; a delay (in
    # milliseconds, by the server clock) tells them when a sleep falls due.
    # Names too long for a payload wake every worker instead (empty name).
    workflow = "CASE WHEN octet_length(u.workflow) <= 4000 THEN u.workflow ELSE '' END"
    if channel is None:
        notify = notify_at = "NULL"
    else:
        literal = sql.Literal(channel).as_string(None)
        notify = f"pg_notify({literal}, '0|' || {workflow})"
        notify_at = (
            f"pg_notify({literal}, greatest(0, (extract(epoch FROM u.wake_at - {now}) * 1000)"
            f"::bigint)::text || '|' || {workflow})"
        )
    text: dict[str, bytes] = {}
    for name, template in _TEMPLATES.items():
        rendered = template.replace("{notify}", notify.replace("u.workflow", "ins.workflow"))
        if name not in ("create", "claim_slot"):
            rendered = template.replace("{notify}", notify)
        rendered = rendered.replace("{notify_at}", notify_at)
        rendered = rendered.replace("{s}", quoted).replace("{now}", now)
        text[name] = rendered.encode()
    return Statements(text=text, schema=quoted, now=now)
