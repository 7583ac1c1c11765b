"""``postgresql://``: the PostgreSQL backend, for many workers on many machines.

Every operation is one statement, or one short transaction, on a connection
from a :class:`psycopg_pool.AsyncConnectionPool` in autocommit mode (see
:mod:`._connections`); the statements are in ``queries.sql``:

* the server's ``now()`` judges every lease and due time;
* a claim is one statement: lapsed leases first, then due runs, each taken
  with ``FOR UPDATE SKIP LOCKED`` and bounded by the claim limit, returning
  the runs with their saved steps;
* a step save is one statement that checks the fence, renews the lease and
  upserts the step; the last step and the run's end are one statement too;
  concurrent creates, saves and finishes share a statement (see
  :mod:`._batches`); a batch of creates (``create_runs``) is one statement,
  or one transaction sent in one pipeline (see :mod:`._creates`);
* enqueues (delayed ones included), hand-backs, requeues, events that wake
  a run and sleeps send a ``NOTIFY`` (a hint, never the source of truth) that wakes idle workers;
  see :class:`~reflow_postgres.listener.Listener`; every statement that ends
  runs sends their ids as a finish hint on a second channel, which engines
  waiting for results listen to (:meth:`PostgresStorage.subscribe_finishes`);
* child runs (``start_child``) carry ``parent_id``/``parent_step``; a child's
  end locks its parent's row first and wakes the parent in the same statement
  when it waits for its last open child (``wait_children``); cancelling a run
  cancels every unfinished run below it in the same transaction;
* due runs go by priority, then due time; runs holding concurrency limits
  are claimed (or blocked) under their keys' advisory locks by a second
  statement, only when the claim picked some, and a write that stops such a
  run unblocks the first blocked run of each of its keys in its own
  statement (see docs/postgres.md);
* runs holding rate limits are claimed (or blocked) by that second
  statement too, under their rate keys' advisory locks; a claim that finds
  a rate wait due releases the runs it holds first; a debounced create is
  one ``INSERT ... ON CONFLICT DO UPDATE`` on the open run with its key;
* a batched read of runs (``get_runs``, up to 1000 ids) is one statement,
  ``id = ANY(...)``, served by the primary key;
* the dashboard's reads are one statement each, each reading one index: runs
  by idempotency key (``runs_key_created``), a run's buffered events
  (``events_buffered``) and the runs finished per minute by the storage
  clock (``runs_finished``).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import psycopg

from reflow_core.adapter import (
    as_utc,
    check_aware,
    check_child_start,
    check_claim_versions,
    check_count,
    check_duration,
    check_finish_status,
    check_list_limit,
    check_new_run,
    check_new_runs,
    check_purge,
    check_purge_limit,
    check_run_ids,
    check_stats_workflows,
    check_status_update,
    check_text,
    check_worker,
    child_of,
    decode_cursor,
    encode_workflows,
    finished_minutes_from_counts,
    new_run_id,
    purge_in_batches,
    queue_stats_from_counts,
    run_from_row,
    run_page,
    schedule_from_row,
    step_from_row,
    worker_from_row,
)
from reflow_core.errors import (
    EventBufferFullError,
    IdempotencyConflictError,
    ReflowError,
    StorageError,
)
from reflow_core.options import redact
from reflow_core.storage import (
    CHILDREN_WAIT_PREFIX,
    MAX_HISTORY_MINUTES,
    BufferedEvent,
    ClaimedRun,
    CreateResult,
    EventTake,
    FinishedMinute,
    Lease,
    NewRun,
    QueueStats,
    RunPage,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    WaitResult,
    WakeupSubscription,
    WorkerInfo,
    WorkerRecord,
)

from ._batches import BatchedWrites
from ._connections import BACKEND, Connections
from ._creates import create_runs
from ._options import DEFAULT_SCHEMA, check_keyword_options, parse_postgres_url, settings
from ._rows import (
    INSERTED,
    LIMITED,
    RATE_DUE,
    claimed_run,
    deadline_param,
    delay_param,
    limit_params,
    step_params,
)
from ._schema import SCHEMA_VERSION, migrate
from ._sql import Statements, channel_name, finish_channel_name, list_runs_query, statements
from .listener import Listener

__all__ = ["PostgresStorage", "parse_postgres_url"]

MAX_CLAIM = 1000
"""One claim takes at most this many runs, so a claim transaction stays short."""

_MAX_LIMIT = 2**63 - 1
"""The largest ``LIMIT`` PostgreSQL takes (a ``bigint``): a larger limit of a
read asks for every row anyway."""


class PostgresStorage:
    """Reflow storage on PostgreSQL 13 or newer.

    Build it with :func:`reflow_core.open_storage` or :meth:`from_url`, or
    directly from a libpq connection string or URL. ``schema`` holds every
    table (created by :meth:`initialize`); ``pool_min_size``/``pool_max_size``
    size the connection pool (give it about as many connections as the
    engine's ``concurrency``, or step saves queue for a connection);
    ``pool_timeout`` is how long an operation waits for a connection before
    failing with :class:`~reflow_core.errors.StorageError`.

    ``notify`` sends a ``NOTIFY`` when work becomes ready or runs end, and
    ``listen`` lets engines on this storage wait for them (one extra
    connection per storage); each works without the other (a producer may
    notify without listening). Turn ``listen`` off behind a transaction-mode
    pooler, where LISTEN does not work, and the engine polls. ``prepare_threshold`` is
    psycopg's (``None`` disables server-side prepared statements, needed
    behind a transaction-mode PgBouncer unless it is 1.21 or newer with
    ``max_prepared_statements`` set). ``clock`` replaces the server clock,
    for tests only. ``connect_kwargs`` are passed to every new connection.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_min_size: int | str = 1,
        pool_max_size: int | str = 10,
        pool_timeout: float | str | timedelta = 10.0,
        notify: bool | str = True,
        listen: bool | str = True,
        prepare_threshold: int | str | None = 5,
        clock: Callable[[], datetime] | None = None,
        connect_kwargs: Mapping[str, Any] | None = None,
        _display_url: str | None = None,
    ) -> None:
        self._settings = settings(
            conninfo,
            schema=schema,
            pool_min_size=pool_min_size,
            pool_max_size=pool_max_size,
            pool_timeout=pool_timeout,
            notify=notify,
            listen=listen,
            prepare_threshold=prepare_threshold,
            clock=clock,
            connect_kwargs=connect_kwargs,
            display_url=_display_url,
        )
        self._schema = self._settings.schema
        self._kwargs = self._settings.kwargs
        self._channel = channel_name(self._schema)
        self._finish_channel = finish_channel_name(self._schema)
        self._sql: Statements = statements(
            self._schema, notify=self._settings.notify, test_clock=clock is not None
        )
        self._db = Connections(self._sql, self._settings)
        self._writes = BatchedWrites(self._db)
        self._listener: Listener | None = None
        self._init_lock: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> PostgresStorage:
        """Build a storage from a ``postgresql://`` URL (see :func:`parse_postgres_url`).

        Keyword ``options`` (the URL options, plus ``clock`` and
        ``connect_kwargs``) win over the same option in the URL.
        """
        conninfo, query, safe = parse_postgres_url(url)
        merged: dict[str, Any] = {**query, **options}
        check_keyword_options(merged)
        return cls(conninfo, _display_url=safe, **merged)

    def __repr__(self) -> str:
        # Redacted whole: a password may equal the schema's name.
        shown = f"PostgresStorage({self._settings.display!r}, schema={self._schema!r})"
        return redact(shown, self._settings.secrets)

    @property
    def schema(self) -> str:
        """The schema that holds Reflow's tables."""
        return self._schema

    @property
    def channel(self) -> str:
        """The ``LISTEN``/``NOTIFY`` channel of this schema."""
        return self._channel

    @property
    def finish_channel(self) -> str:
        """The channel of this schema's finish hints (see :meth:`subscribe_finishes`)."""
        return self._finish_channel

    @property
    def schema_version(self) -> int:
        """The schema version this code writes: once :meth:`initialize`
        returns, the schema is at it (an older one was migrated; a newer one
        was refused)."""
        return SCHEMA_VERSION

    # -- lifecycle ---------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the pool and create or migrate the schema (see :mod:`._schema`).

        Safe when many workers start at once: migrations run in one
        transaction under a transaction-scoped advisory lock, and a worker
        that finds the schema current takes no lock at all. Refuses, changing
        nothing, a schema written by newer code
        (:class:`~reflow_core.errors.SchemaVersionError`) and a schema that
        holds tables that are not Reflow's (:class:`StorageError`).
        """
        self._db.life.check_open()
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if self._db.life.initialized:
                return
            await self._db.open(functools.partial(migrate, schema=self._schema))

    async def close(self) -> None:
        """Stop listening and close the pool. Idempotent."""
        self._db.life.closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        pool, self._db.pool = self._db.pool, None
        if pool is not None:
            await pool.close()

    # -- wake-ups ---------------------------------------------------------------------

    async def subscribe_wakeups(
        self, workflows: Collection[str], wake: Callable[[], None]
    ) -> WakeupSubscription:
        """Call ``wake()`` when work of ``workflows`` may be ready: a run was
        enqueued, handed back or requeued, an event woke a waiting run, or a
        delayed run, a sleep or a wait timeout falls due. Hints only; the
        claim decides.

        All subscriptions of this storage share one listening connection,
        which reconnects by itself (and then wakes everyone, since
        notifications sent meanwhile are lost). With ``listen`` off, the
        subscription never fires and engines rely on polling.
        """
        self._db.life.check("subscribe_wakeups")
        return await self._the_listener().subscribe(workflows, wake)

    async def subscribe_finishes(
        self, notify: Callable[[Collection[str] | None], None]
    ) -> WakeupSubscription:
        """Call ``notify(run_ids)`` with the ids of runs that ended (completed,
        failed or cancelled, in any way and in any process using this
        schema), and ``notify(None)`` when runs may have ended unseen: after
        the connection was subscribed anew, or for a run whose id a hint
        cannot carry (longer than 1000 bytes, or holding a newline).

        The statement that ends runs sends the hint (``NOTIFY`` on
        :attr:`finish_channel`), delivered when it commits: one per run it
        ends, or one per chunk of at most 7900 bytes of ids for a batch. The
        subscription shares the listening connection of
        :meth:`subscribe_wakeups`, which listens to each channel only while
        someone subscribes to it (and reconnects to add one). Hints only:
        the engine reads the runs again. With ``listen`` off the
        subscription never fires; with ``notify`` off this storage's
        statements send no hint (those of storages with it on are heard).
        """
        self._db.life.check("subscribe_finishes")
        return await self._the_listener().subscribe_finishes(notify)

    def _the_listener(self) -> Listener:
        """This storage's listening connection, made on first use (it
        connects once someone subscribes)."""
        if self._listener is None:
            self._listener = Listener(
                conninfo=self._settings.conninfo,
                kwargs=self._kwargs,
                channel=self._channel,
                finish_channel=self._finish_channel,
                next_due=self._next_due,
                secrets=self._settings.secrets,
                enabled=self._settings.listen,
            )
        return self._listener

    async def _next_due(self, workflows: list[str]) -> float | None:
        """Seconds until the next delayed, sleeping or waiting run of ``workflows`` falls due."""

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> float | None:
            cur = await conn.execute(self._sql["next_due"], self._db.params(workflows=workflows))
            row = await cur.fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._db.run("next_due", body, retry=True)

    # -- runs ------------------------------------------------------------------------

    async def create_run(self, new: NewRun) -> CreateResult:
        """Create a pending run, or a delayed one due ``new.delay`` after the
        server's ``now()`` (stored as a run asleep before its first attempt;
        see ``queries.sql``), or at its deadline (``new.deadline`` after
        ``now()``, stored as ``deadline_at``) if that comes first.
        Concurrent creates (many producers, or schedules firing) share one
        statement and one commit; each keeps its own outcome, idempotency
        conflict included."""
        check_new_run(new)
        run_id = new.run_id or new_run_id()
        self._db.life.check("create_run")
        outcome = await self._writes.creates.submit((run_id, new))
        if isinstance(outcome, ReflowError):
            raise outcome
        return outcome

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        """Create ``news`` in one transaction and, usually, one statement:
        one round trip and one commit for the whole batch, each item with
        the outcome ``create_run`` would give it, in order (see
        :mod:`._creates`). A taken run id fails the batch, which writes
        nothing, with a :class:`StorageError` naming the item."""
        check_new_runs(news, backend=BACKEND)
        self._db.life.check("create_runs")
        if not news:
            return []
        return await create_runs(self._db, news)

    async def claim_runs(
        self,
        workflows: Collection[str],
        limit: int,
        lease: timedelta,
        *,
        versions: Mapping[str, Collection[int]] | None = None,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs: lapsed leases first, then due runs by
        priority and due time (see ``claim`` in ``queries.sql``). With
        ``versions``, the statements that serve some versions only
        (``claim_served``, ``claim_limited_served``) pass the runs of the
        other versions over in the same walks of the same indexes, before
        they are locked: they are neither locked, blocked nor changed, and
        never keep a served run from being taken. Without it, the
        statements are those of a claim of every version."""
        served = check_claim_versions(workflows, versions)
        names = [check_text(name, "workflow") for name in workflows]
        check_duration(lease, "lease")
        if limit < 1 or not names:
            return []
        wanted = min(limit, MAX_CLAIM)
        claim_sql = self._sql["claim"]
        limited_sql = self._sql["claim_limited"]
        extra: dict[str, Any] = {}
        if served:
            claim_sql = self._sql["claim_served"]
            limited_sql = self._sql["claim_limited_served"]
            extra["versions"] = json.dumps({name: list(v) for name, v in served.items()})

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[ClaimedRun]:
            claimed: list[ClaimedRun] = []
            probe = True
            passed: list[str] = []  # lapsed leases a full rate keeps, seen already
            while True:
                budget = wanted - len(claimed)
                params = self._db.params(
                    workflows=names, limit=budget, lease=lease, probe=probe, skip=passed, **extra
                )
                rows = await (await conn.execute(claim_sql, params)).fetchall()
                if probe and rows and rows[0][RATE_DUE]:
                    # A rate wait is due: its runs are released before the
                    # claim chooses (see release_rates in schema.sql).
                    await conn.execute(self._sql["release_rates"], self._db.params())
                    probe = False
                    continue
                probe = False
                claimed.extend(claimed_run(row) for row in rows if row[0] is not None)
                limited: list[str] = (rows[0][LIMITED] or []) if rows else []
                budget = wanted - len(claimed)
                if not limited or budget < 1:
                    break
                # The picked runs that hold limits: claimed or blocked under
                # their keys' locks (see claim_limited in schema.sql).
                params = self._db.params(ids=limited, limit=budget, lease=lease, **extra)
                cur = await conn.execute(limited_sql, params)
                taken = [claimed_run(row) for row in await cur.fetchall()]
                claimed.extend(taken)
                if len(taken) == len(limited):
                    break  # none blocked: the claim saw every run it could take
                got = {c.run.id for c in taken}
                passed.extend(run_id for run_id in limited if run_id not in got)
                # Some were blocked (or taken by another claim meanwhile):
                # the runs after them may be claimable, as a claim that
                # passes over blocked runs would find.
            # Lapsed leases first, then by priority (each statement's own
            # rows are in claim order already).
            claimed.sort(key=lambda c: (not c.reclaimed, -c.run.priority))
            return claimed

        # Not retried here: a claim whose reply was lost leaves its runs
        # leased to nobody until the lease lapses; the engine claims again.
        return await self._db.run("claim_runs", body)

    async def heartbeat_run(self, lease: Lease, extend: timedelta) -> bool:
        check_duration(extend, "extend")
        params = self._db.params(id=lease.run_id, epoch=lease.epoch, extend=extend)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(self._sql["heartbeat"], params)
            return cur.rowcount == 1

        return await self._db.run("heartbeat_run", body, retry=True)

    async def save_step_result(self, lease: Lease, step: StepRecord, extend: timedelta) -> bool:
        """Fenced upsert of ``step`` that renews the lease. Concurrent saves (of
        many runs in flight) share one statement and one commit; each is
        fenced on its own."""
        check_text(step.name, "step")
        check_duration(extend, "extend")
        if step.wake_at is not None:
            check_aware(step.wake_at, "step.wake_at")
        self._db.life.check("save_step_result")
        return await self._writes.saves.submit((lease, step, extend))

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
        if step is not None and step.wake_at is not None:
            check_aware(step.wake_at, "step.wake_at")
        self._db.life.check("finish_run")
        return await self._writes.finishes.submit((lease, status, output, error, step))

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
        # A cancel releases the limits of the runs it stops at its end (see
        # end_fenced in queries.sql); other ends in their own statement.
        release = status != "cancelled"
        if lease is None:
            name = "end_unfenced"
            params = self._db.params(id=run_id, status=status, error=error, release=release)
        elif status == "pending":
            name = "hand_back"
            params = self._db.params(id=run_id, epoch=lease.epoch)
        else:
            name = "end_fenced"
            params = self._db.params(
                id=run_id, epoch=lease.epoch, status=status, error=error, release=release
            )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            if status != "cancelled":
                cur = await conn.execute(self._sql[name], params)
                return cur.rowcount == 1
            async with conn.transaction():
                cur = await conn.execute(self._sql[name], params)
                row = await cur.fetchone()
                if row is None:
                    return False
                held: list[str] = [key for key in row[2] or () if key is not None]
                turn_keys: list[str] = []
                turn_maxes: list[int] = []
                # The cascade, until a pass finds nothing more (see cancel_below).
                while True:
                    cur = await conn.execute(self._sql["cancel_below"], params)
                    row = await cur.fetchone()
                    if row is None or not row[0]:
                        break
                    held.extend(row[1] or ())
                    turn_keys.extend(row[2] or ())
                    turn_maxes.extend(row[3] or ())
                if held:
                    await conn.execute(self._sql["release"], self._db.params(keys=held))
                if turn_keys:
                    await conn.execute(
                        self._sql["pass_turn"],
                        self._db.params(keys=turn_keys, maxes=turn_maxes),
                    )
                return True

        return await self._db.run("update_run_status", body)

    async def sleep_run(self, lease: Lease, step: str, duration: timedelta) -> datetime | None:
        check_text(step, "step")
        check_duration(duration, "duration")
        params = self._db.params(id=lease.run_id, epoch=lease.epoch, name=step, duration=duration)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> datetime | None:
            cur = await conn.execute(self._sql["sleep"], params)
            row = await cur.fetchone()
            return None if row is None else as_utc(row[0])

        return await self._db.run("sleep_run", body)

    async def wait_run(
        self, lease: Lease, step: str, event: str, timeout: timedelta | None
    ) -> WaitResult | None:
        check_text(step, "step")
        check_text(event, "event")
        if timeout is not None:
            check_duration(timeout, "timeout")
        params = self._db.params(
            id=lease.run_id, epoch=lease.epoch, name=step, event=event, timeout=timeout
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> WaitResult | None:
            async with conn.transaction():
                cur = await conn.execute(self._sql["lock_fenced"], params)
                if await cur.fetchone() is None:
                    return None
                cur = await conn.execute(self._sql["wait"], params)
                row = await cur.fetchone()
                assert row is not None
                return WaitResult(
                    ready=bool(row[0]), deadline=None if row[1] is None else as_utc(row[1])
                )

        return await self._db.run("wait_run", body)

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
        params = self._db.params(
            id=run_id, event=event, payload=payload, event_id=event_id, cap=max_buffered
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            async with conn.transaction():
                cur = await conn.execute(self._sql["lock_run"], params)
                row = await cur.fetchone()
                if row is None or row[0] in ("completed", "failed", "cancelled"):
                    return False
                cur = await conn.execute(self._sql["deliver"], params)
                outcome = await cur.fetchone()
                assert outcome is not None
                repeated, stored = outcome[0], outcome[1]
                if not repeated and not stored:
                    assert max_buffered is not None
                    raise EventBufferFullError(run_id, event, max_buffered)
                return True

        # With an event id a retry is deduplicated; without one it could
        # deliver twice, so it is left to the caller.
        return await self._db.run("deliver_event", body, retry=event_id is not None)

    async def take_event(self, lease: Lease, step: str, event: str) -> EventTake | None:
        check_text(step, "step")
        check_text(event, "event")
        params = self._db.params(id=lease.run_id, epoch=lease.epoch, name=step, event=event)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> EventTake | None:
            async with conn.transaction():
                cur = await conn.execute(self._sql["lock_fenced"], params)
                if await cur.fetchone() is None:
                    return None
                cur = await conn.execute(self._sql["take"], params)
                row = await cur.fetchone()
                assert row is not None
                done, saved, payload = row
                if done:
                    return EventTake(found=True, payload=saved)
                if payload is None:
                    return EventTake(found=False)
                return EventTake(found=True, payload=payload)

        return await self._db.run("take_event", body, retry=True)

    # -- child runs --------------------------------------------------------------------

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        """Create ``new`` as a child of the run holding ``lease``: one
        statement, fenced on the parent's lease (whose row it locks, so a
        cancel of the parent never misses the child), that sends the same
        wake-up as :meth:`create_run`. A replayed start finds the child it
        created and returns it unchanged."""
        check_child_start(lease, step, new)
        child_id = new.run_id
        assert child_id is not None
        params = self._db.params(
            id=lease.run_id,
            epoch=lease.epoch,
            child=child_id,
            step=step,
            workflow=new.workflow,
            input=new.input,
            delay=delay_param(new),
            deadline=deadline_param(new),
            **limit_params(new),
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> RunRecord | None:
            cur = await conn.execute(self._sql["start_child"], params)
            row = await cur.fetchone()
            assert row is not None
            if not row[INSERTED + 1]:
                return None  # the lease is lost
            if row[0] is not None:
                return run_from_row(row, as_utc)
            existing = await self._db.fetch_run(conn, child_id)
            if existing is not None and child_of(existing, lease.run_id, step):
                return existing
            raise StorageError(
                f"run id {child_id!r} already exists", operation="start_child", backend=BACKEND
            )

        # A retry after a lost reply finds the child its first try created.
        return await self._db.run("start_child", body, retry=True)

    async def wait_children(self, lease: Lease, step: StepRecord) -> bool | None:
        """Fenced: lock the run, then, in a statement that sees every child
        end committed before the lock, save ``step`` and keep the lease (no
        child at the step is open) or wait for the last one to end."""
        check_text(step.name, "step")
        params = self._db.params(
            id=lease.run_id,
            epoch=lease.epoch,
            waiting_for=CHILDREN_WAIT_PREFIX + step.name,
            **step_params(step),
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool | None:
            async with conn.transaction():
                cur = await conn.execute(self._sql["lock_fenced"], params)
                if await cur.fetchone() is None:
                    return None
                cur = await conn.execute(self._sql["wait_children"], params)
                row = await cur.fetchone()
                assert row is not None
                return bool(row[0])

        return await self._db.run("wait_children", body)

    async def list_children(self, run_id: str) -> list[RunRecord]:
        """The run's children, oldest first, through the ``runs_children`` index."""
        check_text(run_id, "run_id")

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[RunRecord]:
            cur = await conn.execute(self._sql["list_children"], {"id": run_id})
            return [run_from_row(row, as_utc) for row in await cur.fetchall()]

        return await self._db.run("list_children", body, retry=True)

    async def now(self) -> datetime:
        """The server's ``now()``: the clock every lease, sleep, wait and due
        schedule is judged by (the test ``clock`` when one is configured)."""
        params = self._db.params()

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> datetime:
            cur = await conn.execute(self._sql["now"], params)
            row = await cur.fetchone()
            assert row is not None
            return as_utc(row[0])

        return await self._db.run("now", body, retry=True)

    async def get_run(self, run_id: str) -> RunRecord | None:
        check_text(run_id, "run_id")

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> RunRecord | None:
            return await self._db.fetch_run(conn, run_id)

        return await self._db.run("get_run", body, retry=True)

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        """The stored runs among ``run_ids``, in the order first given, as
        :meth:`get_run` reads them: one statement (``id = ANY(...)``, served by
        the primary key) in one round trip, whatever the number of ids (at
        most :data:`~reflow_core.storage.MAX_GET_RUNS`). No ids, no read."""
        ids = check_run_ids(run_ids)
        self._db.life.check("get_runs")
        if not ids:
            return {}

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> dict[str, RunRecord]:
            cur = await conn.execute(self._sql["get_runs"], {"ids": ids})
            found = {row[0]: run_from_row(row, as_utc) for row in await cur.fetchall()}
            return {run_id: found[run_id] for run_id in ids if run_id in found}

        return await self._db.run("get_runs", body, retry=True)

    async def get_step_results(self, run_id: str) -> dict[str, StepRecord]:
        check_text(run_id, "run_id")

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> dict[str, StepRecord]:
            cur = await conn.execute(self._sql["get_steps"], {"id": run_id})
            return {row[0]: step_from_row(row, as_utc) for row in await cur.fetchall()}

        return await self._db.run("get_step_results", body, retry=True)

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
        after = decode_cursor(cursor) if cursor is not None else None
        params: dict[str, Any] = {"limit": limit + 1}
        if status is not None:
            params["statuses"] = list(status)
            params["stored"] = sorted({"sleeping" if s == "delayed" else s for s in status})
        if workflow is not None:
            params["workflow"] = workflow
        if after is not None:
            params["after_at"], params["after_id"] = after
        query = list_runs_query(self._sql, params)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> RunPage:
            cur = await conn.execute(query, params)
            return run_page([run_from_row(row, as_utc) for row in await cur.fetchall()], limit)

        return await self._db.run("list_runs", body, retry=True)

    async def requeue_run(self, run_id: str) -> bool:
        check_text(run_id, "run_id")
        params = self._db.params(id=run_id)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(self._sql["requeue"], params)
            return cur.rowcount == 1

        return await self._db.run("requeue_run", body)

    async def purge_finished(
        self, older_than: timedelta, *, batch: int = 1000, limit: int | None = None
    ) -> int:
        """Delete runs that finished (completed, failed or cancelled) more than
        ``older_than`` ago, oldest first, with their steps and events,
        ``batch`` runs per transaction and at most ``limit`` runs in all
        (``None``: every one due). Returns how many runs were deleted.

        Safe to run from several processes at once and while workers are
        busy: it skips rows another transaction holds. Idempotency keys of
        deleted runs become free again, so keep finished runs for longer than
        any client may retry an enqueue.
        """
        batch = check_purge(older_than, batch)
        limit = check_purge_limit(limit)

        async def delete(size: int) -> tuple[int, bool]:
            params = self._db.params(age=older_than, limit=size)

            async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> int:
                cur = await conn.execute(self._sql["purge"], params)
                return cur.rowcount

            deleted = await self._db.run("purge_finished", body, retry=True)
            return deleted, deleted >= size

        return await purge_in_batches(delete, batch, limit)

    # -- schedules -----------------------------------------------------------------

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        check_text(spec.key, "key")
        check_text(spec.workflow, "workflow")
        params = self._db.params(
            key=spec.key,
            workflow=spec.workflow,
            input=spec.input,
            recurrence=spec.recurrence,
            next_run_at=check_aware(spec.next_run_at, "next_run_at"),
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> ScheduleRecord:
            cur = await conn.execute(self._sql["upsert_schedule"], params)
            row = await cur.fetchone()
            assert row is not None
            return schedule_from_row(row, as_utc)

        return await self._db.run("upsert_schedule", body, retry=True)

    async def delete_schedule(self, key: str) -> bool:
        check_text(key, "key")

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(self._sql["delete_schedule"], {"key": key})
            return cur.rowcount == 1

        return await self._db.run("delete_schedule", body)

    async def list_schedules(self) -> list[ScheduleRecord]:
        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[ScheduleRecord]:
            cur = await conn.execute(self._sql["list_schedules"])
            return [schedule_from_row(row, as_utc) for row in await cur.fetchall()]

        return await self._db.run("list_schedules", body, retry=True)

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        """With ``workflows``, the due schedules of those workflows only, each
        read from its own range of an index, so due schedules of other
        workflows, however many, cost nothing."""
        names = check_stats_workflows(workflows)
        if limit < 1 or names == []:
            return []
        if names is None:
            name, params = "due_schedules", self._db.params(limit=limit)
        else:
            name, params = "due_schedules_of", self._db.params(limit=limit, workflows=names)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[ScheduleRecord]:
            cur = await conn.execute(self._sql[name], params)
            return [schedule_from_row(row, as_utc) for row in await cur.fetchall()]

        return await self._db.run("due_schedules", body, retry=True)

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        check_text(key, "key")
        check_new_run(run)
        params = self._db.params(
            key=key,
            slot=check_aware(slot, "slot"),
            next_run_at=check_aware(next_run_at, "next_run_at"),
            id=run.run_id or new_run_id(),
            workflow=run.workflow,
            input=run.input,
            idem=run.idempotency_key,
            delay=delay_param(run),
            deadline=deadline_param(run),
            **limit_params(run),
        )

        slot_statement = "claim_slot" if run.debounce_key is None else "claim_slot_debounced"

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> RunRecord | None:
            async with conn.transaction():
                cur = await conn.execute(self._sql[slot_statement], params)
                row = await cur.fetchone()
                if row is None:
                    return None
                record = run_from_row(row, as_utc)
                if not row[INSERTED] and run.debounce_key is None and record.input != run.input:
                    assert run.idempotency_key is not None
                    raise IdempotencyConflictError(run.workflow, run.idempotency_key, record.id)
                return record

        return await self._db.run("claim_schedule_slot", body)

    async def set_schedule_paused(
        self, key: str, paused: bool, *, next_run_at: datetime | None = None
    ) -> ScheduleRecord | None:
        check_text(key, "key")
        if next_run_at is not None:
            check_aware(next_run_at, "next_run_at")
        params = self._db.params(key=key, paused=bool(paused), next_run_at=next_run_at)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> ScheduleRecord | None:
            cur = await conn.execute(self._sql["set_schedule_paused"], params)
            row = await cur.fetchone()
            return None if row is None else schedule_from_row(row, as_utc)

        # Setting the flag (and the slot) again is harmless.
        return await self._db.run("set_schedule_paused", body, retry=True)

    # -- workers and queue statistics ------------------------------------------------

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        """Enter or refresh ``worker``: one statement, which also deletes
        the entries of other workers that have lapsed."""
        check_worker(worker, ttl)
        params = self._db.params(
            id=worker.id,
            host=worker.host,
            pid=worker.pid,
            workflows=encode_workflows(worker.workflows),
            concurrency=worker.concurrency,
            in_flight=worker.in_flight,
            ttl=ttl,
        )

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> WorkerRecord:
            cur = await conn.execute(self._sql["announce_worker"], params)
            row = await cur.fetchone()
            assert row is not None
            return worker_from_row(row, as_utc)

        # A retried announcement only refreshes the entry again.
        return await self._db.run("announce_worker", body, retry=True)

    async def list_workers(self) -> list[WorkerRecord]:
        params = self._db.params()

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[WorkerRecord]:
            cur = await conn.execute(self._sql["list_workers"], params)
            return [worker_from_row(row, as_utc) for row in await cur.fetchall()]

        return await self._db.run("list_workers", body, retry=True)

    async def remove_worker(self, worker_id: str) -> bool:
        check_text(worker_id, "worker_id")
        params = self._db.params(id=worker_id)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(self._sql["remove_worker"], params)
            row = await cur.fetchone()
            return row is not None and bool(row[0])

        return await self._db.run("remove_worker", body)

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        """Counts of unfinished runs read through the partial indexes that
        hold only them (``runs_due`` and ``runs_running``), so finished
        history costs nothing."""
        names = check_stats_workflows(workflows)
        if names is None:
            name, params = "queue_stats", self._db.params()
        else:
            name, params = "queue_stats_of", self._db.params(workflows=names)

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[QueueStats]:
            cur = await conn.execute(self._sql[name], params)
            rows = [
                (row[0], row[1], int(row[2]), None if row[3] is None else as_utc(row[3]))
                for row in await cur.fetchall()
            ]
            return queue_stats_from_counts(rows, names)

        return await self._db.run("queue_stats", body, retry=True)

    # -- dashboard reads ---------------------------------------------------------------

    async def find_runs_by_key(self, idempotency_key: str, *, limit: int = 20) -> list[RunRecord]:
        """The runs created with ``idempotency_key``, of every workflow,
        newest first: one walk of the ``runs_key_created`` index, stopped at
        ``limit``."""
        check_text(idempotency_key, "idempotency_key")
        params = {"key": idempotency_key, "limit": min(check_count(limit, "limit"), _MAX_LIMIT)}

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[RunRecord]:
            cur = await conn.execute(self._sql["find_by_key"], params)
            return [run_from_row(row, as_utc) for row in await cur.fetchall()]

        return await self._db.run("find_runs_by_key", body, retry=True)

    async def list_buffered_events(self, run_id: str, *, limit: int = 100) -> list[BufferedEvent]:
        """The run's untaken events in arrival order, read through the
        partial index ``events_buffered`` (a finished run holds none: its
        end dropped them)."""
        check_text(run_id, "run_id")
        params = {"id": run_id, "limit": min(check_count(limit, "limit"), _MAX_LIMIT)}

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[BufferedEvent]:
            cur = await conn.execute(self._sql["list_buffered"], params)
            return [
                BufferedEvent(event=name, payload=payload, event_id=event_id)
                for name, payload, event_id in await cur.fetchall()
            ]

        return await self._db.run("list_buffered_events", body, retry=True)

    async def finished_history(self, minutes: int) -> list[FinishedMinute]:
        """Runs finished per minute, by status, over the last ``minutes``
        minutes of the storage clock (the server's ``now()``, or the test
        clock), counted in one range of the ``runs_finished`` index:
        ``finished_at``, which the statement that ends a run sets, is when it
        finished."""
        params = self._db.params(minutes=check_count(minutes, "minutes", most=MAX_HISTORY_MINUTES))

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[FinishedMinute]:
            cur = await conn.execute(self._sql["finished_history"], params)
            rows = [
                (as_utc(minute), str(status), int(count))
                for minute, status, count in await cur.fetchall()
            ]
            return finished_minutes_from_counts(rows)

        return await self._db.run("finished_history", body, retry=True)
