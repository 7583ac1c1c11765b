"""The Redis backend's options: URL parsing, defaults and the checks of each option."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote

from reflow_core.errors import ConfigError
from reflow_core.options import int_option, redact, seconds_option, split_url

DEFAULT_PREFIX = "reflow"
_URL_OPTIONS = (
    "prefix",
    "max_connections",
    "pool_timeout",
    "notify",
    "listen",
    "retention",
    "cluster",
    "socket_timeout",
    "socket_connect_timeout",
)
_KEYWORD_OPTIONS = (*_URL_OPTIONS, "clock", "connect_kwargs")
_SOCKET_OPTIONS = ("socket_timeout", "socket_connect_timeout")
DEFAULT_SOCKET_TIMEOUT = 10.0
"""Seconds to wait for a reply. A stall shorter than this only waits; a
longer one fails the operation with a StorageError. A third of the engine's
default 30 s lease: a heartbeat stuck on a dead connection (sent 10 s in)
fails in time to be sent again on another before the lease lapses."""
DEFAULT_SOCKET_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a new connection (TCP and TLS) to open."""
_DB_PATH = re.compile(r"/?(?:([0-9]+)/?)?")
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def _seconds_option(name: str, value: object, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    return seconds_option(name, value)


def _prefix_option(value: object) -> str:
    if not isinstance(value, str) or not _PREFIX.fullmatch(value):
        raise ConfigError(
            "prefix must be 1-100 characters of letters, digits, '_', '.', ':' or '-' "
            f"(no braces: Reflow adds the hash tag itself), got {value!r}",
            option="prefix",
        )
    return value


def _check_database(parts: SplitResult, secrets: Collection[str]) -> None:
    """Refuse a database redis-py would quietly replace by database 0: a path
    of ``redis://`` or ``rediss://`` that is not a number, a ``db=`` query
    parameter that is not one, or a path and a ``db=`` that disagree."""
    named = [int_option("db", v, 0) for k, v in parse_qsl(parts.query, True) if k == "db"]
    if parts.scheme.lower() not in ("redis", "rediss"):
        return  # a unix:// path is the socket's; only db= names the database
    path = unquote(parts.path)
    found = _DB_PATH.fullmatch(path)
    if found is None:
        raise ConfigError(
            redact(
                f"the path of a redis URL is the database number (like /0), got {path!r}",
                secrets,
            ),
            option="db",
        )
    if found[1] is not None and named and int(found[1]) != named[0]:
        raise ConfigError(
            f"the redis URL names database {int(found[1])} in its path and {named[0]} "
            "in its db parameter; give one",
            option="db",
        )


def _check_socket_options(parts: SplitResult, connect_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse ``socket_timeout`` or ``socket_connect_timeout`` given to redis-py
    directly (in the URL the storage is built with, or in ``connect_kwargs``):
    they are the storage's own options."""
    in_url = {name for name, _ in parse_qsl(parts.query, True)}
    for name in _SOCKET_OPTIONS:
        if name in in_url or name in (connect_kwargs or {}):
            raise ConfigError(
                f"{name} is an option of the storage: give it as a keyword argument, "
                "or in the URL of RedisStorage.from_url() or open_storage()",
                option=name,
            )


def _check_keyword_options(options: Collection[str]) -> None:
    """Refuse an option :meth:`RedisStorage.from_url` does not know."""
    for name in options:
        if name not in _KEYWORD_OPTIONS:
            raise ConfigError(
                f"unknown redis option {name!r}; known options: {', '.join(_KEYWORD_OPTIONS)}",
                option=name,
            )


def parse_redis_url(url: str) -> tuple[str, dict[str, str], str]:
    """Split a ``redis://``, ``rediss://`` or ``unix://`` URL into the URL for
    redis-py, Reflow's own query options, and the URL with any password
    replaced by ``***`` (safe to log).

    Reflow's options are ``prefix``, ``max_connections``, ``pool_timeout``,
    ``notify``, ``listen``, ``retention``, ``cluster``, ``socket_timeout``
    and ``socket_connect_timeout``; other query parameters (``db``,
    ``client_name``, ...) go to redis-py.
    """
    split = split_url(url, schemes=("redis", "rediss", "unix"), own=_URL_OPTIONS, kind="redis")
    return split.target, split.options, split.safe
