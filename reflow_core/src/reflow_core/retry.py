"""Retry policies for steps."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ._durations import MAX_DURATION, Duration, to_seconds
from .errors import ConfigError, NonRetryableError

__all__ = ["Backoff", "Retry"]

Backoff = Literal["fixed", "linear", "exponential"]

_MAX_SECONDS = MAX_DURATION.total_seconds()


@dataclass(frozen=True, slots=True)
class Retry:
    """How often a failing step is tried, and how long to wait in between.

    ``max_attempts`` counts every attempt, the first included: ``Retry(max_attempts=1)``
    never retries. The delay before attempt ``n + 1`` (after ``n`` failures) is

    * ``"fixed"``: ``initial_delay``
    * ``"linear"``: ``initial_delay * n``
    * ``"exponential"``: ``initial_delay * factor ** (n - 1)``

    capped at ``max_delay`` (and, without one, at 100 years, the longest
    duration anything accepts). ``jitter`` spreads each delay uniformly by up to
    that fraction either way, so a fleet of failing runs does not retry in step.

    Which failures are retried, by exception type: one that is an instance
    of a class in ``retry_on`` (default: any ``Exception``) and of none in
    ``give_up_on`` (default: none) is retried while attempts are left; any
    other fails the step at once. A step that raises
    :class:`~reflow_core.errors.NonRetryableError` always fails at once. A
    timed-out attempt is a :class:`~reflow_core.errors.StepTimeoutError`.
    Both take a tuple of exception classes (or one class).
    """

    max_attempts: int = 3
    backoff: Backoff = "exponential"
    initial_delay: Duration = "1s"
    max_delay: Duration | None = "5m"
    factor: float = 2.0
    jitter: float = 0.0
    retry_on: tuple[type[Exception], ...] = (Exception,)
    give_up_on: tuple[type[Exception], ...] = ()
    _initial: float = field(init=False, repr=False, compare=False)
    _max: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigError("Retry.max_attempts must be an int", option="max_attempts")
        if self.max_attempts < 1:
            raise ConfigError(
                f"Retry.max_attempts must be at least 1, got {self.max_attempts}",
                option="max_attempts",
            )
        if self.backoff not in ("fixed", "linear", "exponential"):
            raise ConfigError(
                f"Retry.backoff must be 'fixed', 'linear' or 'exponential', got {self.backoff!r}",
                option="backoff",
            )
        if (
            isinstance(self.factor, bool)
            or not isinstance(self.factor, int | float)
            or not 1.0 <= self.factor < math.inf
        ):
            raise ConfigError(
                f"Retry.factor must be a finite number >= 1, got {self.factor!r}", option="factor"
            )
        if (
            isinstance(self.jitter, bool)
            or not isinstance(self.jitter, int | float)
            or not 0.0 <= self.jitter <= 1.0
        ):
            raise ConfigError(
                f"Retry.jitter must be within [0, 1], got {self.jitter}", option="jitter"
            )
        object.__setattr__(self, "retry_on", _exception_types(self.retry_on, "retry_on"))
        object.__setattr__(self, "give_up_on", _exception_types(self.give_up_on, "give_up_on"))
        object.__setattr__(self, "_initial", to_seconds(self.initial_delay, option="initial_delay"))
        object.__setattr__(
            self,
            "_max",
            None if self.max_delay is None else to_seconds(self.max_delay, option="max_delay"),
        )

    def retries(self, error: BaseException) -> bool:
        """Whether a failed attempt that raised ``error`` may be retried (if
        attempts are left), by ``retry_on``, ``give_up_on`` and
        :class:`~reflow_core.errors.NonRetryableError`."""
        if isinstance(error, NonRetryableError):
            return False
        return isinstance(error, self.retry_on) and not isinstance(error, self.give_up_on)

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts (``failures >= 1``)."""
        if self.backoff == "fixed":
            base = self._initial
        elif self.backoff == "linear":
            base = self._initial * failures
        else:
            try:
                base = self._initial * self.factor ** (failures - 1)
            except OverflowError:  # many failures of a fast-growing back-off
                base = math.inf
        base = min(base, _MAX_SECONDS if self._max is None else self._max)
        if self.jitter:
            base *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return min(max(base, 0.0), _MAX_SECONDS)


def _exception_types(value: object, option: str) -> tuple[type[Exception], ...]:
    """``value`` as a tuple of exception classes, or a ConfigError naming ``option``."""
    items: Iterable[object]
    if isinstance(value, type):
        items = (value,)
    elif isinstance(value, tuple | list | frozenset | set):
        items = value
    else:
        raise ConfigError(
            f"Retry.{option} must be a tuple of exception classes, got {value!r}", option=option
        )
    types: list[type[Exception]] = []
    for item in items:
        if not isinstance(item, type) or not issubclass(item, Exception):
            raise ConfigError(
                f"Retry.{option} must hold exception classes (subclasses of Exception), "
                f"got {item!r}",
                option=option,
            )
        types.append(item)
    return tuple(types)


NO_RETRY = Retry(max_attempts=1, initial_delay=0)
