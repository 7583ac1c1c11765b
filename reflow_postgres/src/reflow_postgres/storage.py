"""``postgresql://``: the PostgreSQL backend, for many workers on many machines.

Every operation is one statement, or one short transaction, on a connection
from a :class:`psycopg_pool.AsyncConnectionPool` in autocommit mode:

* the server's ``now()`` judges every lease and due time;
* a claim is one statement: lapsed leases first, then due runs, each taken
  with ``FOR UPDATE SKIP LOCKED`` and bounded by the claim limit, returning
  the runs with their saved steps;
* a step save is one statement that checks the fence, renews the lease and
  upserts the step; the last step and the run's end are one statement too;
* enqueues, hand-backs, requeues, events that wake a run and sleeps send a
  ``NOTIFY`` (a hint, never the source of truth) that wakes idle workers;
  see :class:`~reflow_postgres.listener.Listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeAlias, TypeVar, cast

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg import sql

from reflow_core.adapter import (
    check_aware,
    check_duration,
    check_finish_status,
    check_list_limit,
    check_new_run,
    check_purge,
    check_status_update,
    check_text,
    decode_cursor,
    encode_cursor,
    from_epoch_us,
    new_run_id,
)
from reflow_core.batching import GroupCommit
from reflow_core.errors import (
    ConfigError,
    EventBufferFullError,
    IdempotencyConflictError,
    ReflowError,
    SchemaVersionError,
    StorageError,
)
from reflow_core.options import (
    SECRET_NAMES,
    bool_option,
    int_option,
    kwarg_secrets,
    redact,
    seconds_option,
    split_url,
    url_secrets,
)
from reflow_core.storage import (
    ClaimedRun,
    CreateResult,
    EventTake,
    Lease,
    NewRun,
    RunPage,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    StepStatus,
    WaitResult,
    WakeupSubscription,
)

from ._schema import MIGRATIONS, SCHEMA_VERSION, VERSION_TABLE
from ._sql import READ_COLUMNS, Statements, render
from .listener import Listener

__all__ = ["PostgresStorage", "parse_postgres_url"]

logger = logging.getLogger("reflow.postgres")

BACKEND = "postgresql"
DEFAULT_SCHEMA = "reflow"
MAX_CLAIM = 1000
"""One claim takes at most this many runs, so a claim transaction stays short."""

_URL_OPTIONS = (
    "schema",
    "pool_min_size",
    "pool_max_size",
    "pool_timeout",
    "notify",
    "listen",
    "prepare_threshold",
)
_KEYWORD_OPTIONS = (*_URL_OPTIONS, "clock", "connect_kwargs")
_T = TypeVar("_T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
# Concurrent step saves share one statement, at most this many per statement.
_MAX_SAVE_BATCH = 200
# A broken connection is retried on another one this many times, for
# operations whose retry is harmless (reads, fenced upserts, id-keyed creates).
_RETRIES_ON_BROKEN = 2
_Finish: TypeAlias = tuple[Lease, str, str | None, str | None, StepRecord | None]
"""One finish_run call: lease, status, output, error, last step."""


# -- conversions --------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _utc_opt(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _from_us(value: int | None) -> datetime | None:
    return None if value is None else from_epoch_us(value)


def _run_record(row: tuple[Any, ...] | list[Any]) -> RunRecord:
    return RunRecord(
        id=row[0],
        workflow=row[1],
        status=cast(RunStatus, row[2]),
        input=row[3],
        output=row[4],
        error=row[5],
        idempotency_key=row[6],
        attempts=row[7],
        reclaims=row[8],
        lease_epoch=row[9],
        created_at=_utc(row[10]),
        updated_at=_utc(row[11]),
        wake_at=_utc_opt(row[12]),
        waiting_for=row[13],
        lease_expires_at=_utc_opt(row[14]),
    )


def _step_record(row: tuple[Any, ...]) -> StepRecord:
    return StepRecord(
        name=row[0],
        status=cast(StepStatus, row[1]),
        output=row[2],
        error=row[3],
        attempts=row[4],
        wake_at=_utc_opt(row[5]),
        completed_at=_utc_opt(row[6]),
    )


def _schedule_record(row: tuple[Any, ...]) -> ScheduleRecord:
    return ScheduleRecord(
        key=row[0],
        workflow=row[1],
        input=row[2],
        recurrence=row[3],
        next_run_at=_utc(row[4]),
        created_at=_utc(row[5]),
        updated_at=_utc(row[6]),
    )


def _step_params(step: StepRecord) -> dict[str, Any]:
    return {
        "name": step.name,
        "step_status": step.status,
        "step_output": step.output,
        "step_error": step.error,
        "step_attempts": step.attempts,
        "step_wake_at": None if step.wake_at is None else check_aware(step.wake_at, "step.wake_at"),
    }


# -- options ------------------------------------------------------------------------


def _schema_option(value: object) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ConfigError(
            "schema must be a plain identifier (letters, digits, _ and $, not starting with "
            f"a digit, at most 63 characters), got {value!r}",
            option="schema",
        )
    if value.lower().startswith("pg_"):
        raise ConfigError(
            f"schema names starting with pg_ are reserved, got {value!r}", option="schema"
        )
    return value


def _prepare_option(value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off")):
        return None
    return int_option("prepare_threshold", value, 0)


def parse_postgres_url(url: str) -> tuple[str, dict[str, str], str]:
    """Split a ``postgresql://`` (or ``postgres://``) URL into the libpq
    connection URL, Reflow's own query options, and the same URL with any
    password replaced by ``***`` (safe to log).

    Reflow's options are ``schema``, ``pool_min_size``, ``pool_max_size``,
    ``pool_timeout`` (seconds), ``notify``, ``listen`` and
    ``prepare_threshold``; every other query parameter (``sslmode``,
    ``connect_timeout``, ``application_name``, ...) is passed to libpq.
    Raises :class:`~reflow_core.errors.ConfigError` for another scheme or a
    repeated option.
    """
    split = split_url(
        url,
        schemes=("postgresql", "postgres"),
        own=_URL_OPTIONS,
        kind="postgresql",
        scheme="postgresql",
    )
    return split.target, split.options, split.safe


# -- errors ----------------------------------------------------------------------------


def _connection_lost(exc: BaseException, conn: psycopg.AsyncConnection[Any] | None) -> bool:
    if isinstance(exc, psycopg.OperationalError) and conn is not None and conn.broken:
        return True
    return isinstance(exc, pg_errors.AdminShutdown | pg_errors.CrashShutdown)


# -- the storage ------------------------------------------------------------------------


class PostgresStorage:
    """Reflow storage on PostgreSQL 13 or newer.

    Build it with :func:`reflow_core.open_storage` or :meth:`from_url`, or
    directly from a libpq connection string or URL. ``schema`` holds every
    table (created by :meth:`initialize`); ``pool_min_size``/``pool_max_size``
    size the connection pool (give it about as many connections as the
    engine's ``concurrency``, or step saves queue for a connection);
    ``pool_timeout`` is how long an operation waits for a connection before
    failing with :class:`~reflow_core.errors.StorageError`.

    ``notify`` sends a ``NOTIFY`` when work becomes ready, and ``listen``
    lets engines on this storage wait for them (one extra connection per
    storage); each works without the other (a producer may notify without
    listening). Turn ``listen`` off behind a transaction-mode pooler, where
    LISTEN does not work, and the engine polls. ``prepare_threshold`` is
    psycopg's (``None`` disables server-side prepared statements, needed
    behind a transaction-mode PgBouncer unless it is 1.21 or newer with
    ``max_prepared_statements`` set). ``clock`` replaces the server clock,
    for tests only. ``connect_kwargs`` are passed to every new connection.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_min_size: int | str = 1,
        pool_max_size: int | str = 10,
        pool_timeout: float | str | timedelta = 10.0,
        notify: bool | str = True,
        listen: bool | str = True,
        prepare_threshold: int | str | None = 5,
        clock: Callable[[], datetime] | None = None,
        connect_kwargs: Mapping[str, Any] | None = None,
        _display_url: str | None = None,
    ) -> None:
        self._schema = _schema_option(schema)
        self._min = int_option("pool_min_size", pool_min_size, 0)
        self._max = int_option("pool_max_size", pool_max_size, 1)
        if self._max < max(self._min, 1):
            raise ConfigError(
                f"pool_max_size ({self._max}) must be at least pool_min_size ({self._min})",
                option="pool_max_size",
            )
        self._timeout = seconds_option("pool_timeout", pool_timeout)
        self._notify = bool_option("notify", notify)
        self._listen = bool_option("listen", listen)
        self._prepare = _prepare_option(prepare_threshold)
        if clock is not None and not callable(clock):
            raise ConfigError(f"clock must be callable, got {clock!r}", option="clock")
        self._clock = clock
        self._conninfo = conninfo
        self._secrets = self._find_secrets(conninfo, connect_kwargs)
        self._display = redact(_display_url or self._describe(conninfo), self._secrets)
        complaint = self._unreadable(conninfo)
        if complaint is not None and redact(complaint, self._secrets) != complaint:
            # libpq's complaint quotes a password (an invalid escape, a NUL).
            # Left for later it would reach psycopg's pool log unredacted;
            # raised here, outside the except, it carries no driver error.
            raise ConfigError(
                f"libpq cannot read the connection string: {redact(complaint, self._secrets)}",
                option="url",
            )
        self._kwargs: dict[str, Any] = {
            **(connect_kwargs or {}),
            "autocommit": True,
            "prepare_threshold": self._prepare,
        }
        self._channel = self._channel_name(self._schema)
        self._sql: Statements = render(
            self._schema,
            channel=self._channel if self._notify else None,
            test_clock=clock is not None,
        )
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._saves: GroupCommit[tuple[Lease, StepRecord, timedelta], bool] = GroupCommit(
            self._save_batch, max_batch=_MAX_SAVE_BATCH
        )
        self._finishes: GroupCommit[_Finish, bool] = GroupCommit(
            self._finish_batch, max_batch=_MAX_SAVE_BATCH
        )
        self._creates: GroupCommit[tuple[str, NewRun], CreateResult | ReflowError] = GroupCommit(
            self._create_batch, max_batch=_MAX_SAVE_BATCH
        )
        self._listener: Listener | None = None
        self._closed = False
        self._init_lock: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> PostgresStorage:
        """Build a storage from a ``postgresql://`` URL (see :func:`parse_postgres_url`).

        Keyword ``options`` (the URL options, plus ``clock`` and
        ``connect_kwargs``) win over the same option in the URL.
        """
        conninfo, query, safe = parse_postgres_url(url)
        merged: dict[str, Any] = {**query, **options}
        for name in merged:
            if name not in _KEYWORD_OPTIONS:
                raise ConfigError(
                    f"unknown postgresql option {name!r}; known options: "
                    f"{', '.join(_KEYWORD_OPTIONS)}",
                    option=name,
                )
        return cls(conninfo, _display_url=safe, **merged)

    @staticmethod
    def _find_secrets(conninfo: str, kwargs: Mapping[str, Any] | None) -> list[str]:
        """Every password libpq would read (``password``, ``sslpassword``), as
        libpq decodes the connection string and as a URL parser does (libpq
        keeps a ``+`` in a query, a URL parser reads a space), and those in
        ``connect_kwargs``."""
        try:
            params: Mapping[str, Any] = psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error:
            params = {}
        secrets = kwarg_secrets(params)
        if "://" in conninfo:
            secrets += url_secrets(conninfo)
        return list(dict.fromkeys(secrets + kwarg_secrets(kwargs)))

    @staticmethod
    def _unreadable(conninfo: str) -> str | None:
        """What libpq says is wrong with ``conninfo``; ``None`` if nothing."""
        try:
            psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            return str(exc)
        return None

    def _describe(self, conninfo: str) -> str:
        try:
            params = psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error:
            return "<unparseable conninfo>"
        shown = {k: v for k, v in params.items() if k not in SECRET_NAMES}
        return " ".join(f"{k}={v}" for k, v in shown.items()) or "(libpq defaults)"

    @staticmethod
    def _channel_name(schema: str) -> str:
        return f"reflow:{schema}"[:63]

    def __repr__(self) -> str:
        # Redacted whole: a password may equal the schema's name.
        shown = f"PostgresStorage({self._display!r}, schema={self._schema!r})"
        return redact(shown, self._secrets)

    @property
    def schema(self) -> str:
        """The schema that holds Reflow's tables."""
        return self._schema

    @property
    def channel(self) -> str:
        """The ``LISTEN``/``NOTIFY`` channel of this schema."""
        return self._channel

    # -- plumbing -----------------------------------------------------------------

    def _error(self, operation: str, exc: BaseException) -> StorageError:
        detail = redact(f"{type(exc).__name__}: {exc}".strip(), self._secrets)
        return StorageError(
            f"PostgreSQL failed during {operation}: {detail}", operation=operation, backend=BACKEND
        )

    def _params(self, **values: Any) -> dict[str, Any]:
        if self._clock is not None:
            values["now"] = check_aware(self._clock(), "clock")
        return values

    def _live_pool(
        self, operation: str
    ) -> psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._closed:
            raise StorageError("storage is closed", operation=operation, backend=BACKEND)
        if self._pool is None:
            raise StorageError(
                "storage is not initialized; call initialize() first",
                operation=operation,
                backend=BACKEND,
            )
        return self._pool

    async def _run(
        self,
        operation: str,
        body: Callable[[psycopg.AsyncConnection[Any], int], Awaitable[_T]],
        *,
        retry: bool = False,
    ) -> _T:
        """Run ``body(connection, attempt)`` on a pooled connection, translating
        driver errors. With ``retry``, a connection that turns out to be broken
        (the server restarted, the network dropped) is replaced and ``body``
        runs again; ``attempt`` counts the runs."""
        pool = self._live_pool(operation)
        attempt = 0
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                async with pool.connection() as conn:
                    return await body(conn, attempt)
            except ReflowError:
                raise
            except (psycopg.Error, OSError) as exc:
                if _connection_lost(exc, conn):
                    # The pool drops this connection; check the idle ones too,
                    # since a restart broke them all.
                    self._check_pool_soon(pool)
                    if retry and attempt < _RETRIES_ON_BROKEN:
                        attempt += 1
                        logger.info("connection lost during %s; retrying", operation)
                        continue
                raise self._error(operation, exc) from exc

    def _check_pool_soon(
        self, pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]]
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._check_pool(pool))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    @staticmethod
    async def _check_pool(
        pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]],
    ) -> None:
        # A failed check is retried by the next lost connection.
        with contextlib.suppress(psycopg.Error, OSError, psycopg_pool.PoolClosed):
            await pool.check()

    # -- lifecycle ---------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the pool and create or migrate the schema (see :mod:`._schema`).

        Safe when many workers start at once: migrations run in one
        transaction under a transaction-scoped advisory lock, and a worker
        that finds the schema current takes no lock at all. Refuses, changing
        nothing, a schema written by newer code
        (:class:`~reflow_core.errors.SchemaVersionError`) and a schema that
        holds tables that are not Reflow's (:class:`StorageError`).
        """
        if self._closed:
            raise StorageError("storage is closed", operation="initialize", backend=BACKEND)
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if self._pool is not None:
                return
            pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]]
            pool = psycopg_pool.AsyncConnectionPool(
                self._conninfo,
                min_size=self._min,
                max_size=self._max,
                kwargs=self._kwargs,
                open=False,
                timeout=self._timeout,
                name=f"reflow:{self._schema}",
            )
            try:
                await pool.open(wait=self._min > 0, timeout=self._timeout)
                async with pool.connection() as conn:
                    await self._migrate(conn)
            except ReflowError:
                await pool.close()
                raise
            except psycopg_pool.PoolTimeout as exc:
                await pool.close()
                # The pool only says it timed out; one direct attempt says why.
                cause: BaseException = exc
                try:
                    probe = await psycopg.AsyncConnection.connect(
                        self._conninfo, **{**self._kwargs, "connect_timeout": 5}
                    )
                    await probe.close()
                except (psycopg.Error, OSError) as direct:
                    cause = direct
                raise self._error("initialize", cause) from cause
            except (psycopg.Error, OSError) as exc:
                await pool.close()
                raise self._error("initialize", exc) from exc
            self._pool = pool

    async def _schema_version(self, conn: psycopg.AsyncConnection[Any]) -> int | None:
        """The schema's version; ``None`` when it has no Reflow tables yet."""
        rows = await (
            await conn.execute(
                "SELECT to_regclass(%s), (SELECT count(*) FROM pg_catalog.pg_class c"
                " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm'))",
                (f"{self._sql.schema}.{VERSION_TABLE}", self._schema),
            )
        ).fetchall()
        table, relations = rows[0]
        if table is None:
            if relations:
                raise StorageError(
                    f"schema {self._schema!r} holds tables that are not Reflow's; "
                    "choose another schema (the 'schema' option); nothing was changed",
                    operation="initialize",
                    backend=BACKEND,
                )
            return None
        query = sql.SQL("SELECT max(version) FROM {}.{}").format(
            sql.Identifier(self._schema), sql.Identifier(VERSION_TABLE)
        )
        found = (await (await conn.execute(query)).fetchall())[0][0]
        return int(found or 0)

    def _check_not_newer(self, version: int | None) -> None:
        if version is not None and version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema {self._schema!r} is at version {version}, newer than this "
                f"reflow-postgres understands ({SCHEMA_VERSION}); upgrade reflow-postgres. "
                "Nothing was changed.",
                operation="initialize",
                backend=BACKEND,
            )

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        version = await self._schema_version(conn)
        self._check_not_newer(version)
        if version == SCHEMA_VERSION:
            return
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"reflow:migrate:{self._schema}",)
            )
            version = await self._schema_version(conn)
            self._check_not_newer(version)
            schema = sql.Identifier(self._schema)
            table = sql.Identifier(VERSION_TABLE)
            if version is None:
                exists = await (
                    await conn.execute(
                        "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s",
                        (self._schema,),
                    )
                ).fetchone()
                if exists is None:  # CREATE SCHEMA needs CREATE on the database
                    await conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE {}.{} (version integer PRIMARY KEY,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    ).format(schema, table)
                )
                version = 0
            for target in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[target]:
                    await conn.execute(statement.replace("{schema}", self._sql.schema).encode())
                await conn.execute(
                    sql.SQL("INSERT INTO {}.{} (version) VALUES (%s)").format(schema, table),
                    (target + 1,),
                )

    async def close(self) -> None:
        """Stop listening and close the pool. Idempotent."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- wake-ups ---------------------------------------------------------------------

    async def subscribe_wakeups(
        self, workflows: Collection[str], wake: Callable[[], None]
    ) -> WakeupSubscription:
        """Call ``wake()`` when work of ``workflows`` may be ready: a run was
        enqueued, handed back or requeued, an event woke a waiting run, or a
        sleep or wait timeout falls due. Hints only; the claim decides.

        All subscriptions of this storage share one listening connection,
        which reconnects by itself (and then wakes everyone, since
        notifications sent meanwhile are lost). With ``listen`` off, the
        subscription never fires and engines rely on polling.
        """
        self._live_pool("subscribe_wakeups")
        if self._listener is None:
            self._listener = Listener(
                conninfo=self._conninfo,
                kwargs=self._kwargs,
                channel=self._channel,
                next_due=self._next_due,
                secrets=self._secrets,
                enabled=self._listen,
            )
        return await self._listener.subscribe(workflows, wake)

    async def _next_due(self, workflows: list[str]) -> float | None:
        """Seconds until the next sleeping or waiting run of ``workflows`` falls due."""

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> float | None:
            cur = await conn.execute(self._sql["next_due"], self._params(workflows=workflows))
            row = await cur.fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run("next_due", body, retry=True)

    # -- runs ------------------------------------------------------------------------

    async def create_run(self, new: NewRun) -> CreateResult:
        """Create a pending run. Concurrent creates (many producers, or
        schedules firing) share one statement and one commit; each keeps its
        own outcome, idempotency conflict included."""
        check_new_run(new)
        run_id = new.run_id or new_run_id()
        self._live_pool("create_run")
        outcome = await self._creates.submit((run_id, new))
        if isinstance(outcome, ReflowError):
            raise outcome
        return outcome

    async def _create_batch(
        self, items: Sequence[tuple[str, NewRun]]
    ) -> list[CreateResult | ReflowError]:
        keys = [(n.workflow, n.idempotency_key) for _, n in items if n.idempotency_key]
        ids = [run_id for run_id, _ in items]
        if len(items) == 1 or len(set(keys)) < len(keys) or len(set(ids)) < len(ids):
            return [await self._create_alone(run_id, new) for run_id, new in items]
        params = self._params(
            ids=ids,
            workflows=[new.workflow for _, new in items],
            inputs=[new.input for _, new in items],
            keys=[new.idempotency_key for _, new in items],
        )
        retried = False

        async def many(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[Any]:
            nonlocal retried
            retried = attempt > 0
            cur = await conn.execute(self._sql["create_many"], params)
            return await cur.fetchall()

        try:
            rows = await self._run("create_run", many, retry=True)
        except StorageError as exc:
            if not isinstance(exc.__cause__, pg_errors.UniqueViolation):
                raise
            # A run id that exists already: find out which, one by one.
            return [await self._create_alone(run_id, new, retried) for run_id, new in items]
        created = {row[0]: _run_record(row) for row in rows if row[15]}
        existing = {(row[1], row[6]): _run_record(row) for row in rows if not row[15]}
        results: list[CreateResult | ReflowError] = []
        for run_id, new in items:
            if run_id in created:
                results.append(CreateResult(created[run_id], created=True))
                continue
            record = existing[(new.workflow, new.idempotency_key)]
            if retried and record.id == run_id:
                results.append(CreateResult(record, created=True))
            elif record.input != new.input:
                assert new.idempotency_key is not None
                results.append(
                    IdempotencyConflictError(new.workflow, new.idempotency_key, record.id)
                )
            else:
                results.append(CreateResult(record, created=False))
        return results

    async def _create_alone(
        self, run_id: str, new: NewRun, retried: bool = False
    ) -> CreateResult | ReflowError:
        params = self._params(
            id=run_id, workflow=new.workflow, input=new.input, key=new.idempotency_key
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> CreateResult:
            again = retried or attempt > 0
            try:
                cur = await conn.execute(self._sql["create"], params)
            except pg_errors.UniqueViolation as exc:
                if exc.diag.constraint_name != "runs_pkey":
                    raise
                existing = await self._fetch_run(conn, run_id)
                if again and existing is not None and existing.input == new.input:
                    # Our first try committed before the connection dropped.
                    return CreateResult(existing, created=True)
                raise StorageError(
                    f"run id {run_id!r} already exists", operation="create_run", backend=BACKEND
                ) from exc
            row = await cur.fetchone()
            assert row is not None
            record = _run_record(row)
            if row[15] or (again and record.id == run_id):
                # Created now, or by our own first try before its reply was lost.
                return CreateResult(record, created=True)
            if record.input != new.input:
                assert new.idempotency_key is not None
                raise IdempotencyConflictError(new.workflow, new.idempotency_key, record.id)
            return CreateResult(record, created=False)

        try:
            return await self._run("create_run", body, retry=True)
        except ReflowError as exc:
            return exc

    async def _fetch_run(self, conn: psycopg.AsyncConnection[Any], run_id: str) -> RunRecord | None:
        cur = await conn.execute(self._sql["get_run"], {"id": run_id})
        row = await cur.fetchone()
        return None if row is None else _run_record(row)

    async def claim_runs(
        self, workflows: Collection[str], limit: int, lease: timedelta
    ) -> list[ClaimedRun]:
        names = [check_text(name, "workflow") for name in workflows]
        check_duration(lease, "lease")
        if limit < 1 or not names:
            return []
        params = self._params(workflows=names, limit=min(limit, MAX_CLAIM), lease=lease)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[ClaimedRun]:
            cur = await conn.execute(self._sql["claim"], params)
            return [self._claimed(row) for row in await cur.fetchall()]

        # Not retried here: a claim whose reply was lost leaves its runs
        # leased to nobody until the lease lapses; the engine claims again.
        return await self._run("claim_runs", body)

    @staticmethod
    def _claimed(row: tuple[Any, ...]) -> ClaimedRun:
        record = _run_record(row)
        steps: dict[str, StepRecord] = {}
        for name, status, output, error, attempts, wake_us, done_us in row[17] or ():
            steps[name] = StepRecord(
                name=name,
                status=status,
                output=output,
                error=error,
                attempts=attempts,
                wake_at=_from_us(wake_us),
                completed_at=_from_us(done_us),
            )
        return ClaimedRun(
            run=record,
            lease=Lease(record.id, record.lease_epoch),
            steps=steps,
            reclaimed=bool(row[15]),
        )

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        check_duration(extend, "extend")
        params = self._params(id=lease.run_id, epoch=lease.epoch, extend=extend)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(self._sql["heartbeat"], params)
            return cur.rowcount == 1

        return await self._run("heartbeat_run", body, retry=True)

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        """Fenced upsert of ``step`` that renews the lease. Concurrent saves (of
        many runs in flight) share one statement and one commit; each is
        fenced on its own."""
        check_text(step.name, "step")
        check_duration(extend, "extend")
        if step.wake_at is not None:
            check_aware(step.wake_at, "step.wake_at")
        self._live_pool("save_step_result")
        return await self._saves.submit((lease, step, extend))

    async def _save_batch(self, items: Sequence[tuple[Lease, StepRecord, timedelta]]) -> list[bool]:
        if len(items) == 1:
            lease, step, extend = items[0]
            params = self._params(
                id=lease.run_id, epoch=lease.epoch, extend=extend, **_step_params(step)
            )

            async def one(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[bool]:
                cur = await conn.execute(self._sql["save_step"], params)
                return [cur.rowcount == 1]

            return await self._run("save_step_result", one, retry=True)
        batch = self._params(
            ids=[lease.run_id for lease, _, _ in items],
            epochs=[lease.epoch for lease, _, _ in items],
            extends=[extend for _, _, extend in items],
            names=[step.name for _, step, _ in items],
            statuses=[step.status for _, step, _ in items],
            outputs=[step.output for _, step, _ in items],
            errors=[step.error for _, step, _ in items],
            attempts=[step.attempts for _, step, _ in items],
            wakes=[step.wake_at for _, step, _ in items],
        )

        async def many(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[bool]:
            cur = await conn.execute(self._sql["save_steps"], batch)
            saved = {row[0] for row in await cur.fetchall()}
            return [lease.run_id in saved for lease, _, _ in items]

        return await self._run("save_step_result", many, retry=True)

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        check_finish_status(status)
        if step is not None:
            check_text(step.name, "step")
        if step is not None and step.wake_at is not None:
            check_aware(step.wake_at, "step.wake_at")
        self._live_pool("finish_run")
        return await self._finishes.submit((lease, status, output, error, step))

    async def _finish_batch(self, items: Sequence[_Finish]) -> list[bool]:
        if len(items) == 1:
            lease, status, output, error, step = items[0]
            values: dict[str, Any] = {
                "id": lease.run_id,
                "epoch": lease.epoch,
                "status": status,
                "output": output,
                "error": error,
            }
            if step is not None:
                values.update(_step_params(step))
            params = self._params(**values)
            statement = self._sql["finish" if step is None else "finish_with_step"]

            async def one(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[bool]:
                cur = await conn.execute(statement, params)
                ok = cur.rowcount == 1
                if not ok and attempt > 0:
                    # Did the try whose connection dropped land after all?
                    cur = await conn.execute(self._sql["finished_already"], values)
                    ok = await cur.fetchone() is not None
                return [ok]

            return await self._run("finish_run", one, retry=True)
        steps = [item[4] for item in items]
        batch = self._params(
            ids=[lease.run_id for lease, *_ in items],
            epochs=[lease.epoch for lease, *_ in items],
            run_statuses=[item[1] for item in items],
            run_outputs=[item[2] for item in items],
            run_errors=[item[3] for item in items],
            has_step=[step is not None for step in steps],
            names=[None if step is None else step.name for step in steps],
            statuses=[None if step is None else step.status for step in steps],
            outputs=[None if step is None else step.output for step in steps],
            errors=[None if step is None else step.error for step in steps],
            attempts=[None if step is None else step.attempts for step in steps],
            wakes=[None if step is None else step.wake_at for step in steps],
        )

        async def many(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[bool]:
            cur = await conn.execute(self._sql["finish_many"], batch)
            done = {row[0] for row in await cur.fetchall()}
            results = [item[0].run_id in done for item in items]
            if attempt > 0:
                for i, (lease, status, *_) in enumerate(items):
                    if not results[i]:
                        cur = await conn.execute(
                            self._sql["finished_already"],
                            {"id": lease.run_id, "epoch": lease.epoch, "status": status},
                        )
                        results[i] = await cur.fetchone() is not None
            return results

        return await self._run("finish_run", many, retry=True)

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        check_text(run_id, "run_id")
        check_status_update(status, lease)
        if lease is None:
            name = "end_unfenced"
            params = self._params(id=run_id, status=status, error=error)
        elif status == "pending":
            name = "hand_back"
            params = self._params(id=run_id, epoch=lease.epoch)
        else:
            name = "end_fenced"
            params = self._params(id=run_id, epoch=lease.epoch, status=status, error=error)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(self._sql[name], params)
            return cur.rowcount == 1

        return await self._run("update_run_status", body)

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        check_text(step, "step")
        check_duration(duration, "duration")
        params = self._params(id=lease.run_id, epoch=lease.epoch, name=step, duration=duration)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> datetime | None:
            cur = await conn.execute(self._sql["sleep"], params)
            row = await cur.fetchone()
            return None if row is None else _utc(row[0])

        return await self._run("sleep_run", body)

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        check_text(step, "step")
        check_text(event, "event")
        if timeout is not None:
            check_duration(timeout, "timeout")
        params = self._params(
            id=lease.run_id, epoch=lease.epoch, name=step, event=event, timeout=timeout
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> WaitResult | None:
            async with conn.transaction():
                cur = await conn.execute(self._sql["lock_fenced"], params)
                if await cur.fetchone() is None:
                    return None
                cur = await conn.execute(self._sql["wait"], params)
                row = await cur.fetchone()
                assert row is not None
                return WaitResult(ready=bool(row[0]), deadline=_utc_opt(row[1]))

        return await self._run("wait_run", body)

    async def deliver_event(
        self,
        run_id: str,
        event: str,
        payload: str,
        *,
        event_id: str | None = None,
        max_buffered: int | None = None,
    ) -> bool:
        check_text(run_id, "run_id")
        check_text(event, "event")
        if event_id is not None:
            check_text(event_id, "event_id")
        params = self._params(
            id=run_id, event=event, payload=payload, event_id=event_id, cap=max_buffered
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            async with conn.transaction():
                cur = await conn.execute(self._sql["lock_run"], params)
                row = await cur.fetchone()
                if row is None or row[0] in ("completed", "failed", "cancelled"):
                    return False
                cur = await conn.execute(self._sql["deliver"], params)
                outcome = await cur.fetchone()
                assert outcome is not None
                repeated, stored = outcome[0], outcome[1]
                if not repeated and not stored:
                    assert max_buffered is not None
                    raise EventBufferFullError(run_id, event, max_buffered)
                return True

        # With an event id a retry is deduplicated; without one it could
        # deliver twice, so it is left to the caller.
        return await self._run("deliver_event", body, retry=event_id is not None)

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        check_text(step, "step")
        check_text(event, "event")
        params = self._params(id=lease.run_id, epoch=lease.epoch, name=step, event=event)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> EventTake | None:
            async with conn.transaction():
                cur = await conn.execute(self._sql["lock_fenced"], params)
                if await cur.fetchone() is None:
                    return None
                cur = await conn.execute(self._sql["take"], params)
                row = await cur.fetchone()
                assert row is not None
                done, saved, payload = row
                if done:
                    return EventTake(found=True, payload=saved)
                if payload is None:
                    return EventTake(found=False)
                return EventTake(found=True, payload=payload)

        return await self._run("take_event", body, retry=True)

    async def now(self) -> datetime:
        """The server's ``now()``: the clock every lease, sleep, wait and due
        schedule is judged by (the test ``clock`` when one is configured)."""
        params = self._params()

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> datetime:
            cur = await conn.execute(self._sql["now"], params)
            row = await cur.fetchone()
            assert row is not None
            return _utc(row[0])

        return await self._run("now", body, retry=True)

    async def get_run(self, run_id: str) -> RunRecord | None:
        check_text(run_id, "run_id")

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> RunRecord | None:
            return await self._fetch_run(conn, run_id)

        return await self._run("get_run", body, retry=True)

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        check_text(run_id, "run_id")

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> dict[str, StepRecord]:
            cur = await conn.execute(self._sql["get_steps"], {"id": run_id})
            return {row[0]: _step_record(row) for row in await cur.fetchall()}

        return await self._run("get_step_results", body, retry=True)

    async def list_runs(
        self,
        *,
        status: Collection[RunStatus] | None = None,
        workflow: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        check_list_limit(limit)
        if workflow is not None:
            check_text(workflow, "workflow")
        after = decode_cursor(cursor) if cursor is not None else None
        clauses: list[str] = []
        params: dict[str, Any] = {"limit": limit + 1}
        if status is not None:
            clauses.append("status = ANY(%(statuses)s)")
            params["statuses"] = list(status)
        if workflow is not None:
            clauses.append("workflow = %(workflow)s")
            params["workflow"] = workflow
        if after is not None:
            clauses.append("(created_at, id) < (%(after_at)s, %(after_id)s)")
            params["after_at"], params["after_id"] = after
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            f"SELECT {READ_COLUMNS} FROM {self._sql.schema}.runs{where}"  # noqa: S608
            " ORDER BY created_at DESC, id DESC LIMIT %(limit)s"
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> RunPage:
            cur = await conn.execute(query.encode(), params)
            rows = await cur.fetchall()
            page = [_run_record(row) for row in rows[:limit]]
            more = len(rows) > limit
            next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more else None
            return RunPage(page, next_cursor)

        return await self._run("list_runs", body, retry=True)

    async def requeue_run(self, run_id: str) -> bool:
        check_text(run_id, "run_id")
        params = self._params(id=run_id)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(self._sql["requeue"], params)
            return cur.rowcount == 1

        return await self._run("requeue_run", body)

    async def purge_finished(self, older_than: timedelta, *, batch: int = 1000) -> int:
        """Delete runs that finished (completed, failed or cancelled) more than
        ``older_than`` ago, with their steps and events, ``batch`` runs per
        transaction. Returns how many runs were deleted.

        Safe to run from several processes at once and while workers are
        busy: it skips rows another transaction holds. Idempotency keys of
        deleted runs become free again, so keep finished runs for longer than
        any client may retry an enqueue.
        """
        batch = check_purge(older_than, batch)
        total = 0
        while True:
            params = self._params(age=older_than, limit=batch)

            async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> int:
                cur = await conn.execute(self._sql["purge"], params)  # noqa: B023
                return cur.rowcount

            deleted = await self._run("purge_finished", body, retry=True)
            total += deleted
            if deleted < batch:
                return total

    # -- schedules -----------------------------------------------------------------

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        check_text(spec.key, "key")
        check_text(spec.workflow, "workflow")
        params = self._params(
            key=spec.key,
            workflow=spec.workflow,
            input=spec.input,
            recurrence=spec.recurrence,
            next_run_at=check_aware(spec.next_run_at, "next_run_at"),
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> ScheduleRecord:
            cur = await conn.execute(self._sql["upsert_schedule"], params)
            row = await cur.fetchone()
            assert row is not None
            return _schedule_record(row)

        return await self._run("upsert_schedule", body, retry=True)

    async def delete_schedule(self, key: str) -> bool:
        check_text(key, "key")

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(self._sql["delete_schedule"], {"key": key})
            return cur.rowcount == 1

        return await self._run("delete_schedule", body)

    async def list_schedules(self) -> list[ScheduleRecord]:
        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[ScheduleRecord]:
            cur = await conn.execute(self._sql["list_schedules"])
            return [_schedule_record(row) for row in await cur.fetchall()]

        return await self._run("list_schedules", body, retry=True)

    async def due_schedules(self, limit: int) -> list[ScheduleRecord]:
        if limit < 1:
            return []
        params = self._params(limit=limit)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[ScheduleRecord]:
            cur = await conn.execute(self._sql["due_schedules"], params)
            return [_schedule_record(row) for row in await cur.fetchall()]

        return await self._run("due_schedules", body, retry=True)

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        check_text(key, "key")
        check_new_run(run)
        params = self._params(
            key=key,
            slot=check_aware(slot, "slot"),
            next_run_at=check_aware(next_run_at, "next_run_at"),
            id=run.run_id or new_run_id(),
            workflow=run.workflow,
            input=run.input,
            idem=run.idempotency_key,
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> RunRecord | None:
            async with conn.transaction():
                cur = await conn.execute(self._sql["claim_slot"], params)
                row = await cur.fetchone()
                if row is None:
                    return None
                record = _run_record(row)
                if not row[15] and record.input != run.input:
                    assert run.idempotency_key is not None
                    raise IdempotencyConflictError(run.workflow, run.idempotency_key, record.id)
                return record

        return await self._run("claim_schedule_slot", body)
