"""Events: delivering, buffering, waking a waiting run, and taking each event
exactly once, oldest first, as the result of a wait step. (The cap on a run's
buffered events is in ``test_event_buffer``.)"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_core import codec
from reflow_core.storage import Lease, StepRecord, Storage

from ._events import drain_events, nothing_found, took
from ._util import claim_one, create, create_many, decoded, read_run

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestDeliver", "TestEventIds", "TestEventOrder", "TestEventsOutlastPauses", "TestTake"]

NAP = timedelta(minutes=30)


async def _claimed_ids(reflow: Harness, s: Storage, wf: str) -> list[str]:
    return [c.run.id for c in await s.claim_runs([wf], 10, reflow.long_lease)]


class TestDeliver:
    def test_an_event_wakes_a_run_waiting_for_it(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            waited = await s.wait_run(held.lease, "hold", "approve", None)
            promise(waited is not None and not waited.ready, P.EVENT_ISOLATION, f"{waited}")
            other = await reflow.open()
            sent = await other.deliver_event(run_id, "other", codec.encode("not it"))
            promise(sent, P.EVENT_BUFFERED, "deliver_event to a waiting run returned False")
            promise(
                await _claimed_ids(reflow, s, wf) == [],
                P.EVENT_ISOLATION,
                "an event of another name woke the waiting run",
            )
            run = await s.get_run(run_id)
            promise(run is not None and run.status == "waiting", P.EVENT_ISOLATION, f"run {run}")
            sent = await other.deliver_event(run_id, "approve", codec.encode({"by": "ann"}))
            promise(sent, P.EVENT_WAKES, "deliver_event to a waiting run returned False")
            woken = await _claimed_ids(reflow, s, wf)
            promise(woken == [run_id], P.EVENT_WAKES, f"after its event, claimed {woken}")
            page = await s.claim_runs([wf], 10, reflow.long_lease)
            promise(page == [], P.ONE_LIVE_LEASE, f"claimed the woken run twice: {page}")

        reflow.run(body)

    def test_an_event_wakes_a_wait_with_a_long_timeout(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            await s.wait_run(held.lease, "hold", "approve", NAP)
            promise(await _claimed_ids(reflow, s, wf) == [], P.NOT_DUE_NOT_CLAIMABLE, "waiter")
            await s.deliver_event(run_id, "approve", codec.encode(1))
            woken = await s.claim_runs([wf], 10, reflow.long_lease)
            promise(
                [c.run.id for c in woken] == [run_id],
                P.EVENT_WAKES,
                f"after its event, claimed {woken}",
            )
            lease = woken[0].lease
            waited = await s.wait_run(lease, "hold", "approve", NAP)
            promise(waited is not None and waited.ready, P.EVENT_WAKES, f"re-wait gave {waited}")
            take = await s.take_event(lease, "hold", "approve")
            promise(took(take, 1), P.EVENT_BUFFERED, f"take gave {take}")
            rest = await drain_events(s, lease, "other", "o")
            promise(rest == [], P.EVENT_ISOLATION, f"events of another name: {rest}")

        reflow.run(body)

    def test_events_for_runs_that_are_not_waiting_are_buffered(self, reflow: Harness) -> None:
        wf = reflow.unique()
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            pending, running, napping, sleeping = await create_many(s, wf, 4)
            claimed = {c.run.id: c for c in await s.claim_runs([wf], 10, reflow.long_lease)}
            promise(len(claimed) == 4, P.NO_LOST_RUNS, f"claimed {len(claimed)} of 4")
            await s.update_run_status(pending, "pending", lease=claimed[pending].lease)
            await s.sleep_run(claimed[napping].lease, "nap", short)
            await s.sleep_run(claimed[sleeping].lease, "nap", NAP)
            other = await reflow.open()
            for run_id in (pending, running, napping, sleeping):
                before = await read_run(s, run_id)
                for i in range(2):
                    sent = await other.deliver_event(run_id, "ping", codec.encode([run_id, i]))
                    promise(sent, P.EVENT_BUFFERED, f"deliver to a {before.status} run: False")
                after = await s.get_run(run_id)
                promise(
                    after is not None and after.status == before.status,
                    P.EVENT_BUFFERED,
                    f"an event moved a {before.status} run to {after}",
                )
            leases = {running: claimed[running].lease}
            early = await other.claim_runs([wf], 10, reflow.long_lease)
            leases.update((c.run.id, c.lease) for c in early)
            promise(
                {c.run.id for c in early} in ({pending}, {pending, napping}),
                P.NOT_DUE_NOT_CLAIMABLE,
                f"an event woke a run that was not waiting for it: claimed {early}",
            )
            await reflow.lapse(short)
            late = await s.claim_runs([wf], 10, reflow.long_lease)
            leases.update((c.run.id, c.lease) for c in late)
            promise(
                set(leases) == {pending, running, napping},
                P.DUE_CLAIMABLE,
                f"claimable runs {sorted(leases)}",
            )
            for run_id, lease in leases.items():
                found = await drain_events(s, lease, "ping", "take")
                promise(
                    found == [[run_id, 0], [run_id, 1]],
                    P.EVENT_BUFFERED,
                    f"run {run_id} took {found}",
                )

        reflow.run(body)

    def test_events_for_missing_or_finished_runs_are_refused(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            missing = reflow.unique("run")
            sent = await s.deliver_event(missing, "ping", codec.encode(1), event_id="e")
            promise(not sent, P.DELIVER_FINISHED, "deliver_event to a missing run returned True")
            promise(await s.get_run(missing) is None, P.DELIVER_FINISHED, "it created the run")
            completed, failed, cancelled = await create_many(s, wf, 3)
            claimed = {c.run.id: c for c in await s.claim_runs([wf], 10, reflow.long_lease)}
            await s.finish_run(claimed[completed].lease, "completed", output=codec.encode(1))
            await s.finish_run(claimed[failed].lease, "failed", error=codec.encode("x"))
            await s.update_run_status(cancelled, "cancelled", error=codec.encode("stop"))
            for run_id in (completed, failed, cancelled):
                before = await read_run(s, run_id)
                sent = await s.deliver_event(run_id, "ping", codec.encode("late"))
                promise(not sent, P.DELIVER_FINISHED, f"deliver to a {before.status} run: True")
                sent = await s.deliver_event(run_id, "ping", codec.encode("late"), event_id="i")
                promise(not sent, P.DELIVER_FINISHED, f"deliver to a {before.status} run: True")
                after = await s.get_run(run_id)
                promise(after == before, P.DELIVER_FINISHED, f"{before.status} run changed")
            for run_id in (failed, cancelled):
                await s.requeue_run(run_id)
            for held in await s.claim_runs([wf], 10, reflow.long_lease):
                found = await drain_events(s, held.lease, "ping", "take")
                promise(
                    found == [],
                    P.DELIVER_FINISHED,
                    f"events refused while the run was {held.run.id} ended were kept: {found}",
                )

        reflow.run(body)

    def test_an_event_delivered_before_the_wait_is_not_lost(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            await s.deliver_event(run_id, "go", codec.encode("early"))
            waited = await s.wait_run(held.lease, "hold", "go", None)
            promise(
                waited is not None and waited.ready,
                P.EVENT_BEFORE_WAIT,
                f"the event was buffered, wait_run gave {waited}",
            )
            run = await s.get_run(run_id)
            promise(
                run is not None and run.status == "running",
                P.EVENT_BEFORE_WAIT,
                f"after a ready wait the run is {run}",
            )
            take = await s.take_event(held.lease, "hold", "go")
            promise(took(take, "early"), P.EVENT_BEFORE_WAIT, f"take gave {take}")

        reflow.run(body)

    def test_an_event_racing_the_wait_is_not_lost(self, reflow: Harness) -> None:
        wf = reflow.unique()
        rounds = 8

        async def race(s: Storage, other: Storage, run_id: str, lease: Lease) -> None:
            sent, waited = await asyncio.gather(
                other.deliver_event(run_id, "go", codec.encode(run_id)),
                s.wait_run(lease, "hold", "go", None),
            )
            promise(sent, P.EVENT_BUFFERED, "deliver_event to a live run returned False")
            promise(waited is not None, P.LIVE_LEASE_ACCEPTED, "wait_run refused a live lease")
            assert waited is not None
            if not waited.ready:
                woken = await other.claim_runs([wf], 10, reflow.long_lease)
                promise(
                    [c.run.id for c in woken] == [run_id],
                    P.EVENT_BEFORE_WAIT,
                    f"the event came as the run began to wait; claimed {woken}",
                )
                lease = woken[0].lease
            take = await s.take_event(lease, "hold", "go")
            promise(took(take, run_id), P.EVENT_BEFORE_WAIT, f"take gave {take}")
            await s.finish_run(lease, "completed", output=codec.encode(None))

        async def body(s: Storage) -> None:
            other = await reflow.open()
            for _ in range(rounds):
                run_id = (await create(s, wf)).run.id
                held = await claim_one(s, wf)
                await race(s, other, run_id, held.lease)

        reflow.run(body)


class TestTake:
    def test_take_consumes_the_oldest_event_once(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            for i in range(3):
                await s.deliver_event(run_id, "e", codec.encode({"n": i}))
            first = await s.take_event(held.lease, "w1", "e")
            promise(took(first, {"n": 0}), P.EVENT_ONCE_IN_ORDER, f"first take gave {first}")
            second = await s.take_event(held.lease, "w2", "e")
            promise(took(second, {"n": 1}), P.EVENT_ONCE_IN_ORDER, f"second take gave {second}")
            third = await s.take_event(held.lease, "w3", "e")
            promise(took(third, {"n": 2}), P.EVENT_ONCE_IN_ORDER, f"third take gave {third}")
            fourth = await s.take_event(held.lease, "w4", "e")
            promise(nothing_found(fourth), P.EVENT_ONCE_IN_ORDER, f"a fourth take gave {fourth}")
            run = await s.get_run(run_id)
            promise(
                run is not None and run.status == "running" and run.lease_epoch == held.lease.epoch,
                P.LIVE_LEASE_ACCEPTED,
                f"after takes the run is {run}",
            )

        reflow.run(body)

    def test_a_taken_event_is_the_completed_result_of_its_step(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            await s.wait_run(held.lease, "w1", "e", NAP)
            for i in range(2):
                await s.deliver_event(run_id, "e", codec.encode(f"payload-{i}"))
            woken = await claim_one(s, wf, name=P.EVENT_WAKES)
            take = await s.take_event(woken.lease, "w1", "e")
            promise(took(take, "payload-0"), P.EVENT_ONCE_IN_ORDER, f"take gave {take}")
            steps = await s.get_step_results(run_id)
            step = steps.get("w1")
            promise(
                step is not None
                and step.status == "completed"
                and decoded(step.output) == "payload-0",
                P.EVENT_TAKE_SAVES,
                f"after the take, step w1 is {step!r}",
            )
            retried = await s.take_event(woken.lease, "w1", "e")
            promise(
                took(retried, "payload-0"),
                P.EVENT_TAKE_SAVES,
                f"a retried take of a completed step gave {retried}",
            )
            rest = await drain_events(s, woken.lease, "e", "next")
            promise(
                rest == ["payload-1"],
                P.EVENT_TAKE_SAVES,
                f"a retried take consumed an event: left {rest}",
            )
            saved = await s.get_step_results(run_id)
            promise(
                saved.get("w1") is not None and decoded(saved["w1"].output) == "payload-0",
                P.EVENT_TAKE_SAVES,
                f"step w1 became {saved.get('w1')!r}",
            )

        reflow.run(body)

    def test_a_take_of_a_completed_step_returns_its_output(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            done = StepRecord("w1", "completed", output=codec.encode({"saved": True}))
            await s.save_step_result(held.lease, done, reflow.long_lease)
            await s.deliver_event(run_id, "e", codec.encode("buffered"))
            take = await s.take_event(held.lease, "w1", "e")
            promise(
                took(take, {"saved": True}),
                P.EVENT_TAKE_SAVES,
                f"take for an already completed step gave {take}",
            )
            rest = await drain_events(s, held.lease, "e", "next")
            promise(rest == ["buffered"], P.EVENT_TAKE_SAVES, f"it consumed an event: {rest}")

        reflow.run(body)

    def test_take_with_nothing_buffered_finds_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            take = await s.take_event(held.lease, "w1", "e")
            promise(
                nothing_found(take), P.EVENT_ONCE_IN_ORDER, f"take with nothing buffered: {take}"
            )
            await s.deliver_event(run_id, "other", codec.encode(1))
            take = await s.take_event(held.lease, "w1", "e")
            promise(
                nothing_found(take), P.EVENT_ISOLATION, f"took an event of another name: {take}"
            )
            step = (await s.get_step_results(run_id)).get("w1")
            promise(
                step is None or step.status != "completed",
                P.EVENT_ONCE_IN_ORDER,
                f"a take that found nothing completed its step: {step!r}",
            )

        reflow.run(body)

    def test_events_never_cross_runs_or_names(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            first, second = await create_many(s, wf, 2)
            leases = {c.run.id: c.lease for c in await s.claim_runs([wf], 2, reflow.long_lease)}
            promise(len(leases) == 2, P.NO_LOST_RUNS, f"claimed {len(leases)} of 2")
            await s.deliver_event(first, "x", codec.encode("first-x-0"))
            await s.deliver_event(first, "y", codec.encode("first-y-0"))
            await s.deliver_event(second, "x", codec.encode("second-x-0"))
            await s.deliver_event(first, "x", codec.encode("first-x-1"))
            nothing = await s.take_event(leases[second], "sy", "y")
            promise(
                nothing_found(nothing), P.EVENT_ISOLATION, f"second took another run's y: {nothing}"
            )
            seen = {
                (second, "x"): await drain_events(s, leases[second], "x", "sx"),
                (first, "y"): await drain_events(s, leases[first], "y", "fy"),
                (first, "x"): await drain_events(s, leases[first], "x", "fx"),
                (second, "y"): await drain_events(s, leases[second], "y", "sy2"),
            }
            expected = {
                (second, "x"): ["second-x-0"],
                (first, "y"): ["first-y-0"],
                (first, "x"): ["first-x-0", "first-x-1"],
                (second, "y"): [],
            }
            promise(seen == expected, P.EVENT_ISOLATION, f"took {seen}")

        reflow.run(body)

    def test_take_with_a_stale_lease_is_refused(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf, reflow.short_lease)
            await s.deliver_event(run_id, "e", codec.encode("kept"))
            await reflow.lapse()
            lapsed = await s.take_event(held.lease, "w1", "e")
            promise(lapsed is None, P.STALE_LEASE_REFUSED, f"take with a lapsed lease: {lapsed}")
            other = await reflow.open()
            again = await claim_one(other, wf, name=P.RECLAIM_AFTER_LAPSE)
            stale = await s.take_event(held.lease, "w1", "e")
            promise(stale is None, P.STALE_LEASE_REFUSED, f"take with a superseded lease: {stale}")
            steps = await other.get_step_results(run_id)
            promise("w1" not in steps, P.STALE_LEASE_REFUSED, f"a stale take saved {steps}")
            take = await other.take_event(again.lease, "w1", "e")
            promise(took(take, "kept"), P.STALE_LEASE_REFUSED, f"the event was lost: {take}")

        reflow.run(body)


class TestEventIds:
    def test_a_repeated_event_id_is_delivered_once(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id, neighbour = await create_many(s, wf, 2)
            other = await reflow.open()
            for store, value in ((s, "a"), (other, "b"), (s, "c")):
                sent = await store.deliver_event(run_id, "e", codec.encode(value), event_id="id-1")
                promise(sent, P.EVENT_DEDUPE, "a repeated event id was not acknowledged")
            sent = await s.deliver_event(run_id, "other", codec.encode("o"), event_id="id-1")
            promise(sent, P.EVENT_DEDUPE, "a repeated event id was not acknowledged")
            await s.deliver_event(run_id, "e", codec.encode("d"), event_id="id-2")
            await s.deliver_event(run_id, "e", codec.encode("e"))
            await s.deliver_event(run_id, "e", codec.encode("e"))
            await s.deliver_event(neighbour, "e", codec.encode("n"), event_id="id-1")
            leases = {c.run.id: c.lease for c in await s.claim_runs([wf], 2, reflow.long_lease)}
            found = await drain_events(s, leases[run_id], "e", "take")
            promise(
                found == ["a", "d", "e", "e"],
                P.EVENT_DEDUPE,
                f"delivered a, b, c (id-1), d (id-2), e, e (no id); took {found}",
            )
            others = await drain_events(s, leases[run_id], "other", "other")
            promise(others == [], P.EVENT_DEDUPE, f"id-1 again under another name: {others}")
            theirs = await drain_events(s, leases[neighbour], "e", "take")
            promise(theirs == ["n"], P.EVENT_ISOLATION, f"another run's id-1 event: {theirs}")
            for event_id in ("id-1", "id-2"):
                sent = await s.deliver_event(run_id, "e", codec.encode("late"), event_id=event_id)
                promise(sent, P.EVENT_DEDUPE, f"{event_id} after its take was not acknowledged")
            late = await drain_events(s, leases[run_id], "e", "late")
            promise(late == [], P.EVENT_DEDUPE, f"a taken event id was delivered again: {late}")

        reflow.run(body)

    def test_concurrent_deliveries_of_one_event_id_buffer_one_event(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            stores = [s, *[await reflow.open() for _ in range(3)]]
            results = await asyncio.gather(
                *(
                    stores[i % len(stores)].deliver_event(
                        run_id, "e", codec.encode(i), event_id="once"
                    )
                    for i in range(12)
                )
            )
            promise(all(results), P.EVENT_DEDUPE, f"deliveries answered {results}")
            held = await claim_one(s, wf)
            found = await drain_events(s, held.lease, "e", "take")
            promise(len(found) == 1, P.EVENT_DEDUPE, f"one event id, took {found}")

        reflow.run(body)


class TestEventOrder:
    def test_takes_follow_delivery_order_per_run_and_name(self, reflow: Harness) -> None:
        op = st.tuples(
            st.sampled_from(["deliver", "take"]), st.integers(0, 1), st.sampled_from("ab")
        )

        @suite_settings()
        @given(st.lists(op, max_size=24))
        def check(ops: list[tuple[str, int, str]]) -> None:
            async def body(s: Storage) -> None:
                wf = reflow.unique()
                runs = await create_many(s, wf, 2)
                claimed = {
                    c.run.id: c.lease for c in await s.claim_runs([wf], 2, reflow.long_lease)
                }
                promise(len(claimed) == 2, P.NO_LOST_RUNS, f"claimed {len(claimed)} of 2")
                leases = [claimed[run_id] for run_id in runs]
                model: dict[tuple[int, str], deque[object]] = {
                    (r, n): deque() for r in (0, 1) for n in "ab"
                }
                for i, (kind, r, name) in enumerate(ops):
                    if kind == "deliver":
                        value = [r, name, i]
                        sent = await s.deliver_event(runs[r], name, codec.encode(value))
                        promise(sent, P.EVENT_BUFFERED, f"delivery {i} returned False")
                        model[(r, name)].append(value)
                        continue
                    take = await s.take_event(leases[r], f"take-{i}", name)
                    queue = model[(r, name)]
                    if queue:
                        expected = queue.popleft()
                        promise(
                            took(take, expected),
                            P.EVENT_ONCE_IN_ORDER,
                            f"op {i}: run {r} event {name!r} expected {expected}, took {take}",
                        )
                    else:
                        promise(
                            nothing_found(take),
                            P.EVENT_ISOLATION,
                            f"op {i}: run {r} event {name!r} has nothing buffered, took {take}",
                        )
                for (r, name), queue in model.items():
                    rest = await drain_events(s, leases[r], name, f"drain-{name}")
                    promise(
                        rest == list(queue),
                        P.EVENT_ONCE_IN_ORDER,
                        f"run {r} event {name!r}: expected {list(queue)}, took {rest}",
                    )

            reflow.run(body)

        check()


class TestEventsOutlastPauses:
    """Events buffered while a run is running are still there after anything
    short of its end: a sleep, a hand back, a wait for another event that
    times out, a lapsed lease and its reclaim. (A store that clears a run's
    buffer on every status change loses them.)"""

    def test_buffered_events_outlast_every_pause(self, reflow: Harness) -> None:
        wf = reflow.unique()
        short = reflow.short_lease

        async def body(s: Storage) -> None:
            napping, handed, waiting, lapsing = await create_many(s, wf, 4)
            claimed = {c.run.id: c for c in await s.claim_runs([wf], 10, short)}
            promise(len(claimed) == 4, P.NO_LOST_RUNS, f"claimed {len(claimed)} of 4")
            for run_id in claimed:
                for i in range(2):
                    sent = await s.deliver_event(run_id, "ping", codec.encode([run_id, i]))
                    promise(sent, P.EVENT_BUFFERED, "deliver to a running run: False")
            paused = {
                napping: await s.sleep_run(claimed[napping].lease, "nap", short) is not None,
                handed: await s.update_run_status(handed, "pending", lease=claimed[handed].lease),
                waiting: await s.wait_run(claimed[waiting].lease, "other", "pong", short)
                is not None,
            }
            for run_id, done in paused.items():
                promise(done, P.LIVE_LEASE_ACCEPTED, f"pausing run {run_id} was refused")
            await reflow.lapse(short)
            again = {c.run.id: c for c in await s.claim_runs([wf], 10, reflow.long_lease)}
            promise(
                set(again) == set(claimed),
                P.DUE_CLAIMABLE,
                f"claimable again: {sorted(again)} of {sorted(claimed)}",
            )
            how = {
                napping: "slept",
                handed: "was handed back",
                waiting: "timed out waiting for another event",
                lapsing: "lost its lease and was reclaimed",
            }
            for run_id, held in again.items():
                found = await drain_events(s, held.lease, "ping", "take")
                promise(
                    found == [[run_id, 0], [run_id, 1]],
                    P.EVENT_BUFFERED,
                    f"a run that {how[run_id]} took {found}, not the two events buffered "
                    "while it ran",
                )

        reflow.run(body)
