"""The tagged JSON codec every backend stores values with.

Plain data is ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list``
and ``dict`` with ``str`` keys, plus :class:`datetime.datetime`. Anything else
(tuples, sets, bytes, objects, NaN) is refused with a
:class:`~reflow_core.errors.SerializationError` naming where it was found, for
example ``$.items[3].price``. Nothing is ever pickled: stored data is not
trusted code.

The text is canonical and ASCII-only: keys sorted, no whitespace, every
non-ASCII character escaped. Equal values therefore encode to equal text,
which is what idempotency checks compare, and any store that keeps text
(even one that refuses NUL or lone surrogates) keeps it exactly.

Tags are one-key objects whose key starts with ``$``:

* ``{"$datetime": "2026-11-24T10:00:00+01:00[Europe/Paris]"}``: an ISO 8601
  datetime. Aware datetimes keep their offset, and a ``zoneinfo`` zone keeps
  its key in an RFC 9557 suffix. Naive datetimes stay naive.
* ``{"$escape": {...}}``: a user dict that itself has exactly one key starting
  with ``$``, so it can never be mistaken for a tag.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import SerializationError

__all__ = ["JSONValue", "check_plain", "decode", "encode"]

JSONValue: TypeAlias = (
    "bool | int | float | str | datetime | list[JSONValue] | dict[str, JSONValue] | None"
)

_DATETIME = "$datetime"
_ESCAPE = "$escape"

# ASCII-only text: every character outside ASCII (NUL and lone surrogates
# included) is a \u escape, so any store that takes text can keep it exactly.
_encoder = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, sort_keys=True, separators=(",", ":")
)


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _datetime_text(value: datetime) -> str:
    text = value.isoformat()
    if isinstance(value.tzinfo, ZoneInfo):
        text += f"[{value.tzinfo.key}]"
    return text


def _to_json(value: object, path: str) -> Any:
    # Order matters: bool is an int, and exact type checks keep str/int
    # subclasses (enums, numpy scalars) from slipping through as plain data.
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is str or kind is int:
        return value
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise SerializationError(f"float {value!r} is not finite", path=path)
        return value
    if kind is dict:
        out: dict[str, Any] = {}
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise SerializationError(
                    f"dict key {key!r} is {type(key).__name__}, not str", path=path
                )
            out[key] = _to_json(item, _child(path, key))
        if len(out) == 1 and next(iter(out)).startswith("$"):
            return {_ESCAPE: out}
        return out
    if kind is list:
        items: list[object] = value  # type: ignore[assignment]
        return [_to_json(item, _child(path, i)) for i, item in enumerate(items)]
    if kind is datetime:
        return {_DATETIME: _datetime_text(value)}  # type: ignore[arg-type]
    raise SerializationError(
        f"{kind.__qualname__} is not plain data (use None, bool, int, finite float, str, "
        "list, dict with str keys or datetime)",
        path=path,
    )


def check_plain(value: object) -> None:
    """Raise :class:`SerializationError` if ``value`` is not plain data."""
    _to_json(value, "$")


def encode(value: object) -> str:
    """Encode plain data as canonical tagged JSON text."""
    return _encoder.encode(_to_json(value, "$"))


def _parse_datetime(text: str) -> datetime:
    zone = None
    if text.endswith("]") and "[" in text:
        text, _, key = text[:-1].partition("[")
        try:
            zone = ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise SerializationError(f"unknown time zone {key!r}") from exc
    value = datetime.fromisoformat(text)
    if zone is None:
        return value
    # Keep the wall time and pick the fold whose offset was stored, so a time
    # in a DST gap or overlap comes back exactly as it was written.
    offset = value.utcoffset()
    for fold in (0, 1):
        candidate = value.replace(tzinfo=zone, fold=fold)
        if candidate.utcoffset() == offset:
            return candidate
    return value.astimezone(zone)


def _refuse_constant(name: str) -> Any:
    raise SerializationError(f"stored value contains {name}, which is not JSON")


def _from_json(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        if len(value) == 1:
            key, item = next(iter(value.items()))
            if key == _DATETIME and type(item) is str:
                return _parse_datetime(item)
            if key == _ESCAPE and type(item) is dict:
                return {k: _from_json(v) for k, v in item.items()}
        return {k: _from_json(v) for k, v in value.items()}
    if kind is list:
        return [_from_json(item) for item in value]
    return value


def decode(text: str | bytes) -> Any:
    """Decode text written by :func:`encode`.

    Raises :class:`SerializationError` for text that is not valid tagged JSON.
    """
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
        # Tags always contain "$"; text without one needs no second pass.
        if (b"$" in text) if isinstance(text, bytes) else ("$" in text):
            return _from_json(value)
        return value
    except SerializationError:
        raise
    except (ValueError, TypeError) as exc:
        raise SerializationError(f"stored value is not valid tagged JSON ({exc})") from exc
