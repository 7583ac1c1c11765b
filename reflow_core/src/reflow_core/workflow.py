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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast, overload

from ._durations import Duration, to_seconds
from .context import StepContext
from .errors import ConfigError, DuplicateStepError, ValidationError
from .retry import NO_RETRY, Retry

__all__ = ["StepDefinition", "Workflow", "workflow"]

T = TypeVar("T")
InputT = TypeVar("InputT")
PrevT = TypeVar("PrevT")
OutT = TypeVar("OutT")
T_co = TypeVar("T_co", covariant=True)


class SupportsValidatePython(Protocol[T_co]):
    """Anything with pydantic ``TypeAdapter``'s ``validate_python`` method."""

    def validate_python(self, obj: Any, /) -> T_co: ...


Validator = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class StepDefinition:
    """One step of a workflow, as declared."""

    name: str
    handler: Callable[[StepContext[Any, Any]], Any]
    is_async: bool
    retry: Retry
    timeout: float | None


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


def _make_validator(schema: object, name: str) -> Validator:
    """Turn a pydantic model, dataclass, TypeAdapter or callable into one function."""
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
                cls = schema

                def build(raw: Any) -> Any:
                    if isinstance(raw, cls):
                        return raw
                    if not isinstance(raw, Mapping):
                        raise TypeError(
                            f"expected a mapping for {cls.__name__}, got {type(raw).__name__}"
                        )
                    return cls(**raw)

                return build
            return cast(Validator, TypeAdapter(schema).validate_python)
    if callable(schema):
        return cast(Validator, schema)
    raise ConfigError(
        f"workflow {name!r}: input= must be a pydantic model, a dataclass, a TypeAdapter or a "
        f"callable, not {type(schema).__name__}",
        option="input",
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

    __slots__ = ("_name", "_schema", "_steps", "_validator")

    def __init__(
        self,
        name: str,
        schema: object,
        validator: Validator,
        steps: tuple[StepDefinition, ...] = (),
    ) -> None:
        self._name = name
        self._schema = schema
        self._validator = validator
        self._steps = steps

    @property
    def name(self) -> str:
        """The workflow's name, unique per engine."""
        return self._name

    @property
    def steps(self) -> tuple[StepDefinition, ...]:
        """The steps, in order."""
        return self._steps

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self._steps)
        return f"<Workflow {self._name!r} [{names}]>"

    def validate_input(self, raw: Any) -> InputT:
        """Validate raw input, raising :class:`~reflow_core.errors.ValidationError`."""
        try:
            return cast(InputT, self._validator(raw))
        except ValidationError:
            raise
        except Exception as exc:
            issues = _pydantic_issues(exc)
            if issues is None:
                issues = [{"type": type(exc).__name__, "msg": str(exc)}]
            raise ValidationError(
                f"invalid input for workflow {self._name!r}: {exc}",
                workflow=self._name,
                issues=issues,
            ) from exc

    @overload
    def step(
        self,
        name: str,
        handler: Callable[[StepContext[InputT, PrevT]], Awaitable[OutT]],
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
    ) -> Workflow[InputT, OutT]: ...

    @overload
    def step(
        self,
        name: str,
        handler: Callable[[StepContext[InputT, PrevT]], OutT],
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
    ) -> Workflow[InputT, OutT]: ...

    def step(
        self,
        name: str,
        handler: Callable[[StepContext[InputT, PrevT]], Any],
        *,
        retry: Retry | None = None,
        timeout: Duration | None = None,
    ) -> Workflow[InputT, Any]:
        """Append a step and return the new workflow.

        ``handler`` is an ``async def`` or a plain ``def`` (run in a worker
        thread) taking a :class:`StepContext`; its return value must be plain
        data. ``retry`` defaults to a single attempt; ``timeout`` bounds each
        attempt. Raises :class:`~reflow_core.errors.DuplicateStepError` if the
        name is taken.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"workflow {self._name!r}: step name must be a non-empty string", option="name"
            )
        if any(s.name == name for s in self._steps):
            raise DuplicateStepError(self._name, name)
        if not callable(handler):
            raise ConfigError(
                f"workflow {self._name!r}, step {name!r}: handler must be callable",
                option="handler",
            )
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigError(
                f"workflow {self._name!r}, step {name!r}: retry must be a Retry",
                option="retry",
            )
        seconds = (
            None
            if timeout is None
            else to_seconds(timeout, option=f"step {name!r} timeout", allow_zero=False)
        )
        definition = StepDefinition(
            name=name,
            handler=cast(Callable[[StepContext[Any, Any]], Any], handler),
            is_async=_is_async_callable(handler),
            retry=retry or NO_RETRY,
            timeout=seconds,
        )
        return Workflow(self._name, self._schema, self._validator, (*self._steps, definition))


@overload
def workflow(name: str, input: None = None) -> Workflow[Any, Any]: ...


@overload
def workflow(name: str, input: type[T]) -> Workflow[T, T]: ...


@overload
def workflow(name: str, input: SupportsValidatePython[T]) -> Workflow[T, T]: ...


@overload
def workflow(name: str, input: Callable[[Any], T]) -> Workflow[T, T]: ...


def workflow(name: str, input: object = None) -> Workflow[Any, Any]:
    """Start building a workflow named ``name``.

    ``input`` validates the input of every run: a pydantic model, a
    dataclass (validated by pydantic when it is installed, else constructed
    from the mapping), a pydantic ``TypeAdapter``, any callable returning
    the validated value, or ``None`` to accept any plain data.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("workflow name must be a non-empty string", option="name")
    return Workflow(name, input, _make_validator(input, name))
