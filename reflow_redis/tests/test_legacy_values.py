"""Values an older version could write and this one must still read.

Before durations were bounded, a sleep of ``10**12`` seconds stored a wake-up
time in the year 33,715, and every read of that run (and every page of
``list_runs`` holding it) failed with ``OverflowError``. Such a time now
reads as the latest representable one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis

from reflow_core import codec, open_storage
from reflow_core.storage import NewRun

YEAR_33715_US = 1_001_730_000_000 * 1_000_000
"""Microseconds since the epoch of a moment in the year 33,715."""


async def test_a_wake_up_time_past_year_9999_reads_back_and_lists(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    storage = open_storage(redis_url)
    await storage.initialize()
    try:
        made = await storage.create_run(NewRun("legacy", codec.encode(None)))
        [claimed] = await storage.claim_runs(["legacy"], 1, timedelta(minutes=1))
        assert await storage.sleep_run(claimed.lease, "z", timedelta(hours=1)) is not None
        key = "{" + prefix + "}:run:" + made.run.id
        assert raw.hget(key, "w") is not None
        raw.hset(key, "w", str(YEAR_33715_US))
        run = await storage.get_run(made.run.id)
        assert run is not None
        assert run.wake_at == datetime.max.replace(tzinfo=UTC)
        page = await storage.list_runs(workflow="legacy")
        assert [r.id for r in page.runs] == [made.run.id]
    finally:
        await storage.close()
