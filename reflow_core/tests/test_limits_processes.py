"""A concurrency limit held by real worker processes: three ``reflow worker``
processes on one PostgreSQL or Redis store, 2,000 runs over 50 keys with at
most one run per key at a time, and one of the workers SIGKILLed half-way.

Each run's step logs when it starts and when it returns to its process's
execution log, so the logs give every execution's interval; the intervals of
one key must never overlap, the killed worker's unfinished ones counted up to
its death. Every run completes, so the killed worker's slots were taken over
once its leases lapsed, not lost.
"""

from __future__ import annotations

import itertools
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reflow_conformance.testsupport import AppFleet, now_and_then, with_storage
from reflow_core import codec
from reflow_core.storage import ConcurrencyLimit, NewRun, Storage

_RUNS = 2_000
_KEYS = 50
_WORKFLOW = "limited"

_APP = textwrap.dedent(
    f"""
    import asyncio
    import os
    import time

    from reflow_conformance.testsupport import ExecutionLog
    from reflow_core import Engine, Limit, open_storage, workflow

    def make():
        log = ExecutionLog(os.environ["APP_LOGDIR"])

        async def work(ctx):
            key = ctx.input["k"]
            log.write("began", run=ctx.run_id, key=key, at=time.time())
            await asyncio.sleep(0.02)
            log.write("ended", run=ctx.run_id, key=key, at=time.time())
            return key

        wf = workflow(
            {_WORKFLOW!r}, input=dict, concurrency=Limit(key=lambda i: i["k"], max=1)
        ).step("work", work)
        return Engine(
            storage=open_storage(os.environ["APP_STORE"]),
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


@pytest.fixture
def fleet(tmp_path: Path, server_store: str) -> Iterator[AppFleet]:
    made = AppFleet(tmp_path, server_store, module="limited_app", source=_APP)
    try:
        yield made
    finally:
        made.cleanup()


def _enqueue(store: str) -> list[str]:
    async def work(storage: Storage) -> list[str]:
        ids = []
        for n in range(_RUNS):
            key = f"k{n % _KEYS}"
            new = NewRun(
                workflow=_WORKFLOW,
                input=codec.encode({"k": key}),
                limits=(ConcurrencyLimit(f"{_WORKFLOW}:{key}", 1),),
            )
            ids.append((await storage.create_run(new)).run.id)
        return ids

    return with_storage(store, work)


def _all_completed(store: str) -> bool:
    async def work(storage: Storage) -> bool:
        page = await storage.list_runs(
            workflow=_WORKFLOW,
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
