"""Listing runs: newest first, filtered by status and workflow, and keyset
pagination that visits every matching run exactly once."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Collection

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_core import codec
from reflow_core.errors import ConfigError
from reflow_core.storage import RunRecord, RunStatus, Storage

from ._util import LONG, create, create_many, read_run

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestListArguments", "TestListRuns", "TestPagination"]

STATUSES: tuple[RunStatus, ...] = (
    "pending",
    "running",
    "sleeping",
    "waiting",
    "completed",
    "failed",
    "cancelled",
)


async def _every_page(
    s: Storage,
    *,
    limit: int,
    workflow: str | None = None,
    status: Collection[RunStatus] | None = None,
) -> list[list[RunRecord]]:
    """Follow ``next_cursor`` from the first page to the last."""
    pages: list[list[RunRecord]] = []
    cursor: str | None = None
    while True:
        page = await s.list_runs(status=status, workflow=workflow, limit=limit, cursor=cursor)
        promise(
            len(page.runs) <= limit,
            P.PAGINATION,
            f"a page of limit {limit} holds {len(page.runs)} runs",
        )
        pages.append(list(page.runs))
        cursor = page.next_cursor
        if cursor is None:
            return pages
        promise(page.runs, P.PAGINATION, "an empty page has a next_cursor")
        promise(len(pages) <= 1000, P.PAGINATION, "more than 1000 pages: the cursor loops")


def _check_visits(
    pages: list[list[RunRecord]], expected: Collection[str], what: str, limit: int
) -> None:
    """The pages list exactly ``expected``, each once, newest first."""
    runs = [run for page in pages for run in page]
    ids = [run.id for run in runs]
    promise(
        len(ids) == len(set(ids)),
        P.PAGINATION,
        f"{what}, limit {limit}: {len(ids) - len(set(ids))} runs visited twice",
    )
    missing, extra = set(expected) - set(ids), set(ids) - set(expected)
    promise(
        not missing and not extra,
        P.PAGINATION,
        f"{what}, limit {limit}: {len(missing)} runs never visited, {len(extra)} not matching",
    )
    stamps = [run.created_at for run in runs]
    promise(
        all(a >= b for a, b in itertools.pairwise(stamps)),
        P.PAGINATION,
        f"{what}, limit {limit}: not newest first across pages",
    )


async def _one_run_per_status(reflow: Harness, s: Storage, wf: str) -> dict[RunStatus, str]:
    """Runs of ``wf``, one in each status; their ids by status."""
    ids = dict(zip(STATUSES, await create_many(s, wf, len(STATUSES)), strict=True))
    leases = {c.run.id: c.lease for c in await s.claim_runs([wf], 10, reflow.long_lease)}
    promise(len(leases) == len(STATUSES), P.NO_LOST_RUNS, f"claimed {len(leases)} runs")
    await s.update_run_status(ids["pending"], "pending", lease=leases[ids["pending"]])
    await s.sleep_run(leases[ids["sleeping"]], "nap", LONG)
    await s.wait_run(leases[ids["waiting"]], "hold", "never", LONG)
    await s.finish_run(leases[ids["completed"]], "completed", output=codec.encode(1))
    await s.finish_run(leases[ids["failed"]], "failed", error=codec.encode("x"))
    await s.update_run_status(ids["cancelled"], "cancelled")
    for status, run_id in ids.items():
        run = await read_run(s, run_id)
        promise(run.status == status, _SET_UP[status], f"could not set up a {status} run: {run}")
    return ids


_SET_UP: dict[RunStatus, str] = {
    "pending": P.HAND_BACK,
    "running": P.CLAIMED_RUNNING,
    "sleeping": P.PAUSE_RECORDED,
    "waiting": P.PAUSE_RECORDED,
    "completed": P.FINISH_ATOMIC,
    "failed": P.FINISH_ATOMIC,
    "cancelled": P.CANCEL,
}
"""The promise that leaves a run in each status, as the listing tests set it up."""


class TestListRuns:
    def test_runs_are_listed_newest_first(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            created: list[str] = []
            for i in range(5):
                created.append((await create(s, wf, i)).run.id)
                await asyncio.sleep(0.01)
            page = await s.list_runs(workflow=wf)
            ids = [run.id for run in page.runs]
            promise(
                ids == created[::-1],
                P.PAGINATION,
                f"created {created} 10 ms apart, listed {ids}",
            )
            promise(page.next_cursor is None, P.PAGINATION, "one page of 5 has a next_cursor")

        reflow.run(body)

    def test_a_listed_run_is_the_stored_run(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            ids = await _one_run_per_status(reflow, s, wf)
            page = await s.list_runs(workflow=wf)
            for run in page.runs:
                stored = await s.get_run(run.id)
                promise(run == stored, P.LIST_FILTERS, f"listed {run}, stored {stored}")
            promise(len(page.runs) == len(ids), P.LIST_FILTERS, f"{len(page.runs)} listed")

        reflow.run(body)

    def test_filters_by_status_and_workflow(self, reflow: Harness) -> None:
        wf, neighbour = reflow.unique(), reflow.unique()
        filters: list[set[RunStatus]] = [
            {"pending"},
            {"running", "completed"},
            {"sleeping", "waiting", "failed", "cancelled"},
            set(STATUSES),
        ]

        async def body(s: Storage) -> None:
            ids = await _one_run_per_status(reflow, s, wf)
            theirs = (await create(s, neighbour)).run.id
            everything = await s.list_runs(workflow=wf)
            listed = {run.id for run in everything.runs}
            promise(listed == set(ids.values()), P.LIST_FILTERS, f"workflow {wf}: {listed}")
            for wanted in filters:
                page = await s.list_runs(status=wanted, workflow=wf)
                got = {run.id: run.status for run in page.runs}
                expected = {ids[status]: status for status in wanted}
                promise(
                    got == expected,
                    P.LIST_FILTERS,
                    f"status in {sorted(wanted)}: listed {sorted(got.values())}",
                )
            page = await s.list_runs(status=["pending"], workflow=neighbour)
            got_ids = [run.id for run in page.runs]
            promise(got_ids == [theirs], P.LIST_FILTERS, f"workflow {neighbour}: {got_ids}")
            page = await s.list_runs(status=["running"], workflow=neighbour)
            promise(list(page.runs) == [], P.LIST_FILTERS, f"status running: {page.runs}")

        reflow.run(body)


class TestPagination:
    def test_pages_visit_every_run_once(self, reflow: Harness) -> None:
        wf = reflow.unique()
        count = 50

        async def body(s: Storage) -> None:
            stores = [s, *[await reflow.open() for _ in range(2)]]
            # Created all at once, so on a coarse clock many share a created_at.
            created = await asyncio.gather(
                *(create(stores[i % len(stores)], wf, i) for i in range(count))
            )
            ids = {result.run.id for result in created}
            promise(len(ids) == count, P.NO_LOST_RUNS, f"{len(ids)} distinct runs of {count}")
            for limit in (1, 7, 10, count, count + 1):
                pages = await _every_page(s, limit=limit, workflow=wf)
                _check_visits(pages, ids, f"{count} runs", limit)
                full = [len(page) for page in pages[:-1]]
                promise(
                    all(size == limit for size in full),
                    P.PAGINATION,
                    f"limit {limit}: pages before the last hold {full}",
                )

        reflow.run(body)

    def test_pages_with_any_limit_and_filter(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def setup(s: Storage) -> dict[str, RunStatus]:
            ids = await _one_run_per_status(reflow, s, wf)
            more = await asyncio.gather(*(create(s, wf, i) for i in range(14)))
            statuses: dict[str, RunStatus] = {run_id: status for status, run_id in ids.items()}
            statuses.update((result.run.id, "pending") for result in more)
            return statuses

        statuses = reflow.run(setup)
        filters = st.one_of(st.none(), st.sets(st.sampled_from(STATUSES), min_size=1))

        @suite_settings()
        @given(limit=st.integers(1, 7), wanted=filters)
        def check(limit: int, wanted: set[RunStatus] | None) -> None:
            expected = {i for i, status in statuses.items() if wanted is None or status in wanted}

            async def body(s: Storage) -> None:
                pages = await _every_page(s, limit=limit, workflow=wf, status=wanted)
                what = f"status in {sorted(wanted)}" if wanted else "no status filter"
                _check_visits(pages, expected, what, limit)

            reflow.run(body)

        check()


class TestListArguments:
    def test_a_malformed_cursor_is_a_config_error(self, reflow: Harness) -> None:
        wf = reflow.unique()
        cursors = ["not a cursor", "!!!", "\x00"]

        async def body(s: Storage) -> None:
            await create(s, wf)
            for cursor in cursors:
                try:
                    await s.list_runs(workflow=wf, cursor=cursor)
                except ConfigError:
                    continue
                promise(False, P.LIST_ARGS, f"cursor {cursor!r} raised no ConfigError")

        reflow.run(body)

    def test_a_limit_below_one_is_a_config_error(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            for limit in (0, -1):
                try:
                    await s.list_runs(workflow=wf, limit=limit)
                except ConfigError:
                    continue
                promise(False, P.LIST_ARGS, f"limit {limit} raised no ConfigError")

        reflow.run(body)
