"""The OpenTelemetry plugin's cost: the shared workload with and without it.

    python benchmarks/otel_overhead.py [--runs 2000] [--steps 5] [--passes 5]
                                       [--backends sqlite] [--synchronous NORMAL]
                                       [--postgres-url ...] [--redis-url ...] [--pool-size 25]

The workload is ``throughput.py``'s pass (``one_pass``): N runs of a K-step
workflow whose steps return a small dict, one engine at concurrency 25 on a
fresh store per pass, the N runs enqueued first, then the worker's drain
timed until the last run is durably completed (``steps/s``); the enqueue
loop is timed apart (``enqueue/s``).

Four variants, the only difference between them being the engine's plugins
(none loaded from entry points):

* ``plugin``: ``OpenTelemetryPlugin`` with an SDK ``TracerProvider`` whose
  spans go through a ``BatchSpanProcessor`` (the SDK's defaults, as in
  production: a queue of 2,048 spans exported by a background thread in
  batches of 512) to an ``InMemorySpanExporter``, and an SDK
  ``MeterProvider`` with an ``InMemoryMetricReader`` (nothing reads it while
  the pass is timed). Every trace is sampled: each run makes K+2 spans (its
  enqueue, its execution, one per step). After the timed window the
  providers are flushed (untimed) and the pass checks that the exporter got
  the N*(K+2) spans (the batch processor drops spans when its queue is full;
  the pass fails if more than 1% are missing) and that the
  ``reflow.step.duration`` histogram counted N*K attempts.
* ``sampled``: the same with the sampler most production tracing uses,
  ``ParentBased(TraceIdRatioBased(0.1))``: one trace in ten is recorded;
  the metrics still count every step (checked).
* ``sdk-floor``: not Reflow's plugin but the least any per-step tracing
  costs with this SDK: a plugin of this file's making whose run and step
  scopes open a bare span (no attribute, no metric) made current, through
  the same providers as ``plugin`` (N*(K+1) spans, checked). What
  ``plugin`` costs beyond it is Reflow's share.
* ``without``: the same engine without any plugin.

After one warm-up round of every variant (200 runs each), the variants
alternate, their order reversed every pass. Figures are medians over the
passes with the spread (min-max), and each variant's ratio of medians over
``without``; the target is the ``plugin`` steps/s at most 15% below the
baseline's (a ratio of 0.85 or more). The machine is usually shared:
compare the variants of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from opentelemetry import context, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from throughput import (
    Backend,
    PassResult,
    add_backend_options,
    cancel_on_sigterm,
    one_pass,
    open_backend,
)

from reflow_core.hookspecs import hookimpl
from reflow_core.otel import OpenTelemetryPlugin
from reflow_core.tracing import RunScope, StepScope

VARIANTS = ("plugin", "sampled", "sdk-floor", "without")
TARGET = 0.85
"""The plugin's steps/s over the baseline's must be at least this."""


class _BareSpan:
    """A span with nothing on it, current while the scope is open."""

    __slots__ = ("_span", "_token", "_tracer")

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def __enter__(self) -> None:
        self._span = self._tracer.start_span("scope")
        self._token = context.attach(trace.set_span_in_context(self._span))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context.detach(self._token)
        self._span.end()


class BareSpans:
    """The ``sdk-floor`` variant's plugin: a bare span per run execution and step attempt."""

    def __init__(self, tracer_provider: TracerProvider) -> None:
        self._tracer = tracer_provider.get_tracer("otel_overhead")

    @hookimpl
    def reflow_run_scope(self, scope: RunScope) -> _BareSpan:
        return _BareSpan(self._tracer)

    @hookimpl
    def reflow_step_scope(self, scope: StepScope) -> _BareSpan:
        return _BareSpan(self._tracer)


class Telemetry:
    """SDK providers for one pass of a variant: batched spans into memory,
    metrics kept in memory, and the plugin the variant uses."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.spans = InMemorySpanExporter()
        sampler: Sampler | None = (
            ParentBased(TraceIdRatioBased(0.1)) if variant == "sampled" else None
        )
        self.tracer_provider = TracerProvider(sampler=sampler)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def plugin(self) -> Any:
        if self.variant == "sdk-floor":
            return BareSpans(self.tracer_provider)
        return OpenTelemetryPlugin(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )

    def step_attempts(self) -> int:
        data = self.reader.get_metrics_data()
        if data is None:
            return 0
        return sum(
            point.count  # type: ignore[union-attr]
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "reflow.step.duration"
            for point in metric.data.data_points
        )

    def check(self, runs: int, steps: int) -> int:
        """Flush, check what was exported, and return the number of spans."""
        assert self.tracer_provider.force_flush(30_000), "the span flush timed out"
        exported = len(self.spans.get_finished_spans())
        if self.variant == "sampled":
            # one trace in ten, give or take: each sampled run makes K+2 spans
            expected = runs * (steps + 2)
            assert 0.05 * expected <= exported <= 0.15 * expected, (exported, expected)
        else:
            expected = runs * (steps + (2 if self.variant == "plugin" else 1))
            assert expected * 0.99 <= exported <= expected, (exported, expected)
        if self.variant != "sdk-floor":
            attempts = self.step_attempts()
            assert attempts == runs * steps, (attempts, runs * steps)
        return exported

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


async def variant_pass(backend: Backend, runs: int, steps: int, variant: str) -> PassResult:
    """``throughput.py``'s pass with the variant's plugin; checks what it exported."""
    if variant == "without":
        return await one_pass(backend.make, runs, steps, backend.dispose)
    telemetry = Telemetry(variant)
    try:
        result = await one_pass(
            backend.make, runs, steps, backend.dispose, plugins=[telemetry.plugin()]
        )
        telemetry.check(runs, steps)
    finally:
        telemetry.shutdown()
    return result


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):>9,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def _ratio(results: dict[str, list[PassResult]], variant: str, field: str) -> float:
    def median(of: str) -> float:
        return statistics.median(getattr(r, field) for r in results[of])

    return median(variant) / median("without")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--passes", type=int, default=5)
    add_backend_options(parser, ["sqlite"])
    parser.add_argument("--synchronous", default="NORMAL")
    args = parser.parse_args()
    cancel_on_sigterm()
    steps = args.steps
    print(
        f"python {sys.version.split()[0]}, N={args.runs}, K={steps}, concurrency 25, "
        f"{args.passes} passes after a warm-up, alternating; medians (spread); "
        "spans: BatchSpanProcessor(InMemorySpanExporter()), metrics: InMemoryMetricReader"
    )
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-otel-")))
        for name in args.backends:
            backend = await open_backend(
                name, args, stack, tmp, synchronous=args.synchronous, database="reflow_bench_otel"
            )
            for variant in VARIANTS:
                await variant_pass(backend, min(args.runs, 200), steps, variant)
            results: dict[str, list[PassResult]] = {variant: [] for variant in VARIANTS}
            for n in range(args.passes):
                for variant in VARIANTS if n % 2 == 0 else VARIANTS[::-1]:
                    results[variant].append(await variant_pass(backend, args.runs, steps, variant))
            print(f"\n{backend.label}, K={steps}")
            print(f"  {'variant':<10} {'enqueue/s':>24} {'drain steps/s':>24} {'vs without':>10}")
            for variant in VARIANTS:
                rows = results[variant]
                print(
                    f"  {variant:<10} {_median([r.enqueue_per_s for r in rows]):>24} "
                    f"{_median([r.steps_per_s for r in rows]):>24} "
                    f"{_ratio(results, variant, 'steps_per_s'):>9.2f}x"
                )
            ratio = _ratio(results, "plugin", "steps_per_s")
            print(
                f"  plugin / without: steps/s {ratio:.2f}x "
                f"({'within' if ratio >= TARGET else 'over'} the 15% target), "
                f"enqueue/s {_ratio(results, 'plugin', 'enqueue_per_s'):.2f}x"
            )


if __name__ == "__main__":
    asyncio.run(main())
