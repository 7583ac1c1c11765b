"""Bind the conformance suite to this repository's backends: memory, SQLite, PostgreSQL, Redis."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from reflow_conformance import AdapterFactory
from reflow_core import open_storage

REDIS_SERVER_URL = os.environ.get("REFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

BACKENDS = ["memory", "sqlite", "postgres", "redis"]


@pytest.fixture(scope="session")
def _sqlite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conformance")


@pytest.fixture(params=BACKENDS)
def reflow_storage_factory(request: pytest.FixtureRequest, _sqlite_dir: Path) -> AdapterFactory:
    if request.param == "memory":
        url = f"memory://conformance-{uuid.uuid4().hex}"
        return AdapterFactory(make=lambda: open_storage(url), name="memory")
    if request.param == "redis":
        url = f"{REDIS_SERVER_URL}?prefix={request.getfixturevalue('redis_session_prefix')}.suite"
        return AdapterFactory(
            make=lambda: open_storage(url),
            target=url,
            capabilities=frozenset({"multiprocess"}),
            name="redis",
        )
    if request.param == "postgres":
        url = f"{request.getfixturevalue('postgres_database')}?schema=conformance"
        return AdapterFactory(
            make=lambda: open_storage(url),
            target=url,
            capabilities=frozenset({"multiprocess"}),
            name="postgres",
        )
    url = f"sqlite:///{_sqlite_dir}/suite.db"
    return AdapterFactory(
        make=lambda: open_storage(url),
        target=url,
        capabilities=frozenset({"multiprocess"}),
        name="sqlite",
    )
