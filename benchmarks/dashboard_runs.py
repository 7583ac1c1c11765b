"""The dashboard's runs page on PostgreSQL with 1,000,000 runs, against ``list_runs`` alone.

    python benchmarks/dashboard_runs.py [--runs 1000000] [--requests 20] [--depth 0.9]
                                        [--waiting 0.01] [--json]
                                        [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

Times ``GET /runs`` of ``reflow_dashboard.create_app(storage)`` in-process
(an ``httpx.AsyncClient`` on ``httpx.ASGITransport``, so the figure is the
application's own time plus the store's, no network and no browser), and
beside it the storage's ``list_runs`` for the same page (same filters, same
page size, same cursor), so the page's own cost is the difference. The
application gets the storage behind a wrapper that adds up the time spent
in each storage method during a request, so the table also splits each
request into its ``list_runs``, its other reads (those the page makes to
offer the workflows in its filter, and the storage clock) and the rest
(the application and the rendering). Each figure is the median of
``--requests`` requests (20) after two untimed ones. Variants:

* ``all``: no filter; ``status=failed``; ``workflow=<one workflow>`` (about a
  tenth of the runs);
* for each, the first page, and a page deep in the keyset: after
  ``--depth`` (0.9) of the matching runs, i.e. after 900,000 runs unfiltered;
* and ``status=running`` with no run running (the store is idle): the
  first page, which lists no run, the worst case of a status filter, since
  ``list_runs`` has no index by status to go to.

The deep cursor is obtained honestly, by paging through ``list_runs`` with
pages of 10,000 up to that depth; the dashboard's URL for it is built the
way its own ``a#next-page`` link is (checked against the link of the first
page), and the benchmark checks that the page it gets lists the runs
``list_runs`` returns at that cursor. The target is under 100 ms for every
page.

Seeding. Enqueueing a million runs and draining them with a worker takes
about half an hour at the rates ``throughput.py`` measures, so the store is
seeded in bulk, with rows indistinguishable from created ones, made from
created ones:

1. a real :class:`~reflow_core.Engine` runs real workflows on the storage
   (the backend's own schema and statements) until it holds a template run
   of every kind: for each of eight workflows a completed run (three steps)
   and a failed one (a step raised: an error with its traceback), and of an
   ``approval-request`` workflow one that took its event and completed, one
   cancelled and one still waiting for it; one delayed run and one pending
   run of a workflow no worker serves;
2. ``INSERT ... SELECT`` over ``generate_series`` then copies them into the
   backend's own tables, ``runs`` and, for each copy, its template's rows of
   ``steps`` and ``events``: every column as the template has it (a
   column list read from the catalog, so a column added by a later
   migration is copied too) except the id, a new run id in the backend's
   format (26 characters of Crockford base32, the creation millisecond then
   80 random bits, as ``reflow_core.adapter.new_run_id`` makes them), and
   the timestamps, all shifted by the same amount to the copy's creation
   time. Creation times are spread evenly over the 30 days before the
   seeding, four runs sharing each (as runs created in one group commit
   do), so the keyset's tie-break on the id is exercised; each copy's
   template is drawn at random with the weights of a plausible history
   (88% completed, 5% failed, 4% approved, 1.5% cancelled, 1% waiting,
   0.5% delayed or pending), its workflows' shares uneven (30% to 4%);
   ``--waiting`` sets the share of waiting runs (the others make room),
   which is the backlog of unfinished runs the page's other reads go
   through.
   The templates are deleted afterwards, and the tables vacuumed and
   analyzed, as autovacuum would have done to a table that grew this
   large.

Everything happens in a database of the benchmark's own
(``reflow_dashboard_<pid>``) created on the server of ``--postgres-url`` and
dropped at the end, also when it fails or gets Ctrl-C or SIGTERM. The user
needs ``CREATEDB``; seeding a million runs takes well under a minute and
1.5 GB of disk while it lasts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, cast
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import psycopg
from psycopg import sql
from throughput import (
    add_postgres_options,
    cancel_on_sigterm,
    libpq_url,
    scratch_database,
    server_settings,
    with_options,
)

from reflow_core import Engine, StepContext, Workflow, open_storage, workflow
from reflow_core.storage import RunStatus, Storage

SCHEMA = "dashboard_bench"
DEFAULT_PAGE = 50
"""The runs page's size (``reflow_dashboard``'s default), for a page that lists none."""
SPAN_DAYS = 30
"""The seeded runs were created over this many days before the seeding."""
TIE = 4
"""How many seeded runs share each creation time."""
DEEP_PAGE = 10_000
"""The page size of the walk that finds the deep cursor."""

WORKFLOW_SHARES = {
    "invoice-sync": 0.30,
    "email-digest": 0.20,
    "order-fulfil": 0.12,
    "refund-payment": 0.10,
    "webhook-deliver": 0.10,
    "report-build": 0.08,
    "signup-verify": 0.06,
    "ledger-close": 0.04,
}
"""The workflows of the seeded history and their shares of its completed and failed runs;
approvals, delayed and pending runs come on top."""
FILTERED_WORKFLOW = "refund-payment"
COMPLETED, FAILED = 0.88, 0.05
APPROVED, CANCELLED, DELAYED, PENDING = 0.04, 0.015, 0.0025, 0.0025
"""Shares of the runs; the waiting runs' is ``--waiting`` (0.01), and the
others' are scaled to make room for it."""
SLOTS = 10_000
"""The template of a copy is the one owning a random slot of this many."""

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# -- the template runs ---------------------------------------------------------------


async def load(ctx: StepContext[dict[str, Any], None]) -> dict[str, Any]:
    return {"account": ctx.input["account"], "items": ctx.input["items"]}


async def process(ctx: StepContext[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    if ctx.input.get("fail"):
        raise ConnectionError(
            f"upstream returned 503 Service Unavailable for account {ctx.prev['account']}"
        )
    return {"processed": len(ctx.prev["items"]), "total_cents": 129_900}


async def notify(ctx: StepContext[dict[str, Any], dict[str, Any]]) -> str:
    return f"notified {ctx.input['account']}: {ctx.prev['processed']} items"


def business_workflow(name: str) -> Workflow[Any, Any]:
    return workflow(name).step("load", load).step("process", process).step("notify", notify)


async def record(ctx: StepContext[dict[str, Any], Any]) -> dict[str, Any]:
    return {"request": ctx.input["request"], "approved_by": ctx.prev["by"]}


approval = (
    workflow("approval-request")
    .step("submit", load)
    .wait_for_event("approval", timeout="1h")
    .step("record", record)
)
backfill = workflow("backfill-export").step("export", load)


def template_input(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "account": f"acct_{n:06d}",
        "request": f"REQ-{n}",
        "items": [{"sku": f"SKU-{n}-{k}", "qty": k + 1} for k in range(3)],
        **extra,
    }


async def make_templates(storage: Storage, waiting_share: float) -> list[tuple[str, float]]:
    """Run real workflows until the store holds a template run of every
    kind; return ``(run id, weight)`` pairs whose weights sum to 1 (the
    waiting run's ``waiting_share``, the others' in their proportions)."""
    flows = [business_workflow(name) for name in WORKFLOW_SHARES]
    share = sum(WORKFLOW_SHARES.values())
    weights: list[tuple[str, float]] = []
    async with Engine(
        storage=storage,
        workflows=[*flows, approval],
        close_storage=False,
        poll_interval="20ms",
        load_entry_points=False,
    ) as engine:
        for n, wf in enumerate(flows):
            weight = WORKFLOW_SHARES[wf.name] / share
            ok = await engine.enqueue(wf, template_input(n))
            bad = await engine.enqueue(wf, template_input(n, fail=True))
            await engine.result(ok.id, timeout="30s")
            with contextlib.suppress(Exception):
                await engine.result(bad.id, timeout="30s")
            weights += [(ok.id, COMPLETED * weight), (bad.id, FAILED * weight)]
        approved = await engine.enqueue(approval, template_input(100))
        cancelled = await engine.enqueue(approval, template_input(101))
        waiting = await engine.enqueue(approval, template_input(102))
        for run in (approved, cancelled, waiting):
            await wait_status(engine, run.id, "waiting")
        await engine.send_event(approved.id, "approval", {"by": "finance@example.com"})
        await engine.result(approved.id, timeout="30s")
        await engine.cancel(cancelled.id)
        delayed = await engine.enqueue(approval, template_input(103), delay="1h")
        weights += [
            (approved.id, APPROVED),
            (cancelled.id, CANCELLED),
            (waiting.id, 0.0),
            (delayed.id, DELAYED),
        ]
    async with Engine(
        storage=storage, workflows=[backfill], close_storage=False, worker=False
    ) as engine:
        pending = await engine.enqueue(backfill, template_input(104))
        weights.append((pending.id, PENDING))
    statuses: list[RunStatus] = [s for _ in flows for s in ("completed", "failed")]
    statuses += ["completed", "cancelled", "waiting", "delayed", "pending"]
    expected = dict(zip([run_id for run_id, _ in weights], statuses, strict=True))
    for run_id, status in expected.items():
        stored = await storage.get_run(run_id)
        assert stored is not None, run_id
        assert stored.status == status, (run_id, stored.status, status)
    rest = sum(w for _, w in weights)
    return [
        (run_id, waiting_share if run_id == waiting.id else w / rest * (1 - waiting_share))
        for run_id, w in weights
    ]


async def wait_status(engine: Engine, run_id: str, status: str) -> None:
    for _ in range(1500):
        run = await engine.get_run(run_id)
        if run is not None and run.status == status:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"run {run_id} never became {status}")


# -- bulk copies -----------------------------------------------------------------------


def crockford(expr: str, chars: int) -> str:
    """SQL for the ``chars`` Crockford base32 digits of bigint ``expr``, most significant first."""
    return " || ".join(
        f"substr('{CROCKFORD}', ((({expr}) >> {5 * (chars - 1 - i)}) & 31)::int + 1, 1)"
        for i in range(chars)
    )


async def columns(conn: psycopg.AsyncConnection[Any], table: str) -> list[tuple[str, str]]:
    """The columns of ``table`` a copy writes (name, type), identity and generated ones left out."""
    cur = await conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s AND is_identity = 'NO'"
        " AND is_generated = 'NEVER' ORDER BY ordinal_position",
        (SCHEMA, table),
    )
    return [(str(name), str(kind)) for name, kind in await cur.fetchall()]


async def copy_rows(
    conn: psycopg.AsyncConnection[Any], table: str, run_column: str, source_key: str
) -> int:
    """Copy the template rows of ``table`` (``run_column`` naming their run)
    for every planned run: the run id replaced, timestamps shifted."""
    cols = await columns(conn, table)
    targets = sql.SQL(", ").join(sql.Identifier(name) for name, _ in cols)
    values: list[sql.Composable] = []
    for name, kind in cols:
        if name == run_column:
            values.append(sql.SQL("p.id"))
        elif kind == "timestamp with time zone":
            values.append(sql.SQL("t.{} + p.shift").format(sql.Identifier(name)))
        else:
            values.append(sql.SQL("t.{}").format(sql.Identifier(name)))
    statement = sql.SQL(
        "INSERT INTO {schema}.{table} ({targets}) SELECT {values}"
        " FROM {schema}.seed_plan AS p JOIN {schema}.{table} AS t ON t.{run} = p.{key}"
        " ORDER BY p.g"
    ).format(
        schema=sql.Identifier(SCHEMA),
        table=sql.Identifier(table),
        targets=targets,
        values=sql.SQL(", ").join(values),
        run=sql.Identifier(run_column),
        key=sql.Identifier(source_key),
    )
    cur = await conn.execute(statement)
    return cur.rowcount


async def seed(url: str, templates: list[tuple[str, float]], runs: int) -> None:
    """Copy ``templates`` into ``runs`` runs (see the module's docstring)."""
    schema = sql.Identifier(SCHEMA)
    bounds: list[tuple[int, int, str]] = []
    start = 0
    for k, (run_id, weight) in enumerate(templates):
        end = SLOTS if k == len(templates) - 1 else start + round(weight * SLOTS)
        bounds.append((start, end, run_id))
        start = end
    spacing_us = SPAN_DAYS * 86_400 * 1_000_000 // runs * TIE
    id_expr = f"{crockford('ms', 10)} || {crockford('r1', 8)} || {crockford('r2', 8)}"
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        await conn.execute("SELECT setseed(0.2024)")
        await conn.execute(
            sql.SQL("CREATE UNLOGGED TABLE {}.seed_slots (lo int, hi int, template text)").format(
                schema
            )
        )
        async with conn.cursor() as cur:
            await cur.executemany(
                sql.SQL("INSERT INTO {}.seed_slots VALUES (%s, %s, %s)").format(schema), bounds
            )
        await conn.execute(
            sql.SQL(
                "CREATE UNLOGGED TABLE {schema}.seed_plan AS"
                " SELECT b.g, s.template, {id_expr} AS id, b.created_at,"
                " b.created_at - r.created_at AS shift FROM ("
                "  SELECT g, slot, created_at,"
                "   (extract(epoch FROM created_at) * 1000)::bigint AS ms,"
                "   (random() * 1099511627776)::bigint AS r1,"
                "   (random() * 1099511627776)::bigint AS r2 FROM ("
                "    SELECT g, floor(random() * {slots})::int AS slot,"
                "     date_trunc('second', now()) - interval '1 minute'"
                "      - ((%(runs)s - g) / {tie}) * {spacing} * interval '1 microsecond'"
                "      AS created_at"
                "    FROM generate_series(1, %(runs)s::bigint) AS g) AS a) AS b"
                " JOIN {schema}.seed_slots AS s ON b.slot >= s.lo AND b.slot < s.hi"
                " JOIN {schema}.runs AS r ON r.id = s.template"
            ).format(
                schema=schema,
                id_expr=sql.SQL(id_expr),
                slots=sql.Literal(SLOTS),
                tie=sql.Literal(TIE),
                spacing=sql.Literal(spacing_us),
            ),
            {"runs": runs},
        )
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}.seed_plan").format(schema))
        planned = await cur.fetchone()
        assert planned is not None
        assert planned[0] == runs, planned
        async with conn.transaction():
            copied = await copy_rows(conn, "runs", "id", "template")
            steps = await copy_rows(conn, "steps", "run_id", "template")
            events = await copy_rows(conn, "events", "run_id", "template")
            ids = [run_id for run_id, _ in templates]
            for table, column in (("events", "run_id"), ("steps", "run_id"), ("runs", "id")):
                await conn.execute(
                    sql.SQL("DELETE FROM {}.{} WHERE {} = ANY(%s)").format(
                        schema, sql.Identifier(table), sql.Identifier(column)
                    ),
                    (ids,),
                )
        assert copied == runs, (copied, runs)
        for table in ("seed_plan", "seed_slots"):
            await conn.execute(sql.SQL("DROP TABLE {}.{}").format(schema, sql.Identifier(table)))
        for table in ("runs", "steps", "events"):
            await conn.execute(
                sql.SQL("VACUUM (ANALYZE) {}.{}").format(schema, sql.Identifier(table))
            )
        print(f"seeded {copied:,} runs, {steps:,} steps, {events:,} events")


# -- measuring -------------------------------------------------------------------------


@dataclass
class Variant:
    label: str
    params: dict[str, str]
    status: list[RunStatus] | None = None
    workflow: str | None = None
    matches: bool = True
    """False for a filter no run matches: its first page only, and empty."""


async def deep_cursor(storage: Storage, variant: Variant, depth: float) -> tuple[str, int]:
    """The cursor after ``depth`` of the runs ``variant`` matches, found by
    paging through ``list_runs``; and how many runs precede it."""
    total = 0
    pages: list[tuple[str, int]] = []
    cursor: str | None = None
    while True:
        page = await storage.list_runs(
            status=variant.status, workflow=variant.workflow, limit=DEEP_PAGE, cursor=cursor
        )
        total += len(page.runs)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        pages.append((cursor, total))
    goal = int(total * depth)
    # The last page boundary at or before the goal, then one exact step to it.
    base_cursor, base = max(
        (p for p in pages if p[1] <= goal), key=lambda p: p[1], default=(None, 0)
    )
    if goal > base:
        page = await storage.list_runs(
            status=variant.status,
            workflow=variant.workflow,
            limit=goal - base,
            cursor=base_cursor,
        )
        assert page.next_cursor is not None
        return page.next_cursor, goal
    assert base_cursor is not None
    return base_cursor, base


class TimedStorage:
    """``storage`` with the time spent in each of its coroutine methods
    added up in ``spent`` (seconds by method name): how much of a page's
    time is its reads, and which."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.spent: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._storage, name)
        if not inspect.iscoroutinefunction(found):
            return found

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await found(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - started

        return timed


@dataclass
class Timing:
    """Medians (and the maximum of the first) over the timed calls, in ms."""

    total: float
    total_max: float
    list_runs: float = 0.0
    other_reads: float = 0.0
    other_names: str = ""


async def timed_calls(
    call: Callable[[], Awaitable[object]], requests: int, reads: TimedStorage | None = None
) -> Timing:
    """Time ``requests`` calls after two untimed ones; with ``reads``, also
    the part of each spent in ``list_runs`` and in the storage's other methods."""
    for _ in range(2):
        await call()
    totals, lists, others = [], [], []
    names: set[str] = set()
    for _ in range(requests):
        if reads is not None:
            reads.spent.clear()
        started = time.perf_counter()
        await call()
        totals.append((time.perf_counter() - started) * 1000)
        if reads is not None:
            lists.append(reads.spent.get("list_runs", 0.0) * 1000)
            others.append(sum(v for k, v in reads.spent.items() if k != "list_runs") * 1000)
            names.update(k for k in reads.spent if k != "list_runs")
    return Timing(
        total=statistics.median(totals),
        total_max=max(totals),
        list_runs=statistics.median(lists) if lists else 0.0,
        other_reads=statistics.median(others) if others else 0.0,
        other_names=", ".join(sorted(names)),
    )


ROW = re.compile(r'<tr[^>]*\bdata-run-id="([^"]+)"')


def run_ids(html: str) -> list[str]:
    """The run ids of ``table#runs``'s rows, in order."""
    table = html[html.index('id="runs"') :]
    return ROW.findall(table)


def next_href(html: str) -> str | None:
    for tag in re.findall(r"<a\b[^>]*>", html):
        if re.search(r'\bid="next-page"', tag):
            found = re.search(r'\bhref="([^"]*)"', tag)
            if found:
                return found.group(1).replace("&amp;", "&")
    return None


@dataclass
class Result:
    variant: str
    name: str
    depth: int
    page: Timing
    alone: Timing


async def deep_page(
    client: httpx.AsyncClient,
    storage: Storage,
    variant: Variant,
    first_html: str,
    first_ids: list[str],
    depth: float,
) -> tuple[str, str, int]:
    """The dashboard's URL of the page after ``depth`` of the runs
    ``variant`` matches, its ``list_runs`` cursor and how many runs precede
    it; built as the first page's ``a#next-page`` link is, and checked to
    list the runs ``list_runs`` returns there."""
    size = len(first_ids)
    href = next_href(first_html)
    assert href is not None, "the first page has no a#next-page"
    link = urlsplit(href)
    link_query = parse_qs(link.query)
    listed = await storage.list_runs(status=variant.status, workflow=variant.workflow, limit=size)
    assert [r.id for r in listed.runs] == first_ids, "the first page is not list_runs's"
    cursor_params = [k for k, v in link_query.items() if v == [listed.next_cursor]]
    assert len(cursor_params) == 1, f"cannot find list_runs's cursor in {href}"

    cursor, before = await deep_cursor(storage, variant, depth)
    deep_query = {k: v[-1] for k, v in link_query.items()}
    deep_query[cursor_params[0]] = cursor
    deep_url = f"{link.path}?{urlencode(deep_query)}"
    deep = await client.get(deep_url)
    deep.raise_for_status()
    deep_listed = await storage.list_runs(
        status=variant.status, workflow=variant.workflow, limit=size, cursor=cursor
    )
    assert run_ids(deep.text) == [r.id for r in deep_listed.runs], "the deep page differs"
    return deep_url, cursor, before


async def measure(storage: Storage, variant: Variant, depth: float, requests: int) -> list[Result]:
    from reflow_dashboard import create_app

    reads = TimedStorage(storage)
    app = create_app(cast(Storage, reads))
    results = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dashboard")
        )
        first_url = "/runs" + (f"?{urlencode(variant.params)}" if variant.params else "")
        first = await client.get(first_url)
        first.raise_for_status()
        first_ids = run_ids(first.text)
        if not variant.matches:
            assert first_ids == [], f"{first_url} lists {len(first_ids)} runs"
            empty = await storage.list_runs(status=variant.status, workflow=variant.workflow)
            assert list(empty.runs) == [], "list_runs finds runs the page does not show"
            pages: list[tuple[str, str, str | None, int]] = [("first", first_url, None, 0)]
            size = DEFAULT_PAGE
        else:
            size = len(first_ids)
            assert size > 1, f"{first_url} lists {size} runs"
            deep_url, cursor, before = await deep_page(
                client, storage, variant, first.text, first_ids, depth
            )
            pages = [("first", first_url, None, 0), ("deep", deep_url, cursor, before)]

        for name, url, page_cursor, at in pages:

            async def get_page(url: str = url) -> None:
                response = await client.get(url)
                response.raise_for_status()

            async def list_page(page_cursor: str | None = page_cursor) -> None:
                await storage.list_runs(
                    status=variant.status, workflow=variant.workflow, limit=size, cursor=page_cursor
                )

            page = await timed_calls(get_page, requests, reads)
            alone = await timed_calls(list_page, requests)
            results.append(Result(variant.label, name, at, page, alone))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--depth", type=float, default=0.9)
    parser.add_argument(
        "--waiting",
        type=float,
        default=0.01,
        help="the share of the runs left waiting for an event (unfinished runs: the backlog)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line per result")
    add_postgres_options(parser)
    args = parser.parse_args()
    cancel_on_sigterm()

    async with contextlib.AsyncExitStack() as stack:
        database = await stack.enter_async_context(
            scratch_database(args.postgres_url, f"reflow_dashboard_{os.getpid()}")
        )
        print(await server_settings(database))
        storage = open_storage(with_options(database, schema=SCHEMA, pool_max_size=4))
        await storage.initialize()
        stack.push_async_callback(storage.close)

        started = time.perf_counter()
        templates = await make_templates(storage, args.waiting)
        await seed(database, templates, args.runs)
        print(f"seeding took {time.perf_counter() - started:.1f}s")

        variants = [
            Variant("all runs", {}),
            Variant("status=failed", {"status": "failed"}, status=["failed"]),
            Variant(
                f"workflow={FILTERED_WORKFLOW}",
                {"workflow": FILTERED_WORKFLOW},
                workflow=FILTERED_WORKFLOW,
            ),
            Variant("status=running (none)", {"status": "running"}, ["running"], matches=False),
        ]
        results: list[Result] = []
        for variant in variants:
            results += await measure(storage, variant, args.depth, args.requests)

    if args.json:
        for r in results:
            print(json.dumps(asdict(r)))
        return
    others = sorted({n for r in results for n in r.page.other_names.split(", ") if n})
    print(
        f"\n{args.runs:,} runs; medians of {args.requests} requests (max in brackets), ms;"
        f" the page's other reads: {', '.join(others)}\n\n"
        "| filter | page | runs before it | GET /runs | list_runs alone "
        "| in the page: list_runs | other reads | the rest |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in results:
        p = r.page
        rest = p.total - p.list_runs - p.other_reads
        print(
            f"| {r.variant} | {r.name} | {r.depth:,} | {p.total:.1f} ({p.total_max:.1f}) "
            f"| {r.alone.total:.1f} ({r.alone.total_max:.1f}) | {p.list_runs:.1f} "
            f"| {p.other_reads:.1f} | {rest:.1f} |"
        )
    slow = [r for r in results if r.page.total >= 100]
    if slow:
        print(f"\n{len(slow)} page(s) at or above the 100 ms target", file=sys.stderr)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
