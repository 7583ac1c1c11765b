"""Passwords in every spelling stay out of sight; the database in the URL is
checked; a server that stalls is waited for up to ``socket_timeout``, then
reported as a StorageError."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reflow_core import (
    ConfigError,
    Engine,
    ReflowError,
    StorageError,
    codec,
    open_storage,
    workflow,
)
from reflow_core.storage import NewRun
from reflow_redis import RedisStorage

from . import _redis_harness as h

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


# -- passwords in every spelling ------------------------------------------------------


def _hex_case(text: str, upper: bool) -> str:
    return re.sub(r"%[0-9A-Fa-f]{2}", lambda m: m[0].upper() if upper else m[0].lower(), text)


def forms_of(password: str, *written: str) -> set[str]:
    """The texts that would give ``password`` away: itself, how the URL spelled
    it, and its percent-encoded forms with either case of hex and either
    spelling of a space."""
    found = {password, *written}
    for encoded in (quote(password, safe=""), quote_plus(password, safe="")):
        found |= {_hex_case(encoded, True), _hex_case(encoded, False)}
    return {f for f in found if f}


_SPECIAL = " +%@/:#?&=\\'\"éß€😀"
passwords = st.text(
    st.one_of(
        st.sampled_from(_SPECIAL),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    min_size=3,
    max_size=16,
).filter(lambda p: p.strip("*") != "")


@st.composite
def spelled(draw: st.DrawFn, password: str, *, raw: str, plus_for_space: bool) -> str:
    """``password`` as a URL may spell it: each character as itself (if in
    ``raw``), ``+`` for a space (``plus_for_space``), or percent-encoded with
    upper- or lower-case hex, chosen character by character."""
    out = []
    for char in password:
        if char == " " and plus_for_space and draw(st.booleans()):
            out.append("+")
        elif char in raw and draw(st.booleans()):
            out.append(char)
        else:
            out.append(_hex_case(quote(char, safe=""), draw(st.booleans())))
    return "".join(out)


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
RAW_IN_USER_INFO = _ALNUM + "-._~!$&'()*+,;=:"
RAW_IN_QUERY = _ALNUM + "-._~!$'()*,:@/?"


@dataclass(frozen=True)
class Case:
    password: str
    written: str
    path: str
    build: Callable[[], RedisStorage]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    password = draw(passwords)
    path = draw(
        st.sampled_from(
            [
                "open_storage, user info",
                "open_storage, query",
                "constructor, user info",
                "constructor, query",
                "open_storage, connect_kwargs",
                "constructor, connect_kwargs",
            ]
        )
    )
    written = password
    if "user info" in path:
        written = draw(spelled(password, raw=RAW_IN_USER_INFO, plus_for_space=False))
        url = f"redis://app:{written}@{UNREACHABLE}/0"
    elif "query" in path:
        written = draw(spelled(password, raw=RAW_IN_QUERY, plus_for_space=True))
        # redis-py decodes a parameter's name too
        name = draw(st.sampled_from(["password", "pass%77ord", "%70assword"]))
        url = f"redis://{UNREACHABLE}/0?{name}={written}"
    else:
        url = f"redis://{UNREACHABLE}/0"
    kwargs: dict[str, Any] = {}
    if "connect_kwargs" in path:
        kwargs["connect_kwargs"] = {"password": password}

    def build() -> RedisStorage:
        if path.startswith("open_storage"):
            store = open_storage(url, **kwargs)
            assert isinstance(store, RedisStorage)
            return store
        return RedisStorage(url, **kwargs)

    return Case(password, written, path, build)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


async def _start(store: RedisStorage) -> ReflowError:
    try:
        await store.initialize()
    except ReflowError as exc:
        return exc
    finally:
        await store.close()
    raise AssertionError("connected to a port where nothing listens")


def _texts(store: RedisStorage, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Everything the storage lets people see: its repr, the error of a failed
    start with its whole cause chain, and the log records meanwhile."""
    caplog.clear()
    texts = [repr(store), str(store)]
    err = asyncio.run(_start(store))
    for exc in _chain(err):
        texts += [str(exc), repr(exc), repr(exc.args)]
    texts += [record.getMessage() for record in caplog.records]
    texts.append(caplog.text)
    return texts


_noise: list[str] = []


def _noise_texts(caplog: pytest.LogCaptureFixture) -> str:
    """What the same failure shows with no password at all: a password that is
    part of it (``127``, ``refused``) cannot be told from it."""
    if not _noise:
        _noise.extend(_texts(RedisStorage(f"redis://app@{UNREACHABLE}/0"), caplog))
    return "\n".join(_noise)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_no_spelling_of_a_password_shows_in_repr_errors_or_logs(
    case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    forms = forms_of(case.password, case.written)
    noise = _noise_texts(caplog)
    assume(not any(form in noise for form in forms))
    store = case.build()
    for text in _texts(store, caplog):
        for form in forms:
            assert form not in text, (case.path, form, text)


@pytest.mark.parametrize(
    ("url", "forms"),
    [
        # '+' is a space in a query string
        (f"redis://{UNREACHABLE}/0?password=my+secret", ["my+secret", "my secret", "my%20secret"]),
        # lower-case percent escapes
        (f"redis://:Sup3r%2fs%c3%a9cret@{UNREACHABLE}/0", ["Sup3r", "%2f", "%2F", "sécret"]),
        (f"redis://{UNREACHABLE}/0?password=Sup3r%2fs%c3%a9cret", ["Sup3r", "sécret", "%2f"]),
        (f"rediss://{UNREACHABLE}/0?ssl_password=Key%2bPass", ["Key", "%2b", "Key+Pass"]),
    ],
)
@pytest.mark.parametrize("direct", [False, True])
def test_reported_spellings_stay_hidden(
    url: str, forms: list[str], direct: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = RedisStorage(url) if direct else open_storage(url)
    assert isinstance(store, RedisStorage)
    assert "***" in repr(store)
    for text in _texts(store, caplog):
        for form in forms:
            assert form not in text


def test_a_storage_built_from_a_url_with_an_escaped_password_hides_it() -> None:
    store = RedisStorage("redis://app:p%40ss%2Fw%2bord@127.0.0.1:6379/0")
    assert repr(store) == "RedisStorage('redis://app:***@127.0.0.1:6379/0', prefix='reflow')"
    # a password that is also the prefix is masked there too
    assert "billing" not in repr(open_storage("redis://:billing@h/0?prefix=billing"))


@pytest.mark.parametrize(
    "url",
    [
        "redis://:Qz7/Wk3@h/0",  # an unescaped '/' ends the host part inside the password
        "redis://u:Qz7?Wk3@h/0",
        "redis://u:Qz7#Wk3@h/0",
    ],
)
@pytest.mark.parametrize("direct", [False, True])
def test_a_password_that_breaks_the_url_is_refused_without_showing_it(
    url: str, direct: bool
) -> None:
    with pytest.raises(ConfigError) as caught:
        RedisStorage(url) if direct else open_storage(url)
    assert caught.value.option == "url"
    for text in (str(caught.value), repr(caught.value)):
        assert "Qz7" not in text
        assert "Wk3" not in text


# -- the database in the URL -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://host/abc", "'/abc'"),
        ("redis://host/-1", "'/-1'"),
        ("rediss://host/1x", "'/1x'"),
        ("redis://host/0/1", "'/0/1'"),
        ("redis://host/%C2%B2", "'/²'"),  # a digit int() refuses
        ("redis://host/0?db=abc", "'abc'"),
        ("unix:///run/redis.sock?db=abc", "'abc'"),
        ("unix:///run/redis.sock?db=-2", "'-2'"),
        ("redis://host/1?db=2", "database 1 in its path and 2"),
    ],
)
@pytest.mark.parametrize("direct", [False, True])
def test_a_database_that_is_not_a_number_is_refused(url: str, shown: str, direct: bool) -> None:
    with pytest.raises(ConfigError) as caught:
        RedisStorage(url) if direct else open_storage(url)
    assert caught.value.option == "db"
    assert shown in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://host",
        "redis://host/",
        "redis://host/3",
        "redis://host/3/",
        "redis://host/%33",
        "redis://host/3?db=3",
        "redis://host?db=4",
        "unix:///run/redis.sock",
        "unix:///run/redis.sock?db=2",
    ],
)
def test_a_database_number_is_taken(url: str) -> None:
    assert isinstance(open_storage(url), RedisStorage)


async def test_the_database_in_the_path_is_the_one_used(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    url = redis_url.replace("/0?", "/5?")
    assert "/5?" in url
    store = open_storage(url)
    await store.initialize()
    try:
        created = await store.create_run(NewRun("db-check", codec.encode(1)))
    finally:
        await store.close()
    key = "{" + prefix + "}:run:" + created.run.id
    other = redis.Redis.from_url(url.split("?", 1)[0])
    try:
        assert other.exists(key)
        assert not raw.exists(key)
    finally:  # the session cleans database 0 only
        keys = list(other.scan_iter(match="{" + prefix + "}*"))
        if keys:
            other.delete(*keys)
        other.close()


# -- socket timeouts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("redis://h/0?socket_timeout=0", "socket_timeout"),
        ("redis://h/0?socket_timeout=-1", "socket_timeout"),
        ("redis://h/0?socket_timeout=never", "socket_timeout"),
        ("redis://h/0?socket_timeout=none", "socket_timeout"),
        ("redis://h/0?socket_connect_timeout=0", "socket_connect_timeout"),
        ("redis://h/0?socket_connect_timeout=soon", "socket_connect_timeout"),
        ("redis://h/0?socket_timeout=1&socket_timeout=2", "socket_timeout"),
    ],
)
def test_bad_socket_timeouts_are_refused_naming_the_option(url: str, option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage(url)
    assert caught.value.option == option
    assert option in str(caught.value)


def test_socket_timeouts_come_from_the_url_or_keywords() -> None:
    store = open_storage("redis://h/0?socket_timeout=500ms&socket_connect_timeout=2")
    assert isinstance(store, RedisStorage)
    assert (store._socket_timeout, store._connect_timeout) == (0.5, 2.0)
    store = open_storage("redis://h/0?socket_timeout=3", socket_timeout=timedelta(seconds=4))
    assert isinstance(store, RedisStorage)
    assert store._socket_timeout == 4.0
    store = RedisStorage("redis://h/0")
    assert (store._socket_timeout, store._connect_timeout) == (10.0, 5.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RedisStorage("redis://h/0?socket_timeout=3"),
        lambda: RedisStorage("redis://h/0", connect_kwargs={"socket_connect_timeout": 3}),
        lambda: open_storage("redis://h/0", connect_kwargs={"socket_timeout": 3}),
    ],
)
def test_socket_timeouts_given_to_redis_py_directly_are_refused(
    make: Callable[[], object],
) -> None:
    with pytest.raises(ConfigError, match="is an option of the storage") as caught:
        make()
    assert caught.value.option in ("socket_timeout", "socket_connect_timeout")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client_nme": "x"}, r"connect_kwargs\['client_nme'\] is not an argument .*'client_name'"),
        ({"decode_responses": True}, r"connect_kwargs\['decode_responses'\] is set by the storage"),
        ({"max_connections": 3}, r"connect_kwargs\['max_connections'\] is set by the storage"),
    ],
)
def test_connect_kwargs_redis_py_does_not_take_are_refused_when_built(
    kwargs: dict[str, Any], message: str
) -> None:
    """Before any connection: a typo in connect_kwargs failed only at start-up,
    with redis-py's TypeError."""
    with pytest.raises(ConfigError, match=message) as caught:
        open_storage("redis://127.0.0.1:1/0", connect_kwargs=kwargs)
    assert caught.value.option == "connect_kwargs"


async def test_connect_kwargs_redis_py_takes_reach_the_connections(redis_url: str) -> None:
    store = open_storage(
        redis_url, connect_kwargs={"client_name": "reflow-kwargs-test", "health_check_interval": 7}
    )
    assert isinstance(store, RedisStorage)
    await store.initialize()
    try:
        await store.now()
        pool = store._client.connection_pool
        assert pool.connection_kwargs["client_name"] == "reflow-kwargs-test"
        assert pool.connection_kwargs["health_check_interval"] == 7
    finally:
        await store.close()


async def test_the_timeouts_reach_every_connection(redis_url: str) -> None:
    store = open_storage(f"{redis_url}&socket_timeout=7&socket_connect_timeout=3")
    assert isinstance(store, RedisStorage)
    await store.initialize()
    try:
        pool = store._client.connection_pool
        conn = await pool.get_connection()
        try:
            assert (conn.socket_timeout, conn.socket_connect_timeout) == (7.0, 3.0)
        finally:
            await pool.release(conn)
        hub = await store.subscribe_wakeups(["x"], lambda: None)
        listening = store._listener_client
        assert listening is not None
        kwargs = listening.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (7.0, 3.0)
        await hub.close()
    finally:
        await store.close()


STALL_USER = "reflow-stall"
STALL_PASSWORD = "St4ll%Pass word"  # in the URL as St4ll%25Pass%20word


@pytest.fixture
def stallable(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own that may be stalled with ``DEBUG
    SLEEP`` (so no other test's server stalls), with a user whose password
    the storage's URL carries."""
    server = h.RedisServer(
        h.need_redis_server(),
        tmp_path,
        "--save",
        "",
        "--appendonly",
        "no",
        "--enable-debug-command",
        "local",
        "--user",
        STALL_USER,
        "on",
        f">{STALL_PASSWORD}",
        "~*",
        "&*",
        "+@all",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _url(server: Any, query: str) -> str:
    password = quote(STALL_PASSWORD, safe="")  # in user info, '+' is a plus
    return f"redis://{STALL_USER}:{password}@127.0.0.1:{server.port}/0?prefix=stall&{query}"


def _stall(server: Any, seconds: float) -> threading.Thread:
    """Make the server sleep for ``seconds``, from a raw connection of its own;
    returns once the sleep has begun."""
    client = server.client()
    client.ping()

    def sleep() -> None:
        try:
            client.execute_command("DEBUG", "SLEEP", seconds)
        finally:
            client.close()

    thread = threading.Thread(target=sleep, daemon=True)
    thread.start()
    time.sleep(0.1)  # DEBUG SLEEP has reached the server and holds it
    return thread


async def _timed(make: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    result = await make()
    return time.monotonic() - started, result


async def test_a_stall_shorter_than_socket_timeout_only_delays(stallable: Any) -> None:
    store = open_storage(_url(stallable, "socket_timeout=1.5"))
    await store.initialize()
    try:
        run = (await store.create_run(NewRun("stall", codec.encode(1)))).run
        for operation in (
            lambda: store.create_run(NewRun("stall", codec.encode(2))),  # retried on a drop
            lambda: store.update_run_status(run.id, "cancelled"),  # never retried
        ):
            stall = _stall(stallable, 0.8)
            elapsed, outcome = await _timed(operation)
            await asyncio.to_thread(stall.join, 5)
            assert outcome  # created, or cancelled
            assert 0.5 < elapsed < 1.5
        stored = await store.get_run(run.id)
        assert stored is not None
        assert stored.status == "cancelled"
    finally:
        await store.close()


async def test_a_stall_longer_than_socket_timeout_is_a_storage_error_at_once(
    stallable: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = open_storage(_url(stallable, "socket_timeout=0.6"))
    await store.initialize()
    try:
        run = (await store.create_run(NewRun("stall", codec.encode(1)))).run
        for name, operation in (
            ("create_run", lambda: store.create_run(NewRun("stall", codec.encode(2)))),
            ("update_run_status", lambda: store.update_run_status(run.id, "cancelled")),
        ):
            stall = _stall(stallable, 1.6)
            started = time.monotonic()
            with pytest.raises(StorageError) as caught:
                await operation()
            elapsed = time.monotonic() - started
            await asyncio.to_thread(stall.join, 5)
            err = caught.value
            # One wait of socket_timeout, not one per retry.
            assert 0.5 < elapsed < 1.2, elapsed
            assert err.operation == name
            assert err.backend == "redis"
            assert "TimeoutError" in str(err)
            assert "socket_timeout=0.6s" in str(err)
            assert isinstance(err.__cause__, redis.exceptions.TimeoutError)
            texts = [str(err), repr(err), *(str(e) for e in _chain(err)), caplog.text]
            for text in texts:
                for form in forms_of(STALL_PASSWORD, quote(STALL_PASSWORD, safe="")):
                    assert form not in text
        # Once the server answers again, so does the storage.
        assert await store.get_run(run.id) is not None
    finally:
        await store.close()


async def test_the_engine_rides_out_a_stall_by_retrying_its_fenced_writes(
    stallable: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    calls = 0

    async def stall_then_return(ctx: Any) -> int:
        nonlocal calls
        calls += 1
        # Saving this step's result meets a server asleep for longer than
        # socket_timeout; the engine retries the fenced save until it lands.
        await asyncio.to_thread(_stall, stallable, 1.0)
        return 42

    wf = workflow("stalled-save").step("stall", stall_then_return)
    async with Engine(
        storage=_url(stallable, "socket_timeout=0.4"), workflows=[wf], poll_interval="50ms"
    ) as engine:
        run = await engine.enqueue(wf, None)
        for _ in range(20):
            try:
                assert await engine.result(run.id, timeout=15) == 42
                break
            except StorageError:  # our own reads meet the stall too, and say so
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("the run never completed")
    assert calls == 1
    # The finish timed out and was retried by the engine; its first try landed
    # once the server woke, and the storage knows that refusal for its own.
    assert "failed (StorageError" in caplog.text or "retry" in caplog.text
    assert "was lost" not in caplog.text
    for form in forms_of(STALL_PASSWORD, quote(STALL_PASSWORD, safe="")):
        assert form not in caplog.text
