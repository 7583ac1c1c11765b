"""A step failure explains itself: the stored traceback and cause chain, the
error ``Engine.result`` raises, failed-attempt events, hooks and log lines,
and which failures are retried."""

from __future__ import annotations

import asyncio
import logging
import traceback
from datetime import timedelta
from typing import Any

import pytest

from reflow_conformance.testsupport import collect_events, engine_on
from reflow_core import (
    ConfigError,
    Event,
    NonRetryableError,
    RemoteTraceback,
    Retry,
    RunCancelled,
    RunFailed,
    RunFailedError,
    RunReclaimed,
    RunSleeping,
    RunStarted,
    RunWaiting,
    StepAttemptFailed,
    StepContext,
    workflow,
)
from reflow_core.errors import (
    MAX_CAUSES,
    MAX_TRACEBACK_CHARS,
    MAX_TRACEBACK_FRAMES,
    cause_chain,
    format_traceback,
)
from reflow_core.hookspecs import hookimpl
from reflow_core.plugins.logging import DEFAULT_LOGGER, LoggingPlugin
from reflow_core.storage import Storage

NOW = Retry(max_attempts=3, backoff="fixed", initial_delay=0)
"""Three attempts, no delay in between."""


class Recorder:
    """A plugin keeping every event its hooks receive."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    @hookimpl
    def reflow_step_attempt_failed(self, event: StepAttemptFailed) -> None:
        self.events.append(event)

    @hookimpl
    async def reflow_run_failed(self, event: RunFailed) -> None:
        self.events.append(event)

    @hookimpl
    def reflow_run_reclaimed(self, event: RunReclaimed) -> None:
        self.events.append(event)

    @hookimpl
    def reflow_run_sleeping(self, event: RunSleeping) -> None:
        self.events.append(event)

    @hookimpl
    def reflow_run_waiting(self, event: RunWaiting) -> None:
        self.events.append(event)

    @hookimpl
    def reflow_run_cancelled(self, event: RunCancelled) -> None:
        self.events.append(event)


# The user's code: a KeyError two calls deep inside the step.


def lookup(record: dict[str, str]) -> str:
    return record["missing_key"]


def parse_record(record: dict[str, str]) -> str:
    return lookup(record)


async def parse(ctx: StepContext[Any, Any]) -> str:
    return parse_record(ctx.input)


def parse_in_a_thread(ctx: StepContext[Any, Any]) -> str:
    return parse_record(ctx.input)


def assert_user_frames_only(text: str) -> None:
    assert text.startswith("Traceback (most recent call last):\n")
    assert f'File "{__file__}"' in text
    for name in ("in lookup", "in parse_record", 'return record["missing_key"]'):
        assert name in text
    assert text.rstrip().endswith("KeyError: 'missing_key'")
    # The engine's frames that call a step, and the event loop's, are left out.
    for engine_frame in ("reflow_core/engine", "units.py", "asyncio", "concurrent"):
        assert engine_frame not in text


@pytest.mark.parametrize("handler", [parse, parse_in_a_thread], ids=["async", "thread"])
async def test_a_failure_two_calls_deep_explains_itself(
    storage: Storage, caplog: pytest.LogCaptureFixture, handler: Any
) -> None:
    flow = workflow("import-file").step("parse", handler, retry=NOW)
    recorder = Recorder()
    events: list[Event] = []
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    async with engine_on(storage, flow, plugins=[recorder, LoggingPlugin()]) as engine:
        consumer = asyncio.create_task(collect_events(engine.stream(), events))
        run = await engine.enqueue(flow, {"name": "x"})
        assert await engine.tick() == 1
        with pytest.raises(RunFailedError) as raised:
            await engine.result(run.id, timeout=5)
        done = await engine.get_run_status(run.id)
        await engine.stop()
        await asyncio.wait_for(consumer, 5)

    # Stored, for the run and for its step.
    info = done.error
    assert info is not None
    assert info["code"] == "step_failed"
    assert info["type"] == "builtins.KeyError"
    assert info["message"] == "'missing_key'"
    assert info["attempts"] == 3
    assert "causes" not in info
    assert_user_frames_only(info["traceback"])
    assert done.steps["parse"].error == info
    assert done.steps["parse"].attempts == 3

    # Raised, with a stand-in for the original exception as its cause.
    error = raised.value
    assert error.info == info
    assert error.error_type == "builtins.KeyError"
    assert error.traceback == info["traceback"]
    assert error.causes == []
    assert "failed at step 'parse': KeyError: 'missing_key'" in str(error)
    stand_in = error.__cause__
    assert isinstance(stand_in, RemoteTraceback)
    assert stand_in.traceback == info["traceback"]
    assert info["traceback"].rstrip() in str(stand_in)
    printed = "".join(traceback.format_exception(error))
    assert "in parse_record" in printed
    assert "in lookup" in printed

    # Every failed attempt is an event, on the stream and through the hook.
    failed = [e for e in events if isinstance(e, StepAttemptFailed)]
    assert [(e.step, e.attempt, e.retry_in) for e in failed] == [
        ("parse", 1, 0.0),
        ("parse", 2, 0.0),
        ("parse", 3, None),
    ]
    assert all(e.error["type"] == "builtins.KeyError" for e in failed)
    assert_user_frames_only(failed[0].error["traceback"])
    assert isinstance(events[-1], RunFailed)
    assert recorder.events == [*failed, events[-1]]

    # Logged: a WARNING per failed attempt with its delay, an ERROR for the run.
    logged = [r for r in caplog.records if r.name == DEFAULT_LOGGER and r.levelno > logging.INFO]
    assert [r.levelno for r in logged] == [logging.WARNING] * 3 + [logging.ERROR]
    messages = [r.getMessage() for r in logged]
    for attempt, then in ((1, "retrying in 0s"), (2, "retrying in 0s"), (3, "giving up")):
        head, _, tb = messages[attempt - 1].partition("\n")
        assert head == (
            f"run {run.id} step 'parse' attempt {attempt} failed with "
            f"KeyError: 'missing_key'; {then}"
        )
        assert_user_frames_only(tb)
    head, _, tb = messages[3].partition("\n")
    assert head == (
        f"run {run.id} of workflow 'import-file' failed at step 'parse': "
        "[step_failed] KeyError: 'missing_key'"
    )
    assert_user_frames_only(tb)


async def test_the_delay_until_the_next_attempt_is_reported(storage: Storage) -> None:
    calls = 0

    async def flaky(ctx: StepContext[Any, Any]) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("reset")
        return "ok"

    flow = workflow("flaky").step(
        "call", flaky, retry=Retry(max_attempts=2, backoff="fixed", initial_delay="20ms")
    )
    recorder = Recorder()
    async with engine_on(storage, flow, plugins=[recorder]) as engine:
        run = await engine.enqueue(flow)
        assert await engine.tick() == 1
        assert await engine.result(run.id, timeout=5) == "ok"
    [failed] = recorder.events
    assert isinstance(failed, StepAttemptFailed)
    assert failed.retry_in == pytest.approx(0.02)
    assert failed.error["type"] == "builtins.ConnectionError"


# -- which failures are retried ---------------------------------------------------


async def attempts_of(storage: Storage, handler: Any, retry: Retry) -> tuple[int, dict[str, Any]]:
    """Run a one-step workflow to its failure: how many attempts, and the stored error."""
    calls = 0

    async def step(ctx: StepContext[Any, Any]) -> None:
        nonlocal calls
        calls += 1
        handler(calls)

    flow = workflow("retried").step("s", step, retry=retry)
    async with engine_on(storage, flow) as engine:
        run = await engine.enqueue(flow)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["attempts"] == calls
    return calls, dict(done.error)


async def test_retry_on_retries_only_the_named_types(storage: Storage) -> None:
    def fails(call: int) -> None:
        if call < 3:
            raise ConnectionError("reset")
        raise ValueError("bad row")

    retry = Retry(max_attempts=5, initial_delay=0, retry_on=(ConnectionError, TimeoutError))
    calls, error = await attempts_of(storage, fails, retry)
    assert calls == 3  # two retried connection errors, then a ValueError ends it
    assert error["type"] == "builtins.ValueError"


async def test_give_up_on_wins_over_retry_on(storage: Storage) -> None:
    def fails(call: int) -> None:
        raise PermissionError("denied")

    retry = Retry(max_attempts=5, initial_delay=0, retry_on=(OSError,), give_up_on=PermissionError)
    calls, error = await attempts_of(storage, fails, retry)
    assert calls == 1
    assert error["type"] == "builtins.PermissionError"


async def test_non_retryable_error_fails_at_once_keeping_its_cause(storage: Storage) -> None:
    def fails(call: int) -> None:
        try:
            {}["card"]
        except KeyError as exc:
            raise NonRetryableError("no card on file") from exc

    calls, error = await attempts_of(storage, fails, Retry(max_attempts=5, initial_delay=0))
    assert calls == 1
    assert error["type"] == "reflow_core.errors.NonRetryableError"
    assert error["message"] == "no card on file"
    assert error["causes"] == [{"type": "builtins.KeyError", "message": "'card'"}]
    text = error["traceback"]
    assert "The above exception was the direct cause of the following exception" in text
    assert text.index("KeyError: 'card'") < text.index("NonRetryableError: no card on file")


async def test_by_default_every_exception_is_retried(storage: Storage) -> None:
    def fails(call: int) -> None:
        raise LookupError("gone")

    calls, _ = await attempts_of(storage, fails, NOW)
    assert calls == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_on": "ConnectionError"}, "Retry.retry_on must be a tuple of exception classes"),
        ({"retry_on": 3}, "Retry.retry_on must be a tuple of exception classes"),
        ({"retry_on": (ValueError, int)}, "Retry.retry_on must hold exception classes"),
        ({"give_up_on": (KeyboardInterrupt,)}, "Retry.give_up_on must hold exception classes"),
        ({"give_up_on": (ValueError("x"),)}, "Retry.give_up_on must hold exception classes"),
    ],
)
def test_retry_types_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        Retry(**options)
    assert raised.value.option == next(iter(options))


def test_retry_types_accept_one_class_or_a_list() -> None:
    retry = Retry(retry_on=ConnectionError, give_up_on=[ConnectionRefusedError])  # type: ignore[arg-type]
    assert retry.retry_on == (ConnectionError,)
    assert retry.give_up_on == (ConnectionRefusedError,)
    assert retry.retries(ConnectionResetError())
    assert not retry.retries(ConnectionRefusedError())
    assert not retry.retries(ValueError())
    assert not Retry().retries(NonRetryableError("no"))
    assert Retry() == Retry(retry_on=(Exception,), give_up_on=())


# -- bounds ------------------------------------------------------------------------


async def test_a_deep_recursion_is_stored_bounded(storage: Storage) -> None:
    def recurse(depth: int) -> int:
        return recurse(depth + 1) + 1

    async def step(ctx: StepContext[Any, Any]) -> int:
        return recurse(0)

    flow = workflow("deep").step("dive", step)
    async with engine_on(storage, flow) as engine:
        run = await engine.enqueue(flow)
        assert await engine.tick() == 1
        with pytest.raises(RunFailedError) as raised:
            await engine.result(run.id, timeout=5)
    text = raised.value.traceback
    assert text is not None
    assert len(text) <= MAX_TRACEBACK_CHARS
    assert raised.value.error_type == "builtins.RecursionError"
    assert text.splitlines()[1].startswith("  [... ")  # the outer frames were left out
    assert "earlier frame(s) left out" in text
    assert text.count("in recurse") <= MAX_TRACEBACK_FRAMES
    assert text.rstrip().endswith("RecursionError: maximum recursion depth exceeded")


def test_a_long_traceback_keeps_its_end() -> None:
    try:
        raise ValueError("x" * (3 * MAX_TRACEBACK_CHARS))
    except ValueError as exc:
        text = format_traceback(exc)
    assert len(text) <= MAX_TRACEBACK_CHARS
    assert text.startswith("[... ")
    assert "characters left out ...]\n" in text
    assert text.endswith("xxx\n")


def test_a_long_cause_chain_is_cut() -> None:
    def chain(depth: int) -> None:
        if depth == 0:
            raise OSError("root cause")
        try:
            chain(depth - 1)
        except Exception as exc:
            raise RuntimeError(f"level {depth}") from exc

    with pytest.raises(RuntimeError) as raised:
        chain(10)
    causes = cause_chain(raised.value)
    assert len(causes) == MAX_CAUSES
    assert causes[0] == {"type": "builtins.RuntimeError", "message": "level 9"}
    text = format_traceback(raised.value)
    assert text.startswith("[... earlier exceptions of the chain left out ...]\n")
    assert "root cause" not in text
    # The top exception and MAX_CAUSES of its causes, each led to by its link.
    assert text.count("The above exception was the direct cause") == MAX_CAUSES + 1
    assert "RuntimeError: level 5\n" in text
    assert "RuntimeError: level 4\n" not in text
    assert text.rstrip().endswith("RuntimeError: level 10")


def test_an_exception_raised_while_handling_another_keeps_it_as_a_cause() -> None:
    try:
        try:
            raise KeyError("sku")
        except KeyError:
            raise ValueError("bad order")  # noqa: B904 - raised while handling, on purpose
    except ValueError as exc:
        causes = cause_chain(exc)
        text = format_traceback(exc)
    assert causes == [{"type": "builtins.KeyError", "message": "'sku'"}]
    assert "During handling of the above exception, another exception occurred" in text


def test_a_run_failed_error_from_an_older_record_has_no_traceback() -> None:
    error = RunFailedError("run-1", {"code": "step_failed", "message": "boom", "step": "a"})
    assert error.traceback is None
    assert error.error_type is None
    assert error.causes == []
    assert error.__cause__ is None
    assert str(error) == "run run-1 failed at step 'a': boom"


# -- lifecycle events that were invisible ---------------------------------------------


async def test_sleeping_waiting_and_cancelled_runs_are_events(storage: Storage) -> None:
    napping = workflow("napping").step("a", lambda ctx: 1).sleep("nap", "1h")
    waiting = workflow("waiting").wait_for_event("approval", timeout="2h")
    forever = workflow("forever").wait_for_event("never")
    recorder = Recorder()
    events: list[Event] = []
    async with engine_on(storage, napping, waiting, forever, plugins=[recorder]) as engine:
        consumer = asyncio.create_task(collect_events(engine.stream(), events))
        slept = await engine.enqueue(napping)
        assert await engine.tick() == 1
        waited = await engine.enqueue(waiting)
        assert await engine.tick() == 1
        idle = await engine.enqueue(forever)
        assert await engine.tick() == 1
        assert await engine.cancel(waited.id)
        assert not await engine.cancel(waited.id)  # already finished: no event
        await engine.stop()
        await asyncio.wait_for(consumer, 5)
    ours = [e for e in events if isinstance(e, RunSleeping | RunWaiting | RunCancelled)]
    assert ours == recorder.events
    sleeping, waiting_event, idle_event, cancelled = ours
    assert isinstance(sleeping, RunSleeping)
    assert (sleeping.run_id, sleeping.workflow, sleeping.step) == (slept.id, "napping", "nap")
    stored = await storage.get_run(slept.id)
    assert stored is not None
    assert stored.wake_at == sleeping.wake_at
    assert isinstance(waiting_event, RunWaiting)
    assert (waiting_event.run_id, waiting_event.step, waiting_event.event) == (
        waited.id,
        "approval",
        "approval",
    )
    assert waiting_event.deadline is not None
    assert waiting_event.deadline - sleeping.wake_at < timedelta(hours=1, minutes=1)
    assert isinstance(idle_event, RunWaiting)
    assert (idle_event.run_id, idle_event.deadline) == (idle.id, None)
    assert cancelled == RunCancelled(waited.id, "waiting")


async def test_a_reclaimed_run_is_an_event(db: Any, clock: Any) -> None:
    flow = workflow("reclaimed").step("a", lambda ctx: 1)
    storage = db.connect(clock=clock)
    recorder = Recorder()
    events: list[Event] = []
    async with engine_on(storage, flow, plugins=[recorder], lease="30s") as engine:
        consumer = asyncio.create_task(collect_events(engine.stream(), events))
        run = await engine.enqueue(flow)
        await storage.claim_runs(["reclaimed"], 1, timedelta(seconds=30))  # a worker that dies
        clock.advance(31)
        assert await engine.tick() == 1
        await engine.stop()
        await asyncio.wait_for(consumer, 5)
    assert recorder.events == [RunReclaimed(run.id, "reclaimed", 2, 1)]
    assert events[0] == RunReclaimed(run.id, "reclaimed", 2, 1)
    assert isinstance(events[1], RunStarted)
    assert events[1].reclaimed
