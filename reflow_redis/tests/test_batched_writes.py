"""Step saves, finishes and claims of many runs on Redis, checked in the keys.

Concurrent ``save_step_result`` and ``finish_run`` calls share one script
call (a group commit), their fields joined by NUL characters into one
argument, or one argument each when a field holds a NUL. Each item is
fenced on its own and leaves exactly the keys the same call made alone
leaves. A claim answers with each run and its steps as one NUL-joined
string, or as the hashes themselves when a value holds a NUL.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
import redis

from reflow_core.errors import StorageError
from reflow_core.storage import ConcurrencyLimit, Lease, NewRun, StepRecord
from reflow_redis import RedisStorage
from reflow_redis._records import _joined, _step_args, _step_body

from ._clocked_store import Clock, open_store

LEASE = timedelta(seconds=60)
T0 = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)

ODD_TEXTS = [
    "",
    "a\x00b",
    "\x00",
    "\x00\x00",
    '"caf\u00e9 \u2615"',
    "\U0001f600",
    "\\u0000",
    '{"a": [1, 2], "b": "\\n"}',
    "x" * 70_000,
    "|pipes|in|text|",
    "\x01\x1f\x7f",
]
"""Texts a naive separator scheme would break: NULs, escapes of NUL, the
separators of the stored step value, non-ASCII and a long one."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dump(raw: redis.Redis, tag: str) -> dict[str, object]:
    """Every key under ``tag`` (but ``create_runs``'s batch marks, named by a
    random token) with its type and contents, named without the tag."""
    out: dict[str, object] = {}
    for name in raw.scan_iter(match=f"{tag}:*", count=1000):
        key = _text(name)
        if key.startswith(f"{tag}:batch:"):
            continue
        kind = _text(raw.type(key))
        value: object
        if kind == "hash":
            value = raw.hgetall(key)
        elif kind == "zset":
            value = raw.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(raw.smembers(key))
        elif kind == "list":
            value = raw.lrange(key, 0, -1)
        else:
            value = raw.get(key)
        out[key[len(tag) :]] = (kind, value)
    return out


async def _both_ways(
    redis_url: str,
    prefix: str,
    raw: redis.Redis,
    scenario: Callable[[RedisStorage, Clock, bool], Awaitable[list[object]]],
) -> list[object]:
    """Run ``scenario`` on the test's prefix with its calls concurrent
    (``batched``) and on a second prefix one call at a time, on a clock
    standing still at the same times; check that both leave the same
    outcomes, the same keys and the same wake-up hints, in order. Returns
    the outcomes."""
    seq_url = redis_url.replace(f"prefix={prefix}", f"prefix={prefix}.seq")
    outcomes: list[list[object]] = []
    hints: list[list[bytes]] = []
    for url, batched in ((redis_url, True), (seq_url, False)):
        clock = Clock(T0)
        async with open_store(url, clock) as store:
            pubsub = raw.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(store.channel)
            try:
                assert pubsub.get_message(timeout=1) is None  # the subscription is set
                outcomes.append(await scenario(store, clock, batched))
                heard = []
                while (message := pubsub.get_message(timeout=0.3)) is not None:
                    heard.append(message["data"])
                hints.append(heard)
            finally:
                pubsub.close()
    assert outcomes[0] == outcomes[1]
    assert hints[0] == hints[1]
    assert _dump(raw, "{" + prefix + "}") == _dump(raw, "{" + prefix + ".seq}")
    return outcomes[0]


async def _calls(batched: bool, calls: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Make ``calls`` concurrently (one group commit) or one after another."""
    if batched:
        return list(await asyncio.gather(*(call() for call in calls)))
    return [await call() for call in calls]


async def test_a_batch_of_saves_leaves_what_saves_one_by_one_leave(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    """Saves of many runs in one script call, each fenced on its own (a run
    handed back, a stale epoch, a lapsed lease, a run that does not exist and
    a lease naming a run id with a NUL are refused, the rest saved), steps
    upserted in order, every output and error kept byte for byte."""
    wake = T0 + timedelta(hours=1)
    saves = [
        ("r0", StepRecord("s1", "completed", output='{"i":0}')),
        ("r1", StepRecord("s1", "failed", error="boom", attempts=3)),
        ("r2", StepRecord("nap", "sleeping", attempts=1, wake_at=wake)),
        ("r3", StepRecord("s1", "skipped")),
        ("r0", StepRecord("s2", "completed", output='"second"')),
        ("r0", StepRecord("s1", "completed", output='"upserted"', attempts=2)),
    ]
    saves += [
        (f"r{4 + i % 4}", StepRecord(f"odd{i}", "completed", output=text, error=text))
        for i, text in enumerate(ODD_TEXTS)
    ]

    async def scenario(store: RedisStorage, clock: Clock, batched: bool) -> list[object]:
        news = [NewRun("wf", json.dumps(i), run_id=f"r{i}") for i in range(10)]
        news.append(NewRun("short", "0", run_id="lapsed"))
        await store.create_runs(news)
        short = await store.claim_runs(["short"], 10, timedelta(seconds=1))
        claimed = await store.claim_runs(["wf"], 100, LEASE)
        leases = {c.run.id: c.lease for c in claimed + short}
        assert await store.update_run_status("r9", "pending", lease=leases["r9"])
        clock.now = T0 + timedelta(seconds=2)  # the short lease lapsed
        plan = [(leases[run_id], step) for run_id, step in saves]
        plan += [
            (leases["r9"], StepRecord("s1", "completed")),  # handed back
            (Lease("r8", leases["r8"].epoch + 1), StepRecord("s1", "completed")),
            (leases["lapsed"], StepRecord("s1", "completed")),
            (Lease("nobody", 1), StepRecord("s1", "completed")),
            (Lease("a\x00b", 1), StepRecord("s1", "completed")),  # sent one field each
            (leases["r8"], StepRecord("s1", "completed", output="null")),
        ]
        before = store._saves.batches
        results = await _calls(
            batched,
            [partial(store.save_step_result, lease, step, LEASE) for lease, step in plan],
        )
        if batched:
            assert store._saves.batches - before < len(plan) / 4
        stored = {run_id: await store.get_step_results(run_id) for run_id in leases}
        runs = {run_id: await store.get_run(run_id) for run_id in leases}
        return [results, stored, runs]

    results, stored, runs = await _both_ways(redis_url, prefix, raw, scenario)
    assert results == [True] * len(saves) + [False, False, False, False, False, True]
    assert isinstance(stored, dict)
    assert isinstance(runs, dict)
    assert list(stored["r0"]) == ["s1", "s2"]  # first saved first, upserted in place
    assert stored["r0"]["s1"].output == '"upserted"'
    assert stored["r0"]["s1"].attempts == 2
    assert stored["r2"]["nap"].wake_at == wake
    for i, text in enumerate(ODD_TEXTS):
        step = stored[f"r{4 + i % 4}"][f"odd{i}"]
        assert (step.output, step.error, step.status) == (text, text, "completed")
        assert step.completed_at == T0 + timedelta(seconds=2)
    assert stored["r9"] == {}
    assert stored["lapsed"] == {}
    # Each save renewed its own lease from the clock's time then.
    renewed = T0 + timedelta(seconds=2) + LEASE
    assert {run_id for run_id, run in runs.items() if run.lease_expires_at == renewed} == {
        f"r{i}" for i in range(9)
    }


async def test_a_batch_of_finishes_leaves_what_finishes_one_by_one_leave(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    """Finishes of many runs in one script call: each fenced on its own (a
    lapsed lease, a stale epoch, a second finish of a run in the same batch
    refused), its last step written, a limit's blocked run unblocked with its
    hint, the done indexes kept; outputs and errors holding NULs are sent one
    argument each and come back whole."""

    async def scenario(store: RedisStorage, clock: Clock, batched: bool) -> list[object]:
        limit = (ConcurrencyLimit("acct", 1),)
        news = [NewRun("wf", json.dumps(i), run_id=f"r{i}") for i in range(8)]
        news += [NewRun("lim", "1", run_id="L1", limits=limit)]
        news += [NewRun("lim", "2", run_id="L2", limits=limit)]
        news += [NewRun("short", "0", run_id="lapsed")]
        await store.create_runs(news)
        short = await store.claim_runs(["short"], 10, timedelta(seconds=1))
        claimed = await store.claim_runs(["wf", "lim"], 100, LEASE)
        leases = {c.run.id: c.lease for c in claimed + short}
        assert "L2" not in leases  # blocked by L1
        clock.now = T0 + timedelta(seconds=2)
        step = StepRecord("last", "completed", output='{"k":"v"}')

        def finish(lease: Lease, status: Any, **kwargs: Any) -> Callable[[], Awaitable[bool]]:
            return lambda: store.finish_run(lease, status, **kwargs)

        plain = [
            finish(leases["r0"], "completed", output='{"x":1}', step=step),
            finish(leases["r1"], "failed", error="boom"),
            finish(leases["r2"], "completed", output="null"),
            finish(leases["L1"], "completed", output='"done"', step=step),
            finish(leases["lapsed"], "completed", output='"late"'),
            finish(Lease("r3", leases["r3"].epoch + 1), "completed", output="1"),
            finish(leases["r3"], "failed", error="first", step=StepRecord("x", "failed")),
            finish(leases["r3"], "completed", output='"second"'),
        ]
        with_nul = [
            finish(leases["r4"], "completed", output="x\x00y"),
            finish(leases["r5"], "failed", error="e\x00rr", step=StepRecord("s", "failed")),
            finish(leases["r6"], "completed", output=ODD_TEXTS[8], step=step),
            finish(leases["r7"], "failed", error="".join(ODD_TEXTS)),
        ]
        before = store._finishes.batches
        results = [await _calls(batched, plain), await _calls(batched, with_nul)]
        if batched:
            assert store._finishes.batches - before <= 4
        after = await store.claim_runs(["lim"], 10, LEASE)  # L2, unblocked
        runs = {run_id: await store.get_run(run_id) for run_id in [*leases, "L2"]}
        steps = {run_id: await store.get_step_results(run_id) for run_id in leases}
        return [results, [c.run.id for c in after], runs, steps]

    results, after, runs, steps = await _both_ways(redis_url, prefix, raw, scenario)
    assert results == [
        [True, True, True, True, False, False, True, False],
        [True, True, True, True],
    ]
    assert after == ["L2"]
    assert isinstance(runs, dict)
    assert isinstance(steps, dict)
    outcomes = {
        run_id: (run.status, run.output, run.error)
        for run_id, run in runs.items()
        if run.status != "running"
    }
    assert outcomes == {
        "r0": ("completed", '{"x":1}', None),
        "r1": ("failed", None, "boom"),
        "r2": ("completed", "null", None),
        "r3": ("failed", None, "first"),
        "r4": ("completed", "x\x00y", None),
        "r5": ("failed", None, "e\x00rr"),
        "r6": ("completed", ODD_TEXTS[8], None),
        "r7": ("failed", None, "".join(ODD_TEXTS)),
        "L1": ("completed", '"done"', None),
    }
    assert runs["lapsed"].status == "running"  # refused: its lease lapsed
    assert list(steps["r0"]) == ["last"]
    assert list(steps["r3"]) == ["x"]
    assert steps["r1"] == {}
    assert steps["lapsed"] == {}
    tag = "{" + prefix + "}"
    done = {
        status: sorted(_text(m) for m in raw.zrange(f"{tag}:done:{status}", 0, -1))
        for status in ("completed", "failed")
    }
    assert done == {"completed": ["L1", "r0", "r2", "r4", "r6"], "failed": ["r1", "r3", "r5", "r7"]}
    assert raw.smembers(f"{tag}:holders:acct") == {b"L2"}


async def test_a_claim_reads_runs_and_steps_whatever_their_text(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    """A claim hands out each run and its saved steps as they are stored,
    in one reply with runs read from a NUL-joined string and runs whose
    input holds a NUL read from the hashes."""
    clock = Clock(T0)
    async with open_store(redis_url, clock) as store:
        inputs = [json.dumps(i) for i in range(5)] + [t for t in ODD_TEXTS if t]
        news = [NewRun("wf", text, run_id=f"r{i:02d}") for i, text in enumerate(inputs)]
        news[3] = NewRun("wf", "3", run_id="r03", idempotency_key="k", headers={"h": "v"})
        await store.create_runs(news)
        first = await store.claim_runs(["wf"], 100, timedelta(seconds=1))
        assert [c.run.input for c in first] == [new.input for new in news]
        assert not any(c.reclaimed for c in first)
        assert all(c.steps == {} for c in first)
        for c in first:
            for n, text in enumerate(ODD_TEXTS):
                step = StepRecord(f"s{n}", "completed", output=text, error=text or None)
                assert await store.save_step_result(c.lease, step, timedelta(seconds=1))
        clock.now = T0 + timedelta(seconds=5)  # every lease lapsed
        again = await store.claim_runs(["wf"], 100, LEASE)
        assert sorted(c.run.id for c in again) == [c.run.id for c in first]
        for c in again:
            assert c.reclaimed
            assert c.lease == Lease(c.run.id, 2)
            assert c.run == await store.get_run(c.run.id)
            assert c.steps == await store.get_step_results(c.run.id)
            assert [(s.output, s.error) for s in c.steps.values()] == [
                (t, t or None) for t in ODD_TEXTS
            ]
        keyed = next(c.run for c in again if c.run.id == "r03")
        assert keyed.headers == {"h": "v"}
        assert keyed.idempotency_key == "k"


def test_a_step_body_is_what_json_dumps_writes() -> None:
    values: list[Any] = [None, *ODD_TEXTS, "\ud800", "\udfff x", "\u2028", "'\"\\/"]
    for output in values:
        for error in (None, "e\x00", "\U0001f600"):
            for attempts in (0, 1, 12345678901234567890, -1):
                step = StepRecord("s", "completed", output=output, error=error, attempts=attempts)
                expected = json.dumps([output, error, attempts], separators=(",", ":"))
                assert _step_body(step) == expected
                assert "\x00" not in expected
    # Anything else is left to json.dumps, as before.
    odd = StepRecord("s", "completed", attempts=True)
    assert _step_body(odd) == "[null,null,true]"


def test_batch_fields_travel_joined_unless_one_holds_a_nul() -> None:
    items = [["r1", "1", "60000000", *_step_args(StepRecord("a", "completed", output="x"))]]
    items.append(["r2", "2", "60000000", "b", "failed", "", "[null,null,1]"])
    assert _joined(items, 7) == ["\x00".join(items[0] + items[1])]
    nul = [*items, ["r\x00", "3", "1", "c", "completed", "", "[null,null,1]"]]
    assert _joined(nul, 7) == [field for item in nul for field in item]
    not_text = [[*items[0][:1], 5, *items[0][2:]]]
    assert _joined(not_text, 7) == not_text[0]
    # A batch whose joined fields happen to count right is still one argument.
    assert _joined([["", ""]], 2) == ["\x00"]


@pytest.mark.parametrize(
    ("script", "fields"),
    [
        ("save_steps", ["2", "r\x00" + "1\x00" * 5]),  # 7 fields announced twice over
        ("save_steps", ["1", "a", "b"]),  # neither joined nor one each
        ("finish", ["1", "\x00".join(["x"] * 11)]),
    ],
)
async def test_a_batch_without_the_fields_it_announces_is_an_error(
    redis_url: str, script: str, fields: list[str]
) -> None:
    async with open_store(redis_url) as store:
        with pytest.raises(StorageError, match="a batch without the fields it announces"):
            await store._call("save_step_result", script, fields)
