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
        """Open the pool and run ``prepare`` (the migrations) on one of its
        connections; on failure the pool is closed again and the error says
        why the server could not be reached."""
        options = self._options
        pool: Pool = psycopg_pool.AsyncConnectionPool(
            options.conninfo,
            min_size=options.min_size,
            max_size=options.max_size,
            kwargs=options.kwargs,
            open=False,
            timeout=options.timeout,
            name=f"reflow:{options.schema}",
        )
        try:
            await pool.open(wait=options.min_size > 0, timeout=options.timeout)
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
