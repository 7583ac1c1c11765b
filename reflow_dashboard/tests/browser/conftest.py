"""Fixtures for the dashboard's browser tests.

* ``site`` (one per module): a real dashboard, ``create_app`` served by
  uvicorn on a free 127.0.0.1 port, on a SQLite file, and a real
  :class:`~reflow_core.Engine` worker on the same file serving the test
  workflows below, so runs really execute. Each lives on an event loop of
  its own in a background thread, as they would in two processes; the
  dashboard opens its own storage from the URL.
* ``browser`` (one per module): headless Chromium driven by Playwright. The
  browser is the system's (``/usr/bin/chromium``, or ``REFLOW_TEST_CHROMIUM``);
  Playwright never downloads one. Without it the tests are skipped, except
  under CI (the ``CI`` environment variable set), where they fail.
* ``page``: a fresh browser context at a 1280x800 viewport whose base URL is
  the dashboard. It records every dialog (and dismisses it), every uncaught
  script error and every response of status 500 or above; the last two fail
  the test.

The test workflows take their behaviour from their input, so that one
module-wide worker serves every test: ``invoice-sync`` fails at its ``post``
step while the :class:`Gate` its input names is failing, and holds there
until the gate is released; ``expense-approval`` waits for an ``approval``
event; ``nightly-report`` runs on a schedule; ``support-ticket`` echoes its
input's ``note`` and, when asked to, raises an error carrying it;
``fulfil-order`` starts a ``shipping-label`` child run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reflow_core import Engine, StepContext, workflow

# The tests drive the system's Chromium; Playwright must never fetch its own.
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

CHROMIUM = os.environ.get("REFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
"""The Chromium executable the tests drive (Debian's package by default)."""

VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS = Path(__file__).resolve().parents[3] / "docs" / "images"
"""Where the page screenshots the docs show are written (``dashboard-<page>.png``)."""

T = TypeVar("T")


# -- the test workflows -------------------------------------------------------------


class Gate:
    """Controls the ``post`` step of the ``invoice-sync`` runs whose input
    names it: while ``failing`` the step raises; otherwise it waits until
    ``release`` is called (at most ``hold_for`` seconds) and succeeds."""

    def __init__(self) -> None:
        self.failing = True
        self.entered = threading.Event()
        self._released = threading.Event()
        self.hold_for = 20.0

    def release(self) -> None:
        self._released.set()

    def wait(self) -> None:
        self.entered.set()
        if not self._released.wait(self.hold_for):
            raise TimeoutError("the test never released the gate")


GATES: dict[str, Gate] = {}
"""Gates by name, as ``invoice-sync`` inputs name them (``{"gate": NAME}``)."""


class LedgerUnavailableError(RuntimeError):
    """What the ledger of ``invoice-sync`` raises while its gate is failing."""


async def fetch_invoice(ctx: StepContext[dict[str, Any], None]) -> dict[str, Any]:
    return {"invoice": ctx.input["invoice"], "amount": ctx.input.get("amount", 120)}


def post_to_ledger(ctx: StepContext[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    # A plain def: the engine runs it in a worker thread, so it may block on the gate.
    gate = GATES.get(str(ctx.input.get("gate", "")))
    if gate is not None:
        if gate.failing:
            raise LedgerUnavailableError(
                f"ledger unavailable while posting {ctx.prev['invoice']}: connection reset by peer"
            )
        gate.wait()
    return {"posted": ctx.prev["invoice"], "entry": f"LE-{ctx.prev['amount']}"}


invoice_sync = workflow("invoice-sync").step("fetch", fetch_invoice).step("post", post_to_ledger)


async def submit_expense(ctx: StepContext[dict[str, Any], None]) -> dict[str, Any]:
    return {"claim": ctx.input["claim"], "amount": ctx.input["amount"]}


async def record_approval(ctx: StepContext[dict[str, Any], Any]) -> str:
    return f"claim {ctx.input['claim']} approved by {ctx.prev['by']}"


expense_approval = (
    workflow("expense-approval")
    .step("submit", submit_expense)
    .wait_for_event("approval", timeout="1h")
    .step("record", record_approval)
)


async def build_report(ctx: StepContext[dict[str, Any], None]) -> dict[str, Any]:
    return {"team": ctx.input["team"], "rows": 42}


nightly_report = workflow("nightly-report").step("build", build_report)


async def receive_ticket(ctx: StepContext[dict[str, Any], None]) -> dict[str, Any]:
    return {"echo": ctx.input["note"]}


async def triage_ticket(ctx: StepContext[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    if ctx.input.get("explode"):
        raise ValueError(ctx.input["note"])
    return {"still": ctx.prev["echo"]}


support_ticket = (
    workflow("support-ticket").step("receive", receive_ticket).step("triage", triage_ticket)
)


async def make_label(ctx: StepContext[dict[str, Any], None]) -> dict[str, Any]:
    return {"label": f"{ctx.input['order']}-LBL"}


shipping_label = workflow("shipping-label").step("print", make_label)


async def pack_order(ctx: StepContext[dict[str, Any], None]) -> dict[str, Any]:
    return {"order": ctx.input["order"]}


fulfil_order = workflow("fulfil-order").step("pack", pack_order).child("label", shipping_label)

WORKFLOWS = [
    invoice_sync,
    expense_approval,
    nightly_report,
    support_ticket,
    shipping_label,
    fulfil_order,
]
SCHEDULE_KEY = "nightly-report-ops"
IDEMPOTENCY_KEY = "invoice:INV-3001"


# -- background event loops ---------------------------------------------------------


class LoopThread:
    """An asyncio event loop running in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        """Run ``coro`` on the loop and return its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        with contextlib.suppress(Exception):
            self.call(finish(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# -- the dashboard and its worker ---------------------------------------------------


@dataclass
class Site:
    """A running dashboard (``url``) and the engine working on its storage."""

    url: str
    storage_url: str
    engine: Engine
    worker: LoopThread
    errors: list[logging.LogRecord] = field(default_factory=list)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        """Run ``coro`` on the worker's loop (where ``engine`` lives)."""
        return self.worker.call(coro, timeout)

    def enqueue(self, wf: Any, input: Any) -> str:
        return self.call(self.engine.enqueue(wf, input)).id

    def wait_status(self, run_id: str, *statuses: str, timeout: float = 10.0) -> Any:
        """Poll the engine until run ``run_id`` has one of ``statuses``."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.call(self.engine.get_run_status(run_id))
            if run.status in statuses:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"run {run_id} is {run.status}, not {' or '.join(statuses)}, after {timeout}s"
                )
            time.sleep(0.05)


class _ErrorRecords(logging.Handler):
    """Keeps every record at ERROR or above (a 500 logged by uvicorn, an
    error the dashboard or the engine logs)."""

    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _seed(site: Site) -> None:
    """Runs of every kind, so that the pages show what a working system
    shows: finished runs of a few workflows, two that failed, one created
    with an idempotency key, a waiting one, a child run and its parent, and
    two schedules."""
    GATES["ledger-down"] = Gate()  # never released: its runs fail for good
    failed = [
        site.enqueue(invoice_sync, {"invoice": f"INV-20{n}", "amount": n, "gate": "ledger-down"})
        for n in (17, 18)
    ]
    ids = [site.enqueue(invoice_sync, {"invoice": f"INV-{n}", "amount": n}) for n in range(1, 9)]
    keyed = site.call(
        site.engine.enqueue(
            invoice_sync, {"invoice": "INV-3001", "amount": 310}, idempotency_key=IDEMPOTENCY_KEY
        )
    )
    ids.append(keyed.id)
    ids += [site.enqueue(nightly_report, {"team": team}) for team in ("ops", "sales", "finance")]
    ids.append(site.enqueue(fulfil_order, {"order": "ORD-77"}))
    ids.append(site.enqueue(expense_approval, {"claim": "EXP-9", "amount": 75}))
    site.call(site.engine.schedule(nightly_report, {"team": "ops"}, every="24h", key=SCHEDULE_KEY))
    site.call(
        site.engine.schedule(
            nightly_report, {"team": "sales"}, cron="0 6 * * MON-FRI", key="weekday-sales"
        )
    )
    for run_id in ids[:-1]:
        site.wait_status(run_id, "completed")
    site.wait_status(ids[-1], "waiting")
    for run_id in failed:
        site.wait_status(run_id, "failed")


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """The dashboard and its worker, for the whole module."""
    import uvicorn

    from reflow_dashboard import create_app

    errors: list[logging.LogRecord] = []
    handler = _ErrorRecords(errors)
    logging.getLogger().addHandler(handler)
    stack = contextlib.ExitStack()
    stack.callback(logging.getLogger().removeHandler, handler)
    try:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-dashboard-")))
        storage_url = f"sqlite:///{tmp / 'reflow.db'}"

        worker = LoopThread("reflow-test-worker")
        stack.callback(worker.close)
        engine = Engine(
            storage=storage_url,
            workflows=WORKFLOWS,
            poll_interval="50ms",
            load_entry_points=False,
            drain_timeout="2s",
        )
        worker.call(engine.__aenter__())
        stack.callback(lambda: worker.call(engine.__aexit__(None, None, None)))

        app = create_app(storage_url, title="Reflow", refresh="250ms")
        sock = _free_socket()
        stack.callback(sock.close)
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_config=None,
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        web = LoopThread("reflow-test-dashboard")
        stack.callback(web.close)
        serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), web.loop)

        def stop_server() -> None:
            server.should_exit = True
            serving.result(10)

        stack.callback(stop_server)
        deadline = time.monotonic() + 10
        while not server.started:
            if serving.done():
                serving.result()
                raise RuntimeError("the dashboard stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard did not start within 10s")
            time.sleep(0.02)

        site = Site(
            url=f"http://127.0.0.1:{port}",
            storage_url=storage_url,
            engine=engine,
            worker=worker,
            errors=errors,
        )
        _seed(site)
        yield site
    finally:
        for gate in GATES.values():
            gate.release()
        GATES.clear()
        stack.close()


# -- the browser ----------------------------------------------------------------------


def _chromium_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"Playwright does not import: {exc}"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (install Debian's chromium, or set REFLOW_TEST_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for the module (the system's, never a download)."""
    problem = _chromium_missing()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is required under CI: {problem}")
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class PageProblems:
    """What a page did that a test may look at: the dialogs it opened (each
    dismissed), its uncaught script errors and its responses of status 500
    or above."""

    dialogs: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)


@pytest.fixture
def problems() -> PageProblems:
    return PageProblems()


@pytest.fixture
def page(browser: Any, site: Site, problems: PageProblems) -> Iterator[Any]:
    """A fresh page at a 1280x800 viewport, its base URL the dashboard."""
    context = browser.new_context(viewport=VIEWPORT, base_url=site.url)
    context.set_default_timeout(10_000)
    page = context.new_page()

    def on_dialog(dialog: Any) -> None:
        problems.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def on_response(response: Any) -> None:
        if response.status >= 500:
            problems.server_errors.append(
                f"{response.status} {response.request.method} {response.url}"
            )

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: problems.script_errors.append(str(error)))
    page.on("response", on_response)
    errors_before = len(site.errors)
    try:
        yield page
    finally:
        context.close()
    assert problems.script_errors == [], f"uncaught script errors: {problems.script_errors}"
    assert problems.server_errors == [], f"server errors: {problems.server_errors}"
    logged = [f"{r.name}: {r.getMessage()}" for r in site.errors[errors_before:]]
    assert logged == [], f"errors logged while the page was open: {logged}"


def screenshot(page: Any, name: str) -> None:
    """Write the viewport (1280x800) to docs/images/dashboard-``name``.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"dashboard-{name}.png"), full_page=False)


@pytest.fixture
def shoot() -> Callable[[Any, str], None]:
    return screenshot
