"""Rate limits and debounce, on every backend.

How a backend keeps claim times and releases runs held back by a rate is
the conformance suite's business; these check the engine's side: the
``rate=`` options of ``workflow()`` and ``Limit``, ``enqueue(debounce_key=,
debounce=)``, runs told why they are held back, and bad options refused
before anything is written.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest

from reflow_core import ConfigError, Engine, Limit, Rate, StepContext, workflow
from reflow_core.limits import WORKFLOW_LIMIT_PREFIX, parse_rate
from reflow_core.storage import RATE_BLOCK_PREFIX, ConcurrencyLimit, RateLimit, Storage

from .conftest import blocked_status


def _engine(storage: Storage, *workflows: Any, **options: Any) -> Engine:
    options.setdefault("close_storage", False)
    options.setdefault("poll_interval", "50ms")
    return Engine(storage=storage, workflows=list(workflows), load_entry_points=False, **options)


def _most_in_a_window(starts: list[float], window: float) -> int:
    """The most start times that fall in one window of ``window`` seconds."""
    starts = sorted(starts)
    most = 0
    for i, first in enumerate(starts):
        most = max(most, sum(1 for t in starts[i:] if t < first + window))
    return most


# A handler starts a little after its claim; the windows checked are this much
# shorter than the period, so the spread of that delay cannot fake a breach.
_SLACK = 0.1


async def test_a_workflow_rate_bounds_the_starts_in_every_window(storage: Storage) -> None:
    starts: list[float] = []
    wf = workflow("mailer", rate="3/500ms").step(
        "send", lambda ctx: starts.append(time.monotonic())
    )
    async with _engine(storage, wf, concurrency=10) as engine:
        began = time.monotonic()
        runs = [await engine.enqueue(wf, n) for n in range(9)]
        for run in runs:
            await engine.result(run.id, timeout=30)
        took = time.monotonic() - began
        record = await storage.get_run(runs[0].id)
    assert len(starts) == 9
    assert _most_in_a_window(starts, 0.5 - _SLACK) <= 3
    assert took >= 1.0  # nine starts at three per half second need two more windows
    assert record is not None
    assert record.rates == (RateLimit(WORKFLOW_LIMIT_PREFIX + "mailer", 3, timedelta(seconds=0.5)),)


async def test_a_rate_per_key_holds_each_key_apart(storage: Storage) -> None:
    starts: dict[str, list[float]] = {"a": [], "b": []}

    def call(ctx: StepContext[dict[str, Any], Any]) -> None:
        starts[ctx.input["partner"]].append(time.monotonic())

    wf = workflow(
        "partner-call", input=dict, concurrency=Limit(key=lambda i: i["partner"], rate="2/400ms")
    ).step("call", call)
    async with _engine(storage, wf, concurrency=10) as engine:
        runs = [await engine.enqueue(wf, {"partner": "ab"[n % 2]}) for n in range(8)]
        for run in runs:
            await engine.result(run.id, timeout=30)
        record = await storage.get_run(runs[0].id)
    for key in "ab":
        assert len(starts[key]) == 4
        assert _most_in_a_window(starts[key], 0.4 - _SLACK) <= 2
    # the keys do not wait for each other: each key's second pair starts one
    # window after its first, not two
    assert max(starts["a"] + starts["b"]) - min(starts["a"] + starts["b"]) < 0.8 + 0.3
    assert record is not None
    assert record.rates == (RateLimit("partner-call:a", 2, timedelta(seconds=0.4)),)
    assert record.limits == ()


async def test_a_run_held_back_by_a_rate_says_why(storage: Storage) -> None:
    wf = workflow("slow-api", rate="1/1h").step("call", lambda ctx: None)
    async with _engine(storage, wf, concurrency=4) as engine:
        first = await engine.enqueue(wf, 1)
        await engine.result(first.id, timeout=10)
        second = await engine.enqueue(wf, 2)
        status = await blocked_status(engine, second.id)
        assert status.status == "pending"
        assert status.blocked_by == RATE_BLOCK_PREFIX + WORKFLOW_LIMIT_PREFIX + "slow-api"
        assert status.hold is not None
        assert "blocked by rate 'reflow:workflow:slow-api' (1/1h)" in status.hold
        assert await engine.cancel(second.id)
        assert (await engine.get_run_status(second.id)).hold is None


async def test_a_burst_with_one_debounce_key_runs_once_with_the_last_input(
    storage: Storage,
) -> None:
    seen: list[Any] = []
    wf = workflow("reindex").step("index", lambda ctx: seen.append(ctx.input))
    async with _engine(storage, wf, concurrency=4) as engine:
        burst = [
            await engine.enqueue(
                wf, {"doc": 7, "version": n}, debounce_key="doc-7", debounce="400ms"
            )
            for n in range(5)
        ]
        other = await engine.enqueue(wf, {"doc": 8}, debounce_key="doc-8", debounce="400ms")
        assert len({run.id for run in burst}) == 1
        assert burst[-1].input == {"doc": 7, "version": 4}
        status = await engine.get_run_status(burst[0].id)
        assert status.status == "delayed"
        assert status.hold is not None
        assert "debounced by key 'doc-7'" in status.hold
        assert await engine.result(burst[0].id, timeout=10) is None
        await engine.result(other.id, timeout=10)
        # once the run has started, the key is free: the next enqueue is a new run
        later = await engine.enqueue(wf, {"doc": 7, "version": 9}, debounce_key="doc-7", debounce=0)
        await engine.result(later.id, timeout=10)
    assert later.id != burst[0].id
    assert sorted(seen, key=str) == sorted(
        [{"doc": 7, "version": 4}, {"doc": 8}, {"doc": 7, "version": 9}], key=str
    )


async def test_each_enqueue_of_a_debounce_key_starts_the_wait_over(storage: Storage) -> None:
    wf = workflow("settle").step("go", lambda ctx: ctx.input)
    async with _engine(storage, wf, concurrency=4) as engine:
        began = time.monotonic()
        run = await engine.enqueue(wf, 0, debounce_key="k", debounce="300ms")
        for n in range(1, 5):
            await asyncio.sleep(0.15)
            again = await engine.enqueue(wf, n, debounce_key="k", debounce="300ms")
            assert again.id == run.id
        result = await engine.result(run.id, timeout=10)
        took = time.monotonic() - began
    assert result == 4
    assert took >= 0.6 + 0.3 - 0.05  # four re-sends 150 ms apart, then a quiet 300 ms


async def test_bad_rate_and_debounce_options_write_nothing(storage: Storage) -> None:
    wf = workflow("w").step("s", lambda ctx: None)
    async with _engine(storage, wf, worker=False) as engine:
        with pytest.raises(ConfigError, match="debounce_key= and debounce= together"):
            await engine.enqueue(wf, 1, debounce_key="k")
        with pytest.raises(ConfigError, match="debounce_key= and debounce= together"):
            await engine.enqueue(wf, 1, debounce="1s")
        with pytest.raises(ConfigError, match="not both"):
            await engine.enqueue(wf, 1, debounce_key="k", debounce="1s", idempotency_key="i")
        with pytest.raises(ConfigError, match="not both"):
            await engine.enqueue(wf, 1, debounce_key="k", debounce="1s", delay="1s")
        with pytest.raises(ConfigError, match="debounce"):
            await engine.enqueue(wf, 1, debounce_key="k", debounce="-1s")
        assert (await engine.list_runs()).runs == []


def test_rates_are_read_from_text() -> None:
    assert parse_rate("100/m") == Rate(100, timedelta(minutes=1))
    assert parse_rate(" 5 / s ") == Rate(5, timedelta(seconds=1))
    assert parse_rate("10/30s") == Rate(10, timedelta(seconds=30))
    assert parse_rate("3/1m30s") == Rate(3, timedelta(seconds=90))
    assert parse_rate("1000/h") == Rate(1000, timedelta(hours=1))
    assert parse_rate("7/d") == Rate(7, timedelta(days=1))
    assert parse_rate("2/250ms") == Rate(2, timedelta(milliseconds=250))
    assert str(Rate(100, timedelta(minutes=1))) == "100/1m"
    for bad, why in [
        ("100", "N/period"),
        ("m/100", "N/period"),
        ("0/s", "must be 1 to 10000"),
        ("10001/s", "shorter period"),
        ("5/8d", "from 1ms to 7d"),
        ("5/0s", "from 1ms"),
        ("5/1.5ms", "whole milliseconds"),
        ("5/fortnight", "period"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_rate(bad)
    with pytest.raises(ConfigError, match="not int"):
        parse_rate(100)


def test_rate_options_are_checked_when_the_workflow_is_defined() -> None:
    with pytest.raises(ConfigError, match="workflow 'w' rate"):
        workflow("w", rate="many")
    with pytest.raises(ConfigError, match="a max, a rate or both"):
        Limit(key=lambda i: i)
    with pytest.raises(ConfigError, match=r"Limit\.rate"):
        Limit(key=lambda i: i, rate="0/s")
    limit = Limit(key=lambda i: i, rate="5/s", name="partner")
    assert (limit.max, limit.rate) == (None, Rate(5, timedelta(seconds=1)))
    wf = workflow("w", rate="100/m", max_running=2, concurrency=limit)
    shape = wf.flow.shape("w", "acme")
    assert shape.limits == (ConcurrencyLimit(WORKFLOW_LIMIT_PREFIX + "w", 2),)
    assert shape.rates == (
        RateLimit(WORKFLOW_LIMIT_PREFIX + "w", 100, timedelta(minutes=1)),
        RateLimit("partner:acme", 5, timedelta(seconds=1)),
    )


@pytest.mark.parametrize("server", ["postgres", "redis"])
async def test_idle_workers_are_woken_when_a_rate_has_room(
    server: str, request: pytest.FixtureRequest
) -> None:
    """With a poll of a minute, runs held back by a rate of one a second
    still start a second apart: the store tells idle workers when the
    window has room, as it does when a sleep ends."""
    url: str = request.getfixturevalue(f"{server}_url")
    wf = workflow("paced", rate="1/1s").step("go", lambda ctx: time.monotonic())
    async with Engine(
        storage=url, workflows=[wf], poll_interval="60s", load_entry_points=False
    ) as engine:
        began = time.monotonic()
        runs = [await engine.enqueue(wf, n) for n in range(3)]
        started = [await engine.result(run.id, timeout=30) - began for run in runs]
    assert started[1] >= 0.9
    assert started[2] >= 1.9
    assert started[2] < 10, started  # woken, not polled
