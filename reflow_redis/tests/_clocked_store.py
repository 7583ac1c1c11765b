"""A Redis store on a test's own prefix, opened and closed around the test,
for ``test_rates_keys.py`` and ``test_limits_keys.py``.

Test modules import this file relatively: with pytest's importlib import mode
the tests folder is not a package one can import from by name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from reflow_redis import RedisStorage


class Clock:
    """A clock that stands still at ``now`` until the test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@asynccontextmanager
async def open_store(redis_url: str, clock: Clock | None = None) -> AsyncIterator[RedisStorage]:
    """An initialized store on ``redis_url`` (reading ``clock`` if given, else
    the real time), closed when the block ends."""
    store = RedisStorage.from_url(redis_url, clock=clock)
    await store.initialize()
    try:
        yield store
    finally:
        await store.close()
