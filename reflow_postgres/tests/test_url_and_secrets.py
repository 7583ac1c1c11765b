"""Opening the backend from URLs and keywords, and keeping passwords out of sight."""

from __future__ import annotations

import logging

import psycopg
import pytest

from reflow_core import ConfigError, StorageError, open_storage
from reflow_postgres import PostgresStorage, parse_postgres_url


def test_both_schemes_open_the_postgres_backend() -> None:
    for scheme in ("postgresql", "postgres", "PostgreSQL"):
        store = open_storage(f"{scheme}://app@db.example/app")
        assert isinstance(store, PostgresStorage)
        assert store.schema == "reflow"


def test_reflow_options_are_taken_out_and_the_rest_goes_to_libpq() -> None:
    conninfo, options, safe = parse_postgres_url(
        "postgres://app:pw@db.example:5433/app?schema=jobs&pool_max_size=20"
        "&sslmode=require&application_name=billing&listen=false"
    )
    assert options == {"schema": "jobs", "pool_max_size": "20", "listen": "false"}
    assert conninfo == (
        "postgresql://app:pw@db.example:5433/app?sslmode=require&application_name=billing"
    )
    assert "pw" not in safe
    assert safe.startswith("postgres://app:***@db.example:5433/app?")


def test_keywords_win_over_url_options() -> None:
    store = PostgresStorage.from_url(
        "postgresql://db.example/app?schema=a&pool_max_size=3", schema="b", pool_max_size=7
    )
    assert store.schema == "b"
    assert store.channel == "reflow:b"


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("postgresql://h/db?schema=1abc", "schema"),
        ("postgresql://h/db?schema=a;drop", "schema"),
        ("postgresql://h/db?schema=pg_temp", "schema"),
        ("postgresql://h/db?pool_max_size=0", "pool_max_size"),
        ("postgresql://h/db?pool_min_size=5&pool_max_size=2", "pool_max_size"),
        ("postgresql://h/db?pool_min_size=-1", "pool_min_size"),
        ("postgresql://h/db?pool_timeout=never", "pool_timeout"),
        ("postgresql://h/db?notify=maybe", "notify"),
        ("postgresql://h/db?prepare_threshold=x", "prepare_threshold"),
        ("postgresql://h/db?schema=a&schema=b", "schema"),
        ("redis://h/0", "url"),
        ("postgresql://h/db#frag", "url"),
    ],
)
def test_bad_options_are_refused_naming_the_option(url: str, option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PostgresStorage.from_url(url)
    assert caught.value.option == option


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown postgresql option 'pool'"):
        PostgresStorage.from_url("postgresql://h/db", pool=3)


@pytest.mark.parametrize(
    ("url", "options", "option", "suggested"),
    [
        ("postgresql://h/db?shema=jobs", {}, "shema", "schema"),
        ("postgresql://h/db?pool_max=4", {}, "pool_max", "pool_max_size"),
        ("postgresql://h/db?sslmod=require", {}, "sslmod", "sslmode"),
        ("postgresql://h/db?conect_timeout=3", {}, "conect_timeout", "connect_timeout"),
        ("postgresql://h/db", {"shema": "jobs"}, "shema", "schema"),
        ("postgresql://h/db", {"pool_timout": 3}, "pool_timout", "pool_timeout"),
        (
            "postgresql://h/db",
            {"connect_kwargs": {"aplication_name": "x"}},
            "aplication_name",
            "application_name",
        ),
    ],
)
def test_an_unknown_option_is_refused_at_open_storage_with_a_suggestion(
    url: str, options: dict[str, object], option: str, suggested: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage(url, **options)
    message = str(caught.value)
    assert caught.value.option == option
    assert f"{suggested!r}" in message.split("?)", 1)[0]  # among the suggestions
    assert "did you mean" in message
    assert "known options:" in message


def test_an_unknown_url_option_lists_reflows_and_libpqs() -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage("postgresql://app:Sup3rSecret@h/db?schema=a&sslmdoe=require")
    message = str(caught.value)
    assert "'sslmdoe' in the URL (did you mean 'sslmode'" in message
    assert "known options: schema, pool_min_size, pool_max_size, pool_timeout" in message
    assert "passed on to libpq: application_name, " in message
    assert "Sup3rSecret" not in message


def test_a_libpq_parameter_as_a_keyword_says_where_it_goes() -> None:
    with pytest.raises(ConfigError, match="sslmode is libpq's: give it in the URL"):
        open_storage("postgresql://h/db", sslmode="require")


def test_a_connection_string_libpq_cannot_read_is_refused_at_once() -> None:
    with pytest.raises(ConfigError, match="libpq cannot read the connection string") as caught:
        PostgresStorage("host=h dbname=db sslmdoe=require")
    assert caught.value.option == "url"


async def test_libpq_parameters_in_the_url_and_connect_kwargs_still_work(
    postgres_url: str, admin: psycopg.Connection[tuple[object, ...]]
) -> None:
    store = open_storage(
        f"{postgres_url}&sslmode=disable&connect_timeout=3&application_name=reflow_h4_url"
        "&keepalives=1",
        connect_kwargs={"options": "-c statement_timeout=12345"},
    )
    await store.initialize()
    try:
        names = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reflow_h4_url'"
        ).fetchone()
        assert names is not None
        assert names[0] >= 1
        assert isinstance(store, PostgresStorage)
        pool = store._db.pool
        assert pool is not None
        async with pool.connection() as conn:
            cur = await conn.execute("SHOW statement_timeout")
            row = await cur.fetchone()
        assert row == ("12345ms",)
    finally:
        await store.close()


def test_prepared_statements_can_be_turned_off() -> None:
    store = PostgresStorage.from_url("postgresql://h/db?prepare_threshold=none")
    assert store._kwargs["prepare_threshold"] is None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:Sup3r%2Fsecret@127.0.0.1:1/app?pool_timeout=1",
        "postgresql://app@127.0.0.1:1/app?password=Sup3r%2Fsecret&pool_timeout=1",
    ],
)
async def test_password_never_shows_in_repr_errors_or_logs(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = open_storage(url)
    assert "Sup3r" not in repr(store)
    assert "***" in repr(store)
    with pytest.raises(StorageError) as caught:
        await store.initialize()  # nothing listens on port 1
    await store.close()
    err = caught.value
    assert err.operation == "initialize"
    assert err.backend == "postgresql"
    for text in (str(err), repr(err), repr(err.args), caplog.text):
        assert "Sup3r" not in text
        assert "secret" not in text


async def test_operations_before_initialize_or_after_close_say_so(postgres_url: str) -> None:
    store = open_storage(postgres_url)
    with pytest.raises(StorageError, match="not initialized"):
        await store.get_run("x")
    await store.initialize()
    assert await store.get_run("x") is None
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        await store.get_run("x")


async def test_a_start_up_failure_names_its_cause_not_just_a_pool_timeout(
    postgres_database: str,
) -> None:
    # A setting the server refuses while the connection starts.
    store = PostgresStorage.from_url(
        f"{postgres_database}?schema=never_made&pool_timeout=1&options=-cbogus_setting%3D1"
    )
    with pytest.raises(StorageError) as caught:
        await store.initialize()
    await store.close()
    assert "bogus_setting" in str(caught.value)
    assert "PoolTimeout" not in str(caught.value)
