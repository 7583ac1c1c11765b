"""What the ``reflow`` command line and the dashboard share: operator
actions on runs, and stored runs, steps, errors and schedules shown as text.

Values are decoded from storage with :func:`decode_stored` (a value that
cannot be decoded is reported, not raised), shown as JSON with
:func:`pretty` or :func:`compact`; times with :func:`stamp` and
:func:`relative`; a stored failure (an ``ErrorInfo`` mapping) with
:func:`error_summary` and :func:`error_lines`. :func:`cancel_run` and
:func:`resume_run` change one run and say why when they cannot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, get_args

from . import codec
from ._durations import describe
from .engine import Engine
from .errors import ReflowError, SerializationError
from .schedules import Recurrence
from .storage import TERMINAL_STATUSES, RunStatus, StepRecord, Storage
from .workflow import RESERVED_PREFIX

__all__ = [
    "ACTIVE_STATUSES",
    "MAX_BUFFERED",
    "RESUMABLE_STATUSES",
    "STATUSES",
    "Outcome",
    "cancel_run",
    "compact",
    "decode_stored",
    "describe_error",
    "error_lines",
    "error_summary",
    "one_line",
    "pretty",
    "recurrence_text",
    "relative",
    "resume_run",
    "stamp",
    "to_jsonable",
    "visible_steps",
]

STATUSES: tuple[str, ...] = get_args(RunStatus)
"""Every run status, in lifecycle order."""
ACTIVE_STATUSES = ("delayed", "pending", "running", "sleeping", "waiting")
"""The statuses of unfinished runs (those that can be cancelled)."""
RESUMABLE_STATUSES = ("failed", "cancelled")
"""The statuses :func:`resume_run` requeues."""
MAX_BUFFERED = 1000
"""Unconsumed events a run may hold before a send is refused: the
:class:`~reflow_core.engine.Engine` default of ``max_buffered_events``."""


def one_line(text: str) -> str:
    """``text`` with its lines joined, for a one-line error."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong, with the stable code of a Reflow error."""
    if isinstance(exc, ReflowError):
        return one_line(f"{exc} [{exc.code}]")
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def to_jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data: datetimes and dates in ISO 8601,
    durations in seconds, mappings and sequences walked."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return value


def decode_stored(text: str | None) -> tuple[Any, str | None]:
    """A stored value decoded, and why it could not be (then the value is ``None``)."""
    if text is None:
        return None, None
    try:
        return codec.decode(text), None
    except SerializationError as exc:
        return None, exc.reason


def pretty(value: Any) -> str:
    """A decoded value as indented JSON."""
    return json.dumps(to_jsonable(value), ensure_ascii=False, indent=2)


def compact(value: Any, limit: int = 60) -> str:
    """A decoded value as one line of JSON, cut at ``limit`` characters."""
    text = json.dumps(to_jsonable(value), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def relative(moment: datetime | None, now: datetime) -> str:
    """``moment`` relative to ``now``: ``"5s ago"``, ``"in 3h"``, ``"-"`` for none."""
    if moment is None:
        return "-"
    seconds = (now - moment).total_seconds()
    ahead = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)}{unit}"
            break
    else:
        amount = f"{int(seconds)}s"
    if amount == "0s":
        return "just now"
    return f"in {amount}" if ahead else f"{amount} ago"


def stamp(moment: datetime | None) -> str:
    """``moment`` in UTC to the second, ``"-"`` for none."""
    if moment is None:
        return "-"
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def visible_steps(steps: dict[str, StepRecord]) -> list[StepRecord]:
    """The run's own steps (not the engine's bookkeeping), in the order they
    were stored, steps not finished yet last."""
    shown = [s for name, s in steps.items() if not name.startswith(RESERVED_PREFIX)]
    far = datetime.max.replace(tzinfo=None)
    return sorted(
        shown,
        key=lambda s: s.completed_at.replace(tzinfo=None) if s.completed_at else far,
    )


def _type_name(name: Any) -> str:
    text = str(name)
    return text.removeprefix("builtins.")


def error_summary(info: Any) -> str:
    """``Type: message`` of a stored error."""
    if not isinstance(info, dict):
        return compact(info, 200)
    head = _type_name(info.get("type") or info.get("code") or "error")
    return f"{head}: {info.get('message', '')}".rstrip()


def error_lines(info: Any, *, brief: bool = False) -> list[str]:
    """A stored error (an ``ErrorInfo`` mapping) as lines for people;
    ``brief``: without its traceback and causes."""
    if not isinstance(info, dict):
        return [compact(info, 200)]
    lines = [error_summary(info)]
    extra = [
        f"{key} {info[key]}" for key in ("code", "step", "attempts") if info.get(key) is not None
    ]
    if extra:
        lines.append("(" + ", ".join(extra) + ")")
    if brief:
        return lines
    traceback = info.get("traceback")
    if isinstance(traceback, str) and traceback:
        lines += ["", *traceback.rstrip().splitlines()]
    for cause in info.get("causes") or []:
        if isinstance(cause, dict):
            lines.append(
                f"caused by {_type_name(cause.get('type', '?'))}: {cause.get('message', '')}"
            )
    return lines


@dataclass
class Outcome:
    """What an operator's change did to one run: ``reason`` says why it did not change."""

    run_id: str
    changed: bool
    reason: str | None = None


async def cancel_run(engine: Engine, store: Storage, run_id: str) -> Outcome:
    """Cancel an unfinished run through ``engine`` (one that need not serve
    its workflow), saying why not when it cannot be."""
    record = await store.get_run(run_id)
    if record is None:
        return Outcome(run_id, False, "not found")
    if record.status in TERMINAL_STATUSES:
        return Outcome(run_id, False, f"already {record.status}")
    if await engine.cancel(run_id):
        return Outcome(run_id, True)
    return Outcome(run_id, False, "finished meanwhile")


async def resume_run(store: Storage, run_id: str) -> Outcome:
    """Requeue a failed or cancelled run (it continues at its first
    unfinished step), saying why not when it cannot be."""
    record = await store.get_run(run_id)
    if record is None:
        return Outcome(run_id, False, "not found")
    if record.status not in RESUMABLE_STATUSES:
        return Outcome(run_id, False, f"is {record.status}, not failed or cancelled")
    # Engine.resume checks that this engine serves the workflow; a command
    # serves none, so the run is requeued through the storage directly.
    if await store.requeue_run(run_id):
        return Outcome(run_id, True)
    return Outcome(run_id, False, "changed meanwhile")


def recurrence_text(canonical: str) -> str:
    """A stored recurrence for people: ``every 1h``, ``cron 0 * * * *``."""
    try:
        parsed = Recurrence.from_canonical(canonical)
    except ValueError:
        return canonical
    if parsed.cron is not None:
        return f"cron {parsed.cron}"
    if parsed.every is not None:
        return f"every {describe(parsed.every.total_seconds())}"
    return canonical
