"""Fixtures for the Redis backend's own tests.

``async def`` tests run on a fresh event loop with :func:`asyncio.run`, bounded
by a timeout (:func:`reflow_conformance.testsupport.run_async_tests`).
``redis_url`` (from the repository's root ``conftest.py``) is a
URL whose key prefix belongs to the test alone (``prefix``; its keys start
with ``tag``); ``raw`` is a plain redis-py
client on the same server, for looking behind the backend's back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from reflow_conformance.testsupport import run_async_tests

ASYNC_TEST_TIMEOUT = 60.0

pytest_pyfunc_call = run_async_tests(timeout=ASYNC_TEST_TIMEOUT)
"""Run ``async def`` tests with :func:`asyncio.run`."""


@pytest.fixture
def prefix(redis_url: str) -> str:
    """The key prefix of this test's ``redis_url``."""
    return redis_url.rsplit("prefix=", 1)[1].split("&", 1)[0]


@pytest.fixture
def tag(prefix: str) -> str:
    """The hash tag every key of this test's prefix starts with: ``{prefix}``."""
    return "{" + prefix + "}"


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client on the test's server."""
    client = redis.Redis.from_url(redis_url.split("?", 1)[0])
    yield client
    client.close()
