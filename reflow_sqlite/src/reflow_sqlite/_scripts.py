"""The operations of the SQLite backend, each written once as a *script*
named after what it does (``claim``, ``save_step``, ``finish``, ...).

A script is a generator that yields ``(sql, parameters)`` and receives the
fetched rows; it runs as one transaction (see :mod:`reflow_sqlite._thread`).
Its first argument, ``now``, is the storage clock in microseconds, read once
when the transaction has started (after the write lock is held). Every
statement comes from ``queries.sql``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeAlias, TypeVar

from reflow_core.adapter import (
    child_of,
    debounced_record,
    encode_workflows,
    finished_minutes_from_counts,
    from_epoch_us,
    headers_column,
    is_delayed,
    limit_columns,
    new_run_record,
    queue_stats_from_counts,
    rate_block,
    rate_columns,
    run_from_row,
    run_page,
    schedule_from_row,
    span_us,
    step_from_row,
    to_epoch_us,
    worker_from_row,
)
from reflow_core.errors import EventBufferFullError, IdempotencyConflictError, StorageError
from reflow_core.storage import (
    CHILDREN_WAIT_PREFIX,
    TERMINAL_STATUSES,
    BufferedEvent,
    ClaimedRun,
    CreateResult,
    EventTake,
    FinishedMinute,
    Lease,
    NewRun,
    QueueStats,
    RunPage,
    RunRecord,
    ScheduleRecord,
    ScheduleSpec,
    StepRecord,
    WorkerInfo,
    WorkerRecord,
)

from ._options import BACKEND
from ._queries import QUERIES as Q
from ._queries import Served, fill, lapsed_served, per_workflow, with_marks, with_rows

__all__ = [
    "INSERT_CHUNK",
    "KEY_CHUNK",
    "MINUTE_US",
    "PURGE_CHUNK",
    "WORKFLOW_CHUNK",
    "BatchItemFailed",
    "Outcome",
    "Params",
    "Row",
    "Script",
    "StepRow",
    "Versions",
    "announce_worker",
    "buffered_events",
    "claim",
    "claim_slot",
    "create",
    "create_many",
    "delete_schedule",
    "deliver",
    "due_schedules",
    "find_by_key",
    "finish",
    "finished_history",
    "get_run",
    "get_runs",
    "get_steps",
    "heartbeat",
    "inspect",
    "list_children",
    "list_runs",
    "list_schedules",
    "list_workers",
    "purge",
    "queue_stats",
    "remove_worker",
    "requeue",
    "save_batch",
    "save_step",
    "set_schedule_paused",
    "sleep",
    "start_child",
    "take",
    "update_status",
    "upsert_schedule",
    "wait",
    "wait_children",
]

_T = TypeVar("_T")
Params: TypeAlias = Sequence[object]
Row: TypeAlias = tuple[Any, ...]
Script: TypeAlias = Generator[tuple[str, Params], list[Row], _T]
"""A database operation: yields statements, receives their rows, returns a value."""

_ZERO = timedelta(0)

MINUTE_US = 60_000_000
"""A minute in the microseconds the database keeps times in."""

PURGE_CHUNK = 500
"""Run ids per ``IN (...)`` list when a purge deletes a batch (one parameter each)."""


@dataclass(frozen=True, slots=True)
class StepRow:
    """A step ready to be written: the record's fields with ``wake_at`` in microseconds."""

    name: str
    status: str
    output: str | None
    error: str | None
    attempts: int
    wake_at: int | None

    @classmethod
    def of(cls, step: StepRecord) -> StepRow:
        wake = None if step.wake_at is None else to_epoch_us(step.wake_at, "step.wake_at")
        return cls(step.name, step.status, step.output, step.error, step.attempts, wake)

    def params(self, run_id: str, now: int) -> Params:
        return (
            run_id,
            self.name,
            self.status,
            self.output,
            self.error,
            self.attempts,
            self.wake_at,
            now,
        )


def inspect(now: int) -> Script[tuple[int, int, int]]:
    """The file's ``application_id``, ``user_version`` and number of schema objects."""
    rows = yield (Q["inspect"], ())
    app_id, version, objects = rows[0]
    return int(app_id), int(version), int(objects)


def create(now: int, new: NewRun, run_id: str) -> Script[CreateResult]:
    # A positive delay makes the run 'delayed', due that long after now (the
    # storage clock, read under the write lock); otherwise it is due at once.
    # With a deadline, deadline_at is that long after now, and a delayed run
    # is due at the earlier of the two (reflow_core.adapter.due_by_deadline).
    # An idempotent hit returns the existing run as it is, whatever the delay.
    if new.debounce_key is not None:
        debounced = yield from _debounce(now, new)
        if debounced is not None:
            return CreateResult(debounced, created=False)
    delay_us = span_us(new.delay) if new.delay is not None and is_delayed(new) else 0
    status = "delayed" if delay_us else "pending"
    deadline_us = None if new.deadline is None else now + span_us(new.deadline)
    wake_us = now + delay_us if deadline_us is None else min(now + delay_us, deadline_us)
    try:
        rows = yield (
            Q["insert_run"],
            (
                run_id,
                new.workflow,
                status,
                new.input,
                new.idempotency_key,
                now,
                now,
                wake_us,
                deadline_us,
                new.priority,
                *limit_columns(new.limits),
                *rate_columns(new.rates),
                new.debounce_key,
                headers_column(new.headers),
                new.version,
                new.fingerprint,
            ),
        )
    except sqlite3.IntegrityError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_PRIMARYKEY":
            raise StorageError(
                f"run id {run_id!r} already exists", operation="create_run", backend=BACKEND
            ) from exc
        raise
    if rows:
        return CreateResult(run_from_row(rows[0], from_epoch_us), created=True)
    rows = yield (Q["run_by_key"], (new.workflow, new.idempotency_key))
    existing = run_from_row(rows[0], from_epoch_us)
    if existing.input != new.input:
        assert new.idempotency_key is not None
        raise IdempotencyConflictError(new.workflow, new.idempotency_key, existing.id)
    return CreateResult(existing, created=False)


def _debounce(now: int, new: NewRun) -> Script[RunRecord | None]:
    """A create with a debounce key: the workflow's open run with that key,
    updated as :func:`reflow_core.adapter.debounced_record` says, or ``None``
    if there is none (the create inserts a run). The create's transaction
    holds the write lock, so no other write comes between the read and the
    update; runs_debounce keeps at most one open run per key."""
    rows = yield (Q["open_debounced"], (new.workflow, new.debounce_key))
    if not rows:
        return None
    after = debounced_record(run_from_row(rows[0], from_epoch_us), new, from_epoch_us(now))
    wake_us = None if after.wake_at is None else to_epoch_us(after.wake_at)
    values = (
        after.status,
        after.input,
        after.priority,
        *limit_columns(after.limits),
        *rate_columns(after.rates),
        headers_column(after.headers),
        after.version,
        after.fingerprint,
        wake_us,
        now,
        after.id,
    )
    updated = yield (Q["debounce_run"], values)
    return run_from_row(updated[0], from_epoch_us)


Outcome: TypeAlias = CreateResult | IdempotencyConflictError
"""What :func:`create_many` gives each item of a batch."""

INSERT_CHUNK = 128
"""The most runs one statement of :func:`create_many` inserts: larger
statements save little and take long to compile (a batch that is not a
multiple of it ends with statements of power-of-two sizes, so a handful
of shapes serve every batch from the statement cache)."""

KEY_CHUNK = 256
"""The most idempotency keys one ``runs_by_keys`` statement looks up."""

_INSERT_WIDTH = 23  # the values of one run in insert_runs
_NO_LIMITS = (None, None, None, None)
_NO_RATES = (None, None, None, None, None, None)


def _shapes(count: int, chunk: int) -> list[int]:
    """``count`` split into full chunks, then powers of two, largest first."""
    sizes = [chunk] * (count // chunk)
    rest = count % chunk
    while rest:
        size = 1 << (rest.bit_length() - 1)
        sizes.append(size)
        rest -= size
    return sizes


def create_many(now: int, news: Sequence[NewRun], ids: Sequence[str]) -> Script[list[Outcome]]:
    """:meth:`~reflow_core.storage.Storage.create_runs`: ``news[i]`` gets the
    outcome :func:`create` would give it with run id ``ids[i]`` if the items
    were created one after another, all in this one transaction.

    The runs without a debounce key whose idempotency key no earlier item
    gave (the common case) go in together, a few multi-row inserts in all;
    the runs holding the keys that turned out to be taken are then read
    with one query (one per :data:`KEY_CHUNK` keys). A later
    item with a key already given is judged against the run holding it
    (made or found by the first). Items with a debounce key go one by one,
    after those, as :func:`create` does them: they never touch the same
    runs (a debounced run has no idempotency key, and the runs inserted
    together have no debounce key), so the outcomes are those of the
    batch's order.
    """
    chosen = [new.run_id for new in news if new.run_id is not None]
    if chosen:
        yield from _refuse_taken(news, chosen)
    leads: list[int] = []  # inserted together
    keyed: list[tuple[int, str, str]] = []  # leads with an idempotency key, and it
    first: dict[tuple[str, str], int] = {}  # lead of each (workflow, key)
    later: list[tuple[int, int]] = []  # an item whose key a lead gave, and that lead
    debounced: list[int] = []
    for index, new in enumerate(news):
        if new.debounce_key is not None:
            debounced.append(index)
            continue
        key = new.idempotency_key
        if key is not None:
            lead = first.setdefault((new.workflow, key), index)
            if lead != index:
                later.append((index, lead))
                continue
            keyed.append((index, new.workflow, key))
        leads.append(index)
    inserted = yield from _insert_leads(now, news, ids, leads)
    outcomes: list[Outcome | None] = [None] * len(news)
    holders: dict[int, RunRecord] = {}  # the run holding each keyed lead's key
    if len(inserted) < len(leads):  # some keys were taken: read their runs
        missing = [lead for lead in keyed if ids[lead[0]] not in inserted]
        found = yield from _runs_by_keys([(workflow, key) for _, workflow, key in missing])
        for index, workflow, key in missing:
            existing = found.get((workflow, key))
            if existing is None:
                raise StorageError(
                    f"item {index}: the run was neither created nor found by its key",
                    operation="create_runs",
                    backend=BACKEND,
                )
            holders[index] = existing
            outcomes[index] = _hit(news[index], existing)
    at = from_epoch_us(now)
    for index in leads:
        if outcomes[index] is None:
            record = new_run_record(ids[index], news[index], at)
            outcomes[index] = CreateResult(record, created=True)
            holders[index] = record
    for index, lead in later:
        outcomes[index] = _hit(news[index], holders[lead])
    for index in debounced:
        outcomes[index] = yield from create(now, news[index], ids[index])
    results = [outcome for outcome in outcomes if outcome is not None]
    assert len(results) == len(news)
    return results


def _hit(new: NewRun, existing: RunRecord) -> Outcome:
    """A create whose idempotency key ``existing`` holds: that run, or a
    conflict if its input differs."""
    if existing.input != new.input:
        assert new.idempotency_key is not None
        return IdempotencyConflictError(new.workflow, new.idempotency_key, existing.id)
    return CreateResult(existing, created=False)


def _refuse_taken(news: Sequence[NewRun], chosen: Sequence[str]) -> Script[None]:
    """Raise :class:`StorageError` naming the first item whose caller-chosen
    run id a stored run has (nothing is written before this)."""
    rows = yield (with_marks("taken_ids", "ids", len(chosen)), chosen)
    if not rows:
        return
    taken = {row[0] for row in rows}
    index, run_id = next(
        (index, new.run_id) for index, new in enumerate(news) if new.run_id in taken
    )
    raise StorageError(
        f"item {index}: run id {run_id!r} already exists",
        operation="create_runs",
        backend=BACKEND,
    )


def _insert_leads(
    now: int, news: Sequence[NewRun], ids: Sequence[str], leads: Sequence[int]
) -> Script[set[str]]:
    """Insert the runs ``leads`` indexes (no debounce key, no key given
    twice) as :func:`create` inserts one; the ids of those inserted (a run
    whose idempotency key is taken is not)."""
    params: list[object] = []
    for index in leads:
        new = news[index]
        delay = new.delay
        deadline = new.deadline
        if delay is not None and delay > _ZERO:
            status = "delayed"
            wake_us = now + span_us(delay)
        else:
            status = "pending"
            wake_us = now
        deadline_us = None
        if deadline is not None:
            deadline_us = now + span_us(deadline)
            wake_us = min(wake_us, deadline_us)
        params += (
            ids[index],
            new.workflow,
            status,
            new.input,
            new.idempotency_key,
            now,
            now,
            wake_us,
            deadline_us,
            new.priority,
        )
        params += limit_columns(new.limits) if new.limits else _NO_LIMITS
        params += rate_columns(new.rates) if new.rates else _NO_RATES
        params += (
            headers_column(new.headers) if new.headers else None,
            new.version,
            new.fingerprint,
        )
    inserted: set[str] = set()
    start = 0
    for size in _shapes(len(leads), INSERT_CHUNK):
        end = start + size * _INSERT_WIDTH
        rows = yield (
            with_rows("insert_runs", "rows", size, _INSERT_WIDTH),
            params[start:end],
        )
        inserted.update(row[0] for row in rows)
        start = end
    return inserted


def _runs_by_keys(keys: Sequence[tuple[str, str]]) -> Script[dict[tuple[str, str], RunRecord]]:
    """The stored runs holding ``keys`` (workflow and idempotency key), by them."""
    found: dict[tuple[str, str], RunRecord] = {}
    start = 0
    for size in _shapes(len(keys), KEY_CHUNK):
        params = [value for pair in keys[start : start + size] for value in pair]
        rows = yield (with_rows("runs_by_keys", "keys", size, 2), params)
        for row in rows:
            found[(row[1], row[6])] = run_from_row(row, from_epoch_us)  # workflow, key
        start += size
    return found


MAX_LOOK = 1000
"""The most due runs a claim reads at once when blocked runs make it look again."""

Candidate: TypeAlias = tuple[Any, ...]
"""A due run as ``claim_due`` reads it: id, priority, wake_at, its four limit
columns and its six rate columns."""

Rate: TypeAlias = tuple[str, int, int]
"""A rate limit as a claim uses it: key, max, period in microseconds."""


def _rates_of(columns: Sequence[Any]) -> list[Rate]:
    """The rates of a run from its six rate columns (none for most runs)."""
    key1, max1, period1, key2, max2, period2 = columns
    rates: list[Rate] = []
    if key1 is not None and max1 is not None and period1 is not None:
        rates.append((key1, int(max1), int(period1)))
    if key2 is not None and max2 is not None and period2 is not None:
        rates.append((key2, int(max2), int(period2)))
    return rates


@dataclass(slots=True)
class _Rates:
    """What one claim knows of the rate keys it met: the claims stored in
    each key's window (read once per key and period), the claims it made of
    each key (recorded when it ends), and when a full key has room again."""

    stored: dict[tuple[str, int], int]
    made: dict[str, int]
    trim: dict[str, int]
    room: dict[tuple[str, int], int]
    waits: dict[str, int]


def _release_rates(now: int) -> Script[None]:
    """Before a claim chooses runs: for each rate key whose wait has come,
    make claimable as many of its first blocked runs as its window has room
    for, and wait again for the rest (from the oldest claim in the window, a
    period on). One probe of rate_waits_at when no key is due."""
    due = yield (Q["due_rate_waits"], (now,))
    for (key,) in due:
        yield (Q["drop_rate_wait"], (key,))
        block = rate_block(key)
        first = yield (Q["first_blocked_rates"], (block,))
        rate = next((r for r in _rates_of(first[0]) if r[0] == key), None) if first else None
        if rate is None:
            continue
        _, most, period = rate
        window = yield (Q["rate_window"], (key, now - period))
        count, oldest = window[0]
        room = most - int(count)
        if room > 0:
            freed = yield (Q["unblock_some"], (now, block, room))
            if len(freed) < room:
                continue  # none left blocked
        left = yield (Q["first_blocked_rates"], (block,))
        if left:
            yield (Q["set_rate_wait"], (key, (now if oldest is None else oldest) + period))


def _rate_full(now: int, rates: Sequence[Rate], state: _Rates) -> Script[tuple[str, int] | None]:
    """The first of a run's rates whose window is full (claims this claim
    made count), and when it has room again: a period after the claim that
    leaves the window then; or ``None``."""
    for key, most, period in rates:
        slot = (key, period)
        if slot not in state.stored:
            window = yield (Q["rate_window"], (key, now - period))
            state.stored[slot] = int(window[0][0])
        stored = state.stored[slot]
        total = stored + state.made.get(key, 0)
        if total < most:
            continue
        if slot not in state.room:
            nth = total - most
            if nth < stored:
                rows = yield (Q["rate_nth"], (key, now - period, nth))
                state.room[slot] = int(rows[0][0]) + period
            else:  # one of this claim's own, made now
                state.room[slot] = now + period
        return key, state.room[slot]
    return None


def _took(rates: Sequence[Rate], state: _Rates) -> None:
    """Count a claim of a run with ``rates`` (recorded by :func:`_record_rates`)."""
    for key, _, period in rates:
        state.made[key] = state.made.get(key, 0) + 1
        state.trim[key] = min(state.trim.get(key, period), period)


def _record_rates(now: int, state: _Rates) -> Script[None]:
    """Write what the claim did to the rate keys: its claims, at now, after
    the key's claims that left the window; and the waits of keys it blocked
    runs of."""
    for key, count in state.made.items():
        yield (Q["trim_rate_claims"], (key, now - state.trim[key]))
        yield (Q["record_rate_claims"], (count, key, now))
    for key, at in state.waits.items():
        yield (Q["wait_rate"], (key, at))


WORKFLOW_CHUNK = 100
"""The most workflows one statement of :func:`_heads` reads: each adds a
subquery to a compound SELECT, and SQLite allows 500 of them."""


Versions: TypeAlias = dict[str, tuple[int, ...]]
"""The versions a claim serves of some of its workflows
(:func:`reflow_core.adapter.check_claim_versions`); a workflow that is not a
key takes every version."""


def _served(workflows: Sequence[str], versions: Versions | None) -> Served | None:
    """How many versions a claim serves of each of ``workflows`` (0: every
    version), or ``None`` when it takes every version of every one."""
    if not versions:
        return None
    return tuple(len(versions.get(workflow, ())) for workflow in workflows)


def _version_case(workflows: Sequence[str], versions: Versions) -> list[object]:
    """The parameters of a ``{served}`` over ``workflows``: each one that
    serves some versions only, then those versions."""
    return [
        value
        for workflow in workflows
        if workflow in versions
        for value in (workflow, *versions[workflow])
    ]


def _heads(
    name: str,
    workflows: Sequence[str],
    now: int,
    count: int,
    versions: Versions | None = None,
) -> Script[list[Row]]:
    """The rows of :func:`~reflow_sqlite._queries.per_workflow` statement
    ``name`` (``claim_due`` or ``due_schedules_of``) for ``workflows`` at
    ``now``, up to ``count``: one statement, or one per
    :data:`WORKFLOW_CHUNK` workflows, whose rows the caller merges (each
    statement's are in order and at most ``count``). With ``versions``
    (``claim_due`` only), the runs of a workflow it names are those of the
    versions it lists."""
    rows: list[Row] = []
    params: list[object]
    for start in range(0, len(workflows), WORKFLOW_CHUNK):
        chunk = workflows[start : start + WORKFLOW_CHUNK]
        served = _served(chunk, versions)
        if served is None:
            params = [value for workflow in chunk for value in (workflow, now, count)]
            if name == "claim_due":  # and the due timed runs of the chunk's workflows
                params += (*chunk, now, count)
        else:
            assert versions is not None
            params = [
                value
                for workflow in chunk
                for value in (workflow, now, *versions.get(workflow, ()), count)
            ]
            params += (*chunk, now, *_version_case(chunk, versions), count)
        rows += yield (per_workflow(name, len(chunk), served), (*params, count))
    return rows


def claim(
    now: int,
    workflows: Sequence[str],
    limit: int,
    lease_us: int,
    versions: Versions | None = None,
) -> Script[list[ClaimedRun]]:
    # Rate keys whose window has room again release their blocked runs
    # first, whatever the workflows. Then lapsed leases, whatever the
    # concurrency limits (the run still holds its slots, which pass to the
    # new holder) but not past a full rate; then due runs by priority and
    # due time (see queries.sql). With versions, the runs of a workflow it
    # names are those of the versions it lists: the others are never read
    # as candidates, so none of them is blocked, changed or taken.
    yield from _release_rates(now)
    rates = _Rates({}, {}, {}, {}, {})
    ids: list[str] = []
    seen: set[str] = set()
    skipped = 0  # lapsed leases a full rate holds back
    look = limit
    served = _served(workflows, versions)
    if served is None:
        lapsed_sql = with_marks("claim_lapsed", "workflows", len(workflows))
        lapsed_params: list[object] = [*workflows, now]
    else:
        assert versions is not None
        lapsed_sql = lapsed_served(served)
        lapsed_params = [*workflows, now, *_version_case(workflows, versions)]
    while True:
        lapsed_rows = yield (lapsed_sql, (*lapsed_params, look))
        for row in lapsed_rows:
            if len(ids) == limit:
                break
            if row[0] in seen:
                continue
            seen.add(row[0])
            held_to = _rates_of(row[1:7])
            if held_to:
                over = yield from _rate_full(now, held_to, rates)
                if over is not None:
                    skipped += 1  # left as it is, for a later claim
                    continue
                _took(held_to, rates)
            ids.append(row[0])
        if len(ids) == limit or len(lapsed_rows) < look or limit + skipped <= look:
            break
        look = limit + skipped  # more lapsed leases beyond those held back
    reclaimed = set(ids)
    unwritten = list(ids)  # chosen, not yet made running
    updated: list[Row] = []
    held: dict[str, int] = {}  # running holders of each limit key met, chosen ones included
    need = limit - len(ids)
    look = need
    while need > 0:
        rows = yield from _heads("claim_due", workflows, now, look, versions)
        candidates: list[Candidate] = sorted(rows, key=lambda r: (-r[1], r[2], r[0]))[:look]
        unknown = sorted(
            {key for row in candidates for key in (row[3], row[5]) if key is not None} - held.keys()
        )
        if unknown:  # the running holders of every new key, in one query
            counted = yield (
                with_marks("holders_of", "ids", len(unknown)),
                (*unknown, *unknown),
            )
            held.update(dict.fromkeys(unknown, 0))
            held.update({key: int(count) for key, count in counted})
        blocked = 0
        for row in candidates:
            if need == 0:
                break
            run_id, _, _, key1, max1, key2, max2 = row[:7]
            limits = [(k, m) for k, m in ((key1, max1), (key2, max2)) if k is not None]
            full: str | None = None
            for key, most in limits:
                if held[key] >= (most or 0):
                    full = key
                    break
            if full is not None:
                # Blocked: out of the due indexes until a holder of the key stops.
                yield (Q["block"], (full, now, run_id))
                blocked += 1
                continue
            held_to = _rates_of(row[7:13]) if row[7] is not None else []
            if held_to:
                rate_full = yield from _rate_full(now, held_to, rates)
                if rate_full is not None:
                    # Blocked: out of the due indexes until the key's wait comes.
                    key, room_at = rate_full
                    yield (Q["block"], (rate_block(key), now, run_id))
                    rates.waits[key] = min(rates.waits.get(key, room_at), room_at)
                    blocked += 1
                    continue
                _took(held_to, rates)
            for key, _ in limits:
                held[key] += 1
            ids.append(run_id)
            unwritten.append(run_id)
            need -= 1
        if need == 0 or len(candidates) < look or not blocked:
            break
        # Some were blocked and more may be due: make the chosen running (so
        # they leave the due indexes, as the blocked ones did) and look again,
        # further this time.
        updated += yield (
            with_marks("claim_update", "ids", len(unwritten)),
            (now + lease_us, now, *unwritten),
        )
        unwritten = []
        look = min(max(need, 2 * look), MAX_LOOK)
    if unwritten:
        updated += yield (
            with_marks("claim_update", "ids", len(unwritten)),
            (now + lease_us, now, *unwritten),
        )
    if rates.made or rates.waits:
        yield from _record_rates(now, rates)
    if not ids:
        return []
    step_rows = yield (with_marks("claim_steps", "ids", len(ids)), ids)
    steps: dict[str, dict[str, StepRecord]] = {run_id: {} for run_id in ids}
    for row in step_rows:
        steps[row[0]][row[1]] = step_from_row(row[1:], from_epoch_us)
    records = {row[0]: run_from_row(row, from_epoch_us) for row in updated}
    return [
        ClaimedRun(
            run=records[run_id],
            lease=Lease(run_id, records[run_id].lease_epoch),
            steps=steps[run_id],
            reclaimed=run_id in reclaimed,
        )
        for run_id in ids
    ]


def _stopped(now: int, keys: Sequence[str | None]) -> Script[None]:
    """A running run holding the limit ``keys`` (``None`` where it holds
    fewer) stopped running: for each key, the blocked run a claim would take
    first is claimable again. A run without limits runs no statement here."""
    for key in keys:
        if key is not None:
            yield (Q["unblock"], (now, key))


def heartbeat(now: int, lease: Lease, extend_us: int) -> Script[bool]:
    rows = yield (Q["extend"], (now + extend_us, now, lease.run_id, lease.epoch, now))
    return bool(rows)


def save_step(now: int, lease: Lease, step: StepRow, extend_us: int) -> Script[bool]:
    rows = yield (Q["extend"], (now + extend_us, now, lease.run_id, lease.epoch, now))
    if not rows:
        return False
    yield (Q["upsert_step"], step.params(lease.run_id, now))
    return True


class BatchItemFailed(Exception):
    """One save of a batch raised; the batch was rolled back and is retried one by one."""


def save_batch(now: int, items: Sequence[tuple[Lease, StepRow, int]]) -> Script[list[bool]]:
    results: list[bool] = []
    for lease, step, extend_us in items:
        try:
            saved = yield from save_step(now, lease, step, extend_us)
        except (sqlite3.Error, UnicodeError) as exc:
            raise BatchItemFailed(str(exc)) from exc
        results.append(saved)
    return results


def finish(
    now: int,
    lease: Lease,
    status: str,
    output: str | None,
    error: str | None,
    step: StepRow | None,
) -> Script[bool]:
    rows = yield (Q["finish"], (status, output, error, now, now, lease.run_id, lease.epoch, now))
    if not rows:
        return False
    if step is not None:
        yield (Q["upsert_step"], step.params(lease.run_id, now))
    # Setting finished_at dropped the run's buffered events (a trigger).
    yield from _stopped(now, rows[0][2:])
    yield from _ended(now, rows[0][:2])
    return True


def _ended(now: int, link: Row) -> Script[None]:
    """What the end of a run does besides its own row (``link`` is the
    ``parent_id, parent_step`` the ending statement returned): a child's end
    wakes its parent if that waits for its last unfinished child at that
    step. A run without a parent runs no statement here."""
    parent_id, parent_step = link
    if parent_id is None or parent_step is None:
        return
    waiting_for = CHILDREN_WAIT_PREFIX + parent_step
    yield (Q["wake_parent"], (now, now, parent_id, waiting_for, parent_id, parent_step))


def update_status(
    now: int, run_id: str, status: str, lease: Lease | None, error: str | None
) -> Script[bool]:
    if lease is None:
        # Any unfinished run: what it unblocks depends on what it was.
        before = yield (Q["run_limits"], (run_id,))
        rows = yield (Q["end_unfenced"], (status, error, now, now, run_id))
        if rows:
            yield from _let_go(now, before[0])
    elif status == "pending":
        rows = yield (Q["hand_back"], (now, now, run_id, lease.epoch, now))
        if rows:
            yield from _stopped(now, rows[0])
        return bool(rows)
    else:
        rows = yield (Q["end_fenced"], (status, error, now, now, run_id, lease.epoch, now))
        if rows:
            yield from _stopped(now, rows[0][2:])
    if not rows:
        return False
    # Ending a run sets finished_at, which drops its buffered events (a
    # trigger); so does the cancel of every unfinished run below it.
    if status == "cancelled":
        yield from _cancel_below(now, run_id)
    yield from _ended(now, rows[0][:2])
    return True


def _let_go(now: int, before: Row) -> Script[None]:
    """An unfinished run ended without a lease (``before``: its
    ``run_limits`` as it was): a running one stopped, and unblocks a run of
    each key; one that was free to be claimed passes its turn on, to the
    first blocked run of each of its keys that has room; a blocked one was
    holding no turn."""
    status, blocked_by, key1, max1, key2, max2 = before
    if status == "running":
        yield from _stopped(now, (key1, key2))
        return
    if blocked_by is not None:
        return
    for key, most in ((key1, max1), (key2, max2)):
        if key is not None:
            counted = yield (Q["holders"], (key, key))
            if counted[0][0] < most:
                yield (Q["unblock"], (now, key))


def _cancel_below(now: int, run_id: str) -> Script[None]:
    """Cancel every unfinished run below ``run_id``. In one statement,
    unless one of them holds a limit: then one run at a time, depth first
    in creation order (as the cancel of each on its own would), each ending
    as :func:`_let_go` says, as it is when its turn comes."""
    rows = yield (Q["below_order"], (run_id,))
    unfinished = [row for row in rows if row[2] not in TERMINAL_STATUSES]
    if not unfinished:
        return
    if not any(row[3] is not None or row[4] is not None for row in unfinished):
        yield (Q["cancel_below"], (run_id, now, now))
        return
    children: dict[str, list[Row]] = {}
    for row in rows:
        children.setdefault(row[1], []).append(row)
    seen: set[str] = set()
    stack = list(reversed(children.get(run_id, [])))
    while stack:
        row = stack.pop()
        child_id, _, child_status, _, _ = row
        if child_id in seen:
            continue
        seen.add(child_id)
        if child_status not in TERMINAL_STATUSES:
            # Read as it is now: an earlier end in this cascade may have unblocked it.
            before = yield (Q["run_limits"], (child_id,))
            yield (Q["cancel_one"], (now, now, child_id))
            yield from _let_go(now, before[0])
        stack.extend(reversed(children.get(child_id, [])))


def sleep(now: int, lease: Lease, step: str, duration_us: int) -> Script[int | None]:
    rows = yield (Q["get_step"], (lease.run_id, step))
    if rows and rows[0][0] == "sleeping" and rows[0][2] is not None:
        wake_at: int = rows[0][2]
        first = False
    else:
        wake_at = now + duration_us
        first = True
    # The run is due at the step's wake_at, or at its deadline_at if earlier.
    fenced = yield (Q["sleep"], (wake_at, wake_at, now, lease.run_id, lease.epoch, now))
    if not fenced:
        return None
    yield from _stopped(now, fenced[0])
    if first:
        record = StepRow(step, "sleeping", None, None, 1, wake_at)
        yield (Q["upsert_step"], record.params(lease.run_id, now))
    return wake_at


def wait(
    now: int, lease: Lease, step: str, event: str, timeout_us: int | None
) -> Script[tuple[bool, int | None] | None]:
    rows = yield (Q["get_step"], (lease.run_id, step))
    deadline: int | None
    if rows and rows[0][0] == "waiting":
        deadline = rows[0][2]
        first = False
    else:
        deadline = None if timeout_us is None else now + timeout_us
        first = True
    buffered = yield (Q["has_event"], (lease.run_id, event))
    if buffered:
        fenced = yield (Q["wait_ready"], (now, lease.run_id, lease.epoch, now))
    else:
        # Due at the wait's deadline, or at the run's deadline_at if earlier
        # (or the wait has none); the step keeps the wait's own deadline.
        fenced = yield (Q["wait"], (event, deadline, deadline, now, lease.run_id, lease.epoch, now))
        if fenced:
            yield from _stopped(now, fenced[0])
    if not fenced:
        return None
    if first:
        record = StepRow(step, "waiting", None, None, 1, deadline)
        yield (Q["upsert_step"], record.params(lease.run_id, now))
    return bool(buffered), deadline


def deliver(
    now: int,
    run_id: str,
    event: str,
    payload: str,
    event_id: str | None,
    max_buffered: int | None,
) -> Script[bool]:
    rows = yield (Q["run_state"], (run_id,))
    if not rows or rows[0][0] in TERMINAL_STATUSES:
        return False
    status, waiting_for = rows[0]
    if max_buffered is not None:
        if event_id is not None:
            seen = yield (Q["seen_event_id"], (run_id, event_id))
            if seen:
                return True  # a repeated id is a no-op, full buffer or not
        counted = yield (Q["count_buffered"], (run_id, max_buffered))
        if counted[0][0] >= max_buffered:
            raise EventBufferFullError(run_id, event, max_buffered)
    inserted = yield (Q["insert_event"], (run_id, event, payload, event_id, now))
    if inserted and status == "waiting" and waiting_for == event:
        yield (Q["wake"], (now, now, run_id))
    return True


def take(now: int, lease: Lease, step: str, event: str) -> Script[EventTake | None]:
    fenced = yield (Q["fence_check"], (lease.run_id, lease.epoch, now))
    if not fenced:
        return None
    rows = yield (Q["get_step"], (lease.run_id, step))
    if rows and rows[0][0] == "completed":
        return EventTake(found=True, payload=rows[0][1])
    rows = yield (Q["oldest_event"], (lease.run_id, event))
    if not rows:
        return EventTake(found=False)
    event_row_id, payload = rows[0]
    yield (Q["take_event"], (now, event_row_id))
    record = StepRow(step, "completed", payload, None, 1, None)
    yield (Q["upsert_step"], record.params(lease.run_id, now))
    yield (Q["took_event"], (now, lease.run_id))
    return EventTake(found=True, payload=payload)


# -- child runs ------------------------------------------------------------------------


def start_child(now: int, lease: Lease, step: str, new: NewRun) -> Script[RunRecord | None]:
    # The parent's fence first: on a lost lease nothing is read or written.
    assert new.run_id is not None
    fenced = yield (Q["parent_deadline"], (lease.run_id, lease.epoch, now))
    if not fenced:
        return None
    rows = yield (Q["get_run"], (new.run_id,))
    if rows:
        existing = run_from_row(rows[0], from_epoch_us)
        if child_of(existing, lease.run_id, step):
            return existing  # a replayed step: the child it started, as stored
        raise StorageError(
            f"run id {new.run_id!r} already exists", operation="start_child", backend=BACKEND
        )
    # As create() computes a run's due time, with the deadline capped by the
    # parent's (reflow_core.adapter.child_deadline).
    delay_us = span_us(new.delay) if new.delay is not None and is_delayed(new) else 0
    own = None if new.deadline is None else now + span_us(new.deadline)
    parent: int | None = fenced[0][0]
    deadline_us = parent if own is None else own if parent is None else min(own, parent)
    wake_us = now + delay_us if deadline_us is None else min(now + delay_us, deadline_us)
    values = (
        new.run_id,
        new.workflow,
        "delayed" if delay_us else "pending",
        new.input,
        now,
        now,
        wake_us,
        deadline_us,
        lease.run_id,
        step,
        new.priority,
        *limit_columns(new.limits),
        *rate_columns(new.rates),
        headers_column(new.headers),
        new.version,
        new.fingerprint,
    )
    rows = yield (Q["insert_child"], values)
    return run_from_row(rows[0], from_epoch_us)


def wait_children(now: int, lease: Lease, step: StepRow) -> Script[bool | None]:
    fenced = yield (Q["fence_check"], (lease.run_id, lease.epoch, now))
    if not fenced:
        return None
    yield (Q["upsert_step"], step.params(lease.run_id, now))
    open_child = yield (Q["open_child"], (lease.run_id, step.name))
    if not open_child:
        yield (Q["touch"], (now, lease.run_id))
        return True
    # Parked until the end of its last open child wakes it (wake_parent, in
    # the same transaction as that end), or its deadline.
    waiting_for = CHILDREN_WAIT_PREFIX + step.name
    rows = yield (Q["wait_for_children"], (waiting_for, now, lease.run_id))
    yield from _stopped(now, rows[0])
    return False


def list_children(now: int, run_id: str) -> Script[list[RunRecord]]:
    rows = yield (Q["list_children"], (run_id, run_id))
    return [run_from_row(row, from_epoch_us) for row in rows]


def get_run(now: int, run_id: str) -> Script[RunRecord | None]:
    rows = yield (Q["get_run"], (run_id,))
    return run_from_row(rows[0], from_epoch_us) if rows else None


def get_runs(now: int, run_ids: Sequence[str]) -> Script[dict[str, RunRecord]]:
    """The runs among ``run_ids`` (distinct, at most ``MAX_GET_RUNS``), by id
    in the order given, read with one statement. The ids are padded to a
    power of two by repeating the last one, so the statement comes in a few
    shapes only (eleven for a thousand ids), well under SQLite's variable limit."""
    size = 1 << (len(run_ids) - 1).bit_length()
    params = [*run_ids, *[run_ids[-1]] * (size - len(run_ids))]
    rows = yield (with_marks("get_runs", "ids", size), params)
    found = {record.id: record for record in (run_from_row(row, from_epoch_us) for row in rows)}
    return {run_id: found[run_id] for run_id in run_ids if run_id in found}


def get_steps(now: int, run_id: str) -> Script[dict[str, StepRecord]]:
    rows = yield (Q["get_steps"], (run_id,))
    return {row[0]: step_from_row(row, from_epoch_us) for row in rows}


def list_runs(
    now: int,
    statuses: Sequence[str] | None,
    workflow: str | None,
    limit: int,
    after: tuple[int, str] | None,
) -> Script[RunPage]:
    clauses: list[str] = []
    params: list[object] = []
    if statuses is not None:
        clauses.append(with_marks("list_status", "statuses", len(statuses)))
        params.extend(statuses)
    if workflow is not None:
        clauses.append(Q["list_workflow"])
        params.append(workflow)
    if after is not None:
        clauses.append(Q["list_after"])
        params.extend(after)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    rows = yield (fill("list_runs", where=where), (*params, limit + 1))
    return run_page([run_from_row(row, from_epoch_us) for row in rows], limit)


def purge(now: int, age_us: int, batch: int) -> Script[int]:
    rows = yield (Q["purge_candidates"], (now - age_us, batch))
    ids = [row[0] for row in rows]
    for start in range(0, len(ids), PURGE_CHUNK):
        chunk = ids[start : start + PURGE_CHUNK]
        yield (with_marks("purge_steps", "ids", len(chunk)), chunk)
        yield (with_marks("purge_events", "ids", len(chunk)), chunk)
        yield (with_marks("purge_runs", "ids", len(chunk)), chunk)
    return len(ids)


def requeue(now: int, run_id: str) -> Script[bool]:
    rows = yield (Q["requeue"], (now, now, run_id))
    if not rows:
        return False
    yield (Q["drop_failed_steps"], (run_id,))
    return True


def upsert_schedule(now: int, spec: ScheduleSpec, next_run_at: int) -> Script[ScheduleRecord]:
    rows = yield (Q["get_schedule"], (spec.key,))
    created_at = now
    paused = 0  # a new schedule runs; a replaced one keeps its flag
    if rows:
        recurrence, old_next, created_at, paused = rows[0]
        if recurrence == spec.recurrence:
            next_run_at = old_next
    values = (
        spec.key,
        spec.workflow,
        spec.input,
        spec.recurrence,
        next_run_at,
        created_at,
        now,
        paused,
    )
    yield (Q["upsert_schedule"], values)
    return schedule_from_row(values, from_epoch_us)


def delete_schedule(now: int, key: str) -> Script[bool]:
    rows = yield (Q["delete_schedule"], (key,))
    return bool(rows)


def list_schedules(now: int) -> Script[list[ScheduleRecord]]:
    rows = yield (Q["list_schedules"], ())
    return [schedule_from_row(row, from_epoch_us) for row in rows]


def due_schedules(
    now: int, limit: int, workflows: Sequence[str] | None
) -> Script[list[ScheduleRecord]]:
    """The due schedules, earliest first then by key, up to ``limit``; with
    ``workflows``, of those workflows only, read through
    schedules_workflow_due a workflow at a time (see queries.sql)."""
    if workflows is None:
        rows = yield (Q["due_schedules"], (now, limit))
    elif not workflows:
        return []
    else:
        rows = yield from _heads("due_schedules_of", workflows, now, limit)
        if len(workflows) > WORKFLOW_CHUNK:  # several statements' rows, merged
            rows = sorted(rows, key=lambda row: (row[4], row[0]))[:limit]
    return [schedule_from_row(row, from_epoch_us) for row in rows]


def claim_slot(
    now: int, key: str, slot: int, next_run_at: int, run: NewRun, run_id: str
) -> Script[RunRecord | None]:
    advanced = yield (Q["advance_schedule"], (next_run_at, now, key, slot))
    if not advanced:
        return None
    result = yield from create(now, run, run_id)
    return result.run


def set_schedule_paused(
    now: int, key: str, paused: bool, next_run_at: int | None
) -> Script[ScheduleRecord | None]:
    rows = yield (Q["set_schedule_paused"], (int(paused), next_run_at, now, key))
    return schedule_from_row(rows[0], from_epoch_us) if rows else None


# -- workers and queue statistics ----------------------------------------------------


def announce_worker(now: int, worker: WorkerInfo, ttl_us: int) -> Script[WorkerRecord]:
    # Lapsed entries go first, so a row left with this id is live and keeps
    # its started_at (the upsert does not touch it).
    yield (Q["drop_lapsed_workers"], (now,))
    values = (
        worker.id,
        worker.host,
        worker.pid,
        encode_workflows(worker.workflows),
        worker.concurrency,
        worker.in_flight,
        now,
        now,
        now + ttl_us,
    )
    rows = yield (Q["announce_worker"], values)
    return worker_from_row(rows[0], from_epoch_us)


def list_workers(now: int) -> Script[list[WorkerRecord]]:
    rows = yield (Q["list_workers"], (now,))
    return [worker_from_row(row, from_epoch_us) for row in rows]


def remove_worker(now: int, worker_id: str) -> Script[bool]:
    rows = yield (Q["remove_worker"], (worker_id,))
    return bool(rows) and rows[0][0] > now


def queue_stats(now: int, workflows: Sequence[str] | None) -> Script[list[QueueStats]]:
    if workflows is None:
        rows = yield (Q["queue_stats_all"], ())
    else:
        rows = yield (with_marks("queue_stats_of", "workflows", len(workflows)), workflows)
    counts = [
        (workflow, status, count, None if since is None else from_epoch_us(since))
        for workflow, status, count, since in rows
    ]
    return queue_stats_from_counts(counts, workflows)


def find_by_key(now: int, key: str, limit: int) -> Script[list[RunRecord]]:
    rows = yield (Q["find_by_key"], (key, limit))
    return [run_from_row(row, from_epoch_us) for row in rows]


def buffered_events(now: int, run_id: str, limit: int) -> Script[list[BufferedEvent]]:
    rows = yield (Q["buffered_events"], (run_id, limit))
    return [BufferedEvent(event=name, payload=payload, event_id=eid) for name, payload, eid in rows]


def finished_history(now: int, minutes: int) -> Script[list[FinishedMinute]]:
    """The runs that finished from ``minutes - 1`` minutes before the current
    one (by ``now``) to the end of the current one, counted by minute and status."""
    current = now // MINUTE_US
    span = ((current - minutes + 1) * MINUTE_US, (current + 1) * MINUTE_US)
    rows = yield (Q["finished_history"], span)
    return finished_minutes_from_counts(
        (from_epoch_us(minute * MINUTE_US), status, count) for minute, status, count in rows
    )
