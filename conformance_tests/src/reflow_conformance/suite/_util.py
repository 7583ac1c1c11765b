"""Small helpers shared by the suite's modules (not part of the public API)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, area_method, promise
from reflow_core import codec
from reflow_core.errors import ConfigError
from reflow_core.storage import (
    ClaimedRun,
    CreateResult,
    Lease,
    NewRun,
    RunRecord,
    ScheduleSpec,
    StepRecord,
    Storage,
)

LONG = timedelta(minutes=10)


async def create(
    storage: Storage, workflow: str, value: object = None, *, key: str | None = None
) -> CreateResult:
    return await storage.create_run(NewRun(workflow, codec.encode(value), idempotency_key=key))


async def claim_one(
    storage: Storage,
    workflow: str,
    lease: timedelta = LONG,
    name: str = P.NEW_RUN_CLAIMABLE,
) -> ClaimedRun:
    """Claim one run of ``workflow``; if there is none, promise ``name`` (the
    reason one should be claimable: by default, that a new run is) is broken."""
    claimed = await storage.claim_runs([workflow], 1, lease)
    promise(len(claimed) <= 1, P.CLAIM_LIMIT, f"limit 1 claimed {len(claimed)} runs")
    promise(claimed, name, f"expected to claim a run of {workflow}, got none")
    check_times(claimed[0], f"the claim of a run of {workflow}")
    return claimed[0]


async def read_run(storage: Storage, run_id: str, name: str = P.NO_LOST_RUNS) -> RunRecord:
    """``get_run`` of a run that must exist (else promise ``name`` is broken),
    its times checked to be aware UTC."""
    run = await storage.get_run(run_id)
    promise(run is not None, name, f"run {run_id} reads back as missing")
    assert run is not None
    check_times(run, f"run {run_id}")
    return run


def check_times(value: object, what: str) -> None:
    """Every datetime on a record the storage returned (a run, a claim, a step,
    a schedule, or a mapping of steps) is aware UTC, so comparing it with
    the suite's times can fail only as a broken promise."""
    if isinstance(value, datetime):
        promise(
            value.utcoffset() == timedelta(0),
            P.RECORD_TIMES_AWARE,
            f"{what}: {value!r} is " + ("naive" if value.tzinfo is None else "not UTC"),
        )
    elif isinstance(value, ClaimedRun):
        check_times(value.run, what)
        check_times(value.steps, f"{what}, its steps")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_times(item, f"{what} [{key!r}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if isinstance(item, datetime):
                check_times(item, f"{what}, {field.name}")


_LEASED_TARGETS: tuple[Literal["pending", "failed", "cancelled"], ...] = (
    "pending",
    "failed",
    "cancelled",
)

STALE_EVENT = "stale-event"
"""The event :func:`fenced_writes` tries to take; deliver one first to make that attempt count."""


async def create_many(storage: Storage, workflow: str, count: int) -> list[str]:
    """Create ``count`` pending runs of ``workflow``; their ids, in creation order."""
    return [(await create(storage, workflow, i)).run.id for i in range(count)]


async def fenced_writes(storage: Storage, lease: Lease) -> list[str]:
    """Try every fenced operation with ``lease``; the names of those that were not refused.

    Step names start with ``stale-``, so a write that got through shows in the
    run's steps too.
    """
    accepted: list[str] = []
    value = codec.encode("stale")
    step = StepRecord("stale-step", "completed", output=value)
    if await storage.heartbeat_run(lease, LONG):
        accepted.append("heartbeat_run")
    if await storage.save_step_result(lease, step, LONG):
        accepted.append("save_step_result")
    if await storage.take_event(lease, "stale-take", STALE_EVENT) is not None:
        accepted.append("take_event")
    if await storage.wait_run(lease, "stale-wait", STALE_EVENT, LONG) is not None:
        accepted.append("wait_run")
    if await storage.sleep_run(lease, "stale-sleep", LONG) is not None:
        accepted.append("sleep_run")
    for status in _LEASED_TARGETS:
        if await storage.update_run_status(lease.run_id, status, lease=lease, error=value):
            accepted.append(f"update_run_status({status!r}, lease=...)")
    last = StepRecord("stale-last", "completed", output=value)
    if await storage.finish_run(lease, "completed", output=value, step=last):
        accepted.append("finish_run")
    return accepted


def decoded(text: str | None) -> object:
    """The value of encoded text, or ``None`` for ``None``."""
    return None if text is None else codec.decode(text)


def step_differences(stored: StepRecord | None, written: StepRecord) -> list[str]:
    """How a stored step differs from the one written (values compared decoded);
    ``completed_at`` is the backend's and only has to be set."""
    if stored is None:
        return [f"step {written.name!r} is missing"]
    found = []
    for name in ("name", "status", "attempts", "wake_at"):
        if getattr(stored, name) != getattr(written, name):
            found.append(f"{name}: {getattr(stored, name)!r} != {getattr(written, name)!r}")
    for name in ("output", "error"):
        if decoded(getattr(stored, name)) != decoded(getattr(written, name)):
            found.append(f"{name}: {getattr(stored, name)!r} != {getattr(written, name)!r}")
    if stored.completed_at is None:
        found.append("completed_at is not set")
    return found


async def claim_only(
    storage: Storage, workflow: str, name: str, lease: timedelta = LONG
) -> ClaimedRun:
    """Claim the one claimable run of ``workflow``; if there is none, promise
    ``name`` (the reason it should be claimable) is broken."""
    claimed = await storage.claim_runs([workflow], 10, lease)
    promise(
        len(claimed) == 1,
        name,
        f"expected to claim one run of {workflow}, got {[c.run.id for c in claimed]}",
    )
    check_times(claimed[0], f"the claim of a run of {workflow}")
    return claimed[0]


SLACK = timedelta(milliseconds=1)
"""Stored times keep at least milliseconds; a store may round either way."""


async def storage_now(storage: Storage) -> datetime:
    """``storage.now()``, checked to be an aware UTC datetime."""
    value = await storage.now()
    promise(
        isinstance(value, datetime) and value.utcoffset() == timedelta(0),
        P.STORAGE_CLOCK,
        f"now() returned {value!r}, not an aware UTC datetime",
    )
    return value


def off_bracket(value: datetime | None, before: datetime, after: datetime) -> str:
    """Empty if ``value`` lies within ``[before, after]`` (give or take the
    millisecond a store may round to), else what is wrong."""
    if value is None:
        return "no time was set"
    if before - SLACK <= value <= after + SLACK:
        return ""
    return (
        f"{value.isoformat()} is not within the readings of now() around the call, "
        f"[{before.isoformat()}, {after.isoformat()}]"
    )


async def refused(call: Callable[[], Awaitable[Any]], what: str, name: str) -> None:
    """``call()`` must raise :class:`~reflow_core.errors.ConfigError` (promise
    ``name``); an area the adapter lacks is left for the harness to name."""
    try:
        await call()
    except ConfigError:
        return
    except Exception as exc:  # the promise is about the kind of error
        if isinstance(exc, NotImplementedError) and area_method(exc) is not None:
            raise  # an area the adapter lacks: the harness names it
        promise(False, name, f"{what}: raised {type(exc).__name__}: {exc}")
    else:
        promise(False, name, f"{what}: accepted")


def far_slot() -> datetime:
    """A schedule slot in whole milliseconds a day from now: not due during a test."""
    value = datetime.now(UTC) + timedelta(days=1)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


BadArgs = Sequence[tuple[str, dict[str, Any]]]
"""What is wrong, and the ``NewRun`` arguments that are wrong so."""


async def refused_creates(storage: Storage, workflow: str, bad: BadArgs, name: str) -> None:
    """``create_run`` refuses each of ``bad``, with no idempotency key, a fresh
    one and the key of an existing run alike, and writes nothing: the
    workflow holds only that run, unchanged (promise ``name``)."""
    value = codec.encode("v")
    kept = (await storage.create_run(NewRun(workflow, value, idempotency_key="kept"))).run
    for what, args in bad:
        for key in (None, "fresh", "kept"):
            new = NewRun(workflow, value, idempotency_key=key, **args)
            call = functools.partial(storage.create_run, new)
            await refused(call, f"create_run({what}, {key=})", name)
    runs = [r.id for r in (await storage.list_runs(workflow=workflow)).runs]
    promise(runs == [kept.id], name, f"refused creates left the runs {runs}")
    promise(
        await storage.get_run(kept.id) == kept,
        name,
        "a refused create with the key of an existing run changed it",
    )


async def refused_starts(
    reflow: Harness, storage: Storage, parent: str, child: str, bad: BadArgs, name: str
) -> ClaimedRun:
    """``start_child`` of a run of ``child`` refuses each of ``bad`` (``what``
    being the whole description), writing no child (promise ``name``): the
    claim of the run of ``parent`` it creates to start them from."""
    await storage.create_run(NewRun(parent, codec.encode("v")))
    held = await claim_only(storage, parent, P.NEW_RUN_CLAIMABLE)
    for what, args in bad:
        new = NewRun(child, codec.encode("v"), run_id=reflow.unique("c"), **args)
        await refused(functools.partial(storage.start_child, held.lease, "spawn", new), what, name)
    children = await storage.list_children(held.run.id)
    promise(not children, name, f"refused starts made {children}")
    return held


async def refused_slots(
    reflow: Harness, storage: Storage, workflow: str, bad: BadArgs, name: str
) -> None:
    """``claim_schedule_slot`` of a schedule of ``workflow`` refuses each of
    ``bad`` (``what`` being the whole description) and leaves the schedule
    where it was (promise ``name``); the schedule is deleted after."""
    key, slot = reflow.unique("sched"), far_slot()
    await storage.upsert_schedule(ScheduleSpec(key, workflow, codec.encode("v"), "every:60", slot))
    try:
        for what, args in bad:
            new = NewRun(workflow, codec.encode("v"), idempotency_key=f"{key}@{slot}", **args)
            call = functools.partial(
                storage.claim_schedule_slot, key, slot, slot + timedelta(minutes=1), new
            )
            await refused(call, what, name)
        found = [r.next_run_at for r in await storage.list_schedules() if r.key == key]
        promise(found == [slot], name, f"the schedule moved to {found}")
    finally:
        await storage.delete_schedule(key)
