"""The read-only views the engine hands out: runs and steps, decoded, and the clock."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from reflow_core import codec
from reflow_core.errors import CorruptDataError, ErrorInfo, SerializationError
from reflow_core.limits import hold_reason
from reflow_core.storage import (
    ConcurrencyLimit,
    RateLimit,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
)
from reflow_core.versions import held_reason
from reflow_core.workflow import RESERVED_PREFIX

__all__ = [
    "ChildRun",
    "Clock",
    "Run",
    "RunList",
    "StepResult",
    "SystemClock",
    "WaitedRuns",
    "read_stored",
]


@dataclass(frozen=True, slots=True)
class StepResult:
    """A saved step, decoded."""

    name: str
    status: StepStatus
    output: Any
    error: ErrorInfo | None
    attempts: int
    completed_at: datetime | None


@dataclass(frozen=True, slots=True)
class ChildRun:
    """A child run, as its parent's :attr:`Run.children` lists it."""

    id: str
    workflow: str
    step: str
    """The parent's step that started it."""
    status: RunStatus
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Run:
    """A run, decoded. ``steps`` is filled by :meth:`Engine.get_run_status`."""

    id: str
    workflow: str
    status: RunStatus
    input: Any
    output: Any
    error: ErrorInfo | None
    idempotency_key: str | None
    attempts: int
    reclaims: int
    created_at: datetime
    updated_at: datetime
    wake_at: datetime | None = None
    deadline_at: datetime | None = None
    """When the run must have finished (its workflow's ``timeout`` or its
    enqueue ``deadline``), ``None`` for no deadline."""
    steps: Mapping[str, StepResult] = field(default_factory=dict)
    parent_id: str | None = None
    """For a child run: the run that started it (``ctx.start_child`` or a
    ``.child`` step)."""
    parent_step: str | None = None
    """For a child run: the parent's step that started it."""
    priority: int = 0
    """Claims take due runs of a higher priority first."""
    limits: tuple[ConcurrencyLimit, ...] = ()
    """The concurrency limits it holds while it runs (its workflow's
    ``max_running``, its ``Limit`` key)."""
    blocked_by: str | None = None
    """Why a pending run is not running yet: the key of the limit a claim
    found full (a rate's behind ``reflow:rate:``). A run holding that key
    stopping lets it go, or, for a rate, the window having room again."""
    rates: tuple[RateLimit, ...] = ()
    """The rate limits every start of it counts against (its workflow's
    ``rate``, its ``Limit``'s rate)."""
    debounce_key: str | None = None
    """The ``debounce_key`` it was enqueued with."""
    hold: str | None = None
    """Why it is not running yet, in words, when a limit, a rate or a
    debounce holds it back (:func:`~reflow_core.limits.hold_reason`), or
    when a new definition of its workflow held it (:meth:`Engine.release`
    lets it go on; the reason in full with :meth:`Engine.get_run_status`)."""
    version: int = 1
    """The version of the workflow definition that enqueued it."""
    fingerprint: str | None = None
    """The fingerprint of that definition's shape (``None`` for a run
    enqueued without one)."""
    children: tuple[ChildRun, ...] = ()
    """The runs this run started as children, oldest first; filled by
    :meth:`Engine.get_run_status` (empty elsewhere)."""
    created: bool | None = None
    """What :meth:`Engine.enqueue` and :meth:`Engine.enqueue_many` did: True
    when the call created this run, False when it returned a run that
    already held the idempotency key (or the debounce key it updated);
    ``None`` on a run read back (:meth:`Engine.get_run`, listings)."""
    read_error: str | None = None
    """Set when a stored value of this run (its input, output, error or a
    step's) cannot be decoded: which one and why. That value reads as
    ``None``; everything else is as stored. Listing never fails because of
    one such run; a worker that claims it fails it with
    :class:`~reflow_core.errors.CorruptDataError`."""

    @classmethod
    def from_record(
        cls,
        record: RunRecord,
        steps: Mapping[str, StepRecord] | None = None,
        children: Sequence[RunRecord] = (),
        *,
        created: bool | None = None,
    ) -> Run:
        problems: list[str] = []

        def read(text: str | None, what: str) -> Any:
            if text is None:
                return None
            try:
                return codec.decode(text)
            except SerializationError as exc:
                problems.append(f"{what}: {exc.reason}")
                return None

        decoded_steps = {
            name: StepResult(
                name=s.name,
                status=s.status,
                output=read(s.output, f"output of step {name!r}"),
                error=read(s.error, f"error of step {name!r}"),
                attempts=s.attempts,
                completed_at=s.completed_at,
            )
            for name, s in (steps or {}).items()
            if not name.startswith(RESERVED_PREFIX)  # the engine's own records
        }
        return cls(
            id=record.id,
            workflow=record.workflow,
            status=record.status,
            input=read(record.input, "input"),
            output=read(record.output, "output"),
            error=read(record.error, "error"),
            idempotency_key=record.idempotency_key,
            attempts=record.attempts,
            reclaims=record.reclaims,
            created_at=record.created_at,
            updated_at=record.updated_at,
            wake_at=record.wake_at,
            deadline_at=record.deadline_at,
            steps=decoded_steps,
            parent_id=record.parent_id,
            parent_step=record.parent_step,
            priority=record.priority,
            limits=record.limits,
            blocked_by=record.blocked_by,
            rates=record.rates,
            debounce_key=record.debounce_key,
            hold=held_reason(record, steps) or hold_reason(record),
            version=record.version,
            fingerprint=record.fingerprint,
            children=tuple(
                ChildRun(c.id, c.workflow, c.parent_step or "", c.status, c.created_at)
                for c in children
            ),
            created=created,
            read_error="; ".join(problems) or None,
        )


def read_stored(text: str | None, what: str, run_id: str) -> Any:
    """Decode a value stored for a run; one that cannot be read is a
    :class:`CorruptDataError`, which fails the run rather than the worker."""
    if text is None:
        return None
    try:
        return codec.decode(text)
    except SerializationError as exc:
        raise CorruptDataError(what, exc.reason, run_id=run_id) from exc


class WaitedRuns(NamedTuple):
    """What :meth:`Engine.wait` returns: ``done, pending = await engine.wait(ids)``."""

    done: list[Run]
    """The runs that finished (completed, failed or cancelled), in the order
    their ids were given; nothing is raised for a failed or cancelled one."""
    pending: list[str]
    """The ids of the runs not finished yet, in the order given."""


class Clock:
    """Where the engine gets the time and waits (retry back-off, polling).

    The default is :class:`SystemClock`; :mod:`reflow_core.testing` uses a
    virtual one so tests pass time instantly.
    """

    def now(self) -> datetime:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError


class SystemClock(Clock):
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class RunList:
    """One page of :meth:`Engine.list_runs`; pass ``next_cursor`` for the next."""

    runs: list[Run]
    next_cursor: str | None
