"""``reflow dashboard``: serve the dashboard from the command line.

Registered through the ``reflow_register_commands`` hook (the
``reflow.commands`` entry point of this distribution). It binds the
loopback address unless told otherwise, and refuses any other address
without ``--token`` or ``--basic-auth``: a dashboard can cancel runs.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from types import FrameType
from typing import Any

import click
import uvicorn

from reflow_core.cli import State, pass_state, run_async
from reflow_core.hookspecs import hookimpl
from reflow_core.options import redact, safe_url, url_secrets
from reflow_core.registry import open_storage

from ._app import Dashboard, create_app
from ._auth import Auth, BasicAuth, TokenAuth

__all__ = ["TOKEN_ENV", "dashboard", "reflow_register_commands"]

TOKEN_ENV = "REFLOW_DASHBOARD_TOKEN"  # noqa: S105 - a variable's name, not a secret
"""The environment variable ``--token`` is read from (out of the process list)."""
BASIC_AUTH_ENV = "REFLOW_DASHBOARD_BASIC_AUTH"
"""The environment variable ``--basic-auth`` is read from."""
GRACE = 5
"""Seconds the server waits for open responses when it stops."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _HideSecrets(logging.Filter):
    """Masks the token, the password, every secret of the storage URL and
    any ``token=`` query value in the server's log lines (a ``?token=``
    login puts the token in the request line of the access log)."""

    _QUERY_TOKEN = re.compile(r"([?&]token=)[^&\s\"]*")

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def _clean(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return self._QUERY_TOKEN.sub(r"\1***", redact(value, self.secrets))

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._clean(arg) for arg in record.args)
        return True


class _Server(uvicorn.Server):
    """Ends the live streams as soon as the server is asked to stop, so it
    does not wait for browsers that keep them open."""

    def __init__(self, config: uvicorn.Config, dash: Dashboard) -> None:
        super().__init__(config)
        self.dash = dash

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.dash.close_streams()
        super().handle_exit(sig, frame)


def _auth(token: str | None, basic_auth: str | None) -> Auth | None:
    if token is not None and basic_auth is not None:
        raise click.UsageError("give --token or --basic-auth, not both")
    if token is not None:
        if not token.strip():
            raise click.BadParameter("the token is empty", param_hint="--token")
        return TokenAuth(token)
    if basic_auth is not None:
        user, sep, password = basic_auth.partition(":")
        if not sep or not user or not password:
            raise click.BadParameter("expected USER:PASSWORD", param_hint="--basic-auth")
        return BasicAuth(user, password)
    return None


@click.command("dashboard")
@click.option(
    "--url",
    metavar="URL",
    help="Storage URL (default: the --url of reflow, or $REFLOW_URL).",
)
@click.option(
    "--host",
    metavar="HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Any but a loopback address needs --token or --basic-auth.",
)
@click.option(
    "--port",
    metavar="PORT",
    default=8484,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port to listen on.",
)
@click.option("--read-only", is_flag=True, help="Show everything, change nothing: no actions.")
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    show_envvar=True,
    metavar="TOKEN",
    help="Require this token (Authorization: Bearer, or the sign-in form). "
    "Prefer the environment variable: it stays out of the process list.",
)
@click.option(
    "--basic-auth",
    envvar=BASIC_AUTH_ENV,
    show_envvar=True,
    metavar="USER:PASS",
    help="Require HTTP Basic authentication with this user name and password.",
)
@click.option(
    "--title", metavar="TEXT", default="Reflow", show_default=True, help="Name in the header."
)
@click.option(
    "--refresh",
    default="2s",
    show_default=True,
    metavar="DURATION",
    help="How often live pages check for changes.",
)
@click.option(
    "--root-path",
    default="",
    metavar="PATH",
    help="The path prefix a reverse proxy serves the dashboard under (e.g. /reflow).",
)
@pass_state
def dashboard(
    state: State,
    url: str | None,
    host: str,
    port: int,
    read_only: bool,
    token: str | None,
    basic_auth: str | None,
    title: str,
    refresh: str,
    root_path: str,
) -> None:
    """Serve the web dashboard: runs, failures, schedules and workers.

    Listens on 127.0.0.1:8484 by default. To listen on another address
    (0.0.0.0 in a container, say), give --token or --basic-auth: anyone who
    reaches the dashboard can cancel and resume runs, unless --read-only.
    """
    auth = _auth(token, basic_auth)
    if auth is None and not is_loopback(host):
        raise click.UsageError(
            f"refusing to listen on {host}, which is not a loopback address, without "
            f"authentication: pass --token TOKEN (or set {TOKEN_ENV}) or --basic-auth USER:PASS"
        )
    url = url or state.url
    if not url:
        raise click.UsageError(
            "no storage given: pass --url URL or set REFLOW_URL (for example sqlite:///app.db)"
        )
    state.url = url  # errors from here on mask the URL's secrets

    async def check() -> None:
        store = open_storage(url)
        try:
            await store.initialize()
        finally:
            await store.close()

    run_async(check)
    try:
        app = create_app(url, read_only=read_only, auth=auth, title=title, refresh=refresh)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--refresh") from None
    dash: Dashboard = app.state.reflow_dashboard
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        root_path=root_path,
        lifespan="on",
        log_level="info",
        timeout_graceful_shutdown=GRACE,
    )
    hide = _HideSecrets([token or "", basic_auth or "", *url_secrets(url)])
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(hide)
    shown = f"[{host}]" if ":" in host else host
    mode = ", read-only" if read_only else ""
    guard = {TokenAuth: ", token required", BasicAuth: ", password required"}.get(type(auth), "")
    state.note(f"Reflow dashboard for {safe_url(url)}{mode}{guard}")
    state.note(f"open http://{shown}:{port}{root_path}/")
    _Server(config, dash).run()


@hookimpl
def reflow_register_commands(cli: Any) -> None:
    """Add ``reflow dashboard``."""
    cli.add_command(dashboard)
