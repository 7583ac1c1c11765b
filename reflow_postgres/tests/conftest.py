"""Fixtures for the PostgreSQL backend's own tests.

``async def`` tests run on a fresh event loop with :func:`asyncio.run`, bounded
by a timeout (:func:`reflow_conformance.testsupport.run_async_tests`).
``postgres_url`` (from the repository's root ``conftest.py``) is
a URL whose schema belongs to the test alone; ``admin`` is a plain psycopg
connection to the same database, for looking behind the backend's back.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from reflow_conformance.testsupport import run_async_tests

ASYNC_TEST_TIMEOUT = 60.0

pytest_pyfunc_call = run_async_tests(timeout=ASYNC_TEST_TIMEOUT)
"""Run ``async def`` tests with :func:`asyncio.run`."""


@pytest.fixture
def admin(postgres_database: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to the session's database."""
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        yield conn


@pytest.fixture
def schema(postgres_url: str) -> str:
    """The schema of this test's ``postgres_url``."""
    return postgres_url.rsplit("schema=", 1)[1].split("&", 1)[0]
