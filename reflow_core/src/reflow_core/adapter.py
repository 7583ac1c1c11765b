"""Helpers for storage adapter authors: ids, cursors, time.

Everything a backend needs that is not specific to its store lives here, so
the id format and cursor encoding are the same on every backend.
"""

from __future__ import annotations

import base64
import os
import time
from datetime import UTC, datetime, timedelta

from ._durations import MAX_DURATION, describe
from .errors import ConfigError
from .storage import Lease, NewRun

__all__ = [
    "MAX_DURATION",
    "check_aware",
    "check_duration",
    "check_finish_status",
    "check_list_limit",
    "check_new_run",
    "check_purge",
    "check_status_update",
    "check_text",
    "decode_cursor",
    "encode_cursor",
    "from_epoch_us",
    "new_run_id",
    "utcnow",
]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_run_id() -> str:
    """A new run id: 26 characters, ULID layout (48-bit millisecond time, 80
    random bits, Crockford base32), so ids sort roughly by creation time."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def utcnow() -> datetime:
    """The local clock as an aware UTC datetime."""
    return datetime.now(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


def from_epoch_us(value: int) -> datetime:
    """An aware UTC datetime from microseconds since the Unix epoch.

    A value outside datetime's years 1-9999 reads as the nearest
    representable time instead of failing: nothing is written out of range
    now (durations are bounded), but an older version could store a wake-up
    time in the year 33,715, and every read of that run used to fail."""
    try:
        return _EPOCH + timedelta(microseconds=value)
    except OverflowError:
        return _LATEST if value > 0 else _EARLIEST


def encode_cursor(created_at: datetime, run_id: str) -> str:
    """An opaque keyset cursor for the position just after ``(created_at, run_id)``."""
    raw = f"{created_at.astimezone(UTC).isoformat()}|{run_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of :func:`encode_cursor`; a malformed cursor raises :class:`ConfigError`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, sep, run_id = raw.partition("|")
        created = datetime.fromisoformat(stamp)
        if not sep or not run_id or created.tzinfo is None:
            raise ValueError(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"malformed list cursor {cursor!r}", option="cursor") from exc
    return created, run_id


def check_status_update(status: str, lease: Lease | None) -> None:
    """Refuse arguments :meth:`Storage.update_run_status` never accepts, before
    touching the store: an unknown target status, or ``pending`` without a lease."""
    if status not in ("pending", "cancelled", "failed"):
        raise ConfigError(
            f"update_run_status moves a run to 'pending', 'cancelled' or 'failed', not {status!r}",
            option="status",
        )
    if status == "pending" and lease is None:
        raise ConfigError("handing a run back to 'pending' requires its lease", option="lease")


def check_list_limit(limit: object) -> int:
    """Refuse a :meth:`Storage.list_runs` ``limit`` that is not an int of at least 1."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive int, got {limit!r}", option="limit")
    return limit


def check_finish_status(status: str) -> None:
    """Refuse a :meth:`Storage.finish_run` status other than ``completed`` or ``failed``."""
    if status not in ("completed", "failed"):
        raise ConfigError(
            f"finish_run ends a run as 'completed' or 'failed', not {status!r}", option="status"
        )


def check_purge(older_than: object, batch: object) -> int:
    """Refuse the arguments of a backend's ``purge_finished`` that can never
    work; returns ``batch`` as an int."""
    if not isinstance(older_than, timedelta) or older_than < timedelta(0):
        raise ConfigError(
            f"older_than must be a non-negative timedelta, got {older_than!r}",
            option="older_than",
        )
    if isinstance(batch, str) and batch.strip().isdigit():
        batch = int(batch.strip())
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1, got {batch!r}", option="batch")
    return batch


def check_aware(value: datetime, what: str) -> datetime:
    """Refuse a naive datetime (one without a UTC offset), naming ``what``."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigError(f"{what} must be a timezone-aware datetime, got {value!r}", option=what)
    return value


def check_text(value: object, what: str) -> str:
    """Refuse a name, id or key that not every store can keep, the same way on
    every backend: anything but a non-empty ``str``, or one holding a NUL or
    a lone surrogate (PostgreSQL's ``text`` keeps neither; neither encodes to
    UTF-8). Returns ``value``.

    Backends call it on every name, run id, key and event id they are given,
    before touching the store; the engine checks workflow, step and event
    names with it when a workflow is defined.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}", option=what)
    if not value:
        raise ConfigError(f"{what} must be a non-empty string", option=what)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"{what} {value!r} contains a lone surrogate, which no store can keep",
                option=what,
            ) from None
    if "\x00" in value:
        raise ConfigError(f"{what} {value!r} contains a NUL character", option=what)
    return value


def check_duration(value: object, what: str) -> timedelta:
    """Refuse a duration a backend is given that is not a ``timedelta``
    from zero to :data:`~reflow_core._durations.MAX_DURATION` (100 years), so
    every deadline the backend computes from its clock can be stored and read
    back. Returns ``value``."""
    if not isinstance(value, timedelta) or not timedelta(0) <= value <= MAX_DURATION:
        raise ConfigError(
            f"{what} must be a timedelta from 0 to {describe(MAX_DURATION.total_seconds())}, "
            f"got {value!r}",
            option=what,
        )
    return value


def check_new_run(new: NewRun) -> None:
    """:func:`check_text` on the names and keys of a run to create."""
    check_text(new.workflow, "workflow")
    if new.idempotency_key is not None:
        check_text(new.idempotency_key, "idempotency_key")
    if new.run_id is not None:
        check_text(new.run_id, "run_id")
