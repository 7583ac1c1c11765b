"""``create_runs`` on Redis: one ``create_many.lua`` call per batch, checked in
the keys themselves.

The script makes sure no run id of the batch is taken before it writes
anything, creates the runs in order with the same code as ``create_run``,
publishes its wake-up hints once at the end, and leaves a mark of the batch
so that a try again after a lost reply returns the first try's outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from reflow_core import codec
from reflow_core.errors import IdempotencyConflictError, StorageError
from reflow_core.storage import ConcurrencyLimit, CreateResult, NewRun, RateLimit
from reflow_redis import RedisStorage

from . import _redis_harness as h
from ._clocked_store import Clock, open_store


def _new(wf: str, value: object, **options: Any) -> NewRun:
    return NewRun(wf, codec.encode(value), **options)


def _dump(raw: redis.Redis, tag: str) -> dict[str, object]:
    """Every key under ``tag`` (but batch marks) with its type and contents,
    named without the tag."""
    out: dict[str, object] = {}
    for name in raw.scan_iter(match=f"{tag}:*", count=1000):
        key = name.decode()
        short = key[len(tag) :]
        if short.startswith(":batch:"):
            continue
        kind = raw.type(key).decode()
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
        out[short] = (kind, value)
    return out


def _marks(raw: redis.Redis, tag: str) -> list[bytes]:
    return list(raw.scan_iter(match=f"{tag}:batch:*"))


def _mixed(wf: str, other: str) -> list[NewRun]:
    """A batch with every kind of item, ids chosen by the caller."""
    limit = (ConcurrencyLimit("acct", 2),)
    rate = (RateLimit("api", 5, timedelta(seconds=10)),)
    return [
        _new(wf, 0, run_id="plain"),
        _new(wf, 1, run_id="keyed", idempotency_key="k1"),
        _new(wf, 1, run_id="keyed-again", idempotency_key="k1"),  # a hit on the item before
        _new(wf, 2, run_id="keyed-other", idempotency_key="k1"),  # a conflict with it
        _new(wf, "old", run_id="hit-old", idempotency_key="old"),  # a hit on a run made before
        _new(wf, 4, run_id="clash-old", idempotency_key="old"),  # a conflict with it
        _new(wf, 5, run_id="late", delay=timedelta(seconds=30)),
        _new(wf, 6, run_id="capped", delay=timedelta(hours=1), deadline=timedelta(minutes=5)),
        _new(wf, 7, run_id="urgent", priority=5, limits=limit),
        _new(wf, 8, run_id="slow", priority=-3, rates=rate, headers={"traceparent": "t1"}),
        _new(wf, 9, run_id="db1", debounce_key="d", delay=timedelta(seconds=5)),
        _new(wf, 10, run_id="db2", debounce_key="d", priority=2, headers={"baggage": "b=1"}),
        _new(wf, 11, run_id="db3", debounce_key="d", limits=limit),
        _new(wf, 12, run_id="db-old", debounce_key="open"),  # updates a run made before
        _new(other, 13, run_id="elsewhere", idempotency_key="k1"),  # another workflow's key
        _new(other, 14, run_id="elsewhere-late", delay=timedelta(seconds=2)),
        _new(wf, 15, run_id="last", headers={"traceparent": "t2"}),
    ]


def _same(a: CreateResult | IdempotencyConflictError, b: object) -> bool:
    if isinstance(a, IdempotencyConflictError):
        return isinstance(b, IdempotencyConflictError) and str(a) == str(b)
    return a == b


async def test_a_batch_leaves_the_keys_sequential_creates_leave(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    """Every index (due sets of each priority, P:prios, P:parked, P:idx,
    P:idx:wf, P:idem, P:bykey, P:debounce, P:workflows) and every run hash is
    exactly what the same creates made one by one leave, and each item's
    outcome is the one create_run gives it."""
    clock = Clock(datetime(2030, 5, 1, 12, 0, tzinfo=UTC))
    seq_url = redis_url.replace(f"prefix={prefix}", f"prefix={prefix}.seq")
    outcomes: dict[str, list[object]] = {}
    for url, batched in ((redis_url, True), (seq_url, False)):
        async with open_store(url, clock) as store:
            await store.create_run(_new("wf", "old", run_id="before", idempotency_key="old"))
            await store.create_run(_new("wf", "open", run_id="opened", debounce_key="open"))
            items = _mixed("wf", "other")
            if batched:
                got: list[object] = list(await store.create_runs(items))
            else:
                got = []
                for item in items:
                    try:
                        got.append(await store.create_run(item))
                    except IdempotencyConflictError as exc:
                        got.append(exc)
            outcomes[url] = got
    batch, one_by_one = outcomes[redis_url], outcomes[seq_url]
    for n, (a, b) in enumerate(zip(one_by_one, batch, strict=True)):
        assert isinstance(a, CreateResult | IdempotencyConflictError)
        assert _same(a, b), f"item {n}: create_run gave {a!r}, create_runs {b!r}"
    assert [type(o).__name__ for o in batch].count("IdempotencyConflictError") == 2
    tag = "{" + prefix + "}"
    assert _dump(raw, tag) == _dump(raw, "{" + prefix + ".seq}")
    assert len(_marks(raw, tag)) == 1


async def test_a_taken_run_id_writes_nothing_of_the_batch(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    async with open_store(redis_url) as store:
        await store.create_run(_new("wf", "there", run_id="taken"))
        await store.create_run(_new("wf", "open", run_id="opened", debounce_key="open"))
        before = _dump(raw, tag)
        pubsub = raw.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(store.channel)
        try:
            for where in (29, 0, 14):
                items = _mixed("wf", "other") + [_new("wf", n, run_id=f"x{n}") for n in range(13)]
                items[where] = _new("wf", "again", run_id="taken")
                with pytest.raises(StorageError, match=f"item {where}: run id 'taken'"):
                    await store.create_runs(items)
                assert _dump(raw, tag) == before
                assert _marks(raw, tag) == []
            assert pubsub.get_message(timeout=0.2) is None  # no hint either
        finally:
            pubsub.close()
        # The same batch with a free id is written whole.
        items = _mixed("wf", "other")
        made = await store.create_runs(items)
        assert len(made) == len(items)
        assert await store.get_run("last") is not None


async def test_hints_go_out_once_per_batch(redis_url: str, raw: redis.Redis) -> None:
    """One hint per workflow with a run due now and one for the soonest of
    its later ones, however many runs the batch makes."""
    async with open_store(redis_url) as store:
        pubsub = raw.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(store.channel)
        try:
            assert pubsub.get_message(timeout=1) is None  # the subscription is set
            await store.create_runs([_new("a", n) for n in range(500)])
            items = [_new("a", n) for n in range(200)]
            items += [_new("a", n, delay=timedelta(seconds=5 + n)) for n in range(100)]
            items += [_new("b", n, delay=timedelta(seconds=2)) for n in range(50)]
            items += [_new("b", n) for n in range(10)]
            await store.create_runs(items)
            # Idempotent hits make nothing due: no hint.
            await store.create_runs([_new("c", 1, idempotency_key="k")])
            await store.create_runs([_new("c", 1, idempotency_key="k") for _ in range(3)])
            hints = []
            while (message := pubsub.get_message(timeout=0.5)) is not None:
                hints.append(message["data"].decode())
        finally:
            pubsub.close()
    assert hints == ["0|a", "0|a", "5000|a", "0|b", "2000|b", "0|c"]


async def test_inputs_with_nul_or_any_text_round_trip(redis_url: str) -> None:
    """Inputs travel NUL-joined in one argument, or one argument each when
    one of them holds a NUL; either way every byte comes back."""
    plain = ['"café ☕"', '"😀"', "", '{"a": [1, 2]}', "x" * 70_000]
    odd = ["a\x00b", "\x00", "", '"é\x00😀"']
    async with open_store(redis_url) as store:
        for inputs in (plain, odd + plain, ["\x00"]):
            made = await store.create_runs([NewRun("wf", text) for text in inputs])
            for text, outcome in zip(inputs, made, strict=True):
                assert isinstance(outcome, CreateResult)
                assert outcome.created
                assert outcome.run.input == text
                stored = await store.get_run(outcome.run.id)
                assert stored is not None
                assert stored == outcome.run


async def test_one_script_call_per_batch(tmp_path: Path) -> None:
    """Counted on a redis-server of the test's own: a batch of 500 runs is
    one EVALSHA, one HSET per run and one PUBLISH."""
    server = h.RedisServer(h.need_redis_server(), tmp_path, "--save", "", "--appendonly", "no")
    server.start()
    try:
        store = RedisStorage.from_url(f"{server.url}?prefix=count")
        await store.initialize()
        try:
            with server.client() as probe:

                def calls() -> dict[str, int]:
                    stats = probe.info("commandstats")
                    return {name[8:]: int(v["calls"]) for name, v in stats.items()}

                for size in (500, 1000, 1):
                    before = calls()
                    made = await store.create_runs([_new("wf", n) for n in range(size)])
                    after = calls()
                    assert len(made) == size
                    assert all(isinstance(m, CreateResult) and m.created for m in made)
                    delta = {k: n - before.get(k, 0) for k, n in after.items()}
                    delta = {k: n for k, n in delta.items() if n and k != "info"}
                    assert delta.pop("evalsha") == 1
                    assert delta.pop("hset") == size
                    assert delta.pop("publish") == 1
                    # The rest is bounded per batch, not per run: one EXISTS
                    # over every id, one ZADD per index, the mark looked up and left.
                    rest = {"time": 1, "get": 1, "exists": 1, "zadd": 3, "sadd": 1, "set": 1}
                    assert delta == rest
        finally:
            await store.close()
    finally:
        server.stop()


class _ReplyDropper:
    """A TCP proxy in front of Redis that, once armed, closes the client's
    connection instead of handing on the reply to its next ``EVALSHA``: the
    script runs, the client never hears of it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.armed = False
        self.dropped = 0
        self.scripts = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield int(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        state = {"script": False}

        async def upstream() -> None:
            while data := await reader.read(1 << 16):
                if b"$7\r\nEVALSHA\r\n" in data:
                    self.scripts += 1
                    state["script"] = True
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(1 << 16):
                if self.armed and state["script"]:
                    self.armed = False
                    self.dropped += 1
                    break
                writer.write(data)
                await writer.drain()
            writer.close()
            up_writer.close()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        self._tasks.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        writer.close()
        up_writer.close()


async def test_a_try_again_after_a_lost_reply_returns_the_first_outcomes(
    redis_url: str, prefix: str, tag: str, raw: redis.Redis
) -> None:
    """The connection drops after the script ran: the storage tries again on
    another connection, and the batch's mark answers with the outcomes of
    the first try, writing nothing more."""
    target = urlsplit(redis_url)
    dropper = _ReplyDropper(target.hostname or "127.0.0.1", target.port or 6379)
    async with dropper.running() as port:
        url = f"redis://127.0.0.1:{port}/0?prefix={prefix}"
        async with open_store(url) as store:
            first = await store.create_run(_new("wf", "old", idempotency_key="old"))
            items = [_new("wf", n) for n in range(20)]
            items += [
                _new("wf", "k", idempotency_key="k"),
                _new("wf", "k", idempotency_key="k"),
                _new("wf", "other", idempotency_key="k"),
                _new("wf", "old", idempotency_key="old"),
                _new("wf", "d1", debounce_key="d"),
                _new("wf", "d2", debounce_key="d"),
                _new("wf", "mine", run_id="chosen"),
            ]
            scripts = dropper.scripts
            dropper.armed = True
            made = await store.create_runs(items)
            assert dropper.dropped == 1
            assert dropper.scripts == scripts + 2  # the lost try, and the one that answered
            runs = (await store.list_runs(workflow="wf", limit=100)).runs
    assert len(runs) == 20 + 1 + 1 + 1 + 1  # the plain ones, k, old, d and chosen
    created = [isinstance(m, CreateResult) and m.created for m in made]
    assert created == [True] * 21 + [False, False, False, True, False, True]
    keyed = made[20]
    assert isinstance(keyed, CreateResult)
    assert isinstance(made[21], CreateResult)
    assert made[21].run == keyed.run
    assert isinstance(made[22], IdempotencyConflictError)
    assert isinstance(made[23], CreateResult)
    assert made[23].run == first.run
    debounced = made[25]
    assert isinstance(debounced, CreateResult)
    assert debounced.run.input == codec.encode("d2")
    for outcome in made:
        if isinstance(outcome, CreateResult):
            assert outcome.run in runs or outcome.run.id == debounced.run.id
    assert len(_marks(raw, tag)) == 1
    mark = _marks(raw, tag)[0]
    assert 0 < raw.pttl(mark) <= 60_000


async def test_a_group_of_concurrent_creates_keeps_each_outcome(
    redis_url: str, tag: str, raw: redis.Redis
) -> None:
    """create_run's group commit goes through the same script without a
    token: a taken id fails only its own create, and nothing is marked."""
    async with open_store(redis_url) as store:
        await store.create_run(_new("wf", "there", run_id="taken"))
        outcomes = await asyncio.gather(
            *(store.create_run(_new("wf", n)) for n in range(10)),
            store.create_run(_new("wf", "again", run_id="taken")),
            store.create_run(_new("wf", "k", idempotency_key="k", priority=3)),
            store.create_run(_new("wf", "k", idempotency_key="k")),
            store.create_run(_new("wf", "late", delay=timedelta(seconds=9))),
            return_exceptions=True,
        )
    assert all(isinstance(o, CreateResult) and o.created for o in outcomes[:10])
    assert isinstance(outcomes[10], StorageError)
    keyed, again, late = outcomes[11], outcomes[12], outcomes[13]
    assert isinstance(keyed, CreateResult)
    assert isinstance(again, CreateResult)
    assert again.run == keyed.run
    assert keyed.created != again.created
    assert isinstance(late, CreateResult)
    assert late.run.status == "delayed"
    assert raw.zscore(f"{tag}:pdue:3:wf", keyed.run.id) is not None
    assert raw.zscore(f"{tag}:prios:wf", "3") == 3
    assert raw.zscore(f"{tag}:parked:wf", late.run.id) == 3
    assert raw.zcard(f"{tag}:idx") == 13
    assert _marks(raw, tag) == []
