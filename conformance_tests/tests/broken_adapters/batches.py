"""Adapters that break a promise of the batch operations: for
``create_runs``, a batch written item by item, items that do not see the
ones before them, and conflicts raised instead of returned in their place;
for ``get_runs``, a read capped at a hundred ids and missing runs answered
for."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from reflow_core.adapter import check_new_runs, check_run_ids
from reflow_core.errors import IdempotencyConflictError
from reflow_core.memory import MemoryStorage
from reflow_core.storage import CreateResult, NewRun, RunRecord

from ._common import _store


class BatchNotAtomic(MemoryStorage):
    """Breaks *a refused batch writes nothing*: each item is written as it
    comes, so a batch refused at a taken run id keeps the items before it,
    as an adapter looping over ``create_run`` outside one transaction
    would."""

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        check_new_runs(news)
        outcomes: list[CreateResult | IdempotencyConflictError] = []
        for new in news:
            try:
                outcomes.append(await self.create_run(new))
            except IdempotencyConflictError as exc:
                outcomes.append(exc)
        return outcomes


def batch_not_atomic() -> MemoryStorage:
    return BatchNotAtomic(name=_store("batch_not_atomic"))


class BatchBlindToItself(MemoryStorage):
    """Breaks *items see the items before them*: idempotency keys are looked
    up in the store as it was before the batch, so a key repeated within a
    batch makes a run per item, as a bulk insert that checks its keys with
    one query first and then inserts every miss would."""

    def _create(self, new: NewRun, now: datetime) -> CreateResult | IdempotencyConflictError:
        if new.idempotency_key is not None and self._in_batch.get(
            (new.workflow, new.idempotency_key)
        ):
            # Seen earlier in this batch: created again under a fresh key slot.
            del self._idem[(new.workflow, new.idempotency_key)]
        outcome = super()._create(new, now)
        if new.idempotency_key is not None and isinstance(outcome, CreateResult):
            self._in_batch[(new.workflow, new.idempotency_key)] = outcome.created
        return outcome

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        self._in_batch: dict[tuple[str, str], bool] = {}
        try:
            return await super().create_runs(news)
        finally:
            self._in_batch = {}

    async def create_run(self, new: NewRun) -> CreateResult:
        self._in_batch = {}
        return await super().create_run(new)


def batch_blind_to_itself() -> MemoryStorage:
    return BatchBlindToItself(name=_store("batch_blind_to_itself"))


class BatchRaisesConflicts(MemoryStorage):
    """Breaks *a conflict is returned in its item's place*: the first
    conflicting item raises, after the items before it were created, as an
    adapter that lets ``create_run``'s exception escape its loop would."""

    async def create_runs(
        self, news: Sequence[NewRun]
    ) -> list[CreateResult | IdempotencyConflictError]:
        outcomes = await super().create_runs(news)
        for outcome in outcomes:
            if isinstance(outcome, IdempotencyConflictError):
                raise outcome
        return outcomes


def batch_raises_conflicts() -> MemoryStorage:
    return BatchRaisesConflicts(name=_store("batch_raises_conflicts"))


class GetRunsCapped(MemoryStorage):
    """Breaks *get_runs returns every stored run among the ids*: only the
    first hundred ids are read, as a query with a forgotten ``LIMIT 100``
    (or one page of a paginated read) would."""

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        ids = check_run_ids(run_ids)[:100]
        return await super().get_runs(ids)


def get_runs_capped() -> MemoryStorage:
    return GetRunsCapped(name=_store("get_runs_capped"))


class GetRunsListsMissing(MemoryStorage):
    """Breaks *a missing run is left out*: every id asked for gets an entry,
    a missing run's a record of nothing (``None``), as an adapter that
    zips the ids with the rows it read would."""

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        found = await super().get_runs(run_ids)
        answer: dict[str, Any] = {run_id: found.get(run_id) for run_id in check_run_ids(run_ids)}
        return answer


def get_runs_lists_missing() -> MemoryStorage:
    return GetRunsListsMissing(name=_store("get_runs_lists_missing"))
