"""Dataclass and TypedDict inputs are checked against their field types.

Without pydantic, reflow checks a dataclass itself; a TypedDict it always
checks itself. The first bad value is reported with its path, for example
``input.items[2].amount: expected int, got str 'ten'``, and an enqueue that is
rejected writes nothing. This module uses ``from __future__ import
annotations`` on purpose: every annotation below is a string until the
checker resolves it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    NewType,
    NotRequired,
    Optional,
    Required,
    TypedDict,
    cast,
)

import pydantic
import pytest

from reflow_core import (
    ConfigError,
    Engine,
    StepContext,
    ValidationError,
    Workflow,
    _typecheck,
    workflow,
)
from reflow_core._typecheck import TypeMismatch
from reflow_core.storage import Storage

# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture
def no_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import pydantic`` fail, as it does where pydantic is not installed."""
    monkeypatch.setitem(sys.modules, "pydantic", None)


@pytest.fixture(params=["without-pydantic", "with-pydantic"])
def pydantic_installed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param == "without-pydantic":
        monkeypatch.setitem(sys.modules, "pydantic", None)
        return False
    return True


def rejected(wf: Workflow[Any, Any], raw: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        wf.validate_input(raw)
    return caught.value


def make_engine(storage: Storage, *workflows: Workflow[Any, Any]) -> Engine:
    return Engine(storage=storage, workflows=workflows, close_storage=False)


@contextlib.asynccontextmanager
async def idle_engine(storage: Storage, *workflows: Workflow[Any, Any]) -> AsyncIterator[Engine]:
    engine = make_engine(storage, *workflows)
    try:
        yield engine
    finally:
        await engine.stop(timeout=0)


async def all_runs(storage: Storage) -> list[Any]:
    await storage.initialize()
    page = await storage.list_runs(limit=1000)
    return list(page.runs)


# -- one field of each type ----------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.Enum):
    LOW = 1
    HIGH = 2


UserId = NewType("UserId", int)
PARIS = timezone(timedelta(hours=1))
WHEN = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)

GOOD: list[Any] = [
    # (annotation, raw value, converted value)
    pytest.param(int, 1, 1, id="int"),
    pytest.param(int, -(10**30), -(10**30), id="int-big"),
    pytest.param(float, 1.5, 1.5, id="float"),
    pytest.param(float, 1, 1.0, id="float-widened-from-int"),
    pytest.param(str, "ten", "ten", id="str"),
    pytest.param(bool, False, False, id="bool"),
    pytest.param(None, None, None, id="none"),
    pytest.param(Any, {"x": [1, None]}, {"x": [1, None]}, id="any"),
    pytest.param(object, "x", "x", id="object"),
    pytest.param(list[int], [1, 2, 3], [1, 2, 3], id="list"),
    pytest.param(list[int], [], [], id="list-empty"),
    pytest.param(list, [1, "a"], [1, "a"], id="list-bare"),
    pytest.param(Sequence[float], [1, 2.5], [1.0, 2.5], id="sequence"),
    pytest.param(dict[str, int], {"a": 1, "odd key": 2}, {"a": 1, "odd key": 2}, id="dict"),
    pytest.param(dict, {"a": [1]}, {"a": [1]}, id="dict-bare"),
    pytest.param(Mapping[str, str], {"a": "b"}, {"a": "b"}, id="mapping"),
    pytest.param(dict[Color, int], {"red": 1}, {Color.RED: 1}, id="dict-enum-keys"),
    pytest.param(tuple[int, ...], [1, 2], (1, 2), id="tuple-variadic"),
    pytest.param(tuple[int, str], [1, "a"], (1, "a"), id="tuple-fixed"),
    pytest.param(int | None, None, None, id="optional-none"),
    pytest.param(int | None, 3, 3, id="optional-value"),
    pytest.param(Optional[str], "a", "a", id="typing-optional"),  # noqa: UP045
    pytest.param(int | str, "a", "a", id="union"),
    pytest.param(float | int, 1, 1, id="union-exact-type-first"),
    pytest.param(int | float, 1.5, 1.5, id="union-float"),
    pytest.param(Literal["a", "b"], "b", "b", id="literal"),
    pytest.param(Literal[1, None], None, None, id="literal-none"),
    pytest.param(datetime, WHEN, WHEN, id="datetime"),
    pytest.param(
        datetime,
        "2026-11-24T10:00:00+01:00",
        datetime(2026, 11, 24, 10, 0, tzinfo=PARIS),
        id="datetime-iso-string",
    ),
    pytest.param(datetime, "2026-11-24T09:00:00Z", WHEN.replace(hour=9), id="datetime-z"),
    pytest.param(Color, "red", Color.RED, id="enum"),
    pytest.param(Level, 2, Level.HIGH, id="int-enum"),
    pytest.param(Annotated[int, "cents"], 5, 5, id="annotated"),
    pytest.param(UserId, 7, 7, id="newtype"),
    pytest.param(
        list[dict[str, list[int | None]]],
        [{"a": [1, None]}, {}],
        [{"a": [1, None]}, {}],
        id="deep",
    ),
]

BAD: list[Any] = [
    # (annotation, raw value, path below the field, message)
    pytest.param(int, "ten", "", "expected int, got str 'ten'", id="int-str"),
    pytest.param(int, True, "", "expected int, got bool True", id="int-bool"),
    pytest.param(int, 1.0, "", "expected int, got float 1.0", id="int-float"),
    pytest.param(int, None, "", "expected int, got None", id="int-none"),
    pytest.param(float, "1.5", "", "expected float, got str '1.5'", id="float-str"),
    pytest.param(float, True, "", "expected float, got bool True", id="float-bool"),
    pytest.param(str, 1, "", "expected str, got int 1", id="str-int"),
    pytest.param(bool, 1, "", "expected bool, got int 1", id="bool-int"),
    pytest.param(bool, "true", "", "expected bool, got str 'true'", id="bool-str"),
    pytest.param(None, 0, "", "expected None, got int 0", id="none"),
    pytest.param(list[int], {"a": 1}, "", "expected list, got dict", id="list-dict"),
    pytest.param(list[int], "12", "", "expected list, got str '12'", id="list-str"),
    pytest.param(list[int], [1, "2"], "[1]", "expected int, got str '2'", id="list-item"),
    pytest.param(dict[str, int], [1], "", "expected dict, got list", id="dict-list"),
    pytest.param(dict[str, int], {"a": 1, "b": "x"}, ".b", "expected int, got str 'x'", id="dict"),
    pytest.param(
        dict[str, int], {"odd key": None}, '["odd key"]', "expected int, got None", id="dict-key"
    ),
    pytest.param(
        dict[Color, int],
        {"blue": 1},
        ".blue",
        "key: expected Color (one of 'red', 'green'), got str 'blue'",
        id="dict-enum-key",
    ),
    pytest.param(tuple[int, str], [1, 2], "[1]", "expected str, got int 2", id="tuple-item"),
    pytest.param(tuple[int, str], [1], "", "expected tuple of 2 items, got 1", id="tuple-length"),
    pytest.param(tuple[int, ...], [1, "x"], "[1]", "expected int, got str 'x'", id="tuple-var"),
    pytest.param(tuple[int, ...], 5, "", "expected tuple, got int 5", id="tuple-int"),
    pytest.param(int | None, "x", "", "expected int | None, got str 'x'", id="optional"),
    pytest.param(int | str, 1.5, "", "expected int | str, got float 1.5", id="union"),
    pytest.param(int | None, False, "", "expected int | None, got bool False", id="union-bool"),
    pytest.param(Literal["a", "b"], "c", "", "expected one of 'a', 'b', got str 'c'", id="literal"),
    pytest.param(Literal[1], True, "", "expected one of 1, got bool True", id="literal-bool"),
    pytest.param(Literal[1], [1], "", "expected one of 1, got list", id="literal-unhashable"),
    pytest.param(
        datetime,
        "yesterday",
        "",
        "expected datetime (or an ISO 8601 string), got str 'yesterday'",
        id="datetime-str",
    ),
    pytest.param(
        datetime, 12, "", "expected datetime (or an ISO 8601 string), got int 12", id="dt-int"
    ),
    pytest.param(
        Color, "purple", "", "expected Color (one of 'red', 'green'), got str 'purple'", id="enum"
    ),
    pytest.param(Level, "1", "", "expected Level (one of 1, 2), got str '1'", id="enum-type"),
    pytest.param(Annotated[int, "cents"], "5", "", "expected int, got str '5'", id="annotated"),
    pytest.param(UserId, "7", "", "expected int, got str '7'", id="newtype"),
    pytest.param(
        list[dict[str, list[int | None]]],
        [{"a": [1]}, {"b": [1, None, "x"]}],
        "[1].b[2]",
        "expected int | None, got str 'x'",
        id="deep",
    ),
]


def box(kind: str, annotation: Any) -> type:
    """A dataclass or TypedDict with one field, ``value``, of the given type."""
    if kind == "dataclass":
        return dataclasses.make_dataclass("Box", [("value", annotation)])
    return cast(type, TypedDict("Box", {"value": annotation}))  # type: ignore[operator]


@pytest.mark.usefixtures("no_pydantic")
@pytest.mark.parametrize("kind", ["dataclass", "typeddict"])
@pytest.mark.parametrize(("annotation", "raw", "expected"), GOOD)
def test_good_values_are_accepted_and_converted(
    kind: str, annotation: Any, raw: Any, expected: Any
) -> None:
    wf: Workflow[Any, Any] = workflow("box", input=box(kind, annotation))
    got = wf.validate_input({"value": raw})
    value = got.value if kind == "dataclass" else got["value"]
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list | dict):
        assert [type(v) for v in value] == [type(v) for v in expected]


@pytest.mark.usefixtures("no_pydantic")
@pytest.mark.parametrize("kind", ["dataclass", "typeddict"])
@pytest.mark.parametrize(("annotation", "raw", "path", "message"), BAD)
def test_bad_values_are_rejected_with_their_path(
    kind: str, annotation: Any, raw: Any, path: str, message: str
) -> None:
    wf: Workflow[Any, Any] = workflow("box", input=box(kind, annotation))
    err = rejected(wf, {"value": raw})
    assert str(err) == f"invalid input for workflow 'box': input.value{path}: {message}"
    assert err.workflow == "box"
    assert err.code == "validation_error"
    assert isinstance(err.__cause__, TypeMismatch)
    assert err.__cause__.path == f"input.value{path}"
    (issue,) = err.issues
    assert issue["msg"] == message
    assert issue["loc"][0] == "value"


# -- nested dataclasses and TypedDicts, string annotations -----------------------------


class Address(TypedDict):
    street: str
    zip: NotRequired[str]


class Options(TypedDict, total=False):
    gift: bool
    note: Required[str]


@dataclass
class Item:
    sku: str
    amount: int
    price: float = 0.0


@dataclass
class Order:
    order_id: str
    items: list[Item]
    ship_to: Address
    options: Options | None = None
    placed_at: datetime | None = None
    parent: Order | None = None
    later: Later | None = None
    tags: list[str] = field(default_factory=list)
    registry: ClassVar[dict[str, int]] = {}


@dataclass
class Later:
    """Defined after ``Order``, which refers to it by name."""

    x: int


def an_order(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "order_id": "ORD_1",
        "items": [
            {"sku": "A", "amount": 1},
            {"sku": "B", "amount": 2, "price": 3},
            {"sku": "C", "amount": 3, "price": 0.5},
        ],
        "ship_to": {"street": "1 Main St"},
    }
    raw.update(changes)
    return raw


def test_annotations_here_are_strings() -> None:
    assert Order.__annotations__["items"] == "list[Item]"
    zip_annotation = Address.__annotations__["zip"]  # a ForwardRef before Python 3.12
    assert getattr(zip_annotation, "__forward_arg__", zip_annotation) == "NotRequired[str]"


@pytest.mark.usefixtures("no_pydantic")
def test_nested_dataclasses_and_typeddicts_are_built() -> None:
    wf = workflow("orders", input=Order)
    order = wf.validate_input(
        an_order(
            options={"note": "hi", "gift": True},
            placed_at="2026-11-24T10:00:00+00:00",
            parent=an_order(order_id="ORD_0", ship_to={"street": "x", "zip": "123"}),
            later={"x": 5},
        )
    )
    assert isinstance(order, Order)
    assert order.items == [Item("A", 1), Item("B", 2, 3.0), Item("C", 3, 0.5)]
    assert type(order.items[1].price) is float
    assert order.ship_to == {"street": "1 Main St"}
    assert order.options == {"note": "hi", "gift": True}
    assert order.placed_at == WHEN
    assert isinstance(order.parent, Order)
    assert order.parent.ship_to == {"street": "x", "zip": "123"}
    assert order.later == Later(5)
    assert order.tags == []


NESTED_BAD: list[Any] = [
    pytest.param(
        {
            "items": [
                {"sku": "A", "amount": 1},
                {"sku": "B", "amount": 2},
                {"sku": "C", "amount": "ten"},
            ]
        },
        "input.items[2].amount: expected int, got str 'ten'",
        id="item-field",
    ),
    pytest.param({"items": {"sku": "A"}}, "input.items: expected list, got dict", id="items"),
    pytest.param(
        {"items": [{"sku": "A"}]}, "input.items[0].amount: missing required field", id="missing"
    ),
    pytest.param(
        {"items": [{"sku": "A", "amount": 1, "qty": 2}]},
        "input.items[0].qty: Item has no field of this name",
        id="unknown-field",
    ),
    pytest.param(
        {"items": ["A"]}, "input.items[0]: expected Item (an object), got str 'A'", id="item"
    ),
    pytest.param(
        {"ship_to": {"street": "x", "zip": 75001}},
        "input.ship_to.zip: expected str, got int 75001",
        id="typeddict-field",
    ),
    pytest.param(
        {"ship_to": {"zip": "75001"}},
        "input.ship_to.street: missing required key",
        id="typeddict-missing",
    ),
    pytest.param(
        {"ship_to": {"street": "x", "city": "Paris"}},
        "input.ship_to.city: Address has no field of this name",
        id="typeddict-unknown-key",
    ),
    pytest.param(
        {"ship_to": "1 Main St"},
        "input.ship_to: expected Address (an object), got str '1 Main St'",
        id="typeddict",
    ),
    pytest.param(
        {"options": {"gift": True}},
        "input.options.note: missing required key",
        id="required-in-total-false",
    ),
    pytest.param(
        {"options": {"note": "x", "gift": "yes"}},
        "input.options.gift: expected bool, got str 'yes'",
        id="optional-typeddict-field",
    ),
    pytest.param(
        {"options": []}, "input.options: expected Options | None, got list", id="optional"
    ),
    pytest.param(
        {"parent": an_order(items=[{"sku": 1, "amount": 1}])},
        "input.parent.items[0].sku: expected str, got int 1",
        id="self-reference",
    ),
    pytest.param({"later": {"x": "5"}}, "input.later.x: expected int, got str '5'", id="later"),
    pytest.param({"tags": ["a", None]}, "input.tags[1]: expected str, got None", id="tags"),
    pytest.param(
        {"colour": "red"}, "input.colour: Order has no field of this name", id="unknown-top"
    ),
    pytest.param(
        {"registry": {}}, "input.registry: Order has no field of this name", id="classvar"
    ),
]


@pytest.mark.usefixtures("no_pydantic")
@pytest.mark.parametrize(("changes", "error"), NESTED_BAD)
def test_nested_errors_name_the_first_bad_value(changes: dict[str, Any], error: str) -> None:
    err = rejected(workflow("orders", input=Order), an_order(**changes))
    assert str(err) == f"invalid input for workflow 'orders': {error}"


@pytest.mark.usefixtures("no_pydantic")
def test_the_issue_has_pydantic_shape() -> None:
    err = rejected(workflow("orders", input=Order), an_order(items=[{"sku": "A", "amount": "1"}]))
    assert err.issues == [
        {
            "type": "int_type",
            "loc": ("items", 0, "amount"),
            "msg": "expected int, got str '1'",
            "input": "1",
        }
    ]
    missing = rejected(workflow("orders", input=Order), {"order_id": "A"})
    assert missing.issues == [
        {"type": "missing", "loc": ("items",), "msg": "missing required field"}
    ]


@pytest.mark.usefixtures("no_pydantic")
@pytest.mark.parametrize("raw", [None, [1], "ORD_1", 5])
def test_input_that_is_not_an_object_is_rejected(raw: Any) -> None:
    err = rejected(workflow("orders", input=Order), raw)
    assert "input: expected Order (an object), got" in str(err)
    err = rejected(workflow("address", input=Address), raw)
    assert "input: expected Address (an object), got" in str(err)


@pytest.mark.usefixtures("no_pydantic")
def test_a_dataclass_instance_is_accepted_as_is() -> None:
    item = Item("A", 1)
    assert workflow("items", input=Item).validate_input(item) is item


@pytest.mark.usefixtures("no_pydantic")
def test_dataclass_construction_errors_are_validation_errors() -> None:
    @dataclass
    class Positive:
        n: int

        def __post_init__(self) -> None:
            if self.n <= 0:
                raise ValueError("n must be positive")

    wf = workflow("positive", input=Positive)
    assert wf.validate_input({"n": 1}) == Positive(1)
    err = rejected(wf, {"n": 0})
    assert err.issues == [{"type": "ValueError", "msg": "n must be positive"}]


@pytest.mark.usefixtures("no_pydantic")
def test_init_false_fields_are_not_input_and_initvars_are() -> None:
    @dataclass
    class Scaled:
        raw: dataclasses.InitVar[int]
        value: int = field(init=False)

        def __post_init__(self, raw: int) -> None:
            self.value = raw * 10

    wf = workflow("scaled", input=Scaled)
    assert wf.validate_input({"raw": 2}).value == 20
    assert "input.raw: expected int, got str '2'" in str(rejected(wf, {"raw": "2"}))
    assert "input.value: Scaled has no field" in str(rejected(wf, {"raw": 2, "value": 3}))


@pytest.mark.usefixtures("no_pydantic")
def test_a_local_class_may_refer_to_itself() -> None:
    @dataclass
    class Node:
        name: str
        children: list[Node] = field(default_factory=list)

    wf = workflow("tree", input=Node)
    tree = wf.validate_input(
        {"name": "a", "children": [{"name": "b", "children": [{"name": "c"}]}]}
    )
    assert tree.children[0].children[0] == Node("c")
    err = rejected(wf, {"name": "a", "children": [{"name": "b", "children": [{"name": 3}]}]})
    assert "input.children[0].children[0].name: expected str, got int 3" in str(err)


class Untyped(TypedDict):
    """A TypedDict without keys: only ``{}`` fits."""


class Partial(TypedDict, total=False):
    a: int
    b: str


def test_typeddicts_are_checked_with_or_without_pydantic(pydantic_installed: bool) -> None:
    wf = workflow("address", input=Address)
    assert wf.validate_input({"street": "x"}) == {"street": "x"}
    err = rejected(wf, {"street": 5})
    assert str(err) == "invalid input for workflow 'address': input.street: expected str, got int 5"
    partial = workflow("partial", input=Partial)
    assert partial.validate_input({}) == {}
    assert partial.validate_input({"b": "x"}) == {"b": "x"}
    assert "input.a: expected int, got str '1'" in str(rejected(partial, {"a": "1"}))
    assert workflow("untyped", input=Untyped).validate_input({}) == {}


def test_dataclasses_use_pydantic_when_it_is_installed(pydantic_installed: bool) -> None:
    wf = workflow("items", input=Item)
    err = rejected(wf, {"sku": "A", "amount": "ten"})
    if pydantic_installed:
        # pydantic's lax mode: numeric strings are converted; its issues are kept.
        assert wf.validate_input({"sku": "A", "amount": "10"}) == Item("A", 10)
        assert isinstance(err.__cause__, pydantic.ValidationError)
        assert err.issues[0]["type"] == "int_parsing"
    else:
        err = rejected(wf, {"sku": "A", "amount": "10"})
        assert "input.amount: expected int, got str '10'" in str(err)
        assert isinstance(err.__cause__, TypeMismatch)
    assert wf.validate_input({"sku": "A", "amount": 10}) == Item("A", 10)


# -- what cannot be checked ------------------------------------------------------------


@dataclass
class Priced:
    price: Decimal


@dataclass
class Cart:
    items: list[Priced]


@pytest.mark.usefixtures("no_pydantic")
def test_an_unsupported_field_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        workflow("cart", input=Cart)
    assert caught.value.option == "input"
    message = str(caught.value)
    assert message.startswith(
        "workflow 'cart': field Priced.price has type Decimal, which cannot be checked "
        "without pydantic."
    )
    assert "install pydantic or pass a validator function" in message
    # Nothing half built stays cached: Cart still fails, not silently accepts.
    assert Priced not in _typecheck._cache
    assert Cart not in _typecheck._cache
    with pytest.raises(ConfigError):
        workflow("cart", input=Cart)


@pytest.mark.usefixtures("no_pydantic")
def test_an_unresolvable_annotation_is_a_config_error() -> None:
    @dataclass
    class Inner:
        x: int

    @dataclass
    class Outer:
        inner: Inner  # a local class: not in the module's namespace

    with pytest.raises(ConfigError) as caught:
        workflow("outer", input=Outer)
    assert "cannot resolve the annotations of" in str(caught.value)
    assert "Inner" in str(caught.value)


def test_an_unsupported_typeddict_field_is_a_config_error() -> None:
    class Money(TypedDict):
        amount: Decimal

    with pytest.raises(ConfigError, match=r"field Money\.amount has type Decimal"):
        workflow("money", input=Money)


# -- building once per type --------------------------------------------------------------


@pytest.mark.usefixtures("no_pydantic")
def test_the_checker_is_built_once_per_class() -> None:
    first = workflow("a", input=Order)
    assert _typecheck._cache[Order] is _typecheck._build(Order)
    checker = _typecheck._cache[Item]
    workflow("b", input=Item)
    workflow("c", input=Order)
    assert _typecheck._cache[Item] is checker
    assert first.validate_input(an_order()).items[0] == Item("A", 1)


# -- at enqueue and when a worker reads the input back ------------------------------------


@pytest.mark.usefixtures("no_pydantic")
async def test_a_rejected_enqueue_writes_nothing(storage: Storage) -> None:
    wf = workflow("orders", input=Order).step("a", lambda ctx: None)
    addresses = workflow("addresses", input=Address).step("a", lambda ctx: None)
    async with idle_engine(storage, wf, addresses) as engine:
        with pytest.raises(ValidationError) as caught:
            await engine.enqueue(wf, an_order(items=[{"sku": "A", "amount": "ten"}]))
        with pytest.raises(ValidationError):
            await engine.enqueue(addresses, {"street": None})
        assert await all_runs(storage) == []
    assert "input.items[0].amount: expected int, got str 'ten'" in str(caught.value)


@pytest.mark.usefixtures("no_pydantic")
async def test_steps_receive_the_declared_types(storage: Storage) -> None:
    got: list[Order] = []

    async def record(ctx: StepContext[Order, Order]) -> None:
        got.append(ctx.input)

    wf = workflow("orders", input=Order).step("a", record)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(
            wf, an_order(placed_at=WHEN, options={"note": "n"}, later={"x": 1})
        )
        assert run.input["placed_at"] == WHEN  # stored as given: plain data
        assert await engine.tick() == 1
    (order,) = got
    assert isinstance(order, Order)
    assert all(isinstance(item, Item) for item in order.items)
    assert [type(item.price) for item in order.items] == [float, float, float]
    assert order.placed_at == WHEN
    assert order.options == {"note": "n"}
    assert order.later == Later(1)


@pytest.mark.usefixtures("no_pydantic")
async def test_a_dataclass_instance_enqueued_reaches_the_step(storage: Storage) -> None:
    got: list[Item] = []

    def record(ctx: StepContext[Item, Item]) -> None:
        got.append(ctx.input)

    wf = workflow("items", input=Item).step("a", record)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf, Item("A", 1, 2.5))
        assert run.input == {"sku": "A", "amount": 1, "price": 2.5}
        assert await engine.tick() == 1
    assert got == [Item("A", 1, 2.5)]


@pytest.mark.usefixtures("no_pydantic")
async def test_stored_input_is_checked_again_when_the_worker_reads_it(db: Any) -> None:
    lax = workflow("items").step("a", lambda ctx: None)
    strict = workflow("items", input=Item).step("a", lambda ctx: None)
    client = make_engine(db.connect(), lax)
    try:
        run = await client.enqueue(lax, {"sku": "A", "amount": "ten"})
        async with idle_engine(db.connect(), strict) as worker:
            assert await worker.tick() == 1
            done = await worker.get_run_status(run.id)
    finally:
        await client.stop(timeout=0)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "validation_error"
    assert "input.amount: expected int, got str 'ten'" in done.error["message"]
    assert done.steps == {}


class Approval(TypedDict):
    approved_by: str
    amount: int


async def test_event_payloads_are_checked_with_their_own_path(storage: Storage) -> None:
    wf = workflow("claim").wait_for_event("approval", schema=Approval).step("a", lambda ctx: None)
    async with idle_engine(storage, wf) as engine:
        run = await engine.enqueue(wf, {})
        with pytest.raises(ValidationError) as caught:
            await engine.send_event(run.id, "approval", {"approved_by": "ada", "amount": 1.5})
    assert "payload.amount: expected int, got float 1.5" in str(caught.value)


def test_an_unsupported_event_schema_names_the_schema_option() -> None:
    class Bad(TypedDict):
        when: timedelta

    with pytest.raises(ConfigError) as caught:
        workflow("claim").wait_for_event("approval", schema=Bad)
    assert caught.value.option == "schema"


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    """Each test builds its checkers anew, so caching bugs cannot hide across tests."""
    saved = dict(_typecheck._cache)
    _typecheck._cache.clear()
    yield
    _typecheck._cache.clear()
    _typecheck._cache.update(saved)
