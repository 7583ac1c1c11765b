"""``redis://``: the Redis backend, every state change one Lua script.

Each operation that changes state is one script from the package's ``lua/``
folder (with ``lua/prelude.lua`` in front), loaded once and called by SHA;
after a server restart or ``SCRIPT FLUSH`` the client loads it again by
itself. A script reads the server's ``TIME``, so leases and due times follow
Redis's clock, never a worker's.

The key layout (``P`` is the configured prefix inside a hash tag, ``{reflow}``
by default, so every key lives in one cluster slot):

=============================  =======  ===============================================
key                            type     holds
=============================  =======  ===============================================
``P:run:<id>``                 hash     the run: status, input, output, epoch, times...
``P:steps:<id>``               hash     step name -> ``seq|done|status|wake|json``
``P:lease:<id>``               string   the lease epoch, with a PX time to live
``P:due:<workflow>``           zset     claimable runs by due time (µs)
``P:running:<workflow>``       zset     running runs by lease expiry (µs)
``P:idem:<workflow>``          hash     idempotency key -> run id
``P:idx``, ``P:idx:wf:<wf>``   zset     ``<created µs>:<id>``, for newest-first listing
``P:finished``                 zset     finished runs by finish time, for retention
``P:ev:<n>.<id>:<name>``       list     buffered events of one name
``P:evnames:<id>``             set      event names with a buffer
``P:evids:<id>``               set      event ids seen (delivery dedupe)
``P:sched:<key>``              hash     a schedule
``P:schedule-due``             zset     schedules by next slot
``P:schedule-keys``            zset     schedule keys, for listing in order
``P:wake``                     channel  wake-up hints (``<delay ms>|<workflow>``)
=============================  =======  ===============================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Literal, TypeVar, cast
from urllib.parse import SplitResult, parse_qsl, unquote

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from reflow_core.adapter import (
    check_aware,
    check_duration,
    check_finish_status,
    check_list_limit,
    check_new_run,
    check_purge,
    check_status_update,
    check_text,
    decode_cursor,
    encode_cursor,
    from_epoch_us,
    new_run_id,
)
from reflow_core.batching import GroupCommit
from reflow_core.errors import (
    ConfigError,
    EventBufferFullError,
    IdempotencyConflictError,
    ReflowError,
    StorageError,
)
from reflow_core.options import (
    bool_option,
    int_option,
    kwarg_secrets,
    parse_url,
    redact,
    safe_url,
    seconds_option,
    split_url,
    url_secrets,
)
from reflow_core.storage import (
    ClaimedRun,
    CreateResult,
    EventTake,
    Lease,
    NewRun,
    RunPage,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    StepStatus,
    WaitResult,
    WakeupSubscription,
)
from reflow_core.wakeups import WakeupHub

__all__ = ["RedisStorage", "parse_redis_url"]

logger = logging.getLogger("reflow.redis")

BACKEND = "redis"
DEFAULT_PREFIX = "reflow"
MAX_CLAIM = 1000
"""One claim takes at most this many runs, so one script never blocks Redis for long."""

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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_RETRIES_ON_BROKEN = 2
_MAX_SAVE_BATCH = 200
_MAX_UNSURE_FINISHES = 10_000
"""Concurrent step saves share one script call, at most this many per call."""
_SCRIPTS = (
    "create",
    "create_many",
    "claim",
    "heartbeat",
    "save_step",
    "save_steps",
    "finish",
    "update_status",
    "sleep",
    "wait",
    "deliver",
    "take",
    "requeue",
    "list_runs",
    "next_due",
    "now",
    "purge",
    "upsert_schedule",
    "delete_schedule",
    "list_schedules",
    "claim_slot",
)
_T = TypeVar("_T")


def _load_scripts() -> dict[str, str]:
    folder = resources.files("reflow_redis").joinpath("lua")
    prelude = folder.joinpath("prelude.lua").read_text("utf-8")
    return {
        name: f"{prelude}\n-- {name}.lua\n{folder.joinpath(f'{name}.lua').read_text('utf-8')}"
        for name in _SCRIPTS
    }


# -- conversions ------------------------------------------------------------------


class _BadData(Exception):
    """Something under our prefix is not what Reflow writes."""


def _us(value: datetime, what: str) -> int:
    return (check_aware(value, what) - _EPOCH) // _ONE_US


def _span(value: timedelta) -> int:
    return max(0, value // _ONE_US)


def _text(value: object, where: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _BadData(f"{where} is not UTF-8 text") from exc
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    raise _BadData(f"{where} has an unexpected type {type(value).__name__}")


def _time(value: str | None, where: str) -> datetime | None:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise _BadData(f"{where} is not a time")
    try:
        micros = int(value)
    except ValueError:  # more digits than int() takes: far past year 9999
        return from_epoch_us(2**63)
    return from_epoch_us(micros)


def _pairs(flat: Sequence[object], where: str) -> dict[str, str]:
    if not isinstance(flat, list | tuple) or len(flat) % 2:
        raise _BadData(f"{where} is not a hash")
    return {_text(flat[i], where): _text(flat[i + 1], where) for i in range(0, len(flat), 2)}


def _int(fields: Mapping[str, str], name: str, where: str) -> int:
    value = fields.get(name, "")
    if not value.lstrip("-").isdigit():
        raise _BadData(f"{where} field {name!r} is not an integer")
    return int(value)


def _run_record(run_id: str, fields: Mapping[str, str]) -> RunRecord:
    where = f"run {run_id!r}"
    try:
        status = fields["st"]
        if status not in (
            "pending",
            "running",
            "sleeping",
            "waiting",
            "completed",
            "failed",
            "cancelled",
        ):
            raise _BadData(f"{where} has an unknown status {status!r}")
        created = _time(fields["c"], where)
        updated = _time(fields["u"], where)
        if created is None or updated is None:
            raise _BadData(f"{where} lacks its creation or update time")
        return RunRecord(
            id=run_id,
            workflow=fields["wf"],
            status=cast(RunStatus, status),
            input=fields["in"],
            output=fields.get("out"),
            error=fields.get("err"),
            idempotency_key=fields.get("idem") or None,
            attempts=_int(fields, "att", where),
            reclaims=_int(fields, "rec", where),
            lease_epoch=_int(fields, "ep", where),
            created_at=created,
            updated_at=updated,
            wake_at=_time(fields.get("w"), where),
            waiting_for=fields.get("wt") or None,
            lease_expires_at=_time(fields.get("l"), where) if status == "running" else None,
        )
    except KeyError as exc:
        raise _BadData(f"{where} lacks a field Reflow writes") from exc


def _step_record(name: str, value: str, run_id: str) -> tuple[int, StepRecord]:
    where = f"step {name!r} of run {run_id!r}"
    parts = value.split("|", 4)
    if len(parts) != 5 or not parts[0].isdigit():
        raise _BadData(f"{where} is not a step record")
    seq, done, status, wake, body = parts
    try:
        output, error, attempts = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise _BadData(f"{where} has a malformed body") from exc
    if status not in ("completed", "failed", "skipped", "sleeping", "waiting"):
        raise _BadData(f"{where} has an unknown status {status!r}")
    if not isinstance(attempts, int) or not all(
        v is None or isinstance(v, str) for v in (output, error)
    ):
        raise _BadData(f"{where} has a malformed body")
    record = StepRecord(
        name=name,
        status=cast(StepStatus, status),
        output=output,
        error=error,
        attempts=attempts,
        wake_at=_time(wake, where),
        completed_at=_time(done, where),
    )
    return int(seq), record


def _steps(flat: Sequence[object], run_id: str) -> dict[str, StepRecord]:
    pairs = _pairs(flat, f"steps of run {run_id!r}")
    ordered = sorted(_step_record(name, value, run_id) for name, value in pairs.items())
    return {record.name: record for _, record in ordered}


def _step_args(step: StepRecord) -> list[str]:
    wake = "" if step.wake_at is None else str(_us(step.wake_at, "step.wake_at"))
    body = json.dumps([step.output, step.error, step.attempts], separators=(",", ":"))
    return [step.name, step.status, wake, body]


def _schedule_record(key: str, fields: Mapping[str, str]) -> ScheduleRecord:
    where = f"schedule {key!r}"
    try:
        next_run = _time(fields["next"], where)
        created = _time(fields["c"], where)
        updated = _time(fields["u"], where)
        if next_run is None or created is None or updated is None:
            raise _BadData(f"{where} lacks a time")
        return ScheduleRecord(
            key=key,
            workflow=fields["wf"],
            input=fields["in"],
            recurrence=fields["rec"],
            next_run_at=next_run,
            created_at=created,
            updated_at=updated,
        )
    except KeyError as exc:
        raise _BadData(f"{where} lacks a field Reflow writes") from exc


# -- options ---------------------------------------------------------------------------


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


# -- wake-ups -------------------------------------------------------------------------


class _Listener(WakeupHub):
    """The pub/sub subscription of one storage, shared by its subscribers."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        channel: str,
        next_due: Callable[[list[str]], Awaitable[float | None]],
        secrets: Collection[str],
        enabled: bool,
        liveness: float = 30.0,
    ) -> None:
        super().__init__(next_due=next_due, describe=repr(channel), enabled=enabled)
        self._client = client
        self._channel = channel
        self._secrets = secrets
        self._liveness = liveness

    async def listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            self.connected_now()
            while True:
                message = await pubsub.get_message(timeout=self._liveness)
                if message is None:
                    await pubsub.ping()  # a half-open connection fails here
                    continue
                data = message.get("data")
                if isinstance(data, bytes):
                    self.hint(data.decode("utf-8", "replace"))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def describe_error(self, exc: BaseException) -> str:
        return redact(f"{type(exc).__name__}: {exc}", self._secrets)


# -- the storage ---------------------------------------------------------------------------


class RedisStorage:
    """Reflow storage on Redis 6.2 or newer (7 recommended).

    Build it with :func:`reflow_core.open_storage` or :meth:`from_url`.
    ``prefix`` namespaces every key (inside a hash tag, so one application's
    keys share a cluster slot); ``max_connections`` bounds the connection
    pool, and ``pool_timeout`` is how long an operation waits for a free
    connection. ``notify`` publishes wake-up hints and ``listen`` lets
    engines on this storage subscribe to them (one extra connection, outside
    the pool).
    ``retention`` (a duration) deletes finished runs that long after they
    finished, a couple at a time as other runs finish; without it finished
    runs stay until :meth:`purge_finished` removes them. ``clock`` replaces
    the server clock, for tests only. ``cluster`` connects with redis-py's
    cluster client to a Redis Cluster (the URL names any node); every key of
    one prefix lives in one slot, so one prefix lives on one shard.
    ``socket_timeout`` is how long an operation waits for Redis to reply
    (10 s): a shorter stall only delays it, a longer one fails it with
    :class:`~reflow_core.errors.StorageError`, which is not retried inside
    the storage. ``socket_connect_timeout`` bounds opening a connection
    (5 s). ``connect_kwargs`` go to redis-py.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_connections: int | str = 50,
        pool_timeout: float | str | timedelta = 10.0,
        notify: bool | str = True,
        listen: bool | str = True,
        retention: float | str | timedelta | None = None,
        cluster: bool | str = False,
        socket_timeout: float | str | timedelta = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float | str | timedelta = DEFAULT_SOCKET_CONNECT_TIMEOUT,
        clock: Callable[[], datetime] | None = None,
        connect_kwargs: Mapping[str, Any] | None = None,
        _display_url: str | None = None,
    ) -> None:
        self._prefix = _prefix_option(prefix)
        self._tag = "{" + self._prefix + "}"
        self._max = int_option("max_connections", max_connections, 1)
        timeout = _seconds_option("pool_timeout", pool_timeout)
        assert timeout is not None
        self._timeout = timeout
        self._notify = bool_option("notify", notify)
        self._listen = bool_option("listen", listen)
        keep = _seconds_option("retention", retention, allow_none=True)
        self._retention_us = 0 if keep is None else int(keep * 1_000_000)
        self._cluster = bool_option("cluster", cluster)
        if clock is not None and not callable(clock):
            raise ConfigError(f"clock must be callable, got {clock!r}", option="clock")
        self._clock = clock
        self._socket_timeout = seconds_option("socket_timeout", socket_timeout)
        self._connect_timeout = seconds_option("socket_connect_timeout", socket_connect_timeout)
        self._url = url
        self._secrets = list(dict.fromkeys(url_secrets(url) + kwarg_secrets(connect_kwargs)))
        self._display = redact(_display_url or safe_url(url), self._secrets)
        parts = parse_url(url, kind="redis")
        _check_database(parts, self._secrets)
        in_url = {name for name, _ in parse_qsl(parts.query, True)}
        for name in _SOCKET_OPTIONS:
            if name in in_url or name in (connect_kwargs or {}):
                raise ConfigError(
                    f"{name} is an option of the storage: give it as a keyword argument, "
                    "or in the URL of RedisStorage.from_url() or open_storage()",
                    option=name,
                )
        self._connect_kwargs = dict(connect_kwargs or {})
        self._client: Any = None
        """A ``redis.asyncio.Redis``, or a ``RedisCluster`` with ``cluster``."""
        self._unsure_finishes: dict[tuple[str, int], None] = {}
        """Leases (run id, epoch) whose finish failed without a reply, oldest first."""
        self._scripts: dict[str, AsyncScript] = {}
        self._listener: _Listener | None = None
        self._listener_client: aioredis.Redis | None = None
        self._closed = False
        # Scripts run one at a time and cannot deadlock: two batches in
        # flight let the client build one while Redis runs the other.
        self._saves: GroupCommit[list[Any], bool] = GroupCommit(
            self._save_batch, max_batch=_MAX_SAVE_BATCH, in_flight=2
        )
        self._finishes: GroupCommit[tuple[Lease, str, list[Any]], bool] = GroupCommit(
            self._finish_batch, max_batch=_MAX_SAVE_BATCH, in_flight=2
        )
        self._creates: GroupCommit[tuple[str, NewRun], CreateResult | ReflowError] = GroupCommit(
            self._create_batch, max_batch=_MAX_SAVE_BATCH
        )

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> RedisStorage:
        """Build a storage from a ``redis://``, ``rediss://`` or ``unix://`` URL
        (see :func:`parse_redis_url`); keyword ``options`` win over the URL's."""
        target, query, safe = parse_redis_url(url)
        merged: dict[str, Any] = {**query, **options}
        for name in merged:
            if name not in _KEYWORD_OPTIONS:
                raise ConfigError(
                    f"unknown redis option {name!r}; known options: {', '.join(_KEYWORD_OPTIONS)}",
                    option=name,
                )
        return cls(target, _display_url=safe, **merged)

    def __repr__(self) -> str:
        # Redacted whole: a password may equal the prefix.
        return redact(f"RedisStorage({self._display!r}, prefix={self._prefix!r})", self._secrets)

    @property
    def prefix(self) -> str:
        """The key prefix (keys start with ``{prefix}:``)."""
        return self._prefix

    @property
    def channel(self) -> str:
        """The pub/sub channel of wake-up hints."""
        return f"{self._tag}:wake"

    # -- plumbing -------------------------------------------------------------------

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

    def _live(self, operation: str) -> Any:
        if self._closed:
            raise StorageError("storage is closed", operation=operation, backend=BACKEND)
        if self._client is None:
            raise StorageError(
                "storage is not initialized; call initialize() first",
                operation=operation,
                backend=BACKEND,
            )
        return self._client

    def _head(self) -> list[str]:
        now = "" if self._clock is None else str(_us(self._clock(), "clock"))
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
        self, operation: str, script: str, args: Sequence[Any], *, retry: bool
    ) -> tuple[Any, int]:
        """:meth:`_call`, also saying how many tries lost their connection
        (a try that lost it may have run)."""
        self._live(operation)
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
        client = self._live(operation)
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

    # -- lifecycle -------------------------------------------------------------------

    async def initialize(self) -> None:
        """Connect, check the server, and load the scripts. Idempotent."""
        if self._closed:
            raise StorageError("storage is closed", operation="initialize", backend=BACKEND)
        if self._client is not None:
            return
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
            raise self._error("initialize", exc) from exc
        self._client = client
        self._scripts = scripts

    async def close(self) -> None:
        """Stop listening and close the connections. Idempotent."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        listening, self._listener_client = self._listener_client, None
        if listening is not None:
            await listening.aclose()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- wake-ups -----------------------------------------------------------------

    async def subscribe_wakeups(
        self, workflows: Collection[str], wake: Callable[[], None]
    ) -> WakeupSubscription:
        """Call ``wake()`` when work of ``workflows`` may be ready (see
        :class:`~reflow_core.storage.WakeupSource`), from the ``P:wake``
        pub/sub channel, with timers for sleeps and wait timeouts."""
        self._live("subscribe_wakeups")
        if self._listener is None:
            # Its own connection, outside the pool: a subscription holds it for good.
            listening = aioredis.Redis.from_url(
                self._url,
                retry=Retry(NoBackoff(), 0),
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._connect_timeout,
                **self._connect_kwargs,
            )
            self._listener_client = listening
            self._listener = _Listener(
                client=listening,
                channel=self.channel,
                next_due=self._next_due,
                secrets=self._secrets,
                enabled=self._listen,
            )
        return await self._listener.subscribe(workflows, wake)

    async def _next_due(self, workflows: list[str]) -> float | None:
        reply = await self._call("next_due", "next_due", workflows, retry=True)
        if reply is None or reply is False:
            return None
        return int(_text(reply, "next_due")) / 1_000_000

    # -- runs ----------------------------------------------------------------------

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

    async def create_run(self, new: NewRun) -> CreateResult:
        """Create a pending run. Concurrent creates share one script call;
        each keeps its own outcome, idempotency conflict included."""
        check_new_run(new)
        run_id = new.run_id or new_run_id()
        self._live("create_run")
        outcome = await self._creates.submit((run_id, new))
        if isinstance(outcome, ReflowError):
            raise outcome
        return outcome

    async def _create_batch(
        self, items: Sequence[tuple[str, NewRun]]
    ) -> list[CreateResult | ReflowError]:
        if len(items) == 1:
            run_id, new = items[0]
            reply = await self._call(
                "create_run",
                "create",
                [run_id, new.workflow, new.input, new.idempotency_key or ""],
                retry=True,
            )
            replies = [reply]
        else:
            args: list[Any] = [len(items)]
            for run_id, new in items:
                args += [run_id, new.workflow, new.input, new.idempotency_key or ""]
            replies = await self._call("create_run", "create_many", args, retry=True)
        results: list[CreateResult | ReflowError] = []
        for (run_id, new), reply in zip(items, replies, strict=True):
            try:
                results.append(await self._create_outcome(run_id, new, reply))
            except ReflowError as exc:
                results.append(exc)
        return results

    async def _create_outcome(self, run_id: str, new: NewRun, reply: Any) -> CreateResult:
        outcome = int(reply[0])
        if outcome == -1:
            existing = await self.get_run(run_id)
            if existing is not None and existing.input == new.input and new.run_id is None:
                # A retry of our own create whose reply was lost.
                return CreateResult(existing, created=True)
            raise StorageError(
                f"run id {run_id!r} already exists", operation="create_run", backend=BACKEND
            )
        if outcome == 1:
            return CreateResult(self._new_record(run_id, new, reply[1]), created=True)
        record = self._stored_run("create_run", reply[1])
        if record.id == run_id:  # our own first try, whose reply was lost
            return CreateResult(record, created=True)
        if record.input != new.input:
            assert new.idempotency_key is not None
            raise IdempotencyConflictError(new.workflow, new.idempotency_key, record.id)
        return CreateResult(record, created=False)

    def _new_record(self, run_id: str, new: NewRun, stamp: object) -> RunRecord:
        """The record of a run just created, from what we sent and the server's time."""
        try:
            now = _time(_text(stamp, "create"), "create")
        except _BadData as exc:
            raise self._bad("create_run", exc) from exc
        assert now is not None
        return RunRecord(
            id=run_id,
            workflow=new.workflow,
            status="pending",
            input=new.input,
            output=None,
            error=None,
            idempotency_key=new.idempotency_key,
            attempts=0,
            reclaims=0,
            lease_epoch=0,
            created_at=now,
            updated_at=now,
            wake_at=now,
        )

    async def claim_runs(
        self, workflows: Collection[str], limit: int, lease: timedelta
    ) -> list[ClaimedRun]:
        names = [check_text(name, "workflow") for name in workflows]
        check_duration(lease, "lease")
        if limit < 1 or not names:
            return []
        reply = await self._call(
            "claim_runs", "claim", [min(limit, MAX_CLAIM), _span(lease), *names]
        )
        claimed = []
        try:
            for reclaim, run_flat, steps_flat in reply:
                record = _run_of(_pairs(run_flat, "claimed run"))
                claimed.append(
                    ClaimedRun(
                        run=record,
                        lease=Lease(record.id, record.lease_epoch),
                        steps=_steps(steps_flat, record.id),
                        reclaimed=bool(int(reclaim)),
                    )
                )
        except _BadData as exc:
            raise self._bad("claim_runs", exc) from exc
        return claimed

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        check_duration(extend, "extend")
        reply = await self._call(
            "heartbeat_run", "heartbeat", [lease.run_id, lease.epoch, _span(extend)], retry=True
        )
        return bool(reply)

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        """Fenced upsert of ``step`` that renews the lease. Concurrent saves
        (of many runs in flight) share one script call; each is fenced on its own."""
        check_text(step.name, "step")
        check_duration(extend, "extend")
        self._live("save_step_result")
        return await self._saves.submit(
            [lease.run_id, lease.epoch, _span(extend), *_step_args(step)]
        )

    async def _save_batch(self, items: Sequence[list[Any]]) -> list[bool]:
        if len(items) == 1:
            reply = await self._call("save_step_result", "save_step", items[0], retry=True)
            return [bool(reply)]
        args: list[Any] = [len(items)]
        for item in items:
            args.extend(item)
        reply = await self._call("save_step_result", "save_steps", args, retry=True)
        return [bool(int(flag)) for flag in reply]

    async def finish_run(
        self,
        lease: Lease,
        status: Literal["completed", "failed"],
        *,
        output: str | None = None,
        error: str | None = None,
        step: StepRecord | None = None,
    ) -> bool:
        check_finish_status(status)
        if step is not None:
            check_text(step.name, "step")
        args: list[Any] = [lease.run_id, lease.epoch, status, output or "", error or ""]
        args += ["1", *_step_args(step)] if step is not None else ["0", "", "", "", ""]
        self._live("finish_run")
        return await self._finishes.submit((lease, status, args))

    async def _finish_batch(self, items: Sequence[tuple[Lease, str, list[Any]]]) -> list[bool]:
        flat: list[Any] = [len(items)]
        for _, _, args in items:
            flat.extend(args)
        try:
            reply, attempt = await self._call_counting("finish_run", "finish", flat, retry=True)
        except StorageError as exc:
            if isinstance(exc.__cause__, rex.ConnectionError | rex.TimeoutError):
                # The script may still run when the server answers (a stall
                # past socket_timeout); the caller's retry is then refused.
                for lease, _, _ in items:
                    self._unsure_finishes[(lease.run_id, lease.epoch)] = None
                while len(self._unsure_finishes) > _MAX_UNSURE_FINISHES:
                    del self._unsure_finishes[next(iter(self._unsure_finishes))]
            raise
        results = [bool(int(flag)) for flag in reply]
        for i, (lease, status, _) in enumerate(items):
            key = (lease.run_id, lease.epoch)
            lost_before = key in self._unsure_finishes
            self._unsure_finishes.pop(key, None)
            if not results[i] and (attempt or lost_before):
                # A try whose connection dropped or timed out may have landed:
                # a refused finish whose run already ended this way under this
                # lease is ours.
                run = await self.get_run(lease.run_id)
                results[i] = (
                    run is not None and run.status == status and run.lease_epoch == lease.epoch
                )
        return results

    async def update_run_status(
        self,
        run_id: str,
        status: Literal["pending", "cancelled", "failed"],
        *,
        lease: Lease | None = None,
        error: str | None = None,
    ) -> bool:
        check_text(run_id, "run_id")
        check_status_update(status, lease)
        epoch = "" if lease is None else str(lease.epoch)
        reply = await self._call(
            "update_run_status", "update_status", [run_id, status, epoch, error or ""]
        )
        return bool(reply)

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        check_text(step, "step")
        check_duration(duration, "duration")
        reply = await self._call(
            "sleep_run", "sleep", [lease.run_id, lease.epoch, step, _span(duration)]
        )
        if reply is None or reply is False:
            return None
        return _time(_text(reply, "sleep_run"), "sleep_run")

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        check_text(step, "step")
        check_text(event, "event")
        span = "" if timeout is None else str(_span(check_duration(timeout, "timeout")))
        reply = await self._call("wait_run", "wait", [lease.run_id, lease.epoch, step, event, span])
        if reply is None or reply is False:
            return None
        ready, deadline = reply
        return WaitResult(ready=bool(int(ready)), deadline=_time(_text(deadline, "wait"), "wait"))

    async def deliver_event(
        self,
        run_id: str,
        event: str,
        payload: str,
        *,
        event_id: str | None = None,
        max_buffered: int | None = None,
    ) -> bool:
        check_text(run_id, "run_id")
        check_text(event, "event")
        if event_id is not None:
            check_text(event_id, "event_id")
        cap = "" if max_buffered is None else str(int(max_buffered))
        reply = await self._call(
            "deliver_event",
            "deliver",
            [run_id, event, payload, event_id or "", cap],
            retry=event_id is not None,
        )
        if int(reply) == 2:
            assert max_buffered is not None
            raise EventBufferFullError(run_id, event, max_buffered)
        return bool(reply)

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        check_text(step, "step")
        check_text(event, "event")
        reply = await self._call(
            "take_event", "take", [lease.run_id, lease.epoch, step, event], retry=True
        )
        if reply is None or reply is False:
            return None
        found = int(reply[0])
        if found == 0:
            return EventTake(found=False)
        if found == 2:
            try:
                _, record = _step_record(step, _text(reply[1], "take"), lease.run_id)
            except _BadData as exc:
                raise self._bad("take_event", exc) from exc
            return EventTake(found=True, payload=record.output)
        return EventTake(found=True, payload=_text(reply[1], "take"))

    async def now(self) -> datetime:
        """The clock every script judges by: the server's ``TIME`` (read by a
        script, so on a cluster it is the clock of the node holding the
        prefix's slot), or the test ``clock`` when one is configured."""
        reply = await self._call("now", "now", [], retry=True)
        try:
            moment = _time(_text(reply, "now"), "now")
        except _BadData as exc:
            raise self._bad("now", exc) from exc
        assert moment is not None
        return moment

    async def get_run(self, run_id: str) -> RunRecord | None:
        check_text(run_id, "run_id")
        flat = await self._read("get_run", lambda c: _hgetall(c, self._k("run", run_id)))
        if not flat:
            return None
        return self._run_reply("get_run", run_id, _flat(flat))

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        check_text(run_id, "run_id")
        flat = await self._read("get_step_results", lambda c: _hgetall(c, self._k("steps", run_id)))
        try:
            return _steps(_flat(flat), run_id)
        except _BadData as exc:
            raise self._bad("get_step_results", exc) from exc

    async def list_runs(
        self,
        *,
        status: Collection[RunStatus] | None = None,
        workflow: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        check_list_limit(limit)
        if workflow is not None:
            check_text(workflow, "workflow")
        upper = ""
        if cursor is not None:
            created, after_id = decode_cursor(cursor)
            upper = f"{_us(created, 'cursor'):017d}:{after_id}"
        statuses = list(status) if status is not None else []
        if status is not None and not statuses:
            return RunPage([], None)
        reply = await self._call(
            "list_runs",
            "list_runs",
            [limit + 1, upper, workflow or "", *statuses],
            retry=True,
        )
        try:
            records = [
                _run_record(_text(run_id, "list"), _pairs(flat, "listed run"))
                for run_id, flat in reply
            ]
        except _BadData as exc:
            raise self._bad("list_runs", exc) from exc
        page = records[:limit]
        more = len(records) > limit
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more else None
        return RunPage(page, next_cursor)

    async def requeue_run(self, run_id: str) -> bool:
        check_text(run_id, "run_id")
        return bool(await self._call("requeue_run", "requeue", [run_id]))

    async def purge_finished(self, older_than: timedelta, *, batch: int = 1000) -> int:
        """Delete runs that finished more than ``older_than`` ago, with their
        steps, events and index entries, ``batch`` per script call. Returns
        how many were deleted. Idempotency keys of deleted runs become free."""
        batch = check_purge(older_than, batch)
        total = 0
        while True:
            deleted, looked = await self._call(
                "purge_finished", "purge", [_span(older_than), batch], retry=True
            )
            total += int(deleted)
            if int(looked) < batch:
                return total

    # -- schedules ------------------------------------------------------------------

    def _schedules(self, operation: str, reply: Any) -> list[ScheduleRecord]:
        try:
            return [
                _schedule_record(_text(key, "schedule"), _pairs(flat, "schedule"))
                for key, flat in reply
            ]
        except _BadData as exc:
            raise self._bad(operation, exc) from exc

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        check_text(spec.key, "key")
        check_text(spec.workflow, "workflow")
        reply = await self._call(
            "upsert_schedule",
            "upsert_schedule",
            [
                spec.key,
                spec.workflow,
                spec.input,
                spec.recurrence,
                _us(spec.next_run_at, "next_run_at"),
            ],
            retry=True,
        )
        return self._schedules("upsert_schedule", [reply])[0]

    async def delete_schedule(self, key: str) -> bool:
        check_text(key, "key")
        return bool(await self._call("delete_schedule", "delete_schedule", [key]))

    async def list_schedules(self) -> list[ScheduleRecord]:
        reply = await self._call("list_schedules", "list_schedules", [""], retry=True)
        return self._schedules("list_schedules", reply)

    async def due_schedules(self, limit: int) -> list[ScheduleRecord]:
        if limit < 1:
            return []
        reply = await self._call("due_schedules", "list_schedules", [limit], retry=True)
        return self._schedules("due_schedules", reply)

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        check_text(key, "key")
        check_new_run(run)
        run_id = run.run_id or new_run_id()
        reply = await self._call(
            "claim_schedule_slot",
            "claim_slot",
            [
                key,
                _us(slot, "slot"),
                _us(next_run_at, "next_run_at"),
                run_id,
                run.workflow,
                run.input,
                run.idempotency_key or "",
            ],
        )
        outcome = int(reply[0])
        # {0} is a slot already fired or gone; {0, run} is create_run's
        # answer for the slot's run that already exists (the slot fired now).
        if outcome == -1 or (outcome == 0 and len(reply) < 2):
            return None
        if outcome == 1:
            return self._new_record(run_id, run, reply[1])
        record = self._stored_run("claim_schedule_slot", reply[1])
        if outcome == -2:
            assert run.idempotency_key is not None
            raise IdempotencyConflictError(run.workflow, run.idempotency_key, record.id)
        return record


# -- reply helpers -----------------------------------------------------------------------


async def _hgetall(client: Any, key: str) -> Any:
    return await client.execute_command("HGETALL", key)


def _flat(reply: Any) -> list[object]:
    if isinstance(reply, dict):
        return [item for pair in reply.items() for item in pair]
    return list(reply)


def _run_of(fields: Mapping[str, str]) -> RunRecord:
    """The record of a run hash, which names its own id."""
    run_id = fields.get("id")
    if not run_id:
        raise _BadData("a run hash lacks its id")
    return _run_record(run_id, fields)
