"""The dashboard's routes against real storages, with real runs.

Each test serves the dashboard with Starlette's test client on a store of
its own (``memory`` and ``sqlite``), seeded by running real workflows with
an :class:`~reflow_core.Engine` (``worker=False``, driven by ``tick``).
Everything async runs on the client's event loop through :meth:`Dash.call`,
the loop the application runs on. The tests marked ``slow`` start
``reflow dashboard`` as a process of its own.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from reflow_conformance.testsupport import free_port
from reflow_core import Engine, MemoryStorage, StepContext, Workflow, codec, open_storage, workflow
from reflow_core.cli import build_cli
from reflow_core.storage import FinishedMinute, NewRun, Storage, WorkerInfo
from reflow_dashboard import BasicAuth, TokenAuth, commands, create_app
from reflow_dashboard._charts import build_chart

T = TypeVar("T")

HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(1)>'
"""Markup that must only ever reach a page as text."""
RAW_TAGS = ("<script>alert(1)", "<img src=x")
ESCAPED = ("&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;img src=x onerror=alert(1)&gt;")

ORIGIN = "http://testserver"


# -- workflows ----------------------------------------------------------------------


def _add(ctx: StepContext[Any, Any]) -> dict[str, Any]:
    return {"n": (ctx.input or {}).get("n", 0) + 1}


def _charge_card(ctx: StepContext[Any, Any]) -> None:
    try:
        {}["card"]  # a KeyError to chain from
    except KeyError as exc:
        raise ValueError("card declined") from exc


def _hostile_step(ctx: StepContext[Any, Any]) -> dict[str, str]:
    return {"echo": HOSTILE}


def _hostile_failure(ctx: StepContext[Any, Any]) -> None:
    raise RuntimeError(f"refused {HOSTILE}")


OK = workflow("ok").step("add", _add)
FAILING = workflow("failing").step("charge", _charge_card)
WAITER = workflow("waiter").wait_for_event("approval").step("after", lambda ctx: ctx.prev)
LABEL = workflow("label").step("print", lambda ctx: f"label-{ctx.input['order']}")
PARENT = workflow("parent").child("ship", LABEL, lambda ctx: {"order": ctx.input["id"]})
HOSTILE_WAITER = (
    workflow(HOSTILE).step(f"step {HOSTILE}", _hostile_step).wait_for_event(f"event {HOSTILE}")
)
HOSTILE_FAILING = workflow(f"failing {HOSTILE}").step("explode", _hostile_failure)
WORKFLOWS: list[Workflow[Any, Any]] = [
    OK,
    FAILING,
    WAITER,
    LABEL,
    PARENT,
    HOSTILE_WAITER,
    HOSTILE_FAILING,
]


# -- a small HTML reader ------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def words(self) -> str:
        return " ".join(self.text.split())

    def all(self, tag: str | None = None, **attrs: str | None) -> list[Node]:
        """Descendants with ``tag`` whose attributes have the values given
        (``None``: present; ``class_``: among its classes)."""
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if _matches(child, tag, attrs):
                found.append(child)
            found += child.all(tag, **attrs)
        return found

    def one(self, tag: str | None = None, **attrs: str | None) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag or '*'} {attrs}> found"
        return found[0]

    def has(self, tag: str | None = None, **attrs: str | None) -> bool:
        return bool(self.all(tag, **attrs))


def _matches(node: Node, tag: str | None, attrs: dict[str, str | None]) -> bool:
    if tag is not None and node.tag != tag:
        return False
    for name, want in attrs.items():
        if name == "class_":
            if want not in node.attrs.get("class", "").split():
                return False
            continue
        name = name.replace("_", "-")
        if name not in node.attrs or (want is not None and node.attrs[name] != want):
            return False
    return True


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root


# -- the harness --------------------------------------------------------------------


@dataclass
class Dash:
    """The dashboard under test, its store, and helpers to drive both."""

    client: TestClient
    storage: Storage

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the application's event loop."""
        assert self.client.portal is not None
        return self.client.portal.call(functools.partial(fn, *args, **kwargs))

    def get(self, path: str, status: int = 200, **kwargs: Any) -> httpx.Response:
        response = self.client.get(path, follow_redirects=False, **kwargs)
        assert response.status_code == status, (response.status_code, response.text[:3000])
        return response

    def page(self, path: str, status: int = 200) -> Node:
        return parse(self.get(path, status).text)

    def csrf(self, path: str = "/") -> str:
        """The CSRF token the dashboard hands this browser, from a page's form."""
        found = re.search(r'name="csrf_token" value="([^"]+)"', self.client.get(path).text)
        assert found is not None, f"no form with a CSRF token on {path}"
        return found.group(1)

    def post(
        self,
        path: str,
        data: dict[str, str] | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """A form POST as the dashboard's own page sends it."""
        form = dict(data or {})
        if token is None:
            token = self.csrf(path.rsplit("/", 1)[0] or "/")
        form.setdefault("csrf_token", token)
        return self.client.post(
            path, data=form, headers={"origin": ORIGIN, **(headers or {})}, follow_redirects=False
        )

    def engine(self) -> Engine:
        return Engine(
            storage=self.storage,
            workflows=WORKFLOWS,
            worker=False,
            close_storage=False,
            load_entry_points=False,
        )

    def enqueue(self, wf: Workflow[Any, Any], data: Any = None, **options: Any) -> str:
        """Enqueue a run, then work every run as far as it goes."""

        async def work() -> str:
            async with self.engine() as engine:
                run = await engine.enqueue(wf, data, **options)
                while await engine.tick():
                    pass
                return run.id

        return self.call(work)

    def drain(self) -> None:
        async def work() -> None:
            async with self.engine() as engine:
                while await engine.tick():
                    pass

        self.call(work)

    def create(self, workflow_name: str, data: Any = None, **fields: Any) -> str:
        """A run straight into the store, for a workflow nothing here runs."""
        new = NewRun(workflow=workflow_name, input=codec.encode(data), **fields)
        return self.call(self.storage.create_run, new).run.id

    def record(self, run_id: str) -> Any:
        return self.call(self.storage.get_run, run_id)

    def announce(self, worker_id: str, workflows: tuple[str, ...], in_flight: int = 1) -> None:
        info = WorkerInfo(
            id=worker_id,
            host="host-1",
            pid=4242,
            workflows=workflows,
            concurrency=8,
            in_flight=in_flight,
        )
        self.call(self.storage.announce_worker, info, timedelta(minutes=5))

    def schedule(self, key: str, wf: Workflow[Any, Any], data: Any = None) -> None:
        async def work() -> None:
            async with self.engine() as engine:
                await engine.schedule(wf, data, every="1h", key=key)

        self.call(work)


def requires(dash: Dash, *operations: str) -> None:
    """Skip unless the backend has these storage operations (with an
    adapter that predates them the pages leave out what they add)."""
    missing = [name for name in operations if not hasattr(dash.storage, name)]
    if missing:
        pytest.skip(f"{type(dash.storage).__name__} lacks {', '.join(missing)} so far")


def _sqlite_missing() -> str | None:
    try:
        importlib.import_module("reflow_sqlite").SQLiteStorage  # noqa: B018
    except Exception as exc:  # any failure means the backend is not ready
        return f"{type(exc).__name__}: {exc}"
    return None


_SQLITE_MISSING = _sqlite_missing()


@pytest.fixture(params=["memory", "sqlite"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Storage]:
    """A new, uninitialized store of this test's own on the backend."""
    if request.param == "sqlite" and _SQLITE_MISSING is not None:
        pytest.skip(f"reflow_sqlite does not import ({_SQLITE_MISSING})")
    counter = iter(range(1000))

    def make() -> Storage:
        if request.param == "memory":
            return MemoryStorage()
        return open_storage(f"sqlite:///{tmp_path / f'dashboard-{next(counter)}.db'}")

    return make


@pytest.fixture
def open_dash(make_storage: Callable[[], Storage]) -> Iterator[Callable[..., Dash]]:
    """Open a dashboard (``create_app`` options as keywords) on a new store;
    each one is shut down after the test."""
    opened: list[tuple[TestClient, Storage]] = []

    def open_one(**options: Any) -> Dash:
        options.setdefault("refresh", "50ms")
        storage = make_storage()
        client = TestClient(create_app(storage, **options), base_url=ORIGIN)
        client.__enter__()
        opened.append((client, storage))
        assert client.portal is not None
        client.portal.call(storage.initialize)
        return Dash(client, storage)

    yield open_one
    for client, storage in reversed(opened):
        assert client.portal is not None
        client.portal.call(storage.close)
        client.__exit__(None, None, None)


@pytest.fixture
def dash(open_dash: Callable[..., Dash]) -> Dash:
    """The dashboard with its defaults: actions on, no authentication."""
    return open_dash()


# -- pages --------------------------------------------------------------------------


def test_every_page_renders_with_data(dash: Dash) -> None:
    requires(dash, "finished_history")
    done = [dash.enqueue(OK, {"n": i}) for i in range(3)]
    failed = dash.enqueue(FAILING)
    waiting = dash.enqueue(WAITER)
    pending = dash.create("idle", {"i": 1})
    dash.announce("worker-a", ("ok", "waiter"))
    dash.schedule("nightly", OK, {"n": 9})

    home = dash.page("/")
    assert home.one("h1").words == "Overview"
    counts = home.one(id="status-counts")
    assert counts.one(data_status="pending").one(class_="stat-n").words == "1"
    assert counts.one(data_status="waiting").one(class_="stat-n").words == "1"
    assert counts.one(data_status="total").one(class_="stat-n").words == "2"
    queue_rows = home.one("table", id="queue").all("tr", data_workflow=None)
    assert {row.attrs["data-workflow"] for row in queue_rows} == {"idle", "waiter"}
    idle = home.one("tr", data_workflow="idle")
    assert idle.one("td", class_="pending").words == "1"
    assert idle.one("td", class_="oldest-pending").has("time")
    assert home.one("table", id="workers").has("tr", data_worker="worker-a")
    hour = home.one("svg", id="history-hour")
    assert len(hour.all("g", class_="bar")) == 60
    titles = [t.words for t in hour.all("title")]
    assert any("3 completed, 1 failed, 0 cancelled" in t for t in titles), titles
    day = home.one("svg", id="history-day")
    assert len(day.all("g", class_="bar")) in (96, 97)

    runs = dash.page("/runs")
    rows = runs.one("table", id="runs").all("tr", data_run_id=None)
    assert {r.attrs["data-run-id"] for r in rows} == {*done, failed, waiting, pending}
    row = runs.one("tr", data_run_id=failed)
    assert row.one("td", class_="status").words == "failed"
    assert row.one("td", class_="workflow").words == "failing"
    assert row.one("a", class_="run-link").attrs["href"] == f"/runs/{failed}"
    status_options = [o.attrs["value"] for o in runs.one("select", name="status").all("option")]
    assert status_options[0] == "any"
    assert set(status_options[1:]) >= {"pending", "running", "completed", "failed", "cancelled"}
    workflow_options = {o.attrs["value"] for o in runs.one("select", name="workflow").all("option")}
    assert workflow_options >= {"", "idle", "waiter", "ok"}

    run = dash.page(f"/runs/{done[0]}")
    assert run.one(id="run-status").words == "completed"
    assert run.one(id="run-workflow").words == "ok"
    assert '"n": 0' in run.one("pre", id="run-input").text
    assert '"n": 1' in run.one("pre", id="run-output").text
    step = run.one("table", id="steps").one("tr", data_step="add")
    assert step.one("td", class_="status").words == "completed"
    assert step.one("td", class_="completed-at").has("time")

    schedules = dash.page("/schedules")
    row = schedules.one("table", id="schedules").one("tr", data_schedule="nightly")
    assert row.one("td", class_="workflow").words == "ok"
    assert row.one("td", class_="recurrence").words == "every 1h"
    assert row.one("td", class_="paused").words == "active"
    assert row.has("form", class_="trigger-form")
    assert row.has("form", class_="pause-form")

    workers = dash.page("/workers")
    row = workers.one("table", id="workers").one("tr", data_worker="worker-a")
    assert "host-1" in row.words
    assert "1/8" in row.words


def test_security_headers_and_static_files(dash: Dash) -> None:
    response = dash.get("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    for path in ("style.css", "live.js", "favicon.svg"):
        link = dash.get(f"/static/{path}")
        assert link.content
    assert "EventSource" in dash.get("/static/live.js").text
    page = dash.page("/")
    assert page.one("link", rel="stylesheet").attrs["href"].startswith("/static/style.css")
    assert page.one("script").attrs["src"].startswith("/static/live.js")


def test_healthz_says_ok_and_nothing_else(dash: Dash) -> None:
    response = dash.get("/healthz")
    assert response.text == "ok"
    assert response.headers["content-type"].startswith("text/plain")


def test_unknown_run_and_unknown_page_are_404_pages(dash: Dash) -> None:
    page = dash.page("/runs/no-such-run", status=404)
    assert page.one("h1").words == "Run not found"
    assert "'no-such-run'" in page.words
    assert dash.page("/nowhere", status=404).one("h1").words == "Not found"


def test_run_ids_with_slashes_and_spaces_link_to_their_page(dash: Dash) -> None:
    odd = "batch/7 ?#%"
    dash.create("idle", {}, run_id=odd)
    link = dash.page("/runs").one("a", class_="run-link").attrs["href"]
    assert link == "/runs/batch%2F7%20%3F%23%25"
    assert dash.page(link).one("h1").words == f"Run {odd}"


# -- the runs list ------------------------------------------------------------------


def test_filters_by_status_and_workflow(dash: Dash) -> None:
    ok = [dash.enqueue(OK, {"n": i}) for i in range(2)]
    failed = dash.enqueue(FAILING)
    waiting = dash.enqueue(WAITER)

    def ids(query: str) -> set[str]:
        rows = dash.page(f"/runs?{query}").one("table", id="runs").all("tr", data_run_id=None)
        return {r.attrs["data-run-id"] for r in rows}

    assert ids("status=failed") == {failed}
    assert ids("status=completed") == set(ok)
    assert ids("workflow=waiter") == {waiting}
    assert ids("workflow=ok&status=failed") == set()
    assert ids("status=any&workflow=") == {*ok, failed, waiting}
    page = dash.page("/runs?status=failed&workflow=failing")
    assert page.one("select", name="status").one("option", selected=None).attrs["value"] == "failed"
    chosen = page.one("select", name="workflow").one("option", selected=None)
    assert chosen.attrs["value"] == "failing"
    assert "No runs match" in dash.page("/runs?workflow=nothing").one("table", id="runs").words


def test_search_by_run_id_redirects_to_the_run(dash: Dash) -> None:
    run_id = dash.enqueue(OK)
    response = dash.get(f"/runs?q={run_id}", status=303)
    assert response.headers["location"] == f"/runs/{run_id}"


def test_search_by_idempotency_key_lists_its_runs(dash: Dash) -> None:
    requires(dash, "find_runs_by_key")
    first = dash.enqueue(OK, {"n": 1}, idempotency_key="checkout:ORD_1")
    other = dash.enqueue(FAILING, None, idempotency_key="checkout:ORD_1")
    dash.enqueue(OK, {"n": 2}, idempotency_key="checkout:ORD_2")
    page = dash.page("/runs?q=checkout:ORD_1")
    rows = page.one("table", id="runs").all("tr", data_run_id=None)
    assert {r.attrs["data-run-id"] for r in rows} == {first, other}
    assert "checkout:ORD_1" in page.one(class_="result-note").words
    filtered = dash.page("/runs?q=checkout:ORD_1&workflow=ok").all("tr", data_run_id=None)
    assert [r.attrs["data-run-id"] for r in filtered] == [first]
    missing = dash.page("/runs?q=nothing-like-it")
    assert not missing.all("tr", data_run_id=None)
    assert "No run has this id or idempotency key" in missing.words


def test_keyset_pages_visit_every_run_once(dash: Dash) -> None:
    ids = {dash.create("idle", {"i": i}) for i in range(7)}
    ids |= {dash.create("other", {"i": i}) for i in range(2)}
    seen: list[str] = []
    path = "/runs?workflow=idle&limit=3"
    pages = 0
    while True:
        page = dash.page(path)
        rows = page.one("table", id="runs").all("tr", data_run_id=None)
        assert len(rows) <= 3
        seen += [r.attrs["data-run-id"] for r in rows]
        pages += 1
        if pages > 1:
            first = page.one("a", id="first-page").attrs["href"]
            assert parse_qs(urlsplit(first).query) == {"workflow": ["idle"], "limit": ["3"]}
        nexts = page.all("a", id="next-page")
        if not nexts:
            break
        path = nexts[0].attrs["href"]
        query = parse_qs(urlsplit(path).query)
        assert query["workflow"] == ["idle"]
        assert query["limit"] == ["3"]
        assert query["cursor"]
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) <= ids
    created = [dash.record(i).created_at for i in seen]
    assert created == sorted(created, reverse=True)


def test_a_malformed_cursor_shows_the_first_page_and_says_so(dash: Dash) -> None:
    dash.create("idle", {})
    page = dash.page("/runs?cursor=not-a-cursor", status=400)
    assert "out of date or malformed" in page.words
    assert len(page.all("tr", data_run_id=None)) == 1


# -- one run ------------------------------------------------------------------------


def test_a_failed_run_shows_its_error_traceback_and_cause(dash: Dash) -> None:
    run_id = dash.enqueue(FAILING)
    page = dash.page(f"/runs/{run_id}")
    assert page.one(id="run-status").words == "failed"
    error = page.one(id="run-error")
    assert "ValueError: card declined" in error.one(class_="error-message").words
    trace = error.one("pre", class_="traceback").text
    assert "Traceback (most recent call last)" in trace
    assert "_charge_card" in trace
    assert "caused by KeyError: 'card'" in trace
    step = page.one("tr", data_step="charge")
    assert step.one("td", class_="status").words == "failed"
    step_error = page.one("tr", data_step_error="charge")
    assert "ValueError: card declined" in step_error.words
    assert "_charge_card" in step_error.one("pre", class_="traceback").text
    assert page.has("form", id="resume-form")
    assert not page.has("form", id="cancel-form")
    assert not page.has("form", id="event-form")


def test_a_waiting_run_shows_its_wait_buffered_events_and_forms(dash: Dash) -> None:
    requires(dash, "list_buffered_events")
    run_id = dash.enqueue(WAITER)
    dash.call(dash.storage.deliver_event, run_id, "nudge", codec.encode({"k": 1}), event_id="e-1")
    page = dash.page(f"/runs/{run_id}")
    assert page.one(id="run-status").words == "waiting"
    assert "event 'approval'" in page.words
    assert page.one("tr", data_step="approval").one("td", class_="status").words == "waiting"
    events = page.one(id="buffered-events")
    item = events.one("li", data_event="nudge")
    assert "e-1" in item.words
    assert '{"k": 1}' in item.words
    assert page.has("form", id="cancel-form")
    assert page.has("form", id="event-form")
    event_form = page.one("form", id="event-form")
    assert event_form.one("input", name="event").attrs["value"] == "approval"
    assert event_form.has("textarea", name="payload")
    assert event_form.has("input", name="event_id")


def test_parent_and_child_link_to_each_other(dash: Dash) -> None:
    parent_id = dash.enqueue(PARENT, {"id": 7})
    assert dash.record(parent_id).status == "completed"
    page = dash.page(f"/runs/{parent_id}")
    (child,) = page.one(id="children").all("a", class_="child-link")
    child_page = dash.page(child.attrs["href"])
    assert child_page.one(id="run-workflow").words == "label"
    assert child_page.one("a", id="parent-link").attrs["href"] == f"/runs/{parent_id}"
    assert '"label-7"' in child_page.one("pre", id="run-output").text


def test_a_held_back_run_says_why(dash: Dash) -> None:
    run_id = dash.create("idle", {}, debounce_key="customer-9", delay=timedelta(minutes=5))
    page = dash.page(f"/runs/{run_id}")
    assert "debounced by key 'customer-9'" in page.one(id="hold-reason").words
    badge = dash.page("/runs").one("tr", data_run_id=run_id).one(class_="badge")
    assert "held" in badge.attrs["class"].split()


def test_a_run_held_after_a_workflow_change_says_why_and_shows_its_version(dash: Dash) -> None:
    old = workflow("versioned").step("charge", _add).wait_for_event("go").step("ship", _add)
    new = (
        workflow("versioned", version=2, on_incompatible="hold")
        .step("charge", _add)
        .step("check", _add)
        .wait_for_event("go")
        .step("ship", _add)
    )

    async def work() -> str:
        run_id = ""
        for wf in (old, new):
            async with Engine(
                storage=dash.storage,
                workflows=[wf],
                worker=False,
                close_storage=False,
                load_entry_points=False,
            ) as engine:
                if wf is old:
                    run_id = (await engine.enqueue(wf, {})).id
                else:
                    assert await dash.storage.deliver_event(run_id, "go", "null")
                assert await engine.tick() == 1
        return run_id

    run_id = dash.call(work)
    page = dash.page(f"/runs/{run_id}")
    reason = page.one(id="hold-reason").words
    assert "held by version 2" in reason, reason
    assert "step 'check' comes before" in reason, reason
    facts = page.one("dl", class_="facts").words
    assert f"Version1 {old.fingerprint}" in facts, facts
    assert "Waiting for" not in facts  # the hold says it


def test_fragment_is_the_live_region_only(dash: Dash) -> None:
    run_id = dash.enqueue(OK)
    for path in (f"/runs/{run_id}?fragment=1", "/runs?fragment=1", "/?fragment=1"):
        html = dash.get(path).text
        assert html.lstrip().startswith('<div id="live"'), html[:200]
        assert "<html" not in html
    by_header = dash.get(f"/runs/{run_id}", headers={"x-reflow-fragment": "1"}).text
    assert by_header.lstrip().startswith('<div id="live"')


# -- actions ------------------------------------------------------------------------


def _flash(dash: Dash, response: httpx.Response) -> Node:
    assert response.status_code == 303, response.text[:2000]
    page = dash.page(response.headers["location"])
    return page.one(id="flash")


def test_cancel_a_waiting_run(dash: Dash) -> None:
    run_id = dash.enqueue(WAITER)
    response = dash.post(f"/runs/{run_id}/cancel", token=dash.csrf(f"/runs/{run_id}"))
    assert response.headers["location"] == f"/runs/{run_id}"
    assert "Cancelled the run" in _flash(dash, response).words
    assert dash.record(run_id).status == "cancelled"
    # The message shows once.
    assert not dash.page(f"/runs/{run_id}").has(id="flash")
    again = dash.post(f"/runs/{run_id}/cancel")
    assert "already cancelled" in _flash(dash, again).words


def test_resume_a_failed_run(dash: Dash) -> None:
    run_id = dash.enqueue(FAILING)
    response = dash.post(f"/runs/{run_id}/resume")
    assert "Queued the run again" in _flash(dash, response).words
    assert dash.record(run_id).status == "pending"
    refused = dash.post(f"/runs/{run_id}/resume")
    assert "is pending, not failed or cancelled" in _flash(dash, refused).words


def test_send_an_event_wakes_the_run(dash: Dash) -> None:
    run_id = dash.enqueue(WAITER)
    response = dash.post(
        f"/runs/{run_id}/events",
        {"event": "approval", "payload": '{"approved": true}', "event_id": "ev-1"},
    )
    assert "Sent event 'approval' (id 'ev-1')" in _flash(dash, response).words
    dash.drain()
    record = dash.record(run_id)
    assert record.status == "completed"
    assert codec.decode(record.output) == {"approved": True}


def test_an_event_with_invalid_json_is_not_sent(dash: Dash) -> None:
    run_id = dash.enqueue(WAITER)
    response = dash.post(
        f"/runs/{run_id}/events", {"event": "approval", "payload": '{"approved": tru'}
    )
    assert response.status_code == 400
    page = parse(response.text)
    assert "the payload is not JSON" in page.one(id="flash").words
    form = page.one("form", id="event-form")
    assert form.one("textarea", name="payload").text == '{"approved": tru'
    dash.drain()
    assert dash.record(run_id).status == "waiting"
    if hasattr(dash.storage, "list_buffered_events"):
        assert dash.call(dash.storage.list_buffered_events, run_id) == []


def test_an_event_for_a_finished_run_is_refused(dash: Dash) -> None:
    run_id = dash.enqueue(WAITER)
    token = dash.csrf(f"/runs/{run_id}")  # the page is open while the run ends
    dash.call(dash.storage.update_run_status, run_id, "cancelled")
    response = dash.post(
        f"/runs/{run_id}/events", {"event": "approval", "payload": ""}, token=token
    )
    assert response.status_code == 400
    assert "missing or has already finished" in parse(response.text).one(id="flash").words


def test_trigger_pause_and_resume_a_schedule(dash: Dash) -> None:
    dash.schedule("hourly", OK, {"n": 41})
    response = dash.post("/schedules/trigger", {"key": "hourly"})
    flash = _flash(dash, response)
    assert "from schedule 'hourly'" in flash.words
    run_link = flash.one("a").attrs["href"]
    run_page = dash.page(run_link)
    assert run_page.one(id="run-workflow").words == "ok"
    assert '"n": 41' in run_page.one("pre", id="run-input").text

    assert (
        "Paused schedule 'hourly'"
        in _flash(dash, dash.post("/schedules/pause", {"key": "hourly"})).words
    )
    row = dash.page("/schedules").one("tr", data_schedule="hourly")
    assert row.one("td", class_="paused").words == "paused"
    assert row.has("form", class_="resume-form")
    assert not row.has("form", class_="pause-form")
    resumed = dash.post("/schedules/resume", {"key": "hourly"})
    assert "Resumed schedule 'hourly'" in _flash(dash, resumed).words
    (stored,) = dash.call(dash.storage.list_schedules)
    assert not stored.paused
    missing = dash.post("/schedules/trigger", {"key": "nope"})
    assert "No schedule 'nope'" in _flash(dash, missing).words


# -- CSRF and read-only -------------------------------------------------------------


def test_a_post_without_the_right_token_or_origin_changes_nothing(dash: Dash) -> None:
    run_id = dash.enqueue(WAITER)
    token = dash.csrf(f"/runs/{run_id}")
    attempts = [
        {"token": ""},
        {"token": "x" * 43},
        {"token": token, "headers": {"origin": "https://evil.example"}},
        {"token": token, "headers": {"origin": "null", "referer": "https://evil.example/x"}},
    ]
    for attempt in attempts:
        response = dash.post(f"/runs/{run_id}/cancel", **attempt)  # type: ignore[arg-type]
        assert response.status_code == 403, attempt
        assert "Nothing was changed" in response.text
    # Neither Origin nor Referer: refused too.
    bare = dash.client.post(
        f"/runs/{run_id}/cancel", data={"csrf_token": token}, follow_redirects=False
    )
    assert bare.status_code == 403
    # A token of another browser (no cookie here) is refused.
    fresh = TestClient(dash.client.app, base_url=ORIGIN)
    stolen = fresh.post(
        f"/runs/{run_id}/cancel",
        data={"csrf_token": token},
        headers={"origin": ORIGIN},
        follow_redirects=False,
    )
    assert stolen.status_code == 403
    dash.schedule("hourly", OK)
    assert dash.post("/schedules/pause", {"key": "hourly"}, token="").status_code == 403
    assert dash.post(f"/runs/{run_id}/events", {"event": "approval"}, token="").status_code == 403
    assert dash.record(run_id).status == "waiting"
    (schedule,) = dash.call(dash.storage.list_schedules)
    assert not schedule.paused
    # The same request with the token and a Referer of the dashboard goes through.
    ok = dash.post(
        f"/runs/{run_id}/cancel", token=token, headers={"origin": "", "referer": f"{ORIGIN}/runs"}
    )
    assert ok.status_code == 303
    assert dash.record(run_id).status == "cancelled"


def test_read_only_has_no_forms_and_refuses_posts(open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(read_only=True)
    waiting = dash.enqueue(WAITER)
    failed = dash.enqueue(FAILING)
    dash.schedule("hourly", OK)
    for path in ("/", "/runs", f"/runs/{waiting}", f"/runs/{failed}", "/schedules", "/workers"):
        html = dash.get(path).text
        assert "<form" not in html.replace('<form id="run-filter"', ""), path
        assert 'method="post"' not in html, path
    assert "read-only" in dash.page("/").words
    for path in (f"/runs/{waiting}/cancel", f"/runs/{failed}/resume", f"/runs/{waiting}/events"):
        response = dash.client.post(
            path, data={"event": "approval"}, headers={"origin": ORIGIN}, follow_redirects=False
        )
        assert response.status_code in (404, 405), path
    for path in ("/schedules/trigger", "/schedules/pause"):
        response = dash.client.post(path, data={"key": "hourly"}, headers={"origin": ORIGIN})
        assert response.status_code in (404, 405), path
    assert dash.record(waiting).status == "waiting"
    assert dash.record(failed).status == "failed"
    assert len(dash.call(dash.storage.list_runs).runs) == 2


# -- authentication -----------------------------------------------------------------


def test_token_auth_by_header_and_by_login(open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(auth=TokenAuth("s3cret-token"))
    denied = dash.page("/", status=401)
    assert denied.has("form", id="login-form")
    assert "s3cret-token" not in dash.get("/runs", status=401).text
    assert dash.get("/healthz").text == "ok"
    assert dash.get("/static/style.css").status_code == 200
    assert dash.get("/", headers={"authorization": "Bearer wrong"}, status=401)
    assert dash.get("/", headers={"authorization": "Bearer s3cret-token"}).status_code == 200

    wrong = dash.get("/runs?token=nope", status=401)
    assert "not right" in wrong.text
    login = dash.get("/runs?status=failed&token=s3cret-token", status=303)
    assert login.headers["location"] == "/runs?status=failed"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "s3cret-token" not in cookie
    assert dash.page("/runs?status=failed").one("h1").words == "Runs"
    logout = dash.post("/logout")
    assert logout.status_code == 303
    dash.get("/", status=401)

    # The login form: POST /login with the CSRF token of the sign-in page.
    page = parse(dash.get("/workers", status=401).text)
    form = page.one("form", id="login-form")
    data = {i.attrs["name"]: i.attrs.get("value", "") for i in form.all("input")}
    data["token"] = "s3cret-token"
    signed_in = dash.client.post(
        form.attrs["action"], data=data, headers={"origin": ORIGIN}, follow_redirects=False
    )
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/workers"
    assert dash.page("/workers").one("h1").words == "Workers"


def test_a_login_form_never_redirects_elsewhere(open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(auth=TokenAuth("t0ken"))
    dash.get("/", status=401)
    token = dash.client.cookies["reflow_csrf"]
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil"):
        response = dash.client.post(
            "/login",
            data={"csrf_token": token, "token": "t0ken", "next": target},
            headers={"origin": ORIGIN},
            follow_redirects=False,
        )
        assert response.headers["location"] == "/", target


def test_basic_auth(open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(auth=BasicAuth("ops", "pa:ss wörd"))
    denied = dash.get("/", status=401)
    assert denied.headers["www-authenticate"].startswith("Basic ")

    def basic(user: str, password: str) -> dict[str, str]:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"authorization": f"Basic {raw}"}

    assert dash.get("/", headers=basic("ops", "pa:ss wörd")).status_code == 200
    dash.get("/", headers=basic("ops", "wrong"), status=401)
    dash.get("/", headers=basic("root", "pa:ss wörd"), status=401)
    dash.get("/", headers={"authorization": "Basic !!!"}, status=401)
    assert repr(BasicAuth("ops", "pa:ss wörd")) == "BasicAuth(username='ops', password='***')"
    assert "s3cret" not in repr(TokenAuth("s3cret"))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_embedding_applications_own_check(open_dash: Callable[..., Dash], kind: str) -> None:
    def allowed(request: Request) -> bool:
        return request.headers.get("x-role") == "admin"

    async def allowed_async(request: Request) -> bool:
        return allowed(request)

    dash = open_dash(auth=allowed if kind == "sync" else allowed_async)
    assert dash.page("/", status=401).one("h1").words == "Not authorized"
    assert dash.get("/", headers={"x-role": "admin"}).status_code == 200
    run_id = dash.enqueue(WAITER)
    dash.get(f"/live?view=run&id={run_id}", status=401)
    dash.client.headers["x-role"] = "admin"
    assert dash.post(f"/runs/{run_id}/cancel").status_code == 303
    assert dash.record(run_id).status == "cancelled"


# -- mounting -----------------------------------------------------------------------


def test_mounted_under_a_prefix(make_storage: Callable[[], Storage]) -> None:
    storage = make_storage()

    async def host_runs(request: Request) -> PlainTextResponse:
        return PlainTextResponse("the host's own runs page")

    dashboard = create_app(storage, title="Ops")
    host = Starlette(
        routes=[
            Route("/runs", host_runs, name="runs"),  # the same name as a dashboard route
            Mount("/admin/reflow", app=dashboard, name="reflow"),
        ]
    )
    with TestClient(host, base_url=ORIGIN) as client:
        assert client.portal is not None
        client.portal.call(storage.initialize)
        dash = Dash(client, storage)
        waiting = dash.enqueue(WAITER)
        page = dash.page("/admin/reflow/")
        nav = [a.attrs["href"] for a in page.one("nav", class_="nav").all("a")]
        assert nav == [
            "/admin/reflow/",
            "/admin/reflow/runs",
            "/admin/reflow/schedules",
            "/admin/reflow/workers",
        ]
        assert (
            page.one("link", rel="stylesheet")
            .attrs["href"]
            .startswith("/admin/reflow/static/style.css")
        )
        assert dash.get("/admin/reflow/static/live.js").status_code == 200
        assert page.one(data_live=None).attrs["data-live"].startswith("/admin/reflow/live?")
        runs = dash.page("/admin/reflow/runs")
        link = runs.one("a", class_="run-link").attrs["href"]
        assert link == f"/admin/reflow/runs/{waiting}"
        assert runs.one("form", id="run-filter").attrs["action"] == "/admin/reflow/runs"
        run_page = dash.page(link)
        cancel = run_page.one("form", id="cancel-form").attrs["action"]
        assert cancel == f"/admin/reflow/runs/{waiting}/cancel"
        token = (
            run_page.one("form", id="cancel-form").one("input", name="csrf_token").attrs["value"]
        )
        response = dash.post(cancel, token=token)
        assert response.headers["location"] == f"/admin/reflow/runs/{waiting}"
        assert "path=/admin/reflow" in response.headers["set-cookie"].lower()
        assert "Cancelled the run" in _flash(dash, response).words
        assert dash.record(waiting).status == "cancelled"
        assert (
            dash.get(f"/admin/reflow/runs?q={waiting}", status=303).headers["location"]
            == f"/admin/reflow/runs/{waiting}"
        )
        assert client.get("/runs").text == "the host's own runs page"
        client.portal.call(storage.close)


def test_mounted_with_a_url_opens_the_storage_on_first_use(tmp_path: Path) -> None:
    if _SQLITE_MISSING is not None:
        pytest.skip(f"reflow_sqlite does not import ({_SQLITE_MISSING})")
    url = f"sqlite:///{tmp_path / 'mounted.db'}"
    dashboard = create_app(url)
    host = Starlette(routes=[Mount("/reflow", app=dashboard)])
    with TestClient(host, base_url=ORIGIN) as client:
        assert client.get("/reflow/healthz").text == "ok"
        assert parse(client.get("/reflow/runs").text).one("h1").words == "Runs"
        # The host runs no startup of the dashboard; its own lifespan closes it.
        assert client.portal is not None
        client.portal.call(dashboard.state.reflow_dashboard.shutdown)


def test_a_url_is_opened_at_startup_and_closed_at_shutdown(tmp_path: Path) -> None:
    if _SQLITE_MISSING is not None:
        pytest.skip(f"reflow_sqlite does not import ({_SQLITE_MISSING})")
    url = f"sqlite:///{tmp_path / 'own.db'}"
    app = create_app(url)
    with TestClient(app, base_url=ORIGIN) as client:
        assert client.get("/healthz").text == "ok"
        state = app.state.reflow_dashboard
        assert state._ready
    assert not state._ready
    assert state._store is None


# -- live updates -------------------------------------------------------------------


class _Stream:
    """Reads a server-sent event stream on a thread, line by line."""

    def __init__(self, client: TestClient, path: str) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._context = client.stream("GET", path)
        self.response = self._context.__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                self.lines.put(line)
        except Exception:  # closed under it: the test is over
            pass
        self.lines.put(None)

    def wait_for(self, wanted: str, timeout: float = 5.0) -> list[str]:
        """The lines up to the first that starts with ``wanted``."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"the stream ended before {wanted!r}: {seen}")
            seen.append(line)
            if line.startswith(wanted):
                return seen
        raise AssertionError(f"no {wanted!r} within {timeout}s: {seen}")

    def close(self) -> None:
        self._context.__exit__(None, None, None)
        self._thread.join(timeout=5)


def test_the_run_stream_says_refresh_when_the_run_changes(dash: Dash) -> None:
    run_id = dash.enqueue(WAITER)
    page = dash.page(f"/runs/{run_id}")
    live = page.one(data_live=None).attrs["data-live"]
    fp = parse_qs(urlsplit(live).query)["fp"][0]
    assert page.one(id="live").attrs["data-fp"] == fp
    stream = _Stream(dash.client, live)
    try:
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        stream.wait_for(": connected")
        # Nothing changed since the page was rendered: no refresh, only its id.
        first = stream.wait_for("id: ")
        assert "event: refresh" not in first
        assert first[-1] == f"id: {fp}"
        dash.call(dash.storage.deliver_event, run_id, "approval", codec.encode({"ok": 1}))
        dash.drain()
        assert dash.record(run_id).status == "completed"
        seen = stream.wait_for("event: refresh")
        assert seen[-1] == "event: refresh"
        fresh = dash.get(f"/runs/{run_id}?fragment=1").text
        assert 'id="run-status"' in fresh
        assert parse(fresh).one(id="run-status").words == "completed"
    finally:
        stream.close()


def test_the_runs_stream_says_refresh_when_a_run_is_added(dash: Dash) -> None:
    dash.create("idle", {})
    live = dash.page("/runs?workflow=idle").one(data_live=None).attrs["data-live"]
    assert parse_qs(urlsplit(live).query)["workflow"] == ["idle"]
    stream = _Stream(dash.client, live)
    try:
        stream.wait_for("id: ")
        dash.create("other", {})  # not shown by this page: no refresh for it
        dash.create("idle", {"second": True})
        seen = stream.wait_for("event: refresh")
        assert seen.count("event: refresh") == 1
    finally:
        stream.close()


@pytest.mark.parametrize("server", ["postgres", "redis"])
def test_a_wake_up_hint_refreshes_a_runs_stream_before_its_next_tick(
    server: str, request: pytest.FixtureRequest
) -> None:
    """On a backend that sends wake-up hints, a run another process creates
    reaches a watched runs list at once, not at the next 30 s poll."""
    url = request.getfixturevalue(f"{server}_url")
    storage, other = open_storage(url), open_storage(url)
    with TestClient(create_app(storage, refresh="30s"), base_url=ORIGIN) as client:
        dash = Dash(client, storage)
        dash.call(storage.initialize)
        dash.call(other.initialize)
        try:
            live = dash.page("/runs").one(data_live=None).attrs["data-live"]
            stream = _Stream(client, live)
            try:
                stream.wait_for("id: ")
                dash.call(other.create_run, NewRun(workflow="hinted", input=codec.encode(1)))
                seen = stream.wait_for("event: refresh", timeout=10)
                assert seen[-1] == "event: refresh"
            finally:
                stream.close()
        finally:
            dash.call(other.close)
            dash.call(storage.close)


def test_a_stream_seen_from_a_stale_page_refreshes_at_once(dash: Dash) -> None:
    stream = _Stream(dash.client, "/live?view=overview&fp=stale")
    try:
        stream.wait_for("event: refresh")
    finally:
        stream.close()
    dash.get("/live?view=nothing", status=400)


def test_a_stream_for_a_missing_run_ends(dash: Dash) -> None:
    stream = _Stream(dash.client, "/live?view=run&id=missing&fp=x")
    try:
        stream.wait_for("data: gone")
        assert stream.lines.get(timeout=5) == ""
        assert stream.lines.get(timeout=5) is None
    finally:
        stream.close()


def test_streams_end_when_the_dashboard_shuts_down(dash: Dash) -> None:
    stream = _Stream(dash.client, "/live?view=overview")
    try:
        stream.wait_for("id: ")
        app = dash.client.app
        assert isinstance(app, Starlette)
        app.state.reflow_dashboard.close_streams()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if stream.lines.get(timeout=5) is None:
                break
        else:
            raise AssertionError("the stream went on after close_streams")
    finally:
        stream.close()


def test_an_idle_stream_sends_a_comment_now_and_then(
    dash: Dash, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reflow_dashboard import _app

    monkeypatch.setattr(_app, "HEARTBEAT", 0.1)
    stream = _Stream(dash.client, "/live?view=overview")
    try:
        stream.wait_for("id: ")
        seen = stream.wait_for(": ping")
        assert "event: refresh" not in seen
    finally:
        stream.close()


def test_a_stream_ends_when_the_browser_goes_away() -> None:
    """Driven as a server drives it: the stream stops once ``receive`` says
    the client disconnected, without the response being cancelled."""

    async def scenario() -> list[bytes]:
        storage = MemoryStorage()
        await storage.initialize()
        app = create_app(storage, refresh="20ms")
        gone = asyncio.Event()
        greeted = asyncio.Event()
        sent: list[bytes] = []

        async def receive() -> dict[str, Any]:
            if not sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                sent.append(message.get("body", b""))
                if len(sent) == 2:  # the greeting, then the first id
                    greeted.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/live",
            "raw_path": b"/live",
            "root_path": "",
            "query_string": b"view=overview",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80),
        }
        served = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(greeted.wait(), timeout=5)
        gone.set()
        await asyncio.wait_for(served, timeout=5)
        await storage.close()
        return sent

    sent = asyncio.run(scenario())
    assert sent[0].startswith(b"retry: ")
    assert sent[1].startswith(b"id: ")


# -- untrusted text -----------------------------------------------------------------


def _assert_escaped(html: str, where: str) -> None:
    for raw in RAW_TAGS:
        assert raw not in html, f"{raw!r} unescaped on {where}"
    assert any(text in html for text in ESCAPED), f"the hostile text is not shown on {where}"


def test_hostile_names_and_values_render_as_text(dash: Dash) -> None:
    requires(dash, "list_buffered_events", "find_runs_by_key")
    waiting = dash.enqueue(HOSTILE_WAITER, {"note": HOSTILE}, idempotency_key=f"key {HOSTILE}")
    dash.call(dash.storage.deliver_event, waiting, f"other {HOSTILE}", codec.encode(HOSTILE))
    failed = dash.enqueue(HOSTILE_FAILING, {"note": HOSTILE})
    dash.announce(f"worker {HOSTILE}", (HOSTILE,))
    dash.schedule(f"schedule {HOSTILE}", HOSTILE_WAITER, {"note": HOSTILE})
    assert dash.record(waiting).status == "waiting"
    assert dash.record(failed).status == "failed"

    pages = {
        "/": "the overview (queue and workers)",
        "/runs": "the runs list",
        f"/runs?workflow={HOSTILE}": "the runs list filtered by the name",
        f"/runs?q=key {HOSTILE}": "the idempotency key search",
        f"/runs/{waiting}": "the waiting run",
        f"/runs/{failed}": "the failed run",
        "/schedules": "the schedules",
        "/workers": "the workers",
        f"/runs/{HOSTILE}": "the 404 page",
    }
    for path, where in pages.items():
        response = dash.client.get(path, follow_redirects=False)
        assert response.status_code in (200, 404), (path, response.status_code)
        _assert_escaped(response.text, where)

    run = dash.page(f"/runs/{waiting}")
    assert HOSTILE in run.one(id="run-workflow").words
    assert HOSTILE in run.one("pre", id="run-input").text.replace('\\"', '"')
    assert run.one("tr", data_step=f"step {HOSTILE}").has("details")
    assert HOSTILE in run.one("tr", data_step=f"step {HOSTILE}").text.replace('\\"', '"')
    assert run.has("li", data_event=f"other {HOSTILE}")
    assert run.has("tr", data_step=f"event {HOSTILE}")
    failed_page = dash.page(f"/runs/{failed}")
    assert HOSTILE in failed_page.one(id="run-error").one(class_="error-message").words
    assert parse(dash.get("/").text).has("tr", data_workflow=HOSTILE)
    assert parse(dash.get("/schedules").text).has("tr", data_schedule=f"schedule {HOSTILE}")
    stream = _Stream(dash.client, f"/live?view=run&id={waiting}")
    try:
        stream.wait_for("id: ")
    finally:
        stream.close()


def test_a_hostile_title_and_flash_render_as_text(open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(title=HOSTILE)
    run_id = dash.enqueue(WAITER)
    html = dash.get("/").text
    _assert_escaped(html, "the page header")
    response = dash.post(f"/runs/{run_id}/events", {"event": f"e {HOSTILE}", "payload": "1"})
    _assert_escaped(dash.get(response.headers["location"]).text, "the flash message")


# -- charts -------------------------------------------------------------------------


def test_chart_bars_count_by_minute_and_by_quarter_hour() -> None:
    now = datetime(2026, 3, 1, 12, 7, 30, tzinfo=UTC)
    history = [
        FinishedMinute(datetime(2026, 3, 1, 12, 7, tzinfo=UTC), completed=4, failed=1, cancelled=0),
        FinishedMinute(datetime(2026, 3, 1, 12, 1, tzinfo=UTC), completed=1, failed=0, cancelled=2),
        FinishedMinute(datetime(2026, 3, 1, 10, 0, tzinfo=UTC), completed=7, failed=0, cancelled=0),
    ]
    hour = build_chart("h", history, now, minutes=60)
    assert len(hour.bars) == 60
    assert hour.bars[-1].start == datetime(2026, 3, 1, 12, 7, tzinfo=UTC)
    assert (hour.bars[-1].completed, hour.bars[-1].failed) == (4, 1)
    assert hour.totals == {"completed": 5, "failed": 1, "cancelled": 2}
    assert hour.scale == 5
    assert [s.status for s in hour.bars[-1].segments] == ["completed", "failed"]
    assert hour.bars[-1].title == "12:07 UTC: 4 completed, 1 failed, 0 cancelled"
    day = build_chart("d", history, now, minutes=1440, bucket=15)
    assert len(day.bars) == 97  # 12:07 is not on a quarter hour: the first bar is cut
    assert day.bars[-1].start == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert day.bars[-1].total == 8
    assert day.bars[-1].title.startswith("12:00 to 12:15 UTC: 5 completed")
    assert sum(b.total for b in day.bars) == 15
    empty = build_chart("e", [], now, minutes=60)
    assert empty.empty
    assert empty.scale == 1


# -- the command line ---------------------------------------------------------------


def _reflow(*args: str, env: dict[str, str] | None = None) -> Any:
    cli = build_cli(plugins=[commands])
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_the_command_refuses_a_public_address_without_auth() -> None:
    result = _reflow("dashboard", "--url", "memory://", "--host", "0.0.0.0")
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0" in result.output
    assert "--token" in result.output
    both = _reflow("dashboard", "--url", "memory://", "--token", "t", "--basic-auth", "a:b")
    assert both.exit_code == 2
    malformed = _reflow("dashboard", "--url", "memory://", "--basic-auth", "no-colon")
    assert malformed.exit_code == 2
    no_url = _reflow("dashboard", env={"REFLOW_URL": ""})
    assert no_url.exit_code == 2
    assert "--url" in no_url.output


def _command(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reflow_core", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_the_command_refuses_a_public_address_as_a_process() -> None:
    proc = _command("dashboard", "--url", "memory://", "--host", "0.0.0.0", env={})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0" in err


@pytest.mark.slow
def test_the_command_serves_the_dashboard(tmp_path: Path) -> None:
    if _SQLITE_MISSING is not None:
        pytest.skip(f"reflow_sqlite does not import ({_SQLITE_MISSING})")
    port = free_port()
    proc = _command(
        "dashboard",
        "--port",
        str(port),
        env={
            "REFLOW_URL": f"sqlite:///{tmp_path / 'served.db'}",
            "REFLOW_DASHBOARD_TOKEN": "process-token",
        },
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/runs", headers={"authorization": "Bearer process-token"}
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert b'id="runs"' in r.read()
        for path in ("/runs", "/runs?token=process-token"):
            # Without a cookie jar the login's redirect comes back unauthenticated.
            with pytest.raises(urllib.error.HTTPError) as denied:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            assert denied.value.code == 401
            denied.value.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "process-token" not in out + err
    assert f"http://127.0.0.1:{port}" in out + err
