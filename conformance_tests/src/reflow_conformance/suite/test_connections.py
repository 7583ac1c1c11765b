"""Several connections and several workflows: what one storage object writes,
another reads and claims at once; a claim for several workflows reclaims the
lapsed runs of each; and lapsed leases go before a backlog of due runs."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import ClaimedRun, RunRecord, StepRecord, Storage

from ._util import claim_only, create, create_many, decoded, step_differences

pytestmark = pytest.mark.reflow_conformance

__all__ = [
    "TestClaimsOfSeveralWorkflows",
    "TestLapsedBeforeBacklog",
    "TestReadsAcrossConnections",
]


async def _warm(storage: Storage, run_id: str, workflow: str) -> None:
    """Read a run every way there is, as a connection that has seen it before would."""
    await storage.get_run(run_id)
    await storage.get_step_results(run_id)
    await storage.list_runs(workflow=workflow)


async def _sees_run(
    reader: Storage, run_id: str, workflow: str, status: str, output: object, where: str
) -> RunRecord:
    """``reader`` reads the run in ``status`` through get_run and list_runs."""
    run = await reader.get_run(run_id)
    promise(
        run is not None and run.status == status,
        P.WRITES_SEEN_EVERYWHERE,
        f"{where}: get_run on the other connection gives {run}, expected status {status!r}",
    )
    assert run is not None
    promise(
        decoded(run.output) == output,
        P.WRITES_SEEN_EVERYWHERE,
        f"{where}: get_run on the other connection gives output {run.output!r}",
    )
    page = await reader.list_runs(workflow=workflow)
    listed = {r.id: r.status for r in page.runs}
    promise(
        listed.get(run_id) == status,
        P.WRITES_SEEN_EVERYWHERE,
        f"{where}: list_runs on the other connection gives {listed}, expected {status!r}",
    )
    return run


async def _sees_steps(
    reader: Storage, run_id: str, written: Mapping[str, StepRecord], where: str
) -> None:
    """``reader`` reads exactly the steps ``written`` through get_step_results."""
    steps = await reader.get_step_results(run_id)
    problems = [] if set(steps) == set(written) else [f"step names {sorted(steps)}"]
    for name, step in written.items():
        problems += step_differences(steps.get(name), step)
    promise(
        not problems,
        P.WRITES_SEEN_EVERYWHERE,
        f"{where}: get_step_results on the other connection: " + "; ".join(problems),
    )


def _step(name: str, value: object) -> StepRecord:
    return StepRecord(name, "completed", output=codec.encode(value))


class TestReadsAcrossConnections:
    def test_steps_and_statuses_written_on_one_connection_read_on_another(
        self, reflow: Harness
    ) -> None:
        async def body(first: Storage) -> None:
            second = await reflow.open()
            for writer, reader, way in ((first, second, "A->B"), (second, first, "B->A")):
                wf = reflow.unique()
                run_id = (await create(writer, wf)).run.id
                await _warm(reader, run_id, wf)
                held = await claim_only(writer, wf, P.CREATE_SHAPE)
                await _sees_run(reader, run_id, wf, "running", None, f"{way} claimed")
                written = {"a": _step("a", 1)}
                await writer.save_step_result(held.lease, written["a"], reflow.long_lease)
                await _sees_steps(reader, run_id, written, f"{way} step saved")
                written["a"] = _step("a", 2)
                await writer.save_step_result(held.lease, written["a"], reflow.long_lease)
                await _sees_steps(reader, run_id, written, f"{way} step saved again")
                written["b"] = _step("b", "last")
                done = await writer.finish_run(
                    held.lease, "completed", output=codec.encode("done"), step=written["b"]
                )
                promise(done, P.LIVE_LEASE_ACCEPTED, "finish_run with a live lease refused")
                await _sees_run(reader, run_id, wf, "completed", "done", f"{way} finished")
                await _sees_steps(reader, run_id, written, f"{way} finished")

                other = (await create(writer, wf)).run.id
                await _warm(reader, other, wf)
                held = await claim_only(writer, wf, P.CREATE_SHAPE)
                await _warm(reader, other, wf)
                await writer.save_step_result(held.lease, _step("c", 3), reflow.long_lease)
                await _warm(reader, other, wf)
                cancelled = await writer.update_run_status(other, "cancelled")
                promise(cancelled, P.CANCEL, "cancelling a running run returned False")
                await _sees_run(reader, other, wf, "cancelled", None, f"{way} cancelled")
                await _sees_steps(reader, other, {"c": _step("c", 3)}, f"{way} cancelled")

        reflow.run(body)

    def test_a_reclaim_on_another_connection_carries_the_latest_steps(
        self, reflow: Harness
    ) -> None:
        async def body(first: Storage) -> None:
            second = await reflow.open()
            pairs = ((first, second, "A->B"), (second, first, "B->A"))
            held: list[tuple[Storage, Storage, str, str, ClaimedRun]] = []
            for writer, reader, way in pairs:
                wf = reflow.unique()
                await create(writer, wf)
                claim = await claim_only(writer, wf, P.CREATE_SHAPE, reflow.short_lease)
                await _warm(reader, claim.run.id, wf)
                await writer.save_step_result(claim.lease, _step("a", 1), reflow.short_lease)
                await _warm(reader, claim.run.id, wf)
                await writer.save_step_result(claim.lease, _step("a", 2), reflow.short_lease)
                held.append((writer, reader, way, wf, claim))
            await reflow.lapse()
            for writer, reader, way, wf, claim in held:
                written = {"a": _step("a", 2)}
                again = await reader.claim_runs([wf], 10, reflow.long_lease)
                promise(
                    [c.run.id for c in again] == [claim.run.id] and again[0].reclaimed,
                    P.RECLAIM_AFTER_LAPSE,
                    f"{way}: the other connection claimed {[c.run.id for c in again]} "
                    f"after {claim.run.id} lapsed",
                )
                problems = step_differences(again[0].steps.get("a"), written["a"])
                promise(
                    not problems and set(again[0].steps) == {"a"},
                    P.WRITES_SEEN_EVERYWHERE,
                    f"{way}: the reclaim on the other connection carries "
                    f"{dict(again[0].steps)}: {problems}",
                )
                await _sees_steps(reader, claim.run.id, written, f"{way} reclaimed")
                await _sees_run(reader, claim.run.id, wf, "running", None, f"{way} reclaimed")
                written["a"] = _step("a", 3)
                await reader.save_step_result(again[0].lease, written["a"], reflow.long_lease)
                await _sees_steps(writer, claim.run.id, written, f"{way} saved by the reclaimer")

        reflow.run(body)


class TestClaimsOfSeveralWorkflows:
    def test_one_claim_reclaims_the_lapsed_runs_of_every_workflow(self, reflow: Harness) -> None:
        async def body(s: Storage) -> None:
            w1, w2, w3, w4 = (reflow.unique() for _ in range(4))
            lapsed: dict[str, str] = {}
            for wf in (w1, w2, w3, w4):
                await create(s, wf)
                claimed = await s.claim_runs([wf], 1, reflow.short_lease)
                promise(len(claimed) == 1, P.CLAIM_LIMIT, f"claimed {len(claimed)} of {wf}")
                lapsed[wf] = claimed[0].run.id
            # A due run of the workflow named second, too.
            pending = {w2: (await create(s, w2)).run.id, w3: (await create(s, w3)).run.id}
            await reflow.lapse()
            other = await reflow.open()
            for order in ([w1, w2], [w4, w3]):
                claimed = await other.claim_runs(order, 10, reflow.long_lease)
                got = {c.run.id: c.reclaimed for c in claimed}
                first, second = order
                expected = {lapsed[first]: True, lapsed[second]: True, pending[second]: False}
                promise(
                    got == expected,
                    P.CLAIM_EVERY_WORKFLOW,
                    f"claim_runs({order}, 10) took {got} (run id: reclaimed), expected "
                    f"{expected}: the lapsed runs of both workflows and the pending one",
                )

        reflow.run(body)


class TestLapsedBeforeBacklog:
    def test_a_lapsed_lease_goes_before_a_backlog_due_earlier(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            # `early` is created before the run that will lapse and handed back
            # before it lapses: it comes first by creation, insertion and due time.
            early, doomed = await create_many(s, wf, 2)
            held = {c.run.id: c for c in await s.claim_runs([wf], 2, reflow.short_lease)}
            promise(set(held) == {early, doomed}, P.CLAIM_LIMIT, f"claimed {sorted(held)}")
            handed = await s.update_run_status(early, "pending", lease=held[early].lease)
            promise(handed, P.HAND_BACK, "hand back with a live lease refused")
            backlog = [early, *await create_many(s, wf, 3)]
            await reflow.lapse()
            other = await reflow.open()
            for limit in (1, 2):
                # The second round takes the lapsed run of the first claim's holder.
                claimed = await other.claim_runs([wf], limit, reflow.short_lease)
                ids = [c.run.id for c in claimed]
                promise(
                    doomed in ids and claimed[ids.index(doomed)].reclaimed,
                    P.RECLAIM_PREFERRED,
                    f"claim_runs limit {limit} took {ids}, not the lapsed run {doomed}, "
                    f"with {len(backlog)} runs due before it lapsed: {backlog}",
                )
                if limit == 1:
                    await reflow.lapse()

        reflow.run(body)
