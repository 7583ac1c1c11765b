"""Claiming runs: batch limits, workflow filters, the claimed run's shape, its
saved steps, and disjoint claims under concurrency."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_core import codec
from reflow_core.storage import ClaimedRun, StepRecord, Storage

from ._util import claim_one, claim_only, create, create_many, read_run, step_differences

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestClaimBatches", "TestClaimOrder", "TestClaimedRun", "TestConcurrentClaims"]

# Room for clocks that disagree by a little and for stores that keep
# timestamps at millisecond precision.
_SLACK = timedelta(seconds=5)


async def _claim_all(
    storage: Storage, workflow: str, limit: int, expected: int, lease: timedelta
) -> list[ClaimedRun]:
    """Claim in batches of ``limit`` until ``expected`` runs are claimed or a
    claim comes back empty; check every batch against ``limit``."""
    claimed: list[ClaimedRun] = []
    for _ in range(expected + 1):
        batch = await storage.claim_runs([workflow], limit, lease)
        promise(len(batch) <= limit, P.CLAIM_LIMIT, f"limit {limit}, claimed {len(batch)}")
        if not batch:
            break
        claimed.extend(batch)
    return claimed


class TestClaimBatches:
    def test_a_claim_takes_at_most_limit_runs(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            ids = await create_many(s, wf, 7)
            first = await s.claim_runs([wf], 3, reflow.long_lease)
            promise(1 <= len(first) <= 3, P.CLAIM_LIMIT, f"limit 3, claimed {len(first)}")
            one = await s.claim_runs([wf], 1, reflow.long_lease)
            promise(len(one) == 1, P.CLAIM_LIMIT, f"limit 1, claimed {len(one)}")
            rest = await _claim_all(s, wf, 3, 7, reflow.long_lease)
            claimed = [c.run.id for c in [*first, *one, *rest]]
            promise(len(claimed) == len(set(claimed)), P.ONE_LIVE_LEASE, f"claimed {claimed}")
            promise(set(claimed) == set(ids), P.NO_LOST_RUNS, f"created {ids}, got {claimed}")

        reflow.run(body)

    def test_only_the_named_workflows_are_claimed(self, reflow: Harness) -> None:
        a, b, c = reflow.unique(), reflow.unique(), reflow.unique()

        async def body(s: Storage) -> None:
            ids_a = await create_many(s, a, 3)
            ids_b = await create_many(s, b, 3)
            ids_c = await create_many(s, c, 3)
            claimed: list[ClaimedRun] = []
            for _ in range(7):
                batch = await s.claim_runs([a, b], 100, reflow.long_lease)
                if not batch:
                    break
                claimed.extend(batch)
            got = {cl.run.id for cl in claimed}
            named = {*ids_a, *ids_b}
            promise(got <= named, P.CLAIM_LIMIT, f"claimed runs of other workflows: {got - named}")
            promise(got == named, P.NO_LOST_RUNS, f"never claimed: {named - got}")
            promise(
                all(cl.run.workflow in (a, b) for cl in claimed),
                P.CLAIM_LIMIT,
                f"workflows {[cl.run.workflow for cl in claimed]}",
            )
            none = await s.claim_runs([], 100, reflow.long_lease)
            promise(none == [], P.CLAIM_LIMIT, f"no workflow named, claimed {len(none)} runs")
            for run_id in ids_c:
                run = await read_run(s, run_id)
                promise(
                    (run.status, run.attempts) == ("pending", 0),
                    P.CLAIM_LIMIT,
                    f"a run of an unnamed workflow was touched: {run}",
                )

        reflow.run(body)

    def test_the_limit_holds_across_workflows(self, reflow: Harness) -> None:
        """``limit`` bounds the whole claim, not each workflow named: due runs
        and lapsed leases of three workflows, claimed four at a time."""
        names = [reflow.unique() for _ in range(3)]
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            for name in names:
                await create_many(s, name, 3)
            batches = [await s.claim_runs(names, 4, short) for _ in range(3)]
            sizes = [len(batch) for batch in batches]
            promise(
                all(size <= 4 for size in sizes),
                P.CLAIM_LIMIT,
                f"claims of limit 4 over three workflows took {sizes} runs",
            )
            promise(sum(sizes) == 9, P.NO_LOST_RUNS, f"claimed {sizes} of 9 due runs")
            await reflow.lapse(short)
            again = await s.claim_runs(names, 4, reflow.long_lease)
            promise(
                len(again) <= 4,
                P.CLAIM_LIMIT,
                f"a claim of limit 4 over three workflows' lapsed leases took {len(again)}",
            )

        reflow.run(body)

    def test_a_workflow_named_twice_is_claimed_once(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            ids = await create_many(s, wf, 3)
            claimed = await s.claim_runs([wf, wf, wf], 3, reflow.long_lease)
            got = [cl.run.id for cl in claimed]
            promise(
                len(got) == len(set(got)),
                P.ONE_LIVE_LEASE,
                f"a claim naming {wf!r} three times handed out one run more than once: "
                f"{[(cl.run.id, cl.lease.epoch) for cl in claimed]}",
            )
            promise(set(got) <= set(ids), P.CLAIM_LIMIT, f"claimed {got}, created {ids}")
            for cl in claimed:
                promise(
                    cl.lease.epoch == 1, P.CLAIM_COUNTS, f"first claim at epoch {cl.lease.epoch}"
                )

        reflow.run(body)

    def test_nothing_to_claim_gives_an_empty_list(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            promise(await s.claim_runs([wf], 10, reflow.long_lease) == [], P.CLAIM_LIMIT)
            await create(s, wf)
            await claim_one(s, wf)
            again = await s.claim_runs([wf], 10, reflow.long_lease)
            promise(again == [], P.ONE_LIVE_LEASE, f"claimed a held run again: {again}")

        reflow.run(body)

    def test_limit_zero_claims_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            ids = await create_many(s, wf, 2)
            got = await s.claim_runs([wf], 0, reflow.long_lease)
            promise(got == [], P.CLAIM_LIMIT, f"limit 0 claimed {len(got)} runs")
            for run_id in ids:
                run = await read_run(s, run_id)
                promise(
                    (run.status, run.attempts, run.lease_epoch) == ("pending", 0, 0),
                    P.CLAIM_LIMIT,
                    f"limit 0 touched {run}",
                )

        reflow.run(body)

    @settings(suite_settings())
    @given(
        runs=st.integers(min_value=0, max_value=20),
        limits=st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=5),
    )
    def test_repeated_claims_partition_the_runs(
        self, reflow: Harness, runs: int, limits: list[int]
    ) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            ids = set(await create_many(s, wf, runs))
            seen: list[str] = []
            for turn in range(runs + 1):
                limit = limits[turn % len(limits)]
                batch = await s.claim_runs([wf], limit, reflow.long_lease)
                promise(len(batch) <= limit, P.CLAIM_LIMIT, f"limit {limit}, got {len(batch)}")
                if len(seen) < runs:
                    promise(batch, P.NO_LOST_RUNS, f"{runs - len(seen)} pending runs not claimed")
                else:
                    promise(batch == [], P.ONE_LIVE_LEASE, f"claimed again: {batch}")
                seen.extend(c.run.id for c in batch)
                if not batch:
                    break
            promise(len(seen) == len(set(seen)), P.ONE_LIVE_LEASE, f"claims overlap: {seen}")
            promise(set(seen) == ids, P.NO_LOST_RUNS, f"created {sorted(ids)}, got {seen}")

        reflow.run(body)


class TestClaimOrder:
    def test_due_runs_are_claimed_earliest_first(self, reflow: Harness) -> None:
        """One at a time, a workflow's due runs come out in the order they fell
        due: creation order, and a run handed back goes behind the runs that
        were already waiting (a last-in, first-out claim starves old runs)."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            made = []
            for i in range(5):
                made.append((await create(s, wf, i)).run.id)
                await asyncio.sleep(0.003)  # due times apart by more than a millisecond
            taken = await s.claim_runs([wf], 1, reflow.long_lease)
            promise(len(taken) == 1, P.CLAIM_LIMIT, f"limit 1, claimed {len(taken)}")
            first = taken[0]
            await asyncio.sleep(0.003)
            handed = await s.update_run_status(first.run.id, "pending", lease=first.lease)
            promise(handed, P.LIVE_LEASE_ACCEPTED, "hand back with a fresh lease refused")
            await asyncio.sleep(0.003)
            last = (await create(s, wf, "last")).run.id
            order = []
            for _ in range(7):
                claimed = await s.claim_runs([wf], 1, reflow.long_lease)
                if not claimed:
                    break
                order.append(claimed[0].run.id)
            expected = [*made[1:], first.run.id, last]
            promise(
                order == expected,
                P.DUE_ORDER,
                "claimed one at a time in the order "
                f"{[expected.index(run_id) if run_id in expected else run_id for run_id in order]}"
                " of the order they fell due",
            )

        reflow.run(body)

    def test_only_claims_count_attempts(self, reflow: Harness) -> None:
        """Pauses, renewals, step saves and events leave ``attempts``,
        ``lease_epoch`` and ``reclaims`` alone; each claim adds one attempt
        and one epoch."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            counts: list[tuple[str, int, int]] = []

            async def check(after: str, claims: int) -> None:
                run = await read_run(s, run_id)
                counts.append((after, run.attempts, run.lease_epoch))
                promise(
                    (run.attempts, run.lease_epoch, run.reclaims) == (claims, claims, 0),
                    P.ONLY_CLAIMS_COUNT,
                    f"after {claims} claims, attempts, lease_epoch, reclaims went "
                    f"{[(what, a, e) for what, a, e in counts]} and reclaims is {run.reclaims}",
                )

            held = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            await check("a claim", 1)
            await s.heartbeat_run(held.lease, reflow.long_lease)
            step = StepRecord("a", "completed", output=codec.encode(1))
            await s.save_step_result(held.lease, step, reflow.long_lease)
            await check("a heartbeat and a step save", 1)
            await s.sleep_run(held.lease, "nap", timedelta(0))
            await check("a sleep", 1)
            held = await claim_only(s, wf, P.DUE_CLAIMABLE)
            await s.deliver_event(run_id, "go", codec.encode("x"))
            await s.wait_run(held.lease, "wait", "go", reflow.long_lease)
            await s.take_event(held.lease, "wait", "go")
            await check("an event, a wait and a take", 2)
            await s.wait_run(held.lease, "wait-2", "never", timedelta(0))
            await check("a wait that timed out", 2)
            held = await claim_only(s, wf, P.DUE_CLAIMABLE)
            await s.update_run_status(run_id, "pending", lease=held.lease)
            await check("a hand back", 3)

        reflow.run(body)


class TestClaimedRun:
    def test_claimed_run_is_running_under_a_new_lease(self, reflow: Harness) -> None:
        wf = reflow.unique()
        lease = reflow.long_lease

        async def body(s: Storage) -> None:
            created = (await create(s, wf, {"n": 1})).run
            claimed = await s.claim_runs([wf], 10, lease)
            probe = (await create(s, reflow.unique())).run  # the storage clock, after the claim
            promise(len(claimed) == 1, P.NO_LOST_RUNS, f"claimed {len(claimed)} of 1 run")
            c = claimed[0]
            run = c.run
            promise(
                run.id == created.id and c.lease.run_id == run.id and run.workflow == wf,
                P.CLAIMED_RUNNING,
                f"claimed {run.id} with lease {c.lease}, created {created.id}",
            )
            promise(run.status == "running", P.CLAIMED_RUNNING, f"status {run.status!r}")
            promise(
                (run.attempts, run.lease_epoch, run.reclaims) == (1, 1, 0),
                P.CLAIM_COUNTS,
                f"attempts {run.attempts}, epoch {run.lease_epoch}, reclaims {run.reclaims}",
            )
            promise(c.lease.epoch == run.lease_epoch, P.CLAIM_COUNTS, f"{c.lease} vs {run}")
            promise(not c.reclaimed, P.RECLAIM_AFTER_LAPSE, "a first claim reported as a reclaim")
            promise(codec.decode(run.input) == {"n": 1}, P.ROUND_TRIP, run.input)
            promise(run.wake_at is None, P.CLAIMED_RUNNING, f"wake_at {run.wake_at} not cleared")
            expires = run.lease_expires_at
            promise(
                expires is not None and expires.utcoffset() == timedelta(0),
                P.CLAIMED_RUNNING,
                f"lease_expires_at {expires!r} is not an aware UTC datetime",
            )
            assert expires is not None
            earliest = created.created_at + lease - _SLACK
            latest = probe.created_at + lease + _SLACK
            promise(
                earliest <= expires <= latest,
                P.CLAIMED_RUNNING,
                f"a {lease} lease claimed between {created.created_at} and "
                f"{probe.created_at} expires at {expires}",
            )
            stored = await read_run(s, run.id)
            promise(
                (stored.status, stored.attempts, stored.lease_epoch, stored.lease_expires_at)
                == ("running", 1, 1, expires),
                P.CLAIMED_RUNNING,
                f"claim returned {run}, store holds {stored}",
            )

        reflow.run(body)

    def test_a_claimed_run_carries_its_saved_steps(self, reflow: Harness) -> None:
        wf = reflow.unique()
        steps = [
            StepRecord("fetch", "completed", output=codec.encode({"rows": [1, 2]}), attempts=2),
            StepRecord("notify", "skipped"),
            StepRecord("charge", "failed", error=codec.encode({"type": "Boom"}), attempts=3),
        ]

        async def body(s: Storage) -> None:
            await create(s, wf)
            first = await claim_one(s, wf)
            promise(dict(first.steps) == {}, P.CLAIM_CARRIES_STEPS, f"new run: {first.steps}")
            for step in steps:
                saved = await s.save_step_result(first.lease, step, reflow.long_lease)
                promise(saved, P.LIVE_LEASE_ACCEPTED, f"save of {step.name!r} refused")
            handed = await s.update_run_status(first.run.id, "pending", lease=first.lease)
            promise(handed, P.HAND_BACK, "hand back refused")
            other = await reflow.open()
            again = await claim_only(other, wf, P.HAND_BACK)
            promise(
                set(again.steps) == {step.name for step in steps},
                P.CLAIM_CARRIES_STEPS,
                f"claimed with steps {sorted(again.steps)}",
            )
            for step in steps:
                diff = step_differences(again.steps.get(step.name), step)
                promise(not diff, P.CLAIM_CARRIES_STEPS, "; ".join(diff))

        reflow.run(body)


class TestConcurrentClaims:
    def test_concurrent_claimers_get_disjoint_runs(self, reflow: Harness) -> None:
        wf = reflow.unique()
        total = 60

        async def body(s: Storage) -> None:
            ids = set(await create_many(s, wf, total))
            stores = [s, *[await reflow.open() for _ in range(3)]]
            claims: list[ClaimedRun] = []
            refused: list[str] = []

            async def claimer(store: Storage, limit: int) -> None:
                idle = 0
                # More claims than runs means some run was claimed twice: stop there.
                while idle < 3 and len(claims) <= total:
                    batch = await store.claim_runs([wf], limit, reflow.long_lease)
                    promise(len(batch) <= limit, P.CLAIM_LIMIT, f"limit {limit}: {len(batch)}")
                    claims.extend(batch)
                    idle = 0 if batch else idle + 1
                    for c in batch:
                        output = codec.encode(c.run.id)
                        if not await store.finish_run(c.lease, "completed", output=output):
                            refused.append(c.run.id)
                    await asyncio.sleep(0)

            await asyncio.gather(*(claimer(stores[i % len(stores)], 1 + i % 4) for i in range(8)))
            # A claimer may give up while others hold rows it skipped: sweep the rest.
            leftovers = await _claim_all(s, wf, total, total, reflow.long_lease)
            for c in leftovers:
                await s.finish_run(c.lease, "completed", output=codec.encode(c.run.id))
            claimed = [c.run.id for c in [*claims, *leftovers]]
            twice = sorted({run_id for run_id in claimed if claimed.count(run_id) > 1})
            promise(not twice, P.ONE_LIVE_LEASE, f"claimed more than once: {twice}")
            promise(set(claimed) == ids, P.NO_LOST_RUNS, f"never claimed: {ids - set(claimed)}")
            promise(not refused, P.LIVE_LEASE_ACCEPTED, f"finish refused for {refused}")
            promise(
                all(c.run.lease_epoch == 1 for c in claims),
                P.CLAIM_COUNTS,
                "a run was claimed with an epoch other than 1",
            )
            for run_id in ids:
                run = await read_run(s, run_id)
                promise(
                    (run.status, run.attempts) == ("completed", 1),
                    P.ONE_LIVE_LEASE,
                    f"{run_id}: status {run.status!r} after {run.attempts} claims",
                )
                promise(codec.decode(run.output or "null") == run_id, P.NO_LOST_RUNS, repr(run))

        reflow.run(body)
