"""The blocking client: the engine's client API as plain calls, for code that
is not a coroutine (Django and Flask views, scripts, a REPL).

A :class:`SyncClient` runs an :class:`~reflow_core.engine.Engine` without a
worker on an event loop of its own, in one background thread per process,
and hands every call to that loop. So:

- any number of threads may call one client at once (a WSGI server's worker
  threads): the calls run concurrently on the loop, on one storage and its
  one connection pool;
- after ``fork()`` (gunicorn's pre-fork workers, ``multiprocessing``) the
  child builds its own loop, storage and connections at its first call, and
  never touches the parent's: it neither uses nor closes them, since closing
  a connection that the parent still uses would end it for the parent too;
- at interpreter exit every open client is closed (its connections handed
  back to the server), as :meth:`SyncClient.close` does.

Nothing connects before the first call, so a client made at import time, in
a server's master process before it forks, costs nothing there.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar, cast

from ._durations import Duration, to_seconds
from .engine import Engine
from .errors import ConfigError, EngineClosedError
from .events import ErrorCallback
from .registry import open_storage
from .storage import Storage
from .workflow import Workflow

__all__ = ["SyncClient"]

logger = logging.getLogger("reflow.sync")

P = ParamSpec("P")
T = TypeVar("T")

StorageFactory = Callable[[], Storage]
"""A function building a new, unconnected storage: called once per process."""


@dataclass
class _Loop:
    """One process's event loop thread and the engine on it."""

    pid: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    engine: Engine | None = None
    calls: set[concurrent.futures.Future[Any]] = field(default_factory=set)
    """The outcomes of the calls handed to the loop and not finished yet."""


_clients: weakref.WeakSet[SyncClient] = weakref.WeakSet()
"""Every client of this process that was not closed: closed at exit, reset
in a forked child."""

_abandoned: list[_Loop] = []
"""What forked children inherited from their parent: kept referenced, and so
never finalized, because closing it (a connection, a loop's selector) from
the child could end it for the parent that still uses it."""


def _sync(
    method: Callable[Concatenate[Engine, P], Awaitable[T]],
) -> Callable[Concatenate[SyncClient, P], T]:
    """The blocking form of the coroutine method ``method`` of
    :class:`Engine`: it runs that method of the client's engine on the
    client's loop and waits for its result in the calling thread. Type
    checkers keep the whole signature, and ``help()`` shows the engine
    method's documentation."""
    name = method.__name__

    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        def start(engine: Engine) -> Coroutine[Any, Any, T]:
            bound = cast(Callable[P, Coroutine[Any, Any, T]], getattr(engine, name))
            return bound(*args, **kwargs)

        return self._call(name, start)

    functools.update_wrapper(call, method)
    call.__qualname__ = f"SyncClient.{name}"
    call.__module__ = __name__
    call.__doc__ = (
        f"The blocking form of :meth:`Engine.{name} <reflow_core.engine.Engine.{name}>`: "
        "the same arguments, result and errors.\n\n" + (method.__doc__ or "")
    )
    return call


class SyncClient:
    """The client API of :class:`~reflow_core.engine.Engine` (enqueue,
    inspect, cancel, resume, send events, wait for results, schedule) as
    blocking calls, safe from any number of threads and across ``fork()``.

    ``storage`` is a storage URL (``"postgresql://..."``, ``"sqlite:///app.db"``)
    or a function returning a new, unconnected storage; each process calls
    it once, at its first call. ``workflows`` are registered as on an
    engine: what is enqueued, resumed or sent an event by name must be
    registered, and a workflow object may always be passed instead. The
    other options mean what they mean for :class:`Engine`.

    The client runs no worker: runs are executed by ``reflow worker`` (or
    any engine started as a worker) on the same storage. Make one client
    per process, at import time if convenient (nothing connects before the
    first call), and share it; :meth:`close` it when done, or let the
    interpreter's exit close it. ``with SyncClient(...) as client:`` closes
    it at the end of the block.

    Each call blocks the calling thread until the engine's coroutine has
    finished on the client's loop; ``result`` and ``wait`` without a
    ``timeout`` block until the run finishes. Calls made from a step, a
    hook or any other code on the client's own loop thread raise
    :class:`RuntimeError` (they would wait for themselves); async code
    should use an :class:`Engine`.
    """

    def __init__(
        self,
        storage: str | StorageFactory,
        *,
        workflows: Iterable[Workflow[Any, Any]] = (),
        poll_interval: Duration = "1s",
        max_buffered_events: int | None = 1000,
        plugins: Iterable[object] = (),
        load_entry_points: bool = True,
        on_error: ErrorCallback | None = None,
        close_timeout: Duration = "5s",
    ) -> None:
        if isinstance(storage, str):
            # Parsed now, so a wrong URL or a missing backend fails here and
            # not at the first request; the storage itself is built per process.
            open_storage(storage)
        elif isinstance(storage, Storage) or not callable(storage):
            raise ConfigError(
                "storage must be a URL or a function returning a new storage (each process "
                f"builds its own), got a {type(storage).__name__}",
                option="storage",
            )
        self._storage = storage
        self._workflows: list[Workflow[Any, Any]] = []
        for wf in workflows:
            self._add(wf)
        self._options: dict[str, Any] = {
            "poll_interval": poll_interval,
            "max_buffered_events": max_buffered_events,
            "plugins": tuple(plugins),
            "load_entry_points": load_entry_points,
            "on_error": on_error,
        }
        self._close_timeout = to_seconds(close_timeout, option="close_timeout")
        self._lock = threading.Lock()
        self._state: _Loop | None = None
        self._closed = False
        _clients.add(self)

    def __repr__(self) -> str:
        where = (
            f"{self._storage.split('://', 1)[0]}://"
            if isinstance(self._storage, str)
            else "storage"
        )
        state = "closed" if self._closed else "open"
        return f"<SyncClient {where} {state} workflows={[wf.name for wf in self._workflows]}>"

    # -- the loop ------------------------------------------------------------

    def _add(self, wf: Workflow[Any, Any]) -> None:
        if not isinstance(wf, Workflow):
            raise ConfigError(
                f"workflows must be built with workflow(), got {type(wf).__name__}",
                option="workflows",
            )
        if wf not in self._workflows:
            self._workflows.append(wf)

    def _build(self) -> Engine:
        storage = open_storage(self._storage) if isinstance(self._storage, str) else self._storage()
        if not isinstance(storage, Storage):
            raise ConfigError(
                f"the storage function returned a {type(storage).__name__}, not a Storage",
                option="storage",
            )
        return Engine(storage=storage, workflows=self._workflows, worker=False, **self._options)

    def _loop(self, operation: str) -> _Loop:
        """This process's loop, started (and the engine built) at the first
        call; a child of ``fork()`` leaves its parent's alone and starts its own."""
        if self._closed:
            raise EngineClosedError(operation, client=True)
        state = self._state
        if state is not None and state.pid == os.getpid() and state.engine is not None:
            return state
        with self._lock:
            if self._closed:
                raise EngineClosedError(operation, client=True)
            state = self._state
            if state is not None and state.pid != os.getpid():
                # Forked without the at-fork hook (a fork() that bypassed
                # Python's): the loop and its connections are the parent's.
                _abandoned.append(state)
                state = self._state = None
            if state is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_serve, args=(loop,), name="reflow-sync-client", daemon=True
                )
                thread.start()
                state = self._state = _Loop(os.getpid(), loop, thread)
            if state.engine is None:
                state.engine = _submit(state, _build_on_loop(self._build)).result()
            return state

    def _call(self, operation: str, start: Callable[[Engine], Coroutine[Any, Any, T]]) -> T:
        state = self._loop(operation)
        if threading.current_thread() is state.thread:
            raise RuntimeError(
                f"SyncClient.{operation}() was called on the client's own event loop thread "
                "(from a step, a hook or an on_error callback it runs), where it would wait "
                "for itself: use an Engine and await it there"
            )
        assert state.engine is not None
        try:
            future = _submit(state, start(state.engine))
        except RuntimeError:  # the loop was closed meanwhile
            if self._closed:
                raise EngineClosedError(operation, client=True) from None
            raise
        try:
            return future.result()
        except BaseException:
            # Interrupted (KeyboardInterrupt) or failed: stop the coroutine
            # if it still runs, so nothing goes on in the background.
            future.cancel()
            raise

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the storage (its connections go back to the server) and stop
        the client's loop thread. Idempotent; later calls raise
        :class:`~reflow_core.errors.EngineClosedError`. A call still running
        in another thread ends with that error too. Runs are not affected:
        they are executed by workers, not by the client."""
        state = self._state
        if state is not None and threading.current_thread() is state.thread:
            raise RuntimeError(
                "SyncClient.close() was called on the client's own event loop thread, "
                "where it would wait for itself"
            )
        with self._lock:
            if self._closed:
                return
            self._closed = True
            state, self._state = self._state, None
        _clients.discard(self)
        if state is None or state.pid != os.getpid():
            if state is not None:
                _abandoned.append(state)
            return
        try:
            future = _submit(state, _shut_down(state.engine))
            try:
                future.result(self._close_timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                logger.warning(
                    "SyncClient: closing the storage took longer than %gs; "
                    "its connections are dropped",
                    self._close_timeout,
                )
        finally:
            state.loop.call_soon_threadsafe(state.loop.stop)
            state.thread.join(self._close_timeout)
            if not state.thread.is_alive():
                state.loop.close()
            # A call handed over as the loop stopped never ran: end its wait.
            for call in list(state.calls):
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    call.set_exception(EngineClosedError("call", client=True))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's loop, engine and
        connections, without closing them, and the lock another thread of
        the parent may have held."""
        self._lock = threading.Lock()
        if self._state is not None:
            _abandoned.append(self._state)
            self._state = None

    # -- configuration -----------------------------------------------------------

    def register(self, workflow: Workflow[Any, Any]) -> None:
        """Register a workflow, as :meth:`Engine.register
        <reflow_core.engine.Engine.register>` does: it can then be enqueued,
        resumed and sent events by name."""
        # Under the lock that building the engine holds: the engine is
        # either built already (and told here) or built with this workflow.
        with self._lock:
            self._add(workflow)
            state = self._state
        if state is not None and state.engine is not None and state.pid == os.getpid():
            engine = state.engine

            async def register() -> None:
                engine.register(workflow)

            self._call("register", lambda _: register())

    @property
    def workflows(self) -> list[Workflow[Any, Any]]:
        """The registered workflows."""
        return list(self._workflows)

    # -- the engine's client API, blocking ---------------------------------------

    enqueue = _sync(Engine.enqueue)
    """Create a run: :meth:`Engine.enqueue <reflow_core.engine.Engine.enqueue>`, blocking."""
    enqueue_many = _sync(Engine.enqueue_many)
    """Create a run per item in one round trip:
    :meth:`Engine.enqueue_many <reflow_core.engine.Engine.enqueue_many>`, blocking."""
    get_run = _sync(Engine.get_run)
    """The run, or ``None``:
    :meth:`Engine.get_run <reflow_core.engine.Engine.get_run>`, blocking."""
    get_run_status = _sync(Engine.get_run_status)
    """The run with its steps:
    :meth:`Engine.get_run_status <reflow_core.engine.Engine.get_run_status>`, blocking."""
    list_runs = _sync(Engine.list_runs)
    """A page of runs, newest first:
    :meth:`Engine.list_runs <reflow_core.engine.Engine.list_runs>`, blocking."""
    cancel = _sync(Engine.cancel)
    """Cancel a run: :meth:`Engine.cancel <reflow_core.engine.Engine.cancel>`, blocking."""
    resume = _sync(Engine.resume)
    """Queue a failed or cancelled run again:
    :meth:`Engine.resume <reflow_core.engine.Engine.resume>`, blocking."""
    release = _sync(Engine.release)
    """Let a held run go on:
    :meth:`Engine.release <reflow_core.engine.Engine.release>`, blocking."""
    send_event = _sync(Engine.send_event)
    """Send an event to a run:
    :meth:`Engine.send_event <reflow_core.engine.Engine.send_event>`, blocking."""
    result = _sync(Engine.result)
    """Wait for a run's output:
    :meth:`Engine.result <reflow_core.engine.Engine.result>`, blocking the calling thread."""
    wait = _sync(Engine.wait)
    """Wait for runs to finish:
    :meth:`Engine.wait <reflow_core.engine.Engine.wait>`, blocking the calling thread."""
    schedule = _sync(Engine.schedule)
    """Store a schedule: :meth:`Engine.schedule <reflow_core.engine.Engine.schedule>`, blocking."""
    unschedule = _sync(Engine.unschedule)
    """Delete a schedule:
    :meth:`Engine.unschedule <reflow_core.engine.Engine.unschedule>`, blocking."""
    list_schedules = _sync(Engine.list_schedules)
    """Every schedule:
    :meth:`Engine.list_schedules <reflow_core.engine.Engine.list_schedules>`, blocking."""
    pause_schedule = _sync(Engine.pause_schedule)
    """Pause a schedule:
    :meth:`Engine.pause_schedule <reflow_core.engine.Engine.pause_schedule>`, blocking."""
    resume_schedule = _sync(Engine.resume_schedule)
    """Resume a schedule:
    :meth:`Engine.resume_schedule <reflow_core.engine.Engine.resume_schedule>`, blocking."""
    list_workers = _sync(Engine.list_workers)
    """The live workers:
    :meth:`Engine.list_workers <reflow_core.engine.Engine.list_workers>`, blocking."""
    queue_stats = _sync(Engine.queue_stats)
    """Unfinished runs by workflow and status:
    :meth:`Engine.queue_stats <reflow_core.engine.Engine.queue_stats>`, blocking."""


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _submit(state: _Loop, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Run ``coro`` as a task on ``loop`` (another thread's) in a copy of
    the calling thread's context, so what the caller's context holds (the
    current trace span, for the tracing plugins' headers) is seen by the
    engine; the returned future has its outcome, and cancelling it cancels
    the task."""
    loop = state.loop
    context = contextvars.copy_context()
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
    state.calls.add(outcome)
    outcome.add_done_callback(state.calls.discard)

    def start() -> None:
        if outcome.cancelled():
            coro.close()
            return
        task = loop.create_task(coro, context=context)

        def copy(done: asyncio.Task[T]) -> None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                if done.cancelled():
                    outcome.cancel()
                elif (exc := done.exception()) is not None:
                    outcome.set_exception(exc)
                else:
                    outcome.set_result(done.result())

        def cancel(future: concurrent.futures.Future[T]) -> None:
            if future.cancelled() and not task.done():
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(task.cancel)

        task.add_done_callback(copy)
        outcome.add_done_callback(cancel)

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:
        state.calls.discard(outcome)
        coro.close()
        raise
    return outcome


async def _shut_down(engine: Engine | None) -> None:
    """Close the engine, then end what is left on the loop as
    :func:`asyncio.run` does at its end: every other task cancelled and
    awaited (a storage's background reader that its close only cancelled),
    async generators finalized, the default executor's threads joined."""
    try:
        if engine is not None:
            await engine.close()
    finally:
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()


async def _build_on_loop(build: Callable[[], Engine]) -> Engine:
    # Built on the loop that will run it, so nothing in it is bound to
    # another one.
    return build()


def _reset_after_fork() -> None:
    for client in list(_clients):
        client._after_fork()


def _close_at_exit() -> None:
    # close() leaves a parent's loop alone in a forked child.
    for client in list(_clients):
        with contextlib.suppress(Exception):
            client.close()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_close_at_exit)
