"""Growth: claim latency and drain rate as the store grows, a worker's memory
over 200,000 runs, and the bytes a finished run takes, per backend.

    python benchmarks/growth.py [--backends sqlite postgres redis]
                                [--pending 10000 100000 1000000]
                                [--finished 1000000 10000000]
                                [--runs 2000] [--passes 3] [--claims 200]
                                [--memory-runs 200000] [--memory-backends sqlite postgres]
                                [--parts pending finished bytes memory]
                                [--redis-url redis://127.0.0.1:6379/0] [--redis-max-gib 6]
                                [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
                                [--tmp /tmp] [--out benchmarks/results] [--quick]
    python benchmarks/growth.py --plot-only FILE[:BACKENDS] [FILE[:BACKENDS] ...]

Plots need matplotlib, a benchmark-only dependency group: run it with
``python3 -m uv run --group bench python benchmarks/growth.py``. Without
it the figures are measured, printed and written to ``growth.json`` all
the same, and ``--plot-only growth.json`` draws them later; given several
files, ``--plot-only`` merges them (a later file's series replace an
earlier one's; ``FILE:sqlite,redis`` takes only those backends' figures)
into ``growth.json`` beside the first.

Each point is measured on a fresh store (a new SQLite file, a new PostgreSQL
schema, a new Redis key prefix), dropped afterwards, holding one of two
shapes next to the runs it measures:

* ``pending``: a backlog of N pending runs of the same workflow as the
  measured runs (``bench-5``, the shared workload of ``throughput.py``),
  created *after* them. Claims take due runs oldest first, so every claim
  and every drained run comes from the front of the queue while the N runs
  wait behind it: the point is what a long queue costs the runs at its head
  (a backlog of other workflows is the sibling question of issue #21).
* ``finished``: a history of N completed runs of that same workflow, each
  with its five step records, created over the 30 days before the measured
  runs.

The measured runs (the front) are ``bench-5`` runs enqueued for the
point: enough for the claims and the passes below, 13,325 with the
defaults, so even the baseline has a queue of its own. Size 0 is each
shape's baseline (the front alone); it is measured again after the largest
size, as a check of how much the shared machine drifted meanwhile, and the
1-minute load average before and after each point is recorded. At each
point:

* claim latency: ``--claims`` (200) calls of ``storage.claim_runs([wf],
  25, 60s)`` after 5 untimed ones, each timed alone, each claiming 25 front
  runs that are then finished with ``finish_run`` (not timed), so nothing
  piles up as running; p50 and p99;
* steps/s: after an untimed engine has completed 200 runs, ``--passes`` (3)
  passes of one ``Engine`` (concurrency 25) started on the loaded store and
  timed from its start to its ``--runs``-th (2000) completed run. The runs
  it completes are the oldest due ones: front runs. Near the end of a pass
  with a backlog, free slots may take backlog runs (the same workflow, the
  same work) while the last front runs finish, which is why the figure
  counts completions of any run: a fixed number of completions of identical
  runs, with no pass ever short of work (every pass leaves front runs behind).

Seeding. Enqueueing and draining ten million runs through the engine would
take hours, so the store is seeded in bulk, with records made from one real
run: a template run is made through the real path (``create_run`` for a
pending run; for a finished one an ``Engine`` runs a ``bench-5`` run), then
copied inside the store:

* SQLite and PostgreSQL: ``INSERT ... SELECT`` over a plan of new run ids
  (26 characters of Crockford base32, the copy's creation millisecond then
  80 random bits, as ``reflow_core.adapter.new_run_id`` makes them) and
  time shifts, copying every column of the template's ``runs`` row and its
  ``steps`` rows (the column lists read from the catalog, so a column added
  by a later migration is copied too) with the id replaced and every
  timestamp shifted by the copy's shift, in creation order; steps keep their
  order within a run. No other table gains a row from a run (checked).
* Redis: every key under the prefix is read before and after the template
  is made; what the template added that names its id (its run and steps
  hashes, its members of the index sorted sets, its fields of shared
  hashes) is replayed for each copy with pipelined commands, the id
  replaced and every time that lies within the template's making shifted
  (key names, field values, members and scores alike); what it added that
  does not name it (the set of workflows, the worker registry) is shared
  by every copy and already there.

Pending copies are created one microsecond apart after the template, so
they are due behind the front; finished copies are spread evenly over the
30 days before the template. After seeding, PostgreSQL tables are
``ANALYZE``\\ d (as autovacuum would, were it on) and a ``CHECKPOINT`` flushes
the seeding's writes (the user needs the right to run it); every store is checked
through the storage API: ``queue_stats`` counts the pending runs exactly;
the newest page of ``list_runs`` (and the page after it) holds copies equal
to the template field for field (id and times aside, the times shifted by
one amount, the id's time part the copy's creation millisecond), with the
same step records; ``finished_history`` counts exactly the copies that
finished in its last day; a claim that reaches the backlog gets copies
that look like a claimed template.

Redis keeps everything in memory: the seeding stops before ``used_memory``
(or the RSS) passes ``--redis-max-gib`` (6 GiB), and a size that would not
fit at the bytes per run the previous size measured is cut to the largest
whole 500,000 runs that fit; the results say so.

Storage bytes per finished run: the store's size (SQLite: (page_count -
freelist_count) * page_size; PostgreSQL: pg_total_relation_size of every
table of the schema, indexes and TOAST included; Redis: INFO used_memory)
before and after: ``organic``, 2000 five-step runs enqueued and drained by
an engine (PostgreSQL ``VACUUM``\\ ed afterwards, so dead row versions count
as the free space they leave); ``seeded``, the copies of each finished size.

Worker memory: a worker process of its own (this script, run again) with
one engine (concurrency 25) drains ``--memory-runs`` (200,000) one-step
runs, which this process enqueues in waves of ``--memory-wave`` (10,000)
while it runs (the next wave once a quarter of the last is done); the
worker samples its resident set size (``/proc/self/statm``) every
``--memory-every`` (2,000) completed runs.

Output in ``--out`` (``benchmarks/results``): ``growth.json`` (every figure,
raw), ``growth-claim-latency.png``, ``growth-steps.png``,
``worker-memory.png``, and the tables printed as Markdown. ``--quick`` uses
small sizes (a smoke check in seconds) and writes to
``/tmp/reflow-growth-quick`` unless ``--out`` is given.

PostgreSQL: a database of its own (``reflow_growth_<pid>``) on the server of
``--postgres-url``, dropped at the end, also on failure, Ctrl-C or SIGTERM
(a SIGTERM that arrives while an engine is stopping may be swallowed by
``Engine.stop()``; see ``benchmarks/results/README.md``). Redis: key prefixes
``reflow_growth_<pid>_<n>`` on ``--redis-url``, deleted after each point;
on a shared server, a database of its own (``redis://127.0.0.1:6379/1``)
keeps millions of seeded keys out of other clients' ``SCAN``\\ s. SQLite:
files under ``--tmp`` (``/tmp``), deleted after each point. Ten million
finished runs take about 9 GB on disk in SQLite and 11 GB (and their WAL)
in PostgreSQL while they last. A point that fails because a server went
away (a restart) is measured again, once, on a fresh store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql
from throughput import (
    DEFAULT_REDIS_URL,
    add_postgres_options,
    build_workflow,
    cancel_on_sigterm,
    libpq_url,
    redis_settings,
    scratch_database,
    server_settings,
    with_options,
)

from reflow_core import Engine, codec, open_storage
from reflow_core.adapter import from_epoch_us, to_epoch_us
from reflow_core.errors import StorageError
from reflow_core.storage import (
    MAX_CREATE_BATCH,
    NewRun,
    RunRecord,
    RunStatus,
    StepRecord,
    Storage,
)

Shape = Literal["pending", "finished"]

STEPS = 5
"""Steps of the measured workflow (``throughput.build_workflow``'s ``bench-5``)."""
CONCURRENCY = 25
CLAIM_BATCH = 25
LEASE = timedelta(seconds=60)
WARM_CLAIMS = 5
WARM_RUNS = 200
"""Runs an untimed engine completes before the timed passes of a point."""
HISTORY_SPAN_US = 30 * 86_400 * 1_000_000
"""Finished copies are created over the 30 days before their template."""
CHUNK = 1_000_000
"""Runs copied per SQL statement (one transaction each)."""
REDIS_CHUNK = 2_000
"""Copies per Redis pipeline."""
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
STEP_OUTPUT = codec.encode({"i": 1})
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def ulid(ms: int, rand: int) -> str:
    """A run id in ``reflow_core.adapter.new_run_id``'s layout: 48-bit
    millisecond time, 80 random bits, 26 Crockford base32 characters."""
    v = ms << 80 | rand
    return "".join(CROCKFORD[(v >> (5 * (25 - i))) & 31] for i in range(26))


def ulid_ms(run_id: str) -> int:
    v = 0
    for ch in run_id[:10]:
        v = v * 32 + CROCKFORD.index(ch)
    return v


def us(at: datetime) -> int:
    return to_epoch_us(at, "time")


# -- enqueueing and counting completions -----------------------------------------------


async def enqueue(storage: Storage, workflow: str, count: int, start: int = 0) -> list[str]:
    """Create ``count`` runs of ``workflow`` as ``Engine.enqueue`` would (input
    ``{"n": i}``), with ``create_runs`` where the backend has it, else with
    concurrent ``create_run`` calls (which the backends group); their ids."""
    ids: list[str] = []
    batched = getattr(type(storage), "create_runs", None) is not None
    for lo in range(start, start + count, MAX_CREATE_BATCH // 2):
        news = [
            NewRun(workflow=workflow, input=codec.encode({"n": i}))
            for i in range(lo, min(start + count, lo + MAX_CREATE_BATCH // 2))
        ]
        if batched:
            outcomes = await storage.create_runs(news)
        else:
            outcomes = list(await asyncio.gather(*(storage.create_run(n) for n in news)))
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
            ids.append(outcome.run.id)
    return ids


class Completions:
    """Counts the runs a storage's ``finish_run`` completes (the instance's
    method wrapped until :meth:`close`); :meth:`reached` waits for a count."""

    def __init__(self, storage: Storage, on_finish: Callable[[int], None] | None = None) -> None:
        self.storage = storage
        self.done = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []
        original = storage.finish_run

        async def finish_run(*args: Any, **kwargs: Any) -> bool:
            ok = await original(*args, **kwargs)
            if ok:
                self.done += 1
                if on_finish is not None:
                    on_finish(self.done)
                for goal, event in self._waiters:
                    if self.done >= goal:
                        event.set()
            return ok

        storage.finish_run = finish_run  # type: ignore[method-assign]

    async def reached(self, goal: int) -> None:
        if self.done >= goal:
            return
        event = asyncio.Event()
        self._waiters.append((goal, event))
        await event.wait()
        self._waiters.remove((goal, event))

    def close(self) -> None:
        del self.storage.finish_run


def make_engine(storage: Storage, wf: Any) -> Engine:
    return Engine(
        storage=storage,
        workflows=[wf],
        concurrency=CONCURRENCY,
        lease="60s",
        poll_interval="50ms",
        load_entry_points=False,
        close_storage=False,
    )


SLOW_STOP = 15.0
"""An ``Engine.stop()`` slower than this is logged and reported with the point."""


async def stop_engine(engine: Engine) -> float:
    """``engine.stop()``, timed (untimed for the figures); a slow one is logged."""
    started = time.perf_counter()
    stopping = asyncio.ensure_future(engine.stop())
    finished, _ = await asyncio.wait({stopping}, timeout=SLOW_STOP)
    if not finished:
        log(f"  Engine.stop() has not returned after {SLOW_STOP:.0f}s; still waiting for it")
    await stopping
    return time.perf_counter() - started


async def drain(storage: Storage, wf: Any, runs: int, stops: list[float] | None = None) -> float:
    """Steps/s of one engine from its start to the ``runs``-th completion;
    how long its ``stop()`` took is appended to ``stops``."""
    done = Completions(storage)
    engine = make_engine(storage, wf)
    try:
        started = time.perf_counter()
        await engine.start()
        await done.reached(runs)
        elapsed = time.perf_counter() - started
        stopped = await stop_engine(engine)
        if stops is not None:
            stops.append(stopped)
    finally:
        done.close()
    return runs * STEPS / elapsed


async def claim_latencies(storage: Storage, workflow: str, claims: int) -> list[float]:
    """``claims`` timed ``claim_runs`` calls (after untimed ones), in ms; each
    claimed run is finished straight away (untimed)."""
    times: list[float] = []
    step = StepRecord(name="s0", status="completed", output=STEP_OUTPUT)
    for i in range(WARM_CLAIMS + claims):
        started = time.perf_counter()
        got = await storage.claim_runs([workflow], CLAIM_BATCH, LEASE)
        elapsed = time.perf_counter() - started
        if len(got) != CLAIM_BATCH:
            raise RuntimeError(f"a claim got {len(got)} runs, expected {CLAIM_BATCH}")
        finished = await asyncio.gather(
            *(storage.finish_run(c.lease, "completed", output=STEP_OUTPUT, step=step) for c in got)
        )
        if not all(finished):
            raise RuntimeError("a claimed run could not be finished")
        if i >= WARM_CLAIMS:
            times.append(elapsed * 1000)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- the stores ------------------------------------------------------------------------


@dataclass
class Plan:
    """Copies ``j = 0 .. count - 1`` of a template, copy ``j`` shifted by
    ``first + j * step`` microseconds (creation order is ``j``'s)."""

    count: int
    first: int
    step: int

    def shift(self, j: int) -> int:
        return self.first + j * self.step


class Store:
    """One backend's fresh store for one point: its storage, its size, bulk copies."""

    name = ""
    storage: Storage
    capped = False
    """Redis: fewer runs were seeded than asked for, to stay under the memory cap."""

    def storage_url(self) -> str:
        """The URL of this store, for another process."""
        raise NotImplementedError

    async def open(self) -> None:
        raise NotImplementedError

    async def reopen(self) -> None:
        """Close and open the storage again (SQLite seeds while it is closed)."""

    async def size(self) -> int:
        raise NotImplementedError

    async def before_template(self) -> None:
        """Note what the store holds, to find what a template adds."""

    async def copy(self, template: str, plan: Plan) -> int:
        """Copy run ``template`` (and its steps) per ``plan``; how many copies were made."""
        raise NotImplementedError

    async def settle(self) -> None:
        """After seeding: what a live store's maintenance would have done."""

    async def vacuum(self) -> None:
        """Reclaim dead row versions for reuse (PostgreSQL)."""

    async def count(self, status: str) -> int:
        """Runs of ``status`` in the store, read directly (for the report)."""
        raise NotImplementedError

    async def explain_claim(self, workflow: str) -> str:
        return ""

    async def drop(self) -> None:
        raise NotImplementedError


# SQLite ---------------------------------------------------------------------------------


def sqlite_crockford(expr: str, chars: int) -> str:
    return " || ".join(
        f"substr('{CROCKFORD}', ((({expr}) >> {5 * (chars - 1 - i)}) & 31) + 1, 1)"
        for i in range(chars)
    )


def quoted(name: str) -> str:
    """An SQLite identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


class SQLiteStore(Store):
    name = "sqlite"

    def __init__(self, tmp: Path, n: int) -> None:
        self.path = tmp / f"growth-{n}.db"

    def storage_url(self) -> str:
        return f"sqlite:///{self.path}?synchronous=NORMAL"

    def _open_storage(self) -> Storage:
        return open_storage(self.storage_url())

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)

    async def open(self) -> None:
        self.storage = self._open_storage()
        await self.storage.initialize()
        self._counts: dict[str, int] = {}

    async def reopen(self) -> None:
        await self.storage.close()
        self.storage = self._open_storage()
        await self.storage.initialize()

    async def size(self) -> int:
        with contextlib.closing(self._connect()) as con:
            pages = con.execute("PRAGMA page_count").fetchone()[0]
            free = con.execute("PRAGMA freelist_count").fetchone()[0]
            size = con.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def _table_counts(self, con: sqlite3.Connection) -> dict[str, int]:
        tables = [
            r[0]
            for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}

    async def before_template(self) -> None:
        with contextlib.closing(self._connect()) as con:
            self._counts = self._table_counts(con)

    async def copy(self, template: str, plan: Plan) -> int:
        await self.storage.close()
        try:
            return await asyncio.to_thread(self._copy, template, plan)
        finally:
            self.storage = self._open_storage()
            await self.storage.initialize()

    def _copy(self, template: str, plan: Plan) -> int:
        with contextlib.closing(self._connect()) as con:
            grown = {
                t: n - self._counts.get(t, 0)
                for t, n in self._table_counts(con).items()
                if n != self._counts.get(t, 0)
            }
            unexpected = set(grown) - {"runs", "steps", "workers"}
            if unexpected:
                raise RuntimeError(f"the template run wrote rows to {sorted(unexpected)}")
            if plan.count == 0:
                return 0
            con.execute("PRAGMA synchronous = OFF")
            con.execute("PRAGMA cache_size = -262144")
            con.execute("PRAGMA temp_store = MEMORY")
            created = con.execute(
                "SELECT created_at FROM runs WHERE id = ?", (template,)
            ).fetchone()[0]
            run_cols = [r[1] for r in con.execute("PRAGMA table_info(runs)")]
            step_cols = [r[1] for r in con.execute("PRAGMA table_info(steps)")]

            def values(cols: list[str], id_column: str) -> str:
                out = []
                for c in cols:
                    if c == id_column:
                        out.append("p.id")
                    elif c.endswith("_at"):
                        out.append(f"t.{quoted(c)} + p.shift")
                    else:
                        out.append(f"t.{quoted(c)}")
                return ", ".join(out)

            id_expr = (
                f"{sqlite_crockford('ms', 10)} || {sqlite_crockford('r1', 8)}"
                f" || {sqlite_crockford('r2', 8)}"
            )
            made = 0
            for lo in range(0, plan.count, CHUNK):
                hi = min(plan.count, lo + CHUNK)
                con.execute("BEGIN IMMEDIATE")
                con.execute("DROP TABLE IF EXISTS temp.growth_draw")
                con.execute("DROP TABLE IF EXISTS temp.growth_plan")
                con.execute(
                    "CREATE TEMP TABLE growth_draw AS"
                    " WITH RECURSIVE s(g) AS (SELECT ? UNION ALL SELECT g + 1 FROM s WHERE g < ?)"
                    " SELECT g, ? + g * ? AS shift, (? + ? + g * ?) / 1000 AS ms,"
                    " random() & 1099511627775 AS r1, random() & 1099511627775 AS r2 FROM s",
                    (lo, hi - 1, plan.first, plan.step, created, plan.first, plan.step),
                )
                con.execute(
                    "CREATE TEMP TABLE growth_plan AS"
                    f" SELECT g, {id_expr} AS id, shift FROM growth_draw ORDER BY g"
                )
                rc = con.execute(
                    f"INSERT INTO runs ({', '.join(map(quoted, run_cols))})"
                    f" SELECT {values(run_cols, 'id')} FROM growth_plan AS p"
                    " CROSS JOIN (SELECT * FROM runs WHERE id = ?) AS t ORDER BY p.g",
                    (template,),
                ).rowcount
                con.execute(
                    f"INSERT INTO steps ({', '.join(map(quoted, step_cols))})"
                    f" SELECT {values(step_cols, 'run_id')} FROM growth_plan AS p"
                    " CROSS JOIN (SELECT rowid AS growth_rowid, * FROM steps WHERE run_id = ?) AS t"
                    " ORDER BY p.g, t.growth_rowid",
                    (template,),
                )
                con.execute("DROP TABLE temp.growth_draw")
                con.execute("DROP TABLE temp.growth_plan")
                con.execute("COMMIT")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                made += rc
                log(f"  sqlite: {made:,} of {plan.count:,} copies")
            return made

    async def count(self, status: str) -> int:
        with contextlib.closing(self._connect()) as con:
            if status == "completed":
                # Through runs_finished: every run that finishes here completes.
                return int(
                    con.execute(
                        "SELECT count(*) FROM runs WHERE finished_at IS NOT NULL"
                    ).fetchone()[0]
                )
            return int(
                con.execute("SELECT count(*) FROM runs WHERE status = ?", (status,)).fetchone()[0]
            )

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            await self.storage.close()
        for suffix in ("", "-wal", "-shm"):
            await asyncio.to_thread(Path(f"{self.path}{suffix}").unlink, missing_ok=True)


# PostgreSQL --------------------------------------------------------------------------


def pg_crockford(expr: str, chars: int) -> str:
    return " || ".join(
        f"substr('{CROCKFORD}', ((({expr}) >> {5 * (chars - 1 - i)}) & 31)::int + 1, 1)"
        for i in range(chars)
    )


class PostgresStore(Store):
    name = "postgres"

    def __init__(self, database_url: str, n: int, pool_size: int) -> None:
        self.url = database_url
        self.schema = f"growth_{n}"
        self.pool_size = pool_size

    def storage_url(self) -> str:
        return with_options(self.url, schema=self.schema, pool_max_size=self.pool_size)

    async def _conn(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(libpq_url(self.url), autocommit=True)

    async def open(self) -> None:
        self.storage = open_storage(self.storage_url())
        await self.storage.initialize()
        self._counts: dict[str, int] = {}

    async def _tables(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        cur = await conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (self.schema,)
        )
        return [str(r[0]) for r in await cur.fetchall()]

    async def _table_counts(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
        counts = {}
        for t in await self._tables(conn):
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(self.schema), sql.Identifier(t)
                )
            )
            row = await cur.fetchone()
            assert row is not None
            counts[t] = int(row[0])
        return counts

    async def size(self) -> int:
        async with await self._conn() as conn:
            cur = await conn.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relkind IN ('r', 'm')",
                (self.schema,),
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def before_template(self) -> None:
        async with await self._conn() as conn:
            self._counts = await self._table_counts(conn)

    async def _columns(
        self, conn: psycopg.AsyncConnection[Any], table: str
    ) -> list[tuple[str, str]]:
        cur = await conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s AND is_identity = 'NO'"
            " AND is_generated = 'NEVER' ORDER BY ordinal_position",
            (self.schema, table),
        )
        return [(str(name), str(kind)) for name, kind in await cur.fetchall()]

    def _insert(
        self, table: str, cols: list[tuple[str, str]], id_column: str, order: str
    ) -> sql.Composed:
        schema = sql.Identifier(self.schema)
        values: list[sql.Composable] = []
        for name, kind in cols:
            if name == id_column:
                values.append(sql.SQL("p.id"))
            elif kind == "timestamp with time zone":
                values.append(sql.SQL("t.{} + p.shift").format(sql.Identifier(name)))
            else:
                values.append(sql.SQL("t.{}").format(sql.Identifier(name)))
        return sql.SQL(
            "INSERT INTO {schema}.{table} ({targets}) SELECT {values}"
            " FROM {schema}.growth_plan AS p CROSS JOIN"
            " (SELECT * FROM {schema}.{table} WHERE {id_column} = %(template)s) AS t"
            " ORDER BY {order}"
        ).format(
            schema=schema,
            table=sql.Identifier(table),
            targets=sql.SQL(", ").join(sql.Identifier(n) for n, _ in cols),
            values=sql.SQL(", ").join(values),
            id_column=sql.Identifier(id_column),
            order=sql.SQL(order),
        )

    async def copy(self, template: str, plan: Plan) -> int:
        schema = sql.Identifier(self.schema)
        id_expr = f"{pg_crockford('ms', 10)} || {pg_crockford('r1', 8)} || {pg_crockford('r2', 8)}"
        async with await self._conn() as conn:
            counts = await self._table_counts(conn)
            grown = {t for t, n in counts.items() if n != self._counts.get(t, 0)}
            unexpected = grown - {"runs", "steps", "workers", "reflow_schema"}
            if unexpected:
                raise RuntimeError(f"the template run wrote rows to {sorted(unexpected)}")
            if plan.count == 0:
                return 0
            await conn.execute("SET synchronous_commit = off")
            cur = await conn.execute(
                sql.SQL("SELECT created_at FROM {}.runs WHERE id = %s").format(schema), (template,)
            )
            row = await cur.fetchone()
            assert row is not None
            created: datetime = row[0]
            runs = self._insert("runs", await self._columns(conn, "runs"), "id", "p.g")
            steps = self._insert(
                "steps", await self._columns(conn, "steps"), "run_id", "p.g, t.seq"
            )
            made = 0
            for lo in range(0, plan.count, CHUNK):
                hi = min(plan.count, lo + CHUNK)
                await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}.growth_plan").format(schema))
                await conn.execute(
                    sql.SQL(
                        "CREATE UNLOGGED TABLE {schema}.growth_plan AS"
                        " SELECT g, {id_expr} AS id, shift FROM ("
                        "  SELECT g, shift,"
                        "   floor(extract(epoch FROM %(created)s::timestamptz + shift) * 1000)"
                        "    ::bigint AS ms,"
                        "   (random() * 1099511627776)::bigint & 1099511627775 AS r1,"
                        "   (random() * 1099511627776)::bigint & 1099511627775 AS r2 FROM ("
                        "    SELECT g, (%(first)s::bigint + g * %(step)s::bigint)"
                        "     * interval '1 microsecond' AS shift"
                        "    FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g) AS a) AS b"
                    ).format(schema=schema, id_expr=sql.SQL(id_expr)),
                    {
                        "created": created,
                        "first": plan.first,
                        "step": plan.step,
                        "lo": lo,
                        "hi": hi - 1,
                    },
                )
                async with conn.transaction():
                    cur = await conn.execute(runs, {"template": template})
                    made += cur.rowcount
                    await conn.execute(steps, {"template": template})
                await conn.execute(sql.SQL("DROP TABLE {}.growth_plan").format(schema))
                log(f"  postgres: {made:,} of {plan.count:,} copies")
        return made

    async def settle(self) -> None:
        """ANALYZE the tables (autovacuum would have), and CHECKPOINT, so that
        the seeding's writes are not being flushed while the point is measured."""
        async with await self._conn() as conn:
            for table in await self._tables(conn):
                await conn.execute(
                    sql.SQL("ANALYZE {}.{}").format(
                        sql.Identifier(self.schema), sql.Identifier(table)
                    )
                )
            await conn.execute("CHECKPOINT")

    async def vacuum(self) -> None:
        async with await self._conn() as conn:
            for table in await self._tables(conn):
                await conn.execute(
                    sql.SQL("VACUUM (ANALYZE) {}.{}").format(
                        sql.Identifier(self.schema), sql.Identifier(table)
                    )
                )

    async def count(self, status: str) -> int:
        async with await self._conn() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {}.runs WHERE status = %s").format(
                    sql.Identifier(self.schema)
                ),
                (status,),
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def explain_claim(self, workflow: str) -> str:
        """EXPLAIN (ANALYZE, BUFFERS) of the pending part of the claim (its
        ``ready`` branch, as queries.sql writes it), rolled back."""
        async with await self._conn() as conn, conn.transaction(force_rollback=True):
            cur = await conn.execute(
                sql.SQL(
                    "EXPLAIN (ANALYZE, BUFFERS) SELECT id FROM {}.runs"
                    " WHERE status = 'pending' AND blocked_by IS NULL AND wake_at <= now()"
                    " AND workflow = ANY(%s) ORDER BY priority DESC, wake_at"
                    " LIMIT 25 FOR UPDATE SKIP LOCKED"
                ).format(sql.Identifier(self.schema)),
                ([workflow],),
            )
            return "\n".join(str(r[0]) for r in await cur.fetchall())

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            await self.storage.close()
        async with await self._conn() as conn:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )


# Redis --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Time:
    """A time (µs) found in the template's keys: shifted in each copy."""

    value: int
    width: int


Text = str | tuple[str | _Time | None, ...]
"""A literal, or parts: text, a time to shift, ``None`` for the run id."""

_DIGITS = re.compile(r"\d+")


def text_of(raw: str, run_id: str, lo: int, hi: int) -> Text:
    parts: list[str | _Time | None] = []
    for i, piece in enumerate(raw.split(run_id)):
        if i:
            parts.append(None)
        pos = 0
        for m in _DIGITS.finditer(piece):
            v = int(m.group())
            if lo <= v <= hi:
                parts += [piece[pos : m.start()], _Time(v, len(m.group()))]
                pos = m.end()
        parts.append(piece[pos:])
    kept = tuple(p for p in parts if p != "")
    if all(isinstance(p, str) for p in kept):
        return raw
    return kept


def render(text: Text, run_id: str, shift: int) -> str:
    if isinstance(text, str):
        return text
    return "".join(
        p if isinstance(p, str) else run_id if p is None else str(p.value + shift).zfill(p.width)
        for p in text
    )


def bulk(text: str) -> bytes:
    """``text`` as a RESP bulk string."""
    raw = text.encode()
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def command(*args: str) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def number(score: float) -> str:
    return str(int(score)) if score.is_integer() else repr(score)


def compiled(texts: list[Text]) -> list[bytes | Text]:
    """RESP pieces of ``texts``: literals encoded once (adjacent ones joined),
    the others left to :func:`render` for each copy."""
    pieces: list[bytes | Text] = []
    for text in texts:
        if isinstance(text, str):
            if pieces and isinstance(pieces[-1], bytes):
                pieces[-1] += bulk(text)
            else:
                pieces.append(bulk(text))
        else:
            pieces.append(text)
    return pieces


async def resp_send(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, out: list[bytes], replies: int
) -> None:
    """Send pipelined RESP commands and read their ``replies`` one-line
    replies (integers or statuses); an error reply raises."""
    writer.write(b"".join(out))
    await writer.drain()
    buffer = b""
    while buffer.count(b"\r\n") < replies:
        chunk = await reader.read(1 << 16)
        if not chunk:
            raise RuntimeError("Redis closed the connection")
        buffer += chunk
    if buffer.startswith(b"-") or b"\r\n-" in buffer:
        raise RuntimeError(f"Redis refused a seeding command: {buffer[:300]!r}")


@dataclass
class RedisPlan:
    """What one run adds under the prefix, as templates to replay per copy."""

    hashes: list[tuple[Text, list[tuple[Text, Text]]]] = field(default_factory=list)
    zadds: list[tuple[Text, Text, float, bool]] = field(default_factory=list)
    """(key, member, score, whether the score is a time to shift)."""
    hsets: list[tuple[Text, Text, Text]] = field(default_factory=list)
    sadds: list[tuple[Text, Text]] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)


Dump = dict[str, tuple[str, Any]]


class RedisStore(Store):
    name = "redis"

    def __init__(self, server_url: str, n: int, pool_size: int, max_bytes: int) -> None:
        import redis.asyncio as aioredis

        self.server_url = server_url
        self.prefix = f"reflow_growth_{os.getpid()}_{n}"
        self.pool_size = pool_size
        self.max_bytes = max_bytes
        self.client = aioredis.Redis.from_url(server_url, decode_responses=True)
        self._before: Dump = {}

    async def open(self) -> None:
        self.storage = open_storage(self.storage_url())
        await self.storage.initialize()

    def storage_url(self) -> str:
        return f"{self.server_url}?prefix={self.prefix}&max_connections={self.pool_size}"

    async def memory(self) -> tuple[int, int]:
        info = await self.client.info("memory")
        return int(info["used_memory"]), int(info["used_memory_rss"])

    async def size(self) -> int:
        return (await self.memory())[0]

    async def _dump(self) -> Dump:
        out: Dump = {}
        async for key in self.client.scan_iter(match="{" + self.prefix + "}*", count=1000):
            kind = await self.client.type(key)
            value: Any
            if kind == "hash":
                value = await self.client.hgetall(key)
            elif kind == "zset":
                pairs: Any = await self.client.zrange(key, 0, -1, withscores=True)
                value = dict(pairs)
            elif kind == "set":
                value = set(await self.client.smembers(key))
            elif kind == "list":
                value = await self.client.lrange(key, 0, -1)
            else:
                value = await self.client.get(key)
            out[str(key)] = (str(kind), value)
        return out

    async def before_template(self) -> None:
        self._before = await self._dump()
        self._window_lo = us(await self.storage.now())

    async def plan_of(self, template: str) -> RedisPlan:
        after = await self._dump()
        lo, hi = self._window_lo - 1_000_000, us(await self.storage.now()) + 1_000_000
        plan = RedisPlan()

        def t(raw: str) -> Text:
            return text_of(raw, template, lo, hi)

        for key, (kind, value) in after.items():
            old_kind, old = self._before.get(key, (kind, None))
            if template in key:
                if kind != "hash" or old is not None:
                    raise RuntimeError(f"unexpected per-run key {key} ({kind})")
                plan.hashes.append((t(key), [(t(f), t(v)) for f, v in value.items()]))
                continue
            if kind == "zset":
                before = old if old_kind == "zset" and old is not None else {}
                for member, score in value.items():
                    if before.get(member) == score:
                        continue
                    if template in member:
                        plan.zadds.append((t(key), t(member), score, lo <= score <= hi))
                    else:
                        plan.shared.append(f"{key} member {member}")
            elif kind == "hash":
                before = old if old_kind == "hash" and old is not None else {}
                for f, v in value.items():
                    if before.get(f) == v:
                        continue
                    if template in f or template in v:
                        plan.hsets.append((t(key), t(f), t(v)))
                    else:
                        plan.shared.append(f"{key} field {f}")
            elif kind == "set":
                before = old if old_kind == "set" and old is not None else set()
                for member in value - before:
                    if template in member:
                        plan.sadds.append((t(key), t(member)))
                    else:
                        plan.shared.append(f"{key} member {member}")
            elif value != old:
                if template in json.dumps(value):
                    raise RuntimeError(f"{key} ({kind}) names the run: not copied")
                plan.shared.append(f"{key} ({kind})")
        return plan

    async def copy(self, template: str, plan: Plan) -> int:
        redis_plan = await self.plan_of(template)
        log(
            f"  redis: per run {len(redis_plan.hashes)} hashes, {len(redis_plan.zadds)} index"
            f" members, {len(redis_plan.hsets)} shared-hash fields, {len(redis_plan.sadds)}"
            f" set members; shared, not copied: {sorted(set(redis_plan.shared))}"
        )
        run = await self.storage.get_run(template)
        assert run is not None
        created = us(run.created_at)
        hashes = [
            (
                b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * len(fields)),
                compiled([key, *(t for pair in fields for t in pair)]),
            )
            for key, fields in redis_plan.hashes
        ]
        made = 0
        rand = random.Random()
        last_check = 0
        parts = urlsplit(self.server_url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379)
        try:
            hello: list[bytes] = []
            if parts.password:
                user = unquote(parts.username or "default")
                hello.append(command("AUTH", user, unquote(parts.password)))
            if parts.path.strip("/"):
                hello.append(command("SELECT", parts.path.strip("/")))
            if hello:
                await resp_send(reader, writer, hello, len(hello))
            for lo in range(0, plan.count, REDIS_CHUNK):
                out: list[bytes] = []
                sent = 0
                zadds: dict[str, list[bytes]] = {}
                hsets: dict[str, list[bytes]] = {}
                sadds: dict[str, list[bytes]] = {}
                hi = min(plan.count, lo + REDIS_CHUNK)
                for j in range(lo, hi):
                    shift = plan.shift(j)
                    rid = ulid((created + shift) // 1000, rand.getrandbits(80))
                    for head, pieces in hashes:
                        out.append(head)
                        out += [
                            p if isinstance(p, bytes) else bulk(render(p, rid, shift))
                            for p in pieces
                        ]
                        sent += 1
                    for key, member, score, timed in redis_plan.zadds:
                        zadds.setdefault(render(key, rid, shift), []).extend(
                            (
                                bulk(number(score + shift if timed else score)),
                                bulk(render(member, rid, shift)),
                            )
                        )
                    for key, f, v in redis_plan.hsets:
                        hsets.setdefault(render(key, rid, shift), []).extend(
                            (bulk(render(f, rid, shift)), bulk(render(v, rid, shift)))
                        )
                    for key, member in redis_plan.sadds:
                        sadds.setdefault(render(key, rid, shift), []).append(
                            bulk(render(member, rid, shift))
                        )
                for verb, grouped in (("ZADD", zadds), ("HSET", hsets), ("SADD", sadds)):
                    for key, args in grouped.items():
                        out.append(b"*%d\r\n" % (2 + len(args)) + bulk(verb) + bulk(key))
                        out += args
                        sent += 1
                await resp_send(reader, writer, out, sent)
                made = hi
                if made - last_check >= 250_000 or made == plan.count:
                    last_check = made
                    used, resident = await self.memory()
                    log(
                        f"  redis: {made:,} of {plan.count:,} copies,"
                        f" used_memory {used / 2**30:.2f} GiB, rss {resident / 2**30:.2f} GiB"
                    )
                    if max(used, resident) > self.max_bytes and made < plan.count:
                        log(f"  redis: stopped at {made:,} copies (--redis-max-gib)")
                        self.capped = True
                        break
        finally:
            writer.close()
            await writer.wait_closed()
        return made

    async def count(self, status: str) -> int:
        if status == "completed":
            return int(await self.client.zcard("{" + self.prefix + "}:done:completed"))
        total = 0
        for stats in await self.storage.queue_stats():
            total += int(getattr(stats, status))
        return total

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            await self.storage.close()
        batch: list[str] = []
        async for key in self.client.scan_iter(match="{" + self.prefix + "}*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                await self.client.unlink(*batch)
                batch = []
        if batch:
            await self.client.unlink(*batch)
        # Large sets are freed in the background: let it finish before the next point.
        for _ in range(600):
            info = await self.client.info("memory")
            if int(info.get("lazyfree_pending_objects", 0)) == 0:
                break
            await asyncio.sleep(0.1)
        await self.client.aclose()


# -- seeding and checking ------------------------------------------------------------------


@dataclass
class Seeded:
    template: RunRecord | None
    template_steps: dict[str, StepRecord]
    plan: Plan
    made: int
    seconds: float


def shifted(at: datetime | None, delta: int) -> datetime | None:
    return None if at is None else from_epoch_us(us(at) + delta)


def expected_copy(template: RunRecord, copy: RunRecord) -> RunRecord:
    delta = us(copy.created_at) - us(template.created_at)
    return replace(
        template,
        id=copy.id,
        created_at=copy.created_at,
        updated_at=shifted(template.updated_at, delta) or template.updated_at,
        wake_at=shifted(template.wake_at, delta),
        lease_expires_at=shifted(template.lease_expires_at, delta),
        deadline_at=shifted(template.deadline_at, delta),
    )


async def check_copies(storage: Storage, seeded: Seeded, status: str, workflow: str) -> int:
    """The newest two pages of ``list_runs`` of ``status``: every copy in them
    equals the template (shifted), steps included. Returns how many were checked."""
    template = seeded.template
    assert template is not None
    checked = 0
    cursor: str | None = None
    for n in range(3):
        # The newest page of every workflow (the unfiltered index), then two of this one.
        page = await storage.list_runs(
            status=[cast(RunStatus, status)],
            workflow=workflow if n else None,
            limit=50,
            cursor=cursor,
        )
        if not page.runs:
            raise AssertionError("list_runs found none of the seeded runs")
        for run in page.runs:
            if run.id == template.id:
                continue
            if run.input != template.input:
                continue  # a run of the front, not a copy
            delta = us(run.created_at) - us(template.created_at)
            want = expected_copy(template, run)
            if run != want:
                raise AssertionError(f"seeded run differs from its template:\n{run}\n{want}")
            if ulid_ms(run.id) != us(run.created_at) // 1000:
                raise AssertionError(f"run id {run.id} does not carry its creation time")
            steps = await storage.get_step_results(run.id)
            want_steps = {
                name: replace(
                    s,
                    completed_at=shifted(s.completed_at, delta),
                    wake_at=shifted(s.wake_at, delta),
                )
                for name, s in seeded.template_steps.items()
            }
            if steps != want_steps or list(steps) != list(want_steps):
                raise AssertionError(f"steps of {run.id} differ: {steps} != {want_steps}")
            got = await storage.get_run(run.id)
            if got != run:
                raise AssertionError(f"get_run({run.id}) differs from list_runs")
            checked += 1
        cursor = page.next_cursor if n else None
        if n and cursor is None:
            break
    if checked == 0:
        raise AssertionError("no seeded copy among the newest runs")
    return checked


async def check_history(storage: Storage, seeded: Seeded) -> tuple[int, int]:
    """``finished_history`` over its whole day against the copies (and the
    template) that finished in it; (counted, expected)."""
    template = seeded.template
    assert template is not None
    for _ in range(3):
        now = await storage.now()
        history = await storage.finished_history(1440)
        if (await storage.now()).replace(second=0, microsecond=0) != now.replace(
            second=0, microsecond=0
        ):
            continue  # a minute passed meanwhile: look again
        start = us(now.replace(second=0, microsecond=0)) - 1439 * 60_000_000
        finish = us(template.updated_at)
        plan = seeded.plan
        # copy j finished at finish + first + j * step (step > 0)
        j_min = max(0, math.ceil((start - finish - plan.first) / plan.step))
        expected = 1 + max(0, seeded.made - j_min)
        counted = sum(m.completed for m in history)
        return counted, expected
    raise RuntimeError("the minute kept changing")


async def make_finished_template(storage: Storage, wf: Any) -> RunRecord:
    """One five-step run, enqueued and run by a real engine."""
    async with Engine(
        storage=storage,
        workflows=[wf],
        close_storage=False,
        poll_interval="20ms",
        load_entry_points=False,
    ) as engine:
        run = await engine.enqueue(wf, {"n": -1})
        await engine.result(run.id, timeout="30s")
    record = await storage.get_run(run.id)
    assert record is not None
    assert record.status == "completed", record
    return record


def history_plan(size: int) -> Plan:
    """Finished copies spread evenly over the 30 days before the template."""
    step = HISTORY_SPAN_US // max(size, 1)
    return Plan(size, -(size + 1) * step - 1_000_000, step)


async def seed(
    store: Store, shape: Shape, size: int, wf: Any, last_per_run: float | None
) -> Seeded:
    """The template and its ``size`` copies (fewer for Redis when they would
    not fit); PostgreSQL analyzed afterwards."""
    if size == 0:
        return Seeded(None, {}, Plan(0, 0, 1), 0, 0.0)
    started = time.perf_counter()
    await store.before_template()
    if shape == "pending":
        template = (
            await store.storage.create_run(NewRun(workflow=wf.name, input=codec.encode({"n": -1})))
        ).run
        plan = Plan(size, 1, 1)
    else:
        template = await make_finished_template(store.storage, wf)
        plan = history_plan(size)
    steps = await store.storage.get_step_results(template.id)
    if isinstance(store, RedisStore) and last_per_run:
        used = (await store.memory())[0]
        fits = int((store.max_bytes * 0.95 - used) / last_per_run)
        if fits < size:
            size = max(0, fits // 500_000 * 500_000)
            log(f"  redis: would not fit under --redis-max-gib; seeding {size:,}")
            store.capped = True
            plan = history_plan(size) if shape == "finished" else Plan(size, 1, 1)
    made = await store.copy(template.id, plan)
    await store.settle()
    seconds = time.perf_counter() - started
    return Seeded(template, steps, plan, made, seconds)


# -- one point --------------------------------------------------------------------------


@dataclass
class Point:
    backend: str
    shape: str
    requested: int
    size: int
    """Runs seeded (pending backlog or finished history)."""
    seed_seconds: float
    store_bytes: int
    bytes_per_seeded_run: float | None
    claim_ms: list[float]
    steps_per_s: list[float]
    checked: str
    capped: bool = False
    repeat: bool = False
    """The baseline (size 0) measured again after the largest size: the drift."""
    load: tuple[float, float] = (0.0, 0.0)
    """The machine's 1-minute load average before and after the point."""
    explain: str = ""
    """PostgreSQL: EXPLAIN ANALYZE of the claim's pending branch before the claims."""
    explain_after: str = ""
    """The same after the claims and the drains (dead row versions at the queue's head)."""

    @property
    def p50(self) -> float:
        return percentile(self.claim_ms, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.claim_ms, 0.99)


async def measure_point(
    store: Store, shape: Shape, size: int, args: argparse.Namespace, last_per_run: float | None
) -> Point:
    wf = build_workflow(STEPS)
    await store.open()
    storage = store.storage
    front_count = (WARM_CLAIMS + args.claims) * CLAIM_BATCH + (args.passes + 1) * (
        args.runs + 2 * CONCURRENCY
    )
    front: set[str] = set()
    if shape == "pending":
        front = set(await enqueue(storage, wf.name, front_count))
    empty = await store.size()
    seeded = await seed(store, shape, size, wf, last_per_run)
    storage = store.storage
    full = await store.size()
    per_run = (full - empty) / seeded.made if seeded.made else None
    log(
        f"  seeded {seeded.made:,} {shape} runs in {seeded.seconds:.1f}s;"
        f" store {full / 2**20:,.1f} MiB" + (f", {per_run:,.0f} bytes per copy" if per_run else "")
    )
    notes: list[str] = []
    if seeded.made:
        checked = await check_copies(
            storage, seeded, "pending" if shape == "pending" else "completed", wf.name
        )
        notes.append(f"{checked} copies equal the template")
        if shape == "finished":
            counted, expected = await check_history(storage, seeded)
            if counted != expected:
                raise AssertionError(f"finished_history counts {counted}, expected {expected}")
            notes.append(f"finished_history {counted:,} = expected")
            completed = await store.count("completed")
            if completed != seeded.made + 1:
                raise AssertionError(f"{completed} completed runs, expected {seeded.made + 1}")
    if shape == "finished":
        front = set(await enqueue(storage, wf.name, front_count))
    stats = await storage.queue_stats([wf.name])
    want_pending = len(front) + (
        seeded.made + 1 if shape == "pending" and seeded.template is not None else 0
    )
    if stats[0].pending != want_pending:
        raise AssertionError(f"queue_stats counts {stats[0].pending} pending, want {want_pending}")
    notes.append(f"queue_stats pending {stats[0].pending:,} = expected")
    if shape == "pending" and seeded.made:
        # Wait until the last copy is due (copies are one µs apart after the template).
        template = seeded.template
        assert template is not None
        last_due = us(template.created_at) + seeded.plan.shift(seeded.made - 1)
        wait_us = last_due - us(await storage.now())
        if wait_us >= 0:
            await asyncio.sleep(wait_us / 1e6 + 0.01)
    explain = await store.explain_claim(wf.name) if shape == "pending" else ""
    claims = await claim_latencies(storage, wf.name, args.claims)
    stops: list[float] = []
    await drain(storage, wf, WARM_RUNS, stops)
    rates = [await drain(storage, wf, args.runs, stops) for _ in range(args.passes)]
    if max(stops) > SLOW_STOP:
        notes.append(f"Engine.stop() took up to {max(stops):.0f}s (outside the timed passes)")
    explain_after = await store.explain_claim(wf.name) if shape == "pending" else ""
    if shape == "pending" and seeded.made:
        notes.append(await check_backlog_claim(storage, seeded, front, wf.name))
    if shape == "finished" and seeded.made >= 10:
        # The oldest copies, found by the index of finish times.
        purged = await storage.purge_finished(timedelta(days=1), limit=10)
        if purged != 10:
            raise AssertionError(f"purge_finished deleted {purged} runs, not 10")
        notes.append("purge_finished takes 10 old copies")
    log(
        f"  claim p50 {percentile(claims, 0.5):.2f} ms, p99 {percentile(claims, 0.99):.2f} ms;"
        f" steps/s {', '.join(f'{r:,.0f}' for r in rates)}; checks: {'; '.join(notes)}"
    )
    return Point(
        backend=store.name,
        shape=shape,
        requested=size,
        size=seeded.made,
        seed_seconds=seeded.seconds,
        store_bytes=full,
        bytes_per_seeded_run=per_run,
        claim_ms=claims,
        steps_per_s=rates,
        checked="; ".join(notes),
        capped=getattr(store, "capped", False),
        explain=explain,
        explain_after=explain_after,
    )


async def check_backlog_claim(
    storage: Storage, seeded: Seeded, front: set[str], workflow: str
) -> str:
    """Claim until the claims reach the seeded backlog; the copies claimed
    look like a claimed template."""
    template = seeded.template
    assert template is not None
    for _ in range(400):
        got = await storage.claim_runs([workflow], CLAIM_BATCH, LEASE)
        copies = [c for c in got if c.run.id not in front and c.run.id != template.id]
        for c in copies:
            r = c.run
            ok = (
                r.workflow == template.workflow
                and r.input == template.input
                and r.status == "running"
                and r.attempts == 1
                and r.lease_epoch == 1
                and r.reclaims == 0
                and r.wake_at is None
                and r.lease_expires_at is not None
                and r.created_at > template.created_at
                and not c.steps
                and not c.reclaimed
            )
            if not ok:
                raise AssertionError(f"a claimed copy does not look like a claimed run: {r}")
        if copies:
            return f"claims reach the backlog ({len(copies)} copies claimed, as expected)"
        if not got:
            break
    raise AssertionError("claims never reached the seeded backlog")


# -- bytes per run through the engine, worker memory ---------------------------------------------


async def organic_bytes(store: Store, runs: int) -> float:
    """Bytes per finished run of ``runs`` five-step runs enqueued and drained by an engine."""
    wf = build_workflow(STEPS)
    await store.open()
    before = await store.size()
    await enqueue(store.storage, wf.name, runs)
    await drain(store.storage, wf, runs)
    await store.vacuum()
    after = await store.size()
    return (after - before) / runs


@dataclass
class MemoryTrace:
    backend: str
    runs: list[int]
    rss: list[int]
    seconds: list[float]


async def memory_child(url: str, runs: int, every: int) -> None:
    """The worker of :func:`worker_memory`: one engine on the store at ``url``
    until ``runs`` runs are completed, printing a JSON line (runs completed,
    RSS, seconds) every ``every`` completions."""
    wf = build_workflow(1)
    storage = open_storage(url)
    await storage.initialize()
    started = time.perf_counter()

    def sample(done: int) -> None:
        if done % every == 0 or done == runs:
            line = {"runs": done, "rss": rss(), "seconds": time.perf_counter() - started}
            print(json.dumps(line), flush=True)

    done = Completions(storage, sample)
    engine = make_engine(storage, wf)
    try:
        started = time.perf_counter()
        await engine.start()
        sample(0)
        await done.reached(runs)
        await stop_engine(engine)
    finally:
        done.close()
        await storage.close()


async def worker_memory(store: Store, args: argparse.Namespace) -> MemoryTrace:
    """One worker process (:func:`memory_child`) draining ``--memory-runs``
    one-step runs that this process enqueues in waves of ``--memory-wave``
    (the next when a quarter of the last is done), its RSS sampled every
    ``--memory-every`` completions."""
    wf = build_workflow(1)
    await store.open()
    storage = store.storage
    trace = MemoryTrace(store.name, [], [], [])
    total, wave = args.memory_runs, args.memory_wave
    await enqueue(storage, wf.name, wave)
    enqueued = wave
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--memory-child",
        store.storage_url(),
        "--memory-runs",
        str(total),
        "--memory-every",
        str(args.memory_every),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        async for raw in child.stdout:
            line = json.loads(raw)
            trace.runs.append(int(line["runs"]))
            trace.rss.append(int(line["rss"]))
            trace.seconds.append(float(line["seconds"]))
            if enqueued < total and trace.runs[-1] >= enqueued - wave * 3 // 4:
                count = min(wave, total - enqueued)
                await enqueue(storage, wf.name, count, start=enqueued)
                enqueued += count
        if await child.wait() != 0:
            raise RuntimeError(f"the worker process exited with {child.returncode}")
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    if not trace.runs or trace.runs[-1] != total:
        raise RuntimeError(f"the worker stopped after {trace.runs[-1:]} runs")
    return trace


# -- reporting -----------------------------------------------------------------------------


def label(n: int) -> str:
    if n == 0:
        return "0"
    if n >= 1_000_000 and n % 100_000 == 0:
        return f"{n / 1_000_000:g}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return f"{n:,}"


def median_rate(p: dict[str, Any]) -> float:
    return float(statistics.median(p["steps_per_s"]))


def tables(data: dict[str, Any]) -> str:
    out: list[str] = []
    points = data.get("points", [])
    if points:
        out.append(
            "| backend | shape | runs seeded | claim p50 ms | claim p99 ms | p50 vs 0 | p99 vs 0"
            " | steps/s (median, min-max) | steps/s vs 0 | load |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        )
        for backend in data["backends"]:
            for shape in ("pending", "finished"):
                series = [p for p in points if p["backend"] == backend and p["shape"] == shape]
                base = series[0] if series else None
                for p in series:
                    p50 = percentile(p["claim_ms"], 0.5)
                    p99 = percentile(p["claim_ms"], 0.99)
                    assert base is not None
                    b50 = percentile(base["claim_ms"], 0.5)
                    b99 = percentile(base["claim_ms"], 0.99)
                    rate = median_rate(p)
                    spread = f"{min(p['steps_per_s']):,.0f}-{max(p['steps_per_s']):,.0f}"
                    seeded = label(p["size"]) + (" (cut)" if p["capped"] else "")
                    if p.get("repeat"):
                        seeded += " (again)"
                    load = "-".join(f"{v:.1f}" for v in p.get("load", ()))
                    out.append(
                        f"| {backend} | {shape} | {seeded} | {p50:.2f} | {p99:.2f}"
                        f" | {p50 / b50:.2f}x | {p99 / b99:.2f}x"
                        f" | {rate:,.0f} ({spread})"
                        f" | {rate / median_rate(base):.2f}x | {load} |"
                    )
        out.append("")
        out.append(
            "| backend | shape | runs seeded | seeding s | store MiB | bytes per seeded run |\n"
            "| --- | --- | --- | --- | --- | --- |"
        )
        for p in points:
            if p["size"]:
                out.append(
                    f"| {p['backend']} | {p['shape']} | {label(p['size'])}"
                    f" | {p['seed_seconds']:.0f}"
                    f" | {p['store_bytes'] / 2**20:,.0f} | {p['bytes_per_seeded_run']:,.0f} |"
                )
    organic = data.get("organic_bytes", {})
    if organic:
        out.append("")
        out.append(
            "| backend | bytes per finished run, through the engine | seeded finished runs |\n"
            "| --- | --- | --- |"
        )
        for backend, value in organic.items():
            copies = [
                f"{p['bytes_per_seeded_run']:,.0f} ({label(p['size'])})"
                for p in points
                if p["backend"] == backend and p["shape"] == "finished" and p["size"]
            ]
            out.append(f"| {backend} | {value:,.0f} | {', '.join(copies)} |")
    memory = data.get("memory", [])
    if memory:
        out.append("")
        out.append(
            "| backend | runs | RSS at first sample MiB | RSS at 10% MiB | RSS at the end MiB"
            " | max MiB | end vs 10% | runs/s first 10% | runs/s last 10% |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        )
        for m in memory:
            runs, mem, secs = m["runs"], m["rss"], m["seconds"]
            tenth = next(i for i, r in enumerate(runs) if r >= runs[-1] / 10)
            last = next(i for i, r in enumerate(runs) if r >= runs[-1] * 0.9)
            first_rate = runs[tenth] / max(secs[tenth] - secs[0], 1e-9)
            last_rate = (runs[-1] - runs[last]) / max(secs[-1] - secs[last], 1e-9)
            out.append(
                f"| {m['backend']} | {runs[-1]:,} | {mem[0] / 2**20:.1f} | {mem[tenth] / 2**20:.1f}"
                f" | {mem[-1] / 2**20:.1f} | {max(mem) / 2**20:.1f} | {mem[-1] / mem[tenth]:.2f}x"
                f" | {first_rate:,.0f} | {last_rate:,.0f} |"
            )
    return "\n".join(out)


COLORS = {"sqlite": "#1f77b4", "postgres": "#d62728", "redis": "#2ca02c", "memory": "#7f7f7f"}


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (python3 -m uv run --group bench ...): no plots")
        return []
    made: list[Path] = []
    points = data.get("points", [])
    note = data.get("machine", "")
    if points:
        for name, title, draw in (
            ("growth-claim-latency.png", "claim_runs(25) latency", "latency"),
            ("growth-steps.png", "drain rate of one engine (5-step runs, concurrency 25)", "steps"),
        ):
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
            for ax, shape, xlabel in zip(
                axes,
                ("pending", "finished"),
                (
                    "pending runs behind the measured ones (same workflow)",
                    "finished runs in the store (5 steps each)",
                ),
                strict=True,
            ):
                sizes = sorted({p["size"] for p in points if p["shape"] == shape})
                for backend in data["backends"]:
                    every = [p for p in points if p["backend"] == backend and p["shape"] == shape]
                    series = [p for p in every if not p.get("repeat")]
                    again = [p for p in every if p.get("repeat")]
                    if not series:
                        continue
                    xs = [sizes.index(p["size"]) for p in series]
                    color = COLORS.get(backend)
                    for p in again:
                        ys = (
                            [percentile(p["claim_ms"], 0.5), percentile(p["claim_ms"], 0.99)]
                            if draw == "latency"
                            else [median_rate(p)]
                        )
                        ax.plot([0] * len(ys), ys, "D", mfc="none", color=color, markersize=9)
                    if draw == "latency":
                        ax.plot(
                            xs,
                            [percentile(p["claim_ms"], 0.5) for p in series],
                            "o-",
                            color=color,
                            label=f"{backend} p50",
                        )
                        ax.plot(
                            xs,
                            [percentile(p["claim_ms"], 0.99) for p in series],
                            "s--",
                            color=color,
                            alpha=0.7,
                            label=f"{backend} p99",
                        )
                    else:
                        med = [median_rate(p) for p in series]
                        low = [m - min(p["steps_per_s"]) for m, p in zip(med, series, strict=True)]
                        high = [max(p["steps_per_s"]) - m for m, p in zip(med, series, strict=True)]
                        ax.errorbar(
                            xs,
                            med,
                            yerr=[low, high],
                            fmt="o-",
                            color=color,
                            capsize=4,
                            label=backend,
                        )
                ax.set_xticks(range(len(sizes)))
                ax.set_xticklabels([label(s) for s in sizes])
                ax.set_xlabel(xlabel)
                ax.grid(True, alpha=0.3)
                ax.set_title(shape)
            if draw == "latency":
                axes[0].set_yscale("log")
                axes[0].set_ylabel("ms per call (log scale)")
            else:
                axes[0].set_ylabel("steps/s (median, min-max of passes)")
                axes[0].set_ylim(bottom=0)
            axes[0].plot([], [], "D", mfc="none", color="black", label="baseline, again last")
            handles, labels = axes[0].get_legend_handles_labels()
            if not handles:
                handles, labels = axes[1].get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
            fig.suptitle(f"{title}\n{note}", fontsize=10)
            fig.tight_layout(rect=(0, 0.07, 1, 1))
            path = out / name
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append(path)
    memory = data.get("memory", [])
    if memory:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for m in memory:
            ax.plot(
                m["runs"],
                [r / 2**20 for r in m["rss"]],
                "-",
                color=COLORS.get(m["backend"]),
                label=m["backend"],
            )
        ax.set_xlabel("runs completed by the worker (1 step each)")
        ax.set_ylabel("worker process RSS, MiB")
        ax.set_ylim(0, max(max(m["rss"]) for m in memory) / 2**20 * 1.25)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(
            f"one worker engine (concurrency 25) draining runs enqueued in waves\n{note}",
            fontsize=10,
        )
        fig.tight_layout()
        path = out / "worker-memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# -- main ------------------------------------------------------------------------------


def only_backends(run: dict[str, Any], only: str) -> dict[str, Any]:
    """``run`` with the figures of the comma-separated backends ``only`` (all if empty)."""
    if not only:
        return run
    keep = only.split(",")
    return {
        **run,
        "backends": [b for b in run["backends"] if b in keep],
        "points": [p for p in run.get("points", []) if p["backend"] in keep],
        "organic_bytes": {b: v for b, v in run.get("organic_bytes", {}).items() if b in keep},
        "memory": [m for m in run.get("memory", []) if m["backend"] in keep],
    }


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' figures as one: each (backend, shape) series, organic
    bytes and memory trace of a later run replaces an earlier run's."""
    data: dict[str, Any] = {
        "commands": [],
        "backends": [],
        "machine": runs[0].get("machine", ""),
        "settings": {},
        "points": [],
        "organic_bytes": {},
        "memory": [],
    }
    for run in runs:
        data["commands"] += run.get("commands", [run.get("command", "")])
        data["backends"] += [b for b in run["backends"] if b not in data["backends"]]
        data["settings"].update(run.get("settings", {}))
        series = {(p["backend"], p["shape"]) for p in run.get("points", [])}
        data["points"] = [
            p for p in data["points"] if (p["backend"], p["shape"]) not in series
        ] + run.get("points", [])
        data["organic_bytes"].update(run.get("organic_bytes", {}))
        backends = {m["backend"] for m in run.get("memory", [])}
        data["memory"] = [m for m in data["memory"] if m["backend"] not in backends] + run.get(
            "memory", []
        )
    order = {b: i for i, b in enumerate(data["backends"])}
    data["points"].sort(key=lambda p: (order[p["backend"]], p["shape"] != "pending"))
    return data


async def drop_when_back(store: Store) -> None:
    """Drop ``store``, retrying for up to two minutes while its server is away."""
    for attempt in range(60):
        try:
            await store.drop()
            return
        except (psycopg.OperationalError, StorageError, ConnectionError, OSError) as exc:
            if attempt == 59:
                raise
            log(f"  dropping the store failed ({type(exc).__name__}); trying again")
            await asyncio.sleep(2)


async def postgres_extra_settings(url: str) -> str:
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT current_setting('autovacuum'), current_setting('shared_buffers')"
        )
        row = await cur.fetchone()
    assert row is not None
    return f", autovacuum={row[0]}, shared_buffers={row[1]}"


def sizes(values: Iterable[int]) -> list[int]:
    return sorted({0, *values})


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    data: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "backends": args.backends,
        "machine": f"{os.cpu_count()} cores, shared; python {sys.version.split()[0]}",
        "settings": {},
        "points": [],
        "organic_bytes": {},
        "memory": [],
    }
    counter = 0
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-growth-", dir=args.tmp))
        )
        database = ""
        memory = args.memory_backends if "memory" in args.parts else []
        if "postgres" in args.backends or "postgres" in memory:
            database = await stack.enter_async_context(
                scratch_database(args.postgres_url, f"reflow_growth_{os.getpid()}")
            )
            data["settings"]["postgres"] = await server_settings(database) + (
                await postgres_extra_settings(database)
            )
        if "redis" in args.backends or "redis" in memory:
            data["settings"]["redis"] = await redis_settings(args.redis_url)
        for line in data["settings"].values():
            log(line)

        def fresh(name: str) -> Store:
            nonlocal counter
            counter += 1
            if name == "sqlite":
                return SQLiteStore(tmp, counter)
            if name == "postgres":
                return PostgresStore(database, counter, args.pool_size)
            return RedisStore(
                args.redis_url, counter, args.pool_size, int(args.redis_max_gib * 2**30)
            )

        async def with_store(name: str, body: Callable[[Store], Awaitable[Any]]) -> Any:
            """``body`` on a fresh store, dropped afterwards. A point that
            fails because a server went away (the machine is shared: a
            PostgreSQL restart by someone else) is measured again once, on
            a new store, when the servers answer again."""
            for attempt in (1, 2):
                store = fresh(name)
                try:
                    return await body(store)
                except (psycopg.OperationalError, StorageError, ConnectionError, OSError) as exc:
                    if attempt == 2:
                        raise
                    log(f"  the point failed ({type(exc).__name__}: {exc}); measuring it again")
                    data.setdefault("retried", []).append(f"{name}: {type(exc).__name__}: {exc}")
                finally:
                    await drop_when_back(store)
            raise AssertionError("unreachable")

        def save() -> None:
            (out / "growth.json").write_text(json.dumps(data, indent=1))

        if "bytes" in args.parts:
            for name in args.backends:
                log(f"{name}: bytes per finished run through the engine ({args.runs} runs)")
                value = await with_store(name, lambda s: organic_bytes(s, args.runs))
                data["organic_bytes"][name] = value
                log(f"  {value:,.0f} bytes per run")
                save()
        for shape in ("pending", "finished"):
            if shape not in args.parts:
                continue
            for name in args.backends:
                last_per_run: float | None = None
                series = sizes(args.pending if shape == "pending" else args.finished)
                for i, size in enumerate([*series, 0]):
                    repeat = i == len(series)
                    log(f"{name}: {shape} {size:,}" + (" (the baseline again)" if repeat else ""))
                    load = os.getloadavg()[0]
                    point: Point = await with_store(
                        name,
                        functools.partial(
                            measure_point,
                            shape=shape,
                            size=size,
                            args=args,
                            last_per_run=last_per_run,
                        ),
                    )
                    if point.bytes_per_seeded_run:
                        last_per_run = point.bytes_per_seeded_run
                    point.repeat = repeat
                    point.load = (load, os.getloadavg()[0])
                    record = asdict(point)
                    data["points"].append(record)
                    save()
        if "memory" in args.parts:
            for name in args.memory_backends:
                log(f"{name}: worker memory over {args.memory_runs:,} runs")
                trace: MemoryTrace = await with_store(name, lambda s: worker_memory(s, args))
                data["memory"].append(asdict(trace))
                log(
                    f"  RSS {trace.rss[0] / 2**20:.1f} MiB at start,"
                    f" {trace.rss[-1] / 2**20:.1f} MiB after {trace.runs[-1]:,} runs"
                    f" ({trace.seconds[-1]:.0f}s)"
                )
                save()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["sqlite", "postgres", "redis"],
        choices=["sqlite", "postgres", "redis"],
    )
    parser.add_argument("--pending", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--finished", nargs="+", type=int, default=[1_000_000, 10_000_000])
    parser.add_argument("--runs", type=int, default=2000, help="completions timed per pass")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--claims", type=int, default=200, help="timed claim_runs calls per point")
    parser.add_argument("--memory-runs", type=int, default=200_000)
    parser.add_argument("--memory-wave", type=int, default=10_000)
    parser.add_argument("--memory-every", type=int, default=2_000)
    parser.add_argument(
        "--memory-backends",
        nargs="+",
        default=["sqlite", "postgres"],
        choices=["sqlite", "postgres", "redis"],
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["bytes", "pending", "finished", "memory"],
        choices=["bytes", "pending", "finished", "memory"],
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--redis-max-gib", type=float, default=6.0)
    parser.add_argument("--tmp", default="/tmp", help="where the SQLite files go")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--plot-only",
        nargs="+",
        default=None,
        metavar="FILE",
        help="draw the plots and print the tables of a growth.json; of several, merged"
        " (a later file's series replace an earlier one's), written to OUT/growth.json;"
        " FILE:sqlite,redis takes only those backends' figures of FILE",
    )
    add_postgres_options(parser)
    args = parser.parse_args()
    if args.memory_child is not None:
        asyncio.run(memory_child(args.memory_child, args.memory_runs, args.memory_every))
        return
    if args.plot_only:
        runs = []
        for spec in args.plot_only:
            path, _, only = spec.partition(":")
            runs.append(only_backends(json.loads(Path(path).read_text()), only))
        data = merged(runs)
        out = args.out or Path(args.plot_only[0].partition(":")[0]).parent
        if len(args.plot_only) > 1:
            (out / "growth.json").write_text(json.dumps(data, indent=1))
            log(f"wrote {out / 'growth.json'}")
        for path in plot(data, out):
            log(f"wrote {path}")
        print(tables(data))
        return
    if args.quick:
        args.pending = [300, 3_000]
        args.finished = [3_000]
        args.runs = 200
        args.passes = 1
        args.claims = 10
        args.memory_runs = 3_000
        args.memory_wave = 1_000
        args.memory_every = 250
    if args.out is None:
        args.out = Path("/tmp/reflow-growth-quick" if args.quick else "benchmarks/results")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    async def go() -> dict[str, Any]:
        cancel_on_sigterm()
        return await run(args)

    data = asyncio.run(go())
    log(f"done in {time.perf_counter() - started:.0f}s")
    data["seconds"] = time.perf_counter() - started
    (args.out / "growth.json").write_text(json.dumps(data, indent=1))
    for path in plot(data, args.out):
        log(f"wrote {path}")
    print(tables(data))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
