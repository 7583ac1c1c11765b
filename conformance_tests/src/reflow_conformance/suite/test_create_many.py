"""Creating runs in batches (:meth:`~reflow_core.storage.Storage.create_runs`):
each item's outcome as if created one after another, the batch written whole
or not at all (area ``batches``)."""

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
from reflow_core.errors import ConfigError, IdempotencyConflictError, StorageError
from reflow_core.memory import MemoryStorage
from reflow_core.storage import (
    MAX_CREATE_BATCH,
    ConcurrencyLimit,
    CreateResult,
    NewRun,
    RateLimit,
    RunRecord,
    Storage,
)

from ._util import create, read_run

pytestmark = [pytest.mark.reflow_conformance, pytest.mark.reflow_area("batches")]

__all__ = [
    "TestBatchArguments",
    "TestBatchAtomicity",
    "TestBatchOutcomes",
    "TestBatchRaces",
    "TestBatchShape",
]

Outcome = CreateResult | IdempotencyConflictError


def _new(wf: str, value: object, **options: Any) -> NewRun:
    return NewRun(wf, codec.encode(value), **options)


async def _stored(s: Storage, wf: str) -> list[RunRecord]:
    runs: list[RunRecord] = []
    cursor: str | None = None
    while True:
        page = await s.list_runs(workflow=wf, limit=500, cursor=cursor)
        runs.extend(page.runs)
        cursor = page.next_cursor
        if cursor is None:
            return runs


async def _batch(s: Storage, news: list[NewRun]) -> list[Outcome]:
    """``create_runs(news)``, its answer checked to be one outcome per item."""
    try:
        outcomes = await s.create_runs(news)
    except IdempotencyConflictError as exc:
        promise(
            False,
            P.BATCH_OUTCOMES,
            f"create_runs raised {exc!r} instead of returning it in its item's place",
        )
        raise
    return _check_answer(outcomes, len(news))


def _check_answer(outcomes: object, count: int) -> list[Outcome]:
    promise(
        isinstance(outcomes, list) and len(outcomes) == count,
        P.BATCH_OUTCOMES,
        f"create_runs of {count} items returned {outcomes!r:.200}",
    )
    assert isinstance(outcomes, list)
    for index, outcome in enumerate(outcomes):
        promise(
            isinstance(outcome, CreateResult | IdempotencyConflictError),
            P.BATCH_OUTCOMES,
            f"item {index}: {outcome!r:.200} is neither a CreateResult nor an "
            "IdempotencyConflictError",
        )
    return outcomes


class TestBatchOutcomes:
    def test_a_batch_creates_every_run_in_order(self, reflow: Harness) -> None:
        wf = reflow.unique()
        count = 50

        async def body(s: Storage) -> None:
            outcomes = await _batch(s, [_new(wf, {"n": n}) for n in range(count)])
            ids: list[str] = []
            for n, outcome in enumerate(outcomes):
                assert isinstance(outcome, CreateResult)
                run = outcome.run
                promise(outcome.created, P.BATCH_OUTCOMES, f"item {n} not created: {outcome}")
                promise(
                    (run.workflow, run.status, run.attempts, run.lease_epoch)
                    == (wf, "pending", 0, 0),
                    P.CREATE_SHAPE,
                    f"item {n}: {run}",
                )
                promise(codec.decode(run.input) == {"n": n}, P.BATCH_OUTCOMES, f"item {n}: {run}")
                ids.append(run.id)
            promise(len(set(ids)) == count, P.NO_LOST_RUNS, f"{len(set(ids))} distinct ids")
            stored = {run.id: run for run in await _stored(s, wf)}
            promise(set(stored) == set(ids), P.NO_LOST_RUNS, f"{len(stored)} runs stored")
            for n, run_id in enumerate(ids):
                promise(
                    codec.decode(stored[run_id].input) == {"n": n},
                    P.BATCH_OUTCOMES,
                    f"item {n}'s run holds {stored[run_id].input}",
                )

        reflow.run(body)

    def test_items_keep_their_own_idempotency_outcome(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            before = await create(s, wf, {"v": 1}, key="old")
            batch = [
                _new(wf, {"v": 1}, idempotency_key="old"),  # found
                _new(wf, {"v": 2}, idempotency_key="old"),  # conflict with the stored run
                _new(wf, {"v": 3}, idempotency_key="new"),  # created
                _new(wf, {"v": 3}, idempotency_key="new"),  # found: the item before
                _new(wf, {"v": 4}, idempotency_key="new"),  # conflict with the item before
                _new(wf, {"v": 5}),  # created
            ]
            out = await _batch(s, batch)
            found, clash, made, again, clash2, plain = out
            assert isinstance(found, CreateResult)
            promise(
                not found.created and found.run.id == before.run.id,
                P.BATCH_OUTCOMES,
                f"an item with a stored key and equal input gave {found}",
            )
            promise(
                isinstance(clash, IdempotencyConflictError)
                and clash.existing_run_id == before.run.id,
                P.BATCH_OUTCOMES,
                f"an item with a stored key and another input gave {clash!r}",
            )
            assert isinstance(made, CreateResult)
            assert isinstance(again, CreateResult)
            promise(made.created, P.BATCH_OUTCOMES, f"an item with a new key gave {made}")
            promise(
                not again.created and again.run.id == made.run.id,
                P.BATCH_SEES_EARLIER,
                f"an item repeating an earlier item's key and input gave {again}",
            )
            promise(
                isinstance(clash2, IdempotencyConflictError)
                and clash2.existing_run_id == made.run.id,
                P.BATCH_SEES_EARLIER,
                f"an item repeating an earlier item's key with another input gave {clash2!r}",
            )
            assert isinstance(plain, CreateResult)
            promise(plain.created, P.BATCH_OUTCOMES, f"an item without a key gave {plain}")
            stored = {run.id: codec.decode(run.input) for run in await _stored(s, wf)}
            expected = {before.run.id: {"v": 1}, made.run.id: {"v": 3}, plain.run.id: {"v": 5}}
            promise(
                stored == expected,
                P.BATCH_OUTCOMES,
                f"stored {stored}, expected {expected}: a conflicting item wrote something",
            )

        reflow.run(body)

    def test_debounce_keys_in_a_batch_update_one_open_run(self, reflow: Harness) -> None:
        wf = reflow.unique()
        hour = timedelta(hours=1)

        async def body(s: Storage) -> None:
            opened = await s.create_run(_new(wf, "first", debounce_key="d", delay=hour))
            batch = [
                _new(wf, "second", debounce_key="d", delay=hour),
                _new(wf, "third", debounce_key="d", delay=hour),
                _new(wf, "e1", debounce_key="e", delay=hour),
                _new(wf, "e2", debounce_key="e", delay=hour),
            ]
            out = await _batch(s, batch)
            d2, d3, e1, e2 = out
            assert isinstance(d2, CreateResult)
            assert isinstance(d3, CreateResult)
            assert isinstance(e1, CreateResult)
            assert isinstance(e2, CreateResult)
            promise(
                not d2.created and not d3.created and d2.run.id == d3.run.id == opened.run.id,
                P.BATCH_SEES_EARLIER,
                f"items debouncing an open run gave {d2.run.id}, {d3.run.id}, "
                f"the open run is {opened.run.id}",
            )
            promise(
                e1.created and not e2.created and e1.run.id == e2.run.id,
                P.BATCH_SEES_EARLIER,
                f"two items with a new debounce key gave {e1}, {e2}",
            )
            promise(
                codec.decode(d3.run.input) == "third" and codec.decode(e2.run.input) == "e2",
                P.BATCH_SEES_EARLIER,
                f"the debounced runs hold {d3.run.input} and {e2.run.input}",
            )
            stored = {run.id: codec.decode(run.input) for run in await _stored(s, wf)}
            promise(
                stored == {opened.run.id: "third", e1.run.id: "e2"},
                P.BATCH_SEES_EARLIER,
                f"stored {stored}",
            )

        reflow.run(body)

    def test_a_full_batch_created_again_finds_every_run(self, reflow: Harness) -> None:
        wf = reflow.unique()
        batch = [_new(wf, {"n": n}, idempotency_key=f"k{n}") for n in range(MAX_CREATE_BATCH)]

        async def body(s: Storage) -> None:
            first = await _batch(s, batch)
            again = await _batch(s, batch)
            made = [o for o in first if isinstance(o, CreateResult) and o.created]
            promise(
                len(made) == MAX_CREATE_BATCH,
                P.BATCH_OUTCOMES,
                f"{len(made)} of {MAX_CREATE_BATCH} new keys created",
            )
            for n, (one, two) in enumerate(zip(first, again, strict=True)):
                assert isinstance(one, CreateResult)
                promise(
                    isinstance(two, CreateResult) and not two.created and two.run.id == one.run.id,
                    P.BATCH_OUTCOMES,
                    f"item {n} created again gave {two!r:.200}, first {one.run.id}",
                )
            stored = await _stored(s, wf)
            promise(len(stored) == MAX_CREATE_BATCH, P.NO_LOST_RUNS, f"{len(stored)} runs stored")

        reflow.run(body)

    def test_an_empty_batch_creates_nothing(self, reflow: Harness) -> None:
        async def body(s: Storage) -> None:
            outcomes = await s.create_runs([])
            promise(outcomes == [], P.BATCH_OUTCOMES, f"an empty batch returned {outcomes!r}")

        reflow.run(body)

    def test_any_batch_gives_the_outcomes_of_creates_one_by_one(self, reflow: Harness) -> None:
        # Items drawn from a few keys (idempotency, debounce or none) and a
        # few inputs; the same items created one by one on the reference
        # backend give the pattern to match: which items are created, found
        # or in conflict, which share a run, and what each run holds.
        keys = st.sampled_from(["a", "b", "c"])
        item = st.tuples(st.sampled_from(["idem", "debounce", "none"]), keys, st.integers(0, 2))
        counter = iter(range(1_000_000))

        def shape(outcomes: list[Outcome], ids: list[str | None]) -> list[tuple[Any, ...]]:
            first_index: dict[str, int] = {}
            pattern: list[tuple[Any, ...]] = []
            for index, (outcome, run_id) in enumerate(zip(outcomes, ids, strict=True)):
                assert run_id is not None
                same_as = first_index.setdefault(run_id, index)
                if isinstance(outcome, IdempotencyConflictError):
                    pattern.append(("conflict", same_as))
                else:
                    pattern.append(("run", outcome.created, same_as, outcome.run.input))
            return pattern

        async def apply(
            s: Storage, wf: str, items: list[tuple[str, str, int]], batch: bool
        ) -> tuple[list[tuple[Any, ...]], list[Any]]:
            news = [
                _new(
                    wf,
                    value,
                    idempotency_key=key if kind == "idem" else None,
                    debounce_key=key if kind == "debounce" else None,
                )
                for kind, key, value in items
            ]
            if batch:
                outcomes = await _batch(s, news)
            else:
                outcomes = []
                for new in news:
                    try:
                        outcomes.append(await s.create_run(new))
                    except IdempotencyConflictError as exc:
                        outcomes.append(exc)
            ids = [
                o.existing_run_id if isinstance(o, IdempotencyConflictError) else o.run.id
                for o in outcomes
            ]
            stored = sorted(codec.decode(run.input) for run in await _stored(s, wf))
            return shape(outcomes, list(ids)), stored

        @suite_settings()
        @given(st.lists(item, max_size=12), st.lists(item, max_size=12))
        def check(before: list[tuple[str, str, int]], items: list[tuple[str, str, int]]) -> None:
            wf = reflow.unique(f"prop{next(counter)}")

            async def reference() -> Any:
                model = MemoryStorage(name="reference")
                await model.initialize()
                await apply(model, wf, before, batch=False)
                return await apply(model, wf, items, batch=False)

            expected = asyncio.run(reference())

            async def body(s: Storage) -> Any:
                await apply(s, wf, before, batch=False)
                return await apply(s, wf, items, batch=True)

            got = reflow.run(body)
            promise(
                got == expected,
                P.BATCH_OUTCOMES,
                f"after {before}, the batch {items} gave {got}; one by one: {expected}",
            )

        check()


class TestBatchShape:
    def test_batch_runs_are_stored_as_create_run_stores_them(self, reflow: Harness) -> None:
        wf = reflow.unique()
        options: list[dict[str, Any]] = [
            {},
            {"delay": timedelta(hours=1)},
            {"deadline": timedelta(hours=2)},
            {"delay": timedelta(hours=3), "deadline": timedelta(hours=1)},
            {"priority": 7},
            {"limits": (ConcurrencyLimit(f"{wf}:k", 2),)},
            {"rates": (RateLimit(f"{wf}:r", 5, timedelta(minutes=1)),)},
            {"headers": {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}},
        ]

        def fields(run: RunRecord) -> tuple[Any, ...]:
            wake = None if run.wake_at is None else run.wake_at - run.created_at
            due = None if run.deadline_at is None else run.deadline_at - run.created_at
            return (
                run.status,
                codec.decode(run.input),
                run.priority,
                run.limits,
                run.rates,
                dict(run.headers),
                run.blocked_by,
                (run.attempts, run.reclaims, run.lease_epoch),
                round(wake.total_seconds() / 60) if wake and run.status == "delayed" else None,
                None if due is None else round(due.total_seconds() / 60),
            )

        async def body(s: Storage) -> None:
            singles = [
                (await s.create_run(_new(wf, {"n": n}, **o))).run for n, o in enumerate(options)
            ]
            out = await _batch(s, [_new(wf, {"n": n}, **o) for n, o in enumerate(options)])
            for n, (single, outcome) in enumerate(zip(singles, out, strict=True)):
                assert isinstance(outcome, CreateResult)
                stored = await read_run(s, outcome.run.id)
                for what, run in (("returned", outcome.run), ("stored", stored)):
                    promise(
                        fields(run) == fields(single),
                        P.BATCH_SHAPE,
                        f"item {n} ({options[n]}) {what} {fields(run)}, "
                        f"create_run stored {fields(single)}",
                    )

        reflow.run(body)


class TestBatchAtomicity:
    def test_a_taken_run_id_writes_nothing_of_the_batch(self, reflow: Harness) -> None:
        wf = reflow.unique()
        taken = reflow.unique("run")

        async def body(s: Storage) -> None:
            await s.create_run(_new(wf, "there", run_id=taken))
            batch = [_new(wf, {"n": n}, idempotency_key=f"k{n}") for n in range(5)]
            batch.append(_new(wf, "again", run_id=taken))
            try:
                await s.create_runs(batch)
            except StorageError:
                pass
            else:
                promise(False, P.BATCH_ALL_OR_NOTHING, "a taken run id raised no StorageError")
            stored = [codec.decode(run.input) for run in await _stored(s, wf)]
            promise(
                stored == ["there"],
                P.BATCH_ALL_OR_NOTHING,
                f"a batch refused for a taken run id left {stored}",
            )
            twice = reflow.unique("run")
            batch = [_new(wf, "x", run_id=twice), _new(wf, "y"), _new(wf, "z", run_id=twice)]
            try:
                await s.create_runs(batch)
            except StorageError:
                pass
            else:
                promise(False, P.BATCH_ALL_OR_NOTHING, "a run id given twice raised no error")
            stored = [codec.decode(run.input) for run in await _stored(s, wf)]
            promise(
                stored == ["there"],
                P.BATCH_ALL_OR_NOTHING,
                f"a batch refused for a run id given twice left {stored}",
            )

        reflow.run(body)


class TestBatchArguments:
    def test_a_malformed_item_is_refused_before_anything_is_written(self, reflow: Harness) -> None:
        wf = reflow.unique()
        bad_items: list[tuple[str, NewRun]] = [
            ("an empty workflow name", _new("", 1)),
            ("a NUL in an idempotency key", _new(wf, 1, idempotency_key="a\x00b")),
            ("a negative delay", _new(wf, 1, delay=timedelta(seconds=-1))),
            ("a priority out of range", _new(wf, 1, priority=10**9)),
            (
                "a debounce key with an idempotency key",
                _new(wf, 1, idempotency_key="i", debounce_key="d"),
            ),
        ]

        async def body(s: Storage) -> None:
            for what, bad in bad_items:
                batch = [_new(wf, {"n": n}) for n in range(3)] + [bad]
                try:
                    await s.create_runs(batch)
                except ConfigError as exc:
                    promise(
                        "3" in str(exc),
                        P.BATCH_ARGS,
                        f"the error for {what} does not name item 3: {exc}",
                    )
                else:
                    promise(False, P.BATCH_ARGS, f"{what} in item 3 raised no ConfigError")
                stored = await _stored(s, wf)
                promise(
                    not stored,
                    P.BATCH_ALL_OR_NOTHING,
                    f"a batch refused for {what} wrote {len(stored)} runs",
                )
            too_many = [_new(wf, {"n": n}) for n in range(MAX_CREATE_BATCH + 1)]
            try:
                await s.create_runs(too_many)
            except ConfigError:
                pass
            else:
                promise(False, P.BATCH_ARGS, f"{MAX_CREATE_BATCH + 1} items raised no ConfigError")
            stored = await _stored(s, wf)
            promise(
                not stored,
                P.BATCH_ALL_OR_NOTHING,
                f"a batch refused for its size wrote {len(stored)} runs",
            )

        reflow.run(body)


class TestBatchRaces:
    def test_concurrent_batches_with_shared_keys_make_one_run_per_key(
        self, reflow: Harness
    ) -> None:
        wf = reflow.unique()
        keys = [f"k{n}" for n in range(40)]

        async def body(s: Storage) -> None:
            stores = [s, *[await reflow.open() for _ in range(3)]]
            # Each store's batch covers every key, in its own order.
            batches = [
                [_new(wf, {"key": key}, idempotency_key=key) for key in keys[i:] + keys[:i]]
                for i in range(0, 40, 10)
            ]
            answers = await asyncio.gather(
                *(store.create_runs(batch) for store, batch in zip(stores, batches, strict=True))
            )
            by_key: dict[str, set[str]] = {}
            created: dict[str, int] = {}
            for batch, answer in zip(batches, answers, strict=True):
                for new, outcome in zip(batch, _check_answer(answer, len(batch)), strict=True):
                    assert new.idempotency_key is not None
                    promise(
                        isinstance(outcome, CreateResult),
                        P.ONE_RUN_PER_KEY,
                        f"key {new.idempotency_key}: {outcome!r}",
                    )
                    assert isinstance(outcome, CreateResult)
                    by_key.setdefault(new.idempotency_key, set()).add(outcome.run.id)
                    created[new.idempotency_key] = (
                        created.get(new.idempotency_key, 0) + outcome.created
                    )
            split = {key: ids for key, ids in by_key.items() if len(ids) != 1}
            promise(not split, P.ONE_RUN_PER_KEY, f"keys with several runs: {split}")
            twice = {key: n for key, n in created.items() if n != 1}
            promise(not twice, P.ONE_RUN_PER_KEY, f"keys created other than once: {twice}")
            stored = await _stored(s, wf)
            promise(len(stored) == len(keys), P.ONE_RUN_PER_KEY, f"{len(stored)} runs stored")

        reflow.run(body)
