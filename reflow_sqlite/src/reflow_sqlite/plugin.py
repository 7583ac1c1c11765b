"""The ``reflow`` entry point of reflow-sqlite: registers the ``sqlite`` URL scheme."""

from __future__ import annotations

from typing import Any

from reflow_core.hookspecs import Register, hookimpl
from reflow_core.storage import Storage

__all__ = ["reflow_register_backends"]


def _factory(url: str, /, **options: Any) -> Storage:
    from .storage import SQLiteStorage

    return SQLiteStorage.from_url(url, **options)


@hookimpl
def reflow_register_backends(register: Register) -> None:
    """Announce ``sqlite://`` (one file, WAL, several processes on one host)."""
    register(
        "sqlite",
        _factory,
        description="embedded SQLite file, several processes on one host (reflow-sqlite)",
    )
