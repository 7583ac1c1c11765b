"""Backend selection: URLs to storages through the plugin registry."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any

import pytest

from reflow_core import BackendNotFoundError, ConfigError, MemoryStorage, open_storage
from reflow_core import registry as registry_module
from reflow_core.hookspecs import hookimpl
from reflow_core.registry import (
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    BackendRegistry,
    available_backends,
    redact_url,
)
from reflow_core.storage import NewRun

ANNOUNCED = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
"""Schemes announced by the distributions installed in this environment."""


@pytest.fixture(autouse=True)
def _autoload_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)


def test_memory_url_opens_the_built_in_backend() -> None:
    storage = open_storage("memory://")
    assert isinstance(storage, MemoryStorage)
    assert isinstance(open_storage("MEMORY://anything"), MemoryStorage)


async def test_options_reach_the_backend_factory() -> None:
    stamp = datetime(2030, 1, 1, tzinfo=UTC)
    storage = open_storage("memory://", clock=lambda: stamp)
    await storage.initialize()
    created = await storage.create_run(NewRun(workflow="w", input="null"))
    assert created.run.created_at == stamp
    await storage.close()


@pytest.mark.parametrize("url", ["memory", "", "sqlite:/x.db", 42])
def test_a_string_without_a_scheme_is_a_config_error(url: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage(url)
    assert caught.value.option == "url"


def test_unknown_scheme_lists_the_installed_backends() -> None:
    with pytest.raises(BackendNotFoundError) as caught:
        open_storage("nosuchdb://host/db")
    err = caught.value
    assert err.code == "backend_not_found"
    assert err.scheme == "nosuchdb"
    assert err.provider is None
    assert "memory" in err.installed
    assert set(ANNOUNCED) <= set(err.installed)
    assert "nosuchdb" in str(err)
    assert "memory" in str(err)


@pytest.mark.parametrize(
    ("scheme", "suggested"),
    [("postgress", "postgresql"), ("redsi", "redis"), ("memroy", "memory"), ("sqllite", "sqlite")],
)
def test_a_mistyped_scheme_suggests_the_closest_installed_one(scheme: str, suggested: str) -> None:
    if suggested not in BackendRegistry().installed_schemes():
        pytest.skip(f"the {suggested!r} backend is not installed here")
    with pytest.raises(BackendNotFoundError) as caught:
        open_storage(f"{scheme}://app:s3cret@host/db")
    err = caught.value
    assert suggested in err.suggestions
    assert "did you mean" in str(err)
    assert repr(suggested) in str(err)
    assert "s3cret" not in str(err)


def test_a_scheme_like_no_other_suggests_nothing() -> None:
    with pytest.raises(BackendNotFoundError) as caught:
        open_storage("zzzz://host/db")
    assert caught.value.suggestions == []
    assert "did you mean" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "options", "option", "suggested"),
    [
        ("memory://?nmae=a", {}, "nmae", "name"),
        ("memory://", {"clok": None}, "clok", "clock"),
        ("memory://shared", {"nam": "x"}, "nam", "name"),
    ],
)
def test_memory_refuses_unknown_options_with_a_suggestion(
    url: str, options: dict[str, Any], option: str, suggested: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage(url, **options)
    assert caught.value.option == option
    assert f"did you mean {suggested!r}?" in str(caught.value)
    assert "known options: name" in str(caught.value)


def test_memory_takes_its_name_from_the_path_or_the_query() -> None:
    assert "name='a'" in repr(open_storage("memory://a"))
    assert "name='b'" in repr(open_storage("memory://?name=b"))
    assert "name='c'" in repr(open_storage("memory://a", name="c"))  # the keyword wins
    with pytest.raises(ConfigError, match="names its store twice"):
        open_storage("memory://a?name=b")


@pytest.mark.parametrize(
    ("url", "provider"),
    [
        ("postgresql://app:s3cret@db.example:5432/app", "reflow-postgres"),
        ("postgres://app:s3cret@db.example/app", "reflow-postgres"),
        ("redis://:s3cret@cache.example:6379/0", "reflow-redis"),
        ("rediss://user:s3cret@cache.example/0", "reflow-redis"),
    ],
)
def test_missing_known_backend_names_its_package_and_hides_the_password(
    url: str, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in an environment where only reflow-core is installed.
    monkeypatch.setattr(registry_module, "_default", BackendRegistry(autoload=False))
    with pytest.raises(BackendNotFoundError) as caught:
        open_storage(url)
    err = caught.value
    assert err.provider == provider
    assert provider in str(err)
    assert "s3cret" not in str(err)
    assert "s3cret" not in repr(err)
    assert "s3cret" not in repr(err.args)


def test_a_mistyped_url_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage("postgresql:/app:s3cret@db.example/app")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app:s3cret@db.example:5432/app", "postgresql://app:***@db.example:5432/app"),
        ("redis://:s3cret@cache/0", "redis://:***@cache/0"),
        ("postgresql://app@db.example/app", "postgresql://app@db.example/app"),
        ("sqlite:///tmp/x.db", "sqlite:///tmp/x.db"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_registry_without_autoload_knows_only_memory() -> None:
    registry = BackendRegistry(autoload=False)
    assert registry.installed_schemes() == ["memory"]
    with pytest.raises(BackendNotFoundError) as caught:
        registry.get("sqlite")
    assert caught.value.provider == "reflow-sqlite"
    assert caught.value.installed == ["memory"]


def test_disable_autoload_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BackendRegistry().installed_schemes() == sorted({"memory", *ANNOUNCED})
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry = BackendRegistry()
    assert registry.installed_schemes() == ["memory"]
    assert [b.scheme for b in registry.backends()] == ["memory"]


@pytest.mark.skipif("sqlite" not in ANNOUNCED, reason="reflow-sqlite is not installed")
def test_plugins_can_be_registered_by_hand_without_autoload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    from reflow_sqlite import plugin

    registry = BackendRegistry()
    registry.register_plugin(plugin, name="reflow-sqlite:sqlite")
    info = registry.get("sqlite")
    assert info.scheme == "sqlite"
    assert info.plugin == "reflow-sqlite:sqlite"
    assert registry.installed_schemes() == ["memory", "sqlite"]


@pytest.mark.skipif("sqlite" not in ANNOUNCED, reason="reflow-sqlite is not installed")
def test_entry_points_are_loaded_on_demand() -> None:
    registry = BackendRegistry()
    assert "sqlite" in registry.installed_schemes()
    assert registry.get("sqlite").scheme == "sqlite"
    schemes = [b.scheme for b in available_backends()]
    assert "memory" in schemes
    assert "sqlite" in schemes
    assert all(b.description for b in available_backends())


class _Plugin:
    def __init__(self, *schemes: str) -> None:
        self.schemes = schemes

    @hookimpl
    def reflow_register_backends(self, register: Any) -> None:
        for scheme in self.schemes:
            register(scheme, lambda url, /, **options: MemoryStorage(), description=scheme)


def test_a_plugin_adds_schemes_case_insensitively() -> None:
    registry = BackendRegistry(autoload=False)
    registry.register_plugin(_Plugin("Custom"), name="custom-plugin")
    info = registry.get("CUSTOM")
    assert info.scheme == "custom"
    assert info.plugin == "custom-plugin"
    assert isinstance(info.factory("custom://x"), MemoryStorage)


def test_a_scheme_registered_by_two_plugins_is_an_error_naming_both() -> None:
    registry = BackendRegistry(autoload=False)
    with pytest.raises(ConfigError) as caught:
        registry.register_plugin(_Plugin("memory"), name="impostor")
    err = caught.value
    assert err.option == "scheme"
    assert "memory" in str(err)
    assert "impostor" in str(err)
    assert "reflow-core:memory" in str(err)

    registry.register_plugin(_Plugin("dup"), name="first")
    with pytest.raises(ConfigError, match="first"):
        registry.register_plugin(_Plugin("dup"), name="second")
    assert registry.get("dup").plugin == "first"


def test_an_entry_point_that_fails_to_load_is_skipped_with_a_warning() -> None:
    from importlib.metadata import EntryPoint

    from reflow_core.registry import load_entry_point

    broken = EntryPoint("observer-broken", "no_such_module_for_reflow:plugin", "reflow")
    with pytest.warns(
        RuntimeWarning,
        match=r"reflow command plugin 'no_such_module_for_reflow:plugin' from unknown "
        r"distribution failed to load and was skipped: ModuleNotFoundError",
    ):
        assert load_entry_point(broken, "reflow command plugin") is None
    working = EntryPoint("observer-ok", "reflow_core.registry:load_entry_point", "reflow")
    assert load_entry_point(working) == ("unknown distribution:observer-ok", load_entry_point)
