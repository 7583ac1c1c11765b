"""reflow-redis: the Redis backend for Reflow.

Installing this distribution makes ``redis://``, ``rediss://`` and ``unix://``
URLs work with :func:`reflow_core.open_storage`::

    storage = open_storage("redis://localhost:6379/0?prefix=billing")

or build the storage directly with :class:`RedisStorage`.
"""

from __future__ import annotations

from .storage import RedisStorage, parse_redis_url

__all__ = ["RedisStorage", "parse_redis_url"]
