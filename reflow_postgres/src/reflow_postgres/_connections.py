"""The connection pool of one storage, and how every operation uses it.

Every operation is one statement, or one short transaction, on a connection
from a :class:`psycopg_pool.AsyncConnectionPool` in autocommit mode.
:meth:`Connections.run` runs it, translates driver errors into
:class:`~reflow_core.errors.StorageError` (with every secret redacted) and,
for operations whose retry is harmless, runs it again on a fresh connection
when the first one turns out to be broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from reflow_core.adapter import Lifecycle, as_utc, check_aware, run_from_row
from reflow_core.errors import ReflowError, StorageError
from reflow_core.options import redact
from reflow_core.storage import RunRecord

from ._options import Settings
from ._sql import Statements

__all__ = ["BACKEND", "Body", "Connections", "Pool"]

logger = logging.getLogger("reflow.postgres")

BACKEND = "postgresql"
# A broken connection is retried on another one this many times, for
# operations whose retry is harmless (reads, fenced upserts, id-keyed creates).
_RETRIES_ON_BROKEN = 2
_T = TypeVar("_T")
Pool: TypeAlias = psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]]
Body: TypeAlias = Callable[[psycopg.AsyncConnection[Any], int], Awaitable[_T]]
"""An operation's work on a connection: ``body(connection, attempt)``."""


_UTC_NAMES = frozenset(
    name.casefold()
    for name in ("Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu")
)
"""The other names of the zone ``UTC`` (``Etc/UTC`` is the default of many
server images)."""


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Set up a new pooled connection: one whose ``TimeZone`` is another name
    of UTC is set to ``UTC``, the same zone. psycopg then reads every
    ``timestamptz`` as a datetime in :data:`datetime.UTC`, which records
    carry as it is (:func:`~reflow_core.adapter.as_utc`), instead of
    converting each through the named zone and back (a quarter of the cost
    of reading a claimed run's row). Any other zone is left as it is: no
    statement depends on it."""
    zone = conn.info.parameter_status("TimeZone")
    if zone is not None and zone.casefold() in _UTC_NAMES:
        await conn.execute("SET TimeZone TO 'UTC'")


def _connection_lost(exc: BaseException, conn: psycopg.AsyncConnection[Any] | None) -> bool:
    if isinstance(exc, psycopg.OperationalError) and conn is not None and conn.broken:
        return True
    return isinstance(exc, pg_errors.AdminShutdown | pg_errors.CrashShutdown)


class Connections:
    """The pool, statements and clock of one storage.

    ``life`` guards every operation (usable between ``initialize`` and
    ``close``); ``pool`` is set once the pool is open.
    """

    __slots__ = ("_clock", "_options", "_secrets", "life", "pool", "sql")

    def __init__(self, sql: Statements, options: Settings) -> None:
        self.sql = sql
        self.life = Lifecycle(BACKEND)
        self.pool: Pool | None = None
        self._options = options
        self._clock = options.clock
        self._secrets = options.secrets

    def error(self, operation: str, exc: BaseException) -> StorageError:
        """``exc``, a driver or network error, as the storage reports it."""
        detail = redact(f"{type(exc).__name__}: {exc}".strip(), self._secrets)
        return StorageError(
            f"PostgreSQL failed during {operation}: {detail}", operation=operation, backend=BACKEND
        )

    def params(self, **values: Any) -> dict[str, Any]:
        """``values`` as statement parameters, with the test clock's ``now`` if one is set."""
        if self._clock is not None:
            values["now"] = check_aware(self._clock(), "clock")
        return values

    def live_pool(self, operation: str) -> Pool:
        """The pool, refusing ``operation`` before ``initialize`` and after ``close``."""
        self.life.check(operation)
        assert self.pool is not None
        return self.pool

    async def run(self, operation: str, body: Body[_T], *, retry: bool = False) -> _T:
        """Run ``body(connection, attempt)`` on a pooled connection, translating
        driver errors. With ``retry``, a connection that turns out to be broken
        (the server restarted, the network dropped) is replaced and ``body``
        runs again; ``attempt`` counts the runs."""
        pool = self.live_pool(operation)
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
                raise self.error(operation, exc) from exc

    def _check_pool_soon(self, pool: Pool) -> None:
        task = asyncio.get_running_loop().create_task(self._check_pool(pool))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    @staticmethod
    async def _check_pool(pool: Pool) -> None:
        # A failed check is retried by the next lost connection.
        with contextlib.suppress(psycopg.Error, OSError, psycopg_pool.PoolClosed):
            await pool.check()

    async def fetch_run(self, conn: psycopg.AsyncConnection[Any], run_id: str) -> RunRecord | None:
        """The run ``run_id``, read on ``conn``."""
        cur = await conn.execute(self.sql["get_run"], {"id": run_id})
        row = await cur.fetchone()
        return None if row is None else run_from_row(row, as_utc)

    async def open(
        self, prepare: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]
    ) -> None:
        """Connect once, run ``prepare`` (the migrations) on that connection,
        then open the pool.

        The first connection is made directly, not by the pool: an error no
        retry can fix (a missing database or role, a refused password, no
        server listening) fails at once with a :class:`StorageError` saying
        what to fix, where the pool would retry it for ``pool_timeout`` and
        log each try. A passing error (too many connections, a server
        starting up) is left to the pool, which retries it until
        ``pool_timeout``."""
        options = self._options
        first: psycopg.AsyncConnection[Any] | None = None
        try:
            first = await psycopg.AsyncConnection.connect(
                options.conninfo, **self._first_connect_kwargs()
            )
        except (psycopg.Error, OSError) as exc:
            if not _passing(exc):
                raise self._unreachable(exc) from exc
        if first is not None:
            try:
                await prepare(first)
            except ReflowError:
                raise
            except (psycopg.Error, OSError) as exc:
                raise self.error("initialize", exc) from exc
            finally:
                await first.close()
        pool: Pool = psycopg_pool.AsyncConnectionPool(
            options.conninfo,
            min_size=options.min_size,
            max_size=options.max_size,
            kwargs=options.kwargs,
            configure=_configure,
            open=False,
            timeout=options.timeout,
            name=f"reflow:{options.schema}",
        )
        try:
            await pool.open(wait=options.min_size > 0, timeout=options.timeout)
            if first is None:
                async with pool.connection() as conn:
                    await prepare(conn)
        except ReflowError:
            await pool.close()
            raise
        except psycopg_pool.PoolTimeout as exc:
            await pool.close()
            # The pool only says it timed out; one direct attempt says why.
            cause: BaseException = exc
            try:
                probe = await psycopg.AsyncConnection.connect(
                    options.conninfo, **{**options.kwargs, "connect_timeout": 5}
                )
                await probe.close()
            except (psycopg.Error, OSError) as direct:
                cause = direct
            raise self.error("initialize", cause) from cause
        except (psycopg.Error, OSError) as exc:
            await pool.close()
            raise self.error("initialize", exc) from exc
        self.pool = pool
        self.life.initialized = True

    def _first_connect_kwargs(self) -> dict[str, Any]:
        """The pool's connection arguments, with a ``connect_timeout`` of
        ``pool_timeout`` unless one is given (psycopg's default is 130 s)."""
        options = self._options
        kwargs = dict(options.kwargs)
        try:
            given = "connect_timeout" in psycopg.conninfo.conninfo_to_dict(options.conninfo)
        except psycopg.Error:
            given = False
        if not given and "connect_timeout" not in kwargs:
            kwargs["connect_timeout"] = max(1, math.ceil(options.timeout))
        return kwargs

    def _unreachable(self, exc: BaseException) -> StorageError:
        """``exc``, a failed first connection, as what failed, where, and the fix."""
        params: dict[str, Any] = {}
        with contextlib.suppress(psycopg.Error):
            params = dict(psycopg.conninfo.conninfo_to_dict(self._options.conninfo))
        pgconn = getattr(exc, "pgconn", None)

        def used(name: str, attribute: str, default: str) -> str:
            value = getattr(pgconn, attribute, None) if pgconn is not None else None
            if isinstance(value, bytes) and value:
                return value.decode("utf-8", "replace")
            return str(params.get(name) or default)

        host = used("host", "host", "localhost")
        port = used("port", "port", "5432")
        database = used("dbname", "db", "?")
        user = used("user", "user", "?")
        where = (
            f"{host}:{port}/{database}"
            if not host.startswith("/")
            else (f"the socket in {host} (port {port}), database {database}")
        )
        text = str(exc)
        reason = _server_reason(text)
        lowered = text.lower()
        if "does not exist" in lowered and "database" in lowered:
            fix = f"create the database (CREATE DATABASE {database}) or fix its name in the URL"
        elif "does not exist" in lowered and "role" in lowered:
            fix = f"create the role (CREATE ROLE {user} LOGIN) or fix the user name in the URL"
        elif any(mark in lowered for mark in _AUTH_FAILURES):
            fix = f"check the password of user {user!r} and the server's pg_hba.conf"
        elif "connection refused" in lowered or "no such file or directory" in lowered:
            fix = "check that the server is running and that the host and port are right"
        elif "could not translate host name" in lowered or "failed to resolve host" in lowered:
            fix = "check the host name"
        elif isinstance(exc, psycopg.errors.ConnectionTimeout) or "timeout" in lowered:
            fix = (
                f"no answer within {self._first_connect_kwargs()['connect_timeout']} s; "
                "check the host, the port and any firewall (connect_timeout sets the wait)"
            )
        else:
            fix = "check the connection parameters in the URL"
        message = f"cannot connect to PostgreSQL at {where} as {user!r}: {reason}; {fix}"
        return StorageError(redact(message, self._secrets), operation="initialize", backend=BACKEND)


_AUTH_FAILURES = (
    "password authentication failed",
    "authentication failed for user",
    "no pg_hba.conf entry",
    "no password supplied",
    "password is required",
    "password must be",
)
_PASSING = (
    "too many clients",
    "too many connections",
    "remaining connection slots are reserved",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "cannot connect now",
)
"""Server replies to a new connection that a later try may not get."""


def _passing(exc: BaseException) -> bool:
    """Whether a failed connection may succeed if tried again soon (the
    server is starting, stopping, or out of connection slots). Servers send
    no SQLSTATE libpq would hand on for these, so their English text is
    matched; a reply in another language counts as lasting."""
    if isinstance(exc, psycopg.errors.ConnectionTimeout):
        return False  # it already waited pool_timeout
    text = str(exc).lower()
    return any(mark in text for mark in _PASSING)


def _server_reason(text: str) -> str:
    """The reason in libpq's message, without its ``connection failed:
    connection to server at ... failed:`` prefix and ``FATAL:`` marker."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else text
    for marker in ("FATAL:", "failed:"):
        if marker in first:
            first = first.rsplit(marker, 1)[1].strip()
            break
    return first.rstrip(".") or text
