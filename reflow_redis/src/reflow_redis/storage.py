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
``P:due:<workflow>``           zset     claimable and delayed runs of priority 0 by due time (µs)
``P:pdue:<pr>:<workflow>``     zset     the same for priority ``pr`` (not 0)
``P:prios:<workflow>``         zset     the priorities with a ``pdue`` set (score = member)
``P:vdue:<v>:<pr>:<wf>``       zset     the same for version ``v`` (``due``/``pdue``: version 1)
``P:vprios:<workflow>``        zset     the ``vdue`` sets: ``<v>:<pr>``, score the priority
``P:holders:<key>``            set      running runs holding a concurrency limit key
``P:blocked:<key>``            zset     runs blocked by a full key (-priority; due:id)
``P:blocked-wf:<workflow>``    zset     a workflow's blocked runs by due time
``P:rate:<key>``               zset     claims of runs holding a rate key, by time (µs)
``P:rate-waits``               zset     rate keys with blocked runs, by when they have room
``P:debounce:<workflow>``      hash     debounce key -> the run last created with it
``P:running:<workflow>``       zset     running runs by lease expiry (µs)
``P:idem:<workflow>``          hash     idempotency key -> run id
``P:bykey:<key>``              zset     runs of an idempotency key, every workflow (as ``P:idx``)
``P:idx``, ``P:idx:wf:<wf>``   zset     ``<created µs>:<id>``, for newest-first listing
``P:finished``                 zset     finished runs by finish time, for retention
``P:done:<status>``            zset     finished runs of one status by finish time
``P:ev:<n>.<id>:<name>``       list     buffered events of one name
``P:evm:<n>.<id>:<name>``      list     their arrivals: ``<n>`` or ``<n>|<event id>``
``P:evnames:<id>``             set      event names with a buffer
``P:evids:<id>``               set      event ids seen (delivery dedupe)
``P:parked:<workflow>``        zset     sleeping (0), waiting (1 in ``due``, 2 not), delayed (3)
``P:workflows``                set      workflows that may have unfinished runs
``P:children:<id>``            zset     a parent's children, ``<created µs>:<id>`` (score 0)
``P:open:<n>.<id>:<step>``     set      a parent's unfinished children started at ``step``
``P:sched:<key>``              hash     a schedule (``p`` = ``1`` while paused)
``P:schedule-due``             zset     schedules by next slot (paused ones left out)
``P:schedule-due:<workflow>``  zset     the same, of one workflow's schedules
``P:schedule-keys``            zset     schedule keys, for listing in order
``P:workers``                  zset     worker ids by when their entry lapses (µs)
``P:worker:<id>``              hash     a worker's announced fields and times
``P:wake``                     channel  wake-up hints (``<delay ms>|<workflow>``)
``P:done``                     channel  finish hints (ids of runs that ended, one per line)
``P:batch:<token>``            string   a ``create_runs`` batch's reply, for a retry (a minute)
``P:version``                  string   the layout's version (absent: 1)
``P:migrating``                string   the last run or schedule an unfinished migration indexed
=============================  =======  ===============================================

``initialize`` brings a prefix written by an older version to this layout
(``migrate.lua``, a batch of runs or schedules per call) and refuses a newer one.

Connecting, loading and calling the scripts live in ``_connection.py``,
decoding replies into records in ``_records.py``, the options in
``_options.py``, the schedule operations in ``_schedules.py`` and the pub/sub
listener in ``_listener.py``, the worker registry and queue statistics in
``_workers.py``, and the dashboard's reads (runs by idempotency key,
buffered events, finished runs per minute) in ``_dashboard.py``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, Literal

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from reflow_core.adapter import (
    Lifecycle,
    check_child_start,
    check_claim_versions,
    check_duration,
    check_finish_status,
    check_list_limit,
    check_new_run,
    check_new_runs,
    check_purge,
    check_purge_limit,
    check_run_ids,
    check_status_update,
    check_text,
    decode_cursor,
    new_run_id,
    new_run_record,
    purge_in_batches,
    run_page,
    span_us,
    to_epoch_us,
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
    StepRecord,
    WaitResult,
    WakeupSubscription,
)

from ._connection import BACKEND, _hgetall
from ._dashboard import _Dashboard
from ._listener import _Listener
from ._options import (
    DEFAULT_PREFIX,
    DEFAULT_SOCKET_CONNECT_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    _check_database,
    _check_keyword_options,
    _check_socket_options,
    _prefix_option,
    _seconds_option,
    check_connect_kwargs,
    parse_redis_url,
)
from ._records import (
    _BadData,
    _claimed_run,
    _create_many_args,
    _deadline_arg,
    _delay_arg,
    _flags,
    _flat,
    _joined,
    _limit_args,
    _pairs,
    _run_record,
    _step_args,
    _step_record,
    _steps,
    _str_arg,
    _text,
    _time,
)
from ._schedules import _Schedules
from ._workers import _Workers

__all__ = ["RedisStorage", "parse_redis_url"]

MAX_CLAIM = 1000
"""One claim takes at most this many runs, so one script never blocks Redis for long."""
_MAX_SAVE_BATCH = 200
"""Concurrent step saves share one script call, at most this many per call."""
_SAVE_FIELDS = 7
"""The fields of one save in ``save_steps.lua``: run id, epoch, extend (µs) and the step's four."""
_FINISH_FIELDS = 10
"""The fields of one finish in ``finish.lua``: run id, epoch, status, output,
error, whether a step follows, and the step's four."""
_MAX_UNSURE_FINISHES = 10_000
"""Leases whose finish failed without a reply that are remembered, at most."""


class RedisStorage(_Schedules, _Workers, _Dashboard):
    """Reflow storage on Redis 6.2 or newer (7 recommended).

    Build it with :func:`reflow_core.open_storage` or :meth:`from_url`.
    ``prefix`` namespaces every key (inside a hash tag, so one application's
    keys share a cluster slot); ``max_connections`` bounds the connection
    pool, and ``pool_timeout`` is how long an operation waits for a free
    connection. ``notify`` publishes wake-up hints and finish hints, and
    ``listen`` lets engines on this storage subscribe to them (one extra
    connection, outside the pool, shared by both).
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
        _check_socket_options(parts, connect_kwargs, self._secrets)
        check_connect_kwargs(connect_kwargs)
        self._connect_kwargs = dict(connect_kwargs or {})
        self._client = None
        self._unsure_finishes: dict[tuple[str, int], None] = {}
        """Leases (run id, epoch) whose finish failed without a reply, oldest first."""
        self._scripts = {}
        self._starting = asyncio.Lock()
        """Held by ``initialize``: a second call waits for the first's migration."""
        self._listener: _Listener | None = None
        self._listener_client: aioredis.Redis | None = None
        self._lifecycle = Lifecycle(BACKEND)
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
        _check_keyword_options(merged)
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

    @property
    def finish_channel(self) -> str:
        """The pub/sub channel of finish hints: the ids of runs that ended."""
        return f"{self._tag}:done"

    # -- lifecycle -------------------------------------------------------------------

    async def initialize(self) -> None:
        """Connect, check the server, load the scripts, and bring the data
        under the prefix to this version's layout (``P:version``; a newer
        one raises :class:`~reflow_core.errors.SchemaVersionError`, changing
        nothing). Idempotent."""
        self._lifecycle.check_open()
        async with self._starting:
            if self._client is not None:
                return
            client, scripts = await self._connect()
            self._client, self._scripts = client, scripts
            try:
                await self._migrate()
            except BaseException:
                self._client = None
                await client.aclose()
                raise
            self._lifecycle.initialized = True

    async def close(self) -> None:
        """Stop listening and close the connections. Idempotent."""
        self._lifecycle.closed = True
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
        self._lifecycle.check("subscribe_wakeups")
        return await self._hub().subscribe(workflows, wake)

    async def subscribe_finishes(
        self, notify: Callable[[Collection[str] | None], None]
    ) -> WakeupSubscription:
        """Call ``notify(run_ids)`` when runs reach a terminal status in any
        process using this prefix (see
        :class:`~reflow_core.storage.FinishSource`), from the ``P:done``
        pub/sub channel: the script that ended them (a finish, a batch of
        finishes, a cancel and its cascade to the children, a failure)
        publishes their ids as it ends, one message per script.
        ``notify(None)`` when runs may have ended unseen: after the channel
        was subscribed anew, or for an id a hint cannot carry (longer than
        1,000 bytes, or holding a newline).

        The listener is the one :meth:`subscribe_wakeups` uses: a worker
        listening for wake-ups alone connects again to take this channel
        too. With ``notify`` off no hint is sent; with ``listen`` off
        ``notify`` is never called and waiters poll."""
        self._lifecycle.check("subscribe_finishes")
        return await self._hub().subscribe_finishes(notify)

    def _hub(self) -> _Listener:
        """The listener of wake-up and finish hints, built on first use."""
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
                finish_channel=self.finish_channel,
                next_due=self._next_due,
                secrets=self._secrets,
                enabled=self._listen,
            )
        return self._listener

    async def _next_due(self, workflows: list[str]) -> float | None:
        reply = await self._call("next_due", "next_due", workflows, retry=True)
        if reply is None or reply is False:
            return None
        return int(_text(reply, "next_due")) / 1_000_000

    # -- runs ----------------------------------------------------------------------

    async def create_run(self, new: NewRun) -> CreateResult:
        """Create a pending run, or a delayed one with a positive ``new.delay``
        (due at the earlier of the delay's end and ``new.deadline``); with a
        ``debounce_key`` whose run is still open, update that run instead.
        Concurrent creates share one script call; each keeps its own outcome,
        idempotency conflict included."""
        check_new_run(new)
        run_id = new.run_id or new_run_id()
        self._lifecycle.check("create_run")
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
                [
                    run_id,
                    new.workflow,
                    new.input,
                    new.idempotency_key or "",
                    _delay_arg(new),
                    _deadline_arg(new),
                    *_limit_args(new),
                ],
                retry=True,
            )
            try:
                return [await self._create_outcome("create_run", run_id, new, reply)]
            except ReflowError as exc:
                return [exc]
        ids = [run_id for run_id, _ in items]
        news = [new for _, new in items]
        reply = await self._call(
            "create_run",
            "create_many",
            [len(items), "", *_create_many_args(ids, news)],
            retry=True,
        )
        return await self._create_many_outcomes("create_run", ids, news, reply)

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        """Create ``news`` in one script call (``create_many.lua``), written
        whole or not at all: the script makes sure no id is taken before it
        writes anything, then creates the runs in order, and publishes its
        wake-up hints once. A try again after a lost reply finds the batch's
        mark (``P:batch:<token>``, kept a minute) and returns the first
        try's outcomes."""
        check_new_runs(news, backend=BACKEND)
        self._lifecycle.check("create_runs")
        if not news:
            return []
        ids = [new.run_id or new_run_id() for new in news]
        reply = await self._call(
            "create_runs",
            "create_many",
            [len(ids), secrets.token_hex(12), *_create_many_args(ids, news)],
            retry=True,
        )
        if reply[0] == -1:
            index = int(reply[1])
            raise StorageError(
                f"item {index}: run id {ids[index]!r} already exists",
                operation="create_runs",
                backend=BACKEND,
            )
        outcomes = await self._create_many_outcomes("create_runs", ids, news, reply)
        results: list[CreateResult | IdempotencyConflictError] = []
        for outcome in outcomes:
            if isinstance(outcome, CreateResult | IdempotencyConflictError):
                results.append(outcome)
            else:
                raise outcome
        return results

    async def _create_many_outcomes(
        self, operation: str, ids: Sequence[str], news: Sequence[NewRun], reply: Any
    ) -> list[CreateResult | ReflowError]:
        """The outcome of each run of a ``create_many.lua`` reply: the
        server's time, then 1 for each run created then, or its own reply."""
        now = self._stamp(operation, reply[0])
        results: list[CreateResult | ReflowError] = []
        append = results.append
        for run_id, new, item in zip(ids, news, islice(reply, 1, None), strict=True):
            if item == 1:
                append(CreateResult(new_run_record(run_id, new, now), created=True))
                continue
            try:
                append(await self._create_outcome(operation, run_id, new, item))
            except ReflowError as exc:
                append(exc)
        return results

    async def _create_outcome(
        self, operation: str, run_id: str, new: NewRun, reply: Any
    ) -> CreateResult:
        outcome = int(reply[0])
        if outcome == -1:
            existing = await self.get_run(run_id)
            if existing is not None and existing.input == new.input and new.run_id is None:
                # A retry of our own create whose reply was lost.
                return CreateResult(existing, created=True)
            raise StorageError(
                f"run id {run_id!r} already exists", operation=operation, backend=BACKEND
            )
        if outcome == 1:
            return CreateResult(
                new_run_record(run_id, new, self._stamp(operation, reply[1])), created=True
            )
        record = self._stored_run(operation, reply[1])
        if record.id == run_id:  # our own first try, whose reply was lost
            return CreateResult(record, created=True)
        if outcome == 2:  # the open run of the debounce key, updated
            return CreateResult(record, created=False)
        if record.input != new.input:
            assert new.idempotency_key is not None
            raise IdempotencyConflictError(new.workflow, new.idempotency_key, record.id)
        return CreateResult(record, created=False)

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs (see
        :meth:`~reflow_core.storage.Storage.claim_runs`). With ``versions``,
        the script walks only the due sets of the versions served
        (``P:due``/``P:pdue`` hold version 1, ``P:vdue`` the others), so runs
        of other versions are never read, and reads the version of each
        lapsed lease it would take over."""
        served = check_claim_versions(workflows, versions)
        # Each name once: the claim script walks the due set of every name it
        # is given, and a repeated one would hand out the same run again.
        names = list(dict.fromkeys(check_text(name, "workflow") for name in workflows))
        check_duration(lease, "lease")
        if limit < 1 or not names:
            return []
        spec = ""
        if served:
            spec = ";".join(",".join(map(str, served.get(name, ()))) for name in names)
        reply = await self._call(
            "claim_runs", "claim", [min(limit, MAX_CLAIM), span_us(lease), spec, *names]
        )
        try:
            return [_claimed_run(entry) for entry in reply]
        except _BadData as exc:
            raise self._bad("claim_runs", exc) from exc

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        check_duration(extend, "extend")
        reply = await self._call(
            "heartbeat_run", "heartbeat", [lease.run_id, lease.epoch, span_us(extend)], retry=True
        )
        return bool(reply)

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        """Fenced upsert of ``step`` that renews the lease. Concurrent saves
        (of many runs in flight) share one script call; each is fenced on its own."""
        check_text(step.name, "step")
        check_duration(extend, "extend")
        self._lifecycle.check("save_step_result")
        return await self._saves.submit(
            [
                _str_arg(lease.run_id),
                _str_arg(lease.epoch),
                str(span_us(extend)),
                *_step_args(step),
            ]
        )

    async def _save_batch(self, items: Sequence[list[Any]]) -> list[bool]:
        """One ``save_steps.lua`` call for the saves ``items`` (a lone one
        too), their fields in one argument (see :func:`_joined`)."""
        reply = await self._call(
            "save_step_result",
            "save_steps",
            [len(items), *_joined(items, _SAVE_FIELDS)],
            retry=True,
        )
        try:
            return _flags(reply, len(items), "save_steps")
        except _BadData as exc:
            raise self._bad("save_step_result", exc) from exc

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
        args: list[Any] = [
            _str_arg(lease.run_id),
            _str_arg(lease.epoch),
            status,
            output or "",
            error or "",
        ]
        args += ["1", *_step_args(step)] if step is not None else ["0", "", "", "", ""]
        self._lifecycle.check("finish_run")
        return await self._finishes.submit((lease, status, args))

    async def _finish_batch(self, items: Sequence[tuple[Lease, str, list[Any]]]) -> list[bool]:
        """One ``finish.lua`` call for the finishes ``items``, their fields
        in one argument (see :func:`_joined`); an output or error holding a
        NUL sends the batch's fields one argument each."""
        fields = _joined([args for _, _, args in items], _FINISH_FIELDS)
        try:
            reply, attempt = await self._call_counting(
                "finish_run", "finish", [len(items), *fields], retry=True
            )
        except StorageError as exc:
            if isinstance(exc.__cause__, rex.ConnectionError | rex.TimeoutError):
                # The script may still run when the server answers (a stall
                # past socket_timeout); the caller's retry is then refused.
                for lease, _, _ in items:
                    self._unsure_finishes[(lease.run_id, lease.epoch)] = None
                while len(self._unsure_finishes) > _MAX_UNSURE_FINISHES:
                    del self._unsure_finishes[next(iter(self._unsure_finishes))]
            raise
        try:
            results = _flags(reply, len(items), "finish")
        except _BadData as exc:
            raise self._bad("finish_run", exc) from exc
        if not attempt and not self._unsure_finishes:
            return results  # no try of these finishes may have landed unseen
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
            "sleep_run", "sleep", [lease.run_id, lease.epoch, step, span_us(duration)]
        )
        if reply is None or reply is False:
            return None
        return _time(_text(reply, "sleep_run"), "sleep_run")

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        check_text(step, "step")
        check_text(event, "event")
        span = "" if timeout is None else str(span_us(check_duration(timeout, "timeout")))
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

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        """One ``get_runs.lua`` call for every id: each run's hash read as
        :meth:`get_run` reads it, all in one consistent snapshot."""
        self._lifecycle.check("get_runs")
        ids = check_run_ids(run_ids)
        if not ids:
            return {}
        reply = await self._call(
            "get_runs", "get_runs", [len(ids), *_joined([[i] for i in ids], 1)], retry=True
        )
        if not isinstance(reply, list | tuple) or len(reply) != len(ids):
            raise self._bad("get_runs", _BadData("get_runs did not answer for every id"))
        return {
            run_id: self._run_reply("get_runs", run_id, flat)
            for run_id, flat in zip(ids, reply, strict=True)
            if flat
        }

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
            upper = f"{to_epoch_us(created, 'cursor'):017d}:{after_id}"
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
        return run_page(records, limit)

    async def requeue_run(self, run_id: str) -> bool:
        check_text(run_id, "run_id")
        return bool(await self._call("requeue_run", "requeue", [run_id]))

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        """Delete runs that finished more than ``older_than`` ago, oldest
        first, with their steps, events and index entries, ``batch`` per
        script call and at most ``limit`` in all (``None``: every one due).
        Returns how many were deleted. Idempotency keys of deleted runs
        become free."""
        batch = check_purge(older_than, batch)
        limit = check_purge_limit(limit)
        age = span_us(older_than)

        async def delete(size: int) -> tuple[int, bool]:
            deleted, looked = await self._call("purge_finished", "purge", [age, size], retry=True)
            return int(deleted), int(looked) >= size

        return await purge_in_batches(delete, batch, limit)

    # -- children ------------------------------------------------------------------

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        """Create ``new`` as a child of the run holding ``lease``, fenced on
        that lease, in one script call; a retry finds the child it made."""
        check_child_start(lease, step, new)
        assert new.run_id is not None
        reply = await self._call(
            "start_child",
            "start_child",
            [
                lease.run_id,
                lease.epoch,
                step,
                new.run_id,
                new.workflow,
                new.input,
                _delay_arg(new),
                _deadline_arg(new),
                *_limit_args(new),
            ],
            retry=True,
        )
        if reply is None or reply is False:
            return None
        if int(reply[0]) == -1:
            raise StorageError(
                f"run id {new.run_id!r} already exists", operation="start_child", backend=BACKEND
            )
        return self._stored_run("start_child", reply[1])

    async def wait_children(self, lease: Lease, step: StepRecord) -> bool | None:
        check_text(step.name, "step")
        reply = await self._call(
            "wait_children", "wait_children", [lease.run_id, lease.epoch, *_step_args(step)]
        )
        if reply is None or reply is False:
            return None
        return bool(int(reply))

    async def list_children(self, run_id: str) -> list[RunRecord]:
        check_text(run_id, "run_id")
        reply = await self._call("list_children", "list_children", [run_id], retry=True)
        try:
            return [
                _run_record(_text(child_id, "list_children"), _pairs(flat, "child run"))
                for child_id, flat in reply
            ]
        except _BadData as exc:
            raise self._bad("list_children", exc) from exc
