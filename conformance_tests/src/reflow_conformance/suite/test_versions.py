"""Workflow versions (``NewRun.version``, ``NewRun.fingerprint``, and
``claim_runs(versions=...)``).

A run carries the version of the workflow definition that enqueued it (an
int from 1 to :data:`~reflow_core.storage.MAX_VERSION`, 1 by default) and the
fingerprint of that definition's shape (1 to
:data:`~reflow_core.storage.MAX_FINGERPRINT` characters of ``0-9 a-z``, or
``None``): the store keeps both as created, and nothing of a run's life
changes them but a debounced create, which replaces them with its own.

A claim given ``versions`` takes, of each workflow it keys, only the runs of
the versions listed, and of the others runs of any version. The runs it does
not serve are left exactly as they are, lapsed leases included, for a claim
that serves them; however many come first, they never keep a served run
from being taken. A bad ``versions``, version or fingerprint is refused
with :class:`~reflow_core.errors.ConfigError` before anything is claimed or
written."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import (
    MAX_FINGERPRINT,
    MAX_VERSION,
    ClaimedRun,
    NewRun,
    RunRecord,
    StepRecord,
    Storage,
)

from ._util import (
    LONG,
    check_times,
    claim_only,
    read_run,
    refused,
    refused_creates,
    refused_starts,
)

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestClaimVersions", "TestVersions", "TestVersionsArguments"]

LONGEST = "0123456789abcdefghijklmnopqrstuvwxyz" + "z" * (MAX_FINGERPRINT - 36)
"""The longest fingerprint a run may carry, every character it may hold."""

STEP = StepRecord("s", "completed", output=codec.encode(1))

Shape = tuple[int, str | None]
"""A run's version and fingerprint."""

_KEPT = (
    "status",
    "attempts",
    "reclaims",
    "lease_epoch",
    "lease_expires_at",
    "blocked_by",
    "wake_at",
    "version",
    "fingerprint",
)
"""The fields of a run a claim that does not serve its version must leave as they are."""


def _shape(run: RunRecord) -> Shape:
    return run.version, run.fingerprint


def _stored(run: RunRecord, expected: Shape, where: str) -> None:
    promise(
        _shape(run) == expected,
        P.VERSION_STORED,
        f"{where}: run {run.id} has version {run.version!r} and fingerprint "
        f"{run.fingerprint!r}, expected {expected[0]!r} and {expected[1]!r}",
    )


def _changes(before: RunRecord, after: RunRecord) -> list[str]:
    """The fields of :data:`_KEPT` that differ between two reads of a run."""
    return [
        f"{name} {getattr(before, name)!r} -> {getattr(after, name)!r}"
        for name in _KEPT
        if getattr(before, name) != getattr(after, name)
    ]


async def _read_all(
    reflow: Harness, s: Storage, cases: Mapping[str, Shape], workflows: Sequence[str], when: str
) -> None:
    """Every run of ``cases`` read back by ``get_run``, ``get_runs`` and ``list_runs``."""
    for run_id, expected in cases.items():
        _stored(await read_run(s, run_id), expected, f"get_run {when}")
    if reflow.implements("batches"):
        found = await s.get_runs(list(cases))
        for run_id, expected in cases.items():
            record = found.get(run_id)
            promise(record is not None, P.GET_RUNS, f"get_runs {when} left out {run_id}")
            assert record is not None
            _stored(record, expected, f"get_runs {when}")
    listed: dict[str, RunRecord] = {}
    for workflow in workflows:
        listed.update({r.id: r for r in (await s.list_runs(workflow=workflow, limit=100)).runs})
    for run_id, expected in cases.items():
        record = listed.get(run_id)
        promise(record is not None, P.LIST_FILTERS, f"list_runs {when} left out {run_id}")
        assert record is not None
        _stored(record, expected, f"list_runs {when}")


async def _claim(
    s: Storage,
    workflows: Collection[str],
    limit: int,
    versions: Mapping[str, Collection[int]] | None,
    lease: timedelta = LONG,
) -> list[ClaimedRun]:
    """``claim_runs`` with ``versions``, a moment after the runs it should
    take were made due (a store may round a due time up to its millisecond)."""
    await asyncio.sleep(0.005)
    claimed = await s.claim_runs(list(workflows), limit, lease, versions=versions)
    promise(len(claimed) <= limit, P.CLAIM_LIMIT, f"limit {limit}, claimed {len(claimed)}")
    for c in claimed:
        check_times(c, f"the claim of {c.run.id}")
    return claimed


async def _reads(s: Storage, run_ids: Collection[str]) -> dict[str, RunRecord]:
    return {run_id: await read_run(s, run_id) for run_id in run_ids}


def _left_alone(before: Mapping[str, RunRecord], after: Mapping[str, RunRecord], what: str) -> None:
    """Runs a claim did not serve read back as they were before it."""
    for run_id, old in before.items():
        changed = _changes(old, after[run_id])
        promise(
            not changed,
            P.CLAIM_VERSIONS_SERVED,
            f"{what} changed run {run_id} of version {old.version}: {'; '.join(changed)}",
        )


def _new(workflow: str, tag: object, version: int, **args: Any) -> NewRun:
    return NewRun(workflow, codec.encode(tag), version=version, **args)


class TestVersions:
    def test_version_and_fingerprint_read_back_as_created(self, reflow: Harness) -> None:
        """Version and fingerprint read back as created (1 and ``None`` by
        default) from ``create_run``, ``create_runs`` and ``start_child``, and
        by ``get_run``, ``get_runs``, ``list_runs`` and the claim, the largest
        version and the longest fingerprint included; no claim, step save,
        sleep, finish, requeue or cancel changes them."""
        wf, cwf, pwf = reflow.unique(), reflow.unique("child"), reflow.unique("parent")
        shapes: list[Shape] = [
            (2, None),
            (3, "0a1b2c"),
            (1, "f"),
            (MAX_VERSION, LONGEST),
            (7, "0"),
        ]

        async def body(s: Storage) -> None:
            cases: dict[str, Shape] = {}
            plain = (await s.create_run(NewRun(wf, codec.encode("plain")))).run
            _stored(plain, (1, None), "a run created without a version")
            cases[plain.id] = (1, None)
            for n, (version, fingerprint) in enumerate(shapes):
                made = (await s.create_run(_new(wf, n, version, fingerprint=fingerprint))).run
                _stored(made, (version, fingerprint), "create_run returned")
                cases[made.id] = (version, fingerprint)
            if reflow.implements("batches"):
                news = [_new(wf, ["batch", n], v, fingerprint=f) for n, (v, f) in enumerate(shapes)]
                news.append(NewRun(wf, codec.encode("batch plain")))
                outcomes = await s.create_runs(news)
                for new, outcome in zip(news, outcomes, strict=True):
                    promise(
                        not isinstance(outcome, Exception),
                        P.BATCH_OUTCOMES,
                        f"create_runs gave {outcome!r} for a plain create",
                    )
                    assert not isinstance(outcome, Exception)
                    expected = (new.version, new.fingerprint)
                    _stored(outcome.run, expected, "create_runs returned")
                    cases[outcome.run.id] = expected
            if reflow.implements("children"):
                await s.create_run(_new(pwf, "parent", 4, fingerprint="p4"))
                held = await claim_only(s, pwf, P.NEW_RUN_CLAIMABLE)
                _stored(held.run, (4, "p4"), "the claim of a parent returned")
                for n, (version, fingerprint) in enumerate([(1, None), *shapes[:3]]):
                    child_id = reflow.unique("c")
                    new = _new(cwf, n, version, run_id=child_id, fingerprint=fingerprint)
                    child = await s.start_child(held.lease, f"spawn{n}", new)
                    promise(child is not None, P.LIVE_LEASE_ACCEPTED, "start_child returned None")
                    assert child is not None
                    _stored(child, (version, fingerprint), "start_child returned")
                    cases[child_id] = (version, fingerprint)
                await s.finish_run(held.lease, "completed", output=codec.encode(1))
            workflows = [wf, cwf]
            await _read_all(reflow, s, cases, workflows, "after their creation")

            claimed = await _claim(s, workflows, 4 * len(cases), None)
            missing = sorted(set(cases) - {c.run.id for c in claimed})
            promise(not missing, P.NEW_RUN_CLAIMABLE, f"no claim took {missing}")
            for c in claimed:
                if c.run.id in cases:
                    _stored(c.run, cases[c.run.id], "the claim returned")
                    await s.save_step_result(c.lease, STEP, LONG)
                    await s.sleep_run(c.lease, "nap", timedelta(hours=1))
            await _read_all(reflow, s, cases, workflows, "after claims, step saves and sleeps")
            for run_id in cases:
                await s.update_run_status(run_id, "cancelled")
                await s.requeue_run(run_id)
            await _read_all(reflow, s, cases, workflows, "after cancels and requeues")

        reflow.run(body)

    def test_a_debounced_create_replaces_version_and_fingerprint(self, reflow: Harness) -> None:
        """A create with the debounce key of an open run gives it the
        create's version and fingerprint (back to 1 and ``None`` for a create
        without them). Once a claim took it, it keeps them, and the next
        create with the key makes a run of its own, with its own."""
        wf = reflow.unique()
        key = reflow.unique("debounce")

        async def debounce(s: Storage, value: object, version: int, fp: str | None) -> RunRecord:
            new = _new(wf, value, version, debounce_key=key, fingerprint=fp)
            return (await s.create_run(new)).run

        async def body(s: Storage) -> None:
            first = await debounce(s, 1, 1, "a1")
            _stored(first, (1, "a1"), "the first create with the key returned")
            for version, fingerprint in [(2, "b2"), (5, None), (1, None), (3, "c3")]:
                again = await debounce(s, [version, fingerprint], version, fingerprint)
                promise(
                    again.id == first.id,
                    P.DEBOUNCE_REPLACES,
                    f"a create with the key of the open run {first.id} made {again.id}",
                )
                what = f"a debounced create of version {version}, fingerprint {fingerprint!r}"
                _stored(again, (version, fingerprint), f"{what} returned")
                _stored(await read_run(s, first.id), (version, fingerprint), f"after {what}")
            taken = await _claim(s, [wf], 10, {wf: [3]})
            promise(
                [c.run.id for c in taken] == [first.id],
                P.VERSION_STORED,
                f"a claim of version 3 took {[c.run.id for c in taken]}, expected the run "
                f"{first.id} its last debounced create made version 3",
            )
            _stored(taken[0].run, (3, "c3"), "the claim of the debounced run returned")
            later = await debounce(s, "later", 2, "d2")
            promise(later.id != first.id, P.DEBOUNCE_AFTER_CLAIM, "the claimed run was replaced")
            _stored(later, (2, "d2"), "a create with the key of a claimed run returned")
            _stored(await read_run(s, first.id), (3, "c3"), "the claimed run, after a later create")

        reflow.run(body)


class TestClaimVersions:
    def test_a_claim_takes_only_the_versions_it_serves(self, reflow: Harness) -> None:
        """Of a workflow it keys, a claim takes only runs of the versions
        listed; of one it does not key, runs of every version. The runs it
        does not serve stay pending, unchanged, and a claim that serves them
        takes them later."""
        a, b = reflow.unique("a"), reflow.unique("b")

        async def body(s: Storage) -> None:
            made: dict[str, RunRecord] = {}
            for workflow, versions in ((a, (1, 2, 3, 2, 1)), (b, (1, 2, 9))):
                for n, version in enumerate(versions):
                    run = (await s.create_run(_new(workflow, n, version))).run
                    made[run.id] = run
            served = {r for r, run in made.items() if run.workflow == b or run.version == 2}
            others = await _reads(s, set(made) - served)
            claimed = await _claim(s, [a, b], 20, {a: [2]})
            got = {c.run.id for c in claimed}
            wrong = sorted(
                f"{made[r].workflow[:1]} v{made[r].version}" for r in got - served if r in made
            )
            promise(
                not wrong and got <= set(made),
                P.CLAIM_VERSIONS_SERVED,
                f"a claim serving version 2 of a (and any version of b) took runs of {wrong}",
            )
            missed = sorted(f"{made[r].workflow[:1]} v{made[r].version}" for r in served - got)
            promise(not missed, P.CLAIM_VERSIONS_SERVED, f"the claim left served runs: {missed}")
            for c in claimed:
                _stored(c.run, _shape(made[c.run.id]), "a claim with versions returned")
            _left_alone(others, await _reads(s, others), "a claim serving version 2 of a")

            again = await _claim(s, [a], 20, {a: [2]})
            promise(
                not again,
                P.CLAIM_VERSIONS_SERVED,
                f"a second claim of version 2 took {[(c.run.id, c.run.version) for c in again]}",
            )
            rest = await _claim(s, [a, b], 20, {a: [3, 1], b: [4]})
            promise(
                {c.run.id for c in rest} == set(others),
                P.CLAIM_VERSIONS_SERVED,
                f"a claim serving versions 1 and 3 of a took "
                f"{sorted((c.run.version, c.run.id) for c in rest)}, "
                f"expected {sorted((r.version, r.id) for r in others.values())}",
            )

        reflow.run(body)

    def test_a_lapsed_lease_of_a_version_not_served_is_not_taken_over(
        self, reflow: Harness
    ) -> None:
        """A run of a version the claim does not serve stays running on its
        lapsed lease, its epoch and counters as they were, while a served one
        beside it is reclaimed; a claim that serves it takes it over."""
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            ones = [(await s.create_run(_new(wf, n, 1))).run.id for n in range(2)]
            two = (await s.create_run(_new(wf, "two", 2))).run.id
            held = await _claim(s, [wf], 10, None, reflow.short_lease)
            promise(
                {c.run.id for c in held} == {*ones, two},
                P.NEW_RUN_CLAIMABLE,
                f"a claim of every version took {[c.run.id for c in held]}",
            )
            await reflow.lapse()
            before = await _reads(s, ones)
            taken = await _claim(s, [wf], 10, {wf: [2]})
            promise(
                [c.run.id for c in taken] == [two],
                P.CLAIM_VERSIONS_SERVED,
                f"a claim of version 2 among lapsed leases took "
                f"{[(c.run.id, c.run.version) for c in taken]}, expected only {two}",
            )
            promise(taken[0].reclaimed, P.RECLAIM_AFTER_LAPSE, "the lapsed run was not a reclaim")
            _left_alone(before, await _reads(s, ones), "a claim of version 2")
            later = await _claim(s, [wf], 10, {wf: [1]})
            promise(
                sorted(c.run.id for c in later) == sorted(ones) and all(c.reclaimed for c in later),
                P.CLAIM_VERSIONS_SERVED,
                f"a claim of version 1 took {[(c.run.id, c.reclaimed) for c in later]}, "
                f"expected the lapsed runs {ones} as reclaims",
            )

        reflow.run(body)

    def test_runs_not_served_never_hide_a_served_one(self, reflow: Harness) -> None:
        """300 runs of a version not served, created first and of a higher
        priority, do not keep a claim of limit 1 from the one served run, nor
        does the claim change any of them."""
        wf = reflow.unique()
        count = 300

        async def body(s: Storage) -> None:
            news = [_new(wf, n, 1, priority=5) for n in range(count)]
            if reflow.implements("batches"):
                await s.create_runs(news)
            else:
                for new in news:
                    await s.create_run(new)
            served = (await s.create_run(_new(wf, "served", 2))).run
            for attempt in range(3):
                claimed = await _claim(s, [wf], 1, {wf: [2]})
                promise(
                    [c.run.id for c in claimed] == [served.id],
                    P.CLAIM_VERSIONS_SERVED,
                    f"claim {attempt + 1} of version 2, limit 1, behind {count} runs of version "
                    f"1 took {[(c.run.id, c.run.version) for c in claimed]}",
                )
                await s.update_run_status(served.id, "pending", lease=claimed[0].lease)
            listed: list[RunRecord] = []
            cursor: str | None = None
            while True:
                page = await s.list_runs(workflow=wf, limit=100, cursor=cursor)
                listed.extend(page.runs)
                cursor = page.next_cursor
                if cursor is None:
                    break
            touched = [
                r.id
                for r in listed
                if r.version == 1
                and (r.status, r.attempts, r.lease_epoch, r.blocked_by) != ("pending", 0, 0, None)
            ]
            promise(
                len(listed) == count + 1 and not touched,
                P.CLAIM_VERSIONS_SERVED,
                f"{len(listed)} runs listed; claims of version 2 changed {touched[:5]}",
            )

        reflow.run(body)

    def test_priority_order_holds_across_the_versions_served(self, reflow: Harness) -> None:
        """A claim serving several versions takes their runs by priority,
        highest first, as if they were of one version; the runs of a version
        it does not serve, of a higher priority still, take no turn."""
        wf = reflow.unique()
        plan = [(1, 0), (2, 5), (3, 9), (1, 3), (2, 1), (3, 7), (1, 8)]

        async def body(s: Storage) -> None:
            made = {}
            for version, priority in plan:
                run = (await s.create_run(_new(wf, priority, version, priority=priority))).run
                made[run.id] = (version, priority)
            order: list[tuple[int, int]] = []
            for _ in range(6):
                claimed = await _claim(s, [wf], 1, {wf: [2, 1]})
                if not claimed:
                    break
                order.append(made[claimed[0].run.id])
            expected = sorted(((v, p) for v, p in plan if v in (1, 2)), key=lambda vp: -vp[1])
            promise(
                order == expected,
                P.CLAIM_VERSIONS_SERVED,
                f"claims serving versions 1 and 2 took (version, priority) {order}, "
                f"expected {expected}",
            )

        reflow.run(body)


_BAD_VERSIONS: list[tuple[str, Any]] = [
    ("0", 0),
    ("-1", -1),
    ("2**31", 2**31),
    ("True", True),
    ("the str '2'", "2"),
    ("1.0", 1.0),
    ("None", None),
]
_BAD_FINGERPRINTS: list[tuple[str, Any]] = [
    ("an empty str", ""),
    ("upper case", "ABC"),
    ("a dash", "a-b"),
    ("a space", "a b"),
    (f"{MAX_FINGERPRINT + 1} characters", "a" * (MAX_FINGERPRINT + 1)),
    ("a non-ASCII letter", "caf\u00e9"),
    ("a NUL", "a\x00"),
    ("an int", 5),
    ("bytes", b"ab"),
]


class TestVersionsArguments:
    def test_bad_versions_in_a_claim_are_refused_and_claim_nothing(self, reflow: Harness) -> None:
        wf, other = reflow.unique(), reflow.unique("other")
        bad: list[tuple[str, Any]] = [
            ("a workflow the claim does not ask for", {other: [1]}),
            ("an empty list of versions", {wf: []}),
            ("an empty set of versions", {wf: set()}),
            *((f"the version {what}", {wf: [1, value]}) for what, value in _BAD_VERSIONS),
            ("a bare int instead of a collection", {wf: 2}),
            ("a str instead of a collection", {wf: "2"}),
            ("pairs instead of a mapping", [(wf, [1])]),
        ]

        async def body(s: Storage) -> None:
            made = (await s.create_run(_new(wf, "v", 1))).run
            for what, versions in bad:
                await refused(
                    functools.partial(s.claim_runs, [wf], 5, LONG, versions=versions),
                    f"claim_runs with versions of {what}",
                    P.CLAIM_VERSIONS_CHECKED,
                )
            after = await read_run(s, made.id)
            changed = _changes(made, after)
            promise(
                not changed,
                P.CLAIM_VERSIONS_CHECKED,
                f"refused claims changed the run: {'; '.join(changed)}",
            )
            taken = await _claim(s, [wf], 5, {wf: {1}})
            promise(
                [c.run.id for c in taken] == [made.id],
                P.CLAIM_VERSIONS_SERVED,
                f"a claim of version 1 as a set took {[c.run.id for c in taken]}",
            )

        reflow.run(body)

    def test_a_bad_version_or_fingerprint_is_refused_and_writes_nothing(
        self, reflow: Harness
    ) -> None:
        wf, cwf, pwf = reflow.unique(), reflow.unique("child"), reflow.unique("parent")
        bad = [
            *((f"version {what}", {"version": value}) for what, value in _BAD_VERSIONS),
            *((f"a fingerprint of {what}", {"fingerprint": v}) for what, v in _BAD_FINGERPRINTS),
        ]

        async def body(s: Storage) -> None:
            await refused_creates(s, wf, bad, P.CLAIM_VERSIONS_CHECKED)
            if reflow.implements("children"):
                starts = [(f"start_child with {what}", args) for what, args in bad]
                held = await refused_starts(reflow, s, pwf, cwf, starts, P.CLAIM_VERSIONS_CHECKED)
                await s.finish_run(held.lease, "completed", output=codec.encode(1))
            runs = [r.id for r in (await s.list_runs(workflow=cwf)).runs]
            promise(not runs, P.CLAIM_VERSIONS_CHECKED, f"refused starts made {runs}")

        reflow.run(body)
