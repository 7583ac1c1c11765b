"""Structured logging of run lifecycles through the standard :mod:`logging` module.

::

    from reflow_core.plugins.logging import LoggingPlugin

    engine = Engine(storage=..., workflows=[...], plugins=[LoggingPlugin()])

Every lifecycle event becomes one record on the logger (``reflow.runs`` by
default), with a readable message such as ``run 01J... step 'charge'
completed (attempt 2)`` and the event's fields under the ``reflow`` attribute
of the record (``extra={"reflow": {...}}``) for structured formatters: the
event's name, run id, workflow, step, attempt(s), and for a failure the
stored error (``code``, ``type``, ``message``, ``step``, ``traceback``,
``causes``). Step and run outputs are never logged: they may hold personal
data or secrets.

Failed runs are logged at ``ERROR``, failed step attempts (with the delay
until the next attempt, or ``giving up``) and reclaimed runs at
``WARNING``; everything else at ``level``. The records of failures end with
the stored traceback of the exception.

Inside a step, :class:`RunContextFilter` puts the run, workflow, step and
attempt on every record a handler it is added to sees, whoever logs it (the
step's own ``logging.getLogger(__name__)``, a library it calls); and
:class:`JsonFormatter` writes each record as one JSON object a line, with
those fields and the ``reflow`` ones of the lifecycle records::

    handler = logging.StreamHandler()
    handler.addFilter(RunContextFilter())
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)

``reflow worker --log-format json`` sets up the same.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from typing import Any

from reflow_core.errors import ErrorInfo
from reflow_core.events import (
    Event,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunReclaimed,
    RunSleeping,
    RunStarted,
    RunWaiting,
    StepAttemptFailed,
    StepCompleted,
    StepSkipped,
    StepStarted,
)
from reflow_core.hookspecs import hookimpl
from reflow_core.storage import CHILDREN_WAIT_PREFIX
from reflow_core.supervisor import WORKER_INDEX_ENV
from reflow_core.tracing import current_step

__all__ = ["DEFAULT_LOGGER", "JsonFormatter", "LoggingPlugin", "RunContextFilter", "step_fields"]

STEP_FIELDS = ("reflow_run_id", "reflow_workflow", "reflow_step", "reflow_attempt")
"""The attributes :class:`RunContextFilter` sets on a record (``None`` outside a step)."""


class RunContextFilter(logging.Filter):
    """Adds ``reflow_run_id``, ``reflow_workflow``, ``reflow_step`` and
    ``reflow_attempt`` to every record it sees: the step attempt executing
    where the record was made (``None`` outside a step), for a format such
    as ``"%(message)s [run %(reflow_run_id)s step %(reflow_step)s]"`` or for
    :class:`JsonFormatter`. It lets every record through. Add it to a
    handler, not a logger: a logger's filters see only its own records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "reflow_run_id", None) is not None:
            return True  # set where it was made (a queue handler's copy, say)
        scope = current_step()
        record.reflow_run_id = None if scope is None else scope.run_id
        record.reflow_workflow = None if scope is None else scope.workflow
        record.reflow_step = None if scope is None else scope.step
        record.reflow_attempt = None if scope is None else scope.attempt
        return True


def step_fields(record: logging.LogRecord) -> dict[str, Any]:
    """``run_id``, ``workflow``, ``step`` and ``attempt`` of the step a
    record was made in (from :class:`RunContextFilter`, or the current step
    when formatted), or nothing outside a step."""
    run_id = getattr(record, "reflow_run_id", None)
    if run_id is not None:
        return {
            "run_id": run_id,
            "workflow": getattr(record, "reflow_workflow", None),
            "step": getattr(record, "reflow_step", None),
            "attempt": getattr(record, "reflow_attempt", None),
        }
    scope = current_step()
    if scope is None:
        return {}
    return {
        "run_id": scope.run_id,
        "workflow": scope.workflow,
        "step": scope.step,
        "attempt": scope.attempt,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, milliseconds), ``level``,
    ``logger``, ``pid``, ``worker`` (a supervised worker's slot), ``message``;
    ``run_id``, ``workflow``, ``step`` and ``attempt`` for a record made in a
    step; the structured fields of a lifecycle record (``extra={"reflow":
    {...}}``); and ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        index = os.environ.get(WORKER_INDEX_ENV)
        if index:
            fields["worker"] = int(index) if index.isdigit() else index
        fields["message"] = record.getMessage()
        fields.update(step_fields(record))
        extra = getattr(record, "reflow", None)
        if isinstance(extra, dict):
            for key, value in extra.items():
                fields.setdefault(key, value)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str, separators=(",", ":"))


DEFAULT_LOGGER = "reflow.runs"
"""The logger :class:`LoggingPlugin` writes to unless given another."""

_OMITTED = frozenset({"output"})
"""Event fields never logged."""


def _fields(name: str, event: Event) -> dict[str, Any]:
    fields: dict[str, Any] = {"event": name}
    for field in dataclasses.fields(event):
        if field.name not in _OMITTED:
            value = getattr(event, field.name)
            fields[field.name] = dict(value) if isinstance(value, dict) else value
    return fields


def _traceback(error: ErrorInfo) -> str:
    """The stored traceback, on lines of its own after the message."""
    text = error.get("traceback")
    return "\n" + text.rstrip() if isinstance(text, str) and text else ""


def _described(error: ErrorInfo) -> str:
    kind = str(error.get("type", "")).removeprefix("builtins.")
    message = error.get("message", "")
    return f"{kind}: {message}" if kind and message and message != kind else kind or message


class LoggingPlugin:
    """Logs one record per lifecycle event.

    ``logger`` is a :class:`logging.Logger` or a logger name (default
    ``"reflow.runs"``); ``level`` the level of every record except failures:
    failed runs are logged at ``ERROR``, failed step attempts and reclaimed
    runs at ``WARNING``.
    """

    def __init__(
        self, logger: logging.Logger | str | None = None, level: int = logging.INFO
    ) -> None:
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or DEFAULT_LOGGER)
        self.logger = logger
        self.level = level

    def __repr__(self) -> str:
        return f"LoggingPlugin(logger={self.logger.name!r}, level={self.level})"

    def _log(self, level: int, name: str, event: Event, message: str, *args: object) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, message, *args, extra={"reflow": _fields(name, event)})

    @hookimpl
    def reflow_run_started(self, event: RunStarted) -> None:
        how = "resumed after its worker was lost" if event.reclaimed else "started"
        self._log(
            self.level,
            "run_started",
            event,
            "run %s of workflow %r %s (attempt %d)",
            event.run_id,
            event.workflow,
            how,
            event.attempt,
        )

    @hookimpl
    def reflow_step_started(self, event: StepStarted) -> None:
        self._log(
            self.level,
            "step_started",
            event,
            "run %s step %r started (attempt %d)",
            event.run_id,
            event.step,
            event.attempt,
        )

    @hookimpl
    def reflow_run_reclaimed(self, event: RunReclaimed) -> None:
        self._log(
            logging.WARNING,
            "run_reclaimed",
            event,
            "run %s of workflow %r reclaimed: its previous worker's lease lapsed "
            "(reclaim %d, attempt %d)",
            event.run_id,
            event.workflow,
            event.reclaims,
            event.attempt,
        )

    @hookimpl
    def reflow_step_attempt_failed(self, event: StepAttemptFailed) -> None:
        then = "giving up" if event.retry_in is None else f"retrying in {event.retry_in:.3g}s"
        self._log(
            logging.WARNING,
            "step_attempt_failed",
            event,
            "run %s step %r attempt %d failed with %s; %s%s",
            event.run_id,
            event.step,
            event.attempt,
            _described(event.error),
            then,
            _traceback(event.error),
        )

    @hookimpl
    def reflow_step_completed(self, event: StepCompleted) -> None:
        self._log(
            self.level,
            "step_completed",
            event,
            "run %s step %r completed (attempt %d)",
            event.run_id,
            event.step,
            event.attempts,
        )

    @hookimpl
    def reflow_step_skipped(self, event: StepSkipped) -> None:
        self._log(
            self.level, "step_skipped", event, "run %s step %r skipped", event.run_id, event.step
        )

    @hookimpl
    def reflow_run_sleeping(self, event: RunSleeping) -> None:
        self._log(
            self.level,
            "run_sleeping",
            event,
            "run %s sleeping at step %r until %s",
            event.run_id,
            event.step,
            event.wake_at.isoformat(),
        )

    @hookimpl
    def reflow_run_waiting(self, event: RunWaiting) -> None:
        if event.event.startswith(CHILDREN_WAIT_PREFIX):
            self._log(
                self.level,
                "run_waiting",
                event,
                "run %s waiting at step %r for its child runs to end",
                event.run_id,
                event.step,
            )
            return
        until = "no timeout" if event.deadline is None else f"until {event.deadline.isoformat()}"
        self._log(
            self.level,
            "run_waiting",
            event,
            "run %s waiting at step %r for event %r (%s)",
            event.run_id,
            event.step,
            event.event,
            until,
        )

    @hookimpl
    def reflow_run_cancelled(self, event: RunCancelled) -> None:
        self._log(
            self.level,
            "run_cancelled",
            event,
            "run %s of workflow %r cancelled",
            event.run_id,
            event.workflow,
        )

    @hookimpl
    def reflow_run_completed(self, event: RunCompleted) -> None:
        self._log(
            self.level,
            "run_completed",
            event,
            "run %s of workflow %r completed",
            event.run_id,
            event.workflow,
        )

    @hookimpl
    def reflow_run_failed(self, event: RunFailed) -> None:
        where = f" at step {event.step!r}" if event.step else ""
        self._log(
            logging.ERROR,
            "run_failed",
            event,
            "run %s of workflow %r failed%s: [%s] %s%s",
            event.run_id,
            event.workflow,
            where,
            event.error.get("code", "step_failed"),
            _described(event.error),
            _traceback(event.error),
        )
