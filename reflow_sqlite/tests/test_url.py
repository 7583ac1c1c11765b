"""URL forms, options, and the ``sqlite`` entry point."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reflow_core.errors import ConfigError, StorageError
from reflow_core.registry import BackendRegistry, open_storage
from reflow_core.storage import NewRun, Storage
from reflow_sqlite import SQLiteStorage, parse_sqlite_url


@pytest.mark.parametrize(
    ("url", "path", "options"),
    [
        ("sqlite:///workflows.db", "workflows.db", {}),
        ("sqlite:///./data/app.db", "./data/app.db", {}),
        ("sqlite:////var/lib/reflow/app.db", "/var/lib/reflow/app.db", {}),
        ("SQLite:///my%20flows.db", "my flows.db", {}),
        (
            "sqlite:///a.db?synchronous=FULL&busy_timeout=250",
            "a.db",
            {"synchronous": "FULL", "busy_timeout": "250"},
        ),
        ("sqlite:///a.db?group_commit=off", "a.db", {"group_commit": "off"}),
    ],
)
def test_url_forms(url: str, path: str, options: dict[str, str]) -> None:
    assert parse_sqlite_url(url) == (path, options)


@pytest.mark.parametrize(
    ("url", "option", "message"),
    [
        ("sqlite:///:memory:", "path", "in-memory"),
        ("sqlite:///file::memory:", "path", "in-memory"),
        ("sqlite:///file:data.db", "path", "URI filenames"),
        ("sqlite://", "url", "no host"),
        ("sqlite:///", "path", "must not be empty"),
        ("sqlite://host/a.db", "url", "no host"),
        ("postgresql:///a.db", "url", "not a sqlite"),
        ("sqlite:///a.db#frag", "url", "fragment"),
        ("sqlite:///a.db?journal_mode=DELETE", "journal_mode", "unknown"),
        ("sqlite:///a.db?synchronous=FULL&synchronous=OFF", "synchronous", "twice"),
        ("sqlite:///a.db?synchronous", "url", "malformed"),
    ],
)
def test_bad_urls_name_the_problem(url: str, option: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        SQLiteStorage.from_url(url)
    assert info.value.option == option


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"synchronous": "FAST"}, "synchronous"),
        ({"synchronous": 2}, "synchronous"),
        ({"busy_timeout": -1}, "busy_timeout"),
        ({"busy_timeout": "5s"}, "busy_timeout"),
        ({"busy_timeout": 1.5}, "busy_timeout"),
        ({"busy_timeout": True}, "busy_timeout"),
        ({"group_commit": "maybe"}, "group_commit"),
        ({"clock": "now"}, "clock"),
        ({"timeout": 5}, "timeout"),
    ],
)
def test_bad_options_name_the_option(options: dict[str, object], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        SQLiteStorage.from_url("sqlite:///a.db", **options)
    assert info.value.option == option
    assert option in str(info.value)


def test_bad_url_option_values_name_the_option() -> None:
    with pytest.raises(ConfigError, match="synchronous") as info:
        SQLiteStorage.from_url("sqlite:///a.db?synchronous=sometimes")
    assert info.value.option == "synchronous"
    with pytest.raises(ConfigError) as info:
        SQLiteStorage.from_url("sqlite:///a.db?busy_timeout=soon")
    assert info.value.option == "busy_timeout"


def test_in_memory_path_is_refused_by_the_constructor() -> None:
    with pytest.raises(ConfigError, match="in-memory"):
        SQLiteStorage(":memory:")


def test_options_from_url_and_keywords() -> None:
    def clock() -> datetime:
        return datetime(2030, 1, 1, tzinfo=UTC)

    store = SQLiteStorage.from_url(
        "sqlite:///a.db?synchronous=full&busy_timeout=250", busy_timeout=timedelta(seconds=2)
    )
    assert store.synchronous == "FULL"
    assert store._busy_timeout_ms == 2000  # the keyword wins
    assert SQLiteStorage.from_url("sqlite:///a.db", clock=clock)._clock is clock
    assert not SQLiteStorage.from_url("sqlite:///a.db?group_commit=0")._group_commit
    default = SQLiteStorage("a.db")
    assert (default.synchronous, default._busy_timeout_ms, default._group_commit) == (
        "NORMAL",
        5000,
        True,
    )


async def test_open_storage_finds_the_plugin(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/via-registry.db?synchronous=FULL"
    assert url.startswith("sqlite:////")
    store = open_storage(url)
    assert isinstance(store, SQLiteStorage)
    assert isinstance(store, Storage)
    assert store.synchronous == "FULL"
    await store.initialize()
    try:
        assert (await store.create_run(NewRun("wf", "{}"))).created
    finally:
        await store.close()
    assert (tmp_path / "via-registry.db").exists()


def test_relative_url_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_storage("sqlite:///rel/x.db")
    assert isinstance(store, SQLiteStorage)
    assert store.path == "rel/x.db"
    assert os.path.abspath(store.path) == str(tmp_path / "rel" / "x.db")


def test_the_registry_lists_the_backend() -> None:
    registry = BackendRegistry()
    info = registry.get("sqlite")
    assert info.scheme == "sqlite"
    assert "SQLite" in info.description
    assert info.plugin.endswith(":sqlite")


# -- unknown options and files that cannot be opened -------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "option", "suggested"),
    [
        ("sqlite:///a.db?synchronus=FULL", {}, "synchronus", "synchronous"),
        ("sqlite:///a.db?busytimeout=5", {}, "busytimeout", "busy_timeout"),
        ("sqlite:///a.db", {"group_comit": False}, "group_comit", "group_commit"),
        ("sqlite:///a.db", {"clok": None}, "clok", "clock"),
    ],
)
def test_an_unknown_option_is_refused_at_open_storage_with_a_suggestion(
    url: str, options: dict[str, object], option: str, suggested: str
) -> None:
    with pytest.raises(ConfigError) as info:
        open_storage(url, **options)
    assert info.value.option == option
    assert f"did you mean {suggested!r}?" in str(info.value)
    assert "known options: synchronous, busy_timeout, group_commit" in str(info.value)


async def test_a_missing_directory_is_named_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing_dir"
    store = open_storage(f"sqlite:///{missing}/x.db")
    with pytest.raises(StorageError) as info:
        await store.initialize()
    await store.close()
    message = str(info.value)
    assert str(missing / "x.db") in message
    assert f"its directory {str(missing)!r} does not exist" in message
    assert info.value.operation == "initialize"
    assert not missing.exists()


async def test_a_relative_path_in_a_missing_directory_names_the_full_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_storage("sqlite:///missing_dir/x.db")
    with pytest.raises(StorageError) as info:
        await store.initialize()
    await store.close()
    assert "'missing_dir/x.db'" in str(info.value)
    assert str(tmp_path / "missing_dir") in str(info.value)


async def test_a_directory_given_as_the_database_is_named(tmp_path: Path) -> None:
    store = open_storage(f"sqlite:///{tmp_path}")
    with pytest.raises(StorageError, match="it is a directory") as info:
        await store.initialize()
    await store.close()
    assert str(tmp_path) in str(info.value)
