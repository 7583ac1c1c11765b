"""Shared fixtures for the engine tests.

* ``async def`` tests run on a fresh event loop with :func:`asyncio.run` (no
  pytest-asyncio needed), bounded by a per-test timeout so a hang fails fast
  (:func:`reflow_conformance.testsupport.run_async_tests`).
* ``backend`` is parametrized over every backend available in this checkout:
  ``memory`` always, ``sqlite`` once ``reflow_sqlite.SQLiteStorage`` imports,
  ``postgres`` once ``reflow_postgres`` imports (each test in a schema of
  its own, on the session's database from the root ``conftest.py``),
  ``redis`` once ``reflow_redis`` imports (each test under a key prefix of
  its own).
  ``db`` is the test's database on it and ``storage`` one uninitialized
  storage on ``db``; every storage opened through ``db`` is closed after the
  test, on the test's own loop.
* Any error logged by the engine for an unexpected exception, and any
  exception asyncio reports as never retrieved, fails the test.
* :func:`blocked_status` waits for a run to be held back.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from reflow_conformance.testsupport import FakeClock, run_async_tests
from reflow_core import Engine, MemoryStorage, Run, open_storage
from reflow_core.storage import Storage

ASYNC_TEST_TIMEOUT = 30.0
"""Seconds an ``async def`` test may run before it is failed as hung."""


def _import_error(module_name: str, attribute: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
        getattr(module, attribute)
    except Exception as exc:  # any failure means the backend is not ready
        return f"{type(exc).__name__}: {exc}"
    return None


_SQLITE_MISSING = _import_error("reflow_sqlite", "SQLiteStorage")
_POSTGRES_MISSING = _import_error("reflow_postgres", "PostgresStorage")
_REDIS_MISSING = _import_error("reflow_redis", "RedisStorage")

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param(
        "sqlite",
        id="sqlite",
        marks=pytest.mark.skipif(
            _SQLITE_MISSING is not None,
            reason=f"reflow_sqlite.SQLiteStorage does not import yet ({_SQLITE_MISSING})",
        ),
    ),
    pytest.param(
        "postgres",
        id="postgres",
        marks=pytest.mark.skipif(
            _POSTGRES_MISSING is not None,
            reason=f"reflow_postgres does not import ({_POSTGRES_MISSING})",
        ),
    ),
    pytest.param(
        "redis",
        id="redis",
        marks=pytest.mark.skipif(
            _REDIS_MISSING is not None, reason=f"reflow_redis does not import ({_REDIS_MISSING})"
        ),
    ),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_error_logs: the test expects the engine to log errors"
    )


class Database:
    """The test's database on one backend. :meth:`connect` opens a storage on
    it: for sqlite a new connection to the same file each time (as another
    worker process would), for memory the one shared in-process store."""

    def __init__(self, backend: str, directory: Path, url: str | None = None) -> None:
        self.backend = backend
        self.path = directory / "t.db"
        self.url = url
        self.opened: list[Storage] = []
        self._memory: MemoryStorage | None = None

    def connect(self, *, clock: Callable[[], datetime] | None = None) -> Storage:
        """A new, uninitialized storage on this database (closed after the test)."""
        if self.backend == "memory":
            if self._memory is None:
                self._memory = MemoryStorage(clock=clock)
                self.opened.append(self._memory)
            return self._memory
        if self.backend == "sqlite":
            options = {} if clock is None else {"clock": clock}
            store = open_storage(f"sqlite:///{self.path}", **options)
            self.opened.append(store)
            return store
        if self.backend in ("postgres", "redis"):
            assert self.url is not None
            options = {} if clock is None else {"clock": clock}
            store = open_storage(self.url, **options)
            self.opened.append(store)
            return store
        raise AssertionError(f"unknown backend {self.backend!r}")

    async def aclose(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    return str(request.param)


@pytest.fixture
def db(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Database:
    """The test's database on the backend under test."""
    fixture = {"postgres": "postgres_url", "redis": "redis_url"}.get(backend)
    url = request.getfixturevalue(fixture) if fixture else None
    return Database(backend, tmp_path, url)


@pytest.fixture
def storage(db: Database) -> Storage:
    """An uninitialized storage of the backend under test (closed after the test)."""
    return db.connect()


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage URL of the test's own on each real backend, for worker
    processes: a SQLite file, a PostgreSQL schema or a Redis key prefix."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    fixture = {"postgres": "postgres_url", "redis": "redis_url"}[request.param]
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def clock() -> FakeClock:
    """A storage clock that moves only when the test advances it."""
    return FakeClock()


pytest_pyfunc_call = run_async_tests(timeout=ASYNC_TEST_TIMEOUT, close=(Database,))
"""Run ``async def`` tests with :func:`asyncio.run`, closing the test's database after."""


class _ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def _no_unexpected_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test in which the engine hit an unexpected exception, or asyncio
    dropped a task's exception: both mean a bug that no assertion would see."""
    collector = _ErrorCollector()
    loggers = [logging.getLogger("reflow"), logging.getLogger("asyncio")]
    for lg in loggers:
        lg.addHandler(collector)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(collector)
    if request.node.get_closest_marker("allow_error_logs"):
        return
    bad = [
        f"{r.name}: {r.getMessage()}"
        for r in collector.records
        if r.name == "asyncio" or r.exc_info is not None
    ]
    assert not bad, "unexpected errors were logged:\n" + "\n".join(bad)


async def blocked_status(engine: Engine, run_id: str, timeout: float = 10.0) -> Run:
    """The run's status once it is blocked (``blocked_by`` set), or as it is
    after ``timeout`` seconds if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        status = await engine.get_run_status(run_id)
        if status.blocked_by is not None or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)
