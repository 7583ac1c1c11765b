"""Fixtures for the SQLite backend tests.

* ``async def`` tests run on a fresh event loop with :func:`asyncio.run`,
  bounded by a timeout so a hang fails fast
  (:func:`reflow_conformance.testsupport.run_async_tests`).
* ``clock`` is a storage clock that moves only when the test advances it.
* ``opener`` opens storages on the test's database file (a new connection each
  time, as another worker process would have); every storage it opened is
  closed after the test, on the test's own loop. ``driver`` picks how
  transactions reach the database: ``"hook"`` (one call on aiosqlite's worker
  thread) or ``"public"`` (aiosqlite's public coroutines); modules that
  override the fixture run under both.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reflow_conformance.testsupport import FakeClock, run_async_tests
from reflow_sqlite import SQLiteStorage
from reflow_sqlite._schema import MIGRATIONS

ASYNC_TEST_TIMEOUT = 30.0
CLOCK_START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@contextmanager
def database() -> Iterator[sqlite3.Connection]:
    """A fresh database in memory with the current schema, in autocommit mode."""
    raw = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for migration in MIGRATIONS:
            for statement in migration:
                raw.execute(statement)
        yield raw
    finally:
        raw.close()


def writes_index(raw: sqlite3.Connection, index: str, sql: str) -> bool:
    """Whether the program SQLite compiles ``sql`` to opens ``index`` for writing."""
    (root,) = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()
    program = raw.execute(f"EXPLAIN {sql}", [None] * sql.count("?")).fetchall()
    return any(op[1] == "OpenWrite" and op[3] == root for op in program)


class Opener:
    """Opens initialized storages on one database file and closes them afterwards."""

    def __init__(self, path: Path, clock: FakeClock, driver: str) -> None:
        self.path = path
        self.clock = clock
        self.driver = driver
        self.opened: list[SQLiteStorage] = []

    def build(self, path: Path | None = None, **options: Any) -> SQLiteStorage:
        """An uninitialized storage (closed after the test)."""
        options.setdefault("clock", self.clock)
        store = SQLiteStorage(path or self.path, **options)
        store._use_private_hook = self.driver == "hook"
        self.opened.append(store)
        return store

    async def __call__(self, path: Path | None = None, **options: Any) -> SQLiteStorage:
        """An initialized storage (closed after the test)."""
        store = self.build(path, **options)
        await store.initialize()
        return store

    async def aclose(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture
def clock() -> FakeClock:
    """The storage clock of every storage the ``opener`` opens, unless overridden."""
    return FakeClock(CLOCK_START)


@pytest.fixture
def driver() -> str:
    """How transactions reach the database; modules may parametrize it."""
    return "hook"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """The test's database file."""
    return tmp_path / "reflow.db"


@pytest.fixture
def opener(db_path: Path, clock: FakeClock, driver: str) -> Opener:
    """Opens storages on ``db_path``."""
    return Opener(db_path, clock, driver)


pytest_pyfunc_call = run_async_tests(timeout=ASYNC_TEST_TIMEOUT, close=(Opener,))
"""Run ``async def`` tests with :func:`asyncio.run`, closing the storages their openers opened."""
