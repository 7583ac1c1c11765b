"""``Engine.stream`` and lifecycle hook plugins, on every backend."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from reflow_conformance.testsupport import collect_events, engine_on
from reflow_core import (
    ConfigError,
    Engine,
    Event,
    Retry,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunReclaimed,
    RunSleeping,
    RunStarted,
    RunWaiting,
    StepAttemptFailed,
    StepCompleted,
    StepContext,
    StepSkipped,
    StepStarted,
    registry,
    workflow,
)
from reflow_core.hookspecs import hookimpl
from reflow_core.storage import Storage


def shape(events: list[Any]) -> list[tuple[Any, ...]]:
    """Events as comparable tuples, without run ids."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        match e:
            case RunStarted(attempt=attempt, reclaimed=reclaimed):
                out.append(("RunStarted", attempt, reclaimed))
            case StepStarted(step=step, attempt=attempt):
                out.append(("StepStarted", step, attempt))
            case StepCompleted(step=step, output=output, attempts=attempts):
                out.append(("StepCompleted", step, output, attempts))
            case StepSkipped(step=step):
                out.append(("StepSkipped", step))
            case RunCompleted(output=output):
                out.append(("RunCompleted", output))
            case RunFailed(step=step, error=error):
                out.append(("RunFailed", step, error["code"]))
            case StepAttemptFailed(step=step, attempt=attempt, error=error, retry_in=retry_in):
                out.append(("StepAttemptFailed", step, attempt, error["type"], retry_in))
            case RunReclaimed(attempt=attempt, reclaims=reclaims):
                out.append(("RunReclaimed", attempt, reclaims))
            case RunSleeping(step=step):
                out.append(("RunSleeping", step))
            case RunWaiting(step=step, event=event):
                out.append(("RunWaiting", step, event))
            case RunCancelled():
                out.append(("RunCancelled",))
            case _:
                raise AssertionError(f"unexpected event {e!r}")
    return out


FAST = Retry(max_attempts=2, backoff="fixed", initial_delay=0)


# -- the stream -----------------------------------------------------------------


async def test_stream_yields_typed_events_in_order(storage: Storage) -> None:
    async def flaky(ctx: StepContext[Any, Any]) -> str:
        if ctx.attempt == 1:
            raise ConnectionError("blip")
        return "charged"

    ok = (
        workflow("streamed")
        .step("charge", flaky, retry=FAST)
        .step("review", lambda ctx: "reviewed", when=lambda ctx: False)
        .step("ship", lambda ctx: {"shipped": ctx.prev})
    )
    bad = workflow("streamed-bad").step("boom", lambda ctx: 1 / 0, retry=FAST)
    events: list[Event] = []
    async with engine_on(storage, ok, bad, concurrency=1) as engine:
        consumer = asyncio.create_task(collect_events(engine.stream(), events))
        good = await engine.enqueue(ok)
        assert await engine.tick() == 1
        failing = await engine.enqueue(bad)
        assert await engine.tick() == 1
        await engine.stop()
        await asyncio.wait_for(consumer, 5)  # the stream ended with stop()

    assert all(isinstance(e, Event.__args__) for e in events)  # type: ignore[attr-defined]
    assert [e.run_id for e in events] == [good.id] * 9 + [failing.id] * 6
    assert {e.workflow for e in events[:9]} == {"streamed"}
    assert shape(events) == [
        ("RunStarted", 1, False),
        ("StepStarted", "charge", 1),
        ("StepAttemptFailed", "charge", 1, "builtins.ConnectionError", 0.0),
        ("StepStarted", "charge", 2),
        ("StepCompleted", "charge", "charged", 2),
        ("StepSkipped", "review"),
        ("StepStarted", "ship", 1),
        ("StepCompleted", "ship", {"shipped": "charged"}, 1),
        ("RunCompleted", {"shipped": "charged"}),
        ("RunStarted", 1, False),
        ("StepStarted", "boom", 1),
        ("StepAttemptFailed", "boom", 1, "builtins.ZeroDivisionError", 0.0),
        ("StepStarted", "boom", 2),
        ("StepAttemptFailed", "boom", 2, "builtins.ZeroDivisionError", None),
        ("RunFailed", "boom", "step_failed"),
    ]


async def test_a_finished_sleep_is_reported_as_a_completed_step(storage: Storage) -> None:
    napping = workflow("napping").step("a", lambda ctx: 1).sleep("nap", 0).step("b", lambda ctx: 2)
    events: list[Event] = []
    async with engine_on(storage, napping) as engine:
        consumer = asyncio.create_task(collect_events(engine.stream(), events))
        await engine.enqueue(napping)
        assert await engine.tick() == 1  # runs "a", then goes to sleep
        assert await engine.tick() == 1  # due at once: wakes and finishes
        await engine.stop()
        await asyncio.wait_for(consumer, 5)
    assert ("StepCompleted", "nap", None, 1) in shape(events)
    assert shape(events)[-1] == ("RunCompleted", 2)


async def test_a_stream_sees_events_from_the_moment_it_is_created(storage: Storage) -> None:
    wf = workflow("early-subscriber").step("a", lambda ctx: 1)
    async with engine_on(storage, wf) as engine:
        stream = engine.stream()  # subscribed now, though not read yet
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        first = await asyncio.wait_for(anext(stream), 1)
        assert isinstance(first, RunStarted)
        assert first.run_id == run.id
        await stream.aclose()  # type: ignore[attr-defined]


async def test_stream_rejects_a_bad_buffer_size_at_once(storage: Storage) -> None:
    async with engine_on(storage) as engine:
        with pytest.raises(ConfigError):
            engine.stream(buffer_size=0)


async def test_a_full_bounded_stream_holds_the_engine_back(storage: Storage) -> None:
    steps_run: list[str] = []

    def step(name: str) -> Any:
        def handler(ctx: StepContext[Any, Any]) -> str:
            steps_run.append(name)
            return name

        return handler

    wf = workflow("backpressure")
    for name in ("s1", "s2", "s3", "s4", "s5"):
        wf = wf.step(name, step(name))
    async with engine_on(storage, wf) as engine:
        stream = engine.stream(buffer_size=2)
        run = await engine.enqueue(wf)
        tick = asyncio.create_task(engine.tick())
        await asyncio.sleep(0.3)
        # Two events fit (RunStarted, StepStarted s1); publishing the third blocks.
        assert not tick.done()
        assert steps_run == ["s1"]
        assert (await engine.get_run(run.id)).status == "running"  # type: ignore[union-attr]

        received: list[Event] = []
        while not isinstance(received[-1:] and received[-1], RunCompleted):
            received.append(await asyncio.wait_for(anext(stream), 2))
        assert await asyncio.wait_for(tick, 2) == 1
        await stream.aclose()  # type: ignore[attr-defined]
    assert steps_run == ["s1", "s2", "s3", "s4", "s5"]
    assert len(received) == 1 + 2 * 5 + 1  # nothing was dropped


async def test_a_stream_left_with_break_unsubscribes(storage: Storage) -> None:
    wf = workflow("leaver").step("a", lambda ctx: 1).step("b", lambda ctx: 2)
    async with engine_on(storage, wf) as engine:
        first = await engine.enqueue(wf)

        async def read_one() -> Event:
            async for event in engine.stream(buffer_size=1):
                return event
            raise AssertionError("the stream ended")

        reader = asyncio.create_task(read_one())
        await asyncio.sleep(0)
        assert await engine.tick() == 1
        event = await asyncio.wait_for(reader, 2)
        assert event.run_id == first.id
        await asyncio.sleep(0)  # let the abandoned iterator be finalized
        # With the stream still subscribed, its one-slot buffer would block
        # the engine on the next event: these runs must go through.
        runs = [await engine.enqueue(wf) for _ in range(3)]
        assert await asyncio.wait_for(engine.tick(), 2) == 3
        for run in runs:
            assert (await engine.get_run(run.id)).status == "completed"  # type: ignore[union-attr]
        assert engine._observers._streams == []


async def test_stop_ends_every_stream_after_what_was_buffered(storage: Storage) -> None:
    wf = workflow("stopped-stream").step("a", lambda ctx: "A")
    engine = Engine(storage=storage, workflows=[wf], close_storage=False, poll_interval="20ms")
    events: list[Event] = []
    async with engine:
        consumer = asyncio.create_task(collect_events(engine.stream(buffer_size=None), events))
        other: list[Event] = []
        second = asyncio.create_task(collect_events(engine.stream(), other))
        run = await engine.enqueue(wf)
        assert await engine.result(run.id, timeout=5) == "A"
    # Leaving the engine stopped it: both iterators end on their own.
    await asyncio.wait_for(asyncio.gather(consumer, second), 5)
    assert isinstance(events[-1], RunCompleted)
    assert shape(events) == shape(other)


async def test_stop_releases_an_engine_blocked_on_an_unread_stream(storage: Storage) -> None:
    wf = workflow("unread").step("a", lambda ctx: 1).step("b", lambda ctx: 2)
    engine = Engine(storage=storage, workflows=[wf], close_storage=False, poll_interval="20ms")
    await engine.start()
    stream = engine.stream(buffer_size=1)
    run = await engine.enqueue(wf)
    await asyncio.sleep(0.2)  # the engine is stuck publishing to the full buffer
    began = time.monotonic()
    await engine.stop(timeout=0.1)
    assert time.monotonic() - began < 2
    handed_back = await engine.get_run(run.id)
    assert handed_back is not None
    assert handed_back.status == "pending"  # handed back, not lost
    leftover = [event async for event in stream]
    assert len(leftover) == 1


# -- lifecycle hooks ------------------------------------------------------------


class Recording:
    """A plugin with a sync hook and an async one, writing to a shared log."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    @hookimpl
    def reflow_run_started(self, event: RunStarted) -> None:
        self.log.append(f"{self.name}: run started")

    @hookimpl
    async def reflow_step_completed(self, event: StepCompleted) -> None:
        self.log.append(f"{self.name}: {event.step} begin")
        await asyncio.sleep(0.01)  # the next implementation must wait for this one
        self.log.append(f"{self.name}: {event.step} end")

    @hookimpl
    def reflow_run_completed(self, event: RunCompleted) -> None:
        self.log.append(f"{self.name}: run completed {event.output}")


class Failing:
    def __init__(self, where: str) -> None:
        self.where = where

    @hookimpl
    async def reflow_step_completed(self, event: StepCompleted) -> None:
        raise RuntimeError(f"{self.where} hook broke on {event.step}")

    @hookimpl
    def reflow_run_completed(self, event: RunCompleted) -> None:
        raise KeyError("metrics backend gone")


class Errors:
    def __init__(self) -> None:
        self.seen: list[tuple[BaseException, str]] = []

    @hookimpl
    def reflow_error(self, error: BaseException, where: str) -> None:
        self.seen.append((error, where))


async def test_sync_and_async_hooks_are_awaited_one_after_the_other(storage: Storage) -> None:
    log: list[str] = []
    first, second = Recording("first", log), Recording("second", log)
    wf = workflow("hooked").step("a", lambda ctx: "A")
    async with engine_on(storage, wf, plugins=[first]) as engine:
        engine.register_plugin(second)
        engine.register_plugin(second)  # registering twice is harmless
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        assert await engine.result(run.id) == "A"
    # pluggy's call order: the plugin registered last is called first.
    assert log == [
        "second: run started",
        "first: run started",
        "second: a begin",
        "second: a end",
        "first: a begin",
        "first: a end",
        "second: run completed A",
        "first: run completed A",
    ]


class Early:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    @hookimpl(tryfirst=True)
    def reflow_run_started(self, event: RunStarted) -> None:
        self.log.append("early")


async def test_tryfirst_is_honoured(storage: Storage) -> None:
    log: list[str] = []
    wf = workflow("ordered").step("a", lambda ctx: "A")
    async with engine_on(storage, wf, plugins=[Early(log), Recording("plain", log)]) as engine:
        await engine.enqueue(wf)
        assert await engine.tick() == 1
    assert log[:2] == ["early", "plain: run started"]


@pytest.mark.allow_error_logs
async def test_failing_hooks_never_affect_a_run_and_reach_reflow_error(
    storage: Storage,
) -> None:
    log: list[str] = []
    errors = Errors()
    wf = workflow("fragile").step("a", lambda ctx: "A").step("b", lambda ctx: "B")
    plugins = [Recording("healthy", log), Failing("flaky"), errors]
    async with engine_on(storage, wf, plugins=plugins) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        done = await engine.get_run_status(run.id)
    assert done.status == "completed"
    assert done.output == "B"
    assert done.attempts == 1
    # The healthy plugin saw everything despite its failing neighbour.
    assert "healthy: run completed B" in log
    assert "healthy: b end" in log
    assert [where for _, where in errors.seen] == [
        "reflow_step_completed hook",
        "reflow_step_completed hook",
        "reflow_run_completed hook",
    ]
    error, _ = errors.seen[0]
    assert isinstance(error, RuntimeError)
    assert str(error) == "flaky hook broke on a"
    assert any("reflow_step_completed" in note for note in error.__notes__)
    assert any("Failing" in note for note in error.__notes__)  # names the plugin
    assert isinstance(errors.seen[2][0], KeyError)


@pytest.mark.allow_error_logs
async def test_a_failing_reflow_error_hook_is_only_logged(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    class BadSink:
        @hookimpl
        def reflow_error(self, error: BaseException, where: str) -> None:
            raise RuntimeError("the error sink is broken too")

    wf = workflow("double-trouble").step("a", lambda ctx: "A")
    async with engine_on(storage, wf, plugins=[Failing("x"), BadSink()]) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
        assert await engine.result(run.id) == "A"
    messages = [r.getMessage() for r in caplog.records if r.name == "reflow.engine"]
    assert any("the error sink is broken too" in m for m in messages)


class Typo:
    @hookimpl
    def reflow_step_complete(self, event: Any) -> None:  # no such hook
        pass


class WrongArgument:
    @hookimpl
    def reflow_run_started(self, evt: Any) -> None:  # the spec's argument is "event"
        pass


@pytest.mark.parametrize("plugin", [Typo(), WrongArgument()], ids=["typo", "wrong-argument"])
async def test_an_invalid_plugin_is_refused_with_config_error(
    storage: Storage, plugin: object
) -> None:
    with pytest.raises(ConfigError):
        Engine(storage=storage, plugins=[plugin], close_storage=False)
    log: list[str] = []
    wf = workflow("still-works").step("a", lambda ctx: "A")
    async with engine_on(storage, wf, plugins=[Recording("ok", log)]) as engine:
        with pytest.raises(ConfigError):
            engine.register_plugin(plugin)
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1  # the refused plugin left nothing behind
        assert await engine.result(run.id) == "A"
    assert "ok: run completed A" in log


async def test_module_plugins_are_accepted(storage: Storage, tmp_path: Path) -> None:
    (tmp_path / "reflow_test_module_plugin.py").write_text(
        textwrap.dedent(
            """
            from reflow_core.hookspecs import hookimpl

            SEEN = []

            @hookimpl
            def reflow_run_completed(event):
                SEEN.append(event.output)
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import reflow_test_module_plugin as module  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    wf = workflow("module-plugin").step("a", lambda ctx: "A")
    async with engine_on(storage, wf, plugins=[module]) as engine:
        await engine.enqueue(wf)
        assert await engine.tick() == 1
    assert module.SEEN == ["A"]
    del sys.modules["reflow_test_module_plugin"]


# -- observer entry points ------------------------------------------------------


@pytest.fixture
def fake_observer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An importable observer module announced under the ``reflow`` group as
    ``observer-fake``, next to a backend entry point and a broken observer."""
    module_name = "reflow_fake_observer_pkg"
    (tmp_path / f"{module_name}.py").write_text(
        textwrap.dedent(
            """
            from reflow_core.hookspecs import hookimpl

            class Observer:
                def __init__(self):
                    self.started = []

                @hookimpl
                def reflow_run_started(self, event):
                    self.started.append(event.run_id)

            observer = Observer()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD_ENV, raising=False)
    announced = [
        EntryPoint("observer-fake", f"{module_name}:observer", registry.ENTRY_POINT_GROUP),
        EntryPoint("sqlite", "reflow_sqlite.plugin", registry.ENTRY_POINT_GROUP),
    ]

    def entry_points(*, group: str) -> list[EntryPoint]:
        return announced if group == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(registry, "entry_points", entry_points)
    yield announced
    sys.modules.pop(module_name, None)


def test_load_observer_entry_points_loads_only_observers(fake_observer: Any) -> None:
    loaded = registry.load_observer_entry_points()
    assert [name for name, _ in loaded] == ["unknown distribution:observer-fake"]
    (_, plugin) = loaded[0]
    assert type(plugin).__name__ == "Observer"


def test_a_broken_observer_entry_point_is_skipped_with_a_warning(fake_observer: Any) -> None:
    fake_observer.append(
        EntryPoint("observer-broken", "no_such_module_anywhere:x", registry.ENTRY_POINT_GROUP)
    )
    with pytest.warns(RuntimeWarning, match="observer|no_such_module"):
        loaded = registry.load_observer_entry_points()
    assert [name for name, _ in loaded] == ["unknown distribution:observer-fake"]


def test_load_observer_entry_points_honours_the_disable_variable(
    fake_observer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(registry.DISABLE_AUTOLOAD_ENV, "1")
    assert registry.load_observer_entry_points() == []


async def test_engines_load_observer_entry_points_unless_told_not_to(
    fake_observer: Any, monkeypatch: pytest.MonkeyPatch, storage: Storage
) -> None:
    wf = workflow("observed").step("a", lambda ctx: "A")
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf)
        assert await engine.tick() == 1
    import reflow_fake_observer_pkg as module  # type: ignore[import-not-found]

    assert module.observer.started == [run.id]
    async with engine_on(storage, wf, load_entry_points=False) as engine:
        await engine.enqueue(wf)
        assert await engine.tick() == 1
    monkeypatch.setenv(registry.DISABLE_AUTOLOAD_ENV, "1")
    async with engine_on(storage, wf) as engine:
        await engine.enqueue(wf)
        assert await engine.tick() == 1
    assert module.observer.started == [run.id]  # neither of the later engines loaded it
