"""Events: delivering, buffering, waking a waiting run, and taking each event
exactly once, oldest first, as the result of a wait step."""

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
from reflow_core.errors import EventBufferFullError
from reflow_core.storage import EventTake, Lease, StepRecord, Storage

from ._util import claim_one, create, create_many, decoded

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestDeliver", "TestEventBuffer", "TestEventIds", "TestEventOrder", "TestTake"]

NAP = timedelta(minutes=30)


def _taken(take: EventTake | None, expected: object) -> bool:
    return take is not None and take.found and decoded(take.payload) == expected


def _nothing(take: EventTake | None) -> bool:
    return take is not None and not take.found and take.payload is None


async def _drain(s: Storage, lease: Lease, event: str, prefix: str) -> list[object]:
    """Take every buffered ``event`` (one wait step each), oldest first."""
    found: list[object] = []
    for i in range(100):
        take = await s.take_event(lease, f"{prefix}-{i}", event)
        promise(take is not None, P.LIVE_LEASE_ACCEPTED, "take_event refused a live lease")
        assert take is not None
        if not take.found:
            return found
        found.append(decoded(take.payload))
    promise(
        False,
        P.EVENT_ONCE_IN_ORDER,
        f"more than 100 {event!r} events taken: a take does not consume the event",
    )
    return found


async def _capped(
    s: Storage, run_id: str, event: str, value: object, cap: int, event_id: str | None = None
) -> bool | EventBufferFullError:
    """``deliver_event`` under a cap: its answer, or the refusal it raised."""
    try:
        return await s.deliver_event(
            run_id, event, codec.encode(value), event_id=event_id, max_buffered=cap
        )
    except EventBufferFullError as exc:
        return exc


def _full(got: bool | EventBufferFullError, run_id: str, event: str, cap: int) -> bool:
    """``got`` is the refusal of a full buffer, and says which run, event and cap."""
    return (
        isinstance(got, EventBufferFullError)
        and got.run_id == run_id
        and got.event == event
        and got.limit == cap
    )


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
            promise(_taken(take, 1), P.EVENT_BUFFERED, f"take gave {take}")
            rest = await _drain(s, lease, "other", "o")
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
                before = await s.get_run(run_id)
                assert before is not None
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
                found = await _drain(s, lease, "ping", "take")
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
                before = await s.get_run(run_id)
                assert before is not None
                sent = await s.deliver_event(run_id, "ping", codec.encode("late"))
                promise(not sent, P.DELIVER_FINISHED, f"deliver to a {before.status} run: True")
                sent = await s.deliver_event(run_id, "ping", codec.encode("late"), event_id="i")
                promise(not sent, P.DELIVER_FINISHED, f"deliver to a {before.status} run: True")
                after = await s.get_run(run_id)
                promise(after == before, P.DELIVER_FINISHED, f"{before.status} run changed")
            for run_id in (failed, cancelled):
                await s.requeue_run(run_id)
            for held in await s.claim_runs([wf], 10, reflow.long_lease):
                found = await _drain(s, held.lease, "ping", "take")
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
            promise(_taken(take, "early"), P.EVENT_BEFORE_WAIT, f"take gave {take}")

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
            promise(_taken(take, run_id), P.EVENT_BEFORE_WAIT, f"take gave {take}")
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
            promise(_taken(first, {"n": 0}), P.EVENT_ONCE_IN_ORDER, f"first take gave {first}")
            second = await s.take_event(held.lease, "w2", "e")
            promise(_taken(second, {"n": 1}), P.EVENT_ONCE_IN_ORDER, f"second take gave {second}")
            third = await s.take_event(held.lease, "w3", "e")
            promise(_taken(third, {"n": 2}), P.EVENT_ONCE_IN_ORDER, f"third take gave {third}")
            fourth = await s.take_event(held.lease, "w4", "e")
            promise(_nothing(fourth), P.EVENT_ONCE_IN_ORDER, f"a fourth take gave {fourth}")
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
            woken = await claim_one(s, wf)
            take = await s.take_event(woken.lease, "w1", "e")
            promise(_taken(take, "payload-0"), P.EVENT_ONCE_IN_ORDER, f"take gave {take}")
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
                _taken(retried, "payload-0"),
                P.EVENT_TAKE_SAVES,
                f"a retried take of a completed step gave {retried}",
            )
            rest = await _drain(s, woken.lease, "e", "next")
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
                _taken(take, {"saved": True}),
                P.EVENT_TAKE_SAVES,
                f"take for an already completed step gave {take}",
            )
            rest = await _drain(s, held.lease, "e", "next")
            promise(rest == ["buffered"], P.EVENT_TAKE_SAVES, f"it consumed an event: {rest}")

        reflow.run(body)

    def test_take_with_nothing_buffered_finds_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            held = await claim_one(s, wf)
            take = await s.take_event(held.lease, "w1", "e")
            promise(_nothing(take), P.EVENT_ONCE_IN_ORDER, f"take with nothing buffered: {take}")
            await s.deliver_event(run_id, "other", codec.encode(1))
            take = await s.take_event(held.lease, "w1", "e")
            promise(_nothing(take), P.EVENT_ISOLATION, f"took an event of another name: {take}")
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
            promise(_nothing(nothing), P.EVENT_ISOLATION, f"second took another run's y: {nothing}")
            seen = {
                (second, "x"): await _drain(s, leases[second], "x", "sx"),
                (first, "y"): await _drain(s, leases[first], "y", "fy"),
                (first, "x"): await _drain(s, leases[first], "x", "fx"),
                (second, "y"): await _drain(s, leases[second], "y", "sy2"),
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
            again = await claim_one(other, wf)
            stale = await s.take_event(held.lease, "w1", "e")
            promise(stale is None, P.STALE_LEASE_REFUSED, f"take with a superseded lease: {stale}")
            steps = await other.get_step_results(run_id)
            promise("w1" not in steps, P.STALE_LEASE_REFUSED, f"a stale take saved {steps}")
            take = await other.take_event(again.lease, "w1", "e")
            promise(_taken(take, "kept"), P.STALE_LEASE_REFUSED, f"the event was lost: {take}")

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
            found = await _drain(s, leases[run_id], "e", "take")
            promise(
                found == ["a", "d", "e", "e"],
                P.EVENT_DEDUPE,
                f"delivered a, b, c (id-1), d (id-2), e, e (no id); took {found}",
            )
            others = await _drain(s, leases[run_id], "other", "other")
            promise(others == [], P.EVENT_DEDUPE, f"id-1 again under another name: {others}")
            theirs = await _drain(s, leases[neighbour], "e", "take")
            promise(theirs == ["n"], P.EVENT_ISOLATION, f"another run's id-1 event: {theirs}")
            for event_id in ("id-1", "id-2"):
                sent = await s.deliver_event(run_id, "e", codec.encode("late"), event_id=event_id)
                promise(sent, P.EVENT_DEDUPE, f"{event_id} after its take was not acknowledged")
            late = await _drain(s, leases[run_id], "e", "late")
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
            found = await _drain(s, held.lease, "e", "take")
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
                            _taken(take, expected),
                            P.EVENT_ONCE_IN_ORDER,
                            f"op {i}: run {r} event {name!r} expected {expected}, took {take}",
                        )
                    else:
                        promise(
                            _nothing(take),
                            P.EVENT_ISOLATION,
                            f"op {i}: run {r} event {name!r} has nothing buffered, took {take}",
                        )
                for (r, name), queue in model.items():
                    rest = await _drain(s, leases[r], name, f"drain-{name}")
                    promise(
                        rest == list(queue),
                        P.EVENT_ONCE_IN_ORDER,
                        f"run {r} event {name!r}: expected {list(queue)}, took {rest}",
                    )

            reflow.run(body)

        check()


class TestEventBuffer:
    """The cap on a run's buffered events (``max_buffered``), and what becomes
    of a run's buffer when it ends."""

    def test_a_full_buffer_refuses_an_event_and_stores_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            for i in range(3):
                got = await _capped(s, run_id, "e", i, 3)
                promise(
                    got is True, P.EVENT_BUFFER_CAP, f"delivery {i + 1} under a cap of 3: {got!r}"
                )
            for event_id in (None, "refused"):
                got = await _capped(s, run_id, "e", "over", 3, event_id)
                promise(
                    _full(got, run_id, "e", 3),
                    P.EVENT_BUFFER_CAP,
                    f"a fourth delivery (event id {event_id!r}) under a cap of 3 gave {got!r}",
                )
            run = await s.get_run(run_id)
            promise(
                run is not None and run.status == "pending",
                P.EVENT_BUFFER_CAP,
                f"a refused delivery changed the run: {run}",
            )
            held = await claim_one(s, wf)
            found = await _drain(s, held.lease, "e", "take")
            promise(found == [0, 1, 2], P.EVENT_BUFFER_CAP, f"refused events were stored: {found}")
            got = await _capped(s, run_id, "e", "again", 3, "refused")
            promise(got is True, P.EVENT_BUFFER_CAP, f"with room again, delivery gave {got!r}")
            again = await _drain(s, held.lease, "e", "again")
            promise(
                again == ["again"],
                P.EVENT_BUFFER_CAP,
                f"the event id of a refused delivery was recorded: took {again}",
            )

        reflow.run(body)

    def test_the_cap_counts_every_event_name_of_the_run(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id, neighbour = await create_many(s, wf, 2)
            for name in ("a", "b"):
                got = await _capped(s, run_id, name, name, 2)
                promise(got is True, P.EVENT_BUFFER_CAP, f"delivery of {name!r} under 2: {got!r}")
            for name in ("c", "a"):
                got = await _capped(s, run_id, name, name, 2)
                promise(
                    _full(got, run_id, name, 2),
                    P.EVENT_BUFFER_ALL_NAMES,
                    f"a run holding one 'a' and one 'b' took {name!r} under a cap of 2: {got!r}",
                )
            got = await _capped(s, neighbour, "a", "theirs", 2)
            promise(got is True, P.EVENT_ISOLATION, f"another run's events count for it: {got!r}")
            sent = await s.deliver_event(run_id, "c", codec.encode("uncapped"))
            promise(sent, P.EVENT_BUFFERED, "a delivery without a cap was refused")
            leases = {c.run.id: c.lease for c in await s.claim_runs([wf], 2, reflow.long_lease)}
            promise(len(leases) == 2, P.NO_LOST_RUNS, f"claimed {len(leases)} of 2")
            seen = {name: await _drain(s, leases[run_id], name, name) for name in "abc"}
            promise(
                seen == {"a": ["a"], "b": ["b"], "c": ["uncapped"]},
                P.EVENT_BUFFER_CAP,
                f"took {seen}",
            )
            theirs = await _drain(s, leases[neighbour], "a", "a")
            promise(theirs == ["theirs"], P.EVENT_ISOLATION, f"the neighbour took {theirs}")

        reflow.run(body)

    def test_a_repeated_event_id_is_acknowledged_when_full(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            got = await _capped(s, run_id, "e", "first", 1, "x")
            promise(
                got is True, P.EVENT_BUFFER_CAP, f"the first delivery under a cap of 1: {got!r}"
            )
            for name in ("e", "other"):
                got = await _capped(s, run_id, name, "repeat", 1, "x")
                promise(
                    got is True,
                    P.EVENT_BUFFER_FULL_DEDUPE,
                    f"a repeated id ({name!r}) to a full buffer gave {got!r}",
                )
            got = await _capped(s, run_id, "e", "new", 1, "y")
            promise(_full(got, run_id, "e", 1), P.EVENT_BUFFER_CAP, f"a new id gave {got!r}")
            held = await claim_one(s, wf)
            found = await _drain(s, held.lease, "e", "take")
            others = await _drain(s, held.lease, "other", "other")
            promise(
                found == ["first"] and others == [],
                P.EVENT_BUFFER_FULL_DEDUPE,
                f"took {found} and {others}",
            )
            got = await _capped(s, run_id, "e", "late", 1, "x")
            promise(got is True, P.EVENT_DEDUPE, f"the taken id again gave {got!r}")
            late = await _drain(s, held.lease, "e", "late")
            promise(late == [], P.EVENT_DEDUPE, f"a taken event id was delivered again: {late}")

        reflow.run(body)

    def test_taking_an_event_frees_room(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            for i in range(2):
                await _capped(s, run_id, "e", i, 2)
            held = await claim_one(s, wf)
            take = await s.take_event(held.lease, "w1", "e")
            promise(_taken(take, 0), P.EVENT_ONCE_IN_ORDER, f"take gave {take}")
            got = await _capped(s, run_id, "e", 2, 2)
            promise(got is True, P.EVENT_BUFFER_TAKE_FREES, f"after a take, delivery gave {got!r}")
            got = await _capped(s, run_id, "e", 3, 2)
            promise(_full(got, run_id, "e", 2), P.EVENT_BUFFER_CAP, f"over the cap: {got!r}")
            rest = await _drain(s, held.lease, "e", "rest")
            promise(rest == [1, 2], P.EVENT_BUFFER_TAKE_FREES, f"took {rest}")

        reflow.run(body)

    def test_concurrent_deliveries_never_overfill_a_buffer(self, reflow: Harness) -> None:
        wf = reflow.unique()
        cap, attempts = 5, 12

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            stores = [s, *[await reflow.open() for _ in range(3)]]
            results = await asyncio.gather(
                *(_capped(stores[i % len(stores)], run_id, "e", i, cap) for i in range(attempts))
            )
            stored = sorted(i for i, got in enumerate(results) if got is True)
            refused = [got for got in results if _full(got, run_id, "e", cap)]
            promise(
                len(stored) == cap and len(refused) == attempts - cap,
                P.EVENT_BUFFER_CAP,
                f"{attempts} concurrent deliveries under a cap of {cap} answered {results}",
            )
            held = await claim_one(s, wf)
            found = await _drain(s, held.lease, "e", "take")
            promise(
                sorted(map(repr, found)) == sorted(map(repr, stored)),
                P.EVENT_BUFFER_CAP,
                f"stored {stored}, took {found}",
            )

        reflow.run(body)

    def test_a_run_that_ends_drops_its_buffered_events(self, reflow: Harness) -> None:
        wf = reflow.unique()
        error = codec.encode("ended")

        async def body(s: Storage) -> None:
            runs = await create_many(s, wf, 4)
            claimed = {c.run.id: c for c in await s.claim_runs([wf], 10, reflow.long_lease)}
            promise(len(claimed) == 4, P.NO_LOST_RUNS, f"claimed {len(claimed)} of 4")
            failed, failed_fenced, cancelled_fenced, cancelled = runs
            for run_id in runs:
                for event, value, event_id in (
                    ("e", "plain", None),
                    ("e", "with-id", "kept"),
                    ("other", "other", None),
                ):
                    sent = await s.deliver_event(
                        run_id, event, codec.encode(value), event_id=event_id
                    )
                    promise(sent, P.EVENT_BUFFERED, "deliver_event to a live run returned False")
            waited = await s.wait_run(claimed[cancelled].lease, "hold", "never", None)
            promise(
                waited is not None and not waited.ready,
                P.EVENT_ISOLATION,
                f"a wait for an event never sent gave {waited}",
            )
            ended = {
                "finished as failed": await s.finish_run(
                    claimed[failed].lease, "failed", error=error
                ),
                "failed under its lease": await s.update_run_status(
                    failed_fenced, "failed", lease=claimed[failed_fenced].lease, error=error
                ),
                "was cancelled under its lease": await s.update_run_status(
                    cancelled_fenced, "cancelled", lease=claimed[cancelled_fenced].lease
                ),
                "was cancelled while waiting": await s.update_run_status(cancelled, "cancelled"),
            }
            promise(all(ended.values()), P.LIVE_LEASE_ACCEPTED, f"ending the runs gave {ended}")
            how = dict(zip(runs, ended, strict=True))
            for run_id in runs:
                requeued = await s.requeue_run(run_id)
                promise(requeued, P.REQUEUE_ONLY_ENDED, f"requeue of a run that {how[run_id]}")
            again = {c.run.id: c.lease for c in await s.claim_runs([wf], 10, reflow.long_lease)}
            promise(set(again) == set(runs), P.NO_LOST_RUNS, f"claimed {len(again)} of 4")
            for run_id, lease in again.items():
                left = [
                    *await _drain(s, lease, "e", "after"),
                    *await _drain(s, lease, "other", "after-other"),
                ]
                promise(
                    left == [],
                    P.EVENTS_END_WITH_RUN,
                    f"a run that {how[run_id]} and was requeued still held {left}",
                )
                got = await _capped(s, run_id, "e", "late", 1, "kept")
                promise(got is True, P.EVENT_DEDUPE, f"an id seen before the run ended: {got!r}")
                late = await _drain(s, lease, "e", "late")
                promise(
                    late == [],
                    P.EVENT_DEDUPE,
                    f"an event id seen before the run {how[run_id]} was delivered again: {late}",
                )
                got = await _capped(s, run_id, "e", "fresh", 1)
                promise(
                    got is True,
                    P.EVENTS_END_WITH_RUN,
                    f"the cap still counts events dropped when the run {how[run_id]}: {got!r}",
                )
                waited = await s.wait_run(lease, "fresh", "e", None)
                promise(
                    waited is not None and waited.ready,
                    P.EVENT_BEFORE_WAIT,
                    f"a fresh event, then a wait: {waited}",
                )
                fresh = await _drain(s, lease, "e", "fresh")
                promise(fresh == ["fresh"], P.EVENT_BUFFERED, f"took {fresh}")

        reflow.run(body)
