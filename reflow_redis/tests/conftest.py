"""Fixtures for the Redis backend's own tests.

``async def`` tests run on a fresh event loop with :func:`asyncio.run`, bounded
by a timeout. ``redis_url`` (from the repository's root ``conftest.py``) is a
URL whose key prefix belongs to the test alone; ``raw`` is a plain redis-py
client on the same server, for looking behind the backend's back.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import pytest
import redis


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests with :func:`asyncio.run`."""
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def main() -> None:
        async with asyncio.timeout(60.0):
            await func(**kwargs)

    asyncio.run(main())
    return True


@pytest.fixture
def prefix(redis_url: str) -> str:
    """The key prefix of this test's ``redis_url``."""
    return redis_url.rsplit("prefix=", 1)[1].split("&", 1)[0]


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client on the test's server."""
    client = redis.Redis.from_url(redis_url.split("?", 1)[0])
    yield client
    client.close()
