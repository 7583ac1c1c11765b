"""Workflow versions on every backend: a run started on version 1, a worker
restarted with version 2, and what each change and each ``on_incompatible``
policy does to it; the version filter of claims; fingerprints and aliases.

Runs are parked mid-way at a ``wait_for_event`` (a durable stop the test
controls) by an engine with version 1, then taken over by a new engine
(another process in production: a deploy) with version 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from reflow_conformance import testsupport
from reflow_core import (
    Branch,
    ConfigError,
    Engine,
    StepContext,
    Workflow,
    workflow,
)
from reflow_core.errors import DuplicateStepError
from reflow_core.storage import StepRecord, Storage
from reflow_core.versions import HOLD_EVENT, check_replay, fingerprint_of, shape_of

NAME = "order"


class Calls:
    """Step handlers that record which steps ran, in order."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, label: str) -> Callable[[StepContext[Any, Any]], Any]:
        async def handler(ctx: StepContext[Any, Any]) -> Any:
            self.ran.append(label)
            return label

        return handler


def engine_on(
    storage: Storage, *workflows: Workflow[Any, Any]
) -> contextlib.AbstractAsyncContextManager[Engine]:
    return testsupport.engine_on(storage, *workflows, lease="30s")


def order(
    calls: Calls,
    *before: str | tuple[str, str],
    after: tuple[str, ...] = ("ship", "email"),
    **options: Any,
) -> Workflow[Any, Any]:
    """Workflow ``order``: the steps ``before`` (a name, or a name and its
    ``was=``), the wait for ``approved``, then the steps ``after``."""
    wf = workflow(NAME, **options)
    for step in before:
        name, was = (step, None) if isinstance(step, str) else step
        wf = wf.step(name, calls(name), was=was)
    wf = wf.wait_for_event("approved")
    for name in after:
        wf = wf.step(name, calls(name))
    return wf


def v1(calls: Calls) -> Workflow[Any, Any]:
    return order(calls, "charge")


async def parked_on(storage: Storage, wf: Workflow[Any, Any]) -> str:
    """A run of ``wf`` that ran up to its wait and released its lease there."""
    async with engine_on(storage, wf) as engine:
        run = await engine.enqueue(wf, {"order": 1})
        assert await engine.tick() == 1
        status = await engine.get_run_status(run.id)
        assert status.status == "waiting", status
        return run.id


async def approve(storage: Storage, run_id: str) -> None:
    assert await storage.deliver_event(run_id, "approved", '{"ok":true}')


# -- what a deploy does to a run in flight ---------------------------------------


async def test_a_renamed_step_with_an_alias_is_not_run_again(db: Any) -> None:
    old, new = Calls(), Calls()
    storage = db.connect()
    run_id = await parked_on(storage, v1(old))
    v2 = order(new, ("charge_card", "charge"), version=2)
    await approve(storage, run_id)
    async with engine_on(storage, v2) as engine:
        assert await engine.tick() == 1
        done = await engine.get_run_status(run_id)
    assert done.status == "completed", done
    assert old.ran == ["charge"]
    assert new.ran == ["ship", "email"]
    assert done.version == 1
    assert done.fingerprint == v1(Calls()).fingerprint


async def test_an_inserted_step_holds_the_run_until_it_is_released(db: Any) -> None:
    old, new = Calls(), Calls()
    storage = db.connect()
    run_id = await parked_on(storage, v1(old))
    v2 = order(new, "charge", "fraud_check", version=2)
    await approve(storage, run_id)
    async with engine_on(storage, v2) as engine:
        assert await engine.tick() == 1
        held = await engine.get_run_status(run_id)
        assert held.status == "waiting"
        assert held.hold is not None
        assert "fraud_check" in held.hold, held.hold
        assert new.ran == []
        record = await storage.get_run(run_id)
        assert record is not None
        assert record.waiting_for == HOLD_EVENT
        assert await engine.tick() == 0  # held: nobody claims it
        assert not await engine.release("no-such-run")

        assert await engine.release(run_id)
        assert await engine.release(run_id)  # again: nothing more is sent
        buffered = [e.event for e in await storage.list_buffered_events(run_id)]
        assert buffered == ["approved", HOLD_EVENT]  # the event it was held before taking
        assert await engine.tick() == 1
        assert not await engine.release(run_id)  # no longer held
        done = await engine.get_run_status(run_id)
    assert done.status == "completed", done
    # Released, it went on with version 2 as it stood: the inserted step ran
    # out of order, the step the run had saved did not run again.
    assert new.ran == ["fraud_check", "ship", "email"]
    assert old.ran == ["charge"]


async def test_a_removed_step_fails_the_run_under_the_fail_policy(db: Any) -> None:
    old, new = Calls(), Calls()
    storage = db.connect()
    run_id = await parked_on(storage, v1(old))
    v2 = order(new, version=2, on_incompatible="fail")
    await approve(storage, run_id)
    async with engine_on(storage, v2) as engine:
        assert await engine.tick() == 1
        failed = await engine.get_run_status(run_id)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error["code"] == "incompatible_run"
    assert "'charge'" in failed.error["message"]
    assert "version 1" in failed.error["message"]
    assert "version 2" in failed.error["message"]
    assert new.ran == []


async def test_a_changed_branch_is_held_and_the_continue_policy_runs_it(db: Any) -> None:
    old, new = Calls(), Calls()
    storage = db.connect()

    def shaped(calls: Calls, branches: dict[str, Any], **options: Any) -> Workflow[Any, Any]:
        return (
            workflow("fan", **options)
            .step("prep", calls("prep"))
            .parallel(branches, name="notify")
            .wait_for_event("approved")
            .step("done", calls("done"))
        )

    first = shaped(old, {"sms": old("sms"), "mail": old("mail")})
    async with engine_on(storage, first) as engine:
        held_run = (await engine.enqueue(first)).id
        went_run = (await engine.enqueue(first)).id
        assert await engine.tick() == 2
    for run_id in (held_run, went_run):
        assert await storage.deliver_event(run_id, "approved", "null")

    changed = {"sms": new("sms"), "push": new("push")}
    async with engine_on(storage, shaped(new, changed, version=2)) as engine:
        assert await engine.tick() == 2
        for run_id in (held_run, went_run):
            status = await engine.get_run_status(run_id)
            assert status.status == "waiting"
            assert status.hold is not None
            assert "'push'" in status.hold, status.hold
            assert "'mail'" in status.hold, status.hold
    assert new.ran == []

    # The same change under on_incompatible="continue": the new branch runs
    # (out of order), the removed one's result is ignored, nothing runs twice.
    new.ran.clear()
    async with engine_on(storage, shaped(new, changed, version=3, on_incompatible="continue")) as e:
        assert await e.release(went_run)
        assert await e.tick() == 1
        done = await e.get_run_status(went_run)
    assert done.status == "completed", done
    assert sorted(new.ran) == ["done", "push"]
    assert sorted(old.ran) == ["mail", "mail", "prep", "prep", "sms", "sms"]


async def test_a_compatible_change_goes_on_without_a_policy(db: Any) -> None:
    old, new = Calls(), Calls()
    storage = db.connect()
    run_id = await parked_on(storage, v1(old))
    # A step added after where the run stands.
    v2 = order(new, "charge", after=("ship", "email", "survey"), version=2)
    await approve(storage, run_id)
    async with engine_on(storage, v2) as engine:
        assert await engine.tick() == 1
        done = await engine.get_run_status(run_id)
    assert done.status == "completed"
    assert new.ran == ["ship", "email", "survey"]


# -- which worker takes which run ----------------------------------------------------


async def test_old_version_policy_leaves_old_runs_to_a_worker_that_serves_them(db: Any) -> None:
    old, new = Calls(), Calls()
    storage = db.connect()
    first = v1(old)
    run_v1 = await parked_on(storage, first)
    await approve(storage, run_v1)
    second = order(new, "charge", version=2, on_incompatible="old_version")
    async with engine_on(storage, second) as engine:
        run_v2 = (await engine.enqueue(second, {"order": 2})).id
        assert await engine.tick() == 1  # its own run only
        assert await engine.tick() == 0
        record = await storage.get_run(run_v1)
        assert record is not None
        assert record.status == "waiting"
        assert record.attempts == 1
        assert (await engine.get_run(run_v2)).version == 2
    await approve(storage, run_v2)

    # One worker that registers both versions drains both, each on its own.
    async with engine_on(storage, first, second) as both:
        assert await both.tick() == 2
        assert (await both.get_run(run_v1)).status == "completed"
        assert (await both.get_run(run_v2)).status == "completed"
        # Enqueued by name, a run takes the highest version.
        assert (await both.enqueue(NAME, {})).version == 2
    assert old.ran == ["charge", "ship", "email"]
    assert new.ran == ["charge", "ship", "email"]


async def test_a_worker_never_takes_a_run_of_a_newer_version(db: Any) -> None:
    calls = Calls()
    storage = db.connect()
    second = workflow(NAME, version=2).step("charge", calls("v2"))
    async with engine_on(storage, second) as newer:
        run = await newer.enqueue(second)
    async with engine_on(storage, workflow(NAME).step("charge", calls("v1"))) as older:
        assert await older.tick() == 0
    record = await storage.get_run(run.id)
    assert record is not None
    assert record.status == "pending"
    assert record.attempts == 0
    async with engine_on(storage, second) as newer:
        assert await newer.tick() == 1
    assert calls.ran == ["v2"]


async def test_a_shape_changed_without_a_new_version_is_checked_too(db: Any) -> None:
    old, new = Calls(), Calls()
    storage = db.connect()
    run_id = await parked_on(storage, v1(old))
    same_version = order(new, "charge_card", after=("ship",))
    await approve(storage, run_id)
    async with engine_on(storage, same_version) as engine:
        assert await engine.tick() == 1
        held = await engine.get_run_status(run_id)
    assert held.hold is not None
    assert "was='charge'" in held.hold, held.hold
    assert new.ran == []


async def test_version_and_fingerprint_are_recorded_on_runs_and_children(db: Any) -> None:
    calls = Calls()
    child = workflow("child", version=7).step("only", calls("child"))
    parent = workflow("parent", version=3).child("kid", child).step("after", calls("after"))
    async with engine_on(db.connect(), parent, child) as engine:
        run = await engine.enqueue(parent)
        assert run.version == 3
        assert run.fingerprint == parent.fingerprint
        for _ in range(4):
            await engine.tick()
        status = await engine.get_run_status(run.id)
        assert status.status == "completed", status
        (kid,) = status.children
        kid_run = await engine.get_run(kid.id)
    assert kid_run.version == 7
    assert kid_run.fingerprint == child.fingerprint


# -- definitions -----------------------------------------------------------------------


def test_the_fingerprint_hashes_the_shape_only() -> None:
    async def a(ctx: StepContext[Any, Any]) -> int:
        return 1

    async def b(ctx: StepContext[Any, Any]) -> int:
        return 2

    base = workflow("w").step("x", a).sleep("nap", "1s").parallel({"p": a, "q": a}, name="g")
    # A fixed value: the fingerprint must not change between releases.
    assert base.fingerprint == fingerprint_of(base.steps)
    assert shape_of(base.steps) == [
        {"kind": "step", "name": "x"},
        {"kind": "sleep", "name": "nap"},
        {"kind": "parallel", "name": "g", "branches": ["p", "q"]},
    ]
    assert base.fingerprint == "24cbde99c7355250"
    same = workflow("w", version=4).step("x", b).sleep("nap", "9s")
    same = same.parallel({"p": b, "q": Branch(b, timeout="1s")}, name="g")
    assert same.fingerprint == base.fingerprint  # handlers, durations, versions do not count
    renamed = workflow("w").step("y", a, was="x").sleep("nap", "1s")
    renamed = renamed.parallel({"p": a, "q": a}, name="g")
    assert renamed.fingerprint != base.fingerprint
    assert workflow("w").step("x", a).fingerprint != workflow("w").sleep("x", 1).fingerprint


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"version": 0}, "version must be an int from 1"),
        ({"version": True}, "version must be an int from 1"),
        ({"version": "2"}, "version must be an int from 1"),
        ({"on_incompatible": "ignore"}, "on_incompatible must be one of"),
    ],
)
def test_bad_versions_and_policies_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        workflow("w", **options)


def test_aliases_are_checked_like_names() -> None:
    async def h(ctx: StepContext[Any, Any]) -> None:
        return None

    base = workflow("w").step("a", h)
    with pytest.raises(ConfigError, match="already the name"):
        base.step("b", h, was="a")
    with pytest.raises(ConfigError, match="repeats a name"):
        base.step("b", h, was=["c", "c"])
    with pytest.raises(ConfigError, match="reserved"):
        base.step("b", h, was="reflow:x")
    with pytest.raises(DuplicateStepError):
        base.step("b", h, was="old").step("old", h)
    with pytest.raises(ConfigError, match="was must be a name"):
        base.step("b", h, was=3)  # type: ignore[call-overload]
    assert base.step("b", h, was=("x", "y")).steps[-1].was == ("x", "y")


async def test_two_definitions_of_one_version_are_refused() -> None:
    async def h(ctx: StepContext[Any, Any]) -> None:
        return None

    with pytest.raises(ConfigError, match="with version 2; give the changed one its own"):
        Engine(
            storage="memory://",
            workflows=[
                workflow("w", version=2).step("a", h),
                workflow("w", version=2).step("b", h),
            ],
            worker=False,
        )


def _saved(*names: str) -> dict[str, StepRecord]:
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 1, 1, tzinfo=UTC)
    return {
        name: StepRecord(name, "completed", output="1", completed_at=start + timedelta(seconds=i))
        for i, name in enumerate(names)
    }


@pytest.mark.parametrize(
    ("build", "saved", "outcome", "detail"),
    [
        (lambda w, h: w.step("a", h).step("b", h).step("c", h), ("a", "b"), "continue", ""),
        (lambda w, h: w.step("a", h).step("b2", h).step("c", h), ("a", "b"), "rerun", "'b2'"),
        (
            lambda w, h: w.step("a", h).step("b2", h, was="b").step("c", h),
            ("a", "b"),
            "continue",
            "",
        ),
        (lambda w, h: w.step("a", h).step("x", h).step("b", h), ("a", "b"), "insert", "'x'"),
        (lambda w, h: w.step("a", h).step("c", h), ("a", "b", "c"), "skip", "'b'"),
        (
            lambda w, h: w.step("a", h).map("m2", lambda c: [1], h, was="m"),
            ("a", "m[0]"),
            "continue",
            "",
        ),
        (lambda w, h: w.step("a", h).step("b", h).step("z", h), ("a",), "continue", ""),
    ],
)
def test_check_replay(
    build: Callable[[Workflow[Any, Any], Any], Workflow[Any, Any]],
    saved: tuple[str, ...],
    outcome: str,
    detail: str,
) -> None:
    async def h(ctx: StepContext[Any, Any]) -> None:
        return None

    found = check_replay(build(workflow("w"), h).steps, _saved(*saved))
    assert found.outcome == outcome, found
    assert detail in found.describe()
