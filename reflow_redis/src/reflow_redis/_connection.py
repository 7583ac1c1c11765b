"""The connection to Redis, the scripts of ``lua/``, and how every operation calls them.

:class:`_Connection` is the part of :class:`~reflow_redis.RedisStorage`
every operation shares: opening the client and loading the scripts, running
a script by SHA with the common head of arguments, reading a key, retrying
on a broken connection where that is safe, and turning redis-py's exceptions
and unexpected data into :class:`~reflow_core.errors.StorageError`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from reflow_core.adapter import Lifecycle, new_run_record, to_epoch_us
from reflow_core.errors import ConfigError, ReflowError, SchemaVersionError, StorageError
from reflow_core.options import redact
from reflow_core.storage import NewRun, RunRecord

from ._records import _BadData, _pairs, _run_of, _run_record, _text, _time

logger = logging.getLogger("reflow.redis")

BACKEND = "redis"
_RETRIES_ON_BROKEN = 2
LAYOUT_VERSION = 3
"""The version of the key layout this code writes, kept in ``P:version``
(a prefix without it holds version 1: every release before the key).
Version 2 added ``P:bykey:<key>``, ``P:done:<status>`` and ``P:evm:...``;
version 3 ``P:schedule-due:<workflow>``."""
MIGRATION_BATCH = 1000
"""Runs (or schedules) one call of ``migrate.lua`` indexes at most, so it
never holds Redis for long."""
_SCRIPTS = (
    "create",
    "create_many",
    "claim",
    "heartbeat",
    "save_steps",
    "finish",
    "update_status",
    "sleep",
    "wait",
    "deliver",
    "take",
    "requeue",
    "list_runs",
    "get_runs",
    "next_due",
    "now",
    "purge",
    "upsert_schedule",
    "delete_schedule",
    "list_schedules",
    "due_schedules",
    "claim_slot",
    "set_paused",
    "workers",
    "queue_stats",
    "start_child",
    "wait_children",
    "list_children",
    "find_by_key",
    "list_events",
    "history",
    "migrate",
)
_T = TypeVar("_T")


def _load_scripts() -> dict[str, str]:
    folder = resources.files("reflow_redis").joinpath("lua")
    prelude = folder.joinpath("prelude.lua").read_text("utf-8")
    return {
        name: f"{prelude}\n-- {name}.lua\n{folder.joinpath(f'{name}.lua').read_text('utf-8')}"
        for name in _SCRIPTS
    }


async def _hgetall(client: Any, key: str) -> Any:
    return await client.execute_command("HGETALL", key)


class _Connection:
    """Connecting, script calls, reads and error reports; the storage sets
    the state below from its options."""

    _url: str
    _cluster: bool
    _max: int
    _timeout: float
    _connect_kwargs: dict[str, Any]
    _prefix: str
    _tag: str
    """The prefix inside its hash tag: ``{prefix}``."""
    _clock: Callable[[], datetime] | None
    _retention_us: int
    _notify: bool
    _secrets: list[str]
    _socket_timeout: float
    _connect_timeout: float
    _lifecycle: Lifecycle
    _client: Any
    """A ``redis.asyncio.Redis``, or a ``RedisCluster`` with ``cluster``."""
    _scripts: dict[str, AsyncScript]

    async def _connect(self) -> tuple[Any, dict[str, AsyncScript]]:
        """A client connected to a server new enough, with the scripts loaded."""
        client: Any
        try:
            if self._cluster:
                client = RedisCluster.from_url(
                    self._url,
                    max_connections=self._max,
                    socket_timeout=self._socket_timeout,
                    socket_connect_timeout=self._connect_timeout,
                    **self._connect_kwargs,
                )
            else:
                pool = aioredis.BlockingConnectionPool.from_url(
                    self._url,
                    max_connections=self._max,
                    timeout=self._timeout,
                    retry=Retry(NoBackoff(), 0),
                    socket_timeout=self._socket_timeout,
                    socket_connect_timeout=self._connect_timeout,
                    **self._connect_kwargs,
                )
                client = aioredis.Redis.from_pool(pool)  # the client owns and closes the pool
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"invalid redis URL or option: {redact(str(exc), self._secrets)}", option="url"
            ) from exc
        try:
            if self._cluster:
                await client.initialize()
            info = await client.info("server")
            if "redis_version" not in info and info:  # a cluster answers per node
                info = next(iter(info.values()))
            version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2])
            if version < (6, 2):
                raise StorageError(
                    f"Redis {info.get('redis_version')} is too old; Reflow needs 6.2 or newer",
                    operation="initialize",
                    backend=BACKEND,
                )
            scripts = {name: client.register_script(text) for name, text in _load_scripts().items()}
            if not self._cluster:  # a cluster node loads each script on first use
                for script in scripts.values():
                    await client.script_load(script.script)
        except ReflowError:
            await client.aclose()
            raise
        except (rex.RedisError, OSError) as exc:
            await client.aclose()
            raise self._start_error(exc) from exc
        return client, scripts

    async def _migrate(self) -> None:
        """Bring the data under the prefix to :data:`LAYOUT_VERSION`, a batch
        of runs or schedules per script call (see ``migrate.lua``); refuse, changing
        nothing, a layout newer than this code's."""
        batches = 0
        while True:
            reply, _ = await self._call_counting(
                "initialize",
                "migrate",
                [LAYOUT_VERSION, MIGRATION_BATCH],
                retry=True,
                check=False,
            )
            try:
                state, version = int(reply[0]), _text(reply[1], "initialize")
            except (TypeError, ValueError, IndexError, _BadData) as exc:
                raise self._bad("initialize", _BadData(f"a malformed reply: {reply!r}")) from exc
            if state == -1:
                raise SchemaVersionError(
                    f"the prefix {self._prefix!r} holds Reflow's Redis layout version "
                    f"{version}, but this reflow-redis supports up to version "
                    f"{LAYOUT_VERSION}; upgrade reflow-redis",
                    operation="initialize",
                    backend=BACKEND,
                )
            if state == -2:
                raise self._bad("initialize", _BadData(f"P:version holds {version!r}"))
            if state == 0:
                if batches:
                    logger.info("indexed the runs under %r for layout %s", self._prefix, version)
                return
            batches += 1
            if batches == 1:
                logger.info(
                    "indexing the runs under %r for layout %s", self._prefix, LAYOUT_VERSION
                )

    def _where(self) -> tuple[str, str]:
        """The server and the database the URL names, without credentials."""
        try:
            parts = urlsplit(self._url)
            db = dict(parse_qsl(parts.query)).get("db")
            if parts.scheme.lower() == "unix":
                return f"the Unix socket {unquote(parts.path)!r}", db or "0"
            host = parts.hostname or "localhost"
            host = f"[{host}]" if ":" in host else host
            return f"{host}:{parts.port or 6379}", db or unquote(parts.path).strip("/") or "0"
        except ValueError:
            return "the server of the URL", "?"

    def _start_error(self, exc: BaseException) -> StorageError:
        """Why ``initialize`` could not reach Redis, and what fixes it; a
        timeout keeps the general form (it names the timeouts)."""
        if isinstance(exc, rex.TimeoutError):
            return self._error("initialize", exc)
        text = redact(str(exc).strip().rstrip(".") or type(exc).__name__, self._secrets)
        server, db = self._where()
        if isinstance(exc, rex.AuthenticationError | rex.AuthenticationWrongNumberOfArgsError) or (
            isinstance(exc, rex.ResponseError) and str(exc).startswith(("WRONGPASS", "NOAUTH"))
        ):
            detail = (
                f"Redis at {server} refused the credentials ({text}); check the user name "
                "and password in the URL (or in connect_kwargs)"
            )
        elif isinstance(exc, rex.ResponseError) and "DB index is out of range" in str(exc):
            detail = (
                f"Redis at {server} has no database {db} ({text}); databases are numbered "
                "from 0 to the server's 'databases' setting minus one (16 by default)"
            )
        elif isinstance(exc, rex.ConnectionError | OSError):
            detail = (
                f"cannot connect to Redis at {server} ({text}); check that the server is "
                "running and that the URL's host and port are right"
            )
        else:
            return self._error("initialize", exc)
        return StorageError(redact(detail, self._secrets), operation="initialize", backend=BACKEND)

    def _error(self, operation: str, exc: BaseException) -> StorageError:
        detail = redact(f"{type(exc).__name__}: {exc}".strip(), self._secrets)
        if isinstance(exc, rex.TimeoutError):
            detail += (
                f" (socket_timeout={self._socket_timeout:g}s, "
                f"socket_connect_timeout={self._connect_timeout:g}s)"
            )
        return StorageError(
            f"Redis failed during {operation}: {detail}", operation=operation, backend=BACKEND
        )

    def _head(self) -> list[str]:
        now = "" if self._clock is None else str(to_epoch_us(self._clock(), "clock"))
        return [self._tag, now, str(self._retention_us), "1" if self._notify else "0"]

    async def _call(
        self,
        operation: str,
        script: str,
        args: Sequence[Any],
        *,
        retry: bool = False,
    ) -> Any:
        """Run one script; with ``retry``, a dropped connection is retried on
        another (only for scripts whose second run changes nothing more)."""
        reply, _ = await self._call_counting(operation, script, args, retry=retry)
        return reply

    async def _call_counting(
        self,
        operation: str,
        script: str,
        args: Sequence[Any],
        *,
        retry: bool,
        check: bool = True,
    ) -> tuple[Any, int]:
        """:meth:`_call`, also saying how many tries lost their connection
        (a try that lost it may have run). ``check=False`` skips the
        lifecycle check, for ``initialize`` itself."""
        if check:
            self._lifecycle.check(operation)
        attempt = reloads = 0
        while True:
            try:
                reply = await self._scripts[script](
                    keys=[f"{self._tag}:idx"], args=[*self._head(), *args]
                )
                return reply, attempt
            except rex.ConnectionError as exc:
                # A broken connection is tried again on another; a timeout is
                # not: the server is slow, not gone, and would only queue the
                # script again behind the stall while the caller waits
                # socket_timeout three times over.
                if retry and attempt < _RETRIES_ON_BROKEN:
                    attempt += 1
                    logger.info("connection lost during %s; retrying", operation)
                    continue
                raise self._error(operation, exc) from exc
            except rex.NoScriptError as exc:
                # The scripts were flushed again while being reloaded; the
                # script never ran, so running it again is always safe.
                if reloads < _RETRIES_ON_BROKEN:
                    reloads += 1
                    continue
                raise self._error(operation, exc) from exc
            except rex.RedisError as exc:
                raise self._error(operation, exc) from exc

    async def _read(self, operation: str, make: Callable[[Any], Awaitable[_T]]) -> _T:
        self._lifecycle.check(operation)
        client = self._client
        attempt = 0
        while True:
            try:
                return await make(client)
            except rex.ConnectionError as exc:  # not a timeout, as in _call_counting
                if attempt < _RETRIES_ON_BROKEN:
                    attempt += 1
                    continue
                raise self._error(operation, exc) from exc
            except rex.RedisError as exc:
                raise self._error(operation, exc) from exc

    def _bad(self, operation: str, exc: _BadData) -> StorageError:
        return StorageError(
            f"unexpected data under prefix {self._prefix!r} during {operation}: {exc} "
            "(written by something other than Reflow?)",
            operation=operation,
            backend=BACKEND,
        )

    def _k(self, *parts: str) -> str:
        return ":".join((self._tag, *parts))

    # -- replies carrying runs ------------------------------------------------------

    def _stored_run(self, operation: str, flat: Any) -> RunRecord:
        """The record of a run hash a script returned (it carries its own id)."""
        try:
            return _run_of(_pairs(flat, "run"))
        except _BadData as exc:
            raise self._bad(operation, exc) from exc

    def _run_reply(self, operation: str, run_id: str, flat: Any) -> RunRecord:
        try:
            return _run_record(run_id, _pairs(flat, f"run {run_id!r}"))
        except _BadData as exc:
            raise self._bad(operation, exc) from exc

    def _stamp(self, operation: str, stamp: object) -> datetime:
        """The server's time a script returned (microseconds since the epoch)."""
        try:
            now = _time(_text(stamp, operation), operation)
        except _BadData as exc:
            raise self._bad(operation, exc) from exc
        if now is None:
            raise self._bad(operation, _BadData("a reply lacks the server's time"))
        return now

    def _new_record(self, run_id: str, new: NewRun, stamp: object) -> RunRecord:
        """The record of a run just created, from what we sent and the server's time."""
        return new_run_record(run_id, new, self._stamp("create_run", stamp))
