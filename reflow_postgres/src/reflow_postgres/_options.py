"""Options of the PostgreSQL storage: its URL, its own options, and the
secrets a connection string holds (kept out of every message)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg

from reflow_core.errors import ConfigError
from reflow_core.options import (
    SECRET_NAMES,
    bool_option,
    int_option,
    kwarg_secrets,
    redact,
    seconds_option,
    split_url,
    unknown_option,
    url_secrets,
)

__all__ = [
    "DEFAULT_SCHEMA",
    "KEYWORD_OPTIONS",
    "Settings",
    "check_connect_kwargs",
    "check_keyword_options",
    "describe_conninfo",
    "find_secrets",
    "libpq_parameters",
    "parse_postgres_url",
    "prepare_option",
    "schema_option",
    "settings",
    "unreadable",
]

DEFAULT_SCHEMA = "reflow"

_URL_OPTIONS = (
    "schema",
    "pool_min_size",
    "pool_max_size",
    "pool_timeout",
    "notify",
    "listen",
    "prepare_threshold",
)
KEYWORD_OPTIONS = (*_URL_OPTIONS, "clock", "connect_kwargs")
"""The options :meth:`PostgresStorage.from_url` accepts as keywords."""
_PSYCOPG_CONNECT_ARGUMENTS = ("context", "cursor_factory", "row_factory")
"""Arguments of psycopg's ``connect()`` that ``connect_kwargs`` may hold
besides libpq's parameters (``autocommit`` and ``prepare_threshold`` are the
storage's)."""


@functools.cache
def libpq_parameters() -> tuple[str, ...]:
    """The connection parameters of the libpq psycopg uses (``sslmode``,
    ``connect_timeout``, ``application_name``, ...), as libpq lists them
    (``PQconndefaults``): the query parameters a URL may pass on to it."""
    return tuple(sorted(opt.keyword.decode() for opt in psycopg.pq.Conninfo.get_defaults()))


def check_connect_kwargs(connect_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse a key of ``connect_kwargs`` that is neither a libpq parameter
    nor an argument of psycopg's ``connect()``."""
    for name in connect_kwargs or {}:
        if name not in libpq_parameters() and name not in _PSYCOPG_CONNECT_ARGUMENTS:
            raise unknown_option(
                name,
                _PSYCOPG_CONNECT_ARGUMENTS,
                kind="postgresql connect_kwargs",
                extra=libpq_parameters(),
                driver="libpq",
            )


def check_keyword_options(options: Mapping[str, Any]) -> None:
    """Refuse a keyword :meth:`PostgresStorage.from_url` does not know."""
    for name in options:
        if name not in KEYWORD_OPTIONS:
            hint = ""
            if name in libpq_parameters():
                hint = f"{name} is libpq's: give it in the URL or in connect_kwargs"
            raise unknown_option(name, KEYWORD_OPTIONS, kind="postgresql", hint=hint)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


def schema_option(value: object) -> str:
    """The ``schema`` option: a plain identifier not starting with ``pg_``."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ConfigError(
            "schema must be a plain identifier (letters, digits, _ and $, not starting with "
            f"a digit, at most 63 characters), got {value!r}",
            option="schema",
        )
    if value.lower().startswith("pg_"):
        raise ConfigError(
            f"schema names starting with pg_ are reserved, got {value!r}", option="schema"
        )
    return value


def prepare_option(value: object) -> int | None:
    """The ``prepare_threshold`` option; ``None``, ``"none"`` or ``"off"`` disable it."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off")):
        return None
    return int_option("prepare_threshold", value, 0)


def parse_postgres_url(url: str) -> tuple[str, dict[str, str], str]:
    """Split a ``postgresql://`` (or ``postgres://``) URL into the libpq
    connection URL, Reflow's own query options, and the same URL with any
    password replaced by ``***`` (safe to log).

    Reflow's options are ``schema``, ``pool_min_size``, ``pool_max_size``,
    ``pool_timeout`` (seconds), ``notify``, ``listen`` and
    ``prepare_threshold``; a query parameter that is one of libpq's
    (:func:`libpq_parameters`: ``sslmode``, ``connect_timeout``,
    ``application_name``, ...) is passed to libpq. Raises
    :class:`~reflow_core.errors.ConfigError` for another scheme, a repeated
    option, or any other query parameter.
    """
    split = split_url(
        url,
        schemes=("postgresql", "postgres"),
        own=_URL_OPTIONS,
        kind="postgresql",
        scheme="postgresql",
    )
    for name, _ in parse_qsl(urlsplit(split.target).query, keep_blank_values=True):
        if name not in libpq_parameters():
            raise unknown_option(
                name,
                _URL_OPTIONS,
                kind="postgresql",
                where=" in the URL",
                extra=libpq_parameters(),
                driver="libpq",
                secrets=split.secrets,
            )
    return split.target, split.options, split.safe


def find_secrets(conninfo: str, kwargs: Mapping[str, Any] | None) -> list[str]:
    """Every password libpq would read (``password``, ``sslpassword``), as
    libpq decodes the connection string and as a URL parser does (libpq
    keeps a ``+`` in a query, a URL parser reads a space), and those in
    ``connect_kwargs``."""
    try:
        params: Mapping[str, Any] = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        params = {}
    secrets = kwarg_secrets(params)
    if "://" in conninfo:
        secrets += url_secrets(conninfo)
    return list(dict.fromkeys(secrets + kwarg_secrets(kwargs)))


def unreadable(conninfo: str) -> str | None:
    """What libpq says is wrong with ``conninfo``; ``None`` if nothing."""
    try:
        psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        return str(exc)
    return None


def describe_conninfo(conninfo: str) -> str:
    """``conninfo`` as ``key=value`` pairs without its secrets."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "<unparseable conninfo>"
    shown = {k: v for k, v in params.items() if k not in SECRET_NAMES}
    return " ".join(f"{k}={v}" for k, v in shown.items()) or "(libpq defaults)"


@dataclass(frozen=True, slots=True)
class Settings:
    """The checked options of one storage."""

    conninfo: str
    schema: str
    min_size: int
    max_size: int
    timeout: float
    notify: bool
    listen: bool
    clock: Callable[[], datetime] | None
    kwargs: dict[str, Any]
    """What every new connection gets: ``connect_kwargs``, autocommit, prepare_threshold."""
    secrets: list[str]
    """Every password of the connection string and ``connect_kwargs``."""
    display: str
    """The connection string or URL without its secrets."""


def settings(
    conninfo: str,
    *,
    schema: object,
    pool_min_size: object,
    pool_max_size: object,
    pool_timeout: float | str | timedelta,
    notify: object,
    listen: object,
    prepare_threshold: object,
    clock: Callable[[], datetime] | None,
    connect_kwargs: Mapping[str, Any] | None,
    display_url: str | None,
) -> Settings:
    """Check the options of :class:`~reflow_postgres.PostgresStorage`, raising
    :class:`~reflow_core.errors.ConfigError` for the first one that is wrong."""
    checked_schema = schema_option(schema)
    min_size = int_option("pool_min_size", pool_min_size, 0)
    max_size = int_option("pool_max_size", pool_max_size, 1)
    if max_size < max(min_size, 1):
        raise ConfigError(
            f"pool_max_size ({max_size}) must be at least pool_min_size ({min_size})",
            option="pool_max_size",
        )
    timeout = seconds_option("pool_timeout", pool_timeout)
    notify_on = bool_option("notify", notify)
    listen_on = bool_option("listen", listen)
    prepare = prepare_option(prepare_threshold)
    if clock is not None and not callable(clock):
        raise ConfigError(f"clock must be callable, got {clock!r}", option="clock")
    secrets = find_secrets(conninfo, connect_kwargs)
    display = redact(display_url or describe_conninfo(conninfo), secrets)
    complaint = unreadable(conninfo)
    if complaint is not None:
        # Refused now, not at start-up. libpq's complaint may quote a
        # password (an invalid escape, a NUL): left for later it would reach
        # psycopg's pool log unredacted; raised here, outside the except, it
        # carries no driver error.
        raise ConfigError(
            f"libpq cannot read the connection string: {redact(complaint, secrets)}",
            option="url",
        )
    check_connect_kwargs(connect_kwargs)
    kwargs = {**(connect_kwargs or {}), "autocommit": True, "prepare_threshold": prepare}
    return Settings(
        conninfo=conninfo,
        schema=checked_schema,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        notify=notify_on,
        listen=listen_on,
        clock=clock,
        kwargs=kwargs,
        secrets=secrets,
        display=display,
    )
