"""The storage's connections and the server's ``TimeZone``.

A pooled connection whose ``TimeZone`` is another name of UTC (``Etc/UTC``,
the default of many server images) is set to ``UTC``, so psycopg reads times
in :data:`datetime.UTC` without converting them; any other zone is left
alone, and the times read are the same instants either way.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Any

import psycopg
import pytest

from reflow_core.storage import NewRun
from reflow_postgres import PostgresStorage


async def _zone(conn: psycopg.AsyncConnection[Any], attempt: int) -> object:
    cur = await conn.execute("SELECT current_setting('TimeZone')")
    row = await cur.fetchone()
    assert row is not None
    return row[0]


@pytest.mark.parametrize(
    ("server_zone", "session_zone"),
    [("Etc/UTC", "UTC"), ("zulu", "UTC"), ("UTC", "UTC"), ("Asia/Kolkata", "Asia/Kolkata")],
)
async def test_a_utc_alias_becomes_utc_and_other_zones_stay(
    postgres_url: str, server_zone: str, session_zone: str
) -> None:
    store = PostgresStorage.from_url(
        postgres_url, connect_kwargs={"options": f"-c TimeZone={server_zone}"}
    )
    await store.initialize()
    try:
        assert await store._db.run("zone", _zone) == session_zone
        made = await store.create_run(NewRun("wf", "1"))
        [claimed] = await store.claim_runs(["wf"], 1, timedelta(minutes=1))
        assert claimed.run.created_at == made.run.created_at
        assert claimed.run.created_at.tzinfo is UTC
        expires = claimed.run.lease_expires_at
        assert expires is not None
        assert expires.tzinfo is UTC
        assert expires - claimed.run.updated_at == timedelta(minutes=1)
    finally:
        await store.close()
