"""The ``reflow`` entry point of reflow-postgres: the ``postgresql`` and ``postgres`` schemes."""

from __future__ import annotations

from typing import Any

from reflow_core.hookspecs import Register, hookimpl
from reflow_core.storage import Storage

__all__ = ["reflow_register_backends"]


def _factory(url: str, /, **options: Any) -> Storage:
    from .storage import PostgresStorage

    return PostgresStorage.from_url(url, **options)


@hookimpl
def reflow_register_backends(register: Register) -> None:
    """Announce ``postgresql://`` and its alias ``postgres://``."""
    description = "PostgreSQL, many workers on many machines (reflow-postgres)"
    register("postgresql", _factory, description=description)
    register("postgres", _factory, description=description)
