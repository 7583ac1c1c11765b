"""The workflow builder: ``workflow(name, input=...)`` and ``.step(...)``.

A :class:`Workflow` is immutable: every ``.step`` returns a new workflow, so a
partly built chain can be shared and extended safely. It is generic in its
input type and in the type of the last step's output, so a type checker
follows ``ctx.prev`` from one step to the next::

    wf = (
        workflow("order", input=Order)          # Workflow[Order, Order]
        .step("charge", charge)                 # charge(ctx: StepContext[Order, Order]) -> Charge
        .step("ship", ship)                     # ship(ctx: StepContext[Order, Charge]) -> ...
    )
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeAlias, TypeVar, cast, overload

from ._durations import Duration, to_seconds
from ._typecheck import TypeMismatch, is_typeddict_class, type_validator
from .adapter import check_text
from .codec import WaitTimedOut
from .context import FailureContext, StepContext
from .errors import ConfigError, DuplicateStepError, ValidationError
from .limits import FlowControl, Limit, Rate, check_priority, parse_rate
from .retry import NO_RETRY, Retry
from .storage import MAX_VERSION

__all__ = [
    "Branch",
    "Node",
    "ParallelDefinition",
    "SleepDefinition",
    "StepDefinition",
    "WaitDefinition",
    "Workflow",
    "workflow",
]

T = TypeVar("T")
InputT = TypeVar("InputT")
PrevT = TypeVar("PrevT")
OutT = TypeVar("OutT")
ItemT = TypeVar("ItemT")
T_co = TypeVar("T_co", covariant=True)


class SupportsValidatePython(Protocol[T_co]):
    """Anything with pydantic ``TypeAdapter``'s ``validate_python`` method."""

    def validate_python(self, obj: Any, /) -> T_co: ...


Validator = Callable[[Any], Any]
Predicate = Callable[[StepContext[Any, Any]], "bool | Awaitable[bool]"]
WhenPredicate: TypeAlias = Callable[[StepContext[InputT, PrevT]], "bool | Awaitable[bool]"]
"""A step's ``when=``: a plain or ``async`` function of the context returning a bool."""
Policy: TypeAlias = Literal["hold", "fail", "continue", "old_version"]
"""What a definition does with a run it cannot continue as the run stands
(``workflow(..., on_incompatible=...)``); see ``docs/versions.md``."""
POLICIES: tuple[str, ...] = ("hold", "fail", "continue", "old_version")
RESERVED_PREFIX = "reflow:"
"""Step, sleep and wait names may not start with this: the engine keeps its
own records of a run (decisions, owed handlers) under such names."""
FailureHandler = Callable[[FailureContext[Any]], Any]


@dataclass(frozen=True, slots=True)
class StepDefinition:
    """One step of a workflow (or one branch of a parallel group), as declared."""

    name: str
    handler: Callable[[StepContext[Any, Any]], Any]
    is_async: bool
    retry: Retry
    timeout: float | None
    when: Predicate | None = None
    was: tuple[str, ...] = ()
    """Earlier names of the step (``was=``): a run that saved its result
    under one of them is past this step."""
    child: str | None = None
    """For a ``.child()`` step: the name of the workflow it runs."""


@dataclass(frozen=True, slots=True)
class SleepDefinition:
    """A durable sleep: the run is stored as sleeping, no process waits."""

    name: str
    seconds: float
    was: tuple[str, ...] = ()
    """Earlier names of the sleep (``was=``)."""


@dataclass(frozen=True, slots=True)
class WaitDefinition:
    """A wait for the event ``name``, whose validated payload becomes ``prev``."""

    name: str
    validator: Validator
    timeout: float | None
    continue_on_timeout: bool = False
    """On timeout, go on with a :class:`~reflow_core.codec.WaitTimedOut` instead of failing."""
    was: tuple[str, ...] = ()
    """Earlier names of the wait (``was=``); the event it waits for is its name."""

    def validate(self, workflow: str, raw: Any) -> Any:
        return _validate(
            self.validator, raw, f"event {self.name!r} of workflow {workflow!r}", workflow
        )


@dataclass(frozen=True, slots=True)
class ParallelDefinition:
    """Branches that run concurrently; ``prev`` after it is ``{branch: output}``."""

    name: str
    branches: tuple[StepDefinition, ...]
    was: tuple[str, ...] = ()
    """Earlier names of the group (``was=``); its branches have their own."""


@dataclass(frozen=True, slots=True)
class MapDefinition:
    """A fan-out: ``item`` runs once per element of the list ``items`` returns,
    each element saved as its own step ``name[i]``; ``prev`` after it is the
    list of results, in the order of the items."""

    name: str
    items: Callable[[StepContext[Any, Any]], Any]
    item: StepDefinition
    """The handler, retry and timeout of every item (its name is the map's)."""
    concurrency: int
    max_items: int
    was: tuple[str, ...] = ()
    """Earlier names of the map (``was=``): items saved as ``old[i]`` count."""

    def item_name(self, index: int) -> str:
        return f"{self.name}[{index}]"


MAX_MAP_ITEMS = 10_000
"""The default bound on a map's items. Every item is a saved step of the run,
and a claim reads all of a run's saved steps, so a map of more items belongs
in several runs."""


Node = StepDefinition | SleepDefinition | WaitDefinition | ParallelDefinition | MapDefinition
"""Anything a workflow chains."""


@dataclass(frozen=True, slots=True)
class Branch:
    """A parallel branch with its own retry policy and timeout::

    .parallel({"email": send_email, "invoice": Branch(make_invoice, retry=Retry(max_attempts=3))})
    """

    handler: Callable[[StepContext[Any, Any]], Any]
    retry: Retry | None = None
    timeout: Duration | None = None
    was: str | Iterable[str] | None = None
    """Earlier names of the branch, as ``.step(was=...)`` takes them."""


def _is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


def _pydantic_issues(exc: Exception) -> list[Mapping[str, Any]] | None:
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors):
        try:
            return [dict(e) for e in errors(include_url=False)]
        except TypeError:
            return [dict(e) for e in errors()]
    return None


def _make_validator(schema: object, name: str, root: str = "input") -> Validator:
    """Turn a pydantic model, dataclass, TypedDict, TypeAdapter or callable into one function.

    ``root`` names the value in the path of a type mismatch (``input.items[2]``).
    """
    if schema is None:
        return lambda raw: raw
    validate_python = getattr(schema, "validate_python", None)
    if callable(validate_python) and not isinstance(schema, type):
        return cast(Validator, validate_python)
    if isinstance(schema, type):
        model_validate = getattr(schema, "model_validate", None)
        if callable(model_validate):
            return cast(Validator, model_validate)
        if dataclasses.is_dataclass(schema):
            try:
                from pydantic import TypeAdapter
            except ImportError:
                return _type_validator(schema, name, root)
            return cast(Validator, TypeAdapter(schema).validate_python)
        if is_typeddict_class(schema):
            return _type_validator(schema, name, root)
    if callable(schema):
        return cast(Validator, schema)
    raise ConfigError(
        f"workflow {name!r}: input= must be a pydantic model, a dataclass, a TypeAdapter or a "
        f"callable, not {type(schema).__name__}",
        option="input",
    )


def _type_validator(schema: type, name: str, root: str) -> Validator:
    option = "input" if root == "input" else "schema"
    return type_validator(schema, root=root, context=f"workflow {name!r}", option=option)


def _validate(validator: Validator, raw: Any, what: str, workflow: str) -> Any:
    try:
        return validator(raw)
    except ValidationError:
        raise
    except Exception as exc:
        issues = _pydantic_issues(exc)
        if issues is None and isinstance(exc, TypeMismatch):
            issues = [exc.issue]
        if issues is None:
            issues = [{"type": type(exc).__name__, "msg": str(exc)}]
        raise ValidationError(f"invalid {what}: {exc}", workflow=workflow, issues=issues) from exc


def _define_step(
    workflow: str,
    name: str,
    handler: object,
    retry: object,
    timeout: Duration | None,
    when: object = None,
) -> StepDefinition:
    if not callable(handler):
        raise ConfigError(
            f"workflow {workflow!r}, step {name!r}: handler must be callable", option="handler"
        )
    if retry is not None and not isinstance(retry, Retry):
        raise ConfigError(
            f"workflow {workflow!r}, step {name!r}: retry must be a Retry", option="retry"
        )
    if when is not None and not callable(when):
        raise ConfigError(
            f"workflow {workflow!r}, step {name!r}: when must be callable", option="when"
        )
    seconds = (
        None
        if timeout is None
        else to_seconds(timeout, option=f"step {name!r} timeout", allow_zero=False)
    )
    return StepDefinition(
        name=name,
        handler=cast(Callable[[StepContext[Any, Any]], Any], handler),
        is_async=_is_async_callable(handler),
        retry=retry or NO_RETRY,
        timeout=seconds,
        when=cast("Predicate | None", when),
    )


def to_plain_input(value: Any) -> Any:
    """A pydantic model or dataclass instance given as input, as plain data."""
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


class Workflow(Generic[InputT, PrevT]):
    """An immutable, named chain of steps. Build one with :func:`workflow`."""

    __slots__ = (
        "_fingerprint",
        "_flow",
        "_name",
        "_on_failure",
        "_on_incompatible",
        "_schema",
        "_steps",
        "_timeout",
        "_validator",
        "_version",
    )

    def __init__(
        self,
        name: str,
        schema: object,
        validator: Validator,
        steps: tuple[Node, ...] = (),
        on_failure: FailureHandler | None = None,
        timeout: float | None = None,
        flow: FlowControl | None = None,
        version: int = 1,
        on_incompatible: Policy | None = None,
    ) -> None:
        self._name = name
        self._schema = schema
        self._validator = validator
        self._steps = steps
        self._on_failure = on_failure
        self._timeout = timeout
        self._flow = flow or FlowControl()
        self._version = version
        self._on_incompatible = on_incompatible
        self._fingerprint: str | None = None

    @property
    def version(self) -> int:
        """The version of this definition (``workflow(..., version=...)``),
        recorded on every run it enqueues. A worker takes runs of the
        versions it registers; see ``docs/versions.md``."""
        return self._version

    @property
    def on_incompatible(self) -> Policy | None:
        """What happens to a run of another version (or an older shape) that
        this definition cannot continue as it stands: ``"hold"``, ``"fail"``,
        ``"continue"``, ``"old_version"``, or ``None`` (hold, and
        ``reflow deploy-check`` reports it as unplanned)."""
        return self._on_incompatible

    @property
    def fingerprint(self) -> str:
        """A stable hash of the workflow's shape: its units in order (steps,
        sleeps, waits, parallel groups with their branches, maps, child
        steps with the workflow they run), by kind and name. Handlers,
        retries, timeouts and aliases do not count. Recorded on every run."""
        if self._fingerprint is None:
            from .versions import fingerprint_of

            self._fingerprint = fingerprint_of(self._steps)
        return self._fingerprint

    @property
    def flow(self) -> FlowControl:
        """Its flow control: the default priority of its runs, its
        ``max_running``, its ``rate`` and its :class:`~reflow_core.limits.Limit`."""
        return self._flow

    @property
    def timeout(self) -> float | None:
        """Seconds every run has from its creation to finish (``workflow(...,
        timeout=...)``), or ``None``."""
        return self._timeout

    @property
    def name(self) -> str:
        """The workflow's name, unique per engine."""
        return self._name

    @property
    def steps(self) -> tuple[Node, ...]:
        """The steps, sleeps, waits and parallel groups, in order."""
        return self._steps

    @property
    def failure_handler(self) -> FailureHandler | None:
        """The handler given to :meth:`on_failure`, if any."""
        return self._on_failure

    @property
    def events(self) -> tuple[str, ...]:
        """The names of the events this workflow waits for."""
        return tuple(n.name for n in self._steps if isinstance(n, WaitDefinition))

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self._steps)
        version = "" if self._version == 1 else f" v{self._version}"
        return f"<Workflow {self._name!r}{version} [{names}]>"

    def validate_input(self, raw: Any) -> InputT:
        """Validate raw input, raising :class:`~reflow_core.errors.ValidationError`."""
        return cast(
            InputT,
            _validate(self._validator, raw, f"input for workflow {self._name!r}", self._name),
        )

    def _taken(self) -> set[str]:
        names = set()
        for node in self._steps:
            names.add(node.name)
            names.update(node.was)
            if isinstance(node, ParallelDefinition):
                for branch in node.branches:
                    names.add(branch.name)
                    names.update(branch.was)
        return names

    def _aliases(self, name: str, was: object, taken: set[str] | None = None) -> tuple[str, ...]:
        """``was=`` as a tuple of names, each checked as a step name is and
        free in this workflow (not a name or alias of another unit)."""
        if was is None:
            return ()
        items = [was] if isinstance(was, str) else was
        if not isinstance(items, Iterable):
            raise ConfigError(
                f"workflow {self._name!r}, step {name!r}: was must be a name or a list of names, "
                f"not {type(was).__name__}",
                option="was",
            )
        names: list[str] = []
        used = self._taken() if taken is None else taken
        for item in items:
            if item == name or item in names:
                raise ConfigError(
                    f"workflow {self._name!r}, step {name!r}: was={item!r} repeats a name",
                    option="was",
                )
            try:
                names.append(self._check_name(item, used))
            except DuplicateStepError:
                raise ConfigError(
                    f"workflow {self._name!r}, step {name!r}: was={item!r} is already the name "
                    "or an earlier name of another step",
                    option="was",
                ) from None
            except ConfigError as exc:
                raise ConfigError(f"{exc.message} (in was=)", option="was") from None
        return tuple(names)

    def _check_item_names(self, name: str, *, is_map: bool) -> None:
        """A map saves its items as ``name[0]``, ``name[1]``...: no other name
        may look like one of them."""
        maps = [n.name for n in self._steps if isinstance(n, MapDefinition)]
        if any(name.startswith(m + "[") for m in maps):
            raise DuplicateStepError(self._name, name)
        if is_map and any(t.startswith(name + "[") for t in self._taken()):
            raise DuplicateStepError(self._name, name)

    def _check_name(self, name: object, taken: set[str] | None = None) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"workflow {self._name!r}: step names must be non-empty strings, got {name!r}",
                option="name",
            )
        try:
            check_text(name, "step name")
        except ConfigError as exc:
            raise ConfigError(f"workflow {self._name!r}: {exc.message}", option="name") from None
        if name.startswith(RESERVED_PREFIX):
            raise ConfigError(
                f"workflow {self._name!r}: step name {name!r} starts with {RESERVED_PREFIX!r}, "
                "which is reserved for the engine's own records",
                option="name",
            )
        if name in (self._taken() if taken is None else taken):
            raise DuplicateStepError(self._name, name)
        self._check_item_names(name, is_map=False)
        return name

    def _then(self, node: Node) -> Workflow[InputT, Any]:
        return Workflow(
            self._name,
            self._schema,
            self._validator,
            (*self._steps, node),
            self._on_failure,
            self._timeout,
            self._flow,
            self._version,
            self._on_incompatible,
        )

    @overload
    def step(
        self,
        name: str,
        handler: Callable[[StepContext[InputT, PrevT]], Awaitable[OutT]],
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        when: None = None,
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, OutT]: ...

    @overload
    def step(
        self,
        name: str,
        handler: Callable[[StepContext[InputT, PrevT]], Awaitable[OutT]],
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        when: WhenPredicate[InputT, PrevT],
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, OutT | PrevT]: ...

    @overload
    def step(
        self,
        name: str,
        handler: Callable[[StepContext[InputT, PrevT]], OutT],
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        when: None = None,
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, OutT]: ...

    @overload
    def step(
        self,
        name: str,
        handler: Callable[[StepContext[InputT, PrevT]], OutT],
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        when: WhenPredicate[InputT, PrevT],
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, OutT | PrevT]: ...

    def step(
        self,
        name: str,
        handler: Callable[[StepContext[InputT, PrevT]], Any],
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        when: WhenPredicate[InputT, PrevT] | None = None,
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, Any]:
        """Append a step and return the new workflow.

        ``handler`` is an ``async def`` or a plain ``def`` (run in a worker
        thread) taking a :class:`StepContext`; its return value must be plain
        data. ``retry`` defaults to a single attempt; ``timeout`` bounds each
        attempt.

        ``when`` is a predicate on the context (a plain or ``async``
        function returning a bool), decided once per run: the decision is
        saved before the step runs, so a worker that dies after deciding
        never decides again on replay. If it is false the step is skipped
        and ``prev`` passes through unchanged, so after a conditional step a
        type checker sees ``prev`` as the step's output or its input
        (``OutT | PrevT``). Raises
        :class:`~reflow_core.errors.DuplicateStepError` if the name is taken,
        and :class:`~reflow_core.errors.ConfigError` for a name starting with
        the reserved ``reflow:``.

        ``was`` gives the step's earlier names when it is renamed: a run
        that saved its result under one of them is past this step, so it
        is not run again (see ``docs/versions.md``).
        """
        self._check_name(name)
        aliases = self._aliases(name, was)
        step = _define_step(self._name, name, handler, retry, timeout, when)
        return self._then(dataclasses.replace(step, was=aliases))

    def sleep(
        self, name: str, duration: Duration, *, was: str | Iterable[str] | None = None
    ) -> Workflow[InputT, PrevT]:
        """Append a durable sleep of ``duration``; ``prev`` passes through.

        The run is stored as sleeping with its lease released, so no process
        stays busy; any engine resumes it once due. The wake-up time is fixed
        the first time the run reaches the sleep. ``was`` gives earlier
        names, as :meth:`step` takes them.
        """
        self._check_name(name)
        aliases = self._aliases(name, was)
        seconds = to_seconds(duration, option=f"sleep {name!r} duration")
        return self._then(SleepDefinition(name, seconds, aliases))

    @overload
    def wait_for_event(
        self,
        name: str,
        *,
        schema: None = None,
        timeout: Duration | None = None,
        on_timeout: Literal["fail", "continue"] = "fail",
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, Any]: ...

    @overload
    def wait_for_event(
        self,
        name: str,
        *,
        schema: type[T] | SupportsValidatePython[T] | Callable[[Any], T],
        timeout: Duration | None = None,
        on_timeout: Literal["fail"] = "fail",
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, T]: ...

    @overload
    def wait_for_event(
        self,
        name: str,
        *,
        schema: type[T] | SupportsValidatePython[T] | Callable[[Any], T],
        timeout: Duration,
        on_timeout: Literal["continue"],
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, T | WaitTimedOut]: ...

    def wait_for_event(
        self,
        name: str,
        *,
        schema: object = None,
        timeout: Duration | None = None,
        on_timeout: Literal["fail", "continue"] = "fail",
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, Any]:
        """Append a wait for the event ``name`` (sent with ``Engine.send_event``).

        The run is stored as waiting with its lease released. An event sent
        before the run gets here is kept and consumed when it does. The
        payload is validated by ``schema`` (as workflow input is) and becomes
        the next step's ``prev``. Without an event before ``timeout``, the run
        fails with :class:`~reflow_core.errors.WaitTimeoutError`; with
        ``on_timeout="continue"`` it goes on instead, and the next step's
        ``prev`` is a :class:`~reflow_core.codec.WaitTimedOut` (saved as the
        wait's result, so a replay sees it too).
        """
        if on_timeout not in ("fail", "continue"):
            raise ConfigError(
                f"workflow {self._name!r}: wait {name!r} on_timeout must be 'fail' or "
                f"'continue', got {on_timeout!r}",
                option="on_timeout",
            )
        if on_timeout == "continue" and timeout is None:
            raise ConfigError(
                f"workflow {self._name!r}: wait {name!r} has on_timeout='continue' but no "
                "timeout; give timeout=",
                option="on_timeout",
            )
        self._check_name(name)
        aliases = self._aliases(name, was)
        seconds = (
            None
            if timeout is None
            else to_seconds(timeout, option=f"wait {name!r} timeout", allow_zero=False)
        )
        validator = _make_validator(schema, self._name, "payload")
        return self._then(
            WaitDefinition(name, validator, seconds, on_timeout == "continue", aliases)
        )

    def parallel(
        self,
        branches: Mapping[str, Callable[[StepContext[InputT, PrevT]], Any] | Branch],
        *,
        name: str | None = None,
    ) -> Workflow[InputT, dict[str, Any]]:
        """Append branches that run concurrently, each saved as its own step.

        Each branch is a handler or a :class:`Branch` with its own retry and
        timeout. The first branch to fail for good cancels the others and the
        run fails naming it. After a crash only branches without a saved
        result run again. The next step's ``prev`` is ``{branch: output}``.
        """
        if not isinstance(branches, Mapping) or not branches:
            raise ConfigError(
                f"workflow {self._name!r}: parallel() needs a non-empty mapping of branches",
                option="branches",
            )
        taken = self._taken()
        group = name if name is not None else "parallel(" + ",".join(branches) + ")"
        self._check_name(group, taken)
        taken.add(group)
        defined = []
        for branch_name, branch in branches.items():
            self._check_name(branch_name, taken)
            taken.add(branch_name)
            spec = branch if isinstance(branch, Branch) else Branch(branch)
            aliases = self._aliases(branch_name, spec.was, taken)
            taken.update(aliases)
            defined.append(
                dataclasses.replace(
                    _define_step(self._name, branch_name, spec.handler, spec.retry, spec.timeout),
                    was=aliases,
                )
            )
        return self._then(ParallelDefinition(group, tuple(defined)))

    @overload
    def map(
        self,
        name: str,
        items: Callable[[StepContext[InputT, PrevT]], Iterable[ItemT]],
        handler: Callable[[StepContext[InputT, ItemT]], Awaitable[OutT]],
        *,
        concurrency: int = 10,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        max_items: int = MAX_MAP_ITEMS,
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, list[OutT]]: ...

    @overload
    def map(
        self,
        name: str,
        items: Callable[[StepContext[InputT, PrevT]], Iterable[ItemT]],
        handler: Callable[[StepContext[InputT, ItemT]], OutT],
        *,
        concurrency: int = 10,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        max_items: int = MAX_MAP_ITEMS,
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, list[OutT]]: ...

    def map(
        self,
        name: str,
        items: Callable[[StepContext[InputT, PrevT]], Iterable[Any]],
        handler: Callable[[StepContext[InputT, Any]], Any],
        *,
        concurrency: int = 10,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        max_items: int = MAX_MAP_ITEMS,
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, list[Any]]:
        """Append a fan-out: run ``handler`` once per item of the list that
        ``items(ctx)`` returns (from the input, ``ctx.input``, or an earlier
        step, ``ctx.prev``), at most ``concurrency`` at once on the worker
        that holds the run, and gather the results.

        The items are saved before the first one runs, so a replay works on
        the same list; each item's handler gets the item as ``ctx.prev`` and
        its result is saved as step ``name[i]`` as soon as it ends, so after
        a crash only unfinished items run again. ``retry`` and ``timeout``
        apply to each item. The first item to fail for good cancels the
        others and fails the run naming it. The next step's ``prev`` is the
        list of results in the order of the items. More than ``max_items``
        items fail the run with :class:`~reflow_core.errors.MapTooLargeError`.
        """
        self._check_name(name)
        self._check_item_names(name, is_map=True)
        aliases = self._aliases(name, was)
        for alias in aliases:
            self._check_item_names(alias, is_map=True)
        if not callable(items):
            raise ConfigError(
                f"workflow {self._name!r}, map {name!r}: items must be a callable returning "
                "the list of items (for example lambda ctx: ctx.input['urls'])",
                option="items",
            )
        for option, value in (("concurrency", concurrency), ("max_items", max_items)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"workflow {self._name!r}, map {name!r}: {option} must be a positive int, "
                    f"got {value!r}",
                    option=option,
                )
        item = _define_step(self._name, name, handler, retry, timeout)
        return self._then(
            MapDefinition(
                name,
                cast(Callable[[StepContext[Any, Any]], Any], items),
                item,
                concurrency,
                max_items,
                aliases,
            )
        )

    def child(
        self,
        name: str,
        workflow: Workflow[Any, OutT],
        input: Callable[[StepContext[InputT, PrevT]], Any] | None = None,
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
        was: str | Iterable[str] | None = None,
    ) -> Workflow[InputT, OutT]:
        """Append a step that runs ``workflow`` as a child run and takes its
        output: the common case of :meth:`StepContext.start_child
        <reflow_core.context.StepContext.start_child>`.

        The child's input is ``input(ctx)`` (a plain or ``async`` function
        of the step's context), or ``ctx.prev`` without it. While the child
        runs, this run waits durably: it is released, no worker slot is
        held, and it resumes when the child ends, on any worker. A child
        that fails or is cancelled fails this step with
        :class:`~reflow_core.errors.ChildFailedError`; with ``retry``, each
        new attempt starts a new child. ``timeout`` bounds the child run as
        its workflow's own ``timeout`` does (the earlier counts). Cancelling
        this run cancels the child.
        """
        self._check_name(name)
        aliases = self._aliases(name, was)
        if not isinstance(workflow, Workflow):
            raise ConfigError(
                f"workflow {self._name!r}, child {name!r}: workflow must be a Workflow, "
                f"not {type(workflow).__name__}",
                option="workflow",
            )
        if input is not None and not callable(input):
            raise ConfigError(
                f"workflow {self._name!r}, child {name!r}: input must be a callable of the "
                "step's context (for example lambda ctx: {'order': ctx.input['id']}) or None",
                option="input",
            )
        if timeout is not None:
            to_seconds(timeout, option=f"child {name!r} timeout", allow_zero=False)
        child = workflow
        make_input = input

        async def run_child(ctx: StepContext[Any, Any]) -> Any:
            value = ctx.prev if make_input is None else make_input(ctx)
            if inspect.isawaitable(value):
                value = await value
            handle = await ctx.start_child(child, value, timeout=timeout)
            return await handle.result()

        run_child.__qualname__ = run_child.__name__ = f"child:{workflow.name}"
        step = _define_step(self._name, name, run_child, retry, None)
        return self._then(dataclasses.replace(step, was=aliases, child=workflow.name))

    def on_failure(
        self, handler: Callable[[FailureContext[InputT]], Any]
    ) -> Workflow[InputT, PrevT]:
        """Call ``handler`` once when a run fails for good.

        It receives a :class:`~reflow_core.context.FailureContext` (the error,
        the failing step's name, the input); ``async def`` or plain ``def``.
        An exception inside it is reported and never changes the run.
        """
        if not callable(handler):
            raise ConfigError(
                f"workflow {self._name!r}: on_failure handler must be callable",
                option="on_failure",
            )
        return Workflow(
            self._name,
            self._schema,
            self._validator,
            self._steps,
            cast(FailureHandler, handler),
            self._timeout,
            self._flow,
            self._version,
            self._on_incompatible,
        )


@overload
def workflow(
    name: str,
    input: None = None,
    *,
    timeout: Duration | None = None,
    priority: int = 0,
    max_running: int | None = None,
    concurrency: Limit | None = None,
    rate: str | Rate | None = None,
    version: int = 1,
    on_incompatible: Policy | None = None,
) -> Workflow[Any, Any]: ...


@overload
def workflow(
    name: str,
    input: type[T],
    *,
    timeout: Duration | None = None,
    priority: int = 0,
    max_running: int | None = None,
    concurrency: Limit | None = None,
    rate: str | Rate | None = None,
    version: int = 1,
    on_incompatible: Policy | None = None,
) -> Workflow[T, T]: ...


@overload
def workflow(
    name: str,
    input: SupportsValidatePython[T],
    *,
    timeout: Duration | None = None,
    priority: int = 0,
    max_running: int | None = None,
    concurrency: Limit | None = None,
    rate: str | Rate | None = None,
    version: int = 1,
    on_incompatible: Policy | None = None,
) -> Workflow[T, T]: ...


@overload
def workflow(
    name: str,
    input: Callable[[Any], T],
    *,
    timeout: Duration | None = None,
    priority: int = 0,
    max_running: int | None = None,
    concurrency: Limit | None = None,
    rate: str | Rate | None = None,
    version: int = 1,
    on_incompatible: Policy | None = None,
) -> Workflow[T, T]: ...


def workflow(
    name: str,
    input: object = None,
    *,
    timeout: Duration | None = None,
    priority: int = 0,
    max_running: int | None = None,
    concurrency: Limit | None = None,
    rate: str | Rate | None = None,
    version: int = 1,
    on_incompatible: Policy | None = None,
) -> Workflow[Any, Any]:
    """Start building a workflow named ``name``.

    ``input`` validates the input of every run: a pydantic model, a
    dataclass (validated by pydantic when it is installed, else checked
    against its field types by reflow itself), a ``TypedDict`` (always
    checked by reflow itself), a pydantic ``TypeAdapter``, any callable
    returning the validated value, or ``None`` to accept any plain data.

    ``timeout`` bounds every run: one that has not finished that long after
    it was enqueued (by the storage's clock) fails with
    :class:`~reflow_core.errors.RunDeadlineError`, whether a step is running
    (it is cancelled) or the run is delayed, sleeping or waiting.

    Flow control, enforced by the storage inside every claim, across every
    worker: ``priority`` is the default priority of its runs (claims take
    higher ones first; ``enqueue(priority=...)`` overrides it);
    ``max_running`` bounds how many of its runs run at once; ``rate``
    (``"100/m"``, ``"5/s"``, ``"10/30s"``) bounds how many of its runs start
    in any window of that period; ``concurrency``, a
    :class:`~reflow_core.limits.Limit`, bounds how many runs with one key
    computed from the input run at once, and how often they start. A run
    holds its slots while it is running, not while it sleeps or waits; every
    start counts against a rate, a resume after a sleep, a wait or a crash
    included.

    ``version`` (an int from 1, default 1) is recorded on every run this
    definition enqueues; a worker takes only runs of the versions it
    registers (an engine may register several versions of one workflow:
    each run goes on with its own). ``on_incompatible`` says what happens to
    a run of another version, or started on an earlier shape of this one,
    that this definition cannot continue where the run stands (a step it
    already ran was renamed without ``was=``, a step was inserted before its
    position, a step whose result it saved was removed): ``"hold"`` keeps it
    waiting with the reason until :meth:`Engine.release
    <reflow_core.Engine.release>`, ``"fail"`` fails it with
    :class:`~reflow_core.errors.IncompatibleRunError`, ``"continue"`` runs it
    on this definition anyway, and ``"old_version"`` leaves every run of
    another version to a worker that registers that version. ``None`` holds
    such runs, and ``reflow deploy-check`` reports them as unplanned. See
    ``docs/versions.md``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("workflow name must be a non-empty string", option="name")
    check_text(name, "workflow name")
    seconds = (
        None
        if timeout is None
        else to_seconds(timeout, option=f"workflow {name!r} timeout", allow_zero=False)
    )
    where = f"workflow {name!r}"
    check_priority(priority, where)
    if max_running is not None and (
        isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1
    ):
        raise ConfigError(
            f"{where}: max_running must be an int of at least 1 or None, got {max_running!r}",
            option="max_running",
        )
    if concurrency is not None and not isinstance(concurrency, Limit):
        raise ConfigError(
            f"{where}: concurrency must be a Limit, not {type(concurrency).__name__}",
            option="concurrency",
        )
    pace = None if rate is None else parse_rate(rate, f"{where} rate")
    flow = FlowControl(priority, max_running, concurrency, pace)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ConfigError(
            f"{where}: version must be an int from 1 to {MAX_VERSION}, got {version!r}",
            option="version",
        )
    if on_incompatible is not None and on_incompatible not in POLICIES:
        raise ConfigError(
            f"{where}: on_incompatible must be one of {', '.join(map(repr, POLICIES))} or None, "
            f"got {on_incompatible!r}",
            option="on_incompatible",
        )
    return Workflow(
        name,
        input,
        _make_validator(input, name),
        timeout=seconds,
        flow=flow,
        version=version,
        on_incompatible=on_incompatible,
    )
