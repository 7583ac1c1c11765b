"""What a test gets back: a run as it stands, or the error of one that is stuck."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Self, TypeVar, cast

from reflow_core.engine import Run, StepResult
from reflow_core.errors import ErrorInfo, RunCancelledError, RunError, RunFailedError
from reflow_core.storage import TERMINAL_STATUSES, RunStatus

OutT = TypeVar("OutT")


class RunBlockedError(RunError):
    """A run that a test expected to finish is stuck; ``reason`` says why."""

    code = "run_blocked"

    def __init__(self, run_id: str, status: RunStatus, reason: str) -> None:
        super().__init__(f"run {run_id} did not finish ({status}): {reason}", run_id=run_id)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RunResult(Generic[OutT]):
    """A run as a test sees it: where it stands, its steps, and, if it cannot
    go on, why.

    ``OutT`` is the output type of the workflow it ran (the type of its last
    step's output), so ``result.output`` is typed.
    """

    run: Run
    """The run with its saved steps, as
    :meth:`~reflow_core.engine.Engine.get_run_status` returns it."""
    blocked_reason: str | None = None
    """Why the run cannot go on by itself, in words; ``None`` once it finished."""

    @property
    def id(self) -> str:
        """The run's id."""
        return self.run.id

    @property
    def workflow(self) -> str:
        """The name of the run's workflow."""
        return self.run.workflow

    @property
    def status(self) -> RunStatus:
        """``completed``, ``failed`` or ``cancelled`` once finished; otherwise
        where it stopped (``sleeping``, ``waiting``, ``pending``, ``running``)."""
        return self.run.status

    @property
    def finished(self) -> bool:
        """True if the run completed, failed or was cancelled."""
        return self.run.status in TERMINAL_STATUSES

    @property
    def error(self) -> ErrorInfo | None:
        """The stored failure of a failed or cancelled run: ``code``, ``type``,
        ``message``, ``step``."""
        return self.run.error

    @property
    def steps(self) -> Mapping[str, StepResult]:
        """The saved steps by name (completed, skipped, failed, and the sleep
        or wait the run stopped at)."""
        return self.run.steps

    @property
    def output(self) -> OutT:
        """The output of a completed run. Raises as :meth:`raise_for_status`
        does for a run that did not complete."""
        self.raise_for_status()
        return cast(OutT, self.run.output)

    def step(self, name: str) -> StepResult:
        """The saved step ``name``; a ``KeyError`` lists the saved ones."""
        try:
            return self.run.steps[name]
        except KeyError:
            saved = ", ".join(repr(n) for n in self.run.steps) or "none"
            raise KeyError(
                f"run {self.run.id} has no saved step {name!r} (saved: {saved})"
            ) from None

    def raise_for_status(self) -> Self:
        """Return this result if the run completed; otherwise raise
        :class:`~reflow_core.errors.RunFailedError` (with the stored failure),
        :class:`~reflow_core.errors.RunCancelledError`, or
        :class:`RunBlockedError` (with :attr:`blocked_reason`)."""
        status = self.run.status
        if status == "completed":
            return self
        if status == "failed":
            raise RunFailedError(self.run.id, self.run.error or {})
        if status == "cancelled":
            raise RunCancelledError(self.run.id)
        raise RunBlockedError(self.run.id, status, self.blocked_reason or status)

    def __repr__(self) -> str:
        extra = f" blocked_reason={self.blocked_reason!r}" if self.blocked_reason else ""
        return (
            f"<RunResult {self.run.id} workflow={self.run.workflow!r} "
            f"status={self.run.status!r}{extra}>"
        )
