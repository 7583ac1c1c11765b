"""Small helpers shared by the suite's modules (not part of the public API)."""

from __future__ import annotations

from datetime import timedelta

from reflow_core import codec
from reflow_core.storage import ClaimedRun, CreateResult, NewRun, Storage

LONG = timedelta(minutes=10)


async def create(
    storage: Storage, workflow: str, value: object = None, *, key: str | None = None
) -> CreateResult:
    return await storage.create_run(NewRun(workflow, codec.encode(value), idempotency_key=key))


async def claim_one(storage: Storage, workflow: str, lease: timedelta = LONG) -> ClaimedRun:
    claimed = await storage.claim_runs([workflow], 1, lease)
    assert len(claimed) == 1, f"expected to claim one run of {workflow}, got {len(claimed)}"
    return claimed[0]
