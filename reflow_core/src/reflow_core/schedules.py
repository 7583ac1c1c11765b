"""Schedules: recurring runs of a workflow, fired once per slot.

A schedule is stored in the backend (see the schedule operations of
:class:`~reflow_core.storage.Storage`), so it survives restarts and is shared
by every engine on that storage. This module holds what stays in Python:

* :func:`parse_recurrence` turns ``every=`` or ``cron=`` into a
  :class:`Recurrence`, rejecting anything that can never fire;
* :class:`Recurrence` computes slots, in UTC and in whole milliseconds (the
  precision the storage protocol keeps), and has a canonical string form
  (``"every:<ms>"`` or ``"cron:<expression>"``) that the backend compares to
  decide whether a re-registration changed the cadence;
* :class:`Schedule` is a stored schedule as
  :meth:`~reflow_core.engine.Engine.list_schedules` returns it;
* :class:`Scheduler` fires due schedules for an engine and tells its
  dispatcher when to look again.

Slots: ``every=`` slots are the whole multiples of the interval counted from
the Unix epoch (1970-01-01 00:00 UTC), so ``every="1h"`` fires on the hour and
``every="15m"`` at :00, :15, :30 and :45, whichever engine registered the
schedule and whenever. ``cron=`` slots are the instants the five-field
expression matches in UTC. The first slot of a new schedule is the first one
strictly after the moment it is registered. Slots that pass while no engine is
running are skipped, not caught up: firing a late slot moves the schedule to
the first slot strictly after *now*.

Whose clock: every *now* above is the storage's (:meth:`Storage.now
<reflow_core.storage.Storage.now>`), the clock that also judges leases and
decides which schedules are due, never the engine's. An engine whose clock
runs an hour fast or slow therefore registers, fires and skips the same slots
as every other engine. Between looks, a :class:`Scheduler` times its wake-ups
by its own clock corrected by the offset it measured at its last reading of
the storage's, so it still wakes on time for a slot.

Exactly once: each slot is fired with
:meth:`~reflow_core.storage.Storage.claim_schedule_slot`, which atomically
moves the schedule from that slot to the next one and creates the run, whose
idempotency key is derived from the slot (``schedule:<key>:<slot in epoch
ms>``). Any number of engines may race for a slot; one wins, and no crash can
separate the move from the run.

Pausing: a paused schedule fires no slot until it is resumed (:func:`set_paused`,
``Engine.pause_schedule``, ``reflow schedules pause``), and a worker that
registers it again at start keeps it paused. Slots that pass while it is
paused are skipped: resuming moves a due schedule to its first slot after now.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cronsim import CronSim, CronSimError

from . import codec
from ._durations import Duration, to_seconds
from .adapter import check_text
from .errors import ConfigError, IdempotencyConflictError
from .limits import RunShape
from .storage import NewRun, RunRecord, ScheduleRecord, Storage

__all__ = [
    "Recurrence",
    "Schedule",
    "Scheduler",
    "find_schedule",
    "parse_recurrence",
    "set_paused",
    "slot_key",
    "to_epoch_ms",
]

logger = logging.getLogger("reflow.schedules")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")

_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The usual shorthands, expanded before validation (so ``"@daily"`` and
``"0 0 * * *"`` are the same recurrence)."""


def _utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (a naive one is taken as UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def to_epoch_ms(moment: datetime) -> int:
    """Whole milliseconds since the Unix epoch, rounded down."""
    return (_utc(moment) - _EPOCH) // _MS


def _from_epoch_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def slot_key(key: str, slot: datetime) -> str:
    """The idempotency key of the run that fires ``slot`` of schedule ``key``."""
    return f"schedule:{key}:{to_epoch_ms(slot)}"


@dataclass(frozen=True, slots=True)
class Recurrence:
    """When a schedule fires: every ``interval_ms`` milliseconds (aligned to
    the Unix epoch), or at the matches of a five-field UTC ``cron`` expression.
    Build one with :func:`parse_recurrence` or :meth:`from_canonical`."""

    kind: Literal["every", "cron"]
    interval_ms: int | None = None
    cron: str | None = None

    @property
    def canonical(self) -> str:
        """The stored form: ``"every:<ms>"`` or ``"cron:<normalized expression>"``."""
        if self.kind == "every":
            return f"every:{self.interval_ms}"
        return f"cron:{self.cron}"

    @property
    def every(self) -> timedelta | None:
        """The interval of an ``every=`` recurrence, else ``None``."""
        return None if self.interval_ms is None else timedelta(milliseconds=self.interval_ms)

    def next_after(self, moment: datetime) -> datetime:
        """The first slot strictly after ``moment``, in UTC, in whole milliseconds."""
        if self.kind == "every":
            assert self.interval_ms is not None
            ms = to_epoch_ms(moment)
            return _from_epoch_ms((ms // self.interval_ms + 1) * self.interval_ms)
        assert self.cron is not None
        try:
            # CronSim drops sub-second precision and steps one second first,
            # so its first match is strictly after ``moment``; matches fall on
            # whole seconds.
            return next(CronSim(self.cron, _utc(moment)))
        except StopIteration:  # validated at registration; kept for stored data
            raise ConfigError(
                f"cron expression {self.cron!r} has no match in the 50 years after "
                f"{_utc(moment).isoformat()}",
                option="cron",
            ) from None

    @classmethod
    def from_canonical(cls, text: str) -> Recurrence:
        """Parse a stored recurrence string. Raises
        :class:`~reflow_core.errors.ConfigError` for one this version does not
        understand."""
        kind, sep, value = text.partition(":")
        if sep and kind == "every" and value.isdigit() and int(value) > 0:
            return cls("every", interval_ms=int(value))
        if sep and kind == "cron":
            return _parse_cron(value)
        raise ConfigError(f"unknown schedule recurrence {text!r}", option="recurrence")


@functools.lru_cache(maxsize=256)
def _recurrence(text: str) -> Recurrence:
    """:meth:`Recurrence.from_canonical`, cached: firing re-reads the same few
    stored strings over and over."""
    return Recurrence.from_canonical(text)


def _parse_every(every: Duration) -> Recurrence:
    seconds = to_seconds(every, option="every", allow_zero=False)
    ms = round(seconds * 1000)
    if ms < 1:
        raise ConfigError(f"every must be at least 1ms, got {every!r}", option="every")
    return Recurrence("every", interval_ms=ms)


def _parse_cron(expression: str) -> Recurrence:
    if not isinstance(expression, str):
        raise ConfigError(
            f"cron must be a string like '0 * * * *', not {type(expression).__name__}",
            option="cron",
        )
    text = _CRON_ALIASES.get(expression.strip().lower(), expression)
    fields = text.upper().split()
    if len(fields) != len(_CRON_FIELDS):
        raise ConfigError(
            f"cron expression {expression!r} has {len(fields)} field(s); "
            f"five are required: {' '.join(_CRON_FIELDS)} (UTC, no seconds field)",
            option="cron",
        )
    normalized = " ".join(fields)
    # The reference point only matters for the "never matches" search below.
    anchor = datetime.now(UTC)
    try:
        cron = CronSim(normalized, anchor)
    except CronSimError as exc:
        reason = str(exc).lower()
        if reason == "bad day-of-month" and _parses(" ".join([*fields[:3], "*", fields[4]])):
            # The day is valid on its own; no month of the expression has it.
            raise ConfigError(
                f"cron expression {expression!r} never matches: no month in "
                f"{fields[3]!r} has day {fields[2]!r}",
                option="cron",
            ) from None
        if reason.startswith("bad "):
            reason += " field"  # "bad minute field"
        raise ConfigError(
            f"cron expression {expression!r} is malformed: {reason}", option="cron"
        ) from None
    try:
        next(cron)
    except StopIteration:
        raise ConfigError(
            f"cron expression {expression!r} never matches (no match in the next 50 years)",
            option="cron",
        ) from None
    return Recurrence("cron", cron=normalized)


def _parses(expression: str) -> bool:
    try:
        CronSim(expression, datetime.now(UTC))
    except CronSimError:
        return False
    return True


def parse_recurrence(*, every: Duration | None = None, cron: str | None = None) -> Recurrence:
    """Validate a schedule's recurrence: exactly one of ``every`` (a positive
    duration) or ``cron`` (a five-field expression, evaluated in UTC).

    Cron expressions take numbers, ranges (``1-5``), lists (``1,15``), steps
    (``*/10``), month and weekday names (``JAN``, ``MON``), ``L`` (last day of
    the month), ``LW`` (its last weekday) and ``MON#2`` (the second Monday),
    and the shorthands ``@hourly``, ``@daily``, ``@midnight``, ``@weekly``,
    ``@monthly``, ``@yearly``. As in standard cron, when both day-of-month and
    day-of-week are restricted a day matching either fires.

    Raises :class:`~reflow_core.errors.ConfigError`, naming the expression
    and why, for both or neither option, a zero or negative interval, a
    malformed expression, one without exactly five fields, and one that can
    never match (``"0 0 30 2 *"``).
    """
    if every is not None and cron is not None:
        raise ConfigError("pass either every= or cron=, not both", option="every")
    if every is not None:
        return _parse_every(every)
    if cron is not None:
        return _parse_cron(cron)
    raise ConfigError("a schedule needs every= (a duration) or cron= (an expression)")


@dataclass(frozen=True, slots=True)
class Schedule:
    """A stored schedule, decoded.

    Exactly one of ``every`` and ``cron`` is set (both are ``None`` only for a
    recurrence written by a newer Reflow). ``cron`` is the normalized
    expression (single spaces, upper case, shorthands expanded),
    ``recurrence`` the canonical string the backend stores, and
    ``next_run_at`` the next slot to fire, in UTC.
    """

    key: str
    workflow: str
    input: Any
    every: timedelta | None
    cron: str | None
    recurrence: str
    next_run_at: datetime
    created_at: datetime
    updated_at: datetime
    paused: bool = False
    """A paused schedule fires nothing until it is resumed."""

    @classmethod
    def from_record(cls, record: ScheduleRecord) -> Schedule:
        try:
            parsed: Recurrence | None = Recurrence.from_canonical(record.recurrence)
        except ConfigError:
            parsed = None
        return cls(
            key=record.key,
            workflow=record.workflow,
            input=codec.decode(record.input),
            every=None if parsed is None else parsed.every,
            cron=None if parsed is None else parsed.cron,
            recurrence=record.recurrence,
            next_run_at=record.next_run_at,
            created_at=record.created_at,
            updated_at=record.updated_at,
            paused=record.paused,
        )


async def find_schedule(storage: Storage, key: str) -> ScheduleRecord | None:
    """The stored schedule ``key``, or ``None`` (the protocol has no lookup by key)."""
    return next((r for r in await storage.list_schedules() if r.key == key), None)


async def set_paused(storage: Storage, key: str, paused: bool) -> ScheduleRecord | None:
    """Pause or resume schedule ``key`` on ``storage``; ``None`` if there is none.

    Resuming skips the slots that passed while the schedule was paused: if its
    next slot is already due by the storage's clock, it moves to the first
    slot strictly after now, so resuming never fires a burst of old slots (nor
    one late slot). A schedule whose next slot is still ahead keeps it.
    """
    check_text(key, "key")
    if paused:
        return await storage.set_schedule_paused(key, True)
    found = await find_schedule(storage, key)
    if found is None:
        return None
    now = await storage.now()
    next_run_at = None
    if found.next_run_at <= now:
        try:
            next_run_at = Recurrence.from_canonical(found.recurrence).next_after(now)
        except ConfigError:
            next_run_at = None  # a recurrence of a newer Reflow: its engines move it
    return await storage.set_schedule_paused(key, False, next_run_at=next_run_at)


def _local_now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Fires an engine's due schedules and decides when to look again.

    It looks at most once per ``interval`` seconds (the engine's poll
    interval), earlier when a slot it knows of falls due: it remembers the
    next slot of every schedule registered or fired through it, so those fire
    on time while a schedule registered elsewhere is seen by the next poll.

    Slots are storage time. ``clock`` is the engine's own clock (default: the
    local clock); every reading of the storage's clock (:meth:`storage_now`,
    one per :meth:`fire_due`) also measures :attr:`offset`, the storage's
    clock minus ``clock``, and :meth:`should_check` and :meth:`wait` compare
    slots with ``clock`` plus that offset.
    """

    def __init__(self, *, interval: float, clock: Callable[[], datetime] | None = None) -> None:
        self._interval = interval
        self._local = clock or _local_now
        self._offset = timedelta(0)
        self._checked_at: float | None = None
        self._known: dict[str, datetime] = {}
        self._more = False
        self._filtering: tuple[Storage, bool] | None = None

    @property
    def offset(self) -> timedelta:
        """The storage's clock minus the local clock, as last measured (zero
        before the first reading)."""
        return self._offset

    async def storage_now(self, storage: Storage) -> datetime:
        """Read the storage's clock (one round trip) and measure :attr:`offset`.

        The local clock is read after the reply, so the offset errs, by at
        most the round trip, towards a storage clock that is behind: wake-ups
        timed with it come that little late, never early."""
        now = _utc(await storage.now())
        self._offset = now - _utc(self._local())
        return now

    def expect(self, key: str, next_run_at: datetime) -> None:
        """Note that schedule ``key`` next falls due at ``next_run_at``."""
        self._known[key] = next_run_at

    def forget(self, key: str) -> None:
        """Drop what is known of schedule ``key`` (it was deleted)."""
        self._known.pop(key, None)

    def _earliest(self) -> datetime | None:
        return min(self._known.values(), default=None)

    def should_check(self, now: datetime) -> bool:
        """True if due schedules should be looked for now; ``now`` is the
        local clock's reading."""
        if self._more or self._checked_at is None:
            return True
        if time.monotonic() - self._checked_at >= self._interval:
            return True
        earliest = self._earliest()
        return earliest is not None and earliest <= now + self._offset

    def wait(self, now: datetime, default: float) -> float:
        """Seconds an idle dispatcher may wait before it should look again,
        at most ``default``; ``now`` is the local clock's reading."""
        if self._more:
            return 0.0
        earliest = self._earliest()
        if earliest is None:
            return default
        return max(0.0, min(default, (earliest - (now + self._offset)).total_seconds()))

    def _prune(self, now: datetime) -> None:
        # Known slots that have passed are looked for now; any that turn out
        # not to be due (deleted or fired elsewhere) are left to the poll.
        self._known = {k: v for k, v in self._known.items() if v > now}

    async def fire_due(
        self,
        storage: Storage,
        workflows: Collection[str],
        limit: int,
        deadlines: Mapping[str, float] | None = None,
        shape: Callable[[str, str], RunShape] | None = None,
    ) -> list[RunRecord]:
        """Fire up to ``limit`` due schedules of ``workflows``, and return the
        runs created (each with the deadline, in seconds after its creation,
        that ``deadlines`` gives its workflow: the workflow's ``timeout``;
        and the priority and limits ``shape`` gives a run of that
        workflow with that encoded input).

        It reads the storage's clock (:meth:`storage_now`) when it has slots
        to prune or schedules to fire, so an engine whose storage holds no
        schedule pays one round trip per look, not two. Each due slot is
        claimed with the next slot strictly after both that *now* and the
        slot itself (so missed slots are skipped and the schedule always
        moves forward); a slot another engine fired first is left to it. A
        :class:`~reflow_core.errors.StorageError` propagates and the next
        look is one ``interval`` later.
        """
        self._checked_at = time.monotonic()
        self._more = False
        now = await self._read_now(storage) if self._known else None
        due = await self._due(storage, workflows, limit)
        if not due:
            return []
        if now is None:
            now = await self._read_now(storage)
        created: list[RunRecord] = []
        advanced = 0
        for record in due:
            try:
                recurrence = _recurrence(record.recurrence)
                slot = record.next_run_at
                following = recurrence.next_after(max(now, slot))
            except ConfigError as exc:
                logger.warning("schedule %r cannot be fired: %s", record.key, exc)
                continue
            limit_s = None if deadlines is None else deadlines.get(record.workflow)
            flow = RunShape() if shape is None else shape(record.workflow, record.input)
            run = NewRun(
                workflow=record.workflow,
                input=record.input,
                idempotency_key=slot_key(record.key, slot),
                deadline=None if limit_s is None else timedelta(seconds=limit_s),
                priority=flow.priority,
                limits=flow.limits,
                rates=flow.rates,
                version=flow.version,
                fingerprint=flow.fingerprint,
            )
            try:
                fired = await storage.claim_schedule_slot(record.key, slot, following, run)
            except IdempotencyConflictError as exc:
                logger.warning("schedule %r cannot fire slot %s: %s", record.key, slot, exc)
                continue
            advanced += 1
            self._known[record.key] = following
            if fired is not None:
                created.append(fired)
        # A full page may hide more due schedules: look again at once.
        self._more = len(due) >= limit and advanced > 0
        return created

    async def _read_now(self, storage: Storage) -> datetime:
        """The storage's clock, with the known slots that have passed by it
        pruned (looked for now; any not due are left to the poll). If the
        read fails they are pruned by the local clock and its last offset, so
        a storage outage cannot keep them looking due."""
        try:
            now = await self.storage_now(storage)
        except BaseException:
            self._prune(_utc(self._local()) + self._offset)
            raise
        self._prune(now)
        return now

    async def _due(
        self, storage: Storage, workflows: Collection[str], limit: int
    ) -> list[ScheduleRecord]:
        """Due schedules of ``workflows``, earliest first, at most ``limit``.

        The storage filters by workflow (``due_schedules(limit, workflows)``),
        so due schedules of workflows this engine does not serve, however
        many, never fill the page: one read.

        A third-party adapter written before the ``workflows`` parameter (its
        ``due_schedules`` takes ``limit`` alone, as its signature shows; read
        once per storage, with a warning) is read as before: due schedules of
        every workflow, this engine's kept, and when other workflows' fill
        the page it looks further, up to 16 times ``limit``. Past that many
        due schedules of other workflows ahead of them, this engine's wait
        until those are fired, paused or deleted.
        """
        if self._filtering is None or self._filtering[0] is not storage:
            self._filtering = (storage, _takes_workflows(storage))
        if self._filtering[1]:
            return await storage.due_schedules(limit, sorted(workflows))
        page = limit
        while True:
            due = await storage.due_schedules(page)
            mine = [s for s in due if s.workflow in workflows]
            if len(due) < page or len(mine) >= limit or page >= 16 * limit:
                return mine[:limit]
            page *= 4


def _takes_workflows(storage: Storage) -> bool:
    """Whether ``storage.due_schedules`` can be passed ``workflows`` (every
    adapter of this version; not one written before the parameter), judged
    by its signature. A signature that cannot be read counts as this
    version's."""
    method = storage.due_schedules
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(1, ())
    except TypeError:
        logger.warning(
            "%s.due_schedules takes no workflows: due schedules of every workflow "
            "are read and this engine's kept, so other workflows' can delay them; "
            "update the adapter to due_schedules(limit, workflows=None)",
            type(storage).__name__,
        )
        return False
    return True
