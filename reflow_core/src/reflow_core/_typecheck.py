"""Checking plain data against the field types of a dataclass or TypedDict.

This is how ``workflow(name, input=Cls)`` validates a dataclass when pydantic
is not installed, and a ``TypedDict`` always. It covers what plain data (the
codec's JSON plus datetimes) can carry:

* ``int`` (a ``bool`` is not an ``int``), ``float`` (an ``int`` is widened to
  ``float``), ``str``, ``bool``, ``None``, ``Any`` and ``object``;
* ``list[T]``, ``Sequence[T]``, ``tuple[T, ...]``, ``tuple[A, B]``,
  ``dict[K, V]`` and ``Mapping[K, V]`` (a JSON array or object; tuples are
  built from arrays);
* ``X | Y``, ``Optional[X]``, ``Literal[...]`` and enums (by value, the type
  of the value included);
* ``datetime`` (a ``datetime``, or an ISO 8601 string);
* nested dataclasses and TypedDicts (``total=False``, ``Required`` and
  ``NotRequired`` keys), ``Annotated`` and ``NewType`` (checked as their
  underlying type); type variables are not checked.

Nothing else is converted: ``"10"`` is not an ``int`` and ``1.0`` is not an
``int``. Keys a dataclass or TypedDict does not declare are rejected. A field
of any other type is a :class:`~reflow_core.errors.ConfigError` when the
workflow is defined, never a silent pass.

String annotations (``from __future__ import annotations``) are resolved with
:func:`typing.get_type_hints` in the class's module, when the checker is built.
Checkers are built once per class and cached.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import json
import threading
import types
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from .errors import ConfigError

__all__ = ["TypeMismatch", "is_typeddict_class", "type_validator"]

Convert = Callable[[Any], Any]
_Loc = tuple[str | int, ...]

_NOT_GIVEN: Any = object()


class TypeMismatch(ValueError):
    """Plain data does not match a declared type.

    ``path`` names the first offending value, for example
    ``input.items[2].amount``; ``issue`` describes it the way pydantic does
    (``type``, ``loc``, ``msg`` and, when there is one, ``input``).
    """

    def __init__(self, path: str, issue: Mapping[str, Any]) -> None:
        super().__init__(f"{path}: {issue['msg']}")
        self.path = path
        self.issue = dict(issue)


class _Mismatch(Exception):
    """Internal: raised where the value is wrong; containers add their key on the way out."""

    def __init__(self, kind: str, msg: str, value: Any = _NOT_GIVEN) -> None:
        self.kind = kind
        self.msg = msg
        self.value = value
        self.loc: list[str | int] = []  # innermost first

    def at(self, key: str | int) -> _Mismatch:
        self.loc.append(key)
        return self


class _Unsupported(Exception):
    """Internal: a type this module cannot check; ``where`` grows on the way out."""

    def __init__(self, tp: object, message: str = "") -> None:
        self.tp = tp
        self.message = message
        self.where: list[str] = []  # innermost first


# -- describing values and types ----------------------------------------------


def _describe(value: Any) -> str:
    kind = type(value).__name__
    if value is None:
        return "None"
    if isinstance(value, str | int | float | datetime | enum.Enum):
        text = repr(value)
        if len(text) > 60:
            text = text[:57] + "..."
        return f"{kind} {text}"
    return kind


def _type_name(tp: Any) -> str:
    if tp is type(None) or tp is None:
        return "None"
    if tp is Ellipsis:
        return "..."
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is typing.Annotated:
        return _type_name(tp.__origin__)
    if origin is not None:
        name = getattr(origin, "__name__", None) or repr(origin)
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    name = getattr(tp, "__name__", None)
    return name if isinstance(name, str) else repr(tp).replace("typing.", "")


def _path(root: str, loc: _Loc) -> str:
    parts = [root]
    for key in loc:
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif key.isidentifier():
            parts.append(f".{key}")
        else:
            parts.append(f"[{json.dumps(key, ensure_ascii=False)}]")
    return "".join(parts)


def _key(key: object) -> str | int:
    return key if isinstance(key, str) else repr(key)


def _type_error(expected: str, value: Any) -> _Mismatch:
    return _Mismatch(f"{expected}_type", f"expected {expected}, got {_describe(value)}", value)


# -- scalars --------------------------------------------------------------------


def _any(value: Any) -> Any:
    return value


def _none(value: Any) -> Any:
    if value is None:
        return None
    raise _Mismatch("none_required", f"expected None, got {_describe(value)}", value)


def _int(value: Any) -> Any:
    if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise _type_error("int", value)


def _float(value: Any) -> Any:
    if type(value) is float:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise _Mismatch(
                "float_type", f"expected float, got an int too large for a float: {value}", value
            ) from None
    if isinstance(value, float):
        return value
    raise _type_error("float", value)


def _str(value: Any) -> Any:
    if isinstance(value, str):
        return value
    raise _type_error("str", value)


def _bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    raise _type_error("bool", value)


def _datetime(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    raise _Mismatch(
        "datetime_type",
        f"expected datetime (or an ISO 8601 string), got {_describe(value)}",
        value,
    )


_SCALARS: dict[Any, Convert] = {
    int: _int,
    float: _float,
    str: _str,
    bool: _bool,
    type(None): _none,
    None: _none,
    datetime: _datetime,
    Any: _any,
    object: _any,
}

# Types whose value passes unchanged when its type is exactly the member's:
# a union checks these first, so ``int | float`` and ``float | int`` agree.
_EXACT = {int: int, float: float, str: str, bool: bool, type(None): type(None)}


# -- containers -------------------------------------------------------------------


def _list(item: Convert, expected: str) -> Convert:
    def convert(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise _type_error(expected, value)
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except _Mismatch as exc:
                raise exc.at(index) from None
        return out

    return convert


def _tuple(items: tuple[Convert, ...], expected: str) -> Convert:
    def convert(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise _type_error(expected, value)
        if len(value) != len(items):
            raise _Mismatch(
                "tuple_length",
                f"expected {expected} of {len(items)} items, got {len(value)}",
                value,
            )
        out = []
        for index, (check, element) in enumerate(zip(items, value, strict=True)):
            try:
                out.append(check(element))
            except _Mismatch as exc:
                raise exc.at(index) from None
        return tuple(out)

    return convert


def _tuple_of(item: Convert) -> Convert:
    as_list = _list(item, "tuple")

    def convert(value: Any) -> Any:
        return tuple(as_list(value))

    return convert


def _dict(key: Convert, item: Convert) -> Convert:
    plain_keys = key is _str or key is _any

    def convert(value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _type_error("dict", value)
        out = {}
        for raw_key, element in value.items():
            k = raw_key
            if not plain_keys:
                try:
                    k = key(raw_key)
                except _Mismatch as exc:
                    exc.msg = f"key: {exc.msg}"
                    raise exc.at(_key(raw_key)) from None
            elif not isinstance(raw_key, str) and key is _str:
                raise _Mismatch(
                    "str_type", f"key: expected str, got {_describe(raw_key)}", raw_key
                ).at(_key(raw_key))
            try:
                out[k] = item(element)
            except _Mismatch as exc:
                raise exc.at(_key(raw_key)) from None
        return out

    return convert


def _union(members: tuple[Any, ...]) -> Convert:
    checks = tuple(_build(m) for m in members)
    exact = frozenset(_EXACT[m] for m in members if m in _EXACT)
    expected = " | ".join(_type_name(m) for m in members)

    def convert(value: Any) -> Any:
        if type(value) in exact:
            return value
        failures = []
        for check in checks:
            try:
                return check(value)
            except _Mismatch as exc:
                failures.append(exc)
        # A value that got past the outer check of exactly one member (a dict
        # for the one dataclass of ``Item | None``) is reported where it failed.
        deeper = [exc for exc in failures if exc.loc]
        if len(deeper) == 1:
            raise deeper[0]
        raise _Mismatch("union", f"expected {expected}, got {_describe(value)}", value)

    return convert


def _literal(values: tuple[Any, ...]) -> Convert:
    allowed = frozenset((type(v), v) for v in values)
    expected = "one of " + ", ".join(repr(v) for v in values)

    def convert(value: Any) -> Any:
        try:
            if (type(value), value) in allowed:
                return value
        except TypeError:  # unhashable: a list or dict is never a literal
            pass
        raise _Mismatch("literal_error", f"expected {expected}, got {_describe(value)}", value)

    return convert


def _enum(cls: type[enum.Enum]) -> Convert:
    by_value = {(type(m.value), m.value): m for m in cls}
    expected = f"{cls.__name__} (one of {', '.join(repr(m.value) for m in cls)})"

    def convert(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        try:
            return by_value[(type(value), value)]
        except (KeyError, TypeError):
            raise _Mismatch("enum", f"expected {expected}, got {_describe(value)}", value) from None

    return convert


# -- dataclasses and TypedDicts -----------------------------------------------------

_cache: dict[type, Convert] = {}
_lock = threading.RLock()


def is_typeddict_class(tp: object) -> bool:
    """Whether ``tp`` is a ``TypedDict`` class (from ``typing`` or ``typing_extensions``)."""
    return (
        isinstance(tp, type)
        and issubclass(tp, dict)
        and hasattr(tp, "__required_keys__")
        and hasattr(tp, "__optional_keys__")
    )


def _hints(cls: type, *, extras: bool) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, localns={cls.__name__: cls}, include_extras=extras)
    except Exception as exc:  # NameError for an unknown name, anything an annotation raises
        raise _Unsupported(
            cls,
            f"cannot resolve the annotations of {cls.__name__} ({type(exc).__name__}: "
            f"{exc}); they must name types importable from its module",
        ) from None


def _unknown_key(value: Mapping[Any, Any], known: Mapping[str, object], owner: str) -> _Mismatch:
    for k in value:
        if k not in known:
            return _Mismatch("unexpected_key", f"{owner} has no field of this name").at(_key(k))
    raise AssertionError("no unknown key")  # pragma: no cover - callers counted one


def _fields(
    value: Mapping[Any, Any],
    fields: dict[str, Convert],
    required: set[str],
    owner: str,
    kind: str,
) -> dict[str, Any]:
    """The converted fields of an object given as a mapping: each checked,
    the missing required ones and any unknown one refused."""
    out = {}
    for name, check in fields.items():
        element = value.get(name, _NOT_GIVEN)
        if element is _NOT_GIVEN:
            if name in required:
                raise _Mismatch("missing", f"missing required {kind}").at(name)
            continue
        try:
            out[name] = check(element)
        except _Mismatch as exc:
            raise exc.at(name) from None
    if len(out) != len(value):
        raise _unknown_key(value, fields, owner)
    return out


def _dataclass(cls: type) -> Convert:
    owner = cls.__name__
    fields: dict[str, Convert] = {}
    required: set[str] = set()

    def convert(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch(
                "dataclass_type", f"expected {owner} (an object), got {_describe(value)}", value
            )
        return cls(**_fields(value, fields, required, owner, "field"))

    _cache[cls] = convert  # before the fields, so a class may refer to itself
    hints = _hints(cls, extras=False)
    for field in getattr(cls, "__dataclass_fields__", {}).values():
        hint = hints.get(field.name, Any)
        if typing.get_origin(hint) is typing.ClassVar or hint is typing.ClassVar:
            continue
        if not field.init:
            continue
        if isinstance(hint, dataclasses.InitVar):
            hint = hint.type
        try:
            fields[field.name] = _build(hint)
        except _Unsupported as exc:
            exc.where.append(f"{owner}.{field.name}")
            raise
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            required.add(field.name)
    return convert


_REQUIRED = typing.Required
_NOT_REQUIRED = typing.NotRequired
_READ_ONLY = getattr(typing, "ReadOnly", None)


def _typeddict(cls: type) -> Convert:
    owner = cls.__name__
    fields: dict[str, Convert] = {}
    required: set[str] = set()

    def convert(value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Mismatch(
                "dict_type", f"expected {owner} (an object), got {_describe(value)}", value
            )
        return _fields(value, fields, required, owner, "key")

    _cache[cls] = convert
    declared_required: frozenset[str] = getattr(cls, "__required_keys__", frozenset())
    for name, hint in _hints(cls, extras=True).items():
        is_required = name in declared_required
        # Explicit markers win: under ``from __future__ import annotations``
        # Python 3.11 does not see them when it computes ``__required_keys__``.
        while True:
            origin = typing.get_origin(hint)
            if origin is _REQUIRED:
                is_required = True
            elif origin is _NOT_REQUIRED:
                is_required = False
            elif origin is typing.Annotated:
                hint = hint.__origin__
                continue
            elif _READ_ONLY is None or origin is not _READ_ONLY:
                break
            hint = typing.get_args(hint)[0]
        try:
            fields[name] = _build(hint)
        except _Unsupported as exc:
            exc.where.append(f"{owner}.{name}")
            raise
        if is_required:
            required.add(name)
    return convert


def _class(cls: type, build: Callable[[type], Convert]) -> Convert:
    with _lock:
        cached = _cache.get(cls)
        if cached is not None:
            return cached
        try:
            return build(cls)
        except BaseException:
            _cache.pop(cls, None)
            raise


# -- building ---------------------------------------------------------------------------


def _build(tp: Any) -> Convert:
    try:
        scalar = _SCALARS.get(tp)
    except TypeError:  # an unhashable annotation
        scalar = None
    if scalar is not None:
        return scalar
    if isinstance(tp, typing.TypeVar):
        return _any
    if isinstance(tp, typing.NewType):
        return _build(tp.__supertype__)
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return _class(tp, _dataclass)
        if is_typeddict_class(tp):
            return _class(tp, _typeddict)
        if issubclass(tp, enum.Enum):
            return _class(tp, _enum)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp in (list, collections.abc.Sequence) or origin in (list, collections.abc.Sequence):
        return _list(_build(args[0]) if args else _any, "list")
    if tp is tuple or origin is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return _tuple_of(_build(args[0]) if args else _any)
        if args == ((),):
            return _tuple((), "tuple")
        return _tuple(tuple(_build(a) for a in args), "tuple")
    if tp in (dict, collections.abc.Mapping) or origin in (dict, collections.abc.Mapping):
        return _dict(_build(args[0]), _build(args[1])) if args else _dict(_any, _any)
    if origin is typing.Union or origin is types.UnionType:
        return _union(args)
    if origin is typing.Literal:
        return _literal(args)
    if origin is typing.Annotated:
        return _build(tp.__origin__)
    if isinstance(origin, type) and dataclasses.is_dataclass(origin):
        return _build(origin)  # a generic dataclass: its type variables are not checked
    raise _Unsupported(tp)


def type_validator(tp: type, *, root: str, context: str, option: str) -> Convert:
    """A function checking plain data against the dataclass or TypedDict ``tp``.

    It returns the converted value (a ``tp`` instance for a dataclass, a new
    dict for a TypedDict) or raises :class:`TypeMismatch` with the path of the
    first bad value under ``root``. Raises
    :class:`~reflow_core.errors.ConfigError` (naming ``context`` and
    ``option``) for a field type it cannot check.
    """
    with _lock:
        before = set(_cache)
        try:
            convert = _build(tp)
        except _Unsupported as exc:
            # Classes built on the way may refer to the one that failed: drop them all.
            for cls in set(_cache) - before:
                del _cache[cls]
            message = exc.message or (
                f"field {exc.where[0] if exc.where else _type_name(tp)} has type "
                f"{_type_name(exc.tp)}, which cannot be checked without pydantic"
            )
            raise ConfigError(
                f"{context}: {message}. Without pydantic, input= checks JSON types, "
                "datetimes, enums, Literal, unions, dataclasses and TypedDicts; install "
                "pydantic or pass a validator function for anything else",
                option=option,
            ) from None

    def validate(raw: Any) -> Any:
        try:
            return convert(raw)
        except _Mismatch as exc:
            loc = tuple(reversed(exc.loc))
            path = _path(root, loc)
            issue: dict[str, Any] = {"type": exc.kind, "loc": loc, "msg": exc.msg}
            if exc.value is not _NOT_GIVEN:
                issue["input"] = exc.value
            raise TypeMismatch(path, issue) from None

    return validate
