"""The Redis backend's own behaviour: URLs, secrets, keys, leases, scripts, wake-ups, retention."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from reflow_core import ConfigError, Engine, StorageError, codec, open_storage, workflow
from reflow_core.storage import NewRun, StepRecord
from reflow_redis import RedisStorage, parse_redis_url

LEASE = timedelta(seconds=30)


def test_the_three_schemes_open_the_redis_backend() -> None:
    for url in ("redis://h:6379/0", "rediss://h/0", "unix:///run/redis.sock?db=2"):
        store = open_storage(url)
        assert isinstance(store, RedisStorage)
        assert store.prefix == "reflow"
        assert store.channel == "{reflow}:wake"


def test_reflow_options_are_taken_out_and_the_rest_goes_to_redis_py() -> None:
    target, options, safe = parse_redis_url(
        "redis://:pw@h:6380/2?prefix=billing&socket_timeout=3&retention=7d&client_name=w1"
    )
    assert options == {"prefix": "billing", "socket_timeout": "3", "retention": "7d"}
    assert target == "redis://:pw@h:6380/2?client_name=w1"
    assert "pw" not in safe


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("redis://h/0?prefix=a{b}", "prefix"),
        ("redis://h/0?prefix=", "prefix"),
        ("redis://h/0?max_connections=0", "max_connections"),
        ("redis://h/0?retention=soon", "retention"),
        ("redis://h/0?notify=maybe", "notify"),
        ("redis://h/0?prefix=a&prefix=b", "prefix"),
        ("postgresql://h/db", "url"),
    ],
)
def test_bad_options_are_refused_naming_the_option(url: str, option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RedisStorage.from_url(url)
    assert caught.value.option == option


@pytest.mark.parametrize(
    ("url", "options", "option", "suggested"),
    [
        ("redis://127.0.0.1/7?prefx=oops", {}, "prefx", "prefix"),
        ("redis://127.0.0.1/7?max_conections=5", {}, "max_conections", "max_connections"),
        ("redis://127.0.0.1/7?client_nam=w1", {}, "client_nam", "client_name"),
        ("redis://127.0.0.1/7", {"prefx": "oops"}, "prefx", "prefix"),
        ("redis://127.0.0.1/7", {"retension": "7d"}, "retension", "retention"),
    ],
)
def test_an_unknown_option_is_refused_at_open_storage_with_a_suggestion(
    url: str, options: dict[str, Any], option: str, suggested: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage(url, **options)
    message = str(caught.value)
    assert caught.value.option == option
    assert "did you mean" in message
    assert repr(suggested) in message.split("?)", 1)[0]
    assert "known options: prefix, max_connections, pool_timeout" in message


def test_an_unknown_url_option_lists_what_goes_to_redis_py() -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage("redis://:Sup3rSecret@127.0.0.1/7?prefx=oops")
    message = str(caught.value)
    assert "unknown redis option 'prefx' in the URL (did you mean 'prefix'?)" in message
    assert "passed on to redis-py: db, username, password, client_name" in message
    assert "Sup3rSecret" not in message


@pytest.mark.parametrize("option", ["timeout", "decode_responses", "retry_on_error"])
def test_redis_py_options_that_would_change_the_storage_are_refused(option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage(f"redis://127.0.0.1/7?{option}=1")
    assert caught.value.option == option


def test_an_option_of_the_storage_in_a_direct_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="prefix is an option of the storage"):
        RedisStorage("redis://127.0.0.1/7?prefix=x")


def test_a_redis_py_option_as_a_keyword_says_where_it_goes() -> None:
    with pytest.raises(ConfigError, match="client_name is redis-py's: give it in the URL"):
        open_storage("redis://127.0.0.1/7", client_name="w1")


async def test_redis_py_options_in_the_url_still_work(redis_url: str, raw: redis.Redis) -> None:
    name = f"reflow-h4-{time.monotonic_ns()}"
    store = open_storage(f"{redis_url}&client_name={name}&health_check_interval=30")
    await store.initialize()
    try:
        clients = raw.client_list()
        assert any(client.get("name") == name for client in clients)
    finally:
        await store.close()


async def test_connection_refused_fails_fast_naming_the_server() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    store = open_storage(f"redis://:Sup3rSecret@127.0.0.1:{port}/3")
    started = time.perf_counter()
    with pytest.raises(StorageError) as caught:
        await store.initialize()
    took = time.perf_counter() - started
    await store.close()
    assert took < 5
    message = str(caught.value)
    assert message.startswith(f"cannot connect to Redis at 127.0.0.1:{port} (")
    assert "server is running" in message
    assert "Sup3rSecret" not in message


async def test_a_database_the_server_lacks_is_named(redis_url: str) -> None:
    if "/0?" not in redis_url:
        pytest.skip("the test server's URL names no database 0")
    url = redis_url.replace("/0?", "/999?", 1)
    store = open_storage(url)
    with pytest.raises(StorageError) as caught:
        await store.initialize()
    await store.close()
    assert "has no database 999" in str(caught.value)


async def test_credentials_the_server_refuses_are_named(redis_url: str) -> None:
    if "@" in redis_url.split("?", 1)[0]:
        pytest.skip("the test server's URL has credentials of its own")
    url = redis_url.replace("redis://", "redis://reflow_no_such_user:Sup3rSecret@", 1)
    store = open_storage(url)
    with pytest.raises(StorageError) as caught:
        await store.initialize()
    await store.close()
    assert "refused the credentials" in str(caught.value)
    assert "Sup3rSecret" not in str(caught.value)


async def test_password_never_shows_in_repr_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = open_storage("redis://user:Sup3rSecret@127.0.0.1:1/0?pool_timeout=1")
    assert "Sup3rSecret" not in repr(store)
    with pytest.raises(StorageError) as caught:
        await store.initialize()  # nothing listens on port 1
    await store.close()
    for text in (str(caught.value), repr(caught.value), caplog.text):
        assert "Sup3rSecret" not in text


async def test_every_key_carries_the_prefix_hash_tag(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    wf = (
        workflow("tagged")
        .step("a", lambda ctx: 1)
        .wait_for_event("go", timeout="1h")
        .step("b", lambda ctx: 2)
    )
    async with Engine(storage=redis_url, workflows=[wf], poll_interval="50ms") as engine:
        run = await engine.enqueue(wf, None, idempotency_key="k")
        for _ in range(200):
            if (await engine.get_run_status(run.id)).status == "waiting":
                break
            await asyncio.sleep(0.01)
        await engine.send_event(run.id, "go", {"ok": 1}, event_id="e1")
        assert await engine.result(run.id, timeout=10) == 2
    keys = [k.decode() for k in raw.scan_iter(match=f"*{prefix}*")]
    assert keys
    assert all(k.startswith("{" + prefix + "}:") for k in keys), keys


async def test_a_claim_sets_a_lease_key_that_expires_on_the_server(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    created = await store.create_run(NewRun("wf", "1"))
    [claimed] = await store.claim_runs(["wf"], 1, timedelta(milliseconds=300))
    key = "{" + prefix + "}:lease:" + created.run.id
    assert raw.get(key) == str(claimed.lease.epoch).encode()
    assert 0 < raw.pttl(key) <= 300
    await asyncio.sleep(0.4)
    assert raw.exists(key) == 0  # gone by Redis's own clock
    assert not await store.heartbeat_run(claimed.lease, LEASE)
    [again] = await store.claim_runs(["wf"], 1, LEASE)
    assert again.reclaimed
    assert again.lease.epoch == claimed.lease.epoch + 1
    await store.close()


async def test_scripts_are_reloaded_after_a_script_flush(redis_url: str, raw: redis.Redis) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    raw.script_flush()
    created = await store.create_run(NewRun("wf", "1"))
    assert created.created
    [claimed] = await store.claim_runs(["wf"], 1, LEASE)
    raw.script_flush()
    assert await store.save_step_result(claimed.lease, StepRecord("a", "completed", "1"), LEASE)
    await store.close()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("run:{id}", {"st": "bogus"}),
        ("run:{id}", {"st": "pending"}),
        ("steps:{id}", {"a": "not a step"}),
        ("steps:{id}", {"a": "1|2|completed||{not json"}),
    ],
)
async def test_foreign_data_under_the_prefix_is_a_storage_error(
    redis_url: str, prefix: str, raw: redis.Redis, key: str, value: dict[str, str]
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    run_id = "foreign"
    raw.hset("{" + prefix + "}:" + key.format(id=run_id), mapping=value)
    read = store.get_run if key.startswith("run") else store.get_step_results
    with pytest.raises(StorageError, match="unexpected data") as caught:
        await read(run_id)
    assert caught.value.backend == "redis"
    await store.close()


async def test_a_wrong_type_under_the_prefix_is_a_storage_error(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    raw.set("{" + prefix + "}:due:wf", "a string, not a sorted set")
    with pytest.raises(StorageError):
        await store.claim_runs(["wf"], 5, LEASE)
    await store.close()


async def test_an_enqueue_elsewhere_wakes_an_idle_worker(redis_url: str) -> None:
    started: dict[str, float] = {}

    async def first(ctx: Any) -> None:
        started.setdefault(ctx.run_id, time.monotonic())

    wf = workflow("wake").step("first", first)
    async with (
        Engine(storage=redis_url, workflows=[wf], poll_interval="30s"),
        Engine(storage=redis_url, workflows=[wf], worker=False) as producer,
    ):
        await asyncio.sleep(0.3)
        for _ in range(5):
            sent = time.monotonic()
            run = await producer.enqueue(wf, None)
            while run.id not in started:
                assert time.monotonic() - sent < 5, "not woken"
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)


async def test_a_sleep_falling_due_wakes_the_worker(redis_url: str) -> None:
    wf = workflow("nap").step("a", lambda ctx: 1).sleep("nap", "300ms").step("b", lambda ctx: 2)
    async with Engine(storage=redis_url, workflows=[wf], poll_interval="30s") as engine:
        await asyncio.sleep(0.2)
        began = time.monotonic()
        run = await engine.enqueue(wf, None)
        assert await engine.result(run.id, timeout=5) == 2
    assert 0.3 <= time.monotonic() - began < 5


async def test_retention_expires_old_finished_runs_as_others_finish(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(f"{redis_url}&retention=0.2")
    await store.initialize()

    async def finish_one(key: str) -> str:
        created = await store.create_run(NewRun("wf", codec.encode(key), idempotency_key=key))
        [claimed] = await store.claim_runs(["wf"], 1, LEASE)
        step = StepRecord("a", "completed", output="1")
        assert await store.finish_run(claimed.lease, "completed", output="1", step=step)
        await store.deliver_event(created.run.id, "late", "1")  # refused: finished
        return created.run.id

    old = [await finish_one(f"old{i}") for i in range(2)]
    await asyncio.sleep(0.3)
    new = await finish_one("new")
    for run_id in old:
        assert await store.get_run(run_id) is None
        assert await store.get_step_results(run_id) == {}
    assert await store.get_run(new) is not None
    page = await store.list_runs()
    assert [r.id for r in page.runs] == [new]
    again = await store.create_run(NewRun("wf", codec.encode("old0"), idempotency_key="old0"))
    assert again.created  # the expired run's key is free again
    await store.close()


async def test_purge_deletes_old_finished_runs_and_their_keys(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    store = RedisStorage.from_url(redis_url)
    await store.initialize()
    ids = []
    for i in range(5):
        created = await store.create_run(NewRun("wf", codec.encode(i), idempotency_key=f"k{i}"))
        ids.append(created.run.id)
    for claimed in await store.claim_runs(["wf"], 5, LEASE):
        await store.deliver_event(claimed.run.id, "ev", "1", event_id="e")
        step = StepRecord("a", "completed", output="1")
        assert await store.finish_run(claimed.lease, "completed", output="1", step=step)
    pending = (await store.create_run(NewRun("wf", "1"))).run.id
    await asyncio.sleep(0.05)
    assert await store.purge_finished(timedelta(seconds=10)) == 0
    assert await store.purge_finished(timedelta(0), batch=2) == 5
    left = {k.decode() for k in raw.scan_iter(match="{" + prefix + "}:*")}
    assert not any(run_id in key for key in left for run_id in ids), left
    assert await store.get_run(pending) is not None
    with pytest.raises(ConfigError):
        await store.purge_finished(timedelta(seconds=-1))
    await store.close()


async def _finished_runs(store: RedisStorage, moment: list[datetime], count: int) -> list[str]:
    """``count`` runs created in one order and finished in the reverse one,
    a second apart by the storage clock; their ids, oldest finish first."""
    ids = [(await store.create_run(NewRun("wf", codec.encode(i)))).run.id for i in range(count)]
    leases = {c.run.id: c.lease for c in await store.claim_runs(["wf"], count, LEASE)}
    assert set(leases) == set(ids)
    finished = list(reversed(ids))
    for run_id in finished:
        moment[0] += timedelta(seconds=1)
        assert await store.finish_run(leases[run_id], "completed", output="1")
    return finished


async def test_purge_limit_deletes_that_many_oldest_finished_runs_first(
    redis_url: str,
) -> None:
    moment = [datetime(2030, 1, 1, tzinfo=UTC)]
    store = RedisStorage.from_url(redis_url, clock=lambda: moment[0])
    await store.initialize()
    finished = await _finished_runs(store, moment, 7)
    pending = (await store.create_run(NewRun("wf", "1"))).run.id
    moment[0] += timedelta(hours=1)
    # A batch of 2 under a limit of 3: one call of 2 runs, then one of 1.
    assert await store.purge_finished(timedelta(0), batch=2, limit=3) == 3
    assert [await store.get_run(run_id) for run_id in finished[:3]] == [None] * 3
    for run_id in finished[3:]:
        assert await store.get_run(run_id) is not None
    assert await store.purge_finished(timedelta(0), limit=1) == 1
    assert await store.get_run(finished[3]) is None
    assert await store.get_run(finished[4]) is not None
    # A limit above what is due deletes what is due, and the pending run stays.
    assert await store.purge_finished(timedelta(0), batch=2, limit=10) == 3
    assert await store.purge_finished(timedelta(0), limit=5) == 0
    assert [r.id for r in (await store.list_runs()).runs] == [pending]
    await store.close()


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "3"])
async def test_a_bad_purge_limit_is_refused_and_deletes_nothing(redis_url: str, limit: Any) -> None:
    moment = [datetime(2030, 1, 1, tzinfo=UTC)]
    store = RedisStorage.from_url(redis_url, clock=lambda: moment[0])
    await store.initialize()
    finished = await _finished_runs(store, moment, 3)
    moment[0] += timedelta(hours=1)
    with pytest.raises(ConfigError) as caught:
        await store.purge_finished(timedelta(0), limit=limit)
    assert caught.value.option == "limit"
    for run_id in finished:
        assert await store.get_run(run_id) is not None
    await store.close()


async def test_a_query_password_is_kept_out_of_errors_too() -> None:
    store = open_storage("redis://127.0.0.1:1/0?password=QuerySecret9&pool_timeout=1")
    assert "QuerySecret9" not in repr(store)
    with pytest.raises(StorageError) as caught:
        await store.initialize()
    await store.close()
    assert "QuerySecret9" not in str(caught.value)


async def test_the_listener_needs_no_connection_from_the_pool(redis_url: str) -> None:
    wf = workflow("one-conn").step("a", lambda ctx: 7)
    async with Engine(storage=f"{redis_url}&max_connections=1", workflows=[wf]) as engine:
        run = await engine.enqueue(wf, None)
        assert await engine.result(run.id, timeout=10) == 7
