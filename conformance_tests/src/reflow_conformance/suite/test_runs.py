"""Creating and reading runs: shape, idempotency and its scope."""

from __future__ import annotations

import asyncio

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.errors import IdempotencyConflictError
from reflow_core.storage import NewRun, Storage

from ._util import create

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestCreateRun", "TestIdempotency"]


class TestCreateRun:
    def test_created_run_is_pending_and_readable(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            result = await create(s, wf, {"order": 1})
            run = result.run
            promise(result.created, P.CREATE_SHAPE, f"created={result.created}")
            promise(
                (run.status, run.attempts, run.reclaims, run.lease_epoch) == ("pending", 0, 0, 0),
                P.CREATE_SHAPE,
                f"got {run}",
            )
            promise(run.workflow == wf and run.idempotency_key is None, P.CREATE_SHAPE, repr(run))
            promise(codec.decode(run.input) == {"order": 1}, P.ROUND_TRIP, run.input)
            stored = await s.get_run(run.id)
            promise(stored is not None and stored.id == run.id, P.NO_LOST_RUNS, repr(stored))
            promise(await s.get_step_results(run.id) == {}, P.CREATE_SHAPE, "new run has steps")

        reflow.run(body)

    def test_missing_run_reads_as_none(self, reflow: Harness) -> None:
        async def body(s: Storage) -> None:
            promise(await s.get_run(reflow.unique("run")) is None, P.MISSING_IS_NONE)
            promise(await s.get_step_results(reflow.unique("run")) == {}, P.MISSING_IS_NONE)

        reflow.run(body)


class TestIdempotency:
    def test_same_key_same_input_returns_the_same_run(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            first = await create(s, wf, {"a": 1, "b": [1, 2]}, key="k")
            again = await create(s, wf, {"b": [1, 2], "a": 1}, key="k")
            promise(first.created and not again.created, P.IDEMPOTENT_CREATE, f"{again}")
            promise(again.run.id == first.run.id, P.IDEMPOTENT_CREATE, f"{again.run.id}")
            page = await s.list_runs(workflow=wf)
            promise(len(page.runs) == 1, P.IDEMPOTENT_CREATE, f"{len(page.runs)} runs stored")

        reflow.run(body)

    def test_same_key_different_input_is_a_conflict(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            first = await create(s, wf, {"amount": 1}, key="k")
            try:
                await create(s, wf, {"amount": 2}, key="k")
            except IdempotencyConflictError as exc:
                promise(exc.existing_run_id == first.run.id, P.IDEMPOTENCY_CONFLICT, str(exc))
            else:
                promise(False, P.IDEMPOTENCY_CONFLICT, "no IdempotencyConflictError raised")
            page = await s.list_runs(workflow=wf)
            promise(len(page.runs) == 1, P.IDEMPOTENCY_CONFLICT, "the conflict wrote a run")

        reflow.run(body)

    def test_keys_are_scoped_per_workflow(self, reflow: Harness) -> None:
        a, b = reflow.unique(), reflow.unique()

        async def body(s: Storage) -> None:
            run_a = await create(s, a, 1, key="shared")
            run_b = await create(s, b, 2, key="shared")
            promise(run_b.created and run_a.run.id != run_b.run.id, P.IDEMPOTENCY_SCOPE)

        reflow.run(body)

    def test_concurrent_creates_with_one_key_make_one_run(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            others = [await reflow.open() for _ in range(3)]
            stores = [s, *others]
            new = NewRun(wf, codec.encode({"x": 1}), idempotency_key="once")
            results = await asyncio.gather(
                *(stores[i % len(stores)].create_run(new) for i in range(20))
            )
            ids = {r.run.id for r in results}
            promise(len(ids) == 1, P.ONE_RUN_PER_KEY, f"{len(ids)} distinct runs")
            promise(sum(r.created for r in results) == 1, P.ONE_RUN_PER_KEY, "created twice")
            page = await s.list_runs(workflow=wf)
            promise(len(page.runs) == 1, P.ONE_RUN_PER_KEY, f"{len(page.runs)} runs stored")

        reflow.run(body)
