"""reflow-postgres: the PostgreSQL backend for Reflow.

Installing this distribution makes ``postgresql://`` (and ``postgres://``)
URLs work with :func:`reflow_core.open_storage`::

    storage = open_storage("postgresql://app@db.internal/app?schema=reflow&pool_max_size=20")

or build the storage directly with :class:`PostgresStorage`.
"""

from __future__ import annotations

from .storage import PostgresStorage, parse_postgres_url

__all__ = ["PostgresStorage", "parse_postgres_url"]
