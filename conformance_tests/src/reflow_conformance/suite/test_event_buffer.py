"""The cap on a run's buffered events (``max_buffered``): a full buffer
refuses a delivery and stores nothing, a repeated event id is still
acknowledged, taking frees room; and what becomes of a run's buffer when it
ends."""

from __future__ import annotations

import asyncio

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import Storage

from ._events import deliver_capped, drain_events, is_full, took
from ._util import claim_one, create, create_many

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestEventBuffer"]


class TestEventBuffer:
    """The cap on a run's buffered events (``max_buffered``), and what becomes
    of a run's buffer when it ends."""

    def test_a_full_buffer_refuses_an_event_and_stores_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            for i in range(3):
                got = await deliver_capped(s, run_id, "e", i, 3)
                promise(
                    got is True, P.EVENT_BUFFER_CAP, f"delivery {i + 1} under a cap of 3: {got!r}"
                )
            for event_id in (None, "refused"):
                got = await deliver_capped(s, run_id, "e", "over", 3, event_id)
                promise(
                    is_full(got, run_id, "e", 3),
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
            found = await drain_events(s, held.lease, "e", "take")
            promise(found == [0, 1, 2], P.EVENT_BUFFER_CAP, f"refused events were stored: {found}")
            got = await deliver_capped(s, run_id, "e", "again", 3, "refused")
            promise(got is True, P.EVENT_BUFFER_CAP, f"with room again, delivery gave {got!r}")
            again = await drain_events(s, held.lease, "e", "again")
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
                got = await deliver_capped(s, run_id, name, name, 2)
                promise(got is True, P.EVENT_BUFFER_CAP, f"delivery of {name!r} under 2: {got!r}")
            for name in ("c", "a"):
                got = await deliver_capped(s, run_id, name, name, 2)
                promise(
                    is_full(got, run_id, name, 2),
                    P.EVENT_BUFFER_ALL_NAMES,
                    f"a run holding one 'a' and one 'b' took {name!r} under a cap of 2: {got!r}",
                )
            got = await deliver_capped(s, neighbour, "a", "theirs", 2)
            promise(got is True, P.EVENT_ISOLATION, f"another run's events count for it: {got!r}")
            sent = await s.deliver_event(run_id, "c", codec.encode("uncapped"))
            promise(sent, P.EVENT_BUFFERED, "a delivery without a cap was refused")
            leases = {c.run.id: c.lease for c in await s.claim_runs([wf], 2, reflow.long_lease)}
            promise(len(leases) == 2, P.NO_LOST_RUNS, f"claimed {len(leases)} of 2")
            seen = {name: await drain_events(s, leases[run_id], name, name) for name in "abc"}
            promise(
                seen == {"a": ["a"], "b": ["b"], "c": ["uncapped"]},
                P.EVENT_BUFFER_CAP,
                f"took {seen}",
            )
            theirs = await drain_events(s, leases[neighbour], "a", "a")
            promise(theirs == ["theirs"], P.EVENT_ISOLATION, f"the neighbour took {theirs}")

        reflow.run(body)

    def test_a_repeated_event_id_is_acknowledged_when_full(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            got = await deliver_capped(s, run_id, "e", "first", 1, "x")
            promise(
                got is True, P.EVENT_BUFFER_CAP, f"the first delivery under a cap of 1: {got!r}"
            )
            for name in ("e", "other"):
                got = await deliver_capped(s, run_id, name, "repeat", 1, "x")
                promise(
                    got is True,
                    P.EVENT_BUFFER_FULL_DEDUPE,
                    f"a repeated id ({name!r}) to a full buffer gave {got!r}",
                )
            got = await deliver_capped(s, run_id, "e", "new", 1, "y")
            promise(is_full(got, run_id, "e", 1), P.EVENT_BUFFER_CAP, f"a new id gave {got!r}")
            held = await claim_one(s, wf)
            found = await drain_events(s, held.lease, "e", "take")
            others = await drain_events(s, held.lease, "other", "other")
            promise(
                found == ["first"] and others == [],
                P.EVENT_BUFFER_FULL_DEDUPE,
                f"took {found} and {others}",
            )
            got = await deliver_capped(s, run_id, "e", "late", 1, "x")
            promise(got is True, P.EVENT_DEDUPE, f"the taken id again gave {got!r}")
            late = await drain_events(s, held.lease, "e", "late")
            promise(late == [], P.EVENT_DEDUPE, f"a taken event id was delivered again: {late}")

        reflow.run(body)

    def test_taking_an_event_frees_room(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            for i in range(2):
                await deliver_capped(s, run_id, "e", i, 2)
            held = await claim_one(s, wf)
            take = await s.take_event(held.lease, "w1", "e")
            promise(took(take, 0), P.EVENT_ONCE_IN_ORDER, f"take gave {take}")
            got = await deliver_capped(s, run_id, "e", 2, 2)
            promise(got is True, P.EVENT_BUFFER_TAKE_FREES, f"after a take, delivery gave {got!r}")
            got = await deliver_capped(s, run_id, "e", 3, 2)
            promise(is_full(got, run_id, "e", 2), P.EVENT_BUFFER_CAP, f"over the cap: {got!r}")
            rest = await drain_events(s, held.lease, "e", "rest")
            promise(rest == [1, 2], P.EVENT_BUFFER_TAKE_FREES, f"took {rest}")

        reflow.run(body)

    def test_concurrent_deliveries_never_overfill_a_buffer(self, reflow: Harness) -> None:
        wf = reflow.unique()
        cap, attempts = 5, 12

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            stores = [s, *[await reflow.open() for _ in range(3)]]
            results = await asyncio.gather(
                *(
                    deliver_capped(stores[i % len(stores)], run_id, "e", i, cap)
                    for i in range(attempts)
                )
            )
            stored = sorted(i for i, got in enumerate(results) if got is True)
            refused = [got for got in results if is_full(got, run_id, "e", cap)]
            promise(
                len(stored) == cap and len(refused) == attempts - cap,
                P.EVENT_BUFFER_CAP,
                f"{attempts} concurrent deliveries under a cap of {cap} answered {results}",
            )
            held = await claim_one(s, wf)
            found = await drain_events(s, held.lease, "e", "take")
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
                    *await drain_events(s, lease, "e", "after"),
                    *await drain_events(s, lease, "other", "after-other"),
                ]
                promise(
                    left == [],
                    P.EVENTS_END_WITH_RUN,
                    f"a run that {how[run_id]} and was requeued still held {left}",
                )
                got = await deliver_capped(s, run_id, "e", "late", 1, "kept")
                promise(got is True, P.EVENT_DEDUPE, f"an id seen before the run ended: {got!r}")
                late = await drain_events(s, lease, "e", "late")
                promise(
                    late == [],
                    P.EVENT_DEDUPE,
                    f"an event id seen before the run {how[run_id]} was delivered again: {late}",
                )
                got = await deliver_capped(s, run_id, "e", "fresh", 1)
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
                fresh = await drain_events(s, lease, "e", "fresh")
                promise(fresh == ["fresh"], P.EVENT_BUFFERED, f"took {fresh}")

        reflow.run(body)
