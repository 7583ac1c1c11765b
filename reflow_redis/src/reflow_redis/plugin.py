"""The ``reflow`` entry point of reflow-redis: the ``redis``, ``rediss`` and ``unix`` schemes."""

from __future__ import annotations

from typing import Any

from reflow_core.hookspecs import Register, hookimpl
from reflow_core.storage import Storage

__all__ = ["reflow_register_backends"]


def _factory(url: str, /, **options: Any) -> Storage:
    from .storage import RedisStorage

    return RedisStorage.from_url(url, **options)


@hookimpl
def reflow_register_backends(register: Register) -> None:
    """Announce ``redis://``, ``rediss://`` (TLS) and ``unix://`` (a local socket)."""
    register("redis", _factory, description="Redis, many workers on many machines (reflow-redis)")
    register("rediss", _factory, description="Redis over TLS (reflow-redis)")
    register("unix", _factory, description="Redis on a Unix socket (reflow-redis)")
