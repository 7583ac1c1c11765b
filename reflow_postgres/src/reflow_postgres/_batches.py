"""Group commit of the PostgreSQL storage: concurrent creates, step saves
and finishes (of the many runs in flight) share one statement and one
commit, and each keeps its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeAlias

import psycopg
from psycopg import errors as pg_errors

from reflow_core.adapter import as_utc, run_from_row
from reflow_core.batching import GroupCommit
from reflow_core.errors import IdempotencyConflictError, ReflowError, StorageError
from reflow_core.storage import CreateResult, NewRun

from ._connections import BACKEND, Connections
from ._rows import (
    INSERTED,
    Finish,
    Save,
    create_rows,
    deadline_param,
    delay_param,
    finish_rows,
    limit_params,
    made_record,
    save_rows,
    step_params,
)

__all__ = ["MAX_BATCH", "BatchedWrites", "Finish", "Save"]

MAX_BATCH = 200
"""Concurrent writes share one statement, at most this many per statement."""
Create: TypeAlias = tuple[str, NewRun]
"""One create_run call: the run id to create, and the run."""


class BatchedWrites:
    """The batches of one storage: submit a write to ``creates``, ``saves``
    or ``finishes`` and await its own outcome."""

    __slots__ = ("_db", "creates", "finishes", "saves")

    def __init__(self, db: Connections) -> None:
        self._db = db
        self.creates: GroupCommit[Create, CreateResult | ReflowError] = GroupCommit(
            self._create_batch, max_batch=MAX_BATCH
        )
        self.saves: GroupCommit[Save, bool] = GroupCommit(self._save_batch, max_batch=MAX_BATCH)
        self.finishes: GroupCommit[Finish, bool] = GroupCommit(
            self._finish_batch, max_batch=MAX_BATCH
        )

    # -- creates -------------------------------------------------------------------

    async def _create_batch(self, items: Sequence[Create]) -> list[CreateResult | ReflowError]:
        """Creates with a debounce key each in a statement of their own (one
        statement cannot update an open run twice), the others together."""
        debounced = [i for i, (_, new) in enumerate(items) if new.debounce_key is not None]
        if not debounced:
            return await self._create_many(items)
        results: list[CreateResult | ReflowError | None] = [None] * len(items)
        for i in debounced:
            results[i] = await self._create_alone(*items[i])
        rest = [i for i, (_, new) in enumerate(items) if new.debounce_key is None]
        if rest:
            outcomes = await self._create_many([items[i] for i in rest])
            for i, outcome in zip(rest, outcomes, strict=True):
                results[i] = outcome
        return [outcome for outcome in results if outcome is not None]

    async def _create_many(self, items: Sequence[Create]) -> list[CreateResult | ReflowError]:
        db = self._db
        keys = [(n.workflow, n.idempotency_key) for _, n in items if n.idempotency_key]
        ids = [run_id for run_id, _ in items]
        if len(items) == 1 or len(set(keys)) < len(keys) or len(set(ids)) < len(ids):
            return [await self._create_alone(run_id, new) for run_id, new in items]
        params = db.params(rows=create_rows(ids, [new for _, new in items]))
        retried = False

        async def many(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[Any]:
            nonlocal retried
            retried = attempt > 0
            cur = await conn.execute(db.sql["create_many"], params)
            return await cur.fetchall()

        try:
            rows = await db.run("create_run", many, retry=True)
        except StorageError as exc:
            if not isinstance(exc.__cause__, pg_errors.UniqueViolation):
                raise
            # A run id that exists already: find out which, one by one.
            return [await self._create_alone(run_id, new, retried) for run_id, new in items]
        created = {row[0]: row for row in rows if row[INSERTED]}
        existing = {
            (row[1], row[6]): run_from_row(row, as_utc) for row in rows if not row[INSERTED]
        }
        results: list[CreateResult | ReflowError] = []
        for run_id, new in items:
            made = created.get(run_id)
            if made is not None:
                results.append(CreateResult(made_record(made, new), created=True))
                continue
            record = existing[(new.workflow, new.idempotency_key)]
            if retried and record.id == run_id:
                results.append(CreateResult(record, created=True))
            elif record.input != new.input:
                assert new.idempotency_key is not None
                results.append(
                    IdempotencyConflictError(new.workflow, new.idempotency_key, record.id)
                )
            else:
                results.append(CreateResult(record, created=False))
        return results

    async def _create_alone(
        self, run_id: str, new: NewRun, retried: bool = False
    ) -> CreateResult | ReflowError:
        db = self._db
        params = db.params(
            id=run_id,
            workflow=new.workflow,
            input=new.input,
            key=new.idempotency_key,
            delay=delay_param(new),
            deadline=deadline_param(new),
            **limit_params(new),
        )

        statement = db.sql["create" if new.debounce_key is None else "create_debounced"]

        async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> CreateResult:
            again = retried or attempt > 0
            try:
                cur = await conn.execute(statement, params)
            except pg_errors.UniqueViolation as exc:
                if exc.diag.constraint_name != "runs_pkey":
                    raise
                existing = await db.fetch_run(conn, run_id)
                if again and existing is not None and existing.input == new.input:
                    # Our first try committed before the connection dropped.
                    return CreateResult(existing, created=True)
                raise StorageError(
                    f"run id {run_id!r} already exists", operation="create_run", backend=BACKEND
                ) from exc
            row = await cur.fetchone()
            assert row is not None
            record = run_from_row(row, as_utc)
            if row[INSERTED] or (again and record.id == run_id):
                # Created now, or by our own first try before its reply was lost.
                return CreateResult(record, created=True)
            if new.debounce_key is not None:
                return CreateResult(record, created=False)  # the open run, updated
            if record.input != new.input:
                assert new.idempotency_key is not None
                raise IdempotencyConflictError(new.workflow, new.idempotency_key, record.id)
            return CreateResult(record, created=False)

        try:
            return await db.run("create_run", body, retry=True)
        except ReflowError as exc:
            return exc

    # -- step saves ----------------------------------------------------------------

    async def _save_batch(self, items: Sequence[Save]) -> list[bool]:
        db = self._db
        if len(items) == 1:
            lease, step, extend = items[0]
            params = db.params(
                id=lease.run_id, epoch=lease.epoch, extend=extend, **step_params(step)
            )

            async def one(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[bool]:
                cur = await conn.execute(db.sql["save_step"], params)
                return [cur.rowcount == 1]

            return await db.run("save_step_result", one, retry=True)
        batch = db.params(rows=save_rows(items))

        async def many(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[bool]:
            cur = await conn.execute(db.sql["save_steps"], batch)
            saved = {(row[0], row[1]) for row in await cur.fetchall()}
            return [(lease.run_id, lease.epoch) in saved for lease, _, _ in items]

        return await db.run("save_step_result", many, retry=True)

    # -- finishes ------------------------------------------------------------------

    async def _finish_batch(self, items: Sequence[Finish]) -> list[bool]:
        if len(items) == 1:
            return [await self._finish_alone(items[0])]
        db = self._db
        batch = db.params(rows=finish_rows(items))

        retried = False

        async def many(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[bool]:
            nonlocal retried
            retried = attempt > 0
            cur = await conn.execute(db.sql["finish_many"], batch)
            done = {(row[0], row[1]) for row in await cur.fetchall()}
            return [(lease.run_id, lease.epoch) in done for lease, *_ in items]

        results = await db.run("finish_run", many, retry=True)
        # The batch leaves out child runs and runs holding limits (see
        # finish_many); they end alone
        # (as does a run whose lease was lost, which fails again, or, after a
        # retry, whose first try landed, which finished_already finds).
        alone = [i for i, done in enumerate(results) if not done]
        outcomes = await asyncio.gather(
            *(self._finish_alone(items[i], retried=retried) for i in alone)
        )
        for i, outcome in zip(alone, outcomes, strict=True):
            results[i] = outcome
        return results

    async def _finish_alone(self, item: Finish, retried: bool = False) -> bool:
        """One finish in a statement of its own: ``finish``, or
        ``finish_with_step``; a child run's end wakes its waiting parent."""
        db = self._db
        lease, status, output, error, step = item
        values: dict[str, Any] = {
            "id": lease.run_id,
            "epoch": lease.epoch,
            "status": status,
            "output": output,
            "error": error,
        }
        if step is not None:
            values.update(step_params(step))
        params = db.params(**values)
        statement = db.sql["finish" if step is None else "finish_with_step"]

        async def one(conn: psycopg.AsyncConnection[Any], attempt: int) -> bool:
            cur = await conn.execute(statement, params)
            ok = cur.rowcount == 1
            if not ok and (retried or attempt > 0):
                # Did a try whose connection dropped land after all?
                cur = await conn.execute(db.sql["finished_already"], values)
                ok = await cur.fetchone() is not None
            return ok

        return await db.run("finish_run", one, retry=True)
