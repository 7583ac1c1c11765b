"""Flow control across the fleet: ``Limit``, ``Rate`` and the options a
workflow gives every run it enqueues (priority, ``max_running``, ``rate``, a
``Limit`` per key).

The limits are enforced by the storage, inside the claim: a claim never takes
a run that would put more runs holding a key at once than the key allows, nor
one that would start more runs holding a key in any window than its rate
allows, whichever worker, on whichever host, claims (see
:meth:`~reflow_core.storage.Storage.claim_runs`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ._durations import describe, to_seconds
from .adapter import check_text
from .errors import ConfigError, ValidationError
from .storage import (
    HOLD_EVENT,
    MAX_RATE,
    MAX_RATE_PERIOD,
    PRIORITY_RANGE,
    RATE_BLOCK_PREFIX,
    ConcurrencyLimit,
    RateLimit,
    RunRecord,
)

__all__ = [
    "WORKFLOW_LIMIT_PREFIX",
    "FlowControl",
    "Limit",
    "Rate",
    "RunShape",
    "check_priority",
    "hold_reason",
    "parse_rate",
]

WORKFLOW_LIMIT_PREFIX = "reflow:workflow:"
"""The key of a workflow's ``max_running`` limit: this prefix and its name."""


def check_priority(priority: object, where: str) -> int:
    """``priority`` if it is an int within :data:`~reflow_core.storage.PRIORITY_RANGE`."""
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise ConfigError(
            f"{where}: priority must be an int from {low} to {high}, got {priority!r}",
            option="priority",
        )
    return priority


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S.*?)\s*$")
_BARE_UNITS = {"ms": "1ms", "s": "1s", "m": "1m", "h": "1h", "d": "1d"}


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``max`` starts in any window of ``period``: what
    ``rate="100/m"`` means. Build one with :func:`parse_rate`."""

    max: int
    period: timedelta

    def __str__(self) -> str:
        return f"{self.max}/{describe(self.period.total_seconds())}"


def parse_rate(value: object, where: str = "rate") -> Rate:
    """A :class:`Rate` from ``"N/unit"`` (``"100/m"``, ``"5/s"``, ``"1000/h"``,
    ``"10/d"``), ``"N/duration"`` (``"10/30s"``, ``"3/1m30s"``) or a
    :class:`Rate`. The period is whole milliseconds from 1 ms to 7 days and
    ``N`` is from 1 to 10,000; anything else raises
    :class:`~reflow_core.errors.ConfigError` naming ``where``."""
    if isinstance(value, Rate):
        text = str(value)
        count, period = value.max, value.period
    elif isinstance(value, str):
        text = value
        match = _RATE.match(value)
        if match is None:
            raise ConfigError(
                f"{where}: a rate is 'N/period' like '100/m', '5/s' or '10/30s', got {value!r}",
                option="rate",
            )
        count = int(match.group(1))
        unit = match.group(2)
        seconds = to_seconds(_BARE_UNITS.get(unit, unit), option=f"{where} period")
        period = timedelta(milliseconds=round(seconds * 1000))
        if abs(period.total_seconds() - seconds) > 1e-9:
            raise ConfigError(
                f"{where}: the period of rate {value!r} must be whole milliseconds",
                option="rate",
            )
    else:
        raise ConfigError(
            f"{where}: rate must be a string like '100/m' or a Rate, not {type(value).__name__}",
            option="rate",
        )
    if not 1 <= count <= MAX_RATE:
        raise ConfigError(
            f"{where}: rate {text!r} allows {count} starts per period; it must be 1 to "
            f"{MAX_RATE} (for more, use a shorter period: '100/s' rather than '6000/m')",
            option="rate",
        )
    if not timedelta(milliseconds=1) <= period <= MAX_RATE_PERIOD:
        raise ConfigError(
            f"{where}: the period of rate {text!r} must be from 1ms to "
            f"{describe(MAX_RATE_PERIOD.total_seconds())}",
            option="rate",
        )
    return Rate(count, period)


@dataclass(frozen=True, slots=True)
class RunShape:
    """The priority and the limits a run is created with, and the version
    and fingerprint of the definition that creates it."""

    priority: int = 0
    limits: tuple[ConcurrencyLimit, ...] = ()
    rates: tuple[RateLimit, ...] = ()
    version: int = 1
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True, init=False)
class Limit:
    """Flow control per key computed from the input, across every worker:
    at most ``max`` runs with the same key running at once, and (with
    ``rate``) at most so many starts of runs with the same key in any window:
    ``workflow(..., concurrency=Limit(key=lambda i: i["customer_id"], max=1))``
    or ``Limit(key=lambda i: i["partner"], rate="100/m")``. Give ``max``,
    ``rate`` or both.

    ``key`` is called with a run's validated input when it is enqueued and
    returns its key (a ``str`` or an ``int``). Keys are the workflow's own,
    unless ``name`` is given: the workflows whose limits share a ``name``
    share their keys (at most 5 runs of any of them calling one partner API).
    """

    key: Callable[[Any], object]
    max: int | None
    rate: Rate | None
    name: str | None

    def __init__(
        self,
        key: Callable[[Any], object],
        max: int | None = None,
        *,
        rate: str | Rate | None = None,
        name: str | None = None,
    ) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "max", max)
        object.__setattr__(self, "rate", None if rate is None else parse_rate(rate, "Limit.rate"))
        object.__setattr__(self, "name", name)
        self._check()

    def _check(self) -> None:
        if not callable(self.key):
            raise ConfigError(
                "Limit.key must be a callable of the input (for example lambda i: i['id'])",
                option="key",
            )
        if self.max is None and self.rate is None:
            raise ConfigError("a Limit needs a max, a rate or both", option="max")
        if self.max is not None and (
            isinstance(self.max, bool) or not isinstance(self.max, int) or self.max < 1
        ):
            raise ConfigError(f"Limit.max must be an int of at least 1, got {self.max!r}")
        if self.name is not None:
            check_text(self.name, "Limit.name")
            if self.name.startswith("reflow:"):
                raise ConfigError(
                    f"Limit.name {self.name!r}: names starting with 'reflow:' are reserved",
                    option="name",
                )


@dataclass(frozen=True, slots=True)
class FlowControl:
    """What a workflow gives every run it enqueues."""

    priority: int = 0
    max_running: int | None = None
    concurrency: Limit | None = None
    rate: Rate | None = None

    def workflow_shape(self, workflow: str, priority: int | None = None) -> RunShape:
        """The priority (``priority``, else the workflow's) and the
        workflow-wide limits (``max_running``, ``rate``) of a run of ``workflow``."""
        key = WORKFLOW_LIMIT_PREFIX + workflow
        limits = () if self.max_running is None else (ConcurrencyLimit(key, self.max_running),)
        rate = self.rate
        rates = () if rate is None else (RateLimit(key, rate.max, rate.period),)
        return RunShape(self.priority if priority is None else priority, limits, rates)

    def shape(self, workflow: str, input: Any, priority: int | None = None) -> RunShape:
        """The priority and the limits of a run of ``workflow`` with
        validated ``input``. Raises :class:`~reflow_core.errors.ValidationError`
        when the key of its ``Limit`` cannot be computed from the input."""
        shape = self.workflow_shape(workflow, priority)
        limit = self.concurrency
        if limit is None:
            return shape
        key = f"{limit.name or workflow}:{self._key(limit, workflow, input)}"
        limits = shape.limits
        if limit.max is not None:
            limits = (*limits, ConcurrencyLimit(key, limit.max))
        rates = shape.rates
        if limit.rate is not None:
            rates = (*rates, RateLimit(key, limit.rate.max, limit.rate.period))
        return RunShape(shape.priority, limits, rates)

    @staticmethod
    def _key(limit: Limit, workflow: str, input: Any) -> str:
        """The key ``limit`` computes from ``input``, as text."""
        try:
            key = limit.key(input)
        except Exception as exc:
            raise ValidationError(
                f"the concurrency key of workflow {workflow!r} could not be computed "
                f"from the input: {type(exc).__name__}: {exc}",
                workflow=workflow,
                issues=[{"type": type(exc).__name__, "msg": str(exc)}],
            ) from exc
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise ValidationError(
                f"the concurrency key of workflow {workflow!r} must be a str or an int, "
                f"got {type(key).__name__}",
                workflow=workflow,
                issues=[{"type": "key_type", "msg": f"got {type(key).__name__}"}],
            )
        return check_text(key, "concurrency key") if isinstance(key, str) else str(key)


def hold_reason(record: RunRecord) -> str | None:
    """Why a run that is due, or about to be, is not running yet, in words:
    a full concurrency limit, a rate with no room, or a debounce still
    waiting for its key to be quiet, or a hold after a change of its
    workflow's definition; ``None`` for any other run."""
    if record.status == "waiting" and record.waiting_for == HOLD_EVENT:
        return (
            f"held after a change of workflow {record.workflow!r}: release it to go on "
            "(reflow runs release)"
        )
    blocked = record.blocked_by
    if blocked is not None and blocked.startswith(RATE_BLOCK_PREFIX):
        key = blocked.removeprefix(RATE_BLOCK_PREFIX)
        rate = next((r for r in record.rates if r.key == key), None)
        pace = "" if rate is None else f" ({Rate(rate.max, rate.period)})"
        return f"blocked by rate {key!r}{pace}: waits for its window to have room"
    if blocked is not None:
        limit = next((lim for lim in record.limits if lim.key == blocked), None)
        most = "" if limit is None else f" (at most {limit.max} at once)"
        return f"blocked by limit {blocked!r}{most}: waits for a running run with it to stop"
    if (
        record.debounce_key is not None
        and record.status in ("pending", "delayed")
        and record.attempts == 0
    ):
        when = "" if record.wake_at is None else f" at {record.wake_at.isoformat()}"
        return (
            f"debounced by key {record.debounce_key!r}: starts{when}, unless enqueued "
            "again with that key first"
        )
    return None
