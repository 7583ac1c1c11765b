"""``reflow-conformance --url`` works in a store of its own and leaves nothing
behind; ``--keep`` keeps it and says where it is.

Each test runs the installed command as a real subprocess with a small
``-k`` selection, against the local servers, and looks at the server
afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from reflow_conformance.stores import StoreUsageError, own_store

pytestmark = pytest.mark.slow

SELECTION = "TestCreateRun"
REDIS_SERVER_URL = os.environ.get("REFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def conformance(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = shutil.which("reflow-conformance", path=str(Path(sys.executable).parent))
    assert command is not None, "the reflow-conformance command is not installed"
    return subprocess.run(
        [command, *args, "-q", "-p", "no:randomly"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def passed(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"\b[1-9][0-9]* passed", output), output
    return output


def redis_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(match="{" + prefix + "*", count=1000))


@pytest.fixture
def redis_client(redis_session_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_SERVER_URL)
    yield client
    client.close()


def test_redis_run_leaves_no_key_behind(
    redis_client: redis.Redis, redis_session_prefix: str, tmp_path: Path
) -> None:
    base = f"{redis_session_prefix}.cli"
    output = passed(
        conformance("--url", f"{REDIS_SERVER_URL}?prefix={base}", "-k", SELECTION, cwd=tmp_path)
    )
    used = re.search(r"dropped: Redis key prefix '([^']+)'", output)
    assert used is not None, output
    assert used[1].startswith(f"{base}.")
    assert redis_keys(redis_client, used[1]) == []
    assert redis_keys(redis_client, base) == []


def test_redis_keep_keeps_the_prefix_and_says_where(
    redis_client: redis.Redis, redis_session_prefix: str, tmp_path: Path
) -> None:
    base = f"{redis_session_prefix}.keep"
    output = passed(
        conformance(
            "--url", f"{REDIS_SERVER_URL}?prefix={base}", "--keep", "-k", SELECTION, cwd=tmp_path
        )
    )
    kept = re.search(r"kept: Redis key prefix '([^']+)'", output)
    assert kept is not None, output
    keys = redis_keys(redis_client, kept[1])
    try:
        assert keys, f"nothing kept under {kept[1]}"
    finally:
        if keys:
            redis_client.delete(*keys)


def schemas(database: str, like: str) -> list[str]:
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
            (like,),
        ).fetchall()
    return [row[0] for row in rows]


def test_postgres_run_drops_its_schema(postgres_database: str, tmp_path: Path) -> None:
    base = f"cli_{uuid.uuid4().hex[:8]}"
    output = passed(
        conformance("--url", f"{postgres_database}?schema={base}", "-k", SELECTION, cwd=tmp_path)
    )
    used = re.search(r"dropped: PostgreSQL schema '([^']+)'", output)
    assert used is not None, output
    assert used[1].startswith(f"{base}_")
    assert schemas(postgres_database, f"{base}%") == []


def test_postgres_keep_keeps_the_schema(postgres_database: str, tmp_path: Path) -> None:
    output = passed(
        conformance("--url", postgres_database, "--keep", "-k", SELECTION, cwd=tmp_path)
    )
    kept = re.search(r"kept: PostgreSQL schema '([^']+)'", output)
    assert kept is not None, output
    try:
        assert schemas(postgres_database, kept[1]) == [kept[1]]
        assert kept[1].startswith("reflow_conformance_")
    finally:
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(kept[1]))
            )


def test_sqlite_run_deletes_its_file_and_keep_keeps_it(tmp_path: Path) -> None:
    passed(conformance("--url", "sqlite:///contract.db", "-k", SELECTION, cwd=tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [".hypothesis"]  # its example database
    output = passed(
        conformance("--url", "sqlite:///contract.db", "--keep", "-k", SELECTION, cwd=tmp_path)
    )
    kept = re.search(r"kept: SQLite file (\S+)", output)
    assert kept is not None, output
    assert Path(kept[1]).parent == tmp_path
    assert Path(kept[1]).name.startswith("contract-conformance-")
    assert Path(kept[1]).exists()


def test_unnamed_memory_url_is_refused_at_once(tmp_path: Path) -> None:
    result = conformance("--url", "memory://", cwd=tmp_path)
    assert result.returncode == 2
    assert "memory://NAME" in result.stderr
    assert "passed" not in result.stdout
    with pytest.raises(StoreUsageError, match="memory://NAME"):
        own_store("memory://")


def test_unnamed_memory_url_is_a_usage_error_for_the_pytest_option(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "--pyargs", "reflow_conformance.suite"),
            *("--reflow-storage-url=memory://", "-q", "-p", "no:randomly"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "memory://NAME" in result.stderr


def test_named_memory_store_runs_in_one_process(tmp_path: Path) -> None:
    output = passed(
        conformance("--url", "memory://contract", "-k", "TestCreateRun or processes", cwd=tmp_path)
    )
    assert "skipped" in output


def test_a_scheme_the_suite_does_not_know_is_used_as_given() -> None:
    store, owned = own_store("mydb://db.internal/contract?password=s3cret")
    assert not owned
    assert store.url == "mydb://db.internal/contract?password=s3cret"
    assert store.drop is None
    assert "s3cret" not in store.where


def test_options_of_the_url_are_kept() -> None:
    store, owned = own_store("redis://:pw@127.0.0.1:6379/0?max_connections=5&prefix=app")
    assert owned
    assert re.fullmatch(
        r"redis://:pw@127\.0\.0\.1:6379/0\?max_connections=5&prefix=app\.[0-9a-f]{12}", store.url
    )
    assert "pw" not in store.where
    store, _ = own_store("sqlite:////var/tmp/x.db?synchronous=FULL")
    assert re.fullmatch(
        r"sqlite:////var/tmp/x-conformance-[0-9a-f]{12}\.db\?synchronous=FULL", store.url
    )
