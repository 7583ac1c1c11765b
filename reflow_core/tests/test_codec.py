"""The tagged JSON codec: plain data in, canonical text out, and back."""

from __future__ import annotations

import enum
import json
import math
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflow_core import SerializationError, codec

PARIS = ZoneInfo("Europe/Paris")

# -- strategies -------------------------------------------------------------

fixed_offsets = st.sampled_from(
    [
        UTC,
        timezone(timedelta(hours=5, minutes=30)),
        timezone(timedelta(hours=-8)),
        timezone(timedelta(minutes=45), "weird-name"),
    ]
)
datetimes = st.one_of(
    st.datetimes(),  # naive
    st.datetimes(timezones=fixed_offsets),
    # Imaginary wall times (inside a DST gap) are covered separately below.
    st.datetimes(timezones=st.timezones(), allow_imaginary=False),
)
keys = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["$datetime", "$escape", "$", "$x", "a b", "1", ""]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
    datetimes,
)
plain = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=25,
)


def same(a: Any, b: Any) -> bool:
    """Strict equality: same types all the way down, datetimes with the same
    wall time, offset, fold and zone (``==`` ignores some of those)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, datetime):
        zone_a = a.tzinfo.key if isinstance(a.tzinfo, ZoneInfo) else None
        zone_b = b.tzinfo.key if isinstance(b.tzinfo, ZoneInfo) else None
        return (
            a.replace(tzinfo=None) == b.replace(tzinfo=None)
            and a.utcoffset() == b.utcoffset()
            and zone_a == zone_b
        )
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


# -- round trip ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(plain)
def test_plain_data_round_trips(value: Any) -> None:
    text = codec.encode(value)
    assert isinstance(text, str)
    assert same(codec.decode(text), value)
    # Bytes decode the same as text (backends may hand back either).
    assert same(codec.decode(text.encode()), value)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_encoding_is_canonical_and_stable(value: Any) -> None:
    text = codec.encode(value)
    assert codec.encode(codec.decode(text)) == text
    # The text is valid, whitespace-free, ASCII-only JSON with sorted keys.
    parsed = json.loads(text)
    assert json.dumps(parsed, sort_keys=True, separators=(",", ":")) == text
    assert text.isascii()


@settings(max_examples=300, deadline=None)
@given(plain)
def test_encode_value_gives_what_decoding_its_text_gives(value: Any) -> None:
    text, again = codec.encode_value(value)
    assert text == codec.encode(value)
    decoded = codec.decode(text)
    assert same(again, decoded)
    # The same key order too: a step's output iterates the same way on the
    # first run as on a replay, which reads it back from the store.
    assert json.dumps(again, default=str) == json.dumps(decoded, default=str)


def test_encode_value_copies_what_it_is_given() -> None:
    value = {"b": [1, {"y": 2, "x": 1}], "a": "text"}
    text, again = codec.encode_value(value)
    assert text == '{"a":"text","b":[1,{"x":1,"y":2}]}'
    assert list(again) == ["a", "b"]
    assert list(again["b"][1]) == ["x", "y"]
    again["b"].append(3)
    assert value["b"] == [1, {"y": 2, "x": 1}]
    assert codec.encode_value({"$tag": 1})[1] == {"$tag": 1}
    with pytest.raises(SerializationError, match=r"at \$\.b\[1\]"):
        codec.encode_value({"b": [1, object()]})


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**80),
        1.5,
        -0.0,
        "",
        "héllo ✓",
        "nul \x00 and a lone surrogate \ud800",
        [],
        {},
        {"nested": [{"a": [1, [2, [3]]]}]},
        datetime(2026, 11, 24, 10, 0),
        datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 24, 10, 0, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
        datetime(2026, 11, 24, 10, 0, tzinfo=PARIS),
        datetime(2026, 7, 1, 10, 0, tzinfo=ZoneInfo("America/New_York")),
        datetime(5, 1, 1),
    ],
)
def test_examples_round_trip(value: Any) -> None:
    assert same(codec.decode(codec.encode(value)), value)


def test_zoneinfo_datetime_keeps_its_zone_key() -> None:
    value = datetime(2026, 11, 24, 10, 0, tzinfo=PARIS)
    text = codec.encode(value)
    assert text == '{"$datetime":"2026-11-24T10:00:00+01:00[Europe/Paris]"}'
    back = codec.decode(text)
    assert isinstance(back.tzinfo, ZoneInfo)
    assert back.tzinfo.key == "Europe/Paris"
    # Arithmetic across a DST change follows the zone, not a fixed offset.
    assert (back + timedelta(days=180)).utcoffset() == timedelta(hours=2)


def test_ambiguous_wall_time_keeps_its_fold() -> None:
    # 02:30 happens twice in Paris on 2026-10-25; fold=1 is the second one.
    first = datetime(2026, 10, 25, 2, 30, tzinfo=PARIS)
    second = first.replace(fold=1)
    assert codec.encode(first) != codec.encode(second)
    assert same(codec.decode(codec.encode(second)), second)
    assert codec.decode(codec.encode(second)).fold == 1


def test_naive_datetime_stays_naive() -> None:
    back = codec.decode(codec.encode(datetime(2026, 1, 2, 3, 4, 5)))
    assert back.tzinfo is None
    assert back == datetime(2026, 1, 2, 3, 4, 5)


def test_imaginary_wall_time_round_trips() -> None:
    value = datetime(2026, 3, 29, 2, 30, tzinfo=PARIS)  # clocks jump 02:00 -> 03:00
    assert codec.decode(codec.encode(value)) == value


# -- canonical text and escaping --------------------------------------------


def test_equal_dicts_encode_to_equal_text() -> None:
    a = {"b": 1, "a": {"y": [1, 2], "x": None}}
    b = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert codec.encode(a) == codec.encode(b) == '{"a":{"x":null,"y":[1,2]},"b":1}'


def test_non_ascii_text_is_escaped_to_ascii_and_restored() -> None:
    text = codec.encode({"name": "Zoë ✓", "nul": "\x00", "half": "\ud83d"})
    assert text == '{"half":"\\ud83d","name":"Zo\\u00eb \\u2713","nul":"\\u0000"}'
    assert codec.decode(text) == {"name": "Zoë ✓", "nul": "\x00", "half": "\ud83d"}


@pytest.mark.parametrize(
    "value",
    [
        {"$datetime": "2026-11-24T10:00:00"},
        {"$escape": {"a": 1}},
        {"$datetime": {"$escape": "x"}},
        {"$escape": {"$escape": {}}},
        {"$anything": 1},
        {"$": None},
    ],
)
def test_user_dicts_that_look_like_tags_are_escaped(value: dict[str, Any]) -> None:
    text = codec.encode(value)
    assert json.loads(text).keys() == {"$escape"}
    back = codec.decode(text)
    assert same(back, value)
    assert not isinstance(back, datetime)


def test_dicts_with_several_dollar_keys_need_no_escape() -> None:
    value = {"$datetime": "2026", "$escape": 1}
    assert json.loads(codec.encode(value)) == value
    assert codec.decode(codec.encode(value)) == value


# -- values that are not plain data --------------------------------------------


class Color(enum.IntEnum):
    RED = 1


class Thing:
    pass


@pytest.mark.parametrize(
    ("value", "path", "fragment"),
    [
        (
            {"items": [{"price": 1}, {"price": 2}, {"price": 3}, {"price": Decimal("9.5")}]},
            "$.items[3].price",
            "Decimal",
        ),
        ({"a": {"pair": (1, 2)}}, "$.a.pair", "tuple"),
        ({"tags": {"x", "y"}}, "$.tags", "set"),
        ({"stats": [0.5, float("nan")]}, "$.stats[1]", "nan"),
        ({"stats": {"max": float("inf")}}, "$.stats.max", "inf"),
        ({"outer": {"inner": {1: "one"}}}, "$.outer.inner", "int"),
        ([[Thing()]], "$[0][0]", "Thing"),
        ({"when": date(2026, 1, 1)}, "$.when", "date"),
        ({"blob": b"raw"}, "$.blob", "bytes"),
        ({"color": Color.RED}, "$.color", "Color"),
        ({"a b": {"c-d": [None, {1.5}]}}, '$["a b"]["c-d"][1]', "set"),
        (Thing(), "$", "Thing"),
    ],
)
def test_not_plain_data_names_the_path(value: Any, path: str, fragment: str) -> None:
    with pytest.raises(SerializationError) as caught:
        codec.encode(value)
    err = caught.value
    assert err.path == path
    assert err.code == "serialization_error"
    assert path in str(err)
    assert fragment in str(err)
    with pytest.raises(SerializationError):
        codec.check_plain(value)


def test_check_plain_accepts_plain_data() -> None:
    codec.check_plain({"a": [1, 2.5, "x", None, True, datetime(2026, 1, 1, tzinfo=UTC)]})


# -- decoding garbage ---------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{'single': 'quotes'}",
        '{"a": 1',
        b"\xff\xfe",
        '{"$datetime": "yesterday"}',
        '{"$datetime": "2026-11-24T10:00:00+01:00[No/Such_Zone]"}',
        '{"$datetime": "2026-11-24T10:00:00[../../etc/passwd]"}',
        '[{"$datetime": "2026-13-45T99:00:00"}]',
    ],
)
def test_decoding_garbage_raises_serialization_error(text: str | bytes) -> None:
    with pytest.raises(SerializationError):
        codec.decode(text)


def test_decoding_a_non_text_raises_serialization_error() -> None:
    with pytest.raises(SerializationError):
        codec.decode(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["NaN", '{"a": Infinity}', "[-Infinity]"])
def test_decoding_non_finite_constants_is_refused(text: str) -> None:
    with pytest.raises(SerializationError):
        codec.decode(text)
