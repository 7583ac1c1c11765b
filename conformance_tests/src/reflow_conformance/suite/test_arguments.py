"""Arguments at the edge: odd names, ids and keys, and durations out of range.

Every backend must keep any name, run id or key that is a non-empty ``str``
without a NUL or a lone surrogate, exactly, and refuse every other one the
same way: :class:`~reflow_core.errors.ConfigError`, before anything is
written (``reflow_core.adapter.check_text`` does the check). Durations it is
given (leases, sleeps, waits) go from zero to 100 years
(``reflow_core.adapter.check_duration``), so every deadline it computes can
be stored and read back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_conformance.strategies import BAD_TEXT, bad_names, names
from reflow_core import codec
from reflow_core.errors import ConfigError
from reflow_core.storage import (
    ClaimedRun,
    Lease,
    NewRun,
    ScheduleSpec,
    StepRecord,
    Storage,
    WorkerInfo,
)

from ._util import LONG, claim_one, create, refused

pytestmark = pytest.mark.reflow_conformance

__all__ = [
    "TestDelayedRunArguments",
    "TestDurationBounds",
    "TestOddText",
    "TestPauseArguments",
    "TestQueueStatsArguments",
    "TestWorkerArguments",
]

_TOO_LONG = timedelta(days=36501)
_NEGATIVE = timedelta(seconds=-1)
_MILLISECOND = timedelta(milliseconds=1)


async def _refused(
    call: Callable[[], Awaitable[Any]], what: str, name: str = P.BAD_TEXT_REFUSED
) -> None:
    await refused(call, what, name)


Call = tuple[str, Callable[[], Awaitable[Any]]]


def _text_calls(s: Storage, wf: str, claimed: ClaimedRun, bad: Any) -> list[Call]:
    """Every operation but the schedules', each with ``bad`` in one of its text arguments."""
    run_id, lease, value = claimed.run.id, claimed.lease, codec.encode("v")
    return [
        ("create_run(workflow)", lambda: s.create_run(NewRun(bad, value))),
        (
            "create_run(idempotency_key)",
            lambda: s.create_run(NewRun(wf, value, idempotency_key=bad)),
        ),
        ("create_run(run_id)", lambda: s.create_run(NewRun(wf, value, run_id=bad))),
        ("claim_runs(workflows)", lambda: s.claim_runs([wf, bad], 5, LONG)),
        ("get_run", lambda: s.get_run(bad)),
        ("get_step_results", lambda: s.get_step_results(bad)),
        ("requeue_run", lambda: s.requeue_run(bad)),
        ("update_run_status", lambda: s.update_run_status(bad, "cancelled")),
        ("deliver_event(run_id)", lambda: s.deliver_event(bad, "e", value)),
        ("deliver_event(event)", lambda: s.deliver_event(run_id, bad, value)),
        ("deliver_event(event_id)", lambda: s.deliver_event(run_id, "e", value, event_id=bad)),
        (
            "save_step_result(step)",
            lambda: s.save_step_result(lease, StepRecord(bad, "completed"), LONG),
        ),
        (
            "finish_run(step)",
            lambda: s.finish_run(
                lease, "completed", output=value, step=StepRecord(bad, "completed")
            ),
        ),
        ("sleep_run(step)", lambda: s.sleep_run(lease, bad, LONG)),
        ("wait_run(step)", lambda: s.wait_run(lease, bad, "e", LONG)),
        ("wait_run(event)", lambda: s.wait_run(lease, "w", bad, LONG)),
        ("take_event(step)", lambda: s.take_event(lease, bad, "e")),
        ("take_event(event)", lambda: s.take_event(lease, "w", bad)),
        ("list_runs(workflow)", lambda: s.list_runs(workflow=bad)),
    ]


_SLOT = datetime(2200, 1, 1, tzinfo=UTC)


def _schedule_text_calls(s: Storage, wf: str, bad: Any) -> list[Call]:
    """Every schedule operation, each with ``bad`` in one of its text arguments."""
    value = codec.encode("v")
    return [
        (
            "upsert_schedule(key)",
            lambda: s.upsert_schedule(ScheduleSpec(bad, wf, value, "every:1000", _SLOT)),
        ),
        (
            "upsert_schedule(workflow)",
            lambda: s.upsert_schedule(ScheduleSpec("k-" + wf, bad, value, "every:1000", _SLOT)),
        ),
        ("delete_schedule", lambda: s.delete_schedule(bad)),
        ("set_schedule_paused", lambda: s.set_schedule_paused(bad, True)),
    ]


def _duration_calls(s: Storage, wf: str, lease: Lease, span: timedelta) -> list[Call]:
    """Every operation given a duration, each with ``span``."""
    return [
        ("claim_runs(lease)", lambda: s.claim_runs([wf], 1, span)),
        ("heartbeat_run", lambda: s.heartbeat_run(lease, span)),
        ("save_step_result", lambda: s.save_step_result(lease, StepRecord("a", "completed"), span)),
        ("sleep_run", lambda: s.sleep_run(lease, "z", span)),
        ("wait_run", lambda: s.wait_run(lease, "w", "e", span)),
    ]


class TestOddText:
    def test_any_good_text_is_kept_exactly(self, reflow: Harness) -> None:
        @suite_settings()
        @given(names(), names(), names(), names())
        def check(workflow: str, key: str, step: str, event: str) -> None:
            wf = reflow.unique() + workflow
            run_id = reflow.unique("run") + key

            async def body(s: Storage) -> None:
                made = await s.create_run(
                    NewRun(wf, codec.encode(1), idempotency_key=key, run_id=run_id)
                )
                promise(
                    (made.run.id, made.run.workflow, made.run.idempotency_key) == (run_id, wf, key),
                    P.TEXT_KEPT,
                    repr(made.run),
                )
                again = await s.create_run(NewRun(wf, codec.encode(1), idempotency_key=key))
                promise(again.run.id == run_id and not again.created, P.TEXT_KEPT, "key lost")
                claimed = await claim_one(s, wf)
                saved = StepRecord(step, "completed", output=codec.encode(step))
                promise(await s.save_step_result(claimed.lease, saved, LONG), P.TEXT_KEPT)
                promise(
                    await s.deliver_event(run_id, event, codec.encode(2), event_id=key), P.TEXT_KEPT
                )
                taken = await s.take_event(claimed.lease, "wait-" + event, event)
                promise(taken is not None and taken.found, P.TEXT_KEPT, f"event {event!r}: {taken}")
                steps = await s.get_step_results(run_id)
                promise(
                    set(steps) == {step, "wait-" + event}
                    and codec.decode(steps[step].output or "null") == step,
                    P.TEXT_KEPT,
                    f"steps read back as {sorted(steps)}",
                )
                page = await s.list_runs(workflow=wf)
                promise([r.id for r in page.runs] == [run_id], P.TEXT_KEPT, repr(page.runs))

            reflow.run(body)

        check()

    def test_every_operation_refuses_bad_text_and_writes_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            made = await create(s, wf, "input")
            run_id = made.run.id
            claimed = await claim_one(s, wf)
            lease = claimed.lease
            for bad in BAD_TEXT:
                for what, call in _text_calls(s, wf, claimed, bad):
                    await _refused(call, f"{what} with {bad!r}")
            # Nothing was written: the run is as the claim left it, and alone.
            run = await s.get_run(run_id)
            promise(
                run is not None
                and (run.status, run.lease_epoch) == ("running", lease.epoch)
                and await s.get_step_results(run_id) == {},
                P.BAD_TEXT_REFUSED,
                f"the run changed: {run}",
            )
            page = await s.list_runs(workflow=wf)
            promise([r.id for r in page.runs] == [run_id], P.BAD_TEXT_REFUSED, repr(page.runs))
            promise(await s.heartbeat_run(lease, LONG), P.BAD_TEXT_REFUSED, "the lease was lost")

        reflow.run(body)

    @pytest.mark.reflow_area("schedules")
    def test_schedule_operations_refuse_bad_text_and_store_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            for bad in BAD_TEXT:
                for what, call in _schedule_text_calls(s, wf, bad):
                    await _refused(call, f"{what} with {bad!r}")
            schedules = await s.list_schedules()
            stored = [sc for sc in schedules if sc.workflow == wf or sc.key == "k-" + wf]
            promise(not stored, P.BAD_TEXT_REFUSED, f"a schedule was stored: {stored}")
            page = await s.list_runs(workflow=wf)
            promise(not page.runs, P.BAD_TEXT_REFUSED, f"a run was created: {page.runs}")

        reflow.run(body)

    def test_text_with_a_nul_or_lone_surrogate_anywhere_is_refused(self, reflow: Harness) -> None:
        @suite_settings()
        @given(bad_names())
        def check(bad: object) -> None:
            async def body(s: Storage) -> None:
                b: Any = bad
                await _refused(lambda: s.get_run(b), f"get_run({bad!r})")
                await _refused(
                    lambda: s.create_run(NewRun(b, codec.encode(None))),
                    f"create_run(workflow={bad!r})",
                )

            reflow.run(body)

        check()


class TestDurationBounds:
    def test_durations_out_of_range_are_refused_and_change_nothing(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            claimed = await claim_one(s, wf)
            lease = claimed.lease
            for span in (_TOO_LONG, _NEGATIVE):
                for what, call in _duration_calls(s, wf, lease, span):
                    try:
                        await call()
                    except ConfigError:
                        continue
                    except Exception as exc:
                        promise(
                            False,
                            P.DURATION_BOUNDS,
                            f"{what}({span}): raised {type(exc).__name__}: {exc}",
                        )
                    promise(False, P.DURATION_BOUNDS, f"{what}({span}): accepted")
            run = await s.get_run(lease.run_id)
            promise(
                run is not None
                and (run.status, run.lease_epoch) == ("running", lease.epoch)
                and await s.get_step_results(lease.run_id) == {},
                P.DURATION_BOUNDS,
                f"the run changed: {run}",
            )
            # The longest duration allowed is accepted and reads back.
            longest = timedelta(days=36500)
            wake_at = await s.sleep_run(lease, "z", longest)
            promise(wake_at is not None, P.DURATION_BOUNDS, "a 100-year sleep was refused")
            stored = await s.get_run(lease.run_id)
            promise(
                stored is not None and stored.status == "sleeping" and stored.wake_at == wake_at,
                P.DURATION_BOUNDS,
                f"a 100-year sleep reads back as {stored}",
            )
            page = await s.list_runs(workflow=wf)
            promise(len(page.runs) == 1, P.DURATION_BOUNDS, "listing the sleeping run failed")

        reflow.run(body)


def _bad_workers(worker: WorkerInfo) -> list[tuple[str, WorkerInfo]]:
    """``worker`` with one field out of what ``check_worker`` accepts, each way."""
    odd: list[tuple[str, Any]] = [
        *(("id", bad) for bad in BAD_TEXT),
        *(("host", bad) for bad in BAD_TEXT),
        *(("workflows", ("ok", bad)) for bad in BAD_TEXT),
        ("workflows", ["a", "b"]),
        ("workflows", "ab"),
        ("pid", -1),
        ("pid", True),
        ("pid", 1.5),
        ("pid", "12"),
        ("concurrency", 0),
        ("concurrency", -3),
        ("concurrency", True),
        ("in_flight", -1),
        ("in_flight", False),
        ("in_flight", None),
    ]
    return [
        (f"{field}={value!r}", dataclasses.replace(worker, **{field: value}))
        for field, value in odd
    ]


@pytest.mark.reflow_area("workers")
class TestWorkerArguments:
    def test_a_bad_worker_or_ttl_is_refused_and_nothing_is_stored(self, reflow: Harness) -> None:
        worker = WorkerInfo(reflow.unique("worker"), "host", 1, ("a",), 1, 0)
        ttls: list[Any] = [timedelta(0), _NEGATIVE, _TOO_LONG, 30, None]

        async def body(s: Storage) -> None:
            for what, bad in _bad_workers(worker):
                await _refused(
                    functools.partial(s.announce_worker, bad, LONG),
                    f"announce_worker({what})",
                    P.WORKER_ARGS,
                )
            for ttl in ttls:
                await _refused(
                    functools.partial(s.announce_worker, worker, ttl),
                    f"announce_worker(ttl={ttl!r})",
                    P.WORKER_ARGS,
                )
            for text in BAD_TEXT:
                await _refused(
                    functools.partial(s.remove_worker, text),  # type: ignore[arg-type]
                    f"remove_worker({text!r})",
                )
            listed = [w for w in await s.list_workers() if w.id.startswith(worker.id)]
            promise(not listed, P.WORKER_ARGS, f"a refused announcement was stored: {listed}")
            # The same worker, as it should be, is accepted.
            record = await s.announce_worker(worker, LONG)
            promise(record.id == worker.id, P.WORKER_STORED, f"announced {record}")
            await s.remove_worker(worker.id)

        reflow.run(body)


class TestDelayedRunArguments:
    def test_a_bad_delay_is_refused_and_writes_nothing(self, reflow: Harness) -> None:
        """A delay that is negative, over 100 years, or not a ``timedelta``
        (seconds as a number, a string) is refused with ``ConfigError``,
        checked before anything is written or looked up: with a fresh key and
        with the key of an existing run alike. The longest delay allowed is
        accepted and reads back."""
        wf = reflow.unique()
        bad_delays: list[Any] = [_NEGATIVE, _TOO_LONG, 5, 1.5, "10s", True]

        async def body(s: Storage) -> None:
            value = codec.encode("v")
            kept = (await s.create_run(NewRun(wf, value, idempotency_key="kept"))).run
            for delay in bad_delays:
                for key in (None, "fresh", "kept"):
                    await _refused(
                        functools.partial(
                            s.create_run, NewRun(wf, value, idempotency_key=key, delay=delay)
                        ),
                        f"create_run(delay={delay!r}, idempotency_key={key!r})",
                        P.DELAY_ARGS,
                    )
            page = await s.list_runs(workflow=wf)
            promise(
                [run.id for run in page.runs] == [kept.id],
                P.DELAY_ARGS,
                f"after refused creates the workflow holds {[r.id for r in page.runs]}",
            )
            promise(
                await s.get_run(kept.id) == kept,
                P.DELAY_ARGS,
                "a refused create with the key of an existing run changed it",
            )
            longest = timedelta(days=36500)
            made = (await s.create_run(NewRun(wf, value, delay=longest))).run
            stored = await s.get_run(made.id)
            promise(
                stored is not None
                and stored.status == "delayed"
                and stored.wake_at is not None
                and abs(stored.wake_at - stored.created_at - longest) <= _MILLISECOND,
                P.DELAY_ARGS,
                f"a run delayed by 100 years reads back as {stored}",
            )

        reflow.run(body)


@pytest.mark.reflow_area("queue_stats")
class TestQueueStatsArguments:
    def test_bad_workflow_names_are_refused(self, reflow: Harness) -> None:
        wf = reflow.unique()
        calls: list[tuple[str, Any]] = [
            ("a bare string", wf),
            *((f"a name {bad!r}", [wf, bad]) for bad in BAD_TEXT),
        ]

        async def body(s: Storage) -> None:
            for what, workflows in calls:
                await _refused(
                    functools.partial(s.queue_stats, workflows),
                    f"queue_stats with {what}",
                    P.STATS_ARGS,
                )

        reflow.run(body)


@pytest.mark.reflow_area("schedules")
class TestPauseArguments:
    def test_a_naive_next_run_at_is_refused_and_changes_nothing(self, reflow: Harness) -> None:
        key, wf = reflow.unique("sched"), reflow.unique()
        naive = datetime(2200, 1, 1)

        async def body(s: Storage) -> None:
            spec = ScheduleSpec(key, wf, codec.encode(1), "every:60", _SLOT)
            made = await s.upsert_schedule(spec)
            for paused in (True, False):
                await _refused(
                    functools.partial(s.set_schedule_paused, key, paused, next_run_at=naive),
                    f"set_schedule_paused({paused}, next_run_at={naive!r})",
                    P.SCHEDULE_PAUSE_ARGS,
                )
            stored = [sc for sc in await s.list_schedules() if sc.key == key]
            promise(
                len(stored) == 1
                and not stored[0].paused
                and stored[0].next_run_at == made.next_run_at,
                P.SCHEDULE_PAUSE_ARGS,
                f"after refused calls the schedule is {stored}",
            )
            await s.delete_schedule(key)

        reflow.run(body)
