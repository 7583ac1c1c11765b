"""Results of runs that a worker in another process ran: :meth:`Engine.result`
and :meth:`Engine.wait` on an engine that runs nothing (``worker=False``),
on a store shared with a real ``reflow worker`` process.

One worker process serves each backend for the whole module (started on
first use, stopped at the end). Its ``gated`` workflow blocks in its step
until the test creates the run's gate file, so a test decides when a run
finishes; each output names the worker's pid, so it plainly came from the
other process.

On PostgreSQL and Redis the store sends a finish hint when a run ends, and a
waiting engine reads the run at once: with a ``poll_interval`` of 20 s, a run
released after the waiter's reads have backed off to seconds apart comes back
within a second (its next read by polling would come seconds later). On
SQLite, which has no hint channel, the waiter polls every ``poll_interval``.
A lost hint (the waiter does not listen, or its listening connection is
killed) still ends in the run's result, by polling or by the look at
everything that follows a reconnect.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from reflow_conformance.testsupport import AppFleet, engine_on, now_and_then, with_storage
from reflow_core import (
    Engine,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    StepContext,
    codec,
    workflow,
)
from reflow_core.storage import NewRun, Storage

from .conftest import Database

_APP = """
import asyncio
import os

from reflow_core import Engine, open_storage, workflow

GATES = os.environ["APP_GATES"]


def _open(gate):
    return os.path.exists(os.path.join(GATES, gate)) or os.path.exists(
        os.path.join(GATES, "all")
    )


async def double(ctx):
    return {"double": ctx.input["n"] * 2, "pid": os.getpid()}


async def gated(ctx):
    # Blocks until the test opens the run's gate.
    gate = ctx.input["gate"]
    while not _open(gate):
        await asyncio.sleep(0.02)
    if ctx.input.get("fail"):
        raise ValueError(f"gate {gate} said no")
    return {"gate": gate, "pid": os.getpid()}


def make():
    return Engine(
        storage=open_storage(os.environ["APP_STORE"]),
        workflows=[
            workflow("double", input=dict).step("double", double),
            workflow("gated", input=dict).step("gated", gated),
        ],
        concurrency=16,
        lease="3s",
        poll_interval="100ms",
        drain_timeout="5s",
        load_entry_points=False,
    )
"""

HINTED = ("postgres", "redis")
"""The backends that send finish hints."""

SLOW_POLL = "20s"
"""The waiters' ``poll_interval`` on the hinted backends: far longer than any wait here."""

BACKED_OFF = 2.7
"""Seconds a waiter waits before its run is released on a hinted backend.
Its reads back off from 10 ms, doubling: by now they are about 2.5 s apart,
the next one at about 5.1 s."""

LONG_BACKED_OFF = 5.4
"""The same, a step further: the reads are about 5 s apart, the next one at
about 10.2 s."""

HINT_LATENCY = 1.0
"""Seconds within which a hinted waiter has its result after the release."""


def _unreachable(ctx: StepContext[Any, Any]) -> None:
    raise AssertionError("the test process runs no step")


# This process's view of the worker's workflows: enough to enqueue them.
DOUBLE = workflow("double", input=dict).step("double", _unreachable)
GATED = workflow("gated", input=dict).step("gated", _unreachable)
WORKFLOWS = [DOUBLE, GATED]


# -- the worker process of each backend ----------------------------------------------


@dataclass
class App:
    """A worker process serving the app on one backend's store."""

    kind: str
    store: str
    fleet: AppFleet
    pid: int
    gates: Path

    def url(self, **options: str) -> str:
        """The store's URL with more query options."""
        extra = "&".join(f"{name}={value}" for name, value in options.items())
        return f"{self.store}{'&' if '?' in self.store else '?'}{extra}"

    @property
    def server(self) -> str:
        """The URL of the store without its options: the PostgreSQL database
        or the Redis server, for looking at connections."""
        return self.store.split("?", 1)[0]

    def producer(self, poll_interval: str, **options: str) -> Engine:
        """An engine that runs nothing, on a storage of its own."""
        return Engine(
            storage=self.url(**options) if options else self.store,
            workflows=WORKFLOWS,
            worker=False,
            poll_interval=poll_interval,
            load_entry_points=False,
        )

    def open_gate(self, gate: str) -> None:
        (self.gates / gate).touch()

    def check_alive(self) -> None:
        proc = self.fleet.workers.procs[0]
        code = proc.poll()
        assert code is None, self.fleet.workers.failure(f"the worker exited with {code}")


class Apps:
    """One worker process per backend, started when a test first needs it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.apps: dict[str, App] = {}

    def get(self, kind: str, request: pytest.FixtureRequest) -> App:
        app = self.apps.get(kind)
        if app is None:
            app = self._start(kind, request)
            self.apps[kind] = app
        app.check_alive()
        return app

    def _start(self, kind: str, request: pytest.FixtureRequest) -> App:
        root = self.root / kind
        root.mkdir()
        if kind == "sqlite":
            store = f"sqlite:///{root}/store.db"
        else:
            # A schema or key prefix of its own, kept for the whole module.
            store = str(request.getfixturevalue(f"{kind}_url"))
        gates = root / "gates"
        gates.mkdir()
        fleet = AppFleet(root, store, module="results_app", source=_APP)
        proc = fleet.start(gates=str(gates))
        app = App(kind, store, fleet, proc.pid, gates)
        try:
            # Serving: a first run completes.
            warm_up = with_storage(store, _create_double)
            fleet.workers.wait_for(
                "the worker to complete a first run",
                now_and_then(
                    lambda: getattr(fleet.run(warm_up), "status", None) == "completed", 0.1
                ),
                timeout=30,
            )
        except BaseException:
            fleet.cleanup()
            raise
        return app

    def close(self) -> None:
        for app in self.apps.values():
            try:
                app.open_gate("all")  # nothing left blocking the drain
                app.fleet.stop(app.fleet.workers.procs[0])
            finally:
                app.fleet.cleanup()


async def _create_double(storage: Storage) -> str:
    created = await storage.create_run(NewRun("double", codec.encode({"n": 0})))
    return created.run.id


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apps]:
    made = Apps(tmp_path_factory.mktemp("results"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def app(kind: str, apps: Apps, request: pytest.FixtureRequest) -> App:
    """The worker process of backend ``kind`` (a parameter of the test)."""
    return apps.get(kind, request)


def _gate() -> str:
    return f"g{uuid.uuid4().hex[:12]}"


async def _timed(waiting: Awaitable[Any]) -> tuple[Any, float]:
    """What ``waiting`` returned or raised, and when (``time.monotonic()``)."""
    try:
        outcome = await waiting
    except Exception as exc:
        outcome = exc
    return outcome, time.monotonic()


async def _until_running(engine: Engine, run_ids: list[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for run_id in run_ids:
        while True:
            run = await engine.get_run(run_id)
            assert run is not None
            if run.status == "running":
                break
            assert run.status == "pending", f"{run_id} is {run.status}, not running"
            assert time.monotonic() < deadline, f"{run_id} was never claimed"
            await asyncio.sleep(0.05)


# -- 1. a completion seen across processes --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", *HINTED])
async def test_outputs_of_runs_done_by_a_worker_process(app: App) -> None:
    async with app.producer("200ms") as producer:
        runs = [await producer.enqueue(DOUBLE, {"n": n}) for n in range(6)]
        async with asyncio.timeout(15):
            outputs = await asyncio.gather(*(producer.result(run.id) for run in runs))
    assert outputs == [{"double": n * 2, "pid": app.pid} for n in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", *HINTED])
async def test_a_waiter_hears_of_a_completion_a_failure_and_a_cancel_at_once(app: App) -> None:
    hinted = app.kind in HINTED
    poll = SLOW_POLL if hinted else "200ms"
    # One engine per waiter, so no waiter's read is sped up by another's hint.
    completing = app.producer(poll)
    failing = app.producer(poll)
    cancelled = app.producer(poll)
    canceller = app.producer("1s")
    engines = [completing, failing, cancelled, canceller]
    ok_gate, bad_gate = _gate(), _gate()
    try:
        ok = await completing.enqueue(GATED, {"gate": ok_gate})
        bad = await failing.enqueue(GATED, {"gate": bad_gate, "fail": True})
        doomed = await cancelled.enqueue(GATED, {"gate": _gate()})  # never opened
        await _until_running(canceller, [ok.id, bad.id, doomed.id])
        waits = [
            asyncio.create_task(_timed(completing.result(ok.id))),
            asyncio.create_task(_timed(failing.result(bad.id))),
            asyncio.create_task(_timed(cancelled.result(doomed.id))),
        ]
        await asyncio.sleep(BACKED_OFF if hinted else 0.5)
        assert not any(wait.done() for wait in waits)

        released = time.monotonic()
        app.open_gate(ok_gate)
        app.open_gate(bad_gate)
        assert await canceller.cancel(doomed.id)
        # No result timeout (its last read would return a finished run
        # however late it was seen): a waiter must see the end by itself.
        async with asyncio.timeout(8):
            (output, ok_at), (failure, bad_at), (cancel, doomed_at) = await asyncio.gather(*waits)
    finally:
        for engine in engines:
            await engine.close()

    assert output == {"gate": ok_gate, "pid": app.pid}
    assert isinstance(failure, RunFailedError), failure
    assert failure.run_id == bad.id
    assert failure.step == "gated"
    assert failure.info["message"] == f"gate {bad_gate} said no"
    assert isinstance(cancel, RunCancelledError), cancel
    assert cancel.run_id == doomed.id
    # Hinted: within a second, where polling would have taken seconds more.
    # Polled: within the poll interval, give or take a read.
    bound = HINT_LATENCY if hinted else 0.2 + HINT_LATENCY
    latencies = {
        "completed": ok_at - released,
        "failed": bad_at - released,
        "cancelled": doomed_at - released,
    }
    assert all(seconds < bound for seconds in latencies.values()), latencies


# -- 2. Engine.wait across processes --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", *HINTED])
async def test_wait_for_the_first_and_for_all_of_runs_done_elsewhere(app: App) -> None:
    gate = _gate()
    async with app.producer(SLOW_POLL if app.kind in HINTED else "200ms") as producer:
        held = await producer.enqueue(GATED, {"gate": gate})
        fast = await producer.enqueue(DOUBLE, {"n": 21})
        refused = await producer.enqueue(GATED, {"gate": gate, "fail": True})
        ids = [held.id, fast.id, refused.id]

        async with asyncio.timeout(10):
            first = await producer.wait(ids, return_when="FIRST_COMPLETED")
        assert [run.id for run in first.done] == [fast.id]
        assert first.done[0].status == "completed"
        assert first.done[0].output == {"double": 42, "pid": app.pid}
        assert first.pending == [held.id, refused.id]

        # A timeout returns what there is, raising nothing.
        partial = await producer.wait(ids, return_when="ALL_COMPLETED", timeout=0.3)
        assert [run.id for run in partial.done] == [fast.id]
        assert partial.pending == [held.id, refused.id]

        waiting = asyncio.create_task(producer.wait(ids, return_when="ALL_COMPLETED"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        app.open_gate(gate)
        async with asyncio.timeout(10):
            everything = await waiting

    assert [run.id for run in everything.done] == ids  # in the order given
    assert everything.pending == []
    by_id = {run.id: run for run in everything.done}
    assert by_id[held.id].status == "completed"
    assert by_id[held.id].output == {"gate": gate, "pid": app.pid}
    assert by_id[fast.id].output == {"double": 42, "pid": app.pid}
    assert by_id[refused.id].status == "failed"
    error = by_id[refused.id].error
    assert error is not None
    assert error["message"] == f"gate {gate} said no"


# -- 3. a lost hint still ends in the result ------------------------------------------


async def _listeners(app: App, name: str) -> list[int]:
    """The connections listening for the hints of the engine whose storage
    is named ``name`` (its PostgreSQL ``application_name`` or Redis client
    name): PostgreSQL backend pids, or Redis client ids. Nobody else's."""
    if app.kind == "postgres":
        async with await psycopg.AsyncConnection.connect(app.server, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s"
                " AND left(query, 6) = 'LISTEN'",
                (name,),
            )
            return sorted(row[0] for row in await cursor.fetchall())
    client = aioredis.Redis.from_url(app.server)
    try:
        clients = await client.client_list()
    finally:
        await client.aclose()
    return sorted(
        int(entry["id"])
        for entry in clients
        if entry.get("name") == name and int(entry.get("sub", 0)) > 0
    )


async def _kill_listener(app: App, listener: int) -> None:
    """End one listening connection from the server's side."""
    if app.kind == "postgres":
        async with await psycopg.AsyncConnection.connect(app.server, autocommit=True) as conn:
            cursor = await conn.execute("SELECT pg_terminate_backend(%s)", (listener,))
            row = await cursor.fetchone()
            assert row == (True,)
        return
    client = aioredis.Redis.from_url(app.server)
    try:
        killed = await client.client_kill_filter(_id=str(listener), _type="pubsub")
    finally:
        await client.aclose()
    assert killed == 1


def _named(app: App, name: str) -> dict[str, str]:
    """The URL option naming the storage's connections on the server."""
    return {"application_name": name} if app.kind == "postgres" else {"client_name": name}


@pytest.mark.slow
@pytest.mark.parametrize("kind", HINTED)
async def test_a_waiter_that_does_not_listen_polls(app: App) -> None:
    name = f"rf_deaf_{uuid.uuid4().hex[:10]}"
    gate = _gate()
    async with app.producer("500ms", listen="false", **_named(app, name)) as producer:
        held = await producer.enqueue(GATED, {"gate": gate})
        await _until_running(producer, [held.id])
        waiting = asyncio.create_task(_timed(producer.result(held.id)))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        assert await _listeners(app, name) == []  # it really listens to nothing
        released = time.monotonic()
        app.open_gate(gate)
        async with asyncio.timeout(8):
            output, at = await waiting
    assert output == {"gate": gate, "pid": app.pid}
    assert at - released < 0.5 + HINT_LATENCY  # one poll interval, give or take a read


@pytest.mark.slow
@pytest.mark.parametrize("kind", HINTED)
async def test_a_waiter_whose_listener_is_killed_still_gets_its_result(app: App) -> None:
    name = f"rf_cut_{uuid.uuid4().hex[:10]}"
    gate = _gate()
    async with app.producer(SLOW_POLL, **_named(app, name)) as producer:
        held = await producer.enqueue(GATED, {"gate": gate})
        await _until_running(producer, [held.id])
        started = time.monotonic()
        waiting = asyncio.create_task(_timed(producer.result(held.id)))
        deadline = started + 10
        while not (listening := await _listeners(app, name)):
            assert time.monotonic() < deadline, "the waiter never listened for finishes"
            await asyncio.sleep(0.05)
        assert len(listening) == 1, listening
        (listener,) = listening
        await asyncio.sleep(started + LONG_BACKED_OFF - time.monotonic())
        assert not waiting.done()

        await _kill_listener(app, listener)
        # Finished while the listener is down or reconnecting: its hint may
        # well be lost.
        app.open_gate(gate)
        released = time.monotonic()
        async with asyncio.timeout(8):
            output, at = await waiting
        assert output == {"gate": gate, "pid": app.pid}
        # Seen thanks to the reconnect (its look at everything, or the hint on
        # the new connection), not the next read, which was seconds away.
        assert at - released < 3.0

        # And the listener is back, on a new connection.
        deadline = time.monotonic() + 10
        while not (again := await _listeners(app, name)):
            assert time.monotonic() < deadline, "the listener never came back"
            await asyncio.sleep(0.05)
        assert listener not in again


# -- 4. a run that is not there -------------------------------------------------------


async def test_waiting_for_a_run_that_never_was_or_was_purged(db: Database) -> None:
    wf = workflow("purged", input=dict).step("add", lambda ctx: ctx.input["n"] + 1)
    storage = db.connect()
    async with engine_on(storage, wf, poll_interval="50ms") as engine, asyncio.timeout(10):
        with pytest.raises(RunNotFoundError) as missing:
            await engine.result("no-such-run")
        assert missing.value.run_id == "no-such-run"
        with pytest.raises(RunNotFoundError):
            await engine.wait(["no-such-run"])
        with pytest.raises(RunNotFoundError):
            await engine.wait(["no-such-run"], return_when="FIRST_COMPLETED", timeout=5)

        run = await engine.enqueue(wf, {"n": 1})
        assert await engine.tick() == 1
        assert await engine.result(run.id) == 2
        done = await engine.wait([run.id])
        assert [r.id for r in done.done] == [run.id]

        # A finished run among missing ones: the missing one is what counts.
        with pytest.raises(RunNotFoundError):
            await engine.wait([run.id, "no-such-run"])

        await asyncio.sleep(0.01)  # finished strictly before the purge's cut-off
        assert await storage.purge_finished(timedelta(0)) == 1
        with pytest.raises(RunNotFoundError) as purged:
            await engine.result(run.id)
        assert purged.value.run_id == run.id
        with pytest.raises(RunNotFoundError):
            await engine.wait([run.id])
