"""Start-up failures that no retry can fix fail at once, with one clear error
and nothing from the driver on stderr; passing ones are still retried."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from reflow_core import StorageError, open_storage

FAST = 5.0
"""A generous bound on a failure that should take well under a second."""


def _with(
    url: str,
    *,
    user: str | None = None,
    port: int | None = None,
    db: str | None = None,
    password: str | None = None,
) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    auth = user or parts.username or "postgres"
    if password is not None:
        auth += f":{password}"
    netloc = f"{auth}@{host}:{port or parts.port or 5432}"
    path = f"/{db}" if db is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


async def _start_up_failure(url: str) -> tuple[StorageError, float]:
    store = open_storage(url)
    started = time.perf_counter()
    try:
        with pytest.raises(StorageError) as caught:
            await store.initialize()
    finally:
        await store.close()
    return caught.value, time.perf_counter() - started


def _assert_quiet(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text):
        assert "error connecting" not in text


@pytest.fixture
def _log_everything(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)


@pytest.fixture
def unused_port() -> int:
    """A local port nothing listens on (just released by the kernel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def temporary_role(postgres_database: str) -> Iterator[str]:
    """A login role with a password, dropped afterwards (roles are server-wide)."""
    name = f"reflow_test_role_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'Right-Pa55word'").format(sql.Identifier(name))
        )
    try:
        yield name
    finally:
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.usefixtures("_log_everything")
async def test_a_missing_database_fails_fast_saying_so(
    postgres_database: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    missing = f"reflow_missing_{uuid.uuid4().hex[:10]}"
    err, took = await _start_up_failure(_with(postgres_database, db=missing) + "?pool_timeout=20")
    assert took < FAST
    message = str(err)
    assert err.operation == "initialize"
    assert err.backend == "postgresql"
    assert f"127.0.0.1:5432/{missing}" in message
    assert f'database "{missing}" does not exist' in message
    assert f"CREATE DATABASE {missing}" in message
    _assert_quiet(capfd, caplog)


@pytest.mark.usefixtures("_log_everything")
async def test_a_missing_role_fails_fast_saying_so(
    postgres_database: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    role = f"reflow_no_role_{uuid.uuid4().hex[:10]}"
    err, took = await _start_up_failure(_with(postgres_database, user=role))
    assert took < FAST
    message = str(err)
    assert f"as {role!r}" in message
    assert f'role "{role}" does not exist' in message
    assert "CREATE ROLE" in message
    _assert_quiet(capfd, caplog)


@pytest.mark.usefixtures("_log_everything")
async def test_connection_refused_fails_fast_without_showing_the_password(
    postgres_database: str,
    unused_port: int,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = _with(postgres_database, port=unused_port, password="Sup3r-Secret")
    err, took = await _start_up_failure(url)
    assert took < FAST
    message = str(err)
    assert f"127.0.0.1:{unused_port}/" in message
    assert "Connection refused" in message
    assert "server is running" in message
    for text in (message, repr(err), caplog.text):
        assert "Sup3r-Secret" not in text
    _assert_quiet(capfd, caplog)


@pytest.mark.usefixtures("_log_everything")
async def test_a_wrong_password_fails_fast_without_showing_it(
    postgres_database: str,
    temporary_role: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = _with(postgres_database, user=temporary_role, password="Wr0ng-Pa55word")
    try:
        with psycopg.connect(url, connect_timeout=3):
            pass
    except psycopg.OperationalError:
        pass
    else:
        pytest.skip("this server does not check passwords from 127.0.0.1 (trust in pg_hba.conf)")
    err, took = await _start_up_failure(url)
    assert took < FAST
    message = str(err)
    assert "password" in message
    assert temporary_role in message
    for text in (message, repr(err), caplog.text):
        assert "Wr0ng-Pa55word" not in text
    _assert_quiet(capfd, caplog)


async def test_a_passing_refusal_is_still_retried_until_pool_timeout(
    postgres_database: str, temporary_role: str
) -> None:
    # "too many connections for role" may clear up: the pool keeps trying.
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} CONNECTION LIMIT 0").format(sql.Identifier(temporary_role))
        )
    url = _with(postgres_database, user=temporary_role, password="Right-Pa55word")
    err, took = await _start_up_failure(f"{url}?pool_timeout=1.5")
    assert took >= 1.4
    assert "too many connections" in str(err)
    assert "Right-Pa55word" not in str(err)
