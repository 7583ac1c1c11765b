"""A concurrency limit and a rate held by real worker processes: three
``reflow worker`` processes on one PostgreSQL or Redis store, 2,000 runs over
50 keys with at most one run per key at a time (or at most 5 starts per key
in any second), and one of the workers SIGKILLed half-way.

Each run's step logs when it starts and when it returns to its process's
execution log, so the logs give every execution's interval; the intervals of
one key must never overlap, the killed worker's unfinished ones counted up to
its death. Every run completes, so the killed worker's slots were taken over
once its leases lapsed, not lost. With the rate, each worker logs every
claim it makes at the storage clock's time of the claim: no window of a
second holds more claims of one key than the rate allows, the killed
worker's and the takeovers of its runs included.
"""

from __future__ import annotations

import itertools
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reflow_conformance.testsupport import AppFleet, now_and_then, with_storage
from reflow_core import codec
from reflow_core.storage import ConcurrencyLimit, NewRun, RateLimit, Storage

_RUNS = 2_000
_KEYS = 50
_WORKFLOW = "limited"
_RATE = 5
"""Starts per key per second in the rate test: its 40 runs of a key take 8 s."""

_APP_TEMPLATE = textwrap.dedent(
    """
    import asyncio
    import os
    import time

    from reflow_conformance.testsupport import ExecutionLog
    from reflow_core import Engine, Limit, open_storage, workflow

    # The store, with every claim logged at the storage clock's time of the
    # claim (its lease's end less the lease).
    class ClaimLog:

        def __init__(self, inner, log):
            self._inner = inner
            self._log = log

        def __getattr__(self, name):
            return getattr(self._inner, name)

        async def subscribe_wakeups(self, workflows, wake):
            return await self._inner.subscribe_wakeups(workflows, wake)

        async def claim_runs(self, workflows, limit, lease):
            claimed = await self._inner.claim_runs(workflows, limit, lease)
            for c in claimed:
                at = (c.run.lease_expires_at - lease).timestamp()
                self._log.write("claimed", run=c.run.id, key=c.run.rates[0].key, at=at)
            return claimed

    def make():
        log = ExecutionLog(os.environ["APP_LOGDIR"])

        async def work(ctx):
            key = ctx.input["k"]
            log.write("began", run=ctx.run_id, key=key, at=time.time())
            await asyncio.sleep(0.02)
            log.write("ended", run=ctx.run_id, key=key, at=time.time())
            return key

        wf = workflow(
            {workflow!r}, input=dict, concurrency=Limit(key=lambda i: i["k"], {limit})
        ).step("work", work)
        storage = open_storage(os.environ["APP_STORE"])
        if os.environ.get("APP_LOG_CLAIMS"):
            storage = ClaimLog(storage, log)
        return Engine(
            storage=storage,
            workflows=[wf],
            concurrency=16,
            lease="1s",
            poll_interval="100ms",
            drain_timeout="10s",
            load_entry_points=False,
        )
    """
)


@pytest.fixture(params=["postgres", "redis"])
def server_store(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def _fleet(tmp_path: Path, store: str, workflow: str, limit: str) -> AppFleet:
    source = _APP_TEMPLATE.replace("{workflow!r}", repr(workflow)).replace("{limit}", limit)
    return AppFleet(tmp_path, store, module=f"{workflow}_app", source=source)


@pytest.fixture
def fleet(tmp_path: Path, server_store: str) -> Iterator[AppFleet]:
    made = _fleet(tmp_path, server_store, _WORKFLOW, "max=1")
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def rated_fleet(tmp_path: Path, server_store: str) -> Iterator[AppFleet]:
    made = _fleet(tmp_path, server_store, "rated", f'rate="{_RATE}/s"')
    try:
        yield made
    finally:
        made.cleanup()


def _enqueue(store: str, workflow: str = _WORKFLOW) -> list[str]:
    async def work(storage: Storage) -> list[str]:
        ids = []
        for n in range(_RUNS):
            key = f"k{n % _KEYS}"
            limits: tuple[ConcurrencyLimit, ...] = ()
            rates: tuple[RateLimit, ...] = ()
            if workflow == _WORKFLOW:
                limits = (ConcurrencyLimit(f"{workflow}:{key}", 1),)
            else:
                rates = (RateLimit(f"{workflow}:{key}", _RATE, timedelta(seconds=1)),)
            new = NewRun(
                workflow=workflow, input=codec.encode({"k": key}), limits=limits, rates=rates
            )
            ids.append((await storage.create_run(new)).run.id)
        return ids

    return with_storage(store, work)


def _all_completed(store: str, workflow: str = _WORKFLOW) -> bool:
    async def work(storage: Storage) -> bool:
        page = await storage.list_runs(
            workflow=workflow,
            status=["pending", "running", "delayed", "failed", "cancelled"],
            limit=1,
        )
        return not page.runs

    return with_storage(store, work)


@pytest.mark.slow
def test_one_run_per_key_across_three_workers_one_of_them_killed(fleet: AppFleet) -> None:
    workers = fleet.workers
    _enqueue(fleet.store)
    procs = [fleet.start() for _ in range(3)]
    victim = procs[0]

    def ended() -> int:
        return sum(1 for line in workers.lines() if line["kind"] == "ended")

    workers.wait_for("a third of the runs done", lambda: ended() >= _RUNS // 3, timeout=60)
    workers.kill(victim)
    killed_at = time.time()  # the victim ran nothing after this
    workers.wait_for(
        "every run to complete", now_and_then(lambda: _all_completed(fleet.store), 0.5), 120
    )
    for proc in procs[1:]:
        fleet.stop(proc)

    began: dict[tuple[int, str], dict[str, Any]] = {}
    intervals: dict[str, list[tuple[float, float, str, int]]] = defaultdict(list)
    for line in workers.lines():
        if line["kind"] == "began":
            began[(line["pid"], line["run"])] = line
        elif line["kind"] == "ended":
            start = began.pop((line["pid"], line["run"]))
            intervals[line["key"]].append((start["at"], line["at"], line["run"], line["pid"]))
    # What the victim had begun and not ended ran until its death, at the latest.
    for (pid, run), start in began.items():
        assert pid == victim.pid, f"{run} began in {pid} and never ended"
        intervals[start["key"]].append((start["at"], killed_at, run, pid))
    assert len(intervals) == _KEYS
    overlaps = []
    for key, spans in intervals.items():
        spans.sort()
        for before, after in itertools.pairwise(spans):
            if after[0] < before[1]:
                overlaps.append((key, before, after))
    assert not overlaps, f"runs of one key overlapped: {overlaps[:5]}"
    done = {run for spans in intervals.values() for (_, _, run, pid) in spans}
    assert len(done) == _RUNS
    print(f"killed with {len(began)} runs in flight")  # shown with -s


@pytest.mark.slow
def test_a_rate_per_key_across_three_workers_one_of_them_killed(rated_fleet: AppFleet) -> None:
    fleet = rated_fleet
    workers = fleet.workers
    _enqueue(fleet.store, "rated")
    procs = [fleet.start(log_claims="1") for _ in range(3)]
    victim = procs[0]

    def ended() -> int:
        return sum(1 for line in workers.lines() if line["kind"] == "ended")

    workers.wait_for("a third of the runs done", lambda: ended() >= _RUNS // 3, timeout=60)
    workers.kill(victim)
    workers.wait_for(
        "every run to complete",
        now_and_then(lambda: _all_completed(fleet.store, "rated"), 0.5),
        120,
    )
    for proc in procs[1:]:
        fleet.stop(proc)

    claims: dict[str, list[float]] = defaultdict(list)
    runs = set()
    for line in workers.lines():
        if line["kind"] == "claimed":
            claims[line["key"]].append(line["at"])
            runs.add(line["run"])
    assert len(runs) == _RUNS
    assert len(claims) == _KEYS
    # The claim times are the storage clock's (each lease's end less the
    # lease), so the window is checked exactly: a window of the period ending
    # at a claim holds the claims after one period before it.
    breaches = []
    for key, times in claims.items():
        times.sort()
        for first, later in zip(times, times[_RATE:], strict=False):
            if later - first < 1.0 - 1e-6:
                breaches.append((key, first, later))
    assert not breaches, f"more than {_RATE} claims of one key in a second: {breaches[:5]}"
    retried = sum(len(times) for times in claims.values()) - _RUNS
    print(f"{retried} runs of the killed worker claimed again")  # shown with -s
