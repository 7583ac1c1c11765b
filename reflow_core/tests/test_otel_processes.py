"""One trace from the request that enqueued a run, through a worker killed
mid-step, to the worker process that reclaimed the run and finished it.

The test process is the web application: its engine (``worker=False``) has
the OpenTelemetry plugin on an SDK tracer provider with an in-memory
exporter, and it enqueues a run of a two-step workflow inside a
``POST /orders`` span. Real ``reflow worker`` processes run an application
whose plugin exports each finished span, as it ends, as one JSON line of
``LOGDIR/spans-<pid>.jsonl`` (one ``write`` per span to a file opened with
``O_APPEND``, so a SIGKILL loses nothing already exported). The first worker
blocks in the first step and is SIGKILLed; the second reclaims the run once
its one-second lease lapses, and its spans continue the request's trace.

With ``REFLOW_TRACE_DUMP`` set to a path, the SQLite case writes every span
of the trace there as JSON (the test process's and the workers'), for
drawing a real trace.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from reflow_conformance.testsupport import AppFleet, now_and_then
from reflow_core import Engine, StepContext, workflow
from reflow_core.otel import OpenTelemetryPlugin

_WORKFLOW = "order"
_STEPS = ("reserve", "charge")

_APP = textwrap.dedent(
    """
    import asyncio
    import json
    import os

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from reflow_conformance.testsupport import ExecutionLog
    from reflow_core import Engine, open_storage, workflow
    from reflow_core.otel import OpenTelemetryPlugin


    class JsonLinesExporter(SpanExporter):
        # Each finished span as one JSON line, in a single write to a file
        # opened with O_APPEND: what is exported survives a SIGKILL.

        def __init__(self, path):
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        def export(self, spans):
            for span in spans:
                line = {
                    "name": span.name,
                    "kind": span.kind.name,
                    "trace_id": format(span.context.trace_id, "032x"),
                    "span_id": format(span.context.span_id, "016x"),
                    "parent_id": (
                        None if span.parent is None else format(span.parent.span_id, "016x")
                    ),
                    "start_time": span.start_time,
                    "end_time": span.end_time,
                    "attributes": dict(span.attributes or {}),
                    "status": span.status.status_code.name,
                    "events": [event.name for event in span.events],
                    "pid": os.getpid(),
                }
                os.write(self._fd, (json.dumps(line, default=repr) + "\\n").encode())
            return SpanExportResult.SUCCESS

        def shutdown(self):
            os.close(self._fd)


    def make():
        logdir = os.environ["APP_LOGDIR"]
        log = ExecutionLog(logdir)
        provider = TracerProvider()
        exporter = JsonLinesExporter(os.path.join(logdir, f"spans-{os.getpid()}.jsonl"))
        provider.add_span_processor(SimpleSpanProcessor(exporter))

        async def reserve(ctx):
            log.write("began", run=ctx.run_id, step="reserve", attempt=ctx.attempt)
            if os.environ.get("APP_BLOCK"):
                await asyncio.sleep(120)  # until this process is killed
            return "reserved"

        async def charge(ctx):
            return "charged"

        order = workflow("order", input=dict).step("reserve", reserve).step("charge", charge)
        return Engine(
            storage=open_storage(os.environ["APP_STORE"]),
            workflows=[order],
            lease="1s",
            poll_interval="50ms",
            drain_timeout="5s",
            plugins=[OpenTelemetryPlugin(tracer_provider=provider)],
            load_entry_points=False,
        )
    """
)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fleet(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AppFleet]:
    """Worker processes of the app on a store of the test's own: a SQLite
    file, or a PostgreSQL schema."""
    if backend == "sqlite":
        store = f"sqlite:///{tmp_path}/store.db"
    else:
        store = str(request.getfixturevalue(f"{backend}_url"))
    made = AppFleet(tmp_path, store, module="traced_app", source=_APP)
    try:
        yield made
    finally:
        made.cleanup()


def _unreachable(ctx: StepContext[Any, Any]) -> None:
    raise AssertionError("the web process runs no step")


# The web process's view of the workflow: enough to enqueue it by name.
_ORDER = workflow(_WORKFLOW, input=dict).step(_STEPS[0], _unreachable).step(_STEPS[1], _unreachable)


def _hex(number: int, width: int) -> str:
    return format(number, f"0{width}x")


def _as_line(span: ReadableSpan) -> dict[str, Any]:
    """A span of the test process, as the workers write theirs."""
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": _hex(span.context.trace_id, 32),
        "span_id": _hex(span.context.span_id, 16),
        "parent_id": None if span.parent is None else _hex(span.parent.span_id, 16),
        "start_time": span.start_time,
        "end_time": span.end_time,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "pid": os.getpid(),
    }


def _spans(logdir: Path, pid: int) -> list[dict[str, Any]]:
    """The spans worker ``pid`` exported (whole lines only)."""
    path = logdir / f"spans-{pid}.jsonl"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    whole = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in whole.splitlines() if line]


def _enqueue(store: str, provider: TracerProvider) -> str:
    async def work() -> str:
        plugin = OpenTelemetryPlugin(tracer_provider=provider)
        tracer = provider.get_tracer("web")
        async with Engine(
            storage=store,
            workflows=[_ORDER],
            worker=False,
            plugins=[plugin],
            load_entry_points=False,
        ) as engine:
            with tracer.start_as_current_span("POST /orders"):
                run = await engine.enqueue(_ORDER, {"order": 7})
        return run.id

    return asyncio.run(work())


@pytest.mark.slow
def test_one_trace_from_the_request_through_a_reclaim_on_another_process(
    fleet: AppFleet, backend: str
) -> None:
    workers = fleet.workers
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    try:
        run_id = _enqueue(fleet.store, provider)
    finally:
        provider.shutdown()
    web = list(exported.get_finished_spans())
    (request,) = [span for span in web if span.name == "POST /orders"]
    (enqueue,) = [span for span in web if span.name == f"enqueue {_WORKFLOW}"]
    trace_id = request.context.trace_id
    assert enqueue.context.trace_id == trace_id
    assert enqueue.parent is not None
    assert enqueue.parent.span_id == request.context.span_id
    record = fleet.run(run_id)
    assert record is not None
    assert "traceparent" in record.headers

    first = fleet.start(block="1")
    workers.wait_for("the first step to begin", workers.logged("began", first), timeout=20)
    workers.kill(first)
    second = fleet.start()
    run_span = f"run {_WORKFLOW}"

    def ended() -> bool:
        return any(
            span["name"] == run_span and span["attributes"].get("reflow.run.id") == run_id
            for span in _spans(workers.logdir, second.pid)
        )

    workers.wait_for("the second worker to end its run span", ended, timeout=20)
    workers.wait_for(
        "the run to be stored as completed",
        now_and_then(lambda: getattr(fleet.run(run_id), "status", None) == "completed", 0.2),
        timeout=10,
    )
    fleet.stop(second)

    def of_the_run(pid: int) -> list[dict[str, Any]]:
        """The run's spans a worker exported: its executions and their steps."""
        spans = _spans(workers.logdir, pid)
        runs = {s["span_id"] for s in spans if s["attributes"].get("reflow.run.id") == run_id}
        return [s for s in spans if s["span_id"] in runs or s["parent_id"] in runs]

    killed = of_the_run(first.pid)
    took_over = of_the_run(second.pid)
    want = _hex(trace_id, 32)
    assert {span["trace_id"] for span in took_over} == {want}
    assert {span["trace_id"] for span in killed} <= {want}  # it was killed mid-step: likely none

    (execution,) = [span for span in took_over if span["name"] == run_span]
    attributes = execution["attributes"]
    assert attributes["reflow.run.reclaimed"] is True
    assert attributes["reflow.run.attempt"] == 2
    assert attributes["reflow.run.outcome"] == "completed"
    assert execution["kind"] == "CONSUMER"
    assert execution["status"] == "OK"
    assert execution["parent_id"] == _hex(enqueue.context.span_id, 16)

    steps = [span for span in took_over if span["name"].startswith("step ")]
    assert sorted(span["name"] for span in steps) == sorted(f"step {name}" for name in _STEPS)
    assert {span["parent_id"] for span in steps} == {execution["span_id"]}
    assert all(span["attributes"]["reflow.step.outcome"] == "completed" for span in steps)
    began = [line for line in workers.lines() if line["kind"] == "began"]
    assert [line["pid"] for line in began] == [first.pid, second.pid]

    dump = os.environ.get("REFLOW_TRACE_DUMP")
    if dump and backend == "sqlite":
        spans = [_as_line(span) for span in web] + killed + took_over
        spans.sort(key=lambda span: span["start_time"])
        Path(dump).write_text(json.dumps(spans, indent=2, default=repr) + "\n", encoding="utf-8")
