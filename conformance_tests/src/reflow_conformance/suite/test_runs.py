"""Creating and reading runs: shape, idempotency and its scope."""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.errors import IdempotencyConflictError, StorageError
from reflow_core.storage import NewRun, StepRecord, Storage

from ._util import claim_one, claim_only, create

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestCreateRun", "TestIdempotency", "TestRunIdentity"]


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


class TestRunIdentity:
    def test_a_create_with_a_taken_run_id_is_refused(self, reflow: Harness) -> None:
        """A caller-chosen run id that is taken, in this workflow or another,
        never replaces the run holding it (its steps and status stay)."""
        wf = reflow.unique()
        run_id = reflow.unique("run")

        async def body(s: Storage) -> None:
            await s.create_run(NewRun(wf, codec.encode("first"), run_id=run_id))
            held = await claim_one(s, wf)
            step = StepRecord("charge", "completed", output=codec.encode("kept"))
            saved = await s.save_step_result(held.lease, step, reflow.long_lease)
            promise(saved, P.LIVE_LEASE_ACCEPTED, "save_step_result with a fresh lease refused")
            before = await s.get_run(run_id)
            steps = await s.get_step_results(run_id)
            for workflow, key in ((wf, None), (reflow.unique(), None), (wf, "k")):
                again = NewRun(workflow, codec.encode("second"), idempotency_key=key, run_id=run_id)
                try:
                    result = await s.create_run(again)
                except StorageError:
                    pass
                else:
                    promise(
                        False,
                        P.RUN_ID_TAKEN,
                        f"create_run({again!r}) with the id of a running run returned {result!r}",
                    )
                promise(
                    await s.get_run(run_id) == before,
                    P.RUN_ID_TAKEN,
                    f"a refused create with run id {run_id!r} changed the run",
                )
                promise(
                    await s.get_step_results(run_id) == steps,
                    P.RUN_ID_TAKEN,
                    f"a refused create with run id {run_id!r} changed its steps",
                )
            page = await s.list_runs(workflow=wf)
            promise(
                [run.id for run in page.runs] == [run_id],
                P.RUN_ID_TAKEN,
                f"runs of {wf}: {[run.id for run in page.runs]}",
            )

        reflow.run(body)

    def test_a_key_names_its_run_after_the_run_ends(self, reflow: Harness) -> None:
        """Ending a run does not free its idempotency key: a repeat returns the
        ended run, and a different input is still a conflict (only a purge
        frees the key)."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            ended = {}
            ends: tuple[Literal["completed", "failed"] | None, ...] = ("completed", "failed", None)
            for end in ends:
                how = end or "cancelled"
                run = (await create(s, wf, how, key=how)).run
                held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
                if end is None:
                    done = await s.update_run_status(run.id, "cancelled")
                else:
                    done = await s.finish_run(held.lease, end, output=codec.encode(how))
                promise(done, P.LIVE_LEASE_ACCEPTED, f"ending run {run.id} as {how} was refused")
                ended[how] = run.id
            for how, run_id in ended.items():
                again = await create(s, wf, how, key=how)
                promise(
                    not again.created and again.run.id == run_id,
                    P.KEY_OUTLIVES_RUN,
                    f"a create with the key of a {how} run made {again.run.id} "
                    f"(created={again.created}), not {run_id}",
                )
                promise(
                    again.run.status == how,
                    P.KEY_OUTLIVES_RUN,
                    f"the {how} run came back {again.run.status}",
                )
                try:
                    other = await create(s, wf, "another input", key=how)
                except IdempotencyConflictError:
                    pass
                else:
                    promise(
                        False,
                        P.KEY_OUTLIVES_RUN,
                        f"another input with the key of a {how} run gave {other.run.id} "
                        f"(created={other.created}), not a conflict",
                    )
            promise(
                await s.claim_runs([wf], 10, reflow.long_lease) == [],
                P.KEY_OUTLIVES_RUN,
                "a repeated create of an ended run made something claimable",
            )

        reflow.run(body)
