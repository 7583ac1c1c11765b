"""Durations: ``timedelta``, seconds as numbers, or strings like ``"500ms"``.

Every duration the engine accepts is at most :data:`MAX_DURATION` (100 years),
so every deadline computed from one (``now + duration``) is a datetime every
backend can store and read back.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import TypeAlias

from .errors import ConfigError

__all__ = ["MAX_DURATION", "Duration", "describe", "to_seconds", "to_timedelta"]

Duration: TypeAlias = "timedelta | int | float | str"

MAX_DURATION = timedelta(days=36500)
"""The longest duration anything accepts: 100 years (36,500 days)."""
_MAX_SECONDS = MAX_DURATION.total_seconds()

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def describe(seconds: float) -> str:
    """A duration for messages: ``"100ms"``, ``"30s"``, ``"36500d"``."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def to_seconds(
    value: Duration,
    *,
    option: str = "duration",
    allow_zero: bool = True,
    minimum: float | None = None,
    maximum: float = _MAX_SECONDS,
) -> float:
    """Convert a duration to seconds, refusing negative, infinite or malformed
    values, and values outside ``[minimum, maximum]`` (``maximum`` defaults
    to :data:`MAX_DURATION`).

    Strings combine an amount and a unit (``ms``, ``s``, ``m``, ``h``, ``d``),
    optionally several: ``"1h30m"``.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ConfigError(f"{option} must be a duration, not a bool", option=option)
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos = 0
        seconds = 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ConfigError(
                f"{option}={value!r} is not a duration; use e.g. '500ms', '30s', '5m', '24h', "
                "'7d', a number of seconds or a timedelta",
                option=option,
            )
    else:
        raise ConfigError(
            f"{option} must be a timedelta, a number of seconds or a string like '30s', "
            f"not {type(value).__name__}",
            option=option,
        )
    if not math.isfinite(seconds):
        raise ConfigError(f"{option} must be a finite duration, got {value!r}", option=option)
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "positive" if not allow_zero else "zero or positive"
        raise ConfigError(f"{option} must be {bound}, got {value!r}", option=option)
    if seconds > maximum:
        raise ConfigError(
            f"{option} must be at most {describe(maximum)}, got {value!r}", option=option
        )
    if minimum is not None and seconds < minimum:
        raise ConfigError(
            f"{option} must be at least {describe(minimum)}, got {value!r}", option=option
        )
    return seconds


def to_timedelta(
    value: Duration, *, option: str = "duration", allow_zero: bool = True
) -> timedelta:
    """Like :func:`to_seconds`, as a ``timedelta``."""
    return timedelta(seconds=to_seconds(value, option=option, allow_zero=allow_zero))
