"""How a script reaches the database: aiosqlite's connection thread.

A script (see :mod:`reflow_sqlite._scripts`) runs as one transaction. On the
fast path, :func:`run_on_thread` runs it whole as one call on aiosqlite's
worker thread, so nothing else can interleave with it and it costs a single
hop from the event loop. When that path is unavailable,
:func:`run_statements` drives the same script statement by statement through
aiosqlite's public coroutines (the caller holds a lock): slower, equally
correct.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Literal, TypeAlias, TypeVar, cast

import aiosqlite

from reflow_core.adapter import to_epoch_us
from reflow_core.errors import ReflowError, StorageError

from ._options import BACKEND
from ._queries import QUERIES
from ._scripts import Params, Row, Script

__all__ = [
    "MIN_SQLITE_VERSION",
    "Mode",
    "connect",
    "copy_error",
    "daemonize",
    "disconnect",
    "drive",
    "run_on_thread",
    "run_statements",
    "stopped",
    "storage_errors",
]

_T = TypeVar("_T")
MIN_SQLITE_VERSION = (3, 35, 0)  # UPDATE ... RETURNING and upserts with RETURNING
Mode: TypeAlias = Literal["read", "write"]
"""``write`` transactions start with ``BEGIN IMMEDIATE``; ``read`` ones run
in autocommit (each statement sees a consistent snapshot)."""

_BEGIN = QUERIES["begin_write"]
_COMMIT = QUERIES["commit"]
_ROLLBACK = QUERIES["rollback"]


def drive(script: Script[_T], execute: Callable[[str, Params], list[Row]]) -> _T:
    """Run ``script`` to completion, feeding it rows or throwing driver errors into it."""
    try:
        sql, params = next(script)
        while True:
            try:
                rows = execute(sql, params)
            except Exception as exc:
                sql, params = script.throw(exc)
            else:
                sql, params = script.send(rows)
    except StopIteration as stop:
        return cast(_T, stop.value)


def run_on_thread(
    db: sqlite3.Connection,
    factory: Callable[[int], Script[_T]],
    mode: Mode,
    clock: Callable[[], datetime],
) -> _T:
    """One transaction, run entirely on the connection's worker thread."""

    def execute(sql: str, params: Params) -> list[Row]:
        return db.execute(sql, params).fetchall()

    if mode == "write":
        db.execute(_BEGIN)
    try:
        result = drive(factory(to_epoch_us(clock(), "clock")), execute)
        if mode == "write":
            db.execute(_COMMIT)
    except BaseException:
        if db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute(_ROLLBACK)
        raise
    return result


async def run_statements(
    conn: aiosqlite.Connection,
    factory: Callable[[int], Script[_T]],
    mode: Mode,
    clock: Callable[[], datetime],
) -> _T:
    """The same transaction through public coroutines: one await per statement.
    The caller holds the lock that keeps other transactions out meanwhile."""
    if mode == "write":
        await conn.execute_fetchall(_BEGIN)
    try:
        script = factory(to_epoch_us(clock(), "clock"))
        try:
            sql, params = next(script)
            while True:
                try:
                    rows = cast(list[Row], list(await conn.execute_fetchall(sql, params)))
                except Exception as exc:
                    sql, params = script.throw(exc)
                else:
                    sql, params = script.send(rows)
        except StopIteration as stop:
            result = cast(_T, stop.value)
        if mode == "write":
            await conn.execute_fetchall(_COMMIT)
    except BaseException:
        if mode == "write":
            await asyncio.shield(_rollback(conn))
        raise
    return result


async def _rollback(conn: aiosqlite.Connection) -> None:
    with suppress(sqlite3.Error):
        await conn.rollback()


@contextmanager
def storage_errors(operation: str) -> Iterator[None]:
    """Translate driver exceptions into :class:`StorageError`, cause attached.

    Reflow's own errors (an idempotency conflict, a refused option) pass
    through unchanged.
    """
    try:
        yield
    except ReflowError:
        raise
    except sqlite3.Error as exc:
        raise StorageError(
            f"SQLite failed during {operation}: {exc}", operation=operation, backend=BACKEND
        ) from exc
    except UnicodeError as exc:
        raise StorageError(
            f"SQLite cannot store this text during {operation}: {exc}",
            operation=operation,
            backend=BACKEND,
        ) from exc


def copy_error(exc: BaseException) -> BaseException:
    """A separate exception per waiting caller, so tracebacks do not pile up on one object."""
    if isinstance(exc, StorageError) and type(exc) is StorageError:
        copy = StorageError(exc.message, operation=exc.operation, backend=exc.backend)
        copy.__cause__ = exc.__cause__
        return copy
    return exc


def daemonize(conn: aiosqlite.Connection) -> None:
    """Let the process exit even if this storage is never closed.

    aiosqlite's worker thread is not a daemon, so a program that ends without
    ``close()`` (an unhandled exception in a worker process, say) would hang
    at exit instead of ending and being restarted. Ending the thread with the
    process is as safe as a crash: SQLite rolls back an unfinished
    transaction when the file is next opened.
    """
    thread = getattr(conn, "_thread", None)
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True


async def stopped(conn: aiosqlite.Connection) -> None:
    """Wait for the worker thread of a connection that failed to open.

    aiosqlite stops the thread itself, and the thread then reports to the
    event loop; waiting keeps it from reporting to a loop that has closed.
    """
    thread = getattr(conn, "_thread", None)
    if isinstance(thread, threading.Thread) and thread.is_alive():
        await asyncio.to_thread(thread.join, 5.0)


async def connect(path: str, busy_timeout_ms: int) -> aiosqlite.Connection:
    """Open ``path`` in autocommit mode on a daemon worker thread."""
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise StorageError(
            f"reflow-sqlite needs SQLite {'.'.join(map(str, MIN_SQLITE_VERSION))} "
            f"or newer; this Python links SQLite {sqlite3.sqlite_version}",
            operation="initialize",
            backend=BACKEND,
        )
    conn = aiosqlite.connect(
        path, timeout=busy_timeout_ms / 1000, isolation_level=None, cached_statements=256
    )
    daemonize(conn)
    try:
        try:
            await conn
        except sqlite3.Error as exc:
            raise StorageError(
                _cannot_open(path, exc), operation="initialize", backend=BACKEND
            ) from exc
    except BaseException:
        await stopped(conn)
        raise
    return conn


def _cannot_open(path: str, exc: sqlite3.Error) -> str:
    """Why ``path`` cannot be opened, naming it: SQLite's own message
    (``unable to open database file``) names neither the file nor the reason."""
    message = f"SQLite cannot open the database {path!r}: {exc}"
    if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_CANTOPEN:
        return message
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        return f"{message}; its directory {folder!r} {what}: create it first"
    if os.path.isdir(path):
        return f"{message}; it is a directory: give the path of a file"
    if not os.access(folder, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK)
    ):
        return f"{message}; check the permissions of the file and of {folder!r}"
    return message


async def disconnect(conn: aiosqlite.Connection) -> None:
    """Checkpoint the WAL into the file (``wal_checkpoint(TRUNCATE)``) and close."""
    try:
        with storage_errors("close"):
            await conn.execute_fetchall(QUERIES["checkpoint"])
    finally:
        with storage_errors("close"):
            await conn.close()
