"""The tagged JSON codec every backend stores values with.

Plain data is ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list``
and ``dict`` with ``str`` keys, plus :class:`datetime.datetime`. Anything else
(tuples, sets, bytes, objects, NaN) is refused with a
:class:`~reflow_core.errors.SerializationError` naming where it was found, for
example ``$.items[3].price``. Nothing is ever pickled: stored data is not
trusted code.

Values may nest at most :data:`MAX_DEPTH` lists and dicts deep. The limit is
checked while encoding, so anything :func:`encode` accepts, :func:`decode`
reads back; a deeper value, or one that contains itself, is a
``SerializationError`` naming the path. Decoding refuses deeper stored text the
same way, never with a ``RecursionError``.

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
* ``{"$wait_timed_out": {"event": ..., "deadline": ...}}``: a
  :class:`WaitTimedOut`, the value a wait with ``on_timeout="continue"``
  passes on when its event did not come in time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import SerializationError

__all__ = [
    "MAX_DEPTH",
    "JSONValue",
    "WaitTimedOut",
    "check_plain",
    "decode",
    "encode",
    "encode_value",
]

JSONValue: TypeAlias = (
    "bool | int | float | str | datetime | list[JSONValue] | dict[str, JSONValue] | None"
)

MAX_DEPTH = 100
"""How many lists and dicts deep a value may nest (a scalar is depth 0, ``[1]``
depth 1). Far beyond any real document, and well inside the interpreter's
recursion limit for every step of encoding, storing and decoding."""

_DATETIME = "$datetime"
_ESCAPE = "$escape"
_WAIT_TIMED_OUT = "$wait_timed_out"


@dataclass(frozen=True, slots=True)
class WaitTimedOut:
    """What a wait for an event declared with ``on_timeout="continue"`` passes
    to the next step (as ``ctx.prev``) when no event came before its timeout.

    It is saved as the wait's result, so a replayed run sees the same value,
    and it is plain data to the codec: a step may return it or put it in its
    output."""

    event: str
    """The event that was waited for."""
    deadline: datetime
    """When the wait timed out, by the storage's clock."""


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


class _TooDeep(Exception):
    """Internal: nesting passed MAX_DEPTH; collects the containers on the way out."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.chain: list[tuple[object, str]] = []


def _to_json(value: object, path: str, depth: int) -> Any:
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
    if kind is dict or kind is list:
        if depth >= MAX_DEPTH:
            raise _TooDeep(path)
        try:
            if kind is list:
                items: list[object] = value  # type: ignore[assignment]
                return [_to_json(item, _child(path, i), depth + 1) for i, item in enumerate(items)]
            out: dict[str, Any] = {}
            for key, item in value.items():  # type: ignore[attr-defined]
                if type(key) is not str:
                    raise SerializationError(
                        f"dict key {key!r} is {type(key).__name__}, not str", path=path
                    )
                out[key] = _to_json(item, _child(path, key), depth + 1)
        except _TooDeep as exc:
            exc.chain.append((value, path))
            raise
        if len(out) == 1 and next(iter(out)).startswith("$"):
            return {_ESCAPE: out}
        return out
    if kind is datetime:
        return {_DATETIME: _datetime_text(value)}  # type: ignore[arg-type]
    if kind is WaitTimedOut:
        marker: WaitTimedOut = value  # type: ignore[assignment]
        return {
            _WAIT_TIMED_OUT: {
                "event": marker.event,
                "deadline": {_DATETIME: _datetime_text(marker.deadline)},
            }
        }
    raise SerializationError(
        f"{kind.__qualname__} is not plain data (use None, bool, int, finite float, str, "
        "list, dict with str keys or datetime)",
        path=path,
    )


class _NotPlain(Exception):
    """Internal: :func:`_fast_json` met something it does not take as it is."""


def _fast_json(value: object, depth: int) -> Any:
    """:func:`_to_json` without the paths its errors name: what every encode
    runs first. Anything it does not take (an error, a datetime, a tag to
    escape) raises :class:`_NotPlain`, and :func:`_to_json` does it again."""
    kind = type(value)
    if kind is str or kind is int or value is None or value is True or value is False:
        return value
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _NotPlain
        return value
    if depth >= MAX_DEPTH:
        raise _NotPlain
    if kind is list:
        items: list[object] = value  # type: ignore[assignment]
        return [_fast_json(item, depth + 1) for item in items]
    if kind is dict:
        # Keys in the order the encoder writes them and decode reads them
        # back, so the tree equals what decoding its text gives.
        mapping: dict[Any, object] = value  # type: ignore[assignment]
        out: dict[str, Any] = {}
        try:
            keys = sorted(mapping)
        except TypeError:  # keys that do not compare: not all str
            raise _NotPlain from None
        for key in keys:
            if type(key) is not str or key[:1] == "$":
                raise _NotPlain
            out[key] = _fast_json(mapping[key], depth + 1)
        return out
    raise _NotPlain


def _plain(value: object) -> Any:
    """``value`` as JSON-ready data, or a SerializationError naming the path."""
    try:
        return _fast_json(value, 0)
    except (_NotPlain, RecursionError):
        pass
    try:
        return _to_json(value, "$", 0)
    except _TooDeep as exc:
        # The containers from the root down to where the limit was passed: a
        # value met twice on that chain contains itself.
        seen: dict[int, str] = {}
        for container, path in reversed(exc.chain):
            first = seen.setdefault(id(container), path)
            if first != path:
                raise SerializationError(
                    f"value contains itself (it is the same object as {first})", path=path
                ) from None
        raise SerializationError(
            f"value is nested more than {MAX_DEPTH} lists and dicts deep", path=exc.path
        ) from None


def check_plain(value: object) -> None:
    """Raise :class:`SerializationError` if ``value`` is not plain data."""
    _plain(value)


def encode(value: object) -> str:
    """Encode plain data as canonical tagged JSON text."""
    return _encoder.encode(_plain(value))


def encode_value(value: object) -> tuple[str, Any]:
    """``encode(value)``, and the value ``decode`` gives back from that text
    (fresh lists and dicts, keys in order), without decoding it when the
    value holds nothing tagged: what a step's result becomes for the steps
    after it, the same on the first run as on a replay."""
    try:
        tree = _fast_json(value, 0)
    except (_NotPlain, RecursionError):
        text = encode(value)
        return text, decode(text)
    return _encoder.encode(tree), tree


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


class _Decoder(json.JSONDecoder):
    """JSON that refuses ``NaN`` and the infinities, as :func:`encode` never writes them."""

    def __init__(self, **options: Any) -> None:
        super().__init__(parse_constant=_refuse_constant, **options)


_decoder = _Decoder()


def _from_json(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is dict or kind is list:
        if depth >= MAX_DEPTH:
            raise SerializationError(
                f"stored value is nested more than {MAX_DEPTH} lists and dicts deep"
            )
        depth += 1
        if kind is list:
            return [_from_json(item, depth) for item in value]
        if len(value) == 1:
            key, item = next(iter(value.items()))
            if key == _DATETIME and type(item) is str:
                return _parse_datetime(item)
            if key == _ESCAPE and type(item) is dict:
                value = item
            elif key == _WAIT_TIMED_OUT and type(item) is dict:
                return _wait_timed_out(item)
        return {k: _from_json(v, depth) for k, v in value.items()}
    return value


def _wait_timed_out(item: dict[str, Any]) -> WaitTimedOut:
    event = item.get("event")
    stamp = item.get("deadline")
    if (
        type(event) is not str
        or type(stamp) is not dict
        or type(stamp.get(_DATETIME)) is not str
        or len(item) != 2
    ):
        raise SerializationError(f"stored {_WAIT_TIMED_OUT} marker is malformed: {item!r}")
    return WaitTimedOut(event, _parse_datetime(stamp[_DATETIME]))


def decode(text: str | bytes) -> Any:
    """Decode text written by :func:`encode`.

    Raises :class:`SerializationError` for text that is not valid tagged JSON
    or is nested more than :data:`MAX_DEPTH` deep.
    """
    try:
        # One decoder for every call (json.loads with an option builds a new one each time).
        value = _decoder.decode(text) if type(text) is str else json.loads(text, cls=_Decoder)
        # Tags always contain "$"; text without one needs no second pass.
        if (b"$" in text) if isinstance(text, bytes) else ("$" in text):
            return _from_json(value, 0)
        return value
    except SerializationError:
        raise
    except RecursionError:
        raise SerializationError(
            f"stored value is nested more than {MAX_DEPTH} lists and dicts deep"
        ) from None
    except (ValueError, TypeError) as exc:
        raise SerializationError(f"stored value is not valid tagged JSON ({exc})") from exc
