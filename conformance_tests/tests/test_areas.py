"""Declaring an area of the contract missing: how the declaration is given,
checked and carried, and how an undeclared one is named when it fails.

The end-to-end proof (the suite run against an adapter without schedules,
declared and not) is in ``test_catches_broken_adapters``."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from reflow_conformance import AREAS, AdapterFactory, AreaNotImplemented, Harness, load_factory
from reflow_conformance.cli import build_args
from reflow_core.errors import IdempotencyConflictError
from reflow_core.memory import MemoryStorage
from reflow_core.storage import (
    CreateResult,
    FinishedMinute,
    Lease,
    NewRun,
    QueueStats,
    RunRecord,
    ScheduleRecord,
    ScheduleSpec,
    Storage,
    WorkerInfo,
    WorkerRecord,
)


class _Stub(MemoryStorage):
    async def list_schedules(self) -> list[ScheduleRecord]:
        return await self._helper()

    async def _helper(self) -> list[ScheduleRecord]:
        raise NotImplementedError

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        raise NotImplementedError("later")

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        raise NotImplementedError

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        raise NotImplementedError

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        raise NotImplementedError

    async def finished_history(self, minutes: int) -> list[FinishedMinute]:
        raise NotImplementedError

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        raise NotImplementedError


def _factory(
    without: Collection[str] = frozenset(), capabilities: Collection[str] = frozenset()
) -> AdapterFactory:
    return AdapterFactory(
        make=lambda: _Stub(name="areas"),
        name="stub",
        without=frozenset(without),
        capabilities=frozenset(capabilities),
    )


def stub_without_schedules() -> AdapterFactory:
    """Probed by ``load_factory`` below."""
    return _factory(without={"schedules"})


def test_the_areas_and_their_methods() -> None:
    assert AREAS == {
        "schedules": (
            "upsert_schedule",
            "delete_schedule",
            "list_schedules",
            "due_schedules",
            "claim_schedule_slot",
            "set_schedule_paused",
        ),
        "workers": ("announce_worker", "list_workers", "remove_worker"),
        "queue_stats": ("queue_stats",),
        "children": ("start_child", "wait_children", "list_children"),
        "dashboard": ("find_runs_by_key", "list_buffered_events", "finished_history"),
        "batches": ("create_runs", "get_runs"),
    }


def test_every_area_method_is_a_storage_method() -> None:
    for methods in AREAS.values():
        for method in methods:
            assert callable(getattr(Storage, method, None)), method


def test_unknown_names_are_refused_listing_the_known_ones() -> None:
    known = "batches, children, dashboard, queue_stats, schedules, workers"
    with pytest.raises(ValueError, match=rf"unknown area 'schedule'; the known ones are: {known}"):
        _factory(without={"schedule"})
    with pytest.raises(ValueError, match=r"unknown capability 'mp'.*: multiprocess"):
        _factory(capabilities={"mp"})


def test_load_factory_carries_the_declaration() -> None:
    probed = load_factory(f"{__name__}:stub_without_schedules")
    assert probed.without == {"schedules"}
    url = load_factory("memory://areas", without=["schedules"])
    assert url.without == {"schedules"}
    assert load_factory("memory://areas").without == frozenset()


def test_the_command_passes_without_to_pytest_and_refuses_unknown_areas(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_args(["--url", "memory://x", "--without", "schedules", "-x"])
    assert "--reflow-without=schedules" in args
    assert args[-1] == "-x"
    with pytest.raises(SystemExit):
        build_args(["--url", "memory://x", "--without", "schedule"])
    choices = "'batches', 'children', 'dashboard', 'queue_stats', 'schedules', 'workers'"
    assert f"invalid choice: 'schedule' (choose from {choices})" in capsys.readouterr().err
    args = build_args(["--url", "memory://x", "--without", "workers", "--without", "queue_stats"])
    assert {"--reflow-without=workers", "--reflow-without=queue_stats"} <= set(args)


def _failure(factory: AdapterFactory, call: str) -> BaseException:
    harness = Harness(factory, short_lease=timedelta(seconds=0.3))

    async def body(s: Storage) -> object:
        if call == "upsert_schedule":
            slot = datetime(2200, 1, 1, tzinfo=UTC)
            return await s.upsert_schedule(ScheduleSpec("k", "wf", "null", "every:60", slot))
        if call == "list_schedules":
            return await s.list_schedules()
        if call == "announce_worker":
            return await s.announce_worker(WorkerInfo("w", "h", 1, (), 1, 0), timedelta(1))
        if call == "queue_stats":
            return await s.queue_stats(["wf"])
        if call == "start_child":
            return await s.start_child(Lease("p", 1), "s", NewRun("wf", "null", run_id="c"))
        if call == "finished_history":
            return await s.finished_history(60)
        if call == "create_runs":
            return await s.create_runs([NewRun("wf", "null")])
        raise NotImplementedError

    try:
        with pytest.raises((AreaNotImplemented, NotImplementedError)) as caught:
            harness.run(body)
    finally:
        harness.close()
    return caught.value


def test_an_undeclared_area_is_named_with_how_to_declare_it() -> None:
    failure = _failure(_factory(), "upsert_schedule")
    assert isinstance(failure, AreaNotImplemented)
    message = str(failure)
    assert "adapter stub does not implement 'schedules'" in message
    assert "(upsert_schedule raised NotImplementedError)" in message
    assert "AdapterFactory(without=frozenset({'schedules'}))" in message
    assert "--reflow-without=schedules" in message
    assert isinstance(failure.__cause__, NotImplementedError)
    # Raised in a helper of the method: the method is still found.
    nested = _failure(_factory(), "list_schedules")
    assert "(list_schedules raised NotImplementedError)" in str(nested)


@pytest.mark.parametrize(
    ("call", "area"),
    [
        ("announce_worker", "workers"),
        ("queue_stats", "queue_stats"),
        ("start_child", "children"),
        ("finished_history", "dashboard"),
        ("create_runs", "batches"),
    ],
)
def test_the_newer_areas_are_named_too(call: str, area: str) -> None:
    failure = _failure(_factory(), call)
    assert isinstance(failure, AreaNotImplemented)
    assert f"adapter stub does not implement {area!r} ({call} raised" in str(failure)
    assert f"--reflow-without={area}" in str(failure)
    declared = _failure(_factory(without={area}), call)
    assert "although adapter stub declares it does not implement" in str(declared)
    assert f"not marked reflow_area({area!r})" in str(declared)


def test_other_not_implemented_errors_are_left_alone() -> None:
    failure = _failure(_factory(), "something else")
    assert type(failure) is NotImplementedError


def test_harness_implements() -> None:
    harness = Harness(_factory(without={"schedules"}), short_lease=timedelta(seconds=0.3))
    try:
        assert not harness.implements("schedules")
        with pytest.raises(ValueError, match="unknown area"):
            harness.implements("nope")
    finally:
        harness.close()
