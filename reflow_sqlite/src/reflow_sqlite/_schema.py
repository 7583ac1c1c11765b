"""The database layout and its forward-only migrations, from ``schema.sql``.

A Reflow database is marked by ``PRAGMA application_id`` (:data:`APPLICATION_ID`)
and carries its schema version in ``PRAGMA user_version``. ``MIGRATIONS[n]`` turns
version ``n`` into version ``n + 1``; released entries are never edited, only
appended to, so every database can be brought forward from any older version.

Timestamps are integer microseconds since the Unix epoch, UTC: they compare as
plain integers in indexes and convert to and from :class:`datetime.datetime`
without loss.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping, Sequence

from reflow_core.adapter import load_queries
from reflow_core.errors import SchemaVersionError, StorageError

from ._options import BACKEND
from ._queries import QUERIES, fill
from ._scripts import Script

__all__ = [
    "APPLICATION_ID",
    "DROP_BUFFERED",
    "MIGRATIONS",
    "RETIRE_BUFFERED",
    "SCHEMA_VERSION",
    "check_identity",
    "configure_script",
    "migrate_script",
    "split_statements",
]

APPLICATION_ID = 0x52464C57
"""``PRAGMA application_id`` of every Reflow database: the bytes ``RFLW``."""

TRIGGER_VALUES: Mapping[str, Sequence[str]] = {
    "runs_end_drops_buffered_events": ("NEW.id", "NEW.finished_at", "NEW.id"),
}
"""For each trigger, what its ``?`` stand for, in order: a trigger runs
statements written with parameters elsewhere (:data:`DROP_BUFFERED`,
:data:`RETIRE_BUFFERED`) on the row that fired it. No other migration
statement takes a parameter."""

_TRIGGER = re.compile(r"CREATE\s+TRIGGER\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE)


def split_statements(text: str, where: str = "schema.sql") -> list[str]:
    """The statements of ``text``, each ended by ``;`` (the last one may lack
    it), as SQLite itself tells where one ends (a trigger's body holds ``;``
    too). Returned without their final ``;``."""
    statements: list[str] = []
    pending: list[str] = []
    for line in text.splitlines():
        pending.append(line)
        if sqlite3.complete_statement("\n".join(pending)):
            statements.append("\n".join(pending).strip().removesuffix(";").rstrip())
            pending = []
    rest = "\n".join(pending).strip()
    if rest:
        if not sqlite3.complete_statement(rest + ";"):
            raise ValueError(f"{where}: an unfinished statement: {rest[:60]!r}")
        statements.append(rest)
    return statements


def _bind_trigger(statement: str, where: str) -> str:
    """``statement`` with its ``?`` replaced by :data:`TRIGGER_VALUES`."""
    if "?" not in statement:
        return statement
    found = _TRIGGER.match(statement)
    values = TRIGGER_VALUES.get(found.group(1), ()) if found else ()
    pieces = statement.split("?")
    if len(pieces) != len(values) + 1:
        raise ValueError(f"{where}: a migration statement with parameters: {statement[:60]!r}")
    return "".join(piece + value for piece, value in zip(pieces, (*values, ""), strict=True))


_SQL = load_queries("reflow_sqlite", "schema.sql")

DROP_BUFFERED = _SQL["drop_buffered"]
"""A run that ends drops its buffered events: those without an id go, those
with one stay as taken with no payload (:data:`RETIRE_BUFFERED`), so a
redelivery of the id stays a no-op for as long as the run exists. Both walk
the partial index events_buffered, which holds buffered events only (the
unary ``+`` keeps the planner off the ``(run_id, event_id)`` index, which also
holds taken events). Run by a trigger; parameters: the run id."""
RETIRE_BUFFERED = _SQL["retire_buffered"]
"""See :data:`DROP_BUFFERED`. Parameters: the time, the run id."""


def _migration(version: int) -> Sequence[str]:
    where = f"schema.sql:v{version}"
    return tuple(_bind_trigger(s, where) for s in split_statements(_SQL[f"v{version}"], where))


MIGRATIONS: Sequence[Sequence[str]] = tuple(
    _migration(version) for version in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
)
"""``MIGRATIONS[n]``: the statements that take schema version ``n`` to ``n + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code writes; a newer one in a file is refused."""


# -- opening a file ---------------------------------------------------------------------


def check_identity(path: str, app_id: int, version: int, objects: int) -> bool:
    """Refuse a foreign or too new database; True if the schema must be created or migrated."""
    if app_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{path} has Reflow schema version {version}, but this reflow-sqlite "
                f"supports up to version {SCHEMA_VERSION}; upgrade reflow-sqlite",
                operation="initialize",
                backend=BACKEND,
            )
        return version < SCHEMA_VERSION
    if app_id != 0:
        raise StorageError(
            f"{path} is not a Reflow database: its application_id is "
            f"{app_id:#010x}, Reflow's is {APPLICATION_ID:#010x}",
            operation="initialize",
            backend=BACKEND,
        )
    if objects or version:
        raise StorageError(
            f"{path} is not a Reflow database: it already holds another application's tables",
            operation="initialize",
            backend=BACKEND,
        )
    return True


def configure_script(now: int, path: str, synchronous: str) -> Script[None]:
    """WAL mode, and the ``synchronous`` level (one of ``SYNCHRONOUS_LEVELS``)."""
    rows = yield (QUERIES["journal_wal"], ())
    if str(rows[0][0]).lower() != "wal":
        raise StorageError(
            f"{path} could not be switched to WAL mode (it is in {rows[0][0]!r} mode)",
            operation="initialize",
            backend=BACKEND,
        )
    # Pragmas take no parameters; the level is one of SYNCHRONOUS_LEVELS.
    yield (fill("set_synchronous", level=synchronous), ())


def migrate_script(now: int, path: str) -> Script[None]:
    """Create the schema, or bring it forward to :data:`SCHEMA_VERSION`."""
    rows = yield (QUERIES["inspect"], ())
    app_id, version, objects = (int(value) for value in rows[0])
    # Checked again under the write lock: another process may have
    # initialized the file since it was first inspected.
    if not check_identity(path, app_id, version, objects):
        return
    for migration in MIGRATIONS[version:]:
        for statement in migration:
            yield (statement, ())
    yield (fill("set_application_id", application_id=str(int(APPLICATION_ID))), ())
    yield (fill("set_user_version", version=str(int(SCHEMA_VERSION))), ())
