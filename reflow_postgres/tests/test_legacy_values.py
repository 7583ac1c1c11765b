"""Values an older version could write and this one must still read.

Before durations were bounded, a sleep of ``10**12`` seconds stored a wake-up
time in the year 33,715, and every read of that run (and every page of
``list_runs`` holding it) failed with ``DataError``. Such a time now reads as
a time at the end of year 9999.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from reflow_core import codec, open_storage
from reflow_core.adapter import RUN_COLUMNS, STEP_COLUMNS
from reflow_core.storage import NewRun
from reflow_postgres._sql import statements

Admin = psycopg.Connection[tuple[object, ...]]


async def test_a_wake_up_time_past_year_9999_reads_back_and_lists(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    storage = open_storage(postgres_url)
    await storage.initialize()
    try:
        made = await storage.create_run(NewRun("legacy", codec.encode(None)))
        [claimed] = await storage.claim_runs(["legacy"], 1, timedelta(minutes=1))
        assert await storage.sleep_run(claimed.lease, "z", timedelta(hours=1)) is not None
        for table, key in (("runs", "id"), ("steps", "run_id")):
            admin.execute(
                sql.SQL(
                    "UPDATE {}.{} SET wake_at = '33715-01-01 00:00:00+00' WHERE {} = %s"
                ).format(sql.Identifier(schema), sql.Identifier(table), sql.Identifier(key)),
                (made.run.id,),
            )
        latest = datetime(9999, 12, 30, tzinfo=UTC)  # the cap, which loads in every zone
        run = await storage.get_run(made.run.id)
        assert run is not None
        assert run.wake_at == latest
        assert (await storage.get_step_results(made.run.id))["z"].wake_at == latest
        page = await storage.list_runs(workflow="legacy")
        assert [r.id for r in page.runs] == [made.run.id]
        assert await storage.claim_runs(["legacy"], 1, timedelta(minutes=1)) == []
    finally:
        await storage.close()


def test_the_capped_read_columns_keep_the_row_mappers_order() -> None:
    """queries.sql spells out the columns of run and step reads, with the
    deadlines capped and the status mapped (a delayed run is stored as
    sleeping); uncapped and unmapped, they are the columns the row mappers read."""
    sql_text = statements("reflow", notify=True, test_clock=False)
    capped = re.compile(r"CASE WHEN (\w+) > .+? THEN .+? ELSE \1 END(\s+AS \1)?")
    mapped = re.compile(r"CASE WHEN status = .+? ELSE status END AS status")

    def columns(text: str) -> list[str]:
        text = mapped.sub("status", capped.sub(r"\1", text))
        return [c.strip() for c in text.split(",")]

    assert columns(sql_text["read_columns"].decode()) == columns(RUN_COLUMNS)
    assert columns(sql_text["step_read_columns"].decode()) == columns(STEP_COLUMNS)
    assert sql_text["read_columns"].count(b"CASE WHEN") == 3
    assert sql_text["step_read_columns"].count(b"CASE WHEN") == 1
