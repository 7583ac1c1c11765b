"""The blocking client, :class:`SyncClient`, on the real backends: the same
calls as the engine's client API, from 20 threads at once on one storage,
from forked children that never touch their parent's connections, and
closed cleanly at interpreter exit.

A real ``reflow worker`` process runs the runs; the client only enqueues,
reads and waits, as a web application's would.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pluggy
import pytest

from reflow_conformance.testsupport import AppFleet, now_and_then, with_storage
from reflow_core import (
    ConfigError,
    Engine,
    EngineClosedError,
    MemoryStorage,
    RunFailedError,
    StepContext,
    SyncClient,
    ValidationError,
    open_storage,
    workflow,
)
from reflow_core.hookspecs import PROJECT_NAME
from reflow_core.storage import Storage

_APP = """
import os

from reflow_core import Engine, workflow


async def double(ctx):
    if ctx.input["n"] < 0:
        raise ValueError("n must not be negative")
    return {"double": ctx.input["n"] * 2, "pid": os.getpid()}


def make():
    return Engine(
        storage=os.environ["APP_STORE"],
        workflows=[workflow("double", input=dict).step("double", double)],
        concurrency=32,
        poll_interval="50ms",
        load_entry_points=False,
    )
"""


def _unreachable(ctx: StepContext[Any, Any]) -> None:
    raise AssertionError("the test process runs no step")


def _check_input(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not isinstance(value.get("n"), int):
        raise TypeError("the input must be {'n': int}")
    return value


# What the test process knows of the worker's workflow: enough to enqueue it.
DOUBLE = workflow("double", input=_check_input).step("double", _unreachable)


@pytest.fixture
def worker(store_url: str, tmp_path: Path) -> Iterator[AppFleet]:
    """A ``reflow worker`` process serving ``double`` on the test's store."""
    (tmp_path / "app").mkdir()
    fleet = AppFleet(tmp_path / "app", store_url, module="sync_app", source=_APP)
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.cleanup()


def _client(url: str, **options: Any) -> SyncClient:
    return SyncClient(url, workflows=[DOUBLE], poll_interval="100ms", **options)


def test_every_call_of_the_engine_client_api_is_there_with_its_signature() -> None:
    for name in (
        "enqueue",
        "enqueue_many",
        "get_run",
        "get_run_status",
        "list_runs",
        "cancel",
        "resume",
        "release",
        "send_event",
        "result",
        "wait",
        "schedule",
        "unschedule",
        "list_schedules",
        "pause_schedule",
        "resume_schedule",
        "list_workers",
        "queue_stats",
    ):
        ours = inspect.signature(getattr(SyncClient, name))
        theirs = inspect.signature(getattr(Engine, name))
        assert ours == theirs, name
        assert not inspect.iscoroutinefunction(getattr(SyncClient, name)), name


def test_the_api_end_to_end(worker: AppFleet) -> None:
    with _client(worker.store) as client:
        run = client.enqueue("double", {"n": 21}, idempotency_key="answer")
        assert run.created
        assert client.enqueue(DOUBLE, {"n": 21}, idempotency_key="answer").id == run.id
        output = client.result(run.id, timeout="20s")
        assert output["double"] == 42
        assert output["pid"] == worker.workers.procs[0].pid
        assert client.get_run_status(run.id).status == "completed"

        many = client.enqueue_many(DOUBLE, [{"n": i} for i in range(5)])
        done, pending = client.wait([r.id for r in many], timeout="20s")
        assert pending == []
        assert [r.output["double"] for r in done] == [0, 2, 4, 6, 8]

        bad = client.enqueue(DOUBLE, {"n": -1})
        with pytest.raises(RunFailedError, match="must not be negative"):
            client.result(bad.id, timeout="20s")
        assert {r.id for r in client.list_runs(status="failed").runs} == {bad.id}

        schedule = client.schedule(DOUBLE, {"n": 1}, every="1h", key="hourly")
        assert [s.key for s in client.list_schedules()] == [schedule.key]
        assert client.pause_schedule("hourly")
        assert client.unschedule("hourly")
        assert [w.pid for w in client.list_workers()] == [worker.workers.procs[0].pid]


def test_a_rejected_call_raises_the_engines_error_and_writes_nothing(tmp_path: Path) -> None:
    with _client(f"sqlite:///{tmp_path}/s.db") as client:
        with pytest.raises(ValidationError):
            client.enqueue(DOUBLE, {"n": "seven"})
        assert client.list_runs().runs == []


def test_twenty_threads_share_one_storage(worker: AppFleet) -> None:
    built: list[Storage] = []

    def build() -> Storage:
        storage = open_storage(worker.store)
        built.append(storage)
        return storage

    client = SyncClient(build, workflows=[DOUBLE], poll_interval="100ms")
    barrier = threading.Barrier(20)
    outputs: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            barrier.wait(10)
            mine = []
            for n in range(5):
                run = client.enqueue(DOUBLE, {"n": index * 100 + n})
                mine.append(client.result(run.id, timeout="30s")["double"])
                assert client.get_run(run.id) is not None
            outputs[index] = mine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert outputs == {i: [2 * (i * 100 + n) for n in range(5)] for i in range(20)}
        # One storage (and so one connection pool) for every thread.
        assert len(built) == 1
        assert client.queue_stats([DOUBLE])[0].pending == 0
    finally:
        client.close()


_FORKS = """
import os
import sys

from reflow_core import StepContext, SyncClient, workflow


def unreachable(ctx: StepContext) -> None:
    raise AssertionError("runs in the worker")


DOUBLE = workflow("double", input=dict).step("double", unreachable)
client = SyncClient(sys.argv[1], workflows=[DOUBLE], poll_interval="100ms")


def roundtrip(n):
    run = client.enqueue(DOUBLE, {"n": n})
    return client.result(run.id, timeout="30s")["double"]


# The parent uses the client first: it has a loop, a storage, connections.
assert roundtrip(1) == 2
children = []
for index in range(3):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if index == 0:
                # A child that never calls the client: at its exit it must not
                # close the parent's connections.
                pass
            else:
                # The parent goes on using its connections meanwhile; a child
                # writing on them would garble both.
                for n in range(20):
                    assert roundtrip(index * 1000 + n) == 2 * (index * 1000 + n)
        except BaseException as exc:
            print(f"child {index}: {exc!r}", file=sys.stderr, flush=True)
            code = 1
        sys.exit(code)  # through atexit: the child's own client is closed
    children.append(pid)
for n in range(20):
    assert roundtrip(n) == 2 * n
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
assert codes == [0, 0, 0], codes
# The parent's connections outlived every child.
for n in range(5):
    assert roundtrip(500 + n) == 1000 + 2 * n
print("ok", flush=True)
"""


def _run_script(source: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = cwd / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


@pytest.mark.slow
def test_forked_children_build_their_own_connections(worker: AppFleet, tmp_path: Path) -> None:
    done = _run_script(_FORKS, worker.store, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert done.stderr == ""


_EXIT = """
import sys

from reflow_core import SyncClient

client = SyncClient(sys.argv[1], poll_interval="100ms")
assert client.list_runs().runs == []
# No close(): the interpreter's exit closes the client.
print("ok", flush=True)
"""


@pytest.mark.slow
def test_the_interpreter_exit_closes_an_open_client(store_url: str, tmp_path: Path) -> None:
    done = _run_script(_EXIT, store_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    # Nothing left open: no unclosed connection, socket or loop warned about.
    assert done.stderr == ""


def test_close_is_final_and_idempotent(tmp_path: Path) -> None:
    client = _client(f"sqlite:///{tmp_path}/s.db")
    assert client.list_runs().runs == []
    client.close()
    client.close()
    with pytest.raises(EngineClosedError, match=r"client\.enqueue\(\) was called after"):
        client.enqueue(DOUBLE, {"n": 1})
    assert "closed" in repr(client)


def test_a_client_never_called_opens_nothing(tmp_path: Path) -> None:
    built: list[Storage] = []
    client = SyncClient(lambda: built.append(MemoryStorage()) or built[-1])
    client.close()
    assert built == []


def test_the_callers_context_reaches_the_engine(tmp_path: Path) -> None:
    """A contextvar set in the calling thread (a trace span, for tracing
    plugins) is seen by the enqueue hooks, which run on the client's loop."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

    class Stamp:
        @hookimpl
        def reflow_enqueue_headers(self, workflow: str) -> Mapping[str, str] | None:
            return {"x-request": request_id.get("none")}

    url = f"sqlite:///{tmp_path}/s.db"
    with _client(url, plugins=[Stamp()]) as client:
        seen = {}

        def call(value: str) -> None:
            request_id.set(value)
            run_id = client.enqueue(DOUBLE, {"n": 1}).id
            record = with_storage(url, lambda storage: storage.get_run(run_id))
            assert record is not None
            seen[value] = record.headers["x-request"]

        threads = [threading.Thread(target=call, args=(f"r{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert seen == {f"r{i}": f"r{i}" for i in range(4)}


def test_a_call_from_the_clients_own_loop_is_refused(tmp_path: Path) -> None:
    hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
    refused: list[BaseException] = []

    class Reentrant:
        @hookimpl
        def reflow_enqueue_headers(self, workflow: str) -> Mapping[str, str] | None:
            for call in (client.list_runs, client.close):
                try:
                    call()
                except RuntimeError as exc:
                    refused.append(exc)
            return None

    client = _client(f"sqlite:///{tmp_path}/s.db", plugins=[Reentrant()])
    with client:
        client.enqueue(DOUBLE, {"n": 1})
    assert [str(exc) for exc in refused] == [
        "SyncClient.list_runs() was called on the client's own event loop thread (from a "
        "step, a hook or an on_error callback it runs), where it would wait for itself: use "
        "an Engine and await it there",
        "SyncClient.close() was called on the client's own event loop thread, where it would "
        "wait for itself",
    ]


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        (42, "storage must be a URL or a function"),
        (MemoryStorage(), "each process builds its own"),
        ("not a url", "storage URL must look like"),
    ],
)
def test_a_wrong_storage_fails_at_construction(storage: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SyncClient(storage)


def test_a_storage_function_must_return_a_storage() -> None:
    client = SyncClient(lambda: "sqlite:///x.db")  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="returned a str, not a Storage"), client:
        client.list_runs()


def test_workflows_registered_later_can_be_enqueued_by_name(tmp_path: Path) -> None:
    with SyncClient(f"sqlite:///{tmp_path}/s.db") as client:
        assert client.list_runs().runs == []
        client.register(DOUBLE)
        assert client.enqueue("double", {"n": 2}).workflow == "double"
        assert client.workflows == [DOUBLE]


def test_waiting_for_a_run_in_flight(worker: AppFleet) -> None:
    with _client(worker.store) as client:
        run = client.enqueue(DOUBLE, {"n": 4})
        worker.workers.wait_for(
            "the run to complete",
            now_and_then(lambda: client.get_run_status(run.id).status == "completed", 0.05),
        )
        assert client.result(run.id)["double"] == 8
        assert os.getpid() != client.result(run.id)["pid"]


def test_closing_ends_the_calls_still_waiting(tmp_path: Path) -> None:
    """A thread blocked in result() (no worker runs the run) ends with
    EngineClosedError when another thread closes the client."""
    client = _client(f"sqlite:///{tmp_path}/s.db")
    run = client.enqueue(DOUBLE, {"n": 1})
    ended: list[BaseException] = []
    waiting = threading.Thread(target=lambda: ended.extend(_raised(lambda: client.result(run.id))))
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive()
    client.close()
    waiting.join(10)
    assert not waiting.is_alive()
    assert len(ended) == 1
    assert isinstance(ended[0], EngineClosedError)


def _raised(call: Any) -> list[BaseException]:
    try:
        call()
    except BaseException as exc:
        return [exc]
    return []


def test_a_call_from_a_thread_that_runs_an_event_loop(tmp_path: Path) -> None:
    """As in a notebook: the caller's thread runs a loop of its own, which
    simply waits for the call."""

    async def inside() -> list[str]:
        with _client(f"sqlite:///{tmp_path}/s.db") as client:
            run = client.enqueue(DOUBLE, {"n": 1})
            return [r.id for r in client.list_runs().runs] + [run.id]

    ids = asyncio.run(inside())
    assert len(ids) == 2
    assert ids[0] == ids[1]
