"""``reflow_core.plugins.logging.LoggingPlugin``: one structured record per event."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from reflow_conformance.testsupport import engine_on
from reflow_core import Retry, StepContext, workflow
from reflow_core.cli.worker import configure_logging
from reflow_core.plugins.logging import DEFAULT_LOGGER, LoggingPlugin, RunContextFilter
from reflow_core.storage import Storage

SECRET = "4111-1111-1111-1111"


def records(
    caplog: pytest.LogCaptureFixture, name: str = DEFAULT_LOGGER
) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


async def test_one_record_per_event_with_structured_fields(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    async def charge(ctx: StepContext[Any, Any]) -> dict[str, str]:
        if ctx.attempt == 1:
            raise ConnectionError("gateway timeout")
        return {"card": SECRET}

    wf = (
        workflow("order")
        .step("charge", charge, retry=Retry(max_attempts=2, initial_delay=0))
        .step("review", lambda ctx: "x", when=lambda ctx: False)
        .step("ship", lambda ctx: {"card": SECRET})
    )
    caplog.set_level(logging.DEBUG, logger=DEFAULT_LOGGER)
    async with engine_on(storage, wf, plugins=[LoggingPlugin()]) as engine:
        run = await engine.enqueue(wf, {"card": SECRET})
        assert await engine.tick() == 1

    logged = records(caplog)
    assert [r.getMessage() for r in logged] == [
        f"run {run.id} of workflow 'order' started (attempt 1)",
        f"run {run.id} step 'charge' started (attempt 1)",
        f"run {run.id} step 'charge' attempt 1 failed with ConnectionError: gateway timeout; "
        "retrying in 0s\nTraceback (most recent call last):\n"
        f'  File "{__file__}", line {charge.__code__.co_firstlineno + 2}, in charge\n'
        '    raise ConnectionError("gateway timeout")\n'
        "ConnectionError: gateway timeout",
        f"run {run.id} step 'charge' started (attempt 2)",
        f"run {run.id} step 'charge' completed (attempt 2)",
        f"run {run.id} step 'review' skipped",
        f"run {run.id} step 'ship' started (attempt 1)",
        f"run {run.id} step 'ship' completed (attempt 1)",
        f"run {run.id} of workflow 'order' completed",
    ]
    assert [r.levelno for r in logged].count(logging.WARNING) == 1
    assert {r.levelno for r in logged} == {logging.INFO, logging.WARNING}
    fields = [r.reflow for r in logged]  # type: ignore[attr-defined]
    assert [f["event"] for f in fields] == [
        "run_started",
        "step_started",
        "step_attempt_failed",
        "step_started",
        "step_completed",
        "step_skipped",
        "step_started",
        "step_completed",
        "run_completed",
    ]
    assert all(f["run_id"] == run.id and f["workflow"] == "order" for f in fields)
    assert fields[0] == {
        "event": "run_started",
        "run_id": run.id,
        "workflow": "order",
        "attempt": 1,
        "reclaimed": False,
    }
    assert fields[2]["retry_in"] == 0.0
    assert fields[2]["error"]["type"] == "builtins.ConnectionError"
    assert fields[4] == {
        "event": "step_completed",
        "run_id": run.id,
        "workflow": "order",
        "step": "charge",
        "attempts": 2,
    }
    # Outputs may hold secrets: they are not logged at any level.
    assert SECRET not in caplog.text
    assert all(SECRET not in repr(f) for f in fields)


@pytest.mark.allow_error_logs
async def test_failed_runs_are_logged_at_error_with_the_stored_error(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    async def charge(ctx: StepContext[Any, Any]) -> None:
        raise ValueError("card declined")

    wf = workflow("order").step("charge", charge)
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    async with engine_on(storage, wf, plugins=[LoggingPlugin()]) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1

    failed = records(caplog)[-1]
    assert failed.levelno == logging.ERROR
    message = failed.getMessage()
    assert message.startswith(
        f"run {run.id} of workflow 'order' failed at step 'charge': [step_failed] "
        "ValueError: card declined\n"
        "Traceback (most recent call last):\n"
    )
    assert message.endswith('raise ValueError("card declined")\nValueError: card declined')
    assert failed.exc_info is None  # the exception belongs to the run, not to the logger
    info = failed.reflow  # type: ignore[attr-defined]
    assert info["event"] == "run_failed"
    assert info["step"] == "charge"
    assert info["error"]["code"] == "step_failed"
    assert info["error"]["type"] == "builtins.ValueError"
    assert info["error"]["message"] == "card declined"


async def test_logger_and_level_are_configurable(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    custom = logging.getLogger("app.workflows")
    wf = workflow("quiet").step("a", lambda ctx: 1)
    caplog.set_level(logging.DEBUG, logger="app.workflows")
    plugins = [LoggingPlugin(custom, level=logging.DEBUG), LoggingPlugin("app.other")]
    async with engine_on(storage, wf, plugins=plugins) as engine:
        await engine.enqueue(wf)
        assert await engine.tick() == 1
    mine = records(caplog, "app.workflows")
    assert len(mine) == 4
    assert {r.levelno for r in mine} == {logging.DEBUG}
    assert records(caplog, DEFAULT_LOGGER) == []
    assert repr(plugins[1]) == "LoggingPlugin(logger='app.other', level=20)"


async def test_nothing_is_built_when_the_level_is_disabled(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=DEFAULT_LOGGER)
    wf = workflow("silent").step("a", lambda ctx: 1)
    async with engine_on(storage, wf, plugins=[LoggingPlugin()]) as engine:
        await engine.enqueue(wf)
        assert await engine.tick() == 1
    assert records(caplog) == []


async def test_a_reclaimed_run_says_so(
    db: Any, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from datetime import timedelta

    wf = workflow("reclaimed").step("a", lambda ctx: 1)
    storage = db.connect(clock=clock)
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    async with engine_on(storage, wf, plugins=[LoggingPlugin()], lease="30s") as engine:
        run = await engine.enqueue(wf)
        await storage.claim_runs(["reclaimed"], 1, timedelta(seconds=30))
        clock.advance(31)
        assert await engine.tick() == 1
    reclaimed, first = records(caplog)[:2]
    assert reclaimed.levelno == logging.WARNING
    assert reclaimed.getMessage() == (
        f"run {run.id} of workflow 'reclaimed' reclaimed: its previous worker's lease lapsed "
        "(reclaim 1, attempt 2)"
    )
    assert first.getMessage() == (
        f"run {run.id} of workflow 'reclaimed' resumed after its worker was lost (attempt 2)"
    )
    assert first.reflow["reclaimed"] is True  # type: ignore[attr-defined]


async def test_a_run_waiting_for_its_children_says_so(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    child = workflow("logged-child").step("work", lambda ctx: 1)
    parent = workflow("logged-parent").child("spawn", child)
    caplog.set_level(logging.DEBUG, logger=DEFAULT_LOGGER)
    async with engine_on(storage, parent, child, plugins=[LoggingPlugin()]) as engine:
        run = await engine.enqueue(parent)
        assert await engine.tick() == 1
    waiting = [r.getMessage() for r in records(caplog) if "waiting" in r.getMessage()]
    assert waiting == [f"run {run.id} waiting at step 'spawn' for its child runs to end"]


# -- records made in a step -------------------------------------------------------------


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_records_made_in_a_step_carry_the_run_step_and_attempt(storage: Storage) -> None:
    app = logging.getLogger("reflow.tests.app")
    keep = _Keep()
    keep.addFilter(RunContextFilter())
    app.addHandler(keep)
    app.setLevel(logging.INFO)

    async def charge(ctx: StepContext[Any, Any]) -> str:
        app.info("charging")
        if ctx.attempt == 1:
            raise ConnectionError("gateway timeout")
        return "ok"

    def ship(ctx: StepContext[Any, Any]) -> str:  # a plain def step: a worker thread
        app.info("shipping")
        return "shipped"

    wf = (
        workflow("order")
        .step("charge", charge, retry=Retry(max_attempts=2, initial_delay=0))
        .step("ship", ship)
    )
    try:
        async with engine_on(storage, wf) as engine:
            run = await engine.enqueue(wf, None)
            app.info("enqueued")
            assert await engine.tick() == 1
    finally:
        app.removeHandler(keep)
    seen = [
        (r.getMessage(), r.reflow_run_id, r.reflow_workflow, r.reflow_step, r.reflow_attempt)  # type: ignore[attr-defined]
        for r in keep.records
    ]
    assert seen == [
        ("enqueued", None, None, None, None),
        ("charging", run.id, "order", "charge", 1),
        ("charging", run.id, "order", "charge", 2),
        ("shipping", run.id, "order", "ship", 1),
    ]


async def test_json_lines_carry_the_step_of_the_record(
    storage: Storage, capsys: pytest.CaptureFixture[str]
) -> None:
    def work(ctx: StepContext[Any, Any]) -> None:
        logging.getLogger("reflow.tests.app").warning("card %s declined", "ending 42")

    wf = workflow("pay").step("work", work)
    configure_logging("json", "warning")
    try:
        async with engine_on(storage, wf) as engine:
            run = await engine.enqueue(wf, None)
            assert await engine.tick() == 1
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler.get_name() == "reflow-worker":
                root.removeHandler(handler)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    (line,) = [line for line in lines if line["logger"] == "reflow.tests.app"]
    assert line["message"] == "card ending 42 declined"
    assert (line["run_id"], line["workflow"], line["step"], line["attempt"]) == (
        run.id,
        "pay",
        "work",
        1,
    )
    assert line["level"] == "warning"
