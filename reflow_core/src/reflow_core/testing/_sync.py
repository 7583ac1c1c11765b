"""The synchronous facade: the test engine with plain methods."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar, cast

from reflow_core._durations import Duration
from reflow_core.engine import Engine
from reflow_core.storage import Storage
from reflow_core.workflow import Workflow

from ._clock import VirtualClock
from ._engine import StorageOption, TestEngine

P = ParamSpec("P")
T = TypeVar("T")


def _sync(
    method: Callable[Concatenate[TestEngine, P], Awaitable[T]],
) -> Callable[Concatenate[SyncTestEngine, P], T]:
    """The plain-method form of the coroutine method ``method`` of
    :class:`TestEngine`: it calls that method of the engine on the facade's
    event loop, registering with the facade the workflow it is given first.

    Type checkers keep the whole signature, overloads and type variables
    included (``run(workflow)`` is a ``RunResult[OutT]`` of the workflow's
    output type), and ``help()`` shows the async method's signature and
    docstring.
    """
    name = method.__name__

    def call(self: SyncTestEngine, /, *args: P.args, **kwargs: P.kwargs) -> T:
        engine = self._loop()[1]
        workflow = args[0] if args else kwargs.get("workflow")
        if isinstance(workflow, Workflow):
            self.register(workflow)
        # Looked up on the engine rather than called as ``method``, so a
        # subclass of TestEngine built by ``async_engine()`` is honoured.
        bound = cast(Callable[P, Awaitable[T]], getattr(engine, name))
        return self.call(bound(*args, **kwargs))

    functools.update_wrapper(call, method)
    call.__qualname__ = f"SyncTestEngine.{name}"
    call.__module__ = __name__
    return call


class SyncTestEngine:
    """:class:`TestEngine` with plain methods, for tests that are not
    coroutines: it runs its own event loop, kept between calls, until
    :meth:`close` (or the end of a ``with`` block).

    It takes the same arguments as :class:`TestEngine`. It cannot be called
    from a running event loop (an ``async def`` test); there, use
    :meth:`async_engine`, which builds the async :class:`TestEngine` with the
    same settings on the caller's loop.
    """

    def __init__(
        self,
        workflows: Iterable[Workflow[Any, Any]] = (),
        *,
        storage: StorageOption = None,
        clock: VirtualClock | None = None,
        wall_timeout: Duration = "10s",
        max_backoffs: int = 1000,
        **engine_options: Any,
    ) -> None:
        self.clock: VirtualClock = clock if clock is not None else VirtualClock()
        """The virtual clock."""
        self._workflows: list[Workflow[Any, Any]] = list(workflows)
        self._storage = storage
        self._options: dict[str, Any] = dict(
            engine_options, wall_timeout=wall_timeout, max_backoffs=max_backoffs
        )
        self._runner: asyncio.Runner | None = None
        self._engine: TestEngine | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<SyncTestEngine now={self.clock.now().isoformat()}>"

    def async_engine(self) -> TestEngine:
        """A new async :class:`TestEngine` with these settings, clock and
        workflows, to enter with ``async with`` on the caller's event loop."""
        return TestEngine(self._workflows, storage=self._storage, clock=self.clock, **self._options)

    def _loop(self) -> tuple[asyncio.Runner, TestEngine]:
        if self._closed:
            raise RuntimeError("this SyncTestEngine is closed")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "SyncTestEngine cannot be called from a running event loop (an async test); "
                "use `async with reflow_test_engine.async_engine() as t:` there"
            )
        if self._runner is None or self._engine is None:
            runner = asyncio.Runner()
            engine = self.async_engine()
            try:
                runner.run(engine.__aenter__())
            except BaseException:
                runner.close()
                raise
            self._runner, self._engine = runner, engine
        return self._runner, self._engine

    def call(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on this engine's event loop and return its
        result, for the async API of :attr:`engine`:
        ``t.call(t.engine.cancel(run_id))``."""
        runner, _ = self._loop()
        return runner.run(_wrap(awaitable))

    def close(self) -> None:
        """Hand back any run in flight, close the storage and the event loop."""
        if self._closed:
            return
        self._closed = True
        runner, engine, self._runner, self._engine = self._runner, self._engine, None, None
        if runner is None:
            return
        try:
            if engine is not None:
                runner.run(engine.aclose())
        finally:
            runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The engine (its methods are coroutines: run them with :meth:`call`)."""
        return self._loop()[1].engine

    @property
    def storage(self) -> Storage:
        """The storage the engine runs on."""
        return self._loop()[1].storage

    @property
    def now(self) -> datetime:
        """The virtual time."""
        return self.clock.now()

    def register(self, workflow: Workflow[Any, Any]) -> None:
        """Register a workflow (done by :meth:`run` for the one it runs)."""
        if self._engine is not None:
            self._engine.register(workflow)
        if workflow not in self._workflows:
            self._workflows.append(workflow)

    # The methods of TestEngine that drive runs, as plain calls. _sync keeps
    # each signature for type checkers, overloads included (run() of a typed
    # workflow is a RunResult of its output type), so none is written out here.

    run = _sync(TestEngine.run)
    """:meth:`TestEngine.run`: enqueue a run and drive it; registers the workflow."""
    enqueue = _sync(TestEngine.enqueue)
    """:meth:`TestEngine.enqueue`: enqueue a run without driving it."""
    drive = _sync(TestEngine.drive)
    """:meth:`TestEngine.drive`: drive until the run finishes or cannot go on."""
    send_event = _sync(TestEngine.send_event)
    """:meth:`TestEngine.send_event`: send an event to a run, then drive it."""
    advance = _sync(TestEngine.advance)
    """:meth:`TestEngine.advance`: move the clock, running what falls due."""
    advance_to = _sync(TestEngine.advance_to)
    """:meth:`TestEngine.advance_to`: move the clock to a moment, running what falls due."""
    get = _sync(TestEngine.get)
    """:meth:`TestEngine.get`: the run as it stands, without driving."""
    result = _sync(TestEngine.result)
    """:meth:`TestEngine.result`: drive the run, then return its output or raise."""
    schedule = _sync(TestEngine.schedule)
    """:meth:`TestEngine.schedule`: schedule a workflow; registers it."""


async def _wrap(awaitable: Awaitable[T]) -> T:
    return await awaitable
