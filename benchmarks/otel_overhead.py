"""The OpenTelemetry plugin's cost: the shared workload with and without it.

    python benchmarks/otel_overhead.py [--runs 2000] [--steps 5] [--passes 5]
                                       [--backends sqlite] [--synchronous NORMAL]
                                       [--postgres-url ...] [--redis-url ...] [--pool-size 25]

The workload is ``throughput.py``'s: N runs of a K-step workflow whose steps
return a small dict, one engine at concurrency 25 on a fresh store per pass
(a new SQLite file with ``journal_mode=WAL``, a new PostgreSQL schema, a new
Redis key prefix). Each pass enqueues the N runs one after another, then
starts the worker and times from its start until the last run is durably
completed (``steps/s``, the drain rate, as in ``throughput.py``); the
enqueue loop is timed apart (``enqueue/s``) and the two together give the
end-to-end rate.

Two variants, the only difference between them being the plugin (neither
engine loads plugins from entry points):

* ``plugin``: ``OpenTelemetryPlugin`` with an SDK ``TracerProvider`` whose
  spans go through a ``BatchSpanProcessor`` (the SDK's defaults, as in
  production: a queue of 2,048 spans exported by a background thread in
  batches of 512) to an ``InMemorySpanExporter``, and an SDK
  ``MeterProvider`` with an ``InMemoryMetricReader`` (its instruments record
  every step and claim; nothing reads them while the pass is timed). Each
  run makes K+2 spans (its enqueue, its execution and one per step). After
  the timed window the providers are flushed (untimed) and the pass checks
  that the exporter got the N*(K+2) spans (the batch processor drops spans
  when its queue is full; the pass fails if more than 1% are missing) and
  that the ``reflow.step.duration`` histogram counted N*K attempts.
* ``without``: the same engine without the plugin.

After one warm-up round of both (200 runs each), the variants alternate,
their order swapped every pass. Figures are medians over the passes with the
spread (min-max), and the ratio of the medians (plugin over without); the
target is the plugin's steps/s at most 15% below the baseline's (a ratio of
0.85 or more). The machine is usually shared: compare the two variants of
one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from throughput import (
    Backend,
    _Completion,
    add_backend_options,
    build_workflow,
    cancel_on_sigterm,
    open_backend,
)

from reflow_core import Engine
from reflow_core.otel import OpenTelemetryPlugin

VARIANTS = ("plugin", "without")
TARGET = 0.85
"""The plugin's steps/s over the baseline's must be at least this."""


class Telemetry:
    """SDK providers for one pass: batched spans into memory, metrics kept in memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(BatchSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def plugin(self) -> OpenTelemetryPlugin:
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
        expected = runs * (steps + 2)
        assert expected * 0.99 <= exported <= expected, (exported, expected)
        attempts = self.step_attempts()
        assert attempts == runs * steps, (attempts, runs * steps)
        return exported

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@dataclass
class PassResult:
    enqueue_per_s: float
    steps_per_s: float
    end_to_end_steps_per_s: float
    spans: int = 0


async def one_pass(backend: Backend, runs: int, steps: int, with_plugin: bool) -> PassResult:
    """``throughput.py``'s pass, with or without the plugin."""
    telemetry = Telemetry() if with_plugin else None
    wf = build_workflow(steps)
    storage = backend.make()
    done = _Completion(storage, runs)
    engine = Engine(
        storage=storage,
        workflows=[wf],
        concurrency=25,
        lease="60s",
        poll_interval="50ms",
        plugins=[telemetry.plugin()] if telemetry is not None else [],
        load_entry_points=False,
    )
    try:
        await storage.initialize()
        t0 = time.perf_counter()
        for i in range(runs):
            await engine.enqueue(wf, {"n": i})
        t_enqueued = time.perf_counter()
        await engine.start()
        await done.event.wait()
        t_done = time.perf_counter()
        await engine.stop()
        spans = telemetry.check(runs, steps) if telemetry is not None else 0
    finally:
        await storage.close()
        await backend.dispose(storage)
        if telemetry is not None:
            telemetry.shutdown()
    drain = t_done - t_enqueued
    return PassResult(
        enqueue_per_s=runs / (t_enqueued - t0),
        steps_per_s=runs * steps / drain,
        end_to_end_steps_per_s=runs * steps / (t_done - t0),
        spans=spans,
    )


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):>9,.0f} (spread {min(values):,.0f}-{max(values):,.0f})"


def _ratio(results: dict[str, list[PassResult]], field: str) -> float:
    def median(variant: str) -> float:
        return statistics.median(getattr(r, field) for r in results[variant])

    return median("plugin") / median("without")


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
    print(
        f"python {sys.version.split()[0]}, N={args.runs}, K={args.steps}, concurrency 25, "
        f"{args.passes} passes after a warm-up, alternating; medians; "
        "plugin: BatchSpanProcessor(InMemorySpanExporter()) + InMemoryMetricReader"
    )
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-otel-")))
        for name in args.backends:
            backend = await open_backend(
                name, args, stack, tmp, synchronous=args.synchronous, database="reflow_bench_otel"
            )
            for variant in VARIANTS:
                await one_pass(backend, min(args.runs, 200), args.steps, variant == "plugin")
            results: dict[str, list[PassResult]] = {variant: [] for variant in VARIANTS}
            for n in range(args.passes):
                for variant in VARIANTS if n % 2 == 0 else VARIANTS[::-1]:
                    result = await one_pass(backend, args.runs, args.steps, variant == "plugin")
                    results[variant].append(result)
            spans = statistics.median(r.spans for r in results["plugin"])
            ratio = _ratio(results, "steps_per_s")
            print(f"\n{backend.label}, K={args.steps}")
            for variant in VARIANTS:
                rows = results[variant]
                print(f"  {variant:<8} enqueue/s    {_median([r.enqueue_per_s for r in rows])}")
                print(f"  {variant:<8} steps/s      {_median([r.steps_per_s for r in rows])}")
                print(
                    f"  {variant:<8} end-to-end   "
                    f"{_median([r.end_to_end_steps_per_s for r in rows])} steps/s"
                )
            print(
                f"  plugin / without: steps/s {ratio:.2f}x "
                f"({'within' if ratio >= TARGET else 'over'} the 15% target), "
                f"enqueue/s {_ratio(results, 'enqueue_per_s'):.2f}x, "
                f"end-to-end {_ratio(results, 'end_to_end_steps_per_s'):.2f}x"
            )
            print(
                f"  spans exported per pass: {spans:,.0f} "
                f"(expected {args.runs * (args.steps + 2):,})"
            )


if __name__ == "__main__":
    asyncio.run(main())
