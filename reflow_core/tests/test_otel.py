"""The OpenTelemetry plugin, with the SDK's in-memory exporters: the trace a
run makes from the request that enqueued it to its steps, across sleeps,
retries, child runs and worker threads; the metrics of a known workload;
and nothing at all without the plugin."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from reflow_core import Engine, Retry, RunFailedError, StepContext, workflow
from reflow_core.otel import ATTRIBUTES, METRICS, OpenTelemetryPlugin
from reflow_core.storage import Storage


class Telemetry:
    """A tracer provider and a meter provider that keep what they get."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def plugin(self, **options: Any) -> OpenTelemetryPlugin:
        return OpenTelemetryPlugin(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.finished() if span.name == name]

    def metrics(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Each metric's points: (attributes, value; a histogram's count)."""
        found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = point.count  # type: ignore[attr-defined]
                        found.setdefault(metric.name, []).append((dict(point.attributes), value))
        return found

    def total(self, name: str, **attributes: Any) -> Any:
        return sum(
            value
            for attrs, value in self.metrics().get(name, [])
            if all(attrs.get(key) == want for key, want in attributes.items())
        )


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    made = Telemetry()
    yield made
    made.tracer_provider.shutdown()
    made.meter_provider.shutdown()


def _engine(storage: Storage | str, *workflows: Any, **options: Any) -> Engine:
    options.setdefault("poll_interval", "50ms")
    return Engine(storage=storage, workflows=list(workflows), load_entry_points=False, **options)


def _parent(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_one_trace_from_the_request_through_every_step(telemetry: Telemetry) -> None:
    calls: list[int] = []

    def charge(ctx: StepContext[dict[str, Any], Any]) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("card network down")
        return "ch_1"

    async def ship(ctx: StepContext[dict[str, Any], Any]) -> str:
        return "shipped"

    wf = (
        workflow("order", input=dict)
        .step("charge", charge, retry=Retry(max_attempts=2, initial_delay="10ms"))
        .step("ship", ship)
    )
    tracer = telemetry.tracer_provider.get_tracer("web")
    async with _engine("memory://", wf, plugins=[telemetry.plugin()]) as engine:
        with tracer.start_as_current_span("POST /orders") as request:
            run = await engine.enqueue(wf, {"order": 7})
        assert await engine.result(run.id, timeout=10) == "shipped"
    trace_id = request.get_span_context().trace_id
    (enqueue,) = telemetry.named("enqueue order")
    (execution,) = telemetry.named("run order")
    charges = telemetry.named("step charge")
    (shipped,) = telemetry.named("step ship")
    assert {span.context.trace_id for span in [enqueue, execution, *charges, shipped]} == {trace_id}
    assert enqueue.kind is SpanKind.PRODUCER
    assert _parent(enqueue) == request.get_span_context().span_id
    assert execution.kind is SpanKind.CONSUMER
    assert _parent(execution) == enqueue.context.span_id
    assert execution.attributes is not None
    assert execution.attributes["reflow.run.id"] == run.id
    assert execution.attributes["reflow.run.outcome"] == "completed"
    assert execution.status.status_code is StatusCode.OK
    assert [_parent(span) for span in [*charges, shipped]] == [execution.context.span_id] * 3
    failed, passed = sorted(charges, key=lambda s: s.attributes["reflow.step.attempt"])  # type: ignore[index]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["reflow.step.outcome"] == "failed"
    assert [event.name for event in failed.events] == ["exception"]
    assert failed.events[0].attributes is not None
    assert failed.events[0].attributes["exception.type"] == "ConnectionError"
    assert passed.status.status_code is not StatusCode.ERROR
    assert calls == [1, 2]


async def test_a_sleeping_run_is_short_spans_of_one_trace(telemetry: Telemetry) -> None:
    wf = (
        workflow("reminder")
        .step("first", lambda ctx: 1)
        .sleep("nap", "200ms")
        .step("second", lambda ctx: 2)
    )
    async with _engine("memory://", wf, plugins=[telemetry.plugin()]) as engine:
        run = await engine.enqueue(wf, None)
        assert await engine.result(run.id, timeout=10) == 2
    executions = sorted(
        telemetry.named("run reminder"),
        key=lambda s: s.attributes["reflow.run.attempt"],  # type: ignore[index]
    )
    assert len(executions) == 2
    before, after = executions
    assert before.attributes is not None
    assert after.attributes is not None
    assert before.attributes["reflow.run.outcome"] == "sleeping"
    assert [event.name for event in before.events] == ["reflow.sleep"]
    assert after.attributes["reflow.run.outcome"] == "completed"
    assert before.context.trace_id == after.context.trace_id
    assert _parent(before) == _parent(after)  # both below the enqueue, not one below the other
    assert before.end_time is not None
    assert after.start_time is not None
    assert after.start_time > before.end_time  # the sleep is a gap, not a span


async def test_spans_of_a_steps_own_code_nest_under_it_in_a_thread_too(
    telemetry: Telemetry,
) -> None:
    tracer = telemetry.tracer_provider.get_tracer("app")

    def call_api(ctx: StepContext[Any, Any]) -> str:  # a plain def step: a worker thread
        with tracer.start_as_current_span("GET /rates"):
            return "ok"

    async def store(ctx: StepContext[Any, Any]) -> str:
        with tracer.start_as_current_span("INSERT rates"):
            await asyncio.sleep(0)
        return "stored"

    wf = workflow("rates").step("call", call_api).step("store", store)
    async with _engine("memory://", wf, plugins=[telemetry.plugin()]) as engine:
        run = await engine.enqueue(wf, None)
        await engine.result(run.id, timeout=10)
    (call,) = telemetry.named("step call")
    (stored,) = telemetry.named("step store")
    (get,) = telemetry.named("GET /rates")
    (insert,) = telemetry.named("INSERT rates")
    assert _parent(get) == call.context.span_id
    assert _parent(insert) == stored.context.span_id


async def test_a_child_run_continues_its_parents_trace(telemetry: Telemetry) -> None:
    child = workflow("label").step("print", lambda ctx: f"label-{ctx.input}")

    async def make(ctx: StepContext[Any, Any]) -> list[str]:
        handles = [await ctx.start_child(child, n) for n in range(2)]
        return [await handle.result() for handle in handles]

    parent = workflow("ship").step("labels", make)
    async with _engine("memory://", parent, child, plugins=[telemetry.plugin()]) as engine:
        run = await engine.enqueue(parent, None)
        assert await engine.result(run.id, timeout=10) == ["label-0", "label-1"]
    labels = telemetry.named("step labels")
    trace_id = labels[0].context.trace_id
    children = telemetry.named("run label")
    assert len(children) == 2
    assert {span.context.trace_id for span in children} == {trace_id}
    starts = telemetry.named("enqueue label")
    assert len(starts) == 2
    assert {_parent(span) for span in starts} <= {span.context.span_id for span in labels}
    for span in children:
        assert span.attributes is not None
        assert span.attributes["reflow.run.parent_id"] == run.id
    parked = [
        s for s in labels if s.attributes and s.attributes["reflow.step.outcome"] != "completed"
    ]
    assert [s.attributes["reflow.step.outcome"] for s in parked if s.attributes] == [
        "waiting_children"
    ]


async def test_map_items_are_spans_and_metrics_count_them_by_map(telemetry: Telemetry) -> None:
    wf = workflow("resize").map("thumb", lambda ctx: [1, 2, 3], lambda ctx: ctx.item * 2)
    async with _engine("memory://", wf, plugins=[telemetry.plugin()]) as engine:
        run = await engine.enqueue(wf, None)
        assert await engine.result(run.id, timeout=10) == [2, 4, 6]
    items = [s for s in telemetry.finished() if s.name.startswith("step thumb[")]
    assert sorted(s.name for s in items) == ["step thumb[0]", "step thumb[1]", "step thumb[2]"]
    assert {s.attributes["reflow.step.kind"] for s in items if s.attributes} == {"item"}
    assert telemetry.total("reflow.step.duration", **{"reflow.step.name": "thumb"}) == 3


async def test_metrics_after_a_known_workload(storage: Storage, telemetry: Telemetry) -> None:
    def flaky(ctx: StepContext[int, Any]) -> int:
        if ctx.input == 3:
            raise ValueError("bad input")
        return ctx.input

    ok = workflow("ok", input=int).step("work", flaky, retry=Retry(max_attempts=1))
    later = workflow("later").step("s", lambda ctx: None)
    plugin = telemetry.plugin(queue_interval="50ms")
    async with _engine(storage, ok, later, plugins=[plugin], close_storage=False) as engine:
        runs = [await engine.enqueue(ok, n) for n in range(5)]
        for run in runs:
            if run.input == 3:
                with pytest.raises(RunFailedError):
                    await engine.result(run.id, timeout=10)
            else:
                assert await engine.result(run.id, timeout=10) == run.input
        delayed = [await engine.enqueue(later, n, delay="1h") for n in range(2)]
        waiting = {"reflow.workflow": "later", "reflow.run.status": "delayed"}
        deadline = time.monotonic() + 10
        while telemetry.total("reflow.queue.runs", **waiting) != 2:
            assert time.monotonic() < deadline, telemetry.metrics().get("reflow.queue.runs")
            await asyncio.sleep(0.05)
        ages = telemetry.metrics().get("reflow.queue.oldest_pending_age", [])
        for run in delayed:
            await engine.cancel(run.id)
    assert telemetry.total("reflow.run.started", **{"reflow.workflow": "ok"}) == 5
    assert telemetry.total("reflow.run.completed", **{"reflow.workflow": "ok"}) == 4
    assert telemetry.total("reflow.run.failed", **{"reflow.workflow": "ok"}) == 1
    assert telemetry.total("reflow.run.cancelled", **{"reflow.workflow": "later"}) == 2
    assert telemetry.total("reflow.step.duration", **{"reflow.step.name": "work"}) == 5
    assert telemetry.total("reflow.step.failures", **{"error.type": "ValueError"}) == 1
    assert telemetry.total("reflow.step.duration", **{"reflow.step.outcome": "completed"}) == 4
    assert telemetry.total("reflow.claim.duration") >= 1
    assert ({"reflow.workflow": "later"}, 0.0) in ages  # nothing of it pending
    assert all(value >= 0 for _, value in ages)


async def test_nothing_is_recorded_without_the_plugin(telemetry: Telemetry) -> None:
    # The global providers (settable once per process): what an engine would
    # reach for if it traced or measured anything without the plugin.
    trace.set_tracer_provider(telemetry.tracer_provider)
    metrics.set_meter_provider(telemetry.meter_provider)
    wf = workflow("quiet").step("s", lambda ctx: ctx.input)
    tracer = telemetry.tracer_provider.get_tracer("web")
    async with _engine("memory://", wf) as engine:
        with tracer.start_as_current_span("request"):
            run = await engine.enqueue(wf, 1)
        assert await engine.result(run.id, timeout=10) == 1
        record = await engine.storage.get_run(run.id)
    assert [span.name for span in telemetry.finished()] == ["request"]
    assert telemetry.metrics() == {}
    assert record is not None
    assert record.headers == {}


def test_the_documented_names_are_the_ones_recorded() -> None:
    assert set(METRICS) == {
        "reflow.run.started",
        "reflow.run.completed",
        "reflow.run.failed",
        "reflow.run.cancelled",
        "reflow.run.reclaimed",
        "reflow.step.failures",
        "reflow.step.duration",
        "reflow.claim.duration",
        "reflow.queue.runs",
        "reflow.queue.oldest_pending_age",
    }
    assert "reflow.run.outcome" in ATTRIBUTES


def test_the_docs_list_every_attribute_and_metric() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    missing = [name for name in [*ATTRIBUTES, *METRICS] if f"| `{name}` |" not in page]
    assert not missing, f"docs/observability.md does not list {missing}"
