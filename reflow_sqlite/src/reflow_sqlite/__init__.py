"""reflow-sqlite: the embedded SQLite backend for Reflow.

Installing this distribution makes ``sqlite://`` URLs work with
:func:`reflow_core.open_storage`::

    storage = open_storage("sqlite:///workflows.db?synchronous=FULL")

or build the storage directly with :class:`SQLiteStorage`.
"""

from __future__ import annotations

from .storage import SQLiteStorage, parse_sqlite_url

__all__ = ["SQLiteStorage", "parse_sqlite_url"]
