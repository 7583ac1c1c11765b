"""Retry policies for steps."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

from ._durations import MAX_DURATION, Duration, to_seconds
from .errors import ConfigError

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
    """

    max_attempts: int = 3
    backoff: Backoff = "exponential"
    initial_delay: Duration = "1s"
    max_delay: Duration | None = "5m"
    factor: float = 2.0
    jitter: float = 0.0
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
        object.__setattr__(self, "_initial", to_seconds(self.initial_delay, option="initial_delay"))
        object.__setattr__(
            self,
            "_max",
            None if self.max_delay is None else to_seconds(self.max_delay, option="max_delay"),
        )

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


NO_RETRY = Retry(max_attempts=1, initial_delay=0)
