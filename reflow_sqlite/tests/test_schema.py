"""Schema creation, migration and the refusals that must leave a file untouched."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from reflow_core.errors import SchemaVersionError, StorageError
from reflow_core.storage import NewRun
from reflow_sqlite import _schema as schema_module
from reflow_sqlite._schema import APPLICATION_ID, SCHEMA_VERSION
from reflow_sqlite._scripts import Script


def pragmas(path: Path) -> tuple[int, int, str]:
    raw = sqlite3.connect(path)
    try:
        app_id = raw.execute("PRAGMA application_id").fetchone()[0]
        version = raw.execute("PRAGMA user_version").fetchone()[0]
        mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
        return app_id, version, mode
    finally:
        raw.close()


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in the directory with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_a_new_file_gets_the_marked_schema_in_wal_mode(opener, db_path) -> None:
    store = await opener()
    await store.initialize()  # idempotent
    await store.create_run(NewRun("wf", "{}"))
    await store.close()
    assert pragmas(db_path) == (APPLICATION_ID, SCHEMA_VERSION, "wal")
    reopened = await opener()
    assert len((await reopened.list_runs()).runs) == 1


async def test_several_processes_initializing_at_once_apply_the_schema_once(opener) -> None:
    stores = [opener.build() for _ in range(8)]
    await asyncio.gather(*(s.initialize() for s in stores))
    results = await asyncio.gather(*(s.create_run(NewRun("wf", "{}")) for s in stores))
    assert len({r.run.id for r in results}) == 8
    assert len((await stores[0].list_runs()).runs) == 8


async def test_the_synchronous_level_is_applied(opener, tmp_path) -> None:
    levels = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}
    for name, value in levels.items():
        store = await opener(tmp_path / f"{name}.db", synchronous=name.lower())
        assert store.synchronous == name

        def script(now: int) -> Script[int]:
            rows = yield ("PRAGMA synchronous", ())
            return int(rows[0][0])

        assert await store._call("test", script, "read") == value


async def test_garbage_file_is_refused_untouched(opener, tmp_path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(3000))
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="is not a SQLite database") as info:
        await opener(path)
    assert not isinstance(info.value, SchemaVersionError)
    assert info.value.operation == "initialize"
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert snapshot(tmp_path) == before


async def test_text_file_is_refused_untouched(opener, tmp_path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("SQLite format 3 is what this is not\n" * 50)
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="is not a SQLite database"):
        await opener(path)
    assert snapshot(tmp_path) == before


async def test_database_of_another_application_is_refused_untouched(opener, tmp_path) -> None:
    path = tmp_path / "other.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA application_id = 1234")
    raw.commit()
    raw.close()
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="not a Reflow database") as info:
        await opener(path)
    assert "0x000004d2" in str(info.value)
    assert snapshot(tmp_path) == before


async def test_unmarked_database_with_tables_is_refused_untouched(opener, tmp_path) -> None:
    path = tmp_path / "app.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    raw.execute("INSERT INTO users (name) VALUES ('ada')")
    raw.commit()
    raw.close()
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="not a Reflow database"):
        await opener(path)
    assert snapshot(tmp_path) == before


async def test_newer_schema_is_refused_untouched(opener, db_path, tmp_path) -> None:
    store = await opener()
    await store.create_run(NewRun("wf", "{}"))
    await store.close()
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    before = snapshot(tmp_path)
    with pytest.raises(SchemaVersionError, match="upgrade reflow-sqlite") as info:
        await opener()
    assert info.value.backend == "sqlite"
    assert snapshot(tmp_path) == before


async def test_an_older_schema_is_migrated_forward(opener, db_path, monkeypatch) -> None:
    store = await opener()
    run = (await store.create_run(NewRun("wf", '"kept"'))).run
    await store.close()
    extra = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"]
    monkeypatch.setattr(schema_module, "MIGRATIONS", (*schema_module.MIGRATIONS, extra))
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    upgraded = await opener()
    assert await upgraded.get_run(run.id) == run
    await upgraded.close()
    assert pragmas(db_path)[:2] == (APPLICATION_ID, SCHEMA_VERSION + 1)
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT count(*) FROM notes").fetchone() == (0,)
    raw.close()


async def test_missing_directory_is_a_storage_error(opener, tmp_path) -> None:
    with pytest.raises(StorageError) as info:
        await opener(tmp_path / "nope" / "x.db")
    assert isinstance(info.value.__cause__, sqlite3.Error)
