"""Durability on a redis-server of the test's own: with ``appendonly yes`` and
``appendfsync always``, a server killed with SIGKILL in the middle of a load
and started again on the same data directory loses no run and no step result
it acknowledged, and the workers carry on by themselves; without persistence
the same crash loses everything (the contrast, which also shows the checks
notice a loss). And ``SCRIPT FLUSH`` under a running engine: every operation
loads its script again by itself.

Each test starts its own ``redis-server`` on a free port (never the shared
server the other tests use) and kills it at the end, pass or fail. The worker
processes, their logs and the checks of what they left behind are
:mod:`reflow_conformance.testsupport`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from reflow_conformance.testsupport import (
    STEPS,
    Outcome,
    Workers,
    check_outcome,
    enqueue_runs,
    read_outcome_at,
)
from reflow_core import Engine, StepContext, codec, workflow

from . import _redis_harness as h

WORKFLOW = "crash-steps"
PREFIX = "durable"
DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
VOLATILE = ("--appendonly", "no", "--save", "")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., h.RedisServer]]:
    """Makes redis-servers with the given options, each in a directory of its own;
    every one still running is killed after the test."""
    binary = h.need_redis_server()
    made: list[h.RedisServer] = []

    def make(*options: str) -> h.RedisServer:
        directory = tmp_path / f"redis-{len(made)}"
        directory.mkdir()
        server = h.RedisServer(binary, directory, *options)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


def _stored_token(client: redis.Redis, run_id: str, step: str) -> str | None:
    """The token in the saved result of ``step`` of ``run_id``, read behind the backend's back."""
    value = client.hget(f"{{{PREFIX}}}:steps:{run_id}", step)
    if value is None:
        return None
    assert isinstance(value, bytes)
    body = value.decode().split("|", 4)[4]
    output = json.loads(body)[0]
    return str(codec.decode(output)["token"])


def assert_saved_in_order(outcome: Outcome) -> None:
    """Every run's steps were saved in workflow order, each once: a step keeps
    its first sequence number, so Redis lists them in the order saved."""
    for run_id, steps in outcome.steps.items():
        assert list(steps) == list(STEPS), (run_id, list(steps))


@pytest.mark.slow
@pytest.mark.parametrize(
    "outage", [0.5, 4.0], ids=["outage-shorter-than-lease", "outage-longer-than-lease"]
)
def test_a_server_crash_mid_load_loses_no_acknowledged_run_or_step(
    server_factory: Callable[..., h.RedisServer], logdir: Path, outage: float
) -> None:
    """The lease is 3s. After a short outage the leases held at the crash are
    still there (their expiry is kept in the append-only file) and the workers
    carry on with their runs; after a long one every lease has lapsed (the
    workers gave up on their runs meanwhile) and those runs are reclaimed."""
    runs = 600
    server = server_factory(*DURABLE)
    server.start()
    with server.client() as client:
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        first_id = client.info("server")["run_id"]
    url = f"{server.url}?prefix={PREFIX}"
    workers = Workers(url, logdir)
    stop = logdir / "stop"
    try:
        enqueuer = workers.enqueue(runs, "--pace", "0.003")
        pool = [
            workers.start(
                "--lease",
                "3s",
                "--concurrency",
                "8",
                "--until-idle",
                "0.5",
                "--stop-file",
                str(stop),
                "--step-delay",
                "0.005",
            )
            for _ in range(2)
        ]

        def acked_saves() -> int:
            return sum(1 for s in workers.saves() if s.ok)

        workers.wait_for(
            "the load to get going",
            lambda: len(workers.acked()) >= runs // 3 and acked_saves() >= 200,
        )
        # The crash: no shutdown, no last write, no final fsync.
        crashed_at = time.monotonic()
        server.crash()
        acked_at_crash: dict[int, str] = workers.acked()
        saved_at_crash = [s for s in workers.saves() if s.ok]
        time.sleep(outage)  # the workers find the server gone
        # Frozen while the server comes back, they cannot touch what it recovered.
        workers.signal_all(signal.SIGSTOP)
        server.start()
        restarted_in = time.monotonic() - crashed_at

        # Right after the restart: every run and every step result the server
        # acknowledged before it died is there.
        with server.client() as client:
            assert client.info("server")["run_id"] != first_id, "the server was not restarted"
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            leases = len(list(client.scan_iter(match=f"{{{PREFIX}}}:lease:*")))
            missing_runs = [
                run_id
                for run_id in acked_at_crash.values()
                if not client.exists(f"{{{PREFIX}}}:run:{run_id}")
            ]
            assert missing_runs == [], f"{len(missing_runs)} acknowledged runs were lost"
            lost_saves = [
                s for s in saved_at_crash if _stored_token(client, s.run, s.step) != s.token
            ]
            assert lost_saves == [], f"{len(lost_saves)} acknowledged step saves were lost"
        workers.signal_all(signal.SIGCONT)
        assert len(acked_at_crash) < runs, "every run was enqueued before the crash"
        assert len(saved_at_crash) < runs * len(STEPS) * 0.8, "the load was nearly over"

        # The load then completes, the workers reconnecting by themselves.
        workers.finish(timeout=60, procs=[enqueuer])
        with server.client() as client:
            # Both wake-up listeners subscribed again on the new server.
            channel = f"{{{PREFIX}}}:wake"
            workers.wait_for(
                "the workers to listen for wake-ups again",
                lambda: client.pubsub_numsub(channel) == [(channel.encode(), len(pool))],
                timeout=15,
            )
        stop.touch()
        workers.finish(timeout=60)
    finally:
        workers.cleanup()

    acked = workers.acked()
    assert sorted(acked) == list(range(runs))
    inputs = {run_id: {"n": n} for n, run_id in acked.items()}
    outcome = read_outcome_at(url, WORKFLOW, inputs)
    executions = workers.executions()
    saves = workers.saves()
    # No run lost or created twice; every step result in place is the output
    # of a real execution, and every acknowledged save is still in place.
    repeated = check_outcome(outcome, executions, saves)
    assert_saved_in_order(outcome)
    reclaimed = {run for run, record in outcome.runs.items() if record.reclaims}
    assert repeated <= reclaimed
    if outage < 3:
        assert leases > 0, "the leases held at the crash did not survive the restart"
    else:
        assert leases == 0
        assert reclaimed, "no run held at the crash was reclaimed"
    # The workers saw the server go away and the load was finished after it
    # came back. (Which worker claims what is not fair by design: one worker
    # may drain the rest alone, so only work by some worker is required.)
    before = set(saved_at_crash)
    after = [s for s in saves if s.ok and s not in before]
    assert after, "no work was done after the restart"
    complaints = workers.worker_logs()
    assert any("Connection" in line or "connect" in line for line in complaints), complaints
    summary = {
        "acked_runs_at_crash": len(acked_at_crash),
        "acked_saves_at_crash": len(saved_at_crash),
        "restarted_in_s": round(restarted_in, 2),
        "leases_after_restart": leases,
        "reclaimed": len(reclaimed),
        "repeated": len(repeated),
        "saves_per_step": dict(Counter(Counter((s.run, s.step) for s in saves).values())),
        "refused_saves": sum(1 for s in saves if not s.ok),
    }
    print(json.dumps(summary))


def test_without_persistence_the_same_crash_loses_acknowledged_runs(
    server_factory: Callable[..., h.RedisServer],
) -> None:
    """The contrast: the checks above do notice a loss."""
    server = server_factory(*VOLATILE)
    server.start()
    url = f"{server.url}?prefix={PREFIX}"
    inputs = enqueue_runs(url, WORKFLOW, 50)  # all 50 acknowledged
    server.crash()
    server.start()
    outcome = read_outcome_at(url, WORKFLOW, inputs)
    assert outcome.runs == {}
    with pytest.raises(AssertionError, match="runs were lost"):
        check_outcome(outcome, [], [])


def test_script_flush_under_a_running_engine_is_recovered_by_itself(
    server_factory: Callable[..., h.RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    runs = 300
    server = server_factory(*VOLATILE)
    server.start()
    url = f"{server.url}?prefix={PREFIX}"
    caplog.set_level(logging.INFO, logger="reflow")
    executed: Counter[tuple[str, str]] = Counter()

    def make(name: str) -> Any:
        async def handler(ctx: StepContext[Any, Any]) -> dict[str, Any]:
            executed[ctx.run_id, name] += 1
            await asyncio.sleep(0.005)
            return {"step": name, "prev": ctx.prev}

        return handler

    wf: Any = workflow("flushed")
    for name in STEPS:
        wf = wf.step(name, make(name))

    async def main() -> tuple[int, int, list[Any]]:
        raw = aioredis.Redis(host="127.0.0.1", port=server.port)
        engine = Engine(
            storage=url,
            workflows=[wf],
            concurrency=8,
            lease="10s",
            poll_interval="50ms",
            worker=False,
            load_entry_points=False,
        )
        flushes = mid_load = 0
        try:
            async with engine:
                await raw.script_flush()
                flushes += 1
                ids = [(await engine.enqueue(wf, {"n": n})).id for n in range(runs // 2)]
                await raw.script_flush()
                flushes += 1
                await engine.start()
                ids += [(await engine.enqueue(wf, {"n": n})).id for n in range(runs // 2, runs)]
                async with asyncio.timeout(60):
                    while (await engine.list_runs(status=["pending", "running"], limit=1)).runs:
                        # Spaced out: a script reloaded after one flush is
                        # called before the next (redis-py retries once).
                        await raw.script_flush()
                        flushes += 1
                        mid_load += 1
                        await asyncio.sleep(0.1)
                records = [await engine.get_run_status(run_id) for run_id in ids]
        finally:
            await raw.aclose()
        return flushes, mid_load, records

    flushes, mid_load, records = asyncio.run(main())
    assert mid_load >= 3, "the load was over before the flushes"
    assert Counter(r.status for r in records) == {"completed": runs}
    assert set(executed.values()) == {1}
    assert len(executed) == runs * len(STEPS)
    with server.client() as client:
        noscript = client.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0)
    assert noscript >= flushes // 2, "the flushes never hit a script call"
    # redis-py loads a script again after NOSCRIPT and retries once: only a
    # flush landing between that load and the retry (a machine so busy that
    # the two are 0.1s apart) makes a call fail, and the engine retries it.
    # Nothing else may go wrong, and no run may stop.
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [m for m in warned if "NoScriptError" not in m] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    print(
        json.dumps(
            {
                "flushes": flushes,
                "mid_load": mid_load,
                "noscript_replies": noscript,
                "retried_after_two_flushes": len(warned),
            }
        )
    )
