"""The workflow builder: immutability, step declarations, input validation."""

from __future__ import annotations

import dataclasses
import functools
from datetime import datetime
from typing import Any

import pydantic
import pytest

from reflow_core import (
    ConfigError,
    DuplicateStepError,
    Retry,
    StepContext,
    ValidationError,
    workflow,
)
from reflow_core.retry import NO_RETRY
from reflow_core.workflow import StepDefinition, to_plain_input


def sync_step(ctx: StepContext[Any, Any]) -> int:
    return 1


async def async_step(ctx: StepContext[Any, Any]) -> int:
    return 1


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


@dataclasses.dataclass
class Point:
    x: int
    y: int = 0


# -- builder ------------------------------------------------------------------


def test_step_returns_a_new_workflow_and_leaves_the_original_alone() -> None:
    base = workflow("orders")
    one = base.step("a", sync_step)
    two = one.step("b", async_step)
    other = base.step("c", sync_step)

    assert base.steps == ()
    assert [s.name for s in one.steps] == ["a"]
    assert [s.name for s in two.steps] == ["a", "b"]
    assert [s.name for s in other.steps] == ["c"]
    assert len({id(base), id(one), id(two), id(other)}) == 4
    assert two.name == one.name == base.name == "orders"


def test_a_shared_prefix_can_be_extended_in_two_ways() -> None:
    prefix = workflow("shared").step("a", sync_step)
    left = prefix.step("b", sync_step)
    right = prefix.step("b", async_step)  # same name, different branch: no clash
    assert left.steps[1].handler is sync_step
    assert right.steps[1].handler is async_step
    assert [s.name for s in prefix.steps] == ["a"]


def test_workflow_attributes_cannot_be_reassigned() -> None:
    wf = workflow("w").step("a", sync_step)
    with pytest.raises(AttributeError):
        wf.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        wf.steps = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        wf.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        wf.steps[0].name = "b"  # type: ignore[misc]
    assert isinstance(wf.steps, tuple)


def test_repr_names_the_workflow_and_its_steps() -> None:
    wf = workflow("orders").step("charge", sync_step).step("ship", sync_step)
    assert repr(wf) == "<Workflow 'orders' [charge, ship]>"


def test_duplicate_step_name_is_refused_at_definition_time() -> None:
    wf = workflow("orders").step("charge", sync_step).step("ship", sync_step)
    with pytest.raises(DuplicateStepError) as caught:
        wf.step("charge", async_step)
    err = caught.value
    assert err.code == "duplicate_step"
    assert isinstance(err, ConfigError)
    assert err.workflow == "orders"
    assert err.step == "charge"
    assert "charge" in str(err)
    assert "orders" in str(err)
    assert [s.name for s in wf.steps] == ["charge", "ship"]


def test_step_options_are_recorded() -> None:
    retry = Retry(max_attempts=4, backoff="linear", initial_delay="10ms")
    wf = (
        workflow("w")
        .step("a", sync_step, retry=retry, timeout="1500ms")
        .step("b", async_step)
        .step("c", sync_step, timeout=2)
    )
    a, b, c = wf.steps
    assert a.retry is retry
    assert a.timeout == 1.5
    assert a.is_async is False
    assert b.retry == NO_RETRY
    assert b.retry.max_attempts == 1
    assert b.timeout is None
    assert b.is_async is True
    assert c.timeout == 2.0


class AsyncCallable:
    async def __call__(self, ctx: StepContext[Any, Any]) -> int:
        return 1


class SyncCallable:
    def __call__(self, ctx: StepContext[Any, Any]) -> int:
        return 1


async def async_with_arg(ctx: StepContext[Any, Any], factor: int) -> int:
    return factor


@pytest.mark.parametrize(
    ("handler", "is_async"),
    [
        (sync_step, False),
        (async_step, True),
        (lambda ctx: 1, False),
        (AsyncCallable(), True),
        (SyncCallable(), False),
        (functools.partial(async_with_arg, factor=2), True),
        (functools.partial(functools.partial(async_with_arg), factor=2), True),
    ],
)
def test_async_handlers_are_told_apart_from_plain_ones(handler: Any, is_async: bool) -> None:
    assert workflow("w").step("a", handler).steps[0].is_async is is_async


@pytest.mark.parametrize(
    ("call", "option"),
    [
        (lambda: workflow(""), "name"),
        (lambda: workflow("   "), "name"),
        (lambda: workflow(42), "name"),  # type: ignore[call-overload]
        (lambda: workflow("w", input=42), "input"),  # type: ignore[call-overload]
        (lambda: workflow("w").step("", sync_step), "name"),
        (lambda: workflow("w").step("a", "not callable"), "handler"),  # type: ignore[call-overload]
        (lambda: workflow("w").step("a", sync_step, retry=3), "retry"),  # type: ignore[call-overload]
        (lambda: workflow("w").step("a", sync_step, timeout="soon"), "step 'a' timeout"),
        (lambda: workflow("w").step("a", sync_step, timeout=0), "step 'a' timeout"),
        (lambda: workflow("w").step("a", sync_step, timeout=-1), "step 'a' timeout"),
    ],
)
def test_bad_definitions_are_config_errors(call: Any, option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        call()
    assert caught.value.option == option
    assert caught.value.code == "config_error"


# -- input validation -------------------------------------------------------


def test_pydantic_model_validates_and_converts() -> None:
    wf = workflow("orders", input=Order)
    order = wf.validate_input({"order_id": "ORD_1", "amount": "100"})
    assert order == Order(order_id="ORD_1", amount=100)


def test_pydantic_model_errors_carry_pydantic_issues() -> None:
    wf = workflow("orders", input=Order)
    with pytest.raises(ValidationError) as caught:
        wf.validate_input({"amount": "lots"})
    err = caught.value
    assert err.code == "validation_error"
    assert err.workflow == "orders"
    assert isinstance(err.__cause__, pydantic.ValidationError)
    by_field = {tuple(issue["loc"]): issue for issue in err.issues}
    assert set(by_field) == {("order_id",), ("amount",)}
    assert by_field[("order_id",)]["type"] == "missing"
    assert by_field[("amount",)]["type"] == "int_parsing"
    assert by_field[("amount",)]["input"] == "lots"
    assert all("url" not in issue for issue in err.issues)
    assert "orders" in str(err)


def test_dataclass_is_validated_through_pydantic() -> None:
    wf = workflow("points", input=Point)
    assert wf.validate_input({"x": "3"}) == Point(x=3, y=0)
    with pytest.raises(ValidationError) as caught:
        wf.validate_input({"x": "three"})
    (issue,) = caught.value.issues
    assert tuple(issue["loc"]) == ("x",)
    assert issue["type"] == "int_parsing"


def test_type_adapter_validates() -> None:
    adapter = pydantic.TypeAdapter(list[int])
    wf = workflow("numbers", input=adapter)
    assert wf.validate_input(["1", 2]) == [1, 2]
    with pytest.raises(ValidationError) as caught:
        wf.validate_input(["1", "x"])
    (issue,) = caught.value.issues
    assert tuple(issue["loc"]) == (1,)


def test_callable_validator_returns_its_value() -> None:
    def parse(raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict) or "id" not in raw:
            raise ValueError("an id is required")
        return {"id": str(raw["id"]).upper()}

    wf = workflow("ids", input=parse)
    assert wf.validate_input({"id": "ab"}) == {"id": "AB"}
    with pytest.raises(ValidationError) as caught:
        wf.validate_input({"name": "x"})
    err = caught.value
    assert err.issues == [{"type": "ValueError", "msg": "an id is required"}]
    assert isinstance(err.__cause__, ValueError)
    assert "an id is required" in str(err)


def test_callable_validator_may_raise_validation_error_itself() -> None:
    own = ValidationError("no", workflow="ids", issues=[{"type": "custom", "msg": "no"}])

    def parse(raw: Any) -> Any:
        raise own

    with pytest.raises(ValidationError) as caught:
        workflow("ids", input=parse).validate_input(1)
    assert caught.value is own


def test_plain_class_or_builtin_is_used_as_a_callable() -> None:
    wf = workflow("count", input=int)
    assert wf.validate_input("5") == 5
    with pytest.raises(ValidationError):
        wf.validate_input("five")
    stamp = workflow("stamp", input=datetime.fromisoformat)
    assert stamp.validate_input("2026-11-24T10:00:00") == datetime(2026, 11, 24, 10)
    with pytest.raises(ValidationError):
        stamp.validate_input("not a date")


@pytest.mark.parametrize("raw", [None, 1, "x", [1, {"a": None}], {"k": datetime(2026, 1, 1)}])
def test_no_schema_accepts_anything_unchanged(raw: Any) -> None:
    assert workflow("any").validate_input(raw) == raw


def test_to_plain_input_dumps_models_and_dataclasses() -> None:
    assert to_plain_input(Order(order_id="A", amount=1)) == {"order_id": "A", "amount": 1}
    assert to_plain_input(Point(1, 2)) == {"x": 1, "y": 2}
    raw = {"a": 1}
    assert to_plain_input(raw) is raw
    assert to_plain_input(Order) is Order  # a class is left alone


def test_an_async_when_predicate_is_accepted_and_a_non_callable_one_refused() -> None:
    async def later(ctx: Any) -> bool:
        return True

    async def handler(ctx: Any) -> int:
        return 1

    wf = workflow("async-when").step("a", handler, when=later)
    step = wf.steps[0]
    assert isinstance(step, StepDefinition)
    assert step.when is later
    with pytest.raises(ConfigError, match="when must be callable") as caught:
        workflow("bad-when").step("a", handler, when=True)  # type: ignore[call-overload]
    assert caught.value.option == "when"
