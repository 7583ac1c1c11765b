"""OpenTelemetry traces and metrics for Reflow runs.

::

    pip install "reflow-core[otel]"   # opentelemetry-api; bring the SDK and exporters

    from reflow_core.otel import OpenTelemetryPlugin

    engine = Engine(storage=..., workflows=[...], plugins=[OpenTelemetryPlugin()])

The plugin uses only ``opentelemetry-api``: the tracer and meter providers
the application set up (globally, or given here) decide where spans and
metrics go. Without the plugin the engine makes no span and no metric.

**Traces.** ``enqueue`` (and ``ctx.start_child``) records a short
``enqueue <workflow>`` span (kind ``PRODUCER``) in the caller's trace and
stores its context with the run as headers (``traceparent``,
``tracestate``, ``baggage``: plain text). Each execution of the run on a
worker, from its claim to its next stop, is a ``run <workflow>`` span (kind
``CONSUMER``) whose parent is that stored context, on whichever process or
host claims it: a run that sleeps for three days is two short spans of one
trace, not one span three days long. Each attempt of a step, a parallel
branch or a map item is a ``step <name>`` span below it; the step's code
runs with that span current, so spans it makes (an HTTP client's) nest
there, in a worker thread too. A child run's spans continue the trace of
the step that started it. Sleeps, waits, reclaims and failures are span
events and attributes of the run span.

**Metrics** (names and attributes are stable; see :data:`METRICS`):
runs started, completed, failed, cancelled and reclaimed; step attempts and
failures and a step duration histogram; claim duration; and, read from the
storage's ``queue_stats`` every ``queue_interval`` while a worker runs,
observable gauges of each workflow's unfinished runs by status and of the
age of its oldest pending run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from . import __version__
from ._durations import Duration, to_seconds
from .adapter import check_headers
from .context import AwaitChildren, CompleteRun
from .errors import ConfigError, ReflowError
from .events import (
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunReclaimed,
    RunSleeping,
    RunStarted,
    RunWaiting,
)
from .hookspecs import hookimpl
from .storage import QueueStats
from .tracing import RunScope, StepScope

__all__ = ["ATTRIBUTES", "METRICS", "OpenTelemetryPlugin"]

logger = logging.getLogger("reflow.otel")

INSTRUMENTATION = "reflow_core"
"""The instrumentation scope name of the tracer and the meter."""

ATTRIBUTES = {
    "reflow.workflow": "the workflow's name",
    "reflow.run.id": "the run's id",
    "reflow.run.attempt": "how many times the run has been claimed, this claim included",
    "reflow.run.reclaimed": "whether this claim took over a lapsed lease (its worker died)",
    "reflow.run.parent_id": "a child run's parent run",
    "reflow.run.outcome": (
        "how the execution ended: completed, failed, cancelled, sleeping, waiting, "
        "interrupted (its lease was lost or its worker stopped)"
    ),
    "reflow.run.resumed": "on reflow.run.started: whether the run had been claimed before",
    "reflow.step.name": (
        "the step's name (on metrics, a map item's is the map's: resize, not resize[3])"
    ),
    "reflow.step.attempt": "the attempt's number, from 1",
    "reflow.step.kind": "step, branch (of .parallel) or item (of .map)",
    "reflow.step.outcome": (
        "completed, failed, waiting_children (it parked to wait for its child runs) or cancelled"
    ),
    "reflow.run.status": "on reflow.queue.runs: delayed, pending, running, sleeping or waiting",
    "error.type": "the exception's qualified type name, or a run failure's code",
}
"""The span and metric attributes the plugin sets, with their meaning."""

METRICS = {
    "reflow.run.started": "counter {run}: executions begun (reflow.workflow, reflow.run.resumed)",
    "reflow.run.completed": "counter {run}: runs completed (reflow.workflow)",
    "reflow.run.failed": "counter {run}: runs failed for good (reflow.workflow, error.type)",
    "reflow.run.cancelled": "counter {run}: runs cancelled through an engine (reflow.workflow)",
    "reflow.run.reclaimed": "counter {run}: lapsed leases taken over (reflow.workflow)",
    "reflow.step.failures": "counter {attempt}: step attempts that raised (reflow.workflow, "
    "reflow.step.name, error.type)",
    "reflow.step.duration": "histogram s: step attempts, their count and durations "
    "(reflow.workflow, reflow.step.name, reflow.step.kind, reflow.step.outcome)",
    "reflow.claim.duration": "histogram s: claims' storage round trips (reflow.claim.empty)",
    "reflow.queue.runs": "gauge {run}: unfinished runs (reflow.workflow, reflow.run.status)",
    "reflow.queue.oldest_pending_age": "gauge s: how long the oldest pending run has waited "
    "(reflow.workflow)",
}
"""The metrics the plugin records, with their kind, unit and attributes."""

_QUEUE_STATUSES = ("delayed", "pending", "running", "sleeping", "waiting")


def _error_type(exc: BaseException) -> str:
    kind = type(exc)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


class OpenTelemetryPlugin:
    """Traces and metrics of every run this engine enqueues or executes.

    ``tracer_provider`` and ``meter_provider`` default to the global ones
    (``opentelemetry.trace.set_tracer_provider``); ``queue_interval`` is how
    often a running worker reads the queue gauges from the storage.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        queue_interval: Duration = "15s",
    ) -> None:
        self._tracer = trace.get_tracer(INSTRUMENTATION, __version__, tracer_provider)
        meter = metrics.get_meter(INSTRUMENTATION, __version__, meter_provider)
        self._queue_interval = to_seconds(
            queue_interval, option="queue_interval", allow_zero=False, minimum=0.01
        )
        self._runs: dict[str, Span] = {}
        self._queue: list[QueueStats] = []
        self._queue_read_at: datetime | None = None
        self._pollers: dict[int, asyncio.Task[None]] = {}
        counter = meter.create_counter
        self._started = counter("reflow.run.started", "{run}", "run executions begun")
        self._completed = counter("reflow.run.completed", "{run}", "runs completed")
        self._failed = counter("reflow.run.failed", "{run}", "runs failed for good")
        self._cancelled = counter("reflow.run.cancelled", "{run}", "runs cancelled")
        self._reclaimed = counter("reflow.run.reclaimed", "{run}", "lapsed leases taken over")
        self._failures = counter("reflow.step.failures", "{attempt}", "step attempts that raised")
        self._duration = meter.create_histogram(
            "reflow.step.duration", "s", "step attempts' durations; its count is their number"
        )
        self._measured: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self._claims = meter.create_histogram("reflow.claim.duration", "s", "claim round trips")
        meter.create_observable_gauge(
            "reflow.queue.runs", [self._observe_runs], "{run}", "unfinished runs by status"
        )
        meter.create_observable_gauge(
            "reflow.queue.oldest_pending_age",
            [self._observe_age],
            "s",
            "how long the oldest pending run has waited",
        )

    def __repr__(self) -> str:
        return f"OpenTelemetryPlugin(queue_interval={self._queue_interval:g}s)"

    # -- traces ------------------------------------------------------------------

    @hookimpl
    def reflow_enqueue_headers(self, workflow: str) -> Mapping[str, str] | None:
        carrier: dict[str, str] = {}
        span = self._tracer.start_span(
            f"enqueue {workflow}",
            kind=SpanKind.PRODUCER,
            attributes={"reflow.workflow": workflow},
        )
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        span.end()
        try:
            check_headers(carrier)
        except ConfigError as exc:  # a propagator's header Reflow cannot store
            logger.warning("the trace context is not stored with the run: %s", exc)
            return None
        return carrier

    @hookimpl
    def reflow_run_scope(self, scope: RunScope) -> contextlib.AbstractContextManager[Any]:
        return _RunSpan(self, scope)

    @hookimpl
    def reflow_step_scope(self, scope: StepScope) -> contextlib.AbstractContextManager[Any]:
        return _StepSpan(self, scope)

    def _on_run(self, run_id: str) -> Span | None:
        """The span of the run's execution in this process, if it is open."""
        return self._runs.get(run_id)

    def _end_run(self, run_id: str, outcome: str, **attributes: Any) -> Span | None:
        span = self._on_run(run_id)
        if span is not None:
            span.set_attribute("reflow.run.outcome", outcome)
            for key, value in attributes.items():
                span.set_attribute(key, value)
        return span

    # -- lifecycle ---------------------------------------------------------------

    @hookimpl
    def reflow_run_started(self, event: RunStarted) -> None:
        self._started.add(
            1, {"reflow.workflow": event.workflow, "reflow.run.resumed": event.attempt > 1}
        )

    @hookimpl
    def reflow_run_reclaimed(self, event: RunReclaimed) -> None:
        self._reclaimed.add(1, {"reflow.workflow": event.workflow})
        span = self._on_run(event.run_id)
        if span is not None:
            span.add_event("reflow.reclaimed", {"reflow.run.reclaims": event.reclaims})

    @hookimpl
    def reflow_run_completed(self, event: RunCompleted) -> None:
        self._completed.add(1, {"reflow.workflow": event.workflow})
        span = self._end_run(event.run_id, "completed")
        if span is not None:
            span.set_status(Status(StatusCode.OK))

    @hookimpl
    def reflow_run_failed(self, event: RunFailed) -> None:
        code = str(event.error.get("code", "error"))
        self._failed.add(1, {"reflow.workflow": event.workflow, "error.type": code})
        span = self._end_run(event.run_id, "failed", **{"error.type": code})
        if span is not None:
            message = str(event.error.get("message", code))
            span.set_status(Status(StatusCode.ERROR, message))

    @hookimpl
    def reflow_run_cancelled(self, event: RunCancelled) -> None:
        self._cancelled.add(1, {"reflow.workflow": event.workflow})
        self._end_run(event.run_id, "cancelled")

    @hookimpl
    def reflow_run_sleeping(self, event: RunSleeping) -> None:
        span = self._end_run(event.run_id, "sleeping")
        if span is not None:
            span.add_event(
                "reflow.sleep",
                {"reflow.step.name": event.step, "reflow.wake_at": event.wake_at.isoformat()},
            )

    @hookimpl
    def reflow_run_waiting(self, event: RunWaiting) -> None:
        span = self._end_run(event.run_id, "waiting")
        if span is not None:
            attributes = {"reflow.step.name": event.step, "reflow.event": event.event}
            if event.deadline is not None:
                attributes["reflow.deadline"] = event.deadline.isoformat()
            span.add_event("reflow.wait", attributes)

    # -- claims and queues -------------------------------------------------------

    @hookimpl
    def reflow_claimed(self, workflows: list[str], runs: int, seconds: float) -> None:
        self._claims.record(seconds, {"reflow.claim.empty": runs == 0})

    @hookimpl
    def reflow_worker_started(self, engine: Any) -> None:
        key = id(engine)
        if key not in self._pollers:
            self._pollers[key] = asyncio.get_running_loop().create_task(
                self._poll_queues(engine), name="reflow-otel-queues"
            )

    @hookimpl
    def reflow_worker_stopping(self, engine: Any) -> None:
        task = self._pollers.pop(id(engine), None)
        if task is not None:
            task.cancel()

    async def _poll_queues(self, engine: Any) -> None:
        """Read the queue gauges from the storage every ``queue_interval``."""
        while True:
            try:
                self._queue = list(await engine.queue_stats())
                self._queue_read_at = await engine.storage.now()
            except NotImplementedError:
                logger.info("the storage has no queue statistics: no queue gauges")
                return
            except ReflowError as exc:
                logger.warning("reading the queue gauges failed: %s", exc)
            await asyncio.sleep(self._queue_interval)

    def _observe_runs(self, options: CallbackOptions) -> Iterable[Observation]:
        for stats in self._queue:
            for status in _QUEUE_STATUSES:
                yield Observation(
                    getattr(stats, status),
                    {"reflow.workflow": stats.workflow, "reflow.run.status": status},
                )

    def _observe_age(self, options: CallbackOptions) -> Iterable[Observation]:
        now = self._queue_read_at
        for stats in self._queue:
            since = stats.oldest_pending_since
            age = 0.0 if since is None or now is None else max(0.0, (now - since).total_seconds())
            yield Observation(age, {"reflow.workflow": stats.workflow})


class _RunSpan:
    """The span of one execution of a run, current while it executes."""

    __slots__ = ("_plugin", "_scope", "_span", "_token")

    def __init__(self, plugin: OpenTelemetryPlugin, scope: RunScope) -> None:
        self._plugin = plugin
        self._scope = scope

    def __enter__(self) -> None:
        scope = self._scope
        attributes: dict[str, Any] = {
            "reflow.workflow": scope.workflow,
            "reflow.run.id": scope.run_id,
            "reflow.run.attempt": scope.attempt,
            "reflow.run.reclaimed": scope.reclaimed,
        }
        if scope.parent_id is not None:
            attributes["reflow.run.parent_id"] = scope.parent_id
        self._span = span = self._plugin._tracer.start_span(
            f"run {scope.workflow}",
            context=propagate.extract(scope.headers) if scope.headers else None,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
        self._token = context.attach(trace.set_span_in_context(span))
        self._plugin._runs[scope.run_id] = span

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        self._plugin._runs.pop(self._scope.run_id, None)
        context.detach(self._token)
        if isinstance(error, asyncio.CancelledError):
            span.set_attribute("reflow.run.outcome", "interrupted")
        elif isinstance(error, Exception):
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()


class _StepSpan:
    """The span of one step attempt, current while the step runs (a class,
    not a generator: it is entered for every step attempt)."""

    __slots__ = ("_began", "_plugin", "_scope", "_span", "_token")

    def __init__(self, plugin: OpenTelemetryPlugin, scope: StepScope) -> None:
        self._plugin = plugin
        self._scope = scope

    def __enter__(self) -> None:
        scope = self._scope
        self._span = span = self._plugin._tracer.start_span(
            f"step {scope.step}",
            # The workflow and the run are the parent run span's.
            attributes={
                "reflow.step.name": scope.step,
                "reflow.step.attempt": scope.attempt,
                "reflow.step.kind": scope.kind,
            },
            record_exception=False,
            set_status_on_exception=False,
        )
        self._token = context.attach(trace.set_span_in_context(span))
        self._began = time.perf_counter()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        took = time.perf_counter() - self._began
        context.detach(self._token)
        span = self._span
        plugin = self._plugin
        scope = self._scope
        if error is None or isinstance(error, CompleteRun):
            outcome = "completed"  # ctx.complete() ends the run here, with an output
        elif isinstance(error, AwaitChildren):
            outcome = "waiting_children"
        elif isinstance(error, Exception):
            outcome = "failed"
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        else:
            outcome = "cancelled"
        span.set_attribute("reflow.step.outcome", outcome)
        span.end()
        name = scope.step.split("[", 1)[0] if scope.kind == "item" else scope.step
        key = (scope.workflow, name, scope.kind, outcome)
        measured = plugin._measured.get(key)
        if measured is None:
            measured = plugin._measured[key] = {
                "reflow.workflow": scope.workflow,
                "reflow.step.name": name,
                "reflow.step.kind": scope.kind,
                "reflow.step.outcome": outcome,
            }
        plugin._duration.record(took, measured)
        if outcome == "failed" and error is not None:
            plugin._failures.add(
                1,
                {
                    "reflow.workflow": scope.workflow,
                    "reflow.step.name": name,
                    "error.type": _error_type(error),
                },
            )
