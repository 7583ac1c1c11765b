"""Fixtures for the PostgreSQL backend's own tests.

``async def`` tests run on a fresh event loop with :func:`asyncio.run`, bounded
by a timeout. ``postgres_url`` (from the repository's root ``conftest.py``) is
a URL whose schema belongs to the test alone; ``admin`` is a plain psycopg
connection to the same database, for looking behind the backend's back.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import psycopg
import pytest

ASYNC_TEST_TIMEOUT = 60.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests with :func:`asyncio.run`."""
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def main() -> None:
        async with asyncio.timeout(ASYNC_TEST_TIMEOUT):
            await func(**kwargs)

    asyncio.run(main())
    return True


@pytest.fixture
def admin(postgres_database: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to the session's database."""
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        yield conn


@pytest.fixture
def schema(postgres_url: str) -> str:
    """The schema of this test's ``postgres_url``."""
    return postgres_url.rsplit("schema=", 1)[1].split("&", 1)[0]
