"""What a step handler receives: :class:`StepContext` and its :class:`CancelSignal`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar

from .errors import (
    ChildFailedError,
    ConfigError,
    ErrorInfo,
    ParallelCompleteError,
    StepCancelledError,
)

if TYPE_CHECKING:
    from ._durations import Duration
    from .storage import RunRecord
    from .workflow import Workflow

__all__ = ["CancelSignal", "ChildHandle", "FailureContext", "StepContext"]

_EVENT_LOCK = threading.Lock()

InputT_co = TypeVar("InputT_co", covariant=True)
PrevT_co = TypeVar("PrevT_co", covariant=True)
OutT = TypeVar("OutT")
OutT_co = TypeVar("OutT_co", covariant=True)


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


class ChildStarter(Protocol):
    """How a step's context starts child runs (the engine provides it)."""

    async def start(
        self,
        workflow: Workflow[Any, Any],
        input: Any,
        *,
        timeout: Duration | None,
        delay: Duration | None,
    ) -> RunRecord: ...

    def decode_output(self, record: RunRecord) -> Any: ...

    def failure(self, record: RunRecord) -> ErrorInfo | None: ...


class AwaitChildren(BaseException):
    """Internal: a step awaits a child that has not ended. The engine parks
    the run until the step's children have all ended, then calls the step's
    handler again (a ``BaseException``, so ``except Exception`` in a handler
    does not swallow it)."""

    def __init__(self, child_run_id: str) -> None:
        super().__init__(f"waiting for child run {child_run_id}")
        self.child_run_id = child_run_id
        self.attempt = 1
        """The step attempt that waits; set by the engine."""


class ChildHandle(Generic[OutT_co]):
    """A child run started by :meth:`StepContext.start_child`.

    ``run_id`` is derived from the parent run, the step, its attempt and the
    child's position among the children that attempt started, so a step run
    again after a crash or a wait gets the same child, never a second one.
    """

    __slots__ = ("_record", "_starter")

    def __init__(self, record: RunRecord, starter: ChildStarter) -> None:
        self._record = record
        self._starter = starter

    @property
    def run_id(self) -> str:
        """The child run's id."""
        return self._record.id

    @property
    def workflow(self) -> str:
        """The child's workflow."""
        return self._record.workflow

    @property
    def status(self) -> str:
        """The child's status when it was started (or found, on a replay)."""
        return self._record.status

    @property
    def done(self) -> bool:
        """Whether the child had ended (completed, failed or cancelled) when it
        was started or found."""
        return self._record.status in ("completed", "failed", "cancelled")

    async def result(self) -> OutT_co:
        """The child's output.

        If the child has not ended, the run waits for it durably: the step
        stops here, the run is released (no worker slot is held) and, once
        every child the step has started has ended, the step's handler is
        called again from its start, with the same attempt. Starting the
        same children again then finds them ended, and ``result()`` returns
        at once. A child that failed or was cancelled raises
        :class:`~reflow_core.errors.ChildFailedError`, which fails this
        attempt of the step (retried by the step's policy, each attempt
        starting new children).
        """
        record = self._record
        if record.status == "completed":
            value: OutT_co = self._starter.decode_output(record)
            return value
        if record.status in ("failed", "cancelled"):
            raise ChildFailedError(
                record.id, record.workflow, record.status, self._starter.failure(record)
            )
        raise AwaitChildren(record.id)

    def __repr__(self) -> str:
        return f"ChildHandle(run_id={self.run_id!r}, workflow={self.workflow!r})"


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
    """True inside a branch of ``.parallel(...)`` or an item of ``.map(...)``."""
    _children: ChildStarter | None = field(default=None, repr=False, compare=False)
    _is_item: bool = field(default=False, repr=False, compare=False)

    @property
    def item(self) -> PrevT_co:
        """In an item of ``.map(...)``: the item this handler call is for
        (the same value as ``prev``). Raises
        :class:`~reflow_core.errors.ConfigError` anywhere else."""
        if not self._is_item:
            raise ConfigError(
                f"step {self.step!r}: ctx.item is set only in an item of .map(); "
                "use ctx.prev for the previous step's output",
                option="item",
            )
        return self.prev

    async def start_child(
        self,
        workflow: Workflow[Any, OutT],
        input: Any = None,
        *,
        timeout: Duration | None = None,
        delay: Duration | None = None,
    ) -> ChildHandle[OutT]:
        """Start a run of ``workflow`` as a child of this run, and return its
        handle; ``await handle.result()`` for its output.

        The child's input is validated here (a
        :class:`~reflow_core.errors.ValidationError` fails this attempt and
        starts nothing). Its id is derived from this run, this step, the
        attempt and how many children this attempt started before it, so the
        step, run again after a crash or after waiting for its children,
        gets the same child: never a second one. The child runs on any worker
        that serves its workflow; ``timeout`` bounds it as its workflow's
        ``timeout`` does (the earlier counts), and it never outlives this
        run's own deadline. ``delay`` starts it later. Cancelling this run
        cancels the child.

        Available in ``async def`` steps, not in parallel branches, map items,
        ``when=`` predicates or plain ``def`` steps (use the builder form,
        :meth:`~reflow_core.workflow.Workflow.child`, or start the children
        from one step).
        """
        if self._children is None:
            where = "a parallel branch or map item" if self.in_parallel else "this context"
            raise ConfigError(
                f"step {self.step!r}: start_child is not available in {where}; start child "
                "runs from an async def step of the workflow itself",
                option="start_child",
            )
        record = await self._children.start(workflow, input, timeout=timeout, delay=delay)
        return ChildHandle(record, self._children)

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
