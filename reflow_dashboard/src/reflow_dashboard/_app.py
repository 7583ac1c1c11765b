"""The dashboard's Starlette application: pages, actions, the live stream.

Every read and write goes through the :class:`~reflow_core.storage.Storage`
protocol, so the dashboard works on every backend. Links are built from the
dashboard's own routes and the request's ``root_path``, never from the
embedding application's router, so mounting it anywhere (named or not, next
to routes of the same names) gives correct links.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reflow_core import Duration, admin, codec, to_seconds
from reflow_core.admin import MAX_BUFFERED, describe_error, relative, stamp
from reflow_core.engine import Engine
from reflow_core.errors import ReflowError, SerializationError
from reflow_core.options import redact, url_secrets
from reflow_core.registry import open_storage
from reflow_core.schedules import find_schedule, set_paused
from reflow_core.storage import NewRun, Storage, WakeupSource, WakeupSubscription

from . import _views as views
from ._auth import AUTH_COOKIE, Auth, BasicAuth, TokenAuth
from ._security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    FLASH_COOKIE,
    SECURITY_HEADERS,
    Flash,
    cookie_path,
    csrf_problem,
    csrf_token,
    read_flash,
    set_cookie,
    write_flash,
)
from ._version import __version__

__all__ = ["create_app"]

logger = logging.getLogger("reflow_dashboard")

LOGIN_COOKIE_AGE = 12 * 3600
"""Seconds a token login lasts."""
HEARTBEAT = 15.0
"""Seconds between comments on an idle live stream (keeps proxies from
closing it, and finds a client that went away)."""
STREAM_LIFETIME = 300.0
"""Seconds a live stream stays open; the browser then reconnects on its own
(saying which state it last saw), so a server that waits for its open
responses before stopping is never held up for longer."""
RECONNECT_MS = 2000
"""How long a browser waits before reconnecting a live stream."""


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reflow_dashboard", "templates"),
        # Every value shown is untrusted (names, inputs, outputs, errors):
        # escape everything, in every template, whatever its extension.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["statuses"] = views.STATUSES
    env.globals["active_statuses"] = views.ACTIVE_STATUSES
    env.globals["default_page"] = views.DEFAULT_PAGE
    return env


def _duration(seconds: float | None) -> str:
    """``850ms``, ``12.5s``, ``3m 20s``, ``2h 5m``, ``3d 4h``."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s".replace(".0s", "s")
    whole = int(seconds)
    for big, big_name, small, small_name in (
        (86400, "d", 3600, "h"),
        (3600, "h", 60, "m"),
        (60, "m", 1, "s"),
    ):
        if whole >= big:
            rest = (whole % big) // small
            return f"{whole // big}{big_name}" + (f" {rest}{small_name}" if rest else "")
    return f"{whole}s"  # pragma: no cover - seconds >= 60 always matches


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _is_fragment(request: Request) -> bool:
    return request.query_params.get("fragment") == "1" or "x-reflow-fragment" in request.headers


class _EveryWorkflow(Collection[str]):
    """The workflows whose wake-up hints the dashboard wants: all of them."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str)

    def __iter__(self) -> Iterator[str]:
        return iter(())  # no due-time timers of its own: it polls anyway

    def __len__(self) -> int:
        return 0


_EVERY_WORKFLOW = _EveryWorkflow()


class Dashboard:
    """The state of one dashboard application: its storage (opened from a
    URL, or the caller's), its settings and the engine its actions use."""

    def __init__(
        self,
        storage: Storage | str,
        *,
        read_only: bool,
        auth: Auth | None,
        title: str,
        refresh: float,
    ) -> None:
        self._store: Storage | None
        if isinstance(storage, str):
            self.url: str | None = storage
            self._store = open_storage(storage)  # an unknown scheme fails here
        else:
            self.url = None
            self._store = storage
        # Opened from a URL: the dashboard initializes and closes it.
        self._owned = self.url is not None
        self._ready = not self._owned
        self._engine: Engine | None = None
        self._lock = asyncio.Lock()
        self.read_only = read_only
        self.auth = auth
        self.title = title
        self.refresh = refresh
        self.secret = secrets.token_bytes(32)
        self.env = _env()
        self.router: Router = Router()
        self._closing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prints: dict[str, tuple[float, str]] = {}
        self._hinted_at = 0.0
        self._hint = asyncio.Event()
        self._hints: WakeupSubscription | None = None
        self._hints_asked = False
        self._hints_lock = asyncio.Lock()
        self.workflow_names = views.WorkflowNames()
        self._print_locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"Dashboard(read_only={self.read_only}, auth={self.auth!r})"

    # -- storage and engine ---------------------------------------------------------

    async def storage(self) -> Storage:
        """The storage; one given as a URL is opened on first use (the
        application's startup opens it, unless the dashboard is mounted in
        an application that does not run its startup)."""
        if not self._ready:
            async with self._lock:
                if not self._ready:
                    if self._store is None:  # closed at a shutdown, used again
                        assert self.url is not None
                        self._store = open_storage(self.url)
                    await self._store.initialize()
                    self._ready = True
        assert self._store is not None
        return self._store

    async def engine(self) -> Engine:
        """An engine without a worker, for the actions that go through one
        (as ``reflow runs cancel`` does)."""
        store = await self.storage()
        if self._engine is None:
            self._engine = Engine(
                storage=store, worker=False, close_storage=False, load_entry_points=False
            )
        return self._engine

    def closing(self) -> asyncio.Event:
        if self._closing is None:
            self._closing = asyncio.Event()
            self._loop = asyncio.get_running_loop()
        return self._closing

    async def hint(self) -> asyncio.Event:
        """An event set at the storage's next wake-up hint (a run created,
        handed back or requeued, an event delivered, a sleep or wait due):
        live views look again at once rather than at their next tick. On
        the first call, the dashboard subscribes where the storage sends
        hints (a :class:`~reflow_core.storage.WakeupSource`); elsewhere the
        event is never set and polling alone keeps the views current."""
        if not self._hints_asked:
            async with self._hints_lock:
                store = await self.storage()
                if not self._hints_asked and isinstance(store, WakeupSource):
                    try:
                        self._hints = await store.subscribe_wakeups(_EVERY_WORKFLOW, self._hinted)
                    except ReflowError as exc:  # polling still works
                        logger.warning("no wake-up hints: %s", self.describe(exc))
                self._hints_asked = True
        return self._hint

    def _hinted(self) -> None:
        self._hinted_at = time.monotonic()
        woken, self._hint = self._hint, asyncio.Event()
        woken.set()

    def close_streams(self) -> None:
        """End every live stream (from any thread, a signal handler included)."""
        if self._closing is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._closing.set)

    async def startup(self) -> None:
        self._closing = None  # a new start: streams may run again
        self._hint, self._hints_lock = asyncio.Event(), asyncio.Lock()
        self.closing()
        if self._owned:
            await self.storage()

    async def shutdown(self) -> None:
        self.closing().set()
        hints, self._hints = self._hints, None
        self._hints_asked = False
        if hints is not None:
            await hints.close()
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()
        if self._owned and self._ready and self._store is not None:
            store, self._store = self._store, None
            self._ready = False
            await store.close()

    def describe(self, exc: BaseException) -> str:
        """One line about an error, with every secret of the storage URL masked."""
        text = describe_error(exc)
        return redact(text, url_secrets(self.url)) if self.url else text

    # -- links ----------------------------------------------------------------------

    def path(self, request: Request, name: str, **params: str) -> str:
        root = str(request.scope.get("root_path") or "").rstrip("/")
        return root + str(self.router.url_path_for(name, **params))

    # -- live fingerprints ----------------------------------------------------------

    async def fingerprint(
        self, key: str, compute: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        """The fingerprint of view ``key``, computed at most once per refresh
        interval however many browsers watch it."""
        lock = self._print_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._prints.get(key)
            now = time.monotonic()
            fresh = cached is not None and cached[0] >= self._hinted_at
            if cached is not None and fresh and now - cached[0] < self.refresh * 0.9:
                return cached[1]
            found = await compute()
            if found is None:
                self._prints.pop(key, None)
                self._print_locks.pop(key, None)
                return None
            self._prints[key] = (now, found)
            if len(self._prints) > 1000:  # views nobody watches any more
                oldest = min(self._prints, key=lambda k: self._prints[k][0])
                self._prints.pop(oldest, None)
                self._print_locks.pop(oldest, None)
            return found


class Page:
    """What every template gets as ``ui``: links, the CSRF token, the flash
    message, and how times and durations read."""

    def __init__(
        self,
        dash: Dashboard,
        request: Request,
        *,
        section: str = "",
        now: datetime | None = None,
        flash: Flash | None = None,
    ) -> None:
        self.dash = dash
        self.request = request
        self.section = section
        self.now = now
        self.title = dash.title
        self.read_only = dash.read_only
        self.version = __version__
        self.token_login = isinstance(dash.auth, TokenAuth)
        self._csrf: str | None = None
        self.new_csrf = False
        self.had_flash = FLASH_COOKIE in request.cookies and not _is_fragment(request)
        self.flash = flash or (read_flash(request, dash.secret) if self.had_flash else None)

    def url(self, name: str, query: Mapping[str, str] | None = None, **params: str) -> str:
        path = self.dash.path(self.request, name, **params)
        return f"{path}?{urlencode(query)}" if query else path

    def run_url(self, run_id: str, action: str = "") -> str:
        path = self.url("run", run_id=quote(run_id, safe=""))
        return f"{path}/{action}" if action else path

    def runs_url(self, **query: str) -> str:
        return self.url("runs", {k: v for k, v in query.items() if v})

    def static(self, path: str) -> str:
        return self.url("static", {"v": __version__}, path=path)

    @property
    def csrf(self) -> str:
        if self._csrf is None:
            self._csrf, self.new_csrf = csrf_token(self.request)
        return self._csrf

    csrf_field = CSRF_FIELD

    def stamp(self, moment: datetime | None) -> str:
        return stamp(moment)

    def relative(self, moment: datetime | None) -> str:
        if moment is None or self.now is None:
            return ""
        return relative(moment, self.now)

    def age(self, moment: datetime | None) -> str:
        """How long ago ``moment`` was: ``26s``, ``3m``, ``2h``."""
        if moment is None or self.now is None:
            return "-"
        return relative(min(moment, self.now), self.now).removesuffix(" ago")

    def duration(self, seconds: float | None) -> str:
        return _duration(seconds)


def _render(
    page: Page,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    html = page.dash.env.get_template(template).render(ui=page, **context)
    response = HTMLResponse(html, status_code=status, headers={"cache-control": "no-store"})
    for name, value in (headers or {}).items():
        response.headers[name] = value
    if page.new_csrf:
        set_cookie(response, page.request, CSRF_COOKIE, page.csrf)
    if page.had_flash:
        response.delete_cookie(FLASH_COOKIE, path=cookie_path(page.request))
    return response


def _redirect(dash: Dashboard, request: Request, to: str, flash: Flash | None) -> Response:
    response = RedirectResponse(to, status_code=303)
    if flash is not None:
        write_flash(response, request, dash.secret, flash)
    return response


def _sign_in_page(dash: Dashboard, request: Request, problem: str | None = None) -> Response:
    """The token sign-in page (401), saying what was wrong with the last try."""
    return _error_page(
        dash,
        request,
        401,
        "Sign in required",
        "Enter the dashboard's access token.",
        login=True,
        login_error=problem,
    )


def _error_page(
    dash: Dashboard,
    request: Request,
    status: int,
    heading: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    login: bool = False,
    login_error: str | None = None,
) -> Response:
    if request.url.path.endswith("/live") or request.method not in ("GET", "HEAD", "POST"):
        return PlainTextResponse(f"{heading}: {message}", status_code=status, headers=headers)
    page = Page(dash, request)
    return _render(
        page,
        "error.html",
        {
            "status": status,
            "heading": heading,
            "message": message,
            "login": login,
            "login_error": login_error,
            "bare": status == 401,
            "next": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        },
        status=status,
        headers=headers,
    )


# -- authentication -----------------------------------------------------------------


class _Gate:
    """Lets in only the requests the dashboard's ``auth`` accepts (static
    files, ``/healthz`` and the login form excepted), and adds the security
    headers to every response."""

    OPEN = ("/healthz", "/login")

    def __init__(self, app: ASGIApp, dash: Dashboard) -> None:
        self.app = app
        self.dash = dash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        response = await self._check(scope, receive)
        if response is not None:
            await response(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)

    async def _check(self, scope: Scope, receive: Receive) -> Response | None:
        auth = self.dash.auth
        path = _route_path(scope)
        if auth is None or path in self.OPEN or path.startswith("/static/"):
            return None
        request = Request(scope, receive)
        if isinstance(auth, TokenAuth) and "token" in request.query_params:
            return self._token_login(request, auth)
        allowed = auth(request)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if allowed is True:
            return None
        if isinstance(auth, BasicAuth):
            return _error_page(
                self.dash,
                request,
                401,
                "Sign in required",
                "This dashboard asks for a user name and password.",
                headers={"www-authenticate": 'Basic realm="Reflow dashboard", charset="UTF-8"'},
            )
        if isinstance(auth, TokenAuth):
            return _sign_in_page(self.dash, request)
        return _error_page(
            self.dash, request, 401, "Not authorized", "You are not allowed to see this page."
        )

    def _token_login(self, request: Request, auth: TokenAuth) -> Response:
        """``?token=...`` on a page: a good token sets the login cookie and
        reloads the page without the token in its address."""
        if request.method not in ("GET", "HEAD") or not auth.check_token(
            request.query_params["token"]
        ):
            return _sign_in_page(self.dash, request, "That token is not right.")
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303)
        set_cookie(response, request, AUTH_COOKIE, auth.cookie_value, max_age=LOGIN_COOKIE_AGE)
        return response


def _safe_next(dash: Dashboard, request: Request, target: str) -> str:
    """``target`` if it is a path inside the dashboard, else its overview
    (a login form never redirects to another site)."""
    root = cookie_path(request).rstrip("/")
    if (
        target.startswith(root + "/")
        and not target.startswith("//")
        and "\\" not in target
        and "://" not in target
    ):
        return target
    return dash.path(request, "overview")


# -- pages --------------------------------------------------------------------------


def create_app(
    storage: Storage | str,
    *,
    read_only: bool = False,
    auth: Auth | None = None,
    title: str = "Reflow",
    refresh: Duration = "2s",
) -> Starlette:
    """The dashboard as a Starlette (ASGI) application.

    ``storage`` is a :class:`~reflow_core.storage.Storage` the caller has
    initialized and closes, or a storage URL, which the application opens
    (through :func:`~reflow_core.open_storage`) when it starts and closes
    when it stops. ``read_only`` removes every action: no forms are shown
    and the action routes do not exist. ``auth`` decides who may see it:
    a :class:`~reflow_dashboard.TokenAuth`, a :class:`~reflow_dashboard.BasicAuth`,
    or any callable taking the request and returning (or resolving to) a
    bool, such as the embedding application's own check; ``None`` lets
    everyone in. ``title`` names the dashboard in the page header.
    ``refresh`` is how often a live page checks whether what it shows has
    changed (``"2s"``, a number of seconds or a ``timedelta``).

    Mount it in a Starlette or FastAPI application with
    ``app.mount("/reflow", create_app(...))``.
    """
    needed = ("get_run", "list_runs", "queue_stats")
    if not isinstance(storage, str) and not all(hasattr(storage, name) for name in needed):
        raise TypeError(f"storage must be a Storage or a URL, not {type(storage).__name__}")
    if auth is not None and not callable(auth):
        raise TypeError("auth must be TokenAuth, BasicAuth or a callable taking the request")
    interval = to_seconds(refresh, option="refresh", allow_zero=False, minimum=0.01)
    dash = Dashboard(storage, read_only=read_only, auth=auth, title=str(title), refresh=interval)

    async def overview(request: Request) -> Response:
        store = await dash.storage()
        view = await views.load_overview(store)
        page = Page(dash, request, section="overview", now=view.now)
        template = "_overview_live.html" if _is_fragment(request) else "overview.html"
        return _render(page, template, {"view": view})

    async def runs(request: Request) -> Response:
        store = await dash.storage()
        filters = views.RunFilters.parse(request.query_params)
        if filters.q and filters.cursor is None and not _is_fragment(request):
            found = await store.get_run(filters.q)
            if found is not None:
                page = Page(dash, request)
                return RedirectResponse(page.run_url(found.id), status_code=303)
        view = await views.load_runs(
            store, filters, choices=None if _is_fragment(request) else dash.workflow_names
        )
        page = Page(dash, request, section="runs", now=view.now)
        template = "_runs_live.html" if _is_fragment(request) else "runs.html"
        return _render(page, template, {"view": view}, status=400 if view.problem else 200)

    async def run_page(
        request: Request,
        *,
        status: int = 200,
        flash: Flash | None = None,
        event_form: Mapping[str, str] | None = None,
    ) -> Response:
        store = await dash.storage()
        run_id = request.path_params["run_id"]
        view = await views.load_run(store, run_id)
        if view is None:
            return _error_page(
                dash, request, 404, "Run not found", f"There is no run with id {run_id!r}."
            )
        page = Page(dash, request, section="runs", now=view.now, flash=flash)
        template = "_run_live.html" if _is_fragment(request) else "run.html"
        form = {"event": "", "payload": "", "event_id": "", **(event_form or {})}
        return _render(page, template, {"view": view, "event_form": form}, status=status)

    async def schedules(request: Request) -> Response:
        view = await views.load_schedules(await dash.storage())
        page = Page(dash, request, section="schedules", now=view.now)
        return _render(page, "schedules.html", {"view": view})

    async def workers(request: Request) -> Response:
        view = await views.load_workers(await dash.storage())
        page = Page(dash, request, section="workers", now=view.now)
        return _render(page, "workers.html", {"view": view})

    async def healthz(request: Request) -> Response:
        try:
            await (await dash.storage()).now()
        except Exception as exc:
            logger.warning("health check: the storage failed: %s", dash.describe(exc))
            return PlainTextResponse("unavailable", status_code=503)
        return PlainTextResponse("ok")

    # -- live -----------------------------------------------------------------------

    async def live(request: Request) -> Response:
        store = await dash.storage()
        params = request.query_params
        view_name = params.get("view", "")
        compute: Callable[[], Awaitable[str | None]]
        if view_name == "run" and params.get("id"):
            run_id = params["id"]

            async def compute() -> str | None:
                found = await views.load_run(store, run_id)
                return None if found is None else found.fingerprint

            key = f"run\0{run_id}"
        elif view_name == "runs":
            filters = views.RunFilters.parse(params)

            async def compute() -> str | None:
                return (await views.load_runs(store, filters)).fingerprint

            key = f"runs\0{filters.query()}"
        elif view_name == "overview":

            async def compute() -> str | None:
                return (await views.load_overview(store)).fingerprint

            key = "overview"
        else:
            return PlainTextResponse(
                "view must be run (with id), runs or overview", status_code=400
            )
        seen = request.headers.get("last-event-id") or params.get("fp") or ""
        return StreamingResponse(
            _stream(dash, request, key, compute, seen),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    # -- actions --------------------------------------------------------------------

    async def checked_form(request: Request) -> tuple[FormData, Response | None]:
        form = await request.form()
        problem = csrf_problem(request, form.get(CSRF_FIELD))
        if problem is None:
            return form, None
        logger.warning("refused a %s to %s: %s", request.method, request.url.path, problem)
        return form, _error_page(dash, request, 403, "Refused", f"Nothing was changed: {problem}.")

    async def run_action(
        request: Request,
        act: Callable[[str], Awaitable[admin.Outcome]],
        done: str,
        refused_as: str,
    ) -> Response:
        """Check the form, change the run, and go back to its page saying what happened."""
        _, refused = await checked_form(request)
        if refused is not None:
            return refused
        run_id = request.path_params["run_id"]
        outcome = await act(run_id)
        if outcome.reason == "not found":
            return _error_page(dash, request, 404, "Run not found", f"No run {run_id!r}.")
        flash = (
            Flash("success", done)
            if outcome.changed
            else Flash("error", f"{refused_as}: the run {outcome.reason}.")
        )
        return _redirect(dash, request, Page(dash, request).run_url(run_id), flash)

    async def cancel_run(request: Request) -> Response:
        async def act(run_id: str) -> admin.Outcome:
            return await admin.cancel_run(await dash.engine(), await dash.storage(), run_id)

        return await run_action(
            request,
            act,
            "Cancelled the run and every unfinished run it started.",
            "Not cancelled",
        )

    async def resume_run(request: Request) -> Response:
        async def act(run_id: str) -> admin.Outcome:
            return await admin.resume_run(await dash.storage(), run_id)

        return await run_action(
            request,
            act,
            "Queued the run again: a worker that serves its workflow continues it "
            "at its first unfinished step.",
            "Not resumed",
        )

    async def send_event(request: Request) -> Response:
        form, refused = await checked_form(request)
        if refused is not None:
            return refused
        run_id = request.path_params["run_id"]
        page = Page(dash, request)
        values = {key: str(form.get(key) or "") for key in ("event", "payload", "event_id")}
        name = values["event"].strip()
        event_id = values["event_id"].strip() or None
        problem = None
        text = ""
        if not name:
            problem = "Not sent: give the event's name."
        else:
            try:
                payload = values["payload"].strip()
                text = codec.encode(json.loads(payload) if payload else None)
            except (ValueError, SerializationError) as exc:
                problem = f"Not sent: the payload is not JSON ({exc})."
        if problem is None:
            try:
                delivered = await (await dash.storage()).deliver_event(
                    run_id, name, text, event_id=event_id, max_buffered=MAX_BUFFERED
                )
            except ReflowError as exc:
                problem = f"Not sent: {dash.describe(exc)}"
            else:
                if not delivered:
                    problem = "Not sent: the run is missing or has already finished."
        if problem is not None:
            return await run_page(
                request, status=400, flash=Flash("error", problem), event_form=values
            )
        flash = Flash(
            "success",
            f"Sent event {name!r}"
            + (f" (id {event_id!r})" if event_id else "")
            + ": a run waiting for it wakes up; otherwise it keeps it until it gets there.",
        )
        return _redirect(dash, request, page.run_url(run_id), flash)

    async def schedule_action(request: Request) -> Response:
        form, refused = await checked_form(request)
        if refused is not None:
            return refused
        action = request.path_params["action"]
        key = str(form.get("key") or "")
        store = await dash.storage()
        page = Page(dash, request)
        back = page.url("schedules")
        if action == "trigger":
            found = await find_schedule(store, key)
            if found is None:
                return _redirect(dash, request, back, Flash("error", f"No schedule {key!r}."))
            created = await store.create_run(NewRun(workflow=found.workflow, input=found.input))
            flash = Flash(
                "success",
                f"Started run {created.run.id} of workflow {found.workflow!r} "
                f"from schedule {key!r}.",
                link=page.run_url(created.run.id),
                link_text="Open the run",
            )
            return _redirect(dash, request, back, flash)
        if action not in ("pause", "resume"):
            raise HTTPException(404)
        record = await set_paused(store, key, action == "pause")
        if record is None:
            return _redirect(dash, request, back, Flash("error", f"No schedule {key!r}."))
        if action == "pause":
            flash = Flash("success", f"Paused schedule {key!r}: no slot fires until it resumes.")
        else:
            flash = Flash(
                "success",
                f"Resumed schedule {key!r}: next run {stamp(record.next_run_at)} UTC.",
            )
        return _redirect(dash, request, back, flash)

    async def login(request: Request) -> Response:
        auth = dash.auth
        if not isinstance(auth, TokenAuth):
            raise HTTPException(404)
        form = await request.form()
        problem = csrf_problem(request, form.get(CSRF_FIELD))
        target = _safe_next(dash, request, str(form.get("next") or ""))
        if problem is not None:
            return _error_page(dash, request, 403, "Refused", f"Not signed in: {problem}.")
        if not auth.check_token(str(form.get("token") or "")):
            return _sign_in_page(dash, request, "That token is not right.")
        response = RedirectResponse(target, status_code=303)
        set_cookie(response, request, AUTH_COOKIE, auth.cookie_value, max_age=LOGIN_COOKIE_AGE)
        return response

    async def logout(request: Request) -> Response:
        _, refused = await checked_form(request)
        if refused is not None:
            return refused
        response = RedirectResponse(dash.path(request, "overview"), status_code=303)
        response.delete_cookie(AUTH_COOKIE, path=cookie_path(request))
        return response

    # -- errors ---------------------------------------------------------------------

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if status == 405:
            return _error_page(
                dash, request, 405, "Not allowed", "This page does not take that request."
            )
        return _error_page(dash, request, status, "Not found", "There is no such page here.")

    async def reflow_error(request: Request, exc: Exception) -> Response:
        logger.error("%s %s: %s", request.method, request.url.path, dash.describe(exc))
        return _error_page(
            dash,
            request,
            503,
            "Storage error",
            f"The storage could not answer: {dash.describe(exc)}",
        )

    routes: list[BaseRoute] = [
        Route("/", overview, name="overview"),
        Route("/runs", runs, name="runs"),
        Route("/runs/{run_id:path}", run_page, name="run"),
        Route("/schedules", schedules, name="schedules"),
        Route("/workers", workers, name="workers"),
        Route("/live", live, name="live"),
        Route("/healthz", healthz, name="healthz"),
        Route("/login", login, methods=["POST"], name="login"),
        Route("/logout", logout, methods=["POST"], name="logout"),
        Mount("/static", StaticFiles(packages=[("reflow_dashboard", "static")]), name="static"),
    ]
    if not read_only:
        routes += [
            Route("/runs/{run_id:path}/cancel", cancel_run, methods=["POST"], name="cancel"),
            Route("/runs/{run_id:path}/resume", resume_run, methods=["POST"], name="resume"),
            Route("/runs/{run_id:path}/events", send_event, methods=["POST"], name="send_event"),
            Route("/schedules/{action}", schedule_action, methods=["POST"], name="schedule_action"),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await dash.startup()
        try:
            yield
        finally:
            await dash.shutdown()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(_Gate, dash=dash)],
        exception_handlers={404: not_found, 405: not_found, ReflowError: reflow_error},
    )
    dash.router = app.router
    app.state.reflow_dashboard = dash
    return app


async def _stream(
    dash: Dashboard,
    request: Request,
    key: str,
    compute: Callable[[], Awaitable[str | None]],
    seen: str,
) -> AsyncIterator[str]:
    """Server-sent events: ``refresh`` whenever the view's fingerprint
    differs from the one the browser last saw, a comment when idle."""
    closing = dash.closing()
    started = last_beat = time.monotonic()
    yield f"retry: {RECONNECT_MS}\n: connected\n\n"
    first = True
    while not closing.is_set():
        if await request.is_disconnected():
            return
        # The hint to wait for is taken before the look, so that one sent
        # while the view is read, or while what it found is being sent to
        # the browser, wakes the wait below at once instead of being missed.
        hint = await dash.hint()
        try:
            current = await dash.fingerprint(key, compute)
        except Exception as exc:  # the storage failed: try again at the next tick
            logger.warning("live view %s: %s", key.split("\0")[0], dash.describe(exc))
            current = seen
        if current is None:  # the run is gone: the page shows that
            yield "event: refresh\ndata: gone\n\n"
            return
        if current != seen and (seen or not first):
            yield f"event: refresh\nid: {current}\ndata: {current}\n\n"
            seen = current
            last_beat = time.monotonic()
        elif first:
            # What the browser shows is current: say so, so that a reconnect
            # (which sends the last id) starts from it.
            yield f"id: {current}\n\n"
            seen = current
            last_beat = time.monotonic()
        elif time.monotonic() - last_beat >= HEARTBEAT:
            yield ": ping\n\n"
            last_beat = time.monotonic()
        first = False
        if time.monotonic() - started >= STREAM_LIFETIME:
            return
        # The next tick, or sooner: a wake-up hint since the look, or the end.
        waits = [asyncio.ensure_future(closing.wait()), asyncio.ensure_future(hint.wait())]
        try:
            await asyncio.wait(waits, timeout=dash.refresh, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
