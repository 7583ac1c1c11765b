"""The worker registry and queue statistics, as an engine uses them, on every backend.

What each backend must store is the conformance suite's business; these tests
check the engine's side: a started worker announces itself with what it
serves and holds, leaves at a clean stop, survives a storage that keeps no
registry or refuses an announcement, and reads the queue statistics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from reflow_core import Engine, StepContext, StorageError, workflow
from reflow_core.memory import MemoryStorage
from reflow_core.storage import Storage, WorkerInfo, WorkerRecord

release = threading.Event()


def _blocked(ctx: StepContext[Any, Any]) -> str:
    release.wait(10)
    return "done"


SLOW = workflow("fleet-slow").step("block", _blocked)
QUICK = workflow("fleet-quick").step("only", lambda ctx: ctx.input)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def mine(engine: Engine) -> WorkerRecord | None:
    return next((w for w in await engine.list_workers() if w.id == engine.worker_id), None)


@pytest.fixture(autouse=True)
def _released() -> Any:
    release.clear()
    yield
    release.set()


async def test_a_running_worker_is_listed_with_what_it_holds_and_leaves_at_stop(
    storage: Storage,
) -> None:
    engine = Engine(
        storage=storage,
        workflows=[SLOW, QUICK],
        concurrency=3,
        lease="1s",
        poll_interval="50ms",
        load_entry_points=False,
        close_storage=False,
    )
    async with engine:
        await engine.enqueue(SLOW)
        await engine.enqueue(SLOW)

        async def holds_two() -> bool:
            entry = await mine(engine)
            return entry is not None and entry.in_flight == 2

        await eventually(holds_two, "the worker to announce its two runs in flight")
        entry = await mine(engine)
        assert entry is not None
        assert (entry.host, entry.pid) == (socket.gethostname(), os.getpid())
        assert entry.workflows == ("fleet-slow", "fleet-quick")
        assert entry.concurrency == 3
        assert entry.started_at <= entry.last_seen_at < entry.expires_at
        assert entry.expires_at - entry.last_seen_at == timedelta(seconds=1)  # one lease
        release.set()
        await eventually(lambda: _idle(engine), "the runs to finish")
    # A clean stop removes the entry at once, without waiting for it to lapse.
    assert all(w.id != engine.worker_id for w in await storage.list_workers())


async def _idle(engine: Engine) -> bool:
    entry = await mine(engine)
    return entry is not None and entry.in_flight == 0


async def test_a_client_engine_is_not_a_worker(storage: Storage) -> None:
    async with Engine(storage=storage, workflows=[QUICK], worker=False) as client:
        await client.enqueue(QUICK, 1)
        assert await mine(client) is None


async def test_queue_stats_through_the_engine(storage: Storage) -> None:
    async with Engine(storage=storage, workflows=[QUICK], worker=False) as client:
        for i in range(3):
            await client.enqueue(QUICK, i)
        [queue] = await client.queue_stats([QUICK])
        assert (queue.workflow, queue.pending, queue.running) == ("fleet-quick", 3, 0)
        assert queue.oldest_pending_since is not None
        assert await client.queue_stats("fleet-quick") == [queue]
        while await client.tick():
            pass
        [drained] = await client.queue_stats([QUICK])
        assert (drained.pending, drained.oldest_pending_since) == (0, None)
        assert all(q.workflow != "fleet-quick" for q in await client.queue_stats())


class _NoRegistry(MemoryStorage):
    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        raise NotImplementedError("announce_worker")


class _Flaky(MemoryStorage):
    failures = 3

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        if self.failures:
            self.failures -= 1
            raise StorageError("the store is down", operation="announce_worker", backend="memory")
        return await super().announce_worker(worker, ttl)


async def test_a_storage_without_a_registry_still_runs_workflows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "reflow.engine")
    engine = Engine(storage=_NoRegistry(), workflows=[QUICK], lease="1s", poll_interval="20ms")
    async with engine:
        run = await engine.enqueue(QUICK, 7)
        assert await engine.result(run.id, timeout=5) == 7
        await asyncio.sleep(0.5)  # past the heartbeat: no second attempt to announce
    notes = [r for r in caplog.records if "keeps no worker registry" in r.getMessage()]
    assert len(notes) == 1


async def test_a_failed_announcement_is_logged_once_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "reflow.engine")
    storage = _Flaky()
    engine = Engine(storage=storage, workflows=[QUICK], lease="300ms", poll_interval="20ms")
    async with engine:
        run = await engine.enqueue(QUICK, 1)
        assert await engine.result(run.id, timeout=5) == 1
        await eventually(lambda: _listed(engine), "the worker to be announced", timeout=5)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("could not announce worker" in m for m in messages) == 1
    assert not any("the store is down" in m and "Traceback" in m for m in messages)
    assert sum("announced again" in m for m in messages) == 1


async def _listed(engine: Engine) -> bool:
    return await mine(engine) is not None
