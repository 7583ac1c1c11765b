"""The store the suite works in when it is given a storage URL.

``reflow-conformance --url URL`` (and ``--reflow-storage-url=URL``) does not
write into the store the URL names as it is: it works in a fresh store of
its own inside it, and drops that store at the end of the session, unless
``--keep`` (``--reflow-keep``) keeps it:

========================  ==================================================
``redis://``, ``rediss://``, ``unix://``  a new key prefix (``?prefix=``), its keys deleted
``postgresql://``         a new schema (``?schema=``), dropped with ``CASCADE``
``sqlite:///path``        a new file beside ``path``, deleted with its journal
``memory://NAME``         the named store, which ends with the process
========================  ==================================================

A prefix or schema given in the URL is the start of the new one's name.
``memory://`` without a name is refused: every open of it is a new, empty
store, so no second connection could see the first one's writes.

Any other scheme is used as given, and nothing is cleaned, unless the
adapter's distribution offers a store of its own for the suite: an entry
point in the ``reflow_conformance.stores`` group, named after the URL scheme,
naming a callable that takes the URL and returns an :class:`OwnedStore`.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from urllib.parse import quote, unquote

from reflow_core.options import safe_url

__all__ = ["ENTRY_POINT_GROUP", "OwnedStore", "StoreUsageError", "check_usable", "own_store"]

ENTRY_POINT_GROUP = "reflow_conformance.stores"
"""Where an adapter's distribution offers the suite a store of its own, by URL scheme."""


class StoreUsageError(ValueError):
    """The URL cannot be used by the suite at all (``memory://`` without a name)."""


@dataclass(frozen=True)
class OwnedStore:
    """A store the suite works in.

    ``url`` is what the suite opens (another process too); ``where`` says in
    words where that store is, without any password; ``drop`` deletes the
    store and everything in it, and is ``None`` when the suite cannot know
    how (a store used as given), or there is nothing to delete.
    """

    url: str
    where: str
    drop: Callable[[], None] | None = None


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def _token() -> str:
    return uuid.uuid4().hex[:12]


def _with_option(url: str, name: str, value: str) -> tuple[str, str | None]:
    """``url`` with its query option ``name`` set to ``value`` (the other
    parameters keep their spelling), and the value it had, if any."""
    base, sep, query = url.partition("?")
    kept: list[str] = []
    old: str | None = None
    for pair in query.split("&") if sep else []:
        key, _, raw = pair.partition("=")
        if unquote(key) == name and old is None:
            old = unquote(raw)
        elif pair:
            kept.append(pair)
    kept.append(f"{name}={quote(value, safe='')}")
    return f"{base}?{'&'.join(kept)}", old


def _redis(url: str) -> OwnedStore:
    from reflow_core.options import bool_option

    prefix = "reflow_conformance_" + _token()
    own, given = _with_option(url, "prefix", prefix)
    if given:
        prefix = f"{given}.{_token()}"
        own, _ = _with_option(url, "prefix", prefix)

    def drop() -> None:
        import redis
        from redis.cluster import RedisCluster

        from reflow_redis import parse_redis_url

        target, options, _ = parse_redis_url(own)
        cluster = bool_option("cluster", options.get("cluster", False))
        client: redis.Redis | RedisCluster = (
            RedisCluster.from_url(target, socket_connect_timeout=5, socket_timeout=30)
            if cluster
            else redis.Redis.from_url(target, socket_connect_timeout=5, socket_timeout=30)
        )
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", "{" + prefix + "}") + "*"
        try:
            keys = list(client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        finally:
            client.close()

    where = f"Redis key prefix {prefix!r} (keys {{{prefix}}}:*) at {safe_url(own)}"
    return OwnedStore(own, where, drop)


def _postgres(url: str) -> OwnedStore:
    schema = "reflow_conformance_" + _token()
    own, given = _with_option(url, "schema", schema)
    if given:
        schema = f"{given}_{_token()}"
        own, _ = _with_option(url, "schema", schema)

    def drop() -> None:
        import psycopg
        from psycopg import sql

        from reflow_postgres import parse_postgres_url

        target, _, _ = parse_postgres_url(own)
        with psycopg.connect(target, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    where = f"PostgreSQL schema {schema!r} at {safe_url(own)}"
    return OwnedStore(own, where, drop)


def _sqlite(url: str) -> OwnedStore:
    scheme, _, rest = url.partition("://")
    location, sep, query = rest.partition("?")
    if not location.startswith("/"):  # not a path: the backend says what is wrong
        return OwnedStore(url, f"the store as given, {url}")
    folder, slash, name = location.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    fresh = f"{stem}-conformance-{_token()}{dot}{ext}"
    own = f"{scheme}://{folder}{slash}{fresh}{sep}{query}"
    path = unquote(f"{folder}{slash}{fresh}"[1:])

    def drop() -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)

    return OwnedStore(own, f"SQLite file {os.path.abspath(path)}", drop)


def check_usable(url: str) -> None:
    """Raise :class:`StoreUsageError` for a URL the suite cannot work with:
    ``memory://`` without a name."""
    if _scheme(url) == "memory" and not url.partition("://")[2].partition("?")[0]:
        raise StoreUsageError(
            "memory:// without a name opens a new, empty store each time it is opened, so "
            "the suite's second connection would never see what the first one wrote. Give "
            "the store a name: memory://NAME (every open of memory://NAME in one process "
            "reaches the same store; it lives in that process only, so the multi-process "
            "tests are skipped, and it is gone when the run ends)"
        )


def _memory(url: str) -> OwnedStore:
    check_usable(url)
    return OwnedStore(url, f"the in-process store {url} (gone when the run ends)")


_BUILT_IN: dict[str, Callable[[str], OwnedStore]] = {
    "redis": _redis,
    "rediss": _redis,
    "unix": _redis,
    "postgresql": _postgres,
    "postgres": _postgres,
    "sqlite": _sqlite,
    "memory": _memory,
}


def _offered(scheme: str) -> Callable[[str], OwnedStore] | None:
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name.lower() == scheme:
            offer: Callable[[str], OwnedStore] = entry.load()
            return offer
    return None


def own_store(url: str) -> tuple[OwnedStore, bool]:
    """The store the suite works in for ``url``, and whether the suite owns
    it (``False``: the store as given, which the suite cannot clean).

    Raises :class:`StoreUsageError` for a URL the suite cannot work with.
    """
    scheme = _scheme(url)
    make = _offered(scheme) or _BUILT_IN.get(scheme)
    if make is None:
        return OwnedStore(url, f"the store as given, {safe_url(url)}"), False
    return make(url), True
