"""``reflow worker APP``: run the workers of an application.

``APP`` is ``module:attribute``, naming an :class:`~reflow_core.Engine` or a
callable taking no arguments that returns one (``module:attr.sub`` walks
attributes). The directory given by ``--app-dir`` (default: the current one)
comes first on ``sys.path``, so ``reflow worker myapp.tasks:engine`` finds
``./myapp/tasks.py``.

With ``--processes 1`` (the default) the engine runs in this process: it
claims runs until ``SIGTERM`` or ``SIGINT``, then stops claiming, lets the runs
in flight finish for the engine's ``drain_timeout`` and hands back the rest.
With ``--processes N`` a :class:`~reflow_core.supervisor.Supervisor` runs N
copies of this command (each rebuilding the engine from ``APP``), restarts
one that dies, forwards the signals, and gives up on a crash loop.

Exit codes: 0 after a clean stop, 1 when ``APP`` cannot be loaded, the engine
fails or the children keep crashing, 2 for a usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import click

from reflow_core.engine import Engine
from reflow_core.plugins.logging import JsonFormatter, LoggingPlugin, RunContextFilter, step_fields
from reflow_core.supervisor import WORKER_INDEX_ENV, RestartPolicy, Supervisor

__all__ = ["AppLoadError", "JsonFormatter", "TextFormatter", "load_app", "worker"]

logger = logging.getLogger("reflow.worker")

_LEVELS = ("critical", "error", "warning", "info", "debug")
_STOP_MARGIN = 15.0
"""Seconds a child gets, on top of the engine's ``drain_timeout``, to hand its
runs back, close its storage and exit before the supervisor kills it."""
_HANDLER_NAME = "reflow-worker"
_PARENT_CHECK = 0.5
"""Seconds between a child's looks at whether its supervisor is still there."""


# -- loading the application ------------------------------------------------------


class AppLoadError(Exception):
    """``APP`` names no engine: the message says why, on one line."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_app(app: str, app_dir: str | None = ".") -> Engine:
    """The engine ``app`` (``module:attribute``) names, calling it if it is a
    factory. ``app_dir`` is put first on ``sys.path``. Raises
    :class:`AppLoadError`."""
    module_name, sep, attribute = app.partition(":")
    if not sep or not module_name or not attribute:
        raise AppLoadError(f"expected 'module:attribute', got {app!r}")
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise AppLoadError(_one_line(exc)) from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(
                f"{type(obj).__name__} {getattr(obj, '__name__', module_name)!r} has no "
                f"attribute {part!r}"
            ) from None
    if not isinstance(obj, Engine):
        if not callable(obj):
            raise AppLoadError(f"{attribute} is not an Engine (it is a {type(obj).__name__})")
        try:
            obj = obj()
        except Exception as exc:
            raise AppLoadError(f"calling {attribute}() raised {_one_line(exc)}") from exc
        if asyncio.iscoroutine(obj):
            obj.close()
            raise AppLoadError(
                f"{attribute}() is a coroutine function; give a plain function returning an Engine"
            )
        if not isinstance(obj, Engine):
            raise AppLoadError(
                f"{attribute}() returned no Engine (it returned a {type(obj).__name__})"
            )
    return obj


# -- logging ----------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """``time level logger [pid] message``, on one line, and ``(run ID step
    NAME#ATTEMPT)`` for a record made in a step; a traceback follows on its
    own lines."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        index = os.environ.get(WORKER_INDEX_ENV)
        who = f"{record.process}" + (f" w{index}" if index else "")
        line = (
            f"{when.isoformat(timespec='milliseconds')} {record.levelname:<7} {record.name} "
            f"[{who}] {record.getMessage()}"
        )
        step = step_fields(record)
        if step:
            line += f" (run {step['run_id']} step {step['step']}#{step['attempt']})"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(log_format: str, level: str) -> None:
    """Send every record at ``level`` and above to stderr, one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RunContextFilter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


# -- running ----------------------------------------------------------------------


async def _serve(engine: Engine, *, supervised: bool) -> int:
    """Run the engine's worker until SIGTERM or SIGINT, then drain; the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drain = engine.drain_timeout

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            logger.info(
                "received %s while draining; still draining",
                signum.name,
                extra={"reflow": {"event": "signal_ignored", "signal": signum.name}},
            )
            return
        in_flight = engine.in_flight
        logger.info(
            "received %s; draining %d runs in flight for up to %gs",
            signum.name,
            in_flight,
            drain,
            extra={"reflow": {"event": "draining", "signal": signum.name, "in_flight": in_flight}},
        )
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    parent = os.getppid()
    try:
        try:
            await engine.start()
        except Exception as exc:
            logger.error(
                "the worker could not start: %s",
                _one_line(exc),
                extra={"reflow": {"event": "start_failed"}},
            )
            logger.debug("start failure", exc_info=True)
            return 1
        logger.info(
            "worker %s started: workflows %s, concurrency %d, storage %s",
            engine.worker_id,
            ", ".join(engine.workflow_names),
            engine.concurrency,
            type(engine.storage).__name__,
            extra={
                "reflow": {
                    "event": "worker_ready",
                    "worker_id": engine.worker_id,
                    "workflows": engine.workflow_names,
                    "concurrency": engine.concurrency,
                }
            },
        )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PARENT_CHECK):
                    await stop.wait()
            if supervised and os.getppid() != parent and not stop.is_set():
                logger.warning(
                    "the supervisor (pid %d) is gone; draining",
                    parent,
                    extra={"reflow": {"event": "orphaned", "supervisor": parent}},
                )
                stop.set()
            if not engine.running and not stop.is_set():
                logger.error(
                    "the worker stopped by itself", extra={"reflow": {"event": "worker_died"}}
                )
                return 1
        started = time.monotonic()
        try:
            await engine.close()
        except Exception as exc:
            logger.error(
                "stopping the worker failed: %s",
                _one_line(exc),
                extra={"reflow": {"event": "stop_failed"}},
            )
            return 1
        took = time.monotonic() - started
        logger.info(
            "worker stopped after draining for %.2fs",
            took,
            extra={"reflow": {"event": "worker_stopped", "seconds": round(took, 3)}},
        )
        return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
            # On the way out: a signal forwarded late must not kill the
            # process before it exits with its own status.
            signal.signal(signum, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            await engine.close()


def _child_command(
    app: str,
    app_dir: str,
    concurrency: int | None,
    workflows: Sequence[str] | None,
    log_format: str,
    log_level: str,
) -> list[str]:
    # The same command, run by the same interpreter: ``python -m reflow_core worker``.
    argv = [sys.executable, "-m", "reflow_core", "worker", app, "--child"]
    argv += ["--app-dir", os.path.abspath(app_dir)]
    argv += ["--log-format", log_format, "--log-level", log_level]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if workflows:
        argv += ["--workflows", ",".join(workflows)]
    return argv


def _split_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("give one or more workflow names, separated by commas")
    return names


app_dir_option = click.option(
    "--app-dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Look for APP's module here first (put on sys.path).",
)
"""The ``--app-dir`` option of every command that loads ``APP``."""


def load_app_or_fail(app: str, app_dir: str) -> Engine:
    """:func:`load_app`, its failure as the command's one-line error."""
    try:
        return load_app(app, app_dir)
    except AppLoadError as exc:
        raise click.ClickException(f"cannot import APP {app!r}: {exc}") from None


@click.command("worker")
@click.argument("app")
@app_dir_option
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help="Runs in flight per process (default: the engine's).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes; more than 1 runs a supervisor that restarts them.",
)
@click.option(
    "--workflows",
    "workflows_option",
    metavar="NAME,...",
    help="Serve only these workflows (default: every one the engine has).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="One line per event: readable text, or one JSON object.",
)
@click.option(
    "--log-level",
    type=click.Choice(_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="debug also logs every run and step event.",
)
@click.option(
    "--max-crashes",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="With --processes > 1: give up (exit 1) after more crashes of children than this ...",
)
@click.option(
    "--crash-window",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="... within this many seconds.",
)
@click.option("--child", is_flag=True, hidden=True)
def worker(
    app: str,
    app_dir: str,
    concurrency: int | None,
    processes: int,
    workflows_option: str | None,
    log_format: str,
    log_level: str,
    max_crashes: int,
    crash_window: float,
    child: bool,
) -> None:
    """Run the workers of APP, a `module:attribute` naming an Engine (or a
    function returning one), until SIGTERM or SIGINT; then drain.

    Each process claims runs of the engine's workflows. On SIGTERM or SIGINT
    it stops claiming, lets runs in flight finish for the engine's
    drain_timeout and hands back the rest, which other workers pick up.
    """
    log_level = log_level.lower()
    configure_logging(log_format, log_level)
    names = _split_names(workflows_option)
    engine = load_app_or_fail(app, app_dir)
    if names is not None:
        known = engine.workflow_names
        unknown = [name for name in names if name not in known]
        if unknown:
            raise click.BadParameter(
                f"unknown workflow {', '.join(map(repr, unknown))}; {app} has: "
                f"{', '.join(known) or 'no workflows'}",
                param_hint="'--workflows'",
            )
        engine.configure_worker(workflows=names)
    if not engine.workflow_names:
        raise click.ClickException(f"{app} has no workflows to serve: register some first")
    if concurrency is not None:
        engine.configure_worker(concurrency=concurrency)
    if processes == 1 or child:
        if not any(isinstance(p, LoggingPlugin) for p in engine.plugins):
            # Every run and step event at debug; failed runs, failed attempts
            # and reclaimed runs at error and warning.
            engine.register_plugin(LoggingPlugin(level=logging.DEBUG), name="reflow-worker-log")
        try:
            code = asyncio.run(_serve(engine, supervised=child))
        except Exception:
            logger.error("the worker failed:\n%s", traceback.format_exc().rstrip())
            code = 1
        sys.exit(code)
    # The supervisor: this process only checked APP; each child builds its own engine.
    command = _child_command(app, app_dir, concurrency, names, log_format, log_level)
    supervisor = Supervisor(
        command,
        processes,
        stop_timeout=engine.drain_timeout + _STOP_MARGIN,
        policy=RestartPolicy(max_crashes=max_crashes, window=crash_window),
    )
    del engine
    sys.exit(supervisor.run())
