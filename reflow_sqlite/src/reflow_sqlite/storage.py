"""``sqlite://``: the embedded SQLite backend.

One file holds every run, step, event and schedule. Several processes on one
host may share the file (WAL mode); SQLite serializes their writes and every
write transaction starts with ``BEGIN IMMEDIATE``, so two claimers never take
the same run.

How an operation reaches the database: each one is written once, as a
generator that yields ``(sql, parameters)`` and receives the fetched rows (a
*script*, :mod:`reflow_sqlite._scripts`), with its statements in
``queries.sql``. A script runs as one transaction in one call on aiosqlite's
worker thread, so nothing else can interleave with it and it costs a single
hop from the event loop. When that fast path is unavailable (see
:meth:`SQLiteStorage.initialize`), the same script is driven statement by
statement through aiosqlite's public coroutines under a lock: slower, equally
correct (:mod:`reflow_sqlite._thread`).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar, cast

import aiosqlite

from reflow_core.adapter import (
    Lifecycle,
    check_child_start,
    check_claim_versions,
    check_count,
    check_duration,
    check_list_limit,
    check_new_run,
    check_new_runs,
    check_purge,
    check_purge_limit,
    check_run_ids,
    check_stats_workflows,
    check_status_update,
    check_text,
    check_worker,
    decode_cursor,
    from_epoch_us,
    new_run_id,
    new_run_ids,
    purge_in_batches,
    span_us,
    to_epoch_us,
    utcnow,
)
from reflow_core.batching import GroupCommit
from reflow_core.errors import ConfigError, IdempotencyConflictError, StorageError
from reflow_core.options import unknown_option
from reflow_core.storage import (
    MAX_HISTORY_MINUTES,
    BufferedEvent,
    ClaimedRun,
    CreateResult,
    EventTake,
    FinishedMinute,
    Lease,
    NewRun,
    QueueStats,
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

from . import _scripts as scripts
from ._options import (
    BACKEND,
    DEFAULT_BUSY_TIMEOUT_MS,
    KEYWORD_OPTIONS,
    busy_timeout_option,
    database_path,
    group_commit_option,
    parse_sqlite_url,
    synchronous_option,
)
from ._schema import SCHEMA_VERSION, check_identity, configure_script, migrate_script
from ._scripts import BatchItemFailed, Script, StepRow
from ._thread import (
    Mode,
    connect,
    copy_error,
    disconnect,
    run_on_thread,
    run_statements,
    storage_errors,
)

__all__ = ["SQLiteStorage", "parse_sqlite_url"]

# Group commit: concurrent step saves wait for the writer and then share one
# transaction. A batch never holds more than this many saves.
_MAX_BATCH = 256
# One claim takes at most this many runs (each id is one SQL parameter).
MAX_CLAIM = 10_000
# A read's LIMIT is bound as a 64-bit integer: a larger limit asks for every row.
_MAX_LIMIT = 2**63 - 1

_T = TypeVar("_T")
_NOTADB_CODES = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT})

_Save = tuple[Lease, StepRow, int]
"""A queued step save: the lease, the step, the lease extension in microseconds."""


class SQLiteStorage:
    """The Reflow storage protocol on one SQLite file, through aiosqlite.

    ``path`` is the database file (created if missing; its directory must
    exist). Keyword options:

    ``synchronous`` (default ``"NORMAL"``)
        ``PRAGMA synchronous`` for this connection, in WAL mode:

        * ``NORMAL``: a commit survives a crash of the process, but the last
          commits may be lost (never corrupted) if the machine loses power or
          the OS crashes before the next checkpoint. A lost step save means the
          step runs again: still at-least-once.
        * ``FULL``: the WAL is synced on every commit, so a commit survives
          power loss and OS crashes too. Slower per commit.
        * ``EXTRA``: as ``FULL`` (its extra directory sync only matters for
          rollback journals).
        * ``OFF``: no syncs at all. Survives a process crash, but an OS crash
          or power loss can corrupt the database. Unsafe; for throwaway data.

    ``busy_timeout`` (default 5000)
        Milliseconds (an ``int``, or a ``timedelta``) to wait for another
        process's write lock before failing with ``StorageError``.

    ``clock``
        A callable returning the storage's *now* as an aware datetime; every
        lease, sleep and wait deadline is judged by it. Defaults to the local
        clock. It is called on the connection's worker thread. For tests.

    ``group_commit`` (default ``True``)
        Concurrent :meth:`save_step_result` calls share one transaction, each
        still fenced on its own and told its own outcome.

    Several processes may share the file, on one host only: WAL needs shared
    memory, so never put the file on a network filesystem.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        busy_timeout: int | timedelta = DEFAULT_BUSY_TIMEOUT_MS,
        clock: Callable[[], datetime] | None = None,
        group_commit: bool = True,
    ) -> None:
        self._path = database_path(path)
        self._synchronous = synchronous_option(synchronous)
        self._busy_timeout_ms = busy_timeout_option(busy_timeout)
        if clock is not None and not callable(clock):
            raise ConfigError("clock must be a callable returning a datetime", option="clock")
        self._clock: Callable[[], datetime] = clock or utcnow
        self._group_commit = group_commit_option(group_commit)
        self._life = Lifecycle(BACKEND)
        self._conn: aiosqlite.Connection | None = None
        self._raw: sqlite3.Connection | None = None
        self._hook: Callable[..., Awaitable[Any]] | None = None
        self._use_private_hook = True
        self._public_lock = asyncio.Lock()
        self._init_lock = asyncio.Lock()
        # One writer: one batch of saves at a time.
        self._saves: GroupCommit[_Save, bool | BaseException] = GroupCommit(
            self._save_batch, max_batch=_MAX_BATCH
        )
        self._saving = 0  # saves submitted and not yet answered
        self._saved: asyncio.Event | None = None  # set when _saving drops to 0
        self._closing = False

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> SQLiteStorage:
        """Build a storage from a ``sqlite://`` URL (see :func:`parse_sqlite_url`).

        Query options (``synchronous``, ``busy_timeout`` in milliseconds,
        ``group_commit``) and keyword ``options`` (the same, plus ``clock``)
        are merged; a keyword wins over the same option in the URL. Unknown
        options raise :class:`~reflow_core.errors.ConfigError`.
        """
        path, query = parse_sqlite_url(url)
        merged: dict[str, Any] = {**query, **options}
        for name in merged:
            if name not in KEYWORD_OPTIONS:
                raise unknown_option(name, KEYWORD_OPTIONS, kind="sqlite")
        return cls(path, **merged)

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    @property
    def synchronous(self) -> str:
        """The ``PRAGMA synchronous`` level in use."""
        return self._synchronous

    @property
    def schema_version(self) -> int:
        """The schema version this code writes (``PRAGMA user_version``): once
        :meth:`initialize` returns, the file is at it (an older one was
        migrated; a newer one was refused)."""
        return SCHEMA_VERSION

    def __repr__(self) -> str:
        return f"SQLiteStorage({self._path!r}, synchronous={self._synchronous!r})"

    # -- plumbing ------------------------------------------------------------------

    async def _call(
        self, operation: str, factory: Callable[[int], Script[_T]], mode: Mode = "write"
    ) -> _T:
        """Run one script as one transaction; ``write`` transactions use BEGIN IMMEDIATE."""
        self._life.check(operation)
        conn = self._conn
        assert conn is not None
        with storage_errors(operation):
            if self._hook is not None:
                result: _T = await self._hook(run_on_thread, self._raw, factory, mode, self._clock)
                return result
            async with self._public_lock:
                if self._life.closed:
                    raise StorageError("storage is closed", operation=operation, backend=BACKEND)
                return await run_statements(conn, factory, mode, self._clock)

    # -- lifecycle -------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the file, then create or migrate the schema.

        Refusals happen before anything is written (the switch to WAL writes
        the file): a file that is not a SQLite database, or a SQLite database
        of another application, raises :class:`StorageError`; a schema newer
        than this code raises :class:`SchemaVersionError`. Migrations run in
        one ``BEGIN IMMEDIATE`` transaction, so processes initializing at the
        same time apply them once. Idempotent.

        Each operation runs as one call on aiosqlite's worker thread through
        its private ``Connection._execute``; if an aiosqlite release lacks it,
        the same transactions go through the public API instead.
        """
        async with self._init_lock:
            if self._conn is not None and not self._life.closed:
                return
            conn = await connect(self._path, self._busy_timeout_ms)
            self._conn = conn
            self._life.initialized = True
            self._closing = False
            self._life.closed = False
            hook = getattr(conn, "_execute", None) if self._use_private_hook else None
            self._hook = cast(Callable[..., Awaitable[Any]], hook) if callable(hook) else None
            self._raw = conn._conn if self._hook is not None else None
            try:
                await self._prepare()
            except BaseException:
                self._conn = None
                self._life.initialized = False
                self._hook = None
                self._raw = None
                with suppress(sqlite3.Error, ValueError):
                    await conn.close()
                raise

    async def _prepare(self) -> None:
        try:
            identity = await self._call("initialize", scripts.inspect, "read")
        except StorageError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, sqlite3.DatabaseError)
                and getattr(cause, "sqlite_errorcode", None) in _NOTADB_CODES
            ):
                raise StorageError(
                    f"{self._path} is not a SQLite database (or it is corrupt): {cause}",
                    operation="initialize",
                    backend=BACKEND,
                ) from cause
            raise
        needs_migration = check_identity(self._path, *identity)
        await self._configure()
        if needs_migration:
            await self._call("initialize", lambda now: migrate_script(now, self._path), "write")

    async def _configure(self) -> None:
        """WAL mode and the synchronous level. Switching a file to WAL takes
        a lock SQLite does not wait for (its busy handler is not called), so
        processes opening a new file at once may find it held: the switch is
        tried again, with a short back-off, for up to the busy timeout."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self._busy_timeout_ms / 1000
        pause = 0.005
        while True:
            try:
                await self._call(
                    "initialize",
                    lambda now: configure_script(now, self._path, self._synchronous),
                    "read",
                )
                return
            except StorageError as exc:
                cause = exc.__cause__
                code = getattr(cause, "sqlite_errorcode", None) or 0
                locked = isinstance(cause, sqlite3.OperationalError) and (code & 0xFF) in (
                    sqlite3.SQLITE_BUSY,
                    sqlite3.SQLITE_LOCKED,
                )
                if not locked or loop.time() + pause > until:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def close(self) -> None:
        """Flush pending step saves, checkpoint the WAL into the file
        (``wal_checkpoint(TRUNCATE)``) and close the connection. Idempotent;
        a close during :meth:`initialize` waits for it to end first."""
        async with self._init_lock:
            await self._close()

    async def _close(self) -> None:
        if self._life.closed or self._conn is None:
            self._life.closed = True
            return
        conn = self._conn
        self._closing = True  # refuse new step saves, finish the queued ones
        while self._saving:
            if self._saved is None:
                self._saved = asyncio.Event()
            await self._saved.wait()
        if self._conn is not conn:
            return  # a concurrent close() got there first
        self._life.closed = True
        self._conn = None
        self._hook = None
        self._raw = None
        # With the public driver a transaction may still be in progress.
        async with self._public_lock:
            await disconnect(conn)

    # -- runs ----------------------------------------------------------------------

    async def create_run(self, new: NewRun) -> CreateResult:
        """Create a ``pending`` run (``delayed`` until now plus ``new.delay``,
        by the storage clock, if that is positive), or return the run already
        holding its idempotency key. With ``new.deadline``, ``deadline_at`` is
        now plus it, and a delayed run is due at the earlier of the two."""
        check_new_run(new)
        run_id = new.run_id or new_run_id()
        return await self._call("create_run", lambda now: scripts.create(now, new, run_id))

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        """Create several runs in one transaction: each item gets the outcome
        :meth:`create_run` would give it if they were created one after
        another (an idempotency conflict returned in its place, not raised).

        Every item is checked first; a caller-chosen run id that is taken
        raises :class:`StorageError` naming the item, and nothing of the
        batch is written. The runs without a debounce key go in with a few
        multi-row inserts, and the runs holding the idempotency keys found
        taken are read with one query; items with a debounce key are done
        one by one in the same transaction.
        """
        self._life.check("create_runs")
        check_new_runs(news, backend=BACKEND)
        if not news:
            return []
        items = list(news)
        fresh = iter(new_run_ids(len(items)))
        ids = [new.run_id or next(fresh) for new in items]
        return await self._call("create_runs", lambda now: scripts.create_many(now, items, ids))

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs (lapsed leases first, then by priority and
        due time) with their steps; a run whose concurrency limit is full is
        marked blocked and passed over, and no claim reads it until a run
        holding that key stops running.

        With ``versions``, a workflow it names gives only runs of the
        versions it lists: the claim's reads of the claim indexes pass the
        others over (a filter on the same walks), so they are neither
        blocked nor changed, and as many of them as there are never keep a
        served run from being taken. Without it the statements are those of
        a claim of every version.

        One call claims at most :data:`MAX_CLAIM` runs.
        """
        self._life.check("claim_runs")
        served = check_claim_versions(workflows, versions)
        names = [check_text(name, "workflow") for name in dict.fromkeys(workflows)]
        check_duration(lease, "lease")
        if limit <= 0 or not names:
            return []
        limit = min(limit, MAX_CLAIM)
        lease_us = span_us(lease)
        return await self._call(
            "claim_runs", lambda now: scripts.claim(now, names, limit, lease_us, served)
        )

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        """Fenced: extend the lease to ``now + extend``."""
        extend_us = span_us(check_duration(extend, "extend"))
        return await self._call(
            "heartbeat_run", lambda now: scripts.heartbeat(now, lease, extend_us)
        )

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        """Fenced: upsert ``step`` and extend the lease, atomically.

        With group commit, saves that arrive while the writer is busy share
        the next transaction; each is fenced on its own.
        """
        self._life.check("save_step_result")
        if self._closing:
            raise StorageError("storage is closed", operation="save_step_result", backend=BACKEND)
        check_text(step.name, "step")
        row = StepRow.of(step)
        extend_us = span_us(check_duration(extend, "extend"))
        if not self._group_commit:
            return await self._call(
                "save_step_result", lambda now: scripts.save_step(now, lease, row, extend_us)
            )
        self._saving += 1
        try:
            outcome = await self._saves.submit((lease, row, extend_us))
        finally:
            self._saving -= 1
            if not self._saving and self._saved is not None:
                self._saved.set()
                self._saved = None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _save_batch(self, items: Sequence[_Save]) -> Sequence[bool | BaseException]:
        """The group-commit writer: one transaction for the batch, each save
        fenced on its own; each caller gets its own outcome or exception."""
        try:
            return await self._call("save_step_result", lambda now: scripts.save_batch(now, items))
        except BatchItemFailed:
            # One save failed for reasons of its own (not its fence): the
            # batch was rolled back; give every save its own transaction.
            return [await self._save_one(item) for item in items]
        except Exception as exc:
            return [copy_error(exc) for _ in items]

    async def _save_one(self, item: _Save) -> bool | BaseException:
        lease, row, extend_us = item
        try:
            return await self._call(
                "save_step_result", lambda now: scripts.save_step(now, lease, row, extend_us)
            )
        except Exception as exc:
            return exc

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        """Fenced: optional last step, terminal status, lease dropped, in one transaction."""
        row = None if step is None else StepRow.of(step)
        if step is not None:
            check_text(step.name, "step")
        return await self._call(
            "finish_run", lambda now: scripts.finish(now, lease, status, output, error, row)
        )

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        """Hand a run back (``pending``, with its lease) or end it (``failed``/``cancelled``)."""
        self._life.check("update_run_status")
        check_text(run_id, "run_id")
        check_status_update(status, lease)
        if lease is not None and lease.run_id != run_id:
            return False
        return await self._call(
            "update_run_status",
            lambda now: scripts.update_status(now, run_id, status, lease, error),
        )

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        """Fenced: sleep until a deadline fixed the first time ``step`` is reached
        (returned); the run is claimable from then, or from its ``deadline_at``
        if that is earlier."""
        check_text(step, "step")
        duration_us = span_us(check_duration(duration, "duration"))
        wake_at = await self._call(
            "sleep_run", lambda now: scripts.sleep(now, lease, step, duration_us)
        )
        return None if wake_at is None else from_epoch_us(wake_at)

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        """Fenced: wait for ``event`` (ready at once if one is buffered). A
        waiting run is claimable from the wait's deadline, or from its
        ``deadline_at`` if that is earlier or the wait has none."""
        check_text(step, "step")
        check_text(event, "event")
        timeout_us = None if timeout is None else span_us(check_duration(timeout, "timeout"))
        outcome = await self._call(
            "wait_run", lambda now: scripts.wait(now, lease, step, event, timeout_us)
        )
        if outcome is None:
            return None
        ready, deadline = outcome
        return WaitResult(
            ready=ready, deadline=None if deadline is None else from_epoch_us(deadline)
        )

    async def deliver_event(
        self,
        run_id: str,
        event: str,
        payload: str,
        *,
        event_id: str | None = None,
        max_buffered: int | None = None,
    ) -> bool:
        """Buffer an event (deduplicated by ``event_id``) and wake a run waiting
        for it. With ``max_buffered``, a run already holding that many
        untaken events refuses it with
        :class:`~reflow_core.errors.EventBufferFullError`, in the same
        transaction as the write."""
        check_text(run_id, "run_id")
        check_text(event, "event")
        if event_id is not None:
            check_text(event_id, "event_id")
        return await self._call(
            "deliver_event",
            lambda now: scripts.deliver(now, run_id, event, payload, event_id, max_buffered),
        )

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        """Fenced: consume the oldest buffered ``event`` as the result of wait step ``step``."""
        check_text(step, "step")
        check_text(event, "event")
        return await self._call("take_event", lambda now: scripts.take(now, lease, step, event))

    # -- child runs ------------------------------------------------------------------

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        """Fenced on the parent's lease: create ``new`` as a child of its run at
        ``step``, or return the child a replay of that step already started;
        ``None`` if the lease is lost. The child's ``deadline_at`` is at the
        latest its parent's."""
        check_child_start(lease, step, new)
        return await self._call(
            "start_child", lambda now: scripts.start_child(now, lease, step, new)
        )

    async def wait_children(self, lease: Lease, step: StepRecord) -> bool | None:
        """Fenced: save ``step``; True if no child of the run at that step is
        unfinished, else park the run ``waiting`` until the end of its last
        one (which wakes it in the same transaction) and return False."""
        check_text(step.name, "step")
        row = StepRow.of(step)
        return await self._call("wait_children", lambda now: scripts.wait_children(now, lease, row))

    async def list_children(self, run_id: str) -> list[RunRecord]:
        """The run's children in creation order (none for a missing run)."""
        check_text(run_id, "run_id")
        return await self._call(
            "list_children", lambda now: scripts.list_children(now, run_id), "read"
        )

    async def now(self) -> datetime:
        """The storage clock (the ``clock`` option, else the local clock), in
        the microseconds the database keeps: the *now* every deadline is
        judged by."""
        self._life.check("now")
        return from_epoch_us(to_epoch_us(self._clock(), "clock"))

    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or ``None``."""
        check_text(run_id, "run_id")
        return await self._call("get_run", lambda now: scripts.get_run(now, run_id), "read")

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        """The stored runs among ``run_ids``, by id, each as :meth:`get_run`
        reads it: one ``SELECT ... WHERE id IN (...)`` for the whole set (at
        most :data:`~reflow_core.storage.MAX_GET_RUNS` ids), so every run is
        read from the same snapshot. Missing runs are absent; no ids, no read."""
        self._life.check("get_runs")
        ids = check_run_ids(run_ids)
        if not ids:
            return {}
        return await self._call("get_runs", lambda now: scripts.get_runs(now, ids), "read")

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        """The run's saved steps by name, in the order they were first saved."""
        check_text(run_id, "run_id")
        return await self._call(
            "get_step_results", lambda now: scripts.get_steps(now, run_id), "read"
        )

    async def list_runs(
        self,
        *,
        status: Collection[RunStatus] | None = None,
        workflow: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        """Runs newest first, keyset-paginated on ``(created_at, id)``."""
        self._life.check("list_runs")
        check_list_limit(limit)
        if workflow is not None:
            check_text(workflow, "workflow")
        after: tuple[int, str] | None = None
        if cursor is not None:
            created, last_id = decode_cursor(cursor)
            after = (to_epoch_us(created, "cursor"), last_id)
        statuses = None if status is None else sorted(set(status))
        if statuses is not None and not statuses:
            return RunPage([], None)
        return await self._call(
            "list_runs",
            lambda now: scripts.list_runs(now, statuses, workflow, limit, after),
            "read",
        )

    async def requeue_run(self, run_id: str) -> bool:
        """Make a ``failed`` or ``cancelled`` run ``pending`` again, dropping
        failed steps and its ``deadline_at``."""
        check_text(run_id, "run_id")
        return await self._call("requeue_run", lambda now: scripts.requeue(now, run_id))

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        """Delete runs that finished (completed, failed or cancelled) more than
        ``older_than`` ago by the storage clock, with their steps, events and
        event ids, oldest first. Returns how many runs were deleted.

        Each transaction deletes at most ``batch`` runs and holds the write
        lock only that long, so workers keep going while a large backlog is
        purged; ``limit`` bounds the runs this call deletes in all (``None``:
        every one due). A run is judged by the time it finished, stored when
        it ended: one that finishes while a purge runs is younger than the
        cut-off and stays. Unfinished runs are never touched. Idempotency
        keys of deleted runs become free again, so keep finished runs for
        longer than any client may retry an enqueue.
        """
        self._life.check("purge_finished")
        batch = check_purge(older_than, batch)
        limit = check_purge_limit(limit)
        age_us = span_us(older_than)

        async def delete(size: int) -> tuple[int, bool]:
            deleted = await self._call(
                "purge_finished", lambda now: scripts.purge(now, age_us, size)
            )
            return deleted, deleted == size

        return await purge_in_batches(delete, batch, limit)

    # -- schedules -------------------------------------------------------------------

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        """Create or replace a schedule, keeping its cadence if the recurrence is unchanged."""
        check_text(spec.key, "key")
        check_text(spec.workflow, "workflow")
        next_run_at = to_epoch_us(spec.next_run_at, "next_run_at")
        return await self._call(
            "upsert_schedule", lambda now: scripts.upsert_schedule(now, spec, next_run_at)
        )

    async def delete_schedule(self, key: str) -> bool:
        """Delete a schedule; False if there was none."""
        check_text(key, "key")
        return await self._call("delete_schedule", lambda now: scripts.delete_schedule(now, key))

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Every schedule, ordered by key."""
        return await self._call("list_schedules", scripts.list_schedules, "read")

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        """Schedules due by the storage clock, earliest first (then by key);
        with ``workflows``, of those workflows only, read through the index
        ``schedules_workflow_due`` a workflow at a time, so the due
        schedules of other workflows are never read."""
        self._life.check("due_schedules")
        names = check_stats_workflows(workflows)
        if limit <= 0 or names == []:
            return []
        limit = min(limit, _MAX_LIMIT)
        return await self._call(
            "due_schedules", lambda now: scripts.due_schedules(now, limit, names), "read"
        )

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        """Compare-and-set the schedule's slot and create its run, in one transaction."""
        check_text(key, "key")
        check_new_run(run)
        slot_us = to_epoch_us(slot, "slot")
        next_us = to_epoch_us(next_run_at, "next_run_at")
        run_id = run.run_id or new_run_id()
        return await self._call(
            "claim_schedule_slot",
            lambda now: scripts.claim_slot(now, key, slot_us, next_us, run, run_id),
        )

    async def set_schedule_paused(
        self, key: str, paused: bool, *, next_run_at: datetime | None = None
    ) -> ScheduleRecord | None:
        """Pause or resume a schedule, optionally moving its next slot; ``None`` if missing."""
        self._life.check("set_schedule_paused")
        check_text(key, "key")
        next_us = None if next_run_at is None else to_epoch_us(next_run_at, "next_run_at")
        return await self._call(
            "set_schedule_paused",
            lambda now: scripts.set_schedule_paused(now, key, bool(paused), next_us),
        )

    # -- workers and queue statistics --------------------------------------------------

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        """Enter or refresh a worker in the registry until ``now + ttl`` by the
        storage clock (lapsed entries are deleted in the same transaction)."""
        self._life.check("announce_worker")
        check_worker(worker, ttl)
        ttl_us = span_us(ttl)
        return await self._call(
            "announce_worker", lambda now: scripts.announce_worker(now, worker, ttl_us)
        )

    async def list_workers(self) -> list[WorkerRecord]:
        """The registry's live entries, ordered by ``started_at`` then ``id``."""
        return await self._call("list_workers", scripts.list_workers, "read")

    async def remove_worker(self, worker_id: str) -> bool:
        """Delete a worker's entry; False if it had no live one."""
        self._life.check("remove_worker")
        check_text(worker_id, "worker_id")
        return await self._call("remove_worker", lambda now: scripts.remove_worker(now, worker_id))

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        """Unfinished runs per workflow by status, read through the partial
        index ``runs_unfinished``: the cost grows with unfinished runs, never
        with finished history."""
        self._life.check("queue_stats")
        names = check_stats_workflows(workflows)
        if names is not None and not names:
            return []
        return await self._call("queue_stats", lambda now: scripts.queue_stats(now, names), "read")

    # -- dashboard reads ---------------------------------------------------------------

    async def find_runs_by_key(self, idempotency_key: str, *, limit: int = 20) -> list[RunRecord]:
        """The runs created with ``idempotency_key``, of every workflow, newest
        first: a seek in the partial index ``runs_key`` that stops at ``limit``."""
        self._life.check("find_runs_by_key")
        check_text(idempotency_key, "idempotency_key")
        rows = min(check_count(limit, "limit"), _MAX_LIMIT)
        return await self._call(
            "find_runs_by_key", lambda now: scripts.find_by_key(now, idempotency_key, rows), "read"
        )

    async def list_buffered_events(self, run_id: str, *, limit: int = 100) -> list[BufferedEvent]:
        """The run's events not taken yet, of every name, in arrival order,
        read through the partial index ``events_buffered`` (none for a
        missing or finished run)."""
        self._life.check("list_buffered_events")
        check_text(run_id, "run_id")
        rows = min(check_count(limit, "limit"), _MAX_LIMIT)
        return await self._call(
            "list_buffered_events", lambda now: scripts.buffered_events(now, run_id, rows), "read"
        )

    async def finished_history(self, minutes: int) -> list[FinishedMinute]:
        """The runs that finished in each of the last ``minutes`` minutes by the
        storage clock, by status: a range of the partial index ``runs_finished``
        (the runs that finished in those minutes, never the rest of the history)."""
        self._life.check("finished_history")
        check_count(minutes, "minutes", most=MAX_HISTORY_MINUTES)
        return await self._call(
            "finished_history", lambda now: scripts.finished_history(now, minutes), "read"
        )
