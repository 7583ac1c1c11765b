"""Backend selection: turn a URL into a storage object through plugins.

``open_storage("sqlite:///app.db")`` finds the ``sqlite`` entry point of the
``reflow`` group, loads only that plugin, and asks it to build the storage.
``memory://`` is built in. Set ``REFLOW_DISABLE_PLUGIN_AUTOLOAD=1`` to load no
entry points at all (plugins can still be added with
:meth:`BackendRegistry.register_plugin`).
"""

from __future__ import annotations

import difflib
import os
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any
from urllib.parse import parse_qsl

import pluggy

from . import hookspecs
from .errors import BackendNotFoundError, ConfigError
from .options import safe_url, unknown_option
from .storage import Storage

__all__ = ["BackendInfo", "BackendRegistry", "available_backends", "open_storage", "redact_url"]

ENTRY_POINT_GROUP = "reflow"
DISABLE_AUTOLOAD_ENV = "REFLOW_DISABLE_PLUGIN_AUTOLOAD"


def load_entry_point(
    ep: EntryPoint, kind: str = "Reflow plugin", *, stacklevel: int = 2
) -> tuple[str, object] | None:
    """Load a plugin announced by an entry point: its name
    (``distribution:entry-point``) and the object, or ``None`` with a
    ``RuntimeWarning`` naming ``kind`` and the error when it fails to load
    (a broken plugin never stops Reflow). ``stacklevel`` is the warning's,
    counted from the caller."""
    dist = ep.dist.name if ep.dist else "unknown distribution"
    try:
        return f"{dist}:{ep.name}", ep.load()
    except Exception as exc:
        warnings.warn(
            f"{kind} {ep.value!r} from {dist} failed to load and was skipped: "
            f"{type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
        return None


#: Which distribution provides each scheme we know of, for error messages.
KNOWN_PROVIDERS: dict[str, str] = {
    "memory": "reflow-core",
    "sqlite": "reflow-sqlite",
    "postgresql": "reflow-postgres",
    "postgres": "reflow-postgres",
    "redis": "reflow-redis",
    "rediss": "reflow-redis",
    "unix": "reflow-redis",
}


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """One registered URL scheme."""

    scheme: str
    factory: hookspecs.StorageFactory
    description: str
    plugin: str


def redact_url(url: str) -> str:
    """``url`` with any password (in the user info, or a ``password`` query
    parameter) replaced by ``***``, safe to log; see
    :func:`reflow_core.options.safe_url`."""
    return safe_url(url)


_MEMORY_URL_OPTIONS = ("name",)
_MEMORY_OPTIONS = ("name", "clock")
"""The options of ``memory://``: ``name`` (also the URL's path), and ``clock``
as a keyword."""


class _MemoryPlugin:
    @hookspecs.hookimpl
    def reflow_register_backends(self, register: hookspecs.Register) -> None:
        from .memory import MemoryStorage

        def factory(url: str, /, **options: Any) -> Storage:
            location, _, query = url.split("://", 1)[1].partition("?")
            given: dict[str, Any] = {}
            for key, value in parse_qsl(query, keep_blank_values=True):
                if key not in _MEMORY_URL_OPTIONS:
                    raise unknown_option(
                        key, _MEMORY_URL_OPTIONS, kind="memory", where=" in the URL"
                    )
                given[key] = value
            name = location.strip("/")
            if name and given.get("name", name) != name:
                raise ConfigError(
                    "the memory URL names its store twice (in its path and its name "
                    "parameter); give one",
                    option="name",
                )
            if name:
                given["name"] = name
            given.update(options)
            for key in given:
                if key not in _MEMORY_OPTIONS:
                    raise unknown_option(key, _MEMORY_OPTIONS, kind="memory")
            return MemoryStorage(**given)

        register("memory", factory, description="in-process, not durable (reflow-core)")


class BackendRegistry:
    """A plugin manager for the ``reflow`` group and the schemes it registers.

    Entry points are loaded lazily, one scheme at a time; a plugin that fails
    to import is reported with a warning and skipped, never taking the others
    down.
    """

    def __init__(self, *, autoload: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        if autoload is None:
            autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
        self._autoload = autoload
        self._backends: dict[str, BackendInfo] = {}
        self._loaded_entry_points: set[str] = set()
        self._lock = threading.Lock()
        self.register_plugin(_MemoryPlugin(), name="reflow-core:memory")

    def register_plugin(self, plugin: object, *, name: str | None = None) -> None:
        """Register a plugin object or module and collect the schemes it serves."""
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self.pm.register(plugin, name=plugin_name)
        self.pm.check_pending()
        impls = [
            impl
            for impl in self.pm.hook.reflow_register_backends.get_hookimpls()
            if impl.plugin is plugin
        ]
        for impl in impls:

            def register(
                scheme: str,
                factory: hookspecs.StorageFactory,
                *,
                description: str = "",
                _plugin: str = plugin_name,
            ) -> None:
                self._add(BackendInfo(scheme.lower(), factory, description, _plugin))

            # Call this plugin's implementation alone, with only the arguments
            # it names, as pluggy would.
            kwargs = {"register": register}
            impl.function(*[kwargs[name] for name in impl.argnames])

    def _add(self, info: BackendInfo) -> None:
        existing = self._backends.get(info.scheme)
        if existing is not None and existing.plugin != info.plugin:
            raise ConfigError(
                f"URL scheme {info.scheme!r} is registered twice: by {existing.plugin} "
                f"and by {info.plugin}; uninstall one of them",
                option="scheme",
            )
        self._backends[info.scheme] = info

    def _entry_points(self, name: str | None = None) -> list[EntryPoint]:
        if not self._autoload:
            return []
        eps = entry_points(group=ENTRY_POINT_GROUP)
        return [ep for ep in eps if name is None or ep.name == name]

    def _load(self, scheme: str) -> None:
        candidates = self._entry_points(scheme)
        if len(candidates) > 1:
            owners = ", ".join(
                sorted(f"{ep.value} ({ep.dist.name if ep.dist else '?'})" for ep in candidates)
            )
            raise ConfigError(
                f"several installed distributions provide the {scheme!r} backend: {owners}",
                option="scheme",
            )
        for ep in candidates:
            key = f"{ep.name}={ep.value}"
            if key in self._loaded_entry_points:
                continue
            self._loaded_entry_points.add(key)
            loaded = load_entry_point(ep, stacklevel=3)
            if loaded is None or self.pm.is_registered(loaded[1]):
                continue
            self.register_plugin(loaded[1], name=loaded[0])

    def get(self, scheme: str) -> BackendInfo:
        """The backend for ``scheme``, loading its plugin if needed."""
        scheme = scheme.lower()
        with self._lock:
            if scheme not in self._backends:
                self._load(scheme)
            info = self._backends.get(scheme)
            if info is None:
                installed = self.installed_schemes()
                raise BackendNotFoundError(
                    scheme,
                    installed,
                    KNOWN_PROVIDERS.get(scheme),
                    difflib.get_close_matches(scheme, installed, n=3, cutoff=0.6),
                )
            return info

    def installed_schemes(self) -> list[str]:
        """Schemes that are registered or announced by an installed entry point."""
        names = set(self._backends)
        names.update(
            ep.name for ep in self._entry_points() if not ep.name.startswith(OBSERVER_PREFIX)
        )
        return sorted(names)

    def backends(self) -> list[BackendInfo]:
        """Every installed backend, loading all announced plugins."""
        with self._lock:
            for scheme in self.installed_schemes():
                if scheme not in self._backends:
                    self._load(scheme)
            return [self._backends[s] for s in sorted(self._backends)]


_default: BackendRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> BackendRegistry:
    """The process-wide registry, created on first use (never at import)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = BackendRegistry()
        return _default


def open_storage(url: str, /, **options: Any) -> Storage:
    """Build the storage a URL names, through the installed backend plugins.

    ``options`` are passed to the backend's factory (see each backend's docs).
    The storage is not connected yet: the engine calls ``initialize()``, or
    call it yourself. Raises :class:`~reflow_core.errors.BackendNotFoundError`
    for a scheme no installed backend serves, naming the package to install.
    """
    if not isinstance(url, str) or "://" not in url:
        # Echo only what precedes the first ':' of a malformed URL: the rest
        # may hold a password that redact_url cannot find without a netloc.
        shown = (
            f"a value starting with {str(url).split(':', 1)[0]!r}"
            if isinstance(url, str)
            else (f"a {type(url).__name__}")
        )
        raise ConfigError(f"storage URL must look like 'scheme://...', got {shown}", option="url")
    scheme = url.split("://", 1)[0]
    return default_registry().get(scheme).factory(url, **options)


OBSERVER_PREFIX = "observer-"


def load_observer_entry_points() -> list[tuple[str, object]]:
    """Load the observer plugins announced in the ``reflow`` entry-point group
    (entry points named ``observer-...``). One that fails to load is skipped
    with a warning."""
    if os.environ.get(DISABLE_AUTOLOAD_ENV):
        return []
    loaded: list[tuple[str, object]] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if not ep.name.startswith(OBSERVER_PREFIX):
            continue
        plugin = load_entry_point(ep, stacklevel=2)
        if plugin is not None:
            loaded.append(plugin)
    return loaded


def available_backends() -> list[BackendInfo]:
    """Every backend installed in this environment."""
    return default_registry().backends()
