"""Retention: :meth:`~reflow_core.storage.Storage.purge_finished` deletes the
runs that finished more than ``older_than`` ago by the storage clock, oldest
first, at most ``limit`` of them per call, with their steps, events, event ids
and idempotency keys; it never touches a run that has not finished.

``purge_finished`` acts on the whole store, so these tests delete every run
of the store under test that finished more than a few milliseconds before
they purge, other tests' runs included, and they expect no other client to
finish or purge runs in that store while they run. Each test starts by
purging whatever finished before it, so it knows every run that is due.

Time is real: a test that needs a cut-off between two groups of runs pauses
on the storage clock around it (see ``_retention``).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_core import codec
from reflow_core.errors import ConfigError, IdempotencyConflictError
from reflow_core.storage import NewRun, StepRecord, Storage

from ._events import drain_events, took
from ._retention import (
    ERROR,
    FATES,
    FINISHING,
    HOUR,
    OUTPUT,
    claim_all,
    clear_finished,
    cut,
    gap_of,
    labelled,
    missing_runs,
    purge_a_mix,
    purge_since,
    settle,
    skip_unless_pinned,
    status_of,
)
from ._util import LONG, create, create_many

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestPurgeArguments", "TestPurgeSelection", "TestPurgeUnderLoad", "TestPurgedRuns"]


class TestPurgedRuns:
    def test_a_purged_run_leaves_nothing_behind(self, reflow: Harness) -> None:
        wf = reflow.unique()
        kinds = ("completed", "failed", "cancelled")

        async def body(s: Storage) -> None:
            await clear_finished(s)
            runs = {kind: (await create(s, wf, kind, key=f"key-{kind}")).run.id for kind in kinds}
            kept = (await create(s, wf, "kept", key="key-kept")).run.id
            leases = await claim_all(s, wf, 4)
            for run_id, lease in leases.items():
                saved = StepRecord("s1", "completed", output=codec.encode(run_id))
                await s.save_step_result(lease, saved, LONG)
                for event_id in ("id-taken", "id-buffered"):
                    await s.deliver_event(run_id, "e", codec.encode(event_id), event_id=event_id)
                take = await s.take_event(lease, "w1", "e")
                promise(took(take, "id-taken"), P.EVENT_ONCE_IN_ORDER, f"take gave {take}")
            last = StepRecord("s2", "completed", output=OUTPUT)
            ended = [
                await s.finish_run(
                    leases[runs["completed"]], "completed", output=OUTPUT, step=last
                ),
                await s.finish_run(leases[runs["failed"]], "failed", error=ERROR),
                await s.update_run_status(runs["cancelled"], "cancelled", error=ERROR),
            ]
            promise(all(ended), P.LIVE_LEASE_ACCEPTED, f"ending the runs gave {ended}")
            kept_before = await s.get_run(kept)
            await settle(s)
            deleted = await s.purge_finished(timedelta(0))
            for kind, run_id in runs.items():
                record = await s.get_run(run_id)
                promise(record is None, P.PURGE_LEAVES_NOTHING, f"the {kind} run is {record}")
                steps = await s.get_step_results(run_id)
                promise(
                    steps == {},
                    P.PURGE_LEAVES_NOTHING,
                    f"the purged {kind} run still has steps {sorted(steps)}",
                )
            kept_after = await s.get_run(kept)
            promise(
                kept_after == kept_before,
                P.PURGE_UNFINISHED_KEPT,
                f"a running run was {kept_before}, after the purge {kept_after}",
            )
            listed = [r.id for r in (await s.list_runs(workflow=wf)).runs]
            promise(listed == [kept], P.PURGE_LEAVES_NOTHING, f"listed {listed}, not just {kept}")
            promise(deleted == 3, P.PURGE_COUNT, f"purged 3 finished runs, it returned {deleted}")
            again = await create(s, wf, "kept", key="key-kept")
            promise(
                not again.created and again.run.id == kept,
                P.IDEMPOTENT_CREATE,
                f"the key of a run the purge kept gave {again}",
            )
            for kind, run_id in runs.items():
                new = NewRun(wf, codec.encode(f"new-{kind}"), f"key-{kind}", run_id)
                try:
                    made = await s.create_run(new)
                except IdempotencyConflictError as exc:
                    promise(
                        False,
                        P.PURGE_FREES_KEY,
                        f"the purged {kind} run's key conflicts with {exc.existing_run_id}",
                    )
                    raise
                promise(
                    made.created and made.run.id == run_id,
                    P.PURGE_FREES_KEY,
                    f"a create with the purged {kind} run's key and id gave {made}",
                )
                steps = await s.get_step_results(run_id)
                promise(
                    steps == {},
                    P.PURGE_LEAVES_NOTHING,
                    f"a new run with the purged {kind} run's id has its steps {sorted(steps)}",
                )
            fresh = await s.claim_runs([wf], 10, LONG)
            promise(
                sorted(c.run.id for c in fresh) == sorted(runs.values()),
                P.NO_LOST_RUNS,
                f"claimed {[c.run.id for c in fresh]}, not the three new runs",
            )
            for claimed in fresh:
                run_id, lease = claimed.run.id, claimed.lease
                promise(
                    dict(claimed.steps) == {},
                    P.PURGE_LEAVES_NOTHING,
                    f"a new run with a purged run's id was claimed with {sorted(claimed.steps)}",
                )
                sent = await s.deliver_event(
                    run_id, "e", codec.encode("fresh"), event_id="id-taken"
                )
                promise(sent, P.EVENT_BUFFERED, "deliver_event to a new run returned False")
                found = await drain_events(s, lease, "e", "fresh")
                promise(
                    found == ["fresh"],
                    P.PURGE_LEAVES_NOTHING,
                    "a new run with a purged run's id, sent 'fresh' with an event id the "
                    f"purged run had seen, took {found}",
                )

        reflow.run(body)

    def test_unfinished_runs_are_never_purged(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await clear_finished(s)
            ids = await create_many(s, wf, 8)
            napping, due, waiting, timed_out, handed, requeued, done = ids[1:]
            leases = await claim_all(s, wf, 8)
            await s.sleep_run(leases[napping], "nap", HOUR)
            await s.sleep_run(leases[due], "nap", timedelta(0))
            await s.wait_run(leases[waiting], "hold", "never", None)
            await s.wait_run(leases[timed_out], "hold", "never", timedelta(0))
            await s.update_run_status(handed, "pending", lease=leases[handed])
            await s.finish_run(leases[requeued], "failed", error=ERROR)
            await s.requeue_run(requeued)
            await s.finish_run(leases[done], "completed", output=OUTPUT)
            pending = (await create(s, wf, "never claimed")).run.id
            delayed = [
                (await s.create_run(NewRun(wf, codec.encode(name), delay=delay))).run.id
                for name, delay in (("delayed", HOUR), ("delayed, due", timedelta(milliseconds=1)))
            ]
            unfinished = [pending, *delayed, *ids[:-1]]
            before = {run_id: await s.get_run(run_id) for run_id in unfinished}
            statuses = sorted(status_of(record) for record in before.values())
            await settle(s)
            deleted = await s.purge_finished(timedelta(0))
            again = await s.purge_finished(timedelta(0), batch=1)
            for run_id, record in before.items():
                after = await s.get_run(run_id)
                promise(
                    after == record,
                    P.PURGE_UNFINISHED_KEPT,
                    f"a {status_of(record)} run was {record}, after purging is {after}",
                )
            promise(await s.get_run(done) is None, P.PURGE_BY_FINISH_TIME, "a finished run stayed")
            promise(
                (deleted, again) == (1, 0),
                P.PURGE_COUNT,
                f"among runs {statuses} and one completed, purges deleted {deleted}, then {again}",
            )

        reflow.run(body)


class TestPurgeSelection:
    def test_only_runs_finished_before_the_cut_off_go(self, reflow: Harness) -> None:
        """Every run is created before the cut-off; those that finish after it
        stay, including one that finished before it, was requeued, and
        finished again after it."""
        wf = reflow.unique()
        gap = gap_of(reflow, 3)

        async def body(s: Storage) -> None:
            await clear_finished(s)
            ids = await create_many(s, wf, 4)
            old, cancelled, young, again = ids
            labels = dict(zip(ids, ("old", "cancelled", "young", "refinished"), strict=True))
            leases = await claim_all(s, wf, 4)
            await s.finish_run(leases[old], "completed", output=OUTPUT)
            await s.update_run_status(cancelled, "cancelled")
            await s.finish_run(leases[again], "failed", error=ERROR)
            await s.requeue_run(again)
            leases.update(await claim_all(s, wf, 1))
            mark = await cut(s, gap)
            await s.finish_run(leases[young], "completed", output=OUTPUT)
            await s.finish_run(leases[again], "completed", output=OUTPUT)
            deleted, slack = await purge_since(s, mark)
            skip_unless_pinned(slack, gap)
            gone = await missing_runs(s, ids)
            promise(
                gone == [old, cancelled],
                P.PURGE_BY_FINISH_TIME,
                f"purged {labelled(gone, labels)}; only the old and the cancelled run had finished "
                "before the cut-off",
            )
            promise(deleted == len(gone), P.PURGE_COUNT, f"deleted {len(gone)}, returned {deleted}")
            hourly = await s.purge_finished(HOUR)
            gone = await missing_runs(s, ids)
            promise(
                hourly == 0 and gone == [old, cancelled],
                P.PURGE_BY_FINISH_TIME,
                f"a purge of runs finished an hour ago returned {hourly}, "
                f"and the gone runs are {labelled(gone, labels)}",
            )
            await settle(s)
            deleted = await s.purge_finished(timedelta(0))
            gone = await missing_runs(s, ids)
            promise(gone == ids, P.PURGE_BY_FINISH_TIME, f"gone at last: {labelled(gone, labels)}")
            promise(deleted == 2, P.PURGE_COUNT, f"deleted 2, returned {deleted}")

        reflow.run(body)

    def test_oldest_first_at_most_limit_per_call(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await clear_finished(s)
            ids = await create_many(s, wf, 5)
            labels = {run_id: f"#{i + 1}" for i, run_id in enumerate(ids)}
            leases = await claim_all(s, wf, 5)
            for run_id in ids:
                await settle(s)
                await s.finish_run(leases[run_id], "completed", output=OUTPUT)
            await settle(s)
            done: list[str] = []
            for batch, limit, count in ((1000, 2, 2), (5, 1, 1), (1, 10, 2), (1000, 1, 0)):
                deleted = await s.purge_finished(timedelta(0), batch=batch, limit=limit)
                gone = await missing_runs(s, ids)
                what = f"purge(batch={batch}, limit={limit}) of {5 - len(done)} runs due"
                now_gone = len(gone) - len(done)
                promise(
                    now_gone == count,
                    P.PURGE_LIMIT,
                    f"{what} deleted {now_gone}: runs {labelled(gone, labels)} are gone",
                )
                promise(
                    gone == ids[: len(gone)],
                    P.PURGE_OLDEST_FIRST,
                    f"runs finished in the order {labelled(ids, labels)}; "
                    f"after {what}, {labelled(gone, labels)} are gone",
                )
                promise(
                    deleted == now_gone,
                    P.PURGE_COUNT,
                    f"{what} deleted {now_gone}, returned {deleted}",
                )
                done = gone

        reflow.run(body)

    def test_a_small_batch_still_deletes_every_run_due(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await clear_finished(s)
            ids = await create_many(s, wf, 7)
            leases = await claim_all(s, wf, 7)
            for run_id in ids:
                await s.finish_run(leases[run_id], "completed", output=OUTPUT)
            await settle(s)
            deleted = await s.purge_finished(timedelta(0), batch=2)
            gone = await missing_runs(s, ids)
            promise(
                gone == ids,
                P.PURGE_BATCHES,
                f"purge(batch=2) of 7 runs due deleted {len(gone)} of them",
            )
            promise(deleted == 7, P.PURGE_COUNT, f"deleted {len(gone)}, returned {deleted}")

        reflow.run(body)

    def test_any_mix_of_runs_ages_batches_and_limits(self, reflow: Harness) -> None:
        """Runs end up in any status, on either side of the cut-off; one
        purge with any batch and limit deletes exactly the oldest ``limit``
        of the runs that finished before the cut-off."""
        gap = gap_of(reflow, 15)

        # Half the runs finish (the rest end up anywhere), two in three before
        # the cut-off: enough runs due for limits and batches to matter.
        fates = st.sampled_from(sorted(FINISHING)) | st.sampled_from(FATES)
        runs = st.tuples(fates, st.sampled_from((True, True, False)))

        @suite_settings()
        @given(
            runs=st.lists(runs, min_size=1, max_size=10),
            batch=st.integers(1, 4),
            limit=st.none() | st.integers(1, 5),
        )
        def check(runs: list[tuple[str, bool]], batch: int, limit: int | None) -> None:
            async def body(s: Storage) -> None:
                await purge_a_mix(s, reflow.unique(), runs, batch, limit, gap)

            reflow.run(body)

        check()


class TestPurgeUnderLoad:
    def test_a_run_finishing_while_purges_run_stays(self, reflow: Harness) -> None:
        """Runs finish, and failed runs are requeued, on several connections
        while another purges again and again with its cut-off before all of
        it: every run finished after the cut-off stays, a requeued run is
        never deleted, and purges of runs finished an hour ago find nothing."""
        wf = reflow.unique()
        gap = gap_of(reflow, 3)

        async def body(s: Storage) -> None:
            await clear_finished(s)
            ids = await create_many(s, wf, 20)
            old, failed, racing = ids[:4], ids[4:8], ids[8:]
            leases = await claim_all(s, wf, 20)
            for run_id in old:
                await s.finish_run(leases[run_id], "completed", output=OUTPUT)
            for run_id in failed:
                await s.finish_run(leases[run_id], "failed", error=ERROR)
            mark = await cut(s, gap)
            stores = [await reflow.open() for _ in range(3)]
            purger = await reflow.open()
            busy = True
            counts: list[int] = []
            slacks: list[timedelta] = []
            hourly: list[int] = []

            async def finish(store: Storage, batch: list[str]) -> None:
                for run_id in batch:
                    if not await store.finish_run(leases[run_id], "completed", output=OUTPUT):
                        record = await store.get_run(run_id)
                        promise(
                            record is not None,
                            P.PURGE_UNFINISHED_KEPT,
                            "a purge deleted a running run",
                        )
                        promise(False, P.LIVE_LEASE_ACCEPTED, f"finish_run refused: {record}")
                    await asyncio.sleep(0)

            requeued: dict[str, bool] = {}

            async def requeue(store: Storage) -> None:
                for run_id in failed:
                    requeued[run_id] = await store.requeue_run(run_id)
                    await asyncio.sleep(0)

            async def work() -> None:
                nonlocal busy
                try:
                    await asyncio.gather(
                        *(finish(stores[i], racing[i::3]) for i in range(3)), requeue(s)
                    )
                finally:
                    busy = False

            async def purge() -> None:
                while busy or len(counts) < 3:
                    deleted, slack = await purge_since(purger, mark, batch=1)
                    counts.append(deleted)
                    slacks.append(slack)
                    hourly.append(await purger.purge_finished(HOUR, batch=2))

            await asyncio.gather(work(), purge())
            deleted, slack = await purge_since(s, mark)
            counts.append(deleted)
            skip_unless_pinned(max(slack, *slacks), gap)
            promise(
                not any(hourly),
                P.PURGE_BY_FINISH_TIME,
                f"purges of runs finished an hour ago deleted {hourly}",
            )
            for run_id in racing:
                record = await s.get_run(run_id)
                promise(
                    record is not None and record.status == "completed",
                    P.PURGE_RACING_FINISH,
                    f"a run that finished after the cut-off, while purges ran, is {record}",
                )
            for run_id in old:
                record = await s.get_run(run_id)
                promise(
                    record is None,
                    P.PURGE_BY_FINISH_TIME,
                    f"a run that finished before the cut-off stayed: {record}",
                )
            for run_id in failed:
                record = await s.get_run(run_id)
                if requeued[run_id]:
                    promise(
                        record is not None and record.status == "pending",
                        P.PURGE_UNFINISHED_KEPT,
                        f"a run requeued while purges ran is {record}",
                    )
                else:
                    promise(
                        record is None,
                        P.PURGE_BY_FINISH_TIME,
                        f"a run that failed before the cut-off, neither requeued nor purged: "
                        f"{record}",
                    )
            gone = await missing_runs(s, ids)
            promise(
                sum(counts) == len(gone),
                P.PURGE_COUNT,
                f"{len(gone)} runs were deleted; the purges returned {counts}",
            )

        reflow.run(body)


class TestPurgeArguments:
    def test_bad_arguments_are_refused_and_delete_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()
        bad: list[dict[str, Any]] = [
            {"older_than": timedelta(seconds=-1)},
            {"older_than": timedelta(microseconds=-1)},
            {"older_than": timedelta(0), "batch": 0},
            {"older_than": timedelta(0), "batch": -1},
            {"older_than": timedelta(0), "batch": True},
            {"older_than": timedelta(0), "limit": 0},
            {"older_than": timedelta(0), "limit": -3},
            {"older_than": timedelta(0), "limit": True},
            {"older_than": timedelta(0), "limit": False},
        ]

        async def body(s: Storage) -> None:
            await clear_finished(s)
            run_id = (await create(s, wf)).run.id
            [lease] = (await claim_all(s, wf, 1)).values()
            await s.finish_run(lease, "completed", output=OUTPUT)
            await settle(s)
            for kwargs in bad:
                shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
                try:
                    deleted = await s.purge_finished(**kwargs)
                except ConfigError:
                    pass
                except Exception as exc:  # the promise is about the kind of error
                    promise(
                        False,
                        P.PURGE_ARGS,
                        f"purge_finished({shown}) raised {type(exc).__name__}: {exc}",
                    )
                else:
                    promise(False, P.PURGE_ARGS, f"purge_finished({shown}) returned {deleted}")
                record = await s.get_run(run_id)
                promise(
                    record is not None,
                    P.PURGE_ARGS,
                    f"a refused purge_finished({shown}) deleted a run",
                )
            deleted = await s.purge_finished(timedelta(0), batch=1, limit=1)
            promise(deleted == 1, P.PURGE_COUNT, f"the good purge returned {deleted}")
            promise(await s.get_run(run_id) is None, P.PURGE_BY_FINISH_TIME, "the run stayed")

        reflow.run(body)
