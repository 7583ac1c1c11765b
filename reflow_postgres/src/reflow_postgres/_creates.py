"""``create_runs``: a batch of creates in one transaction and one round trip.

The usual batch (no debounce key, no idempotency key twice, no run id chosen
by the caller) is one ``create_many`` statement in autocommit mode: one round
trip, one commit, whatever its size up to
:data:`~reflow_core.storage.MAX_CREATE_BATCH` (a statement of a thousand rows
is still a short one). Any other batch is one transaction of several
statements, sent together in a psycopg pipeline, so still one round trip:

1. ``refuse_taken``, when items bring their own run ids: a taken one fails
   the transaction before anything is written;
2. the items without a debounce key, in ``create_many`` statements: the
   first holds every item without an idempotency key and the first item
   with each key, the n-th the n-th items with each key that comes back,
   so a later item with a key sees the run an earlier one created or found,
   as a later ``create_run`` would;
3. each item with a debounce key in a ``create_debounced`` of its own (one
   statement cannot update a row twice), grouped by key, each key's items
   in batch order.

Only items with the same idempotency key, or the same debounce key, meet: a
debounced item has no idempotency key, no run created without a debounce key
is one a debounce key finds, and ids are unique. So keeping the order of
each key's items gives every item the outcome it would get if the items
were created one by one in batch order. Concurrent batches take the keys'
locks in one order (see ``create_many``), so they wait for each other rather
than deadlock.

A batch does not go through the group commit of ``create_run``
(:mod:`._batches`): it is a batch already, and sharing a statement with other
callers' creates would tie their outcomes to its all-or-nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import psycopg
from psycopg import errors as pg_errors

from reflow_core.adapter import as_utc, new_run_ids, run_from_row
from reflow_core.errors import IdempotencyConflictError, StorageError
from reflow_core.storage import CreateResult, NewRun, RunRecord

from ._connections import BACKEND, Connections
from ._rows import (
    INSERTED,
    create_rows,
    deadline_param,
    delay_param,
    limit_params,
    made_record,
)

__all__ = ["Outcome", "create_runs"]

Outcome: TypeAlias = CreateResult | IdempotencyConflictError
"""What ``create_runs`` gives one item."""

_OPERATION = "create_runs"


async def create_runs(db: Connections, news: Sequence[NewRun]) -> list[Outcome]:
    """Create ``news`` (checked already, not empty) in one transaction; see
    the module's description. Retried on a fresh connection when the
    connection drops, with :func:`_send_again`."""
    fresh = iter(new_run_ids(sum(1 for new in news if new.run_id is None)))
    ids = [new.run_id or next(fresh) for new in news]

    async def body(conn: psycopg.AsyncConnection[Any], attempt: int) -> list[Outcome]:
        if attempt == 0:
            return await _send(db, conn, ids, news)
        return await _send_again(db, conn, ids, news)

    return await db.run(_OPERATION, body, retry=True)


async def _send_again(
    db: Connections, conn: psycopg.AsyncConnection[Any], ids: list[str], news: Sequence[NewRun]
) -> list[Outcome]:
    """The batch again, after a try with the same ``ids`` lost its
    connection: sent whole if that try did not commit; else its runs are
    found created, and the other items (its hits, conflicts and debounced
    updates) are sent again, which gives them the same outcomes (a debounced
    run is updated again)."""
    landed = await _landed(db, conn, ids, news)
    if not landed:
        return await _send(db, conn, ids, news)
    outcomes: list[Outcome | None] = [None] * len(news)
    rest = []
    for index, run_id in enumerate(ids):
        record = landed.get(run_id)
        if record is not None:
            outcomes[index] = CreateResult(record, created=True)
        else:
            rest.append(index)
    if rest:
        again = await _send(db, conn, [ids[i] for i in rest], [news[i] for i in rest])
        for index, outcome in zip(rest, again, strict=True):
            outcomes[index] = outcome
    return [outcome for outcome in outcomes if outcome is not None]


async def _send(
    db: Connections, conn: psycopg.AsyncConnection[Any], ids: list[str], news: Sequence[NewRun]
) -> list[Outcome]:
    """One try at the batch on ``conn``."""
    base = db.params()  # one reading of a test clock for every statement
    # The n-th item with an idempotency key goes to the statement for the
    # n-th items with that key, so every statement holds a key at most once,
    # and an item's statement comes after those of the earlier items with
    # its key. The first statement takes the lock of every key of the batch
    # (an insert's, or the one on the run a key finds), in the order
    # create_many inserts in; the later ones only come back to those keys.
    stretches: list[list[int]] = [[]]
    debounced: list[int] = []
    seen: dict[tuple[str, str], int] = {}
    for index, new in enumerate(news):
        if new.debounce_key is not None:
            debounced.append(index)
            continue
        key = new.idempotency_key
        if key is None:
            stretches[0].append(index)
            continue
        times = seen.get((new.workflow, key), 0)
        seen[(new.workflow, key)] = times + 1
        if times == len(stretches):
            stretches.append([])
        stretches[times].append(index)
    if not stretches[0]:
        stretches = []  # every item has a debounce key
    # By debounce key, each key's items in batch order: concurrent batches
    # lock the open runs in one order.
    debounced.sort(key=lambda i: (news[i].workflow, news[i].debounce_key))
    chosen = [new.run_id for new in news if new.run_id is not None]
    statements: list[tuple[bytes, dict[str, Any]]] = []
    if chosen:
        statements.append((db.sql["refuse_taken"], {"ids": chosen}))
    parts: list[tuple[list[int], Sequence[str], Sequence[NewRun]]] = []
    for stretch in stretches:
        if len(stretch) == len(news):
            parts.append((stretch, ids, news))  # the usual batch: the whole of it
        else:
            parts.append((stretch, [ids[i] for i in stretch], [news[i] for i in stretch]))
        rows = create_rows(parts[-1][1], parts[-1][2])
        statements.append((db.sql["create_many"], {**base, "rows": rows}))
    for index in debounced:
        new = news[index]
        params = {
            **base,
            "id": ids[index],
            "workflow": new.workflow,
            "input": new.input,
            "key": None,
            "delay": delay_param(new),
            "deadline": deadline_param(new),
            **limit_params(new),
        }
        statements.append((db.sql["create_debounced"], params))
    if len(statements) == 1:
        # One statement (the usual batch), committed on its own.
        cursors = [await conn.execute(*statements[0])]
    else:
        try:
            # BEGIN and COMMIT are sent as statements of the pipeline, so that
            # the whole transaction goes in one round trip: psycopg's
            # transaction() syncs the pipeline when it starts and ends. After
            # an error the server skips the rest of the pipeline, COMMIT
            # included, and the failed transaction is rolled back.
            async with conn.pipeline():
                await conn.execute(b"BEGIN")
                cursors = [await conn.execute(sql, params) for sql, params in statements]
                await conn.execute(b"COMMIT")
        except Exception as exc:
            if not conn.broken:
                await conn.rollback()  # back to the pool with no transaction open
            if (
                not isinstance(exc, pg_errors.UniqueViolation)
                or exc.diag.constraint_name != "runs_pkey"
                or not chosen
            ):
                raise
            raise await _taken(db, conn, news, chosen) from exc
    if chosen:
        cursors = cursors[1:]
    outcomes: list[Outcome | None] = [None] * len(news)
    for (stretch, part_ids, part_news), cur in zip(parts, cursors, strict=False):
        part = _many_outcomes(await cur.fetchall(), part_ids, part_news)
        for index, outcome in zip(stretch, part, strict=True):
            outcomes[index] = outcome
    for index, cur in zip(debounced, cursors[len(parts) :], strict=True):
        row = await cur.fetchone()
        assert row is not None
        # Inserted, or the workflow's open run with the key, updated.
        outcomes[index] = CreateResult(run_from_row(row, as_utc), created=bool(row[INSERTED]))
    return [outcome for outcome in outcomes if outcome is not None]


def _many_outcomes(
    rows: Sequence[Sequence[Any]], ids: Sequence[str], news: Sequence[NewRun]
) -> list[Outcome]:
    """The outcomes of one ``create_many`` statement for ``news``: a run it
    created, or the run that holds the item's idempotency key (the same
    input: a hit; another: a conflict)."""
    created: dict[str, Sequence[Any]] = {}
    existing: dict[tuple[str, str | None], RunRecord] = {}
    for row in rows:
        if row[INSERTED]:
            created[row[0]] = row
        else:
            existing[(row[1], row[6])] = run_from_row(row, as_utc)
    outcomes: list[Outcome] = []
    for run_id, new in zip(ids, news, strict=True):
        made = created.get(run_id)
        if made is not None:
            outcomes.append(CreateResult(made_record(made, new), created=True))
            continue
        record = existing[(new.workflow, new.idempotency_key)]
        if record.input == new.input:
            outcomes.append(CreateResult(record, created=False))
        else:
            assert new.idempotency_key is not None
            outcomes.append(IdempotencyConflictError(new.workflow, new.idempotency_key, record.id))
    return outcomes


async def _taken(
    db: Connections, conn: psycopg.AsyncConnection[Any], news: Sequence[NewRun], chosen: list[str]
) -> StorageError:
    """The error of a batch that a taken run id failed (and rolled back):
    it names the first item whose id is taken."""
    cur = await conn.execute(db.sql["get_runs"], {"ids": chosen})
    taken = {row[0] for row in await cur.fetchall()}
    for index, new in enumerate(news):
        if new.run_id in taken:
            message = f"item {index}: run id {new.run_id!r} already exists"
            break
    else:  # taken by a batch that has since been undone
        message = "a run id of the batch was taken while it was written"
    return StorageError(message, operation=_OPERATION, backend=BACKEND)


async def _landed(
    db: Connections, conn: psycopg.AsyncConnection[Any], ids: list[str], news: Sequence[NewRun]
) -> dict[str, RunRecord]:
    """The runs a first try created, by id, if it committed before its
    connection dropped; else nothing.

    The batch commits whole or not at all, so one run with an id this batch
    made up (no one else has it) means it committed; a run with an id the
    caller chose counts as this batch's if its workflow and input are the
    item's, and one that is not means someone else holds the id, so the
    first try failed."""
    cur = await conn.execute(db.sql["get_runs"], {"ids": ids})
    rows = await cur.fetchall()
    found = {row[0]: run_from_row(row, as_utc) for row in rows}
    if not found:
        return {}
    chosen = {new.run_id for new in news if new.run_id is not None}
    if any(run_id not in chosen for run_id in found):
        return found
    for run_id, new in zip(ids, news, strict=True):
        record = found.get(run_id)
        if record is not None and (record.workflow, record.input) != (new.workflow, new.input):
            return {}
    return found
