"""What a step handler receives: :class:`StepContext` and its :class:`CancelSignal`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, TypeVar

from .errors import ErrorInfo, ParallelCompleteError, StepCancelledError

__all__ = ["CancelSignal", "FailureContext", "StepContext"]

_EVENT_LOCK = threading.Lock()

InputT_co = TypeVar("InputT_co", covariant=True)
PrevT_co = TypeVar("PrevT_co", covariant=True)


class CancelSignal:
    """Tells a running step that it should stop, from any thread.

    Async handlers are also cancelled the asyncio way (``CancelledError`` at
    their next ``await``); plain ``def`` handlers run in a worker thread that
    cannot be interrupted, so they should poll :attr:`cancelled`, call
    :meth:`raise_if_cancelled` between units of work, or block on
    :meth:`wait` instead of ``time.sleep``. A result returned after the
    signal fired is discarded.
    """

    __slots__ = ("_event", "_reason", "_waiters")

    def __init__(self) -> None:
        # The threading.Event is made on first use by a blocking wait(): most
        # signals (one per step attempt) never need one.
        self._event: threading.Event | None = None
        self._reason: str | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def _blocking_event(self) -> threading.Event:
        with _EVENT_LOCK:
            if self._event is None:
                self._event = threading.Event()
                if self._reason is not None:
                    self._event.set()
            return self._event

    @property
    def cancelled(self) -> bool:
        """True once the step has been asked to stop."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why: ``"cancelled"``, ``"lease_lost"``, ``"timeout"`` or ``"shutdown"``."""
        return self._reason

    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling thread until cancelled or ``timeout`` seconds pass.

        Returns True if cancelled. Use it as an interruptible ``time.sleep``.
        """
        return self._blocking_event().wait(timeout)

    async def wait_async(self) -> None:
        """Wait, without blocking the event loop, until cancelled."""
        if self.cancelled:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((loop, fut))
        try:
            await fut
        finally:
            self._waiters = [w for w in self._waiters if w[1] is not fut]

    def raise_if_cancelled(self) -> None:
        """Raise :class:`~reflow_core.errors.StepCancelledError` if cancelled."""
        if self._reason is not None:
            raise StepCancelledError(self._reason)

    def _fire(self, reason: str) -> None:
        with _EVENT_LOCK:
            if self._reason is not None:
                return
            self._reason = reason
            event = self._event
        if event is not None:
            event.set()
        for loop, fut in list(self._waiters):
            loop.call_soon_threadsafe(_resolve, fut)

    def __repr__(self) -> str:
        state = f"cancelled ({self._reason})" if self.cancelled else "active"
        return f"<CancelSignal {state}>"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(frozen=True, slots=True)
class StepContext(Generic[InputT_co, PrevT_co]):
    """Everything a step handler may read about its run.

    ``input`` is the validated workflow input; ``prev`` the output of the
    previous step (the input, for the first step); ``steps`` the outputs of
    the steps completed so far, by name (read-only); ``attempt`` counts from 1
    within this step's retries.
    """

    run_id: str
    workflow: str
    step: str
    attempt: int
    input: InputT_co
    prev: PrevT_co
    steps: Mapping[str, Any]
    signal: CancelSignal
    in_parallel: bool = field(default=False, repr=False)
    """True inside a branch of ``.parallel(...)``."""

    def complete(self, value: object = None) -> NoReturn:
        """Finish the run now with ``value`` as its output; later steps never run.

        ``value`` is saved as this step's output and the run's output in one
        atomic write. Raises :class:`~reflow_core.errors.ParallelCompleteError`
        inside a parallel branch.
        """
        if self.in_parallel:
            raise ParallelCompleteError(self.step)
        raise CompleteRun(value)

    def __repr__(self) -> str:
        return (
            f"StepContext(run_id={self.run_id!r}, workflow={self.workflow!r}, "
            f"step={self.step!r}, attempt={self.attempt})"
        )


class CompleteRun(Exception):
    """Raised by :meth:`StepContext.complete`; the engine finishes the run.

    Catching it in a handler (``except Exception``) swallows the completion:
    re-raise it, or call ``complete`` outside such a block.
    """

    def __init__(self, value: object) -> None:
        super().__init__("run completed early")
        self.value = value
        self.attempts = 1
        """The attempt of the step that called ``complete``; set by the engine."""


@dataclass(frozen=True, slots=True)
class FailureContext(Generic[InputT_co]):
    """What an ``on_failure`` handler receives when a run has failed for good."""

    run_id: str
    workflow: str
    step: str | None
    """The step that failed, or ``None`` for a failure outside any step."""
    error: ErrorInfo
    """The stored failure: ``code``, ``type``, ``message``, ``step``."""
    input: InputT_co
    """The run's validated input (the raw stored input if it no longer validates)."""
    exception: BaseException | None = None
    """The exception, when the failure happened in this process."""
