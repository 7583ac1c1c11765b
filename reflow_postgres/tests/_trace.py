"""What the PostgreSQL client sends, from libpq's own protocol trace: how
tests count round trips and statements without standing in for the driver."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import pq

from reflow_postgres import PostgresStorage

__all__ = ["Trace"]


class Trace:
    """The protocol messages the client sends on the pool's only
    connection while the block runs (libpq's own trace of it)."""

    def __init__(self, store: PostgresStorage) -> None:
        self._store = store
        self.sent: list[tuple[str, str]] = []

    async def run(self, work: Callable[[], Awaitable[Any]]) -> Any:
        async def connection(conn: psycopg.AsyncConnection[Any], attempt: int) -> Any:
            return conn

        conn = await self._store._db.run("trace", connection)
        with tempfile.TemporaryFile("w+") as file:
            # libpq closes the file it traces to: it gets a copy of the descriptor.
            conn.pgconn.trace(os.dup(file.fileno()))
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            try:
                result = await work()
            finally:
                conn.pgconn.untrace()
            file.seek(0)
            for line in file.read().splitlines():
                fields = line.split("\t")
                if fields[0] == "F":
                    self.sent.append((fields[2], fields[3] if len(fields) > 3 else ""))
        return result

    @property
    def syncs(self) -> int:
        """Round trips: the client waits for the server only at a Sync."""
        return sum(1 for kind, _ in self.sent if kind == "Sync")

    def statements(self, text: str) -> int:
        """Statements parsed whose text holds ``"text"`` (a query's name)."""
        return sum(1 for kind, body in self.sent if kind == "Parse" and f'"{text}"' in body)

    @property
    def executed(self) -> int:
        """Statements sent, by extended protocol (Execute) or simple Query."""
        return sum(1 for kind, _ in self.sent if kind in ("Execute", "Query"))
