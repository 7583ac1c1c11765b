"""The Redis backend's options: URL parsing, defaults and the checks of each option."""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote

from reflow_core.errors import ConfigError
from reflow_core.options import int_option, redact, seconds_option, split_url, unknown_option

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
REDIS_PY_URL_OPTIONS = (
    "db",
    "username",
    "password",
    "client_name",
    "lib_name",
    "lib_version",
    "health_check_interval",
    "socket_keepalive",
    "socket_read_size",
    "retry_on_timeout",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_ca_data",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_check_hostname",
    "ssl_min_version",
    "ssl_ciphers",
    "ssl_include_verify_flags",
    "ssl_exclude_verify_flags",
)
"""The query parameters of a URL that are passed on to redis-py. Any other
parameter that is not one of Reflow's options is refused: redis-py would
hand it to the connection class, which fails at start-up with a TypeError,
or (``timeout``, ``decode_responses``) quietly change how the storage works."""
_SOCKET_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_SET_BY_STORAGE = (
    "max_connections",
    "timeout",
    "retry",
    "decode_responses",
    "encoding",
    "encoding_errors",
    "connection_class",
)
"""redis-py arguments the storage sets itself: given in ``connect_kwargs``
they would clash with its own or change how it reads replies."""


def _redis_py_arguments() -> frozenset[str]:
    """The keyword arguments redis-py's client, pools and connections take,
    read from their signatures (so a newer redis-py's are known too)."""
    from redis.asyncio import RedisCluster, connection

    found: set[str] = set()
    for init in (
        connection.AbstractConnection.__init__,
        connection.Connection.__init__,
        connection.SSLConnection.__init__,
        connection.UnixDomainSocketConnection.__init__,
        connection.ConnectionPool.__init__,
        connection.BlockingConnectionPool.__init__,
        RedisCluster.__init__,
    ):
        for param in inspect.signature(init).parameters.values():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                found.add(param.name)
    return frozenset(found - {"self", "connection_kwargs"})


def check_connect_kwargs(connect_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse, when the storage is built, a ``connect_kwargs`` key redis-py
    does not take (a typo would otherwise fail only at the first connection)
    or one the storage sets itself."""
    if not connect_kwargs:
        return
    known = _redis_py_arguments()
    for name in connect_kwargs:
        if name in _SET_BY_STORAGE:
            raise ConfigError(
                f"connect_kwargs[{name!r}] is set by the storage itself; leave it out",
                option="connect_kwargs",
            )
        if name not in known:
            usable = sorted(known - set(_SET_BY_STORAGE) - set(_SOCKET_OPTIONS))
            close = difflib.get_close_matches(name, usable, n=3, cutoff=0.6)
            guess = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ConfigError(
                f"connect_kwargs[{name!r}] is not an argument redis-py's client or "
                f"connections take{guess}",
                option="connect_kwargs",
            )


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


def _check_socket_options(
    parts: SplitResult, connect_kwargs: Mapping[str, Any] | None, secrets: Collection[str] = ()
) -> None:
    """Refuse ``socket_timeout`` or ``socket_connect_timeout`` given to redis-py
    directly (in ``connect_kwargs``), and any query parameter of the URL
    redis-py gets that is not in :data:`REDIS_PY_URL_OPTIONS`: Reflow's own
    options belong in the keywords (or the URL of ``from_url``), anything
    else is a typo."""
    for name in _SOCKET_OPTIONS:
        if name in (connect_kwargs or {}):
            raise ConfigError(
                f"{name} is an option of the storage: give it as a keyword argument, "
                "or in the URL of RedisStorage.from_url() or open_storage()",
                option=name,
            )
    for name, _ in parse_qsl(parts.query, True):
        if name in _URL_OPTIONS:
            raise ConfigError(
                f"{name} is an option of the storage: give it as a keyword argument, "
                "or in the URL of RedisStorage.from_url() or open_storage()",
                option=name,
            )
        if name not in REDIS_PY_URL_OPTIONS:
            raise unknown_option(
                name,
                _URL_OPTIONS,
                kind="redis",
                where=" in the URL",
                extra=REDIS_PY_URL_OPTIONS,
                driver="redis-py",
                hint="other redis-py arguments go in connect_kwargs",
                secrets=secrets,
            )


def _check_keyword_options(options: Collection[str]) -> None:
    """Refuse an option :meth:`RedisStorage.from_url` does not know."""
    for name in options:
        if name not in _KEYWORD_OPTIONS:
            hint = ""
            if name in REDIS_PY_URL_OPTIONS:
                hint = f"{name} is redis-py's: give it in the URL or in connect_kwargs"
            raise unknown_option(name, _KEYWORD_OPTIONS, kind="redis", hint=hint)


def parse_redis_url(url: str) -> tuple[str, dict[str, str], str]:
    """Split a ``redis://``, ``rediss://`` or ``unix://`` URL into the URL for
    redis-py, Reflow's own query options, and the URL with any password
    replaced by ``***`` (safe to log).

    Reflow's options are ``prefix``, ``max_connections``, ``pool_timeout``,
    ``notify``, ``listen``, ``retention``, ``cluster``, ``socket_timeout``
    and ``socket_connect_timeout``; the query parameters of
    :data:`REDIS_PY_URL_OPTIONS` (``db``, ``client_name``, ...) go to
    redis-py, and any other raises :class:`~reflow_core.errors.ConfigError`.
    """
    split = split_url(url, schemes=("redis", "rediss", "unix"), own=_URL_OPTIONS, kind="redis")
    return split.target, split.options, split.safe
