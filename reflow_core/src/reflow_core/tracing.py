"""Where a run and a step execute, for tracing and logging plugins.

The engine opens a *scope* around each execution of a claimed run (from the
claim to the run's next stop: its end, a sleep, a wait, a lost lease) and
around each attempt of a step, a parallel branch or a map item. Plugins that
implement :class:`TracingSpecs` hooks return a context manager for a scope;
the engine enters it in the task that runs the run or the step, so what the
context manager sets in :mod:`contextvars` (an OpenTelemetry span made
current, say) is what the step's code sees, in a worker thread too for a
plain ``def`` step. An exception that ends a scope reaches the context
manager's ``__exit__``: a step attempt that raised, a cancellation, or the
engine's own signals (a run that parks to wait for its children), which
derive from :class:`BaseException` and are not failures.

:func:`current_step` says, from inside a step (and from anything it calls),
which run, step and attempt is executing: what
:class:`~reflow_core.logging.RunContextFilter` puts on log records.

Plugins also give the headers a run is created with
(``reflow_enqueue_headers``): what a tracing plugin hands on from the
enqueuer to the workers (W3C ``traceparent``), stored with the run as
plain text (:attr:`~reflow_core.storage.NewRun.headers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, cast

import pluggy

from .errors import ConfigError
from .hookspecs import PROJECT_NAME

__all__ = ["RunScope", "StepKind", "StepScope", "TracingSpecs", "current_step"]

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

StepKind = Literal["step", "branch", "item"]
"""A step of the chain, a branch of a ``.parallel`` group, an item of a ``.map``."""


@dataclass(frozen=True, slots=True)
class RunScope:
    """One execution of a claimed run: from its claim to its next stop."""

    run_id: str
    workflow: str
    attempt: int
    """How many times the run has been claimed, this claim included."""
    reclaimed: bool
    """Whether this claim took over a lapsed lease (its worker died)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """The headers the run was created with."""
    parent_id: str | None = None
    """For a child run: the run that started it."""


@dataclass(frozen=True, slots=True)
class StepScope:
    """One attempt of a step, a parallel branch or a map item."""

    run_id: str
    workflow: str
    step: str
    """Its name; a map item's is the map's name and its index (``resize[3]``)."""
    attempt: int
    kind: StepKind = "step"


_current_step: ContextVar[StepScope | None] = ContextVar("reflow_current_step", default=None)


def current_step() -> StepScope | None:
    """The step attempt executing in this task (or worker thread), or
    ``None`` outside any step."""
    return _current_step.get()


class TracingSpecs:
    """The hooks a tracing plugin may implement (added in 0.2)."""

    @hookspec
    def reflow_enqueue_headers(self, workflow: str) -> Mapping[str, str] | None:
        """Headers to store with a run of ``workflow`` being created:
        called by ``Engine.enqueue`` and ``ctx.start_child`` in the caller's
        context, so a tracing plugin returns the current trace context
        (``{"traceparent": ...}``). The headers of every plugin are merged;
        a name two give is the later plugin's."""

    @hookspec
    def reflow_run_scope(self, scope: RunScope) -> contextlib.AbstractContextManager[Any] | None:
        """A context manager to enter around this execution of a claimed run,
        or ``None``."""

    @hookspec
    def reflow_step_scope(self, scope: StepScope) -> contextlib.AbstractContextManager[Any] | None:
        """A context manager to enter around this attempt of a step, branch
        or item, or ``None``."""

    @hookspec
    def reflow_thread_scope(
        self, scope: StepScope | None
    ) -> contextlib.AbstractContextManager[Any] | None:
        """A context manager to enter in the worker thread around each call
        of a plain (``def``) step, branch or map item, or ``on_failure``
        handler, or ``None``. It is entered and exited in that thread, so it
        can look after what is per thread there (Django's database
        connections: see ``reflow_core.contrib.django``). ``scope`` is the
        step attempt, ``None`` for an ``on_failure`` handler."""

    @hookspec
    def reflow_claimed(self, workflows: list[str], runs: int, seconds: float) -> None:
        """A worker's claim for ``workflows`` took ``runs`` runs (maybe none)
        in ``seconds`` (the storage round trip)."""

    @hookspec
    def reflow_worker_started(self, engine: Any) -> None:
        """``engine``'s worker started (called in its event loop): a plugin
        may start a task of its own, reading ``engine.queue_stats()``, say."""

    @hookspec
    def reflow_worker_stopping(self, engine: Any) -> None:
        """``engine``'s worker is about to stop: end what ``reflow_worker_started`` began."""


class _StepScope:
    """Makes a step current and enters the plugins' context managers (a
    class, not a generator: it is entered for every step attempt)."""

    __slots__ = ("_inner", "_scope", "_token")

    def __init__(
        self, scope: StepScope, inner: contextlib.AbstractContextManager[Any] | None
    ) -> None:
        self._scope = scope
        self._inner = inner
        self._token: Token[StepScope | None] | None = None

    def __enter__(self) -> None:
        self._token = _current_step.set(self._scope)
        if self._inner is not None:
            try:
                self._inner.__enter__()
            except BaseException:
                _current_step.reset(self._token)
                raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            if self._inner is not None:
                self._inner.__exit__(kind, error, trace)  # never swallows the exception
        finally:
            if self._token is not None:
                _current_step.reset(self._token)


class _Together:
    """Several plugins' context managers, entered in order, exited in reverse."""

    __slots__ = ("_managers", "_stack")

    def __init__(self, managers: list[contextlib.AbstractContextManager[Any]]) -> None:
        self._managers = managers
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        with contextlib.ExitStack() as entering:
            for manager in self._managers:
                entering.enter_context(manager)
            self._stack = entering.pop_all()

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)  # never swallows the exception


_Impl = Callable[..., Any]


class Scopes:
    """An engine's tracing hooks, called only when a plugin implements them.

    The implementations are called directly (in pluggy's order, the last
    registered first), not through pluggy's hook caller: the step scope is
    opened for every step attempt."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._headers: list[_Impl] = []
        self._runs: list[_Impl] = []
        self._steps: list[_Impl] = []
        self._threads: list[_Impl] = []
        self._claims: list[_Impl] = []

    def refresh(self) -> None:
        """Note which hooks the registered plugins implement."""
        hook = self._pm.hook

        def impls(caller: Any) -> list[_Impl]:
            return [impl.function for impl in reversed(caller.get_hookimpls())]

        self._headers = impls(hook.reflow_enqueue_headers)
        self._runs = impls(hook.reflow_run_scope)
        self._steps = impls(hook.reflow_step_scope)
        self._threads = impls(hook.reflow_thread_scope)
        self._claims = impls(hook.reflow_claimed)

    def claimed(self, workflows: list[str], runs: int, seconds: float) -> None:
        """Tell the plugins about a claim."""
        for impl in self._claims:
            impl(workflows=workflows, runs=runs, seconds=seconds)

    def worker_started(self, engine: Any) -> None:
        self._pm.hook.reflow_worker_started(engine=engine)

    def worker_stopping(self, engine: Any) -> None:
        self._pm.hook.reflow_worker_stopping(engine=engine)

    @property
    def adds_headers(self) -> bool:
        """Whether a plugin gives headers to the runs being created."""
        return bool(self._headers)

    def headers(self, workflow: str, given: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers of a run of ``workflow`` being created: the plugins',
        then ``given`` over them."""
        merged: dict[str, str] = {}
        # pluggy's order is the last registered first; the later plugin wins
        for impl in reversed(self._headers):
            found = impl(workflow=workflow)
            if found is None:
                continue
            if not isinstance(found, Mapping):
                raise ConfigError(
                    f"a reflow_enqueue_headers hook returned {type(found).__name__}, "
                    "not a mapping of str to str",
                    option="headers",
                )
            merged.update(found)
        if given:
            merged.update(given)
        return merged

    def _managers(
        self, impls: list[_Impl], **kwargs: Any
    ) -> contextlib.AbstractContextManager[Any] | None:
        managers = [m for m in (impl(**kwargs) for impl in impls) if m is not None]
        if not managers:
            return None
        if len(managers) == 1:
            return cast("contextlib.AbstractContextManager[Any]", managers[0])
        return _Together(managers)

    def run(self, scope: RunScope) -> contextlib.AbstractContextManager[Any]:
        """The plugins' context managers for a run's execution, entered together."""
        if not self._runs:
            return contextlib.nullcontext()
        return self._managers(self._runs, scope=scope) or contextlib.nullcontext()

    def in_thread(self, function: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``function`` as a worker thread calls it: inside the plugins'
        thread scopes, when any plugin has one."""
        threads = self._threads
        if not threads:
            return function

        def call(arg: Any) -> Any:
            with self._managers(threads, scope=_current_step.get()) or contextlib.nullcontext():
                return function(arg)

        return call

    def step(self, scope: StepScope) -> contextlib.AbstractContextManager[Any]:
        """Make ``scope`` the current step and enter every plugin's context
        manager for it."""
        steps = self._steps
        if not steps:
            return _StepScope(scope, None)
        if len(steps) == 1:  # the usual case, without the list
            return _StepScope(scope, steps[0](scope=scope))
        return _StepScope(scope, self._managers(steps, scope=scope))
