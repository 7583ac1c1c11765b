"""Repository-wide pytest setup.

Each distribution's directory (``reflow_core/``, ``reflow_sqlite/``, ...) has
the same name as the package it installs, and pytest's importlib import mode
names test modules after their path (``reflow_core.tests.test_engine``). If
pytest met that path first it would register the directory as a namespace
package called ``reflow_core`` and hide the installed package. Importing the
installed packages here, before any test module, puts the real ones in place.
"""

from __future__ import annotations

import importlib

for _name in (
    "reflow_core",
    "reflow_sqlite",
    "reflow_postgres",
    "reflow_redis",
    "reflow_dashboard",
    "reflow_conformance",
):
    importlib.import_module(_name)


# -- PostgreSQL ----------------------------------------------------------------
#
# Tests that need PostgreSQL get a database of their own for the session,
# created on the server named by REFLOW_TEST_POSTGRES_URL (default: the local
# server on 127.0.0.1:5432) and dropped at the end; each test then works in a
# schema of its own inside it. Without a server the tests are skipped, except
# under CI, where they fail.

import os  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

POSTGRES_SERVER_URL = os.environ.get(
    "REFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _postgres_unavailable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_SERVER_URL, connect_timeout=3):
            return None
    except Exception as exc:  # any failure means no usable server
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The URL of a database created for this test session (dropped afterwards)."""
    import psycopg
    from psycopg import sql

    problem = _postgres_unavailable()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI but unreachable: {problem}")
        pytest.skip(f"PostgreSQL is not reachable ({problem})")
    name = f"reflow_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = POSTGRES_SERVER_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_SERVER_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """A ``postgresql://`` URL whose schema is new and used by this test alone."""
    return f"{postgres_database}?schema=t_{uuid.uuid4().hex[:12]}"


# -- Redis -----------------------------------------------------------------------
#
# Tests that need Redis work under key prefixes of their own, all starting
# with this session's prefix, on the server named by REFLOW_TEST_REDIS_URL
# (default: the local server on 127.0.0.1:6379, database 0); every key of the
# session is deleted at the end. Without a server the tests are skipped,
# except under CI, where they fail.

REDIS_SERVER_URL = os.environ.get("REFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_session_prefix() -> Iterator[str]:
    """A key prefix for this test session (its keys are deleted afterwards)."""
    import redis

    prefix = f"reflow_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        client = redis.Redis.from_url(REDIS_SERVER_URL, socket_connect_timeout=3)
        client.ping()
    except Exception as exc:  # any failure means no usable server
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required under CI but unreachable: {exc}")
        pytest.skip(f"Redis is not reachable ({exc})")
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match="{" + prefix + "*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()


@pytest.fixture
def redis_url(redis_session_prefix: str) -> str:
    """A ``redis://`` URL whose key prefix belongs to this test alone."""
    return f"{REDIS_SERVER_URL}?prefix={redis_session_prefix}.{uuid.uuid4().hex[:12]}"
