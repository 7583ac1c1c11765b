"""Turning what a caller enqueues into :class:`~reflow_core.storage.NewRun`
records: the checks :meth:`Engine.enqueue` and :meth:`Engine.enqueue_many`
share, and the per-item options of a batch (:class:`EnqueueItem`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from reflow_core import codec
from reflow_core._durations import Duration, to_seconds
from reflow_core.adapter import check_text
from reflow_core.errors import ConfigError, ReflowError
from reflow_core.limits import check_priority
from reflow_core.storage import NewRun
from reflow_core.tracing import Scopes
from reflow_core.workflow import Workflow, to_plain_input

__all__ = [
    "BatchBuilder",
    "EnqueueItem",
    "Timing",
    "check_deadline",
    "check_debounce",
    "check_later",
]


@dataclass(frozen=True, slots=True)
class EnqueueItem:
    """One run of :meth:`~reflow_core.Engine.enqueue_many` with options of
    its own. Each option has the meaning it has for
    :meth:`~reflow_core.Engine.enqueue`; one left at ``None`` takes the
    batch's (the keyword arguments of ``enqueue_many``).

    ::

        await engine.enqueue_many(charge, [
            EnqueueItem({"order": 1}, idempotency_key="order-1"),
            EnqueueItem({"order": 2}, idempotency_key="order-2", priority=10),
        ])
    """

    input: Any = None
    idempotency_key: str | None = None
    delay: Duration | None = None
    run_at: datetime | None = None
    deadline: Duration | datetime | None = None
    priority: int | None = None
    debounce_key: str | None = None
    debounce: Duration | None = None
    headers: Mapping[str, str] | None = None


def check_later(delay: Duration | None, run_at: datetime | None) -> timedelta | datetime | None:
    """``enqueue``'s ``delay`` or ``run_at``, checked: a timedelta, an aware
    datetime (turned into a delay on the storage's clock), or ``None``."""
    if delay is not None and run_at is not None:
        raise ConfigError("give delay= or run_at=, not both", option="delay")
    if run_at is not None:
        if not isinstance(run_at, datetime) or run_at.utcoffset() is None:
            raise ConfigError(
                f"run_at must be a timezone-aware datetime, got {run_at!r}", option="run_at"
            )
        return run_at
    if delay is None:
        return None
    return timedelta(seconds=to_seconds(delay, option="delay", allow_zero=True))


def check_debounce(
    key: str | None,
    debounce: Duration | None,
    idempotency_key: str | None,
    later: timedelta | datetime | None,
) -> timedelta:
    """``enqueue``'s ``debounce_key`` and ``debounce``, checked: the delay of
    the debounced run."""
    if key is None or debounce is None:
        raise ConfigError(
            "give debounce_key= and debounce= together (debounce_key='...', debounce='5s')",
            option="debounce_key" if key is None else "debounce",
        )
    check_text(key, "debounce_key")
    if idempotency_key is not None:
        raise ConfigError(
            "give debounce_key= or idempotency_key=, not both: a debounced run's input "
            "is replaced by the last one sent",
            option="debounce_key",
        )
    if later is not None:
        raise ConfigError(
            "give debounce= or delay=/run_at=, not both: a debounced run starts once its "
            "key has been quiet for the debounce",
            option="debounce",
        )
    return timedelta(seconds=to_seconds(debounce, option="debounce", allow_zero=True))


def check_deadline(deadline: Duration | datetime | None) -> timedelta | datetime | None:
    """``enqueue``'s ``deadline``, checked: a positive duration or an aware datetime."""
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        if deadline.utcoffset() is None:
            raise ConfigError(
                f"deadline must be a duration or a timezone-aware datetime, got {deadline!r}",
                option="deadline",
            )
        return deadline
    return timedelta(seconds=to_seconds(deadline, option="deadline", allow_zero=False))


@dataclass(frozen=True, slots=True)
class Timing:
    """When a run starts and by when it must finish, checked, before the
    absolute times among them are turned into delays."""

    later: timedelta | datetime | None
    deadline: timedelta | datetime | None

    @classmethod
    def of(
        cls,
        delay: Duration | None,
        run_at: datetime | None,
        deadline: Duration | datetime | None,
        debounce_key: str | None,
        debounce: Duration | None,
        idempotency_key: str | None,
    ) -> Timing:
        later = check_later(delay, run_at)
        if debounce_key is not None or debounce is not None:
            later = check_debounce(debounce_key, debounce, idempotency_key, later)
        return cls(later, check_deadline(deadline))

    @property
    def absolute(self) -> bool:
        """Whether it needs a reading of the storage's clock."""
        return isinstance(self.later, datetime) or isinstance(self.deadline, datetime)

    def resolve(
        self, now: datetime | None, timeout: float | None
    ) -> tuple[timedelta | None, timedelta | None]:
        """The delay and the deadline as durations from ``now`` (the storage's
        clock, read when :attr:`absolute`), the workflow's ``timeout`` bounding
        the deadline."""
        later, due = self.later, self.deadline
        if isinstance(later, datetime):
            assert now is not None
            later = max(later - now, timedelta(0))
        if isinstance(due, datetime):
            assert now is not None
            due = max(due - now, timedelta(0))
        if timeout is not None:
            limit = timedelta(seconds=timeout)
            due = limit if due is None else min(due, limit)
        return later, due


class BatchBuilder:
    """The :class:`NewRun` records of one ``enqueue_many`` call: every item
    validated and encoded before anything is written, an error naming the
    item it is about."""

    __slots__ = (
        "_default",
        "_given",
        "_headers",
        "_items",
        "_rank",
        "_scopes",
        "_times",
        "_wf",
        "uses_clock",
    )

    def __init__(
        self,
        wf: Workflow[Any, Any],
        scopes: Scopes,
        *,
        delay: Duration | None,
        run_at: datetime | None,
        deadline: Duration | datetime | None,
        priority: int | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self._wf = wf
        self._scopes = scopes
        self._rank = None if priority is None else check_priority(priority, "enqueue_many")
        self._times = (delay, run_at, deadline)
        self._default = Timing.of(delay, run_at, deadline, None, None, None)
        self._given = headers
        # One set of headers for the batch, unless a tracing plugin gives each run its own.
        self._headers = None if scopes.adds_headers else scopes.headers(wf.name, headers)
        self._items: list[tuple[NewRun, Timing]] = []
        self.uses_clock = self._default.absolute
        """Whether an item's times need a reading of the storage's clock."""

    def extend(self, items: Iterable[Any]) -> None:
        """Check and encode ``items``; an error names the item by its index."""
        for index, item in enumerate(items):
            try:
                self._add(item)
            except ReflowError as exc:
                exc.message = f"item {index}: {exc.message}"
                exc.args = (exc.message, *exc.args[1:])
                raise

    def _add(self, item: Any) -> None:
        wf = self._wf
        rank = self._rank
        timing = self._default
        headers = self._headers
        key = debounce_key = None
        if isinstance(item, EnqueueItem):
            key = item.idempotency_key
            if key is not None:
                check_text(key, "idempotency_key")
            if item.priority is not None:
                rank = check_priority(item.priority, "enqueue_many")
            if (
                item.delay is not None
                or item.run_at is not None
                or item.deadline is not None
                or item.debounce_key is not None
                or item.debounce is not None
            ):
                delay, run_at, deadline = self._times
                if item.delay is not None or item.run_at is not None:
                    delay, run_at = item.delay, item.run_at
                timing = Timing.of(
                    delay,
                    run_at,
                    deadline if item.deadline is None else item.deadline,
                    item.debounce_key,
                    item.debounce,
                    key,
                )
                self.uses_clock = self.uses_clock or timing.absolute
            if item.headers is not None:
                headers = self._scopes.headers(wf.name, {**(self._given or {}), **item.headers})
            debounce_key = item.debounce_key
            raw = to_plain_input(item.input)
        else:
            raw = to_plain_input(item)
        if headers is None:
            headers = self._scopes.headers(wf.name, self._given)
        shape = wf.flow.shape(wf.name, wf.validate_input(raw), rank)
        new = NewRun(
            workflow=wf.name,
            input=codec.encode(raw),
            idempotency_key=key,
            priority=shape.priority,
            limits=shape.limits,
            rates=shape.rates,
            debounce_key=debounce_key,
            headers=headers,
            version=wf.version,
            fingerprint=wf.fingerprint,
        )
        self._items.append((new, timing))

    def build(self, now: datetime | None) -> list[NewRun]:
        """The records to create, their times resolved against ``now`` (the
        storage's clock, read when :attr:`uses_clock`)."""
        timeout = self._wf.timeout
        news: list[NewRun] = []
        resolved: dict[int, tuple[timedelta | None, timedelta | None]] = {}
        for new, timing in self._items:
            found = resolved.get(id(timing))
            if found is None:
                found = resolved[id(timing)] = timing.resolve(now, timeout)
            delay, deadline = found
            if delay is None and deadline is None:
                news.append(new)
            else:
                news.append(replace(new, delay=delay, deadline=deadline))
        return news
