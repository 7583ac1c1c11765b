"""``tutorial-sqlite://``: the Reflow storage protocol on one SQLite file,
through the standard library's blocking ``sqlite3`` module.

Design, in four decisions:

* **One thread per storage object.** ``sqlite3`` blocks, and the engine's
  event loop also runs every heartbeat, so no call may run on the loop. Each
  storage owns one worker thread that opens the connection and runs every
  transaction: a connection used by one thread only needs no lock of ours.
* **One transaction per operation,** begun with ``BEGIN IMMEDIATE`` so it
  takes SQLite's single write lock before its first read. Whatever an
  operation reads, it writes on, with no other writer in between, in this
  process or another.
* **One clock: this host's.** SQLite has no server; every process that opens
  the file runs on this host (WAL needs shared memory), so the host clock is
  the store's clock. Each transaction reads it once, after taking the write
  lock, so the times written follow the order of the writes.
* **Times are integer microseconds since the epoch:** they compare as
  integers in SQL and keep more than the millisecond the contract asks for.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

from reflow_core import adapter as kit
from reflow_core.errors import (
    ConfigError,
    EventBufferFullError,
    IdempotencyConflictError,
    SchemaVersionError,
    StorageError,
)
from reflow_core.storage import (
    CHILDREN_WAIT_PREFIX,
    MAX_HISTORY_MINUTES,
    TERMINAL_STATUSES,
    BufferedEvent,
    ClaimedRun,
    ConcurrencyLimit,
    CreateResult,
    EventTake,
    FinishedMinute,
    Lease,
    NewRun,
    QueueStats,
    RateLimit,
    RunPage,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    WaitResult,
    WorkerInfo,
    WorkerRecord,
)

__all__ = ["TutorialStorage"]

T = TypeVar("T")
BACKEND = "tutorial-sqlite"

# --8<-- [start:schema]
# PRAGMA application_id marks a file as ours ("TUTR"), user_version is the
# schema version: initialize() refuses any other file rather than write to it.
APPLICATION_ID = 1414878290
# MIGRATIONS[n] takes a file from schema version n to n + 1. A new file gets
# them all, an older one those it lacks. Never edit a released one: append.
MIGRATIONS = (
    (  # Version 1: runs, steps, events and schedules.
        # The first fifteen columns are kit.RUN_COLUMNS, in its order (the
        # rest come later: deadline_at in version 4, parent_id and parent_step
        # in version 5, priorities and limits in version 6, rates and the
        # debounce key in version 7, headers in version 8, version and
        # fingerprint in version 10), so that reflow_core.adapter.run_from_row
        # maps a row without a line of ours.
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY, workflow TEXT NOT NULL, status TEXT NOT NULL,
            input TEXT NOT NULL, output TEXT, error TEXT, idempotency_key TEXT,
            attempts INTEGER NOT NULL, reclaims INTEGER NOT NULL, lease_epoch INTEGER NOT NULL,
            created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, wake_at INTEGER,
            waiting_for TEXT, lease_expires_at INTEGER,
            finished_at INTEGER,  -- set when the run ends, cleared by a requeue: for purges
            UNIQUE (workflow, idempotency_key)  -- SQLite lets NULL keys repeat
        )""",
        "CREATE INDEX runs_claim ON runs (workflow, status)",
        "CREATE INDEX runs_created ON runs (created_at, id)",
        "CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL",
        """CREATE TABLE steps (
            run_id TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, output TEXT,
            error TEXT, attempts INTEGER NOT NULL, wake_at INTEGER,
            completed_at INTEGER NOT NULL, PRIMARY KEY (run_id, name)
        )""",
        # Buffered (untaken) events only: taking one deletes it, ending a run
        # deletes them all. AUTOINCREMENT keeps arrival order.
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
            name TEXT NOT NULL, payload TEXT NOT NULL
        )""",
        "CREATE INDEX events_run ON events (run_id, name, seq)",
        # Event ids outlive their events: a repeated id is a no-op as long as the run exists.
        "CREATE TABLE event_ids (run_id TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (run_id, id))",
        """CREATE TABLE schedules (
            key TEXT PRIMARY KEY, workflow TEXT NOT NULL, input TEXT NOT NULL,
            recurrence TEXT NOT NULL, next_run_at INTEGER NOT NULL,
            created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
        )""",
    ),
    (  # Version 2: pausing schedules, the worker registry, queue statistics.
        # Added last, so the schedule columns stay in kit.SCHEDULE_COLUMNS order.
        "ALTER TABLE schedules ADD COLUMN paused INTEGER NOT NULL DEFAULT 0",
        # The columns of kit.WORKER_COLUMNS; workflows is kit.encode_workflows text.
        """CREATE TABLE workers (
            id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
            workflows TEXT NOT NULL, concurrency INTEGER NOT NULL, in_flight INTEGER NOT NULL,
            started_at INTEGER NOT NULL, last_seen_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        )""",
        # Unfinished runs only: queue_stats reads this index, never the history.
        "CREATE INDEX runs_unfinished ON runs (workflow, status, wake_at)"
        " WHERE status IN ('pending', 'running', 'sleeping', 'waiting')",
    ),
    (  # Version 3: delayed runs. The index of unfinished runs holds them too.
        "DROP INDEX runs_unfinished",
        "CREATE INDEX runs_unfinished ON runs (workflow, status, wake_at)"
        " WHERE status IN ('delayed', 'pending', 'running', 'sleeping', 'waiting')",
    ),
    (  # Version 4: run deadlines (NULL: none).
        "ALTER TABLE runs ADD COLUMN deadline_at INTEGER",
    ),
    (  # Version 5: child runs, the last two of kit.RUN_COLUMNS (NULL: not a child).
        # Added in place: the runs already in the file are nobody's children.
        "ALTER TABLE runs ADD COLUMN parent_id TEXT",
        "ALTER TABLE runs ADD COLUMN parent_step TEXT",
        # A parent's children, by step: what a child's end, wait_children, a
        # cancel's walk down the tree and list_children look up. Partial: the
        # runs that are nobody's children never write it.
        "CREATE INDEX runs_children ON runs (parent_id, parent_step) WHERE parent_id IS NOT NULL",
    ),
    # --8<-- [start:limits-schema]
    (  # Version 6: priorities and concurrency limits, the rest of kit.RUN_COLUMNS.
        # The runs already in the file get priority 0, no limit, and are not
        # blocked: what they had. A run holds at most kit's MAX_RUN_LIMITS (2)
        # limits, so two pairs of columns hold them (kit.limit_columns).
        "ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN limit_key1 TEXT",
        "ALTER TABLE runs ADD COLUMN limit_max1 INTEGER",
        "ALTER TABLE runs ADD COLUMN limit_key2 TEXT",
        "ALTER TABLE runs ADD COLUMN limit_max2 INTEGER",
        # The key of the full limit a claim passed this run over for (NULL: not blocked).
        "ALTER TABLE runs ADD COLUMN blocked_by TEXT",
        # What a claim reads, in the order it takes them: runs with a due time
        # (pending, delayed, sleeping, waiting; a running or ended run has
        # none) that are not blocked. Partial, so a backlog of blocked runs is
        # not in it at all: however many runs wait for a full limit, a claim
        # never reads past them. It takes over from runs_claim for due runs;
        # that one still finds the lapsed leases.
        "CREATE INDEX runs_due ON runs (workflow, priority DESC, wake_at, id)"
        " WHERE blocked_by IS NULL AND wake_at IS NOT NULL",
        # The blocked runs of each key, in the order a claim would take them:
        # letting the first one go is one seek.
        "CREATE INDEX runs_blocked ON runs (blocked_by, priority DESC, wake_at, id)"
        " WHERE blocked_by IS NOT NULL",
        # The running runs holding a key, in either pair of columns: counting
        # them is two seeks, whatever the size of the history.
        "CREATE INDEX runs_holding1 ON runs (limit_key1) WHERE status = 'running'",
        "CREATE INDEX runs_holding2 ON runs (limit_key2) WHERE status = 'running'",
    ),
    # --8<-- [end:limits-schema]
    # --8<-- [start:rates-schema]
    (  # Version 7: rate limits and debounce, the next of kit.RUN_COLUMNS.
        # A run holds at most kit's MAX_RUN_RATES (2) rates: two triples of
        # columns (kit.rate_columns), periods in microseconds. The runs
        # already in the file get none, and no debounce key.
        "ALTER TABLE runs ADD COLUMN rate_key1 TEXT",
        "ALTER TABLE runs ADD COLUMN rate_max1 INTEGER",
        "ALTER TABLE runs ADD COLUMN rate_period1 INTEGER",
        "ALTER TABLE runs ADD COLUMN rate_key2 TEXT",
        "ALTER TABLE runs ADD COLUMN rate_max2 INTEGER",
        "ALTER TABLE runs ADD COLUMN rate_period2 INTEGER",
        "ALTER TABLE runs ADD COLUMN debounce_key TEXT",
        # One row per claim of a run holding a rate key: what a claim counts
        # in the window of a period. A claim deletes the rows of a key that
        # have left the window as it adds its own, so a key keeps about `max`.
        "CREATE TABLE rate_claims (key TEXT NOT NULL, at INTEGER NOT NULL)",
        "CREATE INDEX rate_claims_key ON rate_claims (key, at)",
        # For each rate key with runs blocked by it: when its window has room
        # again. Each claim first lets go the blocked runs of the keys due.
        "CREATE TABLE rate_waits (key TEXT PRIMARY KEY, at INTEGER NOT NULL)",
        # At most one open run (never claimed, pending or delayed) per
        # workflow and debounce key: the condition is kit.is_open_for_debounce.
        # A claim (attempts = 1) or an end takes the run out, freeing the key.
        "CREATE UNIQUE INDEX runs_debounce ON runs (workflow, debounce_key)"
        " WHERE debounce_key IS NOT NULL AND attempts = 0 AND status IN ('pending', 'delayed')",
    ),
    # --8<-- [end:rates-schema]
    (  # Version 8: propagation headers, the next of kit.RUN_COLUMNS: one JSON
        # object (kit.headers_column), NULL for none, as the runs already in
        # the file have.
        "ALTER TABLE runs ADD COLUMN headers TEXT",
    ),
    # --8<-- [start:dashboard-schema]
    (  # Version 9: what a dashboard reads.
        # The id an event was delivered with, listed with the buffered event
        # (the events buffered before this version show none: their ids are
        # in event_ids, which does not say which event had which).
        "ALTER TABLE events ADD COLUMN event_id TEXT",
        # The runs of each idempotency key, of every workflow, newest first:
        # one seek. UNIQUE (workflow, idempotency_key) cannot be sought by
        # the key alone. Runs created without a key are not in it.
        "CREATE INDEX runs_key ON runs (idempotency_key, created_at, id)"
        " WHERE idempotency_key IS NOT NULL",
    ),
    # --8<-- [end:dashboard-schema]
    (  # Version 10: workflow versions, the last two of kit.RUN_COLUMNS: the
        # version of the definition that enqueued a run (NewRun.version), 1
        # for the runs already in the file, and the hash of its shape
        # (NewRun.fingerprint), NULL for none, as they have. No index: a claim
        # that serves some versions only filters the rows its indexes lead it to.
        "ALTER TABLE runs ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE runs ADD COLUMN fingerprint TEXT",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
# kit.render_sql fills in our own column lists, never a value: values are bound.
COLUMNS = {
    "run": kit.RUN_COLUMNS,
    "step": kit.STEP_COLUMNS,
    "schedule": kit.SCHEDULE_COLUMNS,
    "worker": kit.WORKER_COLUMNS,
}
GET_RUN = kit.render_sql("SELECT {run} FROM runs WHERE id = ?", COLUMNS)
GET_RUNS = kit.render_sql(
    "SELECT {run} FROM runs WHERE id IN (SELECT value FROM json_each(?))", COLUMNS
)
GET_RUN_BY_KEY = kit.render_sql(
    "SELECT {run} FROM runs WHERE workflow = ? AND idempotency_key = ?", COLUMNS
)
GET_STEPS = kit.render_sql("SELECT {step} FROM steps WHERE run_id = ?", COLUMNS)
GET_STEP = kit.render_sql("SELECT {step} FROM steps WHERE run_id = ? AND name = ?", COLUMNS)
LIST_SCHEDULES = kit.render_sql("SELECT {schedule} FROM schedules ORDER BY key", COLUMNS)
DUE_SCHEDULES = kit.render_sql(
    # :workflows NULL: every workflow's; else a JSON list of names.
    "SELECT {schedule} FROM schedules WHERE next_run_at <= :now AND NOT paused"
    " AND (:workflows IS NULL OR workflow IN (SELECT value FROM json_each(:workflows)))"
    " ORDER BY next_run_at, key LIMIT :limit",
    COLUMNS,
)
UPSERT_SCHEDULE = kit.render_sql(
    # Re-registering with the same recurrence keeps the cadence (next_run_at),
    # and a replaced schedule keeps its paused flag; a new one is not paused.
    "INSERT INTO schedules ({schedule}) VALUES (?, ?, ?, ?, ?, ?, ?, 0)"
    " ON CONFLICT (key) DO UPDATE SET workflow = excluded.workflow,"
    " input = excluded.input, updated_at = excluded.updated_at,"
    " next_run_at = CASE WHEN recurrence = excluded.recurrence"
    "  THEN next_run_at ELSE excluded.next_run_at END,"
    " recurrence = excluded.recurrence RETURNING {schedule}",
    COLUMNS,
)
PAUSE_SCHEDULE = kit.render_sql(
    # A NULL next_run_at keeps the schedule's slot.
    "UPDATE schedules SET paused = ?, next_run_at = coalesce(?, next_run_at), updated_at = ?"
    " WHERE key = ? RETURNING {schedule}",
    COLUMNS,
)
ANNOUNCE_WORKER = kit.render_sql(
    # Every field but started_at is replaced: a live entry keeps its start.
    "INSERT INTO workers ({worker}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
    " workflows = excluded.workflows, concurrency = excluded.concurrency,"
    " in_flight = excluded.in_flight, last_seen_at = excluded.last_seen_at,"
    " expires_at = excluded.expires_at RETURNING {worker}",
    COLUMNS,
)
LIST_WORKERS = kit.render_sql(
    "SELECT {worker} FROM workers WHERE expires_at > ? ORDER BY started_at, id", COLUMNS
)
# The status condition is the one of the index runs_unfinished, so SQLite
# counts from that index alone: the cost is the number of unfinished runs.
QUEUE_STATS = (
    "SELECT workflow, status, count(*), min(wake_at) FROM runs"
    " WHERE status IN ('delayed', 'pending', 'running', 'sleeping', 'waiting')"
    " AND (:workflows IS NULL OR workflow IN (SELECT value FROM json_each(:workflows)))"
    " GROUP BY workflow, status"
)
LIST_RUNS = kit.render_sql(
    "SELECT {run} FROM runs WHERE (:workflow IS NULL OR workflow = :workflow)"
    " AND (:statuses IS NULL OR status IN (SELECT value FROM json_each(:statuses)))"
    " AND (:after_at IS NULL OR (created_at, id) < (:after_at, :after_id))"
    " ORDER BY created_at DESC, id DESC LIMIT :limit",
    COLUMNS,
)
# The fence of _fence, as a read: the run, if its lease still holds.
HELD_RUN = kit.render_sql(
    "SELECT {run} FROM runs WHERE id = :id AND status = 'running' AND lease_epoch = :epoch"
    " AND lease_expires_at > :now",
    COLUMNS,
)
# A child of run :parent, started at its step :step, that has not ended: one
# seek in the index runs_children.
UNFINISHED_CHILD = (
    "SELECT 1 FROM runs WHERE parent_id = :parent AND parent_step = :step"
    " AND status NOT IN ('completed', 'failed', 'cancelled')"
)
# A missing run has no children, even if runs still name it as their parent
# (a purged parent's children are kept, with their parent_id).
LIST_CHILDREN = kit.render_sql(
    "SELECT {run} FROM runs WHERE parent_id = :id AND EXISTS (SELECT 1 FROM runs WHERE id = :id)"
    " ORDER BY created_at, id",
    COLUMNS,
)
# --8<-- [start:limits-sql]
# The claim, in two parts. First the lapsed leases, whatever their priority
# or limits: a dead worker's runs must not wait behind a backlog. Not
# whatever their rates: one over a rate is left for a later claim, so the
# claim reads them all rather than the first :limit.
LAPSED_RUNS = (
    "SELECT id, rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2"
    " FROM runs WHERE workflow IN (SELECT value FROM json_each(:workflows))"
    " AND status = 'running' AND lease_expires_at <= :now{served}"
    " ORDER BY lease_expires_at, id"
)
# Then the due runs that are not blocked, highest priority first, then
# earliest due, read from the index runs_due (`wake_at <= :now` implies its
# `wake_at IS NOT NULL`). No test on status: only a run that can be claimed
# has a due time (a claim and an end clear it), and with one SQLite would
# rather read runs_claim, which holds the blocked runs too (EXPLAIN QUERY
# PLAN shows which index a statement reads).
DUE_RUNS = (
    "SELECT id, limit_key1, limit_max1, limit_key2, limit_max2,"
    " rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2 FROM runs"
    " WHERE workflow IN (SELECT value FROM json_each(:workflows))"
    " AND blocked_by IS NULL AND wake_at <= :now{served}"
    " ORDER BY priority DESC, wake_at, id LIMIT :limit"
)
# The {served} of both, for a claim given versions: :versions is a JSON
# object, from each workflow whose versions the claim limits to the list of
# those it serves. A run of a workflow it names, of a version not listed,
# is passed over in the same walk of the same index, before the LIMIT:
# never read as claimable, so never taken, blocked or changed (a lapsed
# lease included), and however many come first, the LIMIT counts the served
# runs alone. A claim of every version fills {served} with nothing: the
# statements it runs are the ones above, as they were before versions existed.
SERVED = (
    " AND (workflow NOT IN (SELECT key FROM json_each(:versions))"
    " OR (workflow, version) IN (SELECT served.key, listed.value"
    "  FROM json_each(:versions) AS served, json_each(served.value) AS listed))"
)
CLAIM_READS = {  # (lapsed, due), by whether the claim was given versions
    False: (kit.render_sql(LAPSED_RUNS, {"served": ""}), kit.render_sql(DUE_RUNS, {"served": ""})),
    True: (
        kit.render_sql(LAPSED_RUNS, {"served": SERVED}),
        kit.render_sql(DUE_RUNS, {"served": SERVED}),
    ),
}
# How many runs holding :key are running, lapsed leases included (a lapsed
# run keeps its slot until it is taken over or stops). A run's keys are
# distinct, so no run is counted twice.
HOLDERS = (
    "SELECT (SELECT count(*) FROM runs WHERE status = 'running' AND limit_key1 = :key)"
    " + (SELECT count(*) FROM runs WHERE status = 'running' AND limit_key2 = :key)"
)
# Let the run blocked by :key that a claim would take first go: one seek in
# runs_blocked. It is claimable again, and the next claim judges it afresh.
UNBLOCK_FIRST = (
    "UPDATE runs SET blocked_by = NULL, updated_at = :now WHERE id = ("
    " SELECT id FROM runs WHERE blocked_by = :key ORDER BY priority DESC, wake_at, id LIMIT 1)"
)
# --8<-- [end:limits-sql]
# --8<-- [start:rates-sql]
# The claims of runs holding :key in the window of a period that ends now
# (those after :since = now - period), newest first, past the first :skip:
# there is such a row if the window holds more than :skip claims.
NTH_CLAIM = (
    "SELECT at FROM rate_claims WHERE key = :key AND at > :since"
    " ORDER BY at DESC LIMIT 1 OFFSET :skip"
)
# How many claims that window holds, and the oldest of them.
WINDOW = "SELECT count(*), min(at) FROM rate_claims WHERE key = :key AND at > :since"
# Note when :key has room again (the earlier time, if one is noted already).
WAIT_FOR_RATE = (
    "INSERT INTO rate_waits (key, at) VALUES (:key, :at)"
    " ON CONFLICT (key) DO UPDATE SET at = min(at, excluded.at)"
)
# Let the first :room runs blocked by :block (kit.rate_block of a key) go,
# in the order a claim would take them: a seek in runs_blocked.
UNBLOCK_SOME = (
    "UPDATE runs SET blocked_by = NULL, updated_at = :now WHERE id IN ("
    " SELECT id FROM runs WHERE blocked_by = :block"
    " ORDER BY priority DESC, wake_at, id LIMIT :room)"
)
# The workflow's open run with a debounce key: the condition of the index
# runs_debounce, so this is one seek in it.
OPEN_DEBOUNCED = kit.render_sql(
    "SELECT {run} FROM runs WHERE workflow = ? AND debounce_key = ?"
    " AND attempts = 0 AND status IN ('pending', 'delayed')",
    COLUMNS,
)
# --8<-- [end:rates-sql]
# --8<-- [start:dashboard-sql]
LARGEST_LIMIT = 2**63 - 1  # the largest LIMIT SQLite binds
# The runs of :key, newest first, as many as asked: a seek in runs_key,
# read backwards (`idempotency_key = ?` implies its `IS NOT NULL`).
RUNS_BY_KEY = kit.render_sql(
    "SELECT {run} FROM runs WHERE idempotency_key = ? ORDER BY created_at DESC, id DESC LIMIT ?",
    COLUMNS,
)
# A run's buffered events, of every name, in arrival order: a seek in
# events_run (the table holds buffered events only: a take or the run's end
# deletes them), then a sort of that run's alone.
BUFFERED_EVENTS = "SELECT name, payload, event_id FROM events WHERE run_id = ? ORDER BY seq LIMIT ?"
# The runs that finished from :since to before :until, by minute (60,000,000
# microseconds) and status: a range of runs_finished, which holds finished
# runs only, so the rest of the history is never read.
FINISHED_BY_MINUTE = (
    "SELECT finished_at / 60000000, status, count(*) FROM runs"
    " WHERE finished_at >= :since AND finished_at < :until GROUP BY 1, 2"
)
# --8<-- [end:dashboard-sql]
# --8<-- [end:schema]


def clock_us() -> int:
    """The store's clock, in microseconds since the epoch (see the module docstring)."""
    return time.time_ns() // 1000


class TutorialStorage:
    """A Reflow storage on the SQLite file ``path``. Several processes on this
    host may share the file; ``timeout`` is how long (seconds) a transaction
    waits for another one's write lock before failing with ``StorageError``."""

    # --8<-- [start:lifecycle]
    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self._path = path
        self._timeout = timeout
        # kit.Lifecycle refuses every operation before initialize() and after
        # close(), with the same StorageError as every other backend.
        self._life = kit.Lifecycle(BACKEND)
        # The thread starts with the first call, and every call runs on it.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=BACKEND)
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> TutorialStorage:
        """``tutorial-sqlite:///relative.db`` or ``tutorial-sqlite:////abs/path.db``."""
        scheme, _, rest = url.partition("://")
        path = rest.removeprefix("/")
        if scheme.lower() != BACKEND or not path or "?" in path:
            raise ConfigError(f"expected {BACKEND}:///path/to/file.db, got {url!r}", option="url")
        return cls(path, **options)

    async def initialize(self) -> None:
        self._life.check_open()  # a closed storage stays closed
        if not self._life.initialized:
            self._conn = await self._call("initialize", self._open)
            self._life.initialized = True

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: sqlite3 opens no transaction of its own; we do.
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            # WAL: readers never block the writer, and other processes can share the file.
            # synchronous=NORMAL: a commit survives a killed process (not a power cut).
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Several processes may initialize at once: the check and the
            # migrations are one write transaction, so exactly one applies them.
            conn.execute("BEGIN IMMEDIATE")
            (app_id,) = conn.execute("PRAGMA application_id").fetchone()
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            (objects,) = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
            if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
                message = f"{self._path} has schema version {version}; upgrade this package"
                raise SchemaVersionError(message, operation="initialize", backend=BACKEND)
            if app_id != APPLICATION_ID and (app_id or objects):
                message = f"{self._path} holds another application's data"
                raise StorageError(message, operation="initialize", backend=BACKEND)
            if app_id != APPLICATION_ID:
                version = 0  # a new file: create every version
            if version < SCHEMA_VERSION:
                for migration in MIGRATIONS[version:]:
                    for statement in migration:
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.close()  # rolls back whatever was begun
            raise
        return conn

    async def close(self) -> None:
        self._life.closed = True
        conn, self._conn = self._conn, None
        try:
            if conn is not None:  # queued after any transaction still running
                await self._call("close", conn.close)
        finally:
            self._thread.shutdown(wait=False)

    async def _call(self, operation: str, work: Callable[[], T]) -> T:
        """Run ``work`` on the storage's thread: the one place where driver
        errors become StorageError, with the driver's exception as __cause__."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work)
        except sqlite3.Error as exc:
            message = f"{operation} failed: {exc}"
            raise StorageError(message, operation=operation, backend=BACKEND) from exc

    async def _tx(
        self, operation: str, body: Callable[[sqlite3.Cursor, int], T], *, write: bool = True
    ) -> T:
        """Run ``body(cursor, now)`` as one transaction on the storage's thread,
        ``now`` being the clock read once, after the write lock is taken."""
        self._life.check(operation)
        conn = self._conn
        assert conn is not None

        def transaction() -> T:
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                result = body(conn.cursor(), clock_us())
                conn.execute("COMMIT")
                return result
            finally:
                if conn.in_transaction:  # body raised (a refusal, or a driver error)
                    conn.execute("ROLLBACK")

        return await self._call(operation, transaction)

    async def now(self) -> datetime:
        # The clock every deadline below is computed from: see clock_us().
        self._life.check("now")
        return kit.from_epoch_us(clock_us())

    # --8<-- [end:lifecycle]

    # --8<-- [start:create]
    async def create_run(self, new: NewRun) -> CreateResult:
        kit.check_new_run(new)  # names and keys: the same ConfigError on every backend
        return await self._tx("create_run", lambda cur, now: self._create(cur, now, new))

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        kit.check_new_runs(news)  # every item checked before anything is written
        if not news:
            return []

        def create_all(
            cur: sqlite3.Cursor, now: int
        ) -> list[CreateResult | IdempotencyConflictError]:
            # One transaction: a taken run id rolls the whole batch back, and
            # each item sees the ones before it, as created one by one.
            outcomes: list[CreateResult | IdempotencyConflictError] = []
            for new in news:
                try:
                    outcomes.append(self._create(cur, now, new))
                except IdempotencyConflictError as exc:  # that item writes nothing
                    outcomes.append(exc)
            return outcomes

        return await self._tx("create_runs", create_all)

    def _create(self, cur: sqlite3.Cursor, now: int, new: NewRun) -> CreateResult:
        if new.idempotency_key is not None:
            # Under the write lock, so two creates with one key cannot both miss.
            row = cur.execute(GET_RUN_BY_KEY, (new.workflow, new.idempotency_key)).fetchone()
            if row is not None:
                existing = _run(row)
                if existing.input != new.input:  # canonical text: equal values, equal text
                    raise IdempotencyConflictError(new.workflow, new.idempotency_key, existing.id)
                return CreateResult(existing, created=False)
        if new.debounce_key is not None:
            row = cur.execute(OPEN_DEBOUNCED, (new.workflow, new.debounce_key)).fetchone()
            if row is not None:  # the open run takes the new input instead
                return CreateResult(_debounce(cur, _run(row), new, now), created=False)
        run_id = new.run_id or kit.new_run_id()
        # The kit builds the new run's record: pending and due at once
        # (wake_at = created_at = now), or, created with a positive delay,
        # delayed until now + delay, or until its deadline if that is sooner.
        # The row holds exactly that record.
        run = kit.new_run_record(run_id, new, kit.from_epoch_us(now))
        self._insert_run(cur, run)
        return CreateResult(run, created=True)

    @staticmethod
    def _insert_run(cur: sqlite3.Cursor, run: RunRecord) -> None:
        """Write the record of a new run (from ``kit.new_run_record``) as its row:
        never claimed, so no output, error or lease, zero counts, and not blocked."""
        assert run.wake_at is not None  # a new run always has a due time
        deadline = None if run.deadline_at is None else kit.to_epoch_us(run.deadline_at)
        cur.execute(
            "INSERT INTO runs (id, workflow, status, input, idempotency_key, attempts, reclaims,"
            " lease_epoch, created_at, updated_at, wake_at, deadline_at, parent_id, parent_step,"
            " priority, limit_key1, limit_max1, limit_key2, limit_max2, rate_key1, rate_max1,"
            " rate_period1, rate_key2, rate_max2, rate_period2, debounce_key, headers, version,"
            " fingerprint) VALUES (?, ?, ?, ?, ?, 0, 0, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.id,
                run.workflow,
                run.status,
                run.input,
                run.idempotency_key,
                kit.to_epoch_us(run.created_at),
                kit.to_epoch_us(run.updated_at),
                kit.to_epoch_us(run.wake_at),
                deadline,
                run.parent_id,  # both None, except for a child (start_child)
                run.parent_step,
                run.priority,  # as given (kit.check_new_run checked it and the limits)
                *kit.limit_columns(run.limits),  # (key1, max1, key2, max2), None where unused
                *kit.rate_columns(run.rates),  # (key1, max1, period1, key2, ...), likewise
                run.debounce_key,
                kit.headers_column(run.headers),  # JSON text, None for no headers
                run.version,  # as given (kit.check_new_run checked both), 1 by default
                run.fingerprint,
            ),
        )

    async def get_run(self, run_id: str) -> RunRecord | None:
        kit.check_text(run_id, "run_id")

        def body(cur: sqlite3.Cursor, now: int) -> RunRecord | None:
            row = cur.execute(GET_RUN, (run_id,)).fetchone()
            return None if row is None else _run(row)

        return await self._tx("get_run", body, write=False)

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        ids = kit.check_run_ids(run_ids)  # distinct, checked, at most MAX_GET_RUNS
        if not ids:
            return {}

        def body(cur: sqlite3.Cursor, now: int) -> dict[str, RunRecord]:
            # One read transaction: every run as of the same moment. json_each
            # takes the whole list as one parameter, however long it is.
            rows = cur.execute(GET_RUNS, (json.dumps(ids),)).fetchall()
            return {run.id: run for run in map(_run, rows)}

        return await self._tx("get_runs", body, write=False)

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        kit.check_text(run_id, "run_id")
        return await self._tx("get_step_results", lambda cur, now: _steps(cur, run_id), write=False)

    # --8<-- [end:create]

    # --8<-- [start:claim]
    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        # versions is checked first: a bad one is refused before anything
        # else is looked at. served maps each workflow it names to its
        # versions (sorted, without repeats), or is None.
        served = kit.check_claim_versions(workflows, versions)
        for name in workflows:
            kit.check_text(name, "workflow")
        span = kit.span_us(kit.check_duration(lease, "lease"))
        if limit < 1 or not workflows:
            return []
        # Versions limit what the claim reads, nothing else: with them, both
        # reads take the filter SERVED, and every run they return is served.
        lapsed_runs, due_runs = CLAIM_READS[bool(served)]
        filters = {"versions": json.dumps(served)} if served else {}

        def body(cur: sqlite3.Cursor, now: int) -> list[ClaimedRun]:
            # BEGIN IMMEDIATE already holds the write lock: no other claimer
            # can pick the same rows, and no write that stops a running run
            # can change the counts below before this claim commits.
            query = {"workflows": json.dumps(list(workflows)), "now": now, **filters}
            claimed: list[ClaimedRun] = []
            # The runs blocked by a rate whose window has room again go back
            # among the due runs first, whatever workflows this claim asks for.
            _release_rates(cur, now)
            # Lapsed leases first (a backlog must not starve a dead worker's
            # runs), whatever the limits: the run still holds its slots, and
            # the new holder takes them over. A rate holds them too: one over
            # its rate is left as it is, for a later claim.
            for run_id, *rates in cur.execute(lapsed_runs, query).fetchall():
                if len(claimed) == limit:
                    break
                if _full_rate(cur, kit.rates_from_columns(*rates), now) is None:
                    claimed.append(self._take(cur, run_id, now, span, lapsed=True))
            # Then the due runs, by priority and due time. One whose limit or
            # rate is full is blocked instead of taken, and the claim reads on:
            # every row read is taken or blocked, and neither comes back, so
            # the loop ends.
            while len(claimed) < limit:
                wanted = {**query, "limit": limit - len(claimed)}
                due = cur.execute(due_runs, wanted).fetchall()  # all read before a write
                if not due:
                    break
                for run_id, *columns in due:
                    blocked_by = _full_limit(cur, kit.limits_from_columns(*columns[:4]))
                    if blocked_by is None:  # the limits have room: now the rates
                        over = _full_rate(cur, kit.rates_from_columns(*columns[4:]), now)
                        if over is not None:  # blocked until the window has room
                            rate, room_at = over
                            blocked_by = kit.rate_block(rate.key)
                            cur.execute(WAIT_FOR_RATE, {"key": rate.key, "at": room_at})
                    if blocked_by is None:
                        claimed.append(self._take(cur, run_id, now, span, lapsed=False))
                    else:  # out of runs_due, until a holder stops or the window has room
                        cur.execute(
                            "UPDATE runs SET blocked_by = ?, updated_at = ? WHERE id = ?",
                            (blocked_by, now, run_id),
                        )
            return claimed

        return await self._tx("claim_runs", body)

    @staticmethod
    def _take(cur: sqlite3.Cursor, run_id: str, now: int, span: int, *, lapsed: bool) -> ClaimedRun:
        """Claim one run: running under a new lease. A new epoch fences off
        every write of the previous holder; a lapsed lease taken over counts
        as a reclaim. The claim counts in the window of each of the run's rates."""
        cur.execute(
            "UPDATE runs SET status = 'running', lease_epoch = lease_epoch + 1,"
            " attempts = attempts + 1, reclaims = reclaims + ?, lease_expires_at = ?,"
            " wake_at = NULL, updated_at = ? WHERE id = ?",
            (lapsed, now + span, now, run_id),
        )
        run = _run(cur.execute(GET_RUN, (run_id,)).fetchone())
        _record_claim(cur, run, now)
        # The saved steps travel with the claim: the worker needs no further read.
        return ClaimedRun(run, Lease(run_id, run.lease_epoch), _steps(cur, run_id), lapsed)

    # --8<-- [end:claim]

    # --8<-- [start:fenced]
    @staticmethod
    def _fence(cur: sqlite3.Cursor, lease: Lease, now: int, renew_us: int | None = None) -> bool:
        """The first statement of every write on a claimed run: touch the run
        only if it is still running under this lease's epoch and the lease
        has not lapsed by the store's clock, renewing it by ``renew_us`` if
        given. No row changed means the lease is lost: the caller then writes
        nothing. The rest of the caller's writes are in the same transaction,
        after this check, under the write lock: nothing can come in between."""
        return (
            cur.execute(
                "UPDATE runs SET updated_at = :now,"
                " lease_expires_at = coalesce(:now + :renew, lease_expires_at)"
                " WHERE id = :id AND status = 'running' AND lease_epoch = :epoch"
                " AND lease_expires_at > :now",
                {"now": now, "renew": renew_us, "id": lease.run_id, "epoch": lease.epoch},
            ).rowcount
            == 1
        )

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        span = kit.span_us(kit.check_duration(extend, "extend"))
        return await self._tx("heartbeat_run", lambda cur, now: self._fence(cur, lease, now, span))

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        kit.check_text(step.name, "step")
        span = kit.span_us(kit.check_duration(extend, "extend"))

        def body(cur: sqlite3.Cursor, now: int) -> bool:
            if not self._fence(cur, lease, now, span):  # saving a step renews the lease
                return False
            _put_step(cur, lease.run_id, step, now)
            return True

        return await self._tx("save_step_result", body)

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        kit.check_finish_status(status)
        if step is not None:
            kit.check_text(step.name, "step")

        def body(cur: sqlite3.Cursor, now: int) -> bool:
            if not self._fence(cur, lease, now):
                return False
            if step is not None:  # the last step and the run's end: one transaction
                _put_step(cur, lease.run_id, step, now)
            _end(cur, lease.run_id, now, status, output, error)
            return True

        return await self._tx("finish_run", body)

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        kit.check_text(run_id, "run_id")
        kit.check_status_update(status, lease)  # e.g. 'pending' without a lease

        def body(cur: sqlite3.Cursor, now: int) -> bool:
            if lease is not None:  # the holder hands the run back or ends it: fenced
                if lease.run_id != run_id or not self._fence(cur, lease, now):
                    return False
            elif not cur.execute(  # a cancel: any run not yet ended; breaks the holder's fence
                "UPDATE runs SET updated_at = ?"
                " WHERE id = ? AND status NOT IN ('completed', 'failed', 'cancelled')",
                (now, run_id),
            ).rowcount:
                return False
            if status == "pending":  # handed back: claimable at once, events kept
                cur.execute(
                    "UPDATE runs SET status = 'pending', lease_expires_at = NULL, wake_at = ?"
                    " WHERE id = ?",
                    (now, run_id),
                )
                _unblock(cur, run_id, now)  # it no longer runs: its slots are free
            else:
                _end(cur, run_id, now, status, None, error)
                if status == "cancelled":  # and every unfinished run below it, same write
                    _cancel_below(cur, run_id, now)
            return True

        return await self._tx("update_run_status", body)

    async def requeue_run(self, run_id: str) -> bool:
        kit.check_text(run_id, "run_id")

        def body(cur: sqlite3.Cursor, now: int) -> bool:
            # finished_at = NULL: a requeued run is no longer finished, so no purge takes it.
            # deadline_at = NULL: nor has it a deadline any more. It is not
            # blocked either (an ended run never is): the next claim judges it.
            # A run never claimed is open again for debounced creates with its
            # key, unless another open run holds that key by now (runs_debounce
            # keeps one): then it gives the key up, and the other stays the one.
            if not cur.execute(
                "UPDATE runs SET status = 'pending', error = NULL, reclaims = 0, wake_at = ?,"
                " waiting_for = NULL, lease_expires_at = NULL, finished_at = NULL,"
                " deadline_at = NULL, blocked_by = NULL, updated_at = ?,"
                " debounce_key = CASE WHEN attempts = 0 AND EXISTS ("
                "  SELECT 1 FROM runs AS open WHERE open.workflow = runs.workflow"
                "  AND open.debounce_key = runs.debounce_key AND open.attempts = 0"
                "  AND open.status IN ('pending', 'delayed'))"
                " THEN NULL ELSE debounce_key END"
                " WHERE id = ? AND status IN ('failed', 'cancelled')",
                (now, now, run_id),
            ).rowcount:
                return False
            cur.execute("DELETE FROM steps WHERE run_id = ? AND status = 'failed'", (run_id,))
            return True

        return await self._tx("requeue_run", body)

    # --8<-- [end:fenced]

    # --8<-- [start:events]
    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        kit.check_text(step, "step")
        span = kit.span_us(kit.check_duration(duration, "duration"))

        def body(cur: sqlite3.Cursor, now: int) -> int | None:
            if not self._fence(cur, lease, now):
                return None
            saved = _get_step(cur, lease.run_id, step)
            if saved is not None and saved.status == "sleeping" and saved.wake_at is not None:
                wake_at = kit.to_epoch_us(saved.wake_at)  # a reclaimed run sleeps once, not twice
            else:
                wake_at = now + span
                _put_step(cur, lease.run_id, StepRecord(step, "sleeping"), now, wake_at)
            # The run is due when the step wakes, or at its deadline if that is sooner.
            cur.execute(
                "UPDATE runs SET status = 'sleeping', wake_at = ?, lease_expires_at = NULL"
                " WHERE id = ?",
                (_due(cur, lease.run_id, wake_at), lease.run_id),
            )
            _unblock(cur, lease.run_id, now)  # parked: its slots are free
            return wake_at

        wake = await self._tx("sleep_run", body)
        return None if wake is None else kit.from_epoch_us(wake)

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        kit.check_text(step, "step")
        kit.check_text(event, "event")
        span = None if timeout is None else kit.span_us(kit.check_duration(timeout, "timeout"))

        def body(cur: sqlite3.Cursor, now: int) -> WaitResult | None:
            if not self._fence(cur, lease, now):
                return None
            saved = _get_step(cur, lease.run_id, step)
            if saved is not None and saved.status == "waiting":  # the deadline is fixed once
                deadline = None if saved.wake_at is None else kit.to_epoch_us(saved.wake_at)
            else:
                deadline = None if span is None else now + span
                _put_step(cur, lease.run_id, StepRecord(step, "waiting"), now, deadline)
            when = None if deadline is None else kit.from_epoch_us(deadline)
            if cur.execute(
                "SELECT 1 FROM events WHERE run_id = ? AND name = ?", (lease.run_id, event)
            ).fetchone():  # already delivered: keep the lease and take it now
                cur.execute("UPDATE runs SET waiting_for = NULL WHERE id = ?", (lease.run_id,))
                return WaitResult(ready=True, deadline=when)
            # Due at the wait's deadline, or at the run's own if that is sooner
            # (or the wait has none); the step and the result keep the wait's.
            cur.execute(
                "UPDATE runs SET status = 'waiting', waiting_for = ?, wake_at = ?,"
                " lease_expires_at = NULL WHERE id = ?",
                (event, _due(cur, lease.run_id, deadline), lease.run_id),
            )
            _unblock(cur, lease.run_id, now)  # parked: its slots are free
            return WaitResult(ready=False, deadline=when)

        return await self._tx("wait_run", body)

    async def deliver_event(
        self,
        run_id: str,
        event: str,
        payload: str,
        *,
        event_id: str | None = None,
        max_buffered: int | None = None,
    ) -> bool:
        kit.check_text(run_id, "run_id")
        kit.check_text(event, "event")
        if event_id is not None:
            kit.check_text(event_id, "event_id")

        def body(cur: sqlite3.Cursor, now: int) -> bool:
            run = cur.execute("SELECT status, waiting_for FROM runs WHERE id = ?", (run_id,))
            found = run.fetchone()
            if found is None or found[0] in TERMINAL_STATUSES:
                return False
            if event_id is not None:
                seen = cur.execute(
                    "SELECT 1 FROM event_ids WHERE run_id = ? AND id = ?", (run_id, event_id)
                )
                if seen.fetchone():  # a retry: a no-op, even when the buffer is full
                    return True
            if max_buffered is not None:
                # Every untaken event of the run counts, whatever its name.
                (held,) = cur.execute(
                    "SELECT count(*) FROM events WHERE run_id = ?", (run_id,)
                ).fetchone()
                if held >= max_buffered:  # raising rolls back: nothing is stored
                    raise EventBufferFullError(run_id, event, max_buffered)
            if event_id is not None:
                cur.execute("INSERT INTO event_ids VALUES (?, ?)", (run_id, event_id))
            cur.execute(
                "INSERT INTO events (run_id, name, payload, event_id) VALUES (?, ?, ?, ?)",
                (run_id, event, payload, event_id),
            )
            if tuple(found) == ("waiting", event):  # the run waits for it: due at once
                cur.execute(
                    "UPDATE runs SET wake_at = ?, updated_at = ? WHERE id = ?", (now, now, run_id)
                )
            return True

        return await self._tx("deliver_event", body)

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        kit.check_text(step, "step")
        kit.check_text(event, "event")

        def body(cur: sqlite3.Cursor, now: int) -> EventTake | None:
            if not self._fence(cur, lease, now):
                return None
            saved = _get_step(cur, lease.run_id, step)
            if saved is not None and saved.status == "completed":  # a retried take
                return EventTake(found=True, payload=saved.output)
            oldest = cur.execute(
                "SELECT seq, payload FROM events WHERE run_id = ? AND name = ? ORDER BY seq",
                (lease.run_id, event),
            ).fetchone()
            if oldest is None:
                return EventTake(found=False)
            # Consume the event and save it as the step's result: one transaction.
            cur.execute("DELETE FROM events WHERE seq = ?", (oldest[0],))
            _put_step(cur, lease.run_id, StepRecord(step, "completed", output=oldest[1]), now)
            cur.execute("UPDATE runs SET waiting_for = NULL WHERE id = ?", (lease.run_id,))
            return EventTake(found=True, payload=oldest[1])

        return await self._tx("take_event", body)

    # --8<-- [end:events]

    # --8<-- [start:children]
    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        # The parent's id, the step and the child: a run_id is required (the
        # engine derives it from the parent and the step), a key refused.
        kit.check_child_start(lease, step, new)
        child_id = new.run_id
        assert child_id is not None  # check_child_start made sure

        def body(cur: sqlite3.Cursor, now: int) -> RunRecord | None:
            # Fenced, but by a read: starting a child writes the child, not the
            # parent. Under the write lock, the lease cannot be lost before COMMIT.
            held = cur.execute(
                HELD_RUN, {"id": lease.run_id, "epoch": lease.epoch, "now": now}
            ).fetchone()
            if held is None:
                return None
            row = cur.execute(GET_RUN, (child_id,)).fetchone()
            if row is not None:
                existing = _run(row)
                if kit.child_of(existing, lease.run_id, step):
                    return existing  # a replayed step: the child it started, untouched
                message = f"run id {child_id!r} already exists"
                raise StorageError(message, operation="start_child", backend=BACKEND)
            # Created as create_run creates a run, plus the link to its parent;
            # the kit caps its deadline by the parent's (kit.child_deadline).
            child = kit.new_run_record(
                child_id, new, kit.from_epoch_us(now), parent=_run(held), parent_step=step
            )
            self._insert_run(cur, child)
            return child

        return await self._tx("start_child", body)

    async def wait_children(self, lease: Lease, step: StepRecord) -> bool | None:
        kit.check_text(step.name, "step")

        def body(cur: sqlite3.Cursor, now: int) -> bool | None:
            if not self._fence(cur, lease, now):
                return None
            _put_step(cur, lease.run_id, step, now)  # the engine's "waiting" record
            unfinished = {"parent": lease.run_id, "step": step.name}
            if not cur.execute(UNFINISHED_CHILD, unfinished).fetchone():
                return True  # every child has ended (or none was started): go on, lease kept
            # Parked with no lease. The end of its last child makes it due
            # (_wake_parent); until then only its deadline, if it has one, does.
            cur.execute(
                "UPDATE runs SET status = 'waiting', waiting_for = ?, wake_at = deadline_at,"
                " lease_expires_at = NULL WHERE id = ?",
                (CHILDREN_WAIT_PREFIX + step.name, lease.run_id),
            )
            _unblock(cur, lease.run_id, now)  # parked: its slots are free
            return False

        return await self._tx("wait_children", body)

    async def list_children(self, run_id: str) -> list[RunRecord]:
        kit.check_text(run_id, "run_id")

        def body(cur: sqlite3.Cursor, now: int) -> list[RunRecord]:
            return [_run(row) for row in cur.execute(LIST_CHILDREN, {"id": run_id})]

        return await self._tx("list_children", body, write=False)

    # --8<-- [end:children]

    # --8<-- [start:schedules]
    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        kit.check_text(spec.key, "key")
        kit.check_text(spec.workflow, "workflow")
        values = (spec.key, spec.workflow, spec.input, spec.recurrence)
        next_run_at = kit.to_epoch_us(spec.next_run_at, "next_run_at")

        def body(cur: sqlite3.Cursor, now: int) -> ScheduleRecord:
            row = cur.execute(UPSERT_SCHEDULE, (*values, next_run_at, now, now)).fetchone()
            return _schedule(row)

        return await self._tx("upsert_schedule", body)

    async def delete_schedule(self, key: str) -> bool:
        kit.check_text(key, "key")

        def body(cur: sqlite3.Cursor, now: int) -> bool:
            return cur.execute("DELETE FROM schedules WHERE key = ?", (key,)).rowcount == 1

        return await self._tx("delete_schedule", body)

    async def list_schedules(self) -> list[ScheduleRecord]:
        def body(cur: sqlite3.Cursor, now: int) -> list[ScheduleRecord]:
            return [_schedule(row) for row in cur.execute(LIST_SCHEDULES)]

        return await self._tx("list_schedules", body, write=False)

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        names = kit.check_stats_workflows(workflows)  # checked, sorted, without repeats
        if limit < 1 or names == []:
            return []
        query = {"limit": limit, "workflows": None if names is None else json.dumps(names)}

        def body(cur: sqlite3.Cursor, now: int) -> list[ScheduleRecord]:
            rows = cur.execute(DUE_SCHEDULES, {**query, "now": now})  # due by the store's clock
            return [_schedule(row) for row in rows]

        return await self._tx("due_schedules", body, write=False)

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        kit.check_text(key, "key")
        kit.check_new_run(run)
        next_us = kit.to_epoch_us(next_run_at, "next_run_at")
        slot_us = kit.to_epoch_us(slot, "slot")

        def body(cur: sqlite3.Cursor, now: int) -> RunRecord | None:
            # Exactly once: only the worker that moves next_run_at off this slot
            # creates the run, in the same transaction. A paused schedule fires nothing.
            if not cur.execute(
                "UPDATE schedules SET next_run_at = ?, updated_at = ?"
                " WHERE key = ? AND next_run_at = ? AND NOT paused",
                (next_us, now, key, slot_us),
            ).rowcount:
                return None
            return self._create(cur, now, run).run

        return await self._tx("claim_schedule_slot", body)

    async def set_schedule_paused(
        self, key: str, paused: bool, *, next_run_at: datetime | None = None
    ) -> ScheduleRecord | None:
        kit.check_text(key, "key")
        next_us = None if next_run_at is None else kit.to_epoch_us(next_run_at, "next_run_at")

        def body(cur: sqlite3.Cursor, now: int) -> ScheduleRecord | None:
            row = cur.execute(PAUSE_SCHEDULE, (bool(paused), next_us, now, key)).fetchone()
            return None if row is None else _schedule(row)

        return await self._tx("set_schedule_paused", body)

    # --8<-- [end:schedules]

    # --8<-- [start:listing]
    async def list_runs(
        self,
        *,
        status: Collection[RunStatus] | None = None,
        workflow: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        kit.check_list_limit(limit)
        if workflow is not None:
            kit.check_text(workflow, "workflow")
        # The kit's cursor: (created_at, id) of the last run of the previous
        # page; a malformed one raises ConfigError.
        after = kit.decode_cursor(cursor) if cursor is not None else None
        query = {
            "workflow": workflow,
            "statuses": None if status is None else json.dumps(list(status)),
            "after_at": None if after is None else kit.to_epoch_us(after[0]),
            "after_id": None if after is None else after[1],
            "limit": limit + 1,  # one more than asked: is there a next page?
        }

        def body(cur: sqlite3.Cursor, now: int) -> RunPage:
            rows = cur.execute(LIST_RUNS, query).fetchall()
            return kit.run_page([_run(row) for row in rows], limit)

        return await self._tx("list_runs", body, write=False)

    # --8<-- [end:listing]

    # --8<-- [start:purge]
    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        batch = kit.check_purge(older_than, batch)
        limit = kit.check_purge_limit(limit)
        age = kit.span_us(older_than)

        def delete(size: int, cur: sqlite3.Cursor, now: int) -> tuple[int, bool]:
            # Judged by finished_at, set when the run ended: a run that ends
            # while we purge is younger than the cut-off. NULL (unfinished) never
            # compares below it.
            doomed = cur.execute(
                "SELECT id FROM runs WHERE finished_at < ? ORDER BY finished_at, id LIMIT ?",
                (now - age, size),
            ).fetchall()
            cur.executemany("DELETE FROM steps WHERE run_id = ?", doomed)
            cur.executemany("DELETE FROM events WHERE run_id = ?", doomed)
            cur.executemany("DELETE FROM event_ids WHERE run_id = ?", doomed)
            # Deleting the row frees its idempotency key too.
            cur.executemany("DELETE FROM runs WHERE id = ?", doomed)
            return len(doomed), len(doomed) == size

        # The kit's loop: one transaction per batch, so other writers get the
        # lock in between, until a batch comes back short or `limit` is reached.
        return await kit.purge_in_batches(
            lambda size: self._tx("purge_finished", lambda cur, now: delete(size, cur, now)),
            batch,
            limit,
        )

    # --8<-- [end:purge]

    # --8<-- [start:workers]
    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        kit.check_worker(worker, ttl)  # names, counts and ttl: the same ConfigError everywhere
        span = kit.span_us(ttl)
        workflows = kit.encode_workflows(worker.workflows)
        info = (worker.id, worker.host, worker.pid, workflows, worker.concurrency, worker.in_flight)

        def body(cur: sqlite3.Cursor, now: int) -> WorkerRecord:
            # Lapsed entries go first: an entry left with this id is live,
            # and the upsert keeps its started_at.
            cur.execute("DELETE FROM workers WHERE expires_at <= ?", (now,))
            row = cur.execute(ANNOUNCE_WORKER, (*info, now, now, now + span)).fetchone()
            return _worker(row)

        return await self._tx("announce_worker", body)

    async def list_workers(self) -> list[WorkerRecord]:
        def body(cur: sqlite3.Cursor, now: int) -> list[WorkerRecord]:
            return [_worker(row) for row in cur.execute(LIST_WORKERS, (now,))]

        return await self._tx("list_workers", body, write=False)

    async def remove_worker(self, worker_id: str) -> bool:
        kit.check_text(worker_id, "worker_id")

        def body(cur: sqlite3.Cursor, now: int) -> bool:
            # Only a live entry counts; a lapsed one goes at the next announcement.
            deleted = cur.execute(
                "DELETE FROM workers WHERE id = ? AND expires_at > ?", (worker_id, now)
            )
            return deleted.rowcount == 1

        return await self._tx("remove_worker", body)

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        names = kit.check_stats_workflows(workflows)  # checked, sorted, without repeats
        query = {"workflows": None if names is None else json.dumps(names)}

        def body(cur: sqlite3.Cursor, now: int) -> list[QueueStats]:
            counts = [
                (workflow, status, count, None if since is None else kit.from_epoch_us(since))
                for workflow, status, count, since in cur.execute(QUEUE_STATS, query)
            ]
            # The kit assembles the records: zeros for named workflows with no
            # unfinished run, and the earliest wake_at of the pending ones.
            return kit.queue_stats_from_counts(counts, names)

        return await self._tx("queue_stats", body, write=False)

    # --8<-- [end:workers]

    # --8<-- [start:dashboard]
    async def find_runs_by_key(self, idempotency_key: str, *, limit: int = 20) -> list[RunRecord]:
        kit.check_text(idempotency_key, "idempotency_key")
        # The same ConfigError on every backend; SQLite binds at most a 64-bit
        # integer, and a larger limit asks for every row anyway.
        limit = min(kit.check_count(limit, "limit"), LARGEST_LIMIT)

        def body(cur: sqlite3.Cursor, now: int) -> list[RunRecord]:
            return [_run(row) for row in cur.execute(RUNS_BY_KEY, (idempotency_key, limit))]

        return await self._tx("find_runs_by_key", body, write=False)

    async def list_buffered_events(self, run_id: str, *, limit: int = 100) -> list[BufferedEvent]:
        kit.check_text(run_id, "run_id")
        limit = min(kit.check_count(limit, "limit"), LARGEST_LIMIT)

        def body(cur: sqlite3.Cursor, now: int) -> list[BufferedEvent]:
            # A missing run has no events, and neither has a finished one:
            # _end deleted them in the transaction that ended it.
            rows = cur.execute(BUFFERED_EVENTS, (run_id, limit))
            return [BufferedEvent(name, payload, event_id) for name, payload, event_id in rows]

        return await self._tx("list_buffered_events", body, write=False)

    async def finished_history(self, minutes: int) -> list[FinishedMinute]:
        kit.check_count(minutes, "minutes", most=MAX_HISTORY_MINUTES)
        minute = 60_000_000  # in microseconds, as the times are stored

        def body(cur: sqlite3.Cursor, now: int) -> list[FinishedMinute]:
            # The current minute by the store's clock and the minutes - 1
            # before it; a finish stored later than this minute (by a host
            # clock that stepped back since) is not in any of them.
            current = now // minute
            span = {"since": (current - minutes + 1) * minute, "until": (current + 1) * minute}
            counts = [
                (kit.from_epoch_us(at * minute), status, count)
                for at, status, count in cur.execute(FINISHED_BY_MINUTE, span)
            ]
            # The kit assembles the records, oldest first, minutes without a finish left out.
            return kit.finished_minutes_from_counts(counts)

        return await self._tx("finished_history", body, write=False)

    # --8<-- [end:dashboard]


# The kit maps rows in its column order; times are read with kit.from_epoch_us.
def _run(row: Any) -> RunRecord:
    return kit.run_from_row(row, kit.from_epoch_us)


def _step(row: Any) -> StepRecord:
    return kit.step_from_row(row, kit.from_epoch_us)


def _schedule(row: Any) -> ScheduleRecord:
    return kit.schedule_from_row(row, kit.from_epoch_us)


def _worker(row: Any) -> WorkerRecord:
    return kit.worker_from_row(row, kit.from_epoch_us)


def _steps(cur: sqlite3.Cursor, run_id: str) -> dict[str, StepRecord]:
    rows = cur.execute(GET_STEPS, (run_id,)).fetchall()
    return {row[0]: _step(row) for row in rows}


def _get_step(cur: sqlite3.Cursor, run_id: str, name: str) -> StepRecord | None:
    row = cur.execute(GET_STEP, (run_id, name)).fetchone()
    return None if row is None else _step(row)


def _put_step(
    cur: sqlite3.Cursor, run_id: str, step: StepRecord, now: int, wake_at: int | None = None
) -> None:
    """Insert or replace a step record; ``completed_at`` is always the store's now."""
    if wake_at is None and step.wake_at is not None:
        wake_at = kit.to_epoch_us(step.wake_at, "wake_at")
    cur.execute(
        "INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, step.name, step.status, step.output, step.error, step.attempts, wake_at, now),
    )


def _due(cur: sqlite3.Cursor, run_id: str, wake_at: int | None) -> int | None:
    """When a sleeping or waiting run becomes claimable: at ``wake_at``
    (``None``: only an event wakes it), or at the run's deadline if sooner,
    so that the engine can fail it then (the kit's ``due_by_deadline``)."""
    (deadline,) = cur.execute("SELECT deadline_at FROM runs WHERE id = ?", (run_id,)).fetchone()
    wake = None if wake_at is None else kit.from_epoch_us(wake_at)
    due = kit.due_by_deadline(wake, None if deadline is None else kit.from_epoch_us(deadline))
    return None if due is None else kit.to_epoch_us(due)


# --8<-- [start:ending]
def _end(
    cur: sqlite3.Cursor, run_id: str, now: int, status: str, output: str | None, error: str | None
) -> None:
    """End a run: no lease, no deadline, a finish time for purges, and its
    buffered events dropped in the same transaction (its event ids stay).
    The end of a child may wake its parent, in that transaction too, and so
    may the end of a run with limits let a blocked run go (_unblock,
    _pass_turn). An ended run is never blocked: a cancel may end a run a
    claim had blocked."""
    was, blocked = cur.execute(
        "SELECT status, blocked_by FROM runs WHERE id = ?", (run_id,)
    ).fetchone()
    parent_id, parent_step = cur.execute(
        "UPDATE runs SET status = ?, output = ?, error = ?, lease_expires_at = NULL,"
        " wake_at = NULL, waiting_for = NULL, blocked_by = NULL, finished_at = ?,"
        " updated_at = ? WHERE id = ? RETURNING parent_id, parent_step",
        (status, output, error, now, now, run_id),
    ).fetchone()
    cur.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
    if was == "running":  # its slots are free
        _unblock(cur, run_id, now)
    elif blocked is None:  # ended before any claim took it (a cancel, a fail without lease)
        _pass_turn(cur, run_id, now)
    if parent_id is not None:
        _wake_parent(cur, parent_id, parent_step, now)


def _wake_parent(cur: sqlite3.Cursor, parent_id: str, step: str, now: int) -> None:
    """A child that ``parent_id`` started at ``step`` has just ended: if the
    parent waits for that step's children and none is left unfinished, it is
    due at once. This runs in the transaction that ends the child, and
    wait_children checks for unfinished children in the one that parks the
    parent: whichever commits second sees the other's write, so no end is missed."""
    cur.execute(
        "UPDATE runs SET wake_at = :now, updated_at = :now"
        " WHERE id = :parent AND status = 'waiting' AND waiting_for = :waiting_for"
        " AND NOT EXISTS (SELECT 1 FROM runs WHERE parent_id = :parent AND parent_step = :step"
        "  AND status NOT IN ('completed', 'failed', 'cancelled'))",  # no UNFINISHED_CHILD
        {"now": now, "parent": parent_id, "step": step, "waiting_for": CHILDREN_WAIT_PREFIX + step},
    )


def _cancel_below(cur: sqlite3.Cursor, run_id: str, now: int) -> None:
    """Cancel every unfinished run below ``run_id`` (its children, theirs, and
    so on), each ended as a cancel of its own would end it. The walk goes
    through finished runs too: a completed child's children are still below.
    Every parent here is cancelled or finished when this returns, so a wake
    that one of these ends gives its parent is undone by that parent's own cancel."""
    below = cur.execute(
        # UNION, not UNION ALL: the walk ends even if ids ever formed a cycle.
        "WITH RECURSIVE below (id) AS ("
        " SELECT id FROM runs WHERE parent_id = ?"
        " UNION SELECT runs.id FROM runs JOIN below ON runs.parent_id = below.id)"
        " SELECT id FROM runs WHERE id IN below"
        " AND status NOT IN ('completed', 'failed', 'cancelled')",
        (run_id,),
    ).fetchall()  # read them all before the first write
    for (child_id,) in below:
        _end(cur, child_id, now, "cancelled", None, None)


# --8<-- [end:ending]


# --8<-- [start:limits]
def _full_limit(cur: sqlite3.Cursor, limits: tuple[ConcurrencyLimit, ...]) -> str | None:
    """The key of the first of ``limits`` that is full (``max`` runs holding
    it are running), or None. The claim calls this under the write lock, after
    its earlier takes: the runs it has just claimed are running, so they count."""
    for limit in limits:
        (holders,) = cur.execute(HOLDERS, {"key": limit.key}).fetchone()
        if holders >= limit.max:
            return limit.key
    return None


def _unblock(cur: sqlite3.Cursor, run_id: str, now: int) -> None:
    """``run_id`` has just stopped running (ended, handed back, or parked in
    a sleep or a wait), in the transaction that stopped it: each of its
    limits has a free slot, so for each of its keys the blocked run a claim
    would take first is claimable again. Only that one: one slot was freed,
    and a claim that finds the slot taken after all blocks the run again.
    Being in the same transaction as the stop is what makes it safe: no
    claim can count the holders between the two."""
    for limit in _limits_of(cur, run_id):
        cur.execute(UNBLOCK_FIRST, {"key": limit.key, "now": now})


def _pass_turn(cur: sqlite3.Cursor, run_id: str, now: int) -> None:
    """``run_id`` has just ended without running, and was not blocked: it
    may have been the run a stop let go, holding the freed slot's turn. So
    it passes the turn on: for each of its keys that has room, the first
    blocked run is claimable again. Without this, a cancel of the run let
    go would leave the runs behind it blocked, with the key free and no
    holder left whose stop could let them go."""
    for limit in _limits_of(cur, run_id):
        (holders,) = cur.execute(HOLDERS, {"key": limit.key}).fetchone()
        if holders < limit.max:
            cur.execute(UNBLOCK_FIRST, {"key": limit.key, "now": now})


def _limits_of(cur: sqlite3.Cursor, run_id: str) -> tuple[ConcurrencyLimit, ...]:
    """The run's limits, as created."""
    row = cur.execute(
        "SELECT limit_key1, limit_max1, limit_key2, limit_max2 FROM runs WHERE id = ?", (run_id,)
    ).fetchone()
    return kit.limits_from_columns(*row)


# --8<-- [end:limits]


# --8<-- [start:rates]
def _full_rate(
    cur: sqlite3.Cursor, rates: tuple[RateLimit, ...], now: int
) -> tuple[RateLimit, int] | None:
    """The first of ``rates`` whose window (the period ending now) already
    holds ``max`` claims, and when it has room again: when the ``max``-th
    latest of them leaves it. None if every one has room. The claims made
    earlier in the same claim are in the table already, so they count."""
    for rate in rates:
        period = kit.span_us(rate.period)
        query = {"key": rate.key, "since": now - period, "skip": rate.max - 1}
        row = cur.execute(NTH_CLAIM, query).fetchone()
        if row is not None:
            return rate, row[0] + period
    return None


def _record_claim(cur: sqlite3.Cursor, run: RunRecord, now: int) -> None:
    """Note a claim of ``run`` at ``now`` for each of its rate keys, and
    forget that key's claims that have left the window."""
    for rate in run.rates:
        since = now - kit.span_us(rate.period)
        cur.execute("DELETE FROM rate_claims WHERE key = ? AND at <= ?", (rate.key, since))
        cur.execute("INSERT INTO rate_claims (key, at) VALUES (?, ?)", (rate.key, now))


def _release_rates(cur: sqlite3.Cursor, now: int) -> None:
    """At the start of each claim: for each rate key whose noted time has
    come, let its first blocked runs go, as many as its window has room for.
    If some are still blocked, note when the oldest claim in the window
    leaves it, and look again then."""
    due = cur.execute("SELECT key FROM rate_waits WHERE at <= ?", (now,)).fetchall()
    for (key,) in due:
        cur.execute("DELETE FROM rate_waits WHERE key = ?", (key,))
        block = kit.rate_block(key)
        first = cur.execute(
            "SELECT rate_key1, rate_max1, rate_period1, rate_key2, rate_max2, rate_period2"
            " FROM runs WHERE blocked_by = ? LIMIT 1",
            (block,),
        ).fetchone()
        if first is None:  # its blocked runs have gone meanwhile (ended, or debounced)
            continue
        rate = next(rate for rate in kit.rates_from_columns(*first) if rate.key == key)
        period = kit.span_us(rate.period)
        count, oldest = cur.execute(WINDOW, {"key": key, "since": now - period}).fetchone()
        if count < rate.max:
            cur.execute(UNBLOCK_SOME, {"block": block, "room": rate.max - count, "now": now})
        if cur.execute("SELECT 1 FROM runs WHERE blocked_by = ?", (block,)).fetchone():
            at = (now if oldest is None else oldest) + period
            cur.execute(WAIT_FOR_RATE, {"key": key, "at": at})


def _debounce(cur: sqlite3.Cursor, open_run: RunRecord, new: NewRun, now: int) -> RunRecord:
    """A debounced create: ``open_run`` takes ``new``'s input, priority,
    limits, rates, headers, version and fingerprint, is no longer blocked,
    and is due ``new.delay`` from now (never after its deadline). The kit
    computes the record; the row is written to match it."""
    run = kit.debounced_record(open_run, new, kit.from_epoch_us(now))
    assert run.wake_at is not None  # pending or delayed: it has a due time
    cur.execute(
        "UPDATE runs SET status = ?, input = ?, priority = ?, limit_key1 = ?, limit_max1 = ?,"
        " limit_key2 = ?, limit_max2 = ?, rate_key1 = ?, rate_max1 = ?, rate_period1 = ?,"
        " rate_key2 = ?, rate_max2 = ?, rate_period2 = ?, headers = ?, version = ?,"
        " fingerprint = ?, blocked_by = NULL, wake_at = ?, updated_at = ? WHERE id = ?",
        (
            run.status,
            run.input,
            run.priority,
            *kit.limit_columns(run.limits),
            *kit.rate_columns(run.rates),
            kit.headers_column(run.headers),
            run.version,
            run.fingerprint,
            kit.to_epoch_us(run.wake_at),
            now,
            run.id,
        ),
    )
    return run


# --8<-- [end:rates]
