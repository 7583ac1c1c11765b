"""Options of the SQLite backend and the ``sqlite://`` URL.

Values come from a URL's query string (text) or from keyword arguments
(typed); both go through the same checks, built on
:mod:`reflow_core.options`, and a refused value raises
:class:`~reflow_core.errors.ConfigError` naming the option.
"""

from __future__ import annotations

import os
from datetime import timedelta
from urllib.parse import parse_qsl, unquote

from reflow_core.errors import ConfigError
from reflow_core.options import bool_option, int_option, unknown_option

__all__ = [
    "BACKEND",
    "DEFAULT_BUSY_TIMEOUT_MS",
    "KEYWORD_OPTIONS",
    "SYNCHRONOUS_LEVELS",
    "URL_OPTIONS",
    "busy_timeout_option",
    "database_path",
    "group_commit_option",
    "parse_sqlite_url",
    "synchronous_option",
]

BACKEND = "sqlite"
"""The backend's name in errors, and its URL scheme."""
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_BUSY_TIMEOUT_MS = 5000
URL_OPTIONS = ("synchronous", "busy_timeout", "group_commit")
"""The options a ``sqlite://`` URL may carry."""
KEYWORD_OPTIONS = (*URL_OPTIONS, "clock")
"""The options :meth:`SQLiteStorage.from_url` takes as keywords."""

_ONE_MS = timedelta(milliseconds=1)


def synchronous_option(value: object) -> str:
    """One of :data:`SYNCHRONOUS_LEVELS`, in any case."""
    if isinstance(value, str) and value.strip().upper() in SYNCHRONOUS_LEVELS:
        return value.strip().upper()
    raise ConfigError(
        f"synchronous must be one of {', '.join(SYNCHRONOUS_LEVELS)}, got {value!r}",
        option="synchronous",
    )


def busy_timeout_option(value: object) -> int:
    """Whole milliseconds, at least 0: an int, digits, or a ``timedelta``."""
    millis = value // _ONE_MS if isinstance(value, timedelta) else value
    try:
        return int_option("busy_timeout", millis, 0)
    except ConfigError:
        raise ConfigError(
            "busy_timeout must be a whole number of milliseconds (at least 0) or a timedelta, "
            f"got {value!r}",
            option="busy_timeout",
        ) from None


def group_commit_option(value: object) -> bool:
    """A flag (see :func:`reflow_core.options.bool_option`)."""
    return bool_option("group_commit", value)


def database_path(value: str | os.PathLike[str]) -> str:
    """A plain file path: not empty, not in memory, not a ``file:`` URI."""
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise ConfigError("the SQLite database path must not be empty", option="path")
    if path == ":memory:" or path.startswith("file::memory:"):
        raise ConfigError(
            "in-memory SQLite databases are not supported: workers in several processes "
            "share one database through a WAL file, so give a file path "
            "(use memory:// for a throwaway store)",
            option="path",
        )
    if path.startswith("file:"):
        raise ConfigError(
            f"SQLite URI filenames are not supported, give a plain file path: {path!r}",
            option="path",
        )
    return path


def parse_sqlite_url(url: str) -> tuple[str, dict[str, str]]:
    """Split a ``sqlite://`` URL into the database path and its query options.

    ``sqlite:///relative/path.db`` names a path relative to the working
    directory, ``sqlite:////absolute/path.db`` an absolute one. The path may be
    percent-encoded. Raises :class:`~reflow_core.errors.ConfigError` for any
    other form, an unknown or repeated option, or an in-memory database.
    """
    # Not reflow_core.options.split_url: a sqlite URL has no host, no
    # credentials and no driver to pass other options to, its query must
    # parse strictly, and its path is taken exactly as written.
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != BACKEND:
        raise ConfigError(f"not a sqlite:// URL: {url!r}", option="url")
    if "#" in rest:
        raise ConfigError(f"sqlite URLs take no fragment: {url!r}", option="url")
    location, _, query = rest.partition("?")
    if not location.startswith("/"):
        raise ConfigError(
            f"sqlite URLs have no host: write sqlite:///relative/path.db or "
            f"sqlite:////absolute/path.db, got {url!r}",
            option="url",
        )
    path = database_path(unquote(location[1:]))
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ConfigError(f"malformed query string in {url!r}", option="url") from exc
    for name, value in pairs:
        if name not in URL_OPTIONS:
            raise unknown_option(name, URL_OPTIONS, kind="sqlite", where=" in the URL")
        if name in options:
            raise ConfigError(f"sqlite URL option {name!r} is given twice", option=name)
        options[name] = value
    return path, options
