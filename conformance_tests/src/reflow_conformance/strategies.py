"""Hypothesis strategies for the plain data Reflow stores, and a strict comparison.

Plain data is what :mod:`reflow_core.codec` encodes: ``None``, ``bool``,
``int``, finite ``float``, ``str``, ``list``, ``dict`` with ``str`` keys and
:class:`datetime.datetime`. The strategies here lean on the corners a store
is likely to get wrong: integers past 64 bits, NUL and lone surrogates in
text, dict keys that look like the codec's ``$`` tags, and datetimes that are
naive, at a fixed offset, or in a ``zoneinfo`` zone (including wall times in
daylight-saving gaps and overlaps).

Use them in your own tests of an adapter, and compare what comes back with
:func:`same_plain` (``==`` alone lets ``True`` pass for ``1`` and ignores a
datetime's zone)::

    from hypothesis import given
    from reflow_conformance.strategies import plain_values, same_plain

    @given(plain_values())
    def test_my_column(value): ...
"""

from __future__ import annotations

import math
import zoneinfo
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Literal

from hypothesis import strategies as st

__all__ = [
    "BAD_TEXT",
    "ZONE_KEYS",
    "bad_names",
    "datetimes",
    "dict_keys",
    "floats",
    "integers",
    "names",
    "plain_differences",
    "plain_values",
    "same_plain",
    "scalars",
    "texts",
    "utc_millis",
]

_TRICKY_CHARS = ["\x00", "\ud800", "\udfff", "\ud83d", "\u00e9", "\u4e2d", "\U0001f600", '"', "\\"]

_TAG_LIKE_KEYS = ["$", "$datetime", "$escape", "$x", "$$", "$\x00", "$\u00e9"]

_ZONE_CANDIDATES = (
    "UTC",
    "Europe/Paris",
    "Europe/London",
    "America/New_York",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Pacific/Kiritimati",
    "America/St_Johns",
)


def _loadable(key: str) -> bool:
    try:
        zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


ZONE_KEYS: tuple[str, ...] = tuple(key for key in _ZONE_CANDIDATES if _loadable(key))
"""The ``zoneinfo`` zones :func:`datetimes` draws from (those this machine has data for):
zones with daylight saving, half-hour and 45-minute offsets, and UTC."""

# Wall times near daylight-saving transitions (a gap or an overlap within the
# following hours), so ambiguous and imaginary times are drawn often.
_TRANSITIONS: tuple[tuple[str, datetime], ...] = tuple(
    (key, wall)
    for key, wall in (
        ("Europe/Paris", datetime(2026, 3, 29, 1, 30)),
        ("Europe/Paris", datetime(2026, 10, 25, 1, 30)),
        ("America/New_York", datetime(2025, 3, 9, 1, 0)),
        ("America/New_York", datetime(2025, 11, 2, 0, 30)),
        ("Australia/Lord_Howe", datetime(2025, 4, 6, 1, 0)),
        ("Pacific/Chatham", datetime(2025, 4, 6, 2, 30)),
    )
    if key in ZONE_KEYS
)


def integers() -> st.SearchStrategy[int]:
    """Integers, small ones and ones far outside 64 bits (up to about 2**300)."""
    return st.one_of(
        st.integers(min_value=-(2**63), max_value=2**64),
        st.sampled_from([0, -1, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**40, -(10**40)]),
        st.integers(min_value=-(2**300), max_value=2**300),
    )


def floats() -> st.SearchStrategy[float]:
    """Finite floats, including ``-0.0``, subnormals and the extremes."""
    return st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([-0.0, 5e-324, 1.7976931348623157e308, 0.1, 1e16, 2.0**53 + 2]),
    )


def texts(max_size: int = 20) -> st.SearchStrategy[str]:
    """Strings of any code points, lone surrogates and NUL included."""
    chars = st.one_of(st.characters(exclude_categories=()), st.sampled_from(_TRICKY_CHARS))
    return st.text(chars, max_size=max_size)


BAD_TEXT: tuple[object, ...] = ("", "a\x00b", "\x00", "\ud800", "x\udfff", "\ud83d!", 7, b"id")
"""Names, ids and keys that no backend may accept: empty, NUL, lone surrogates, not ``str``."""


def names(max_size: int = 24) -> st.SearchStrategy[str]:
    """Names, run ids and keys every backend must keep exactly: any non-empty
    text without NUL or lone surrogates, with the characters stores and key
    schemes treat specially (quotes, ``%``, ``:``, ``{}``, ``*``, spaces,
    non-ASCII) drawn often."""
    special = st.sampled_from(list(" '\"%_:{}*?[]|\\/\n\t$#@\u00e9\u4e2d\U0001f600"))
    no_surrogates: list[Literal["Cs"]] = ["Cs"]
    chars = st.one_of(
        st.characters(exclude_categories=no_surrogates, exclude_characters="\x00"), special
    )
    return st.text(chars, min_size=1, max_size=max_size)


def bad_names() -> st.SearchStrategy[object]:
    """What :func:`names` never draws and every backend refuses: the fixed
    :data:`BAD_TEXT`, and otherwise good text with a NUL or a lone surrogate inside."""
    poison = st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff"])
    spliced = st.tuples(names(8), poison, names(8)).map(lambda parts: "".join(parts))
    return st.one_of(st.sampled_from(BAD_TEXT), spliced)


def dict_keys() -> st.SearchStrategy[str]:
    """Dict keys: any text, and keys starting with ``$`` like the codec's tags."""
    return st.one_of(
        texts(max_size=8),
        st.sampled_from(_TAG_LIKE_KEYS),
        texts(max_size=6).map(lambda rest: "$" + rest),
    )


def _normal_fold(value: datetime) -> datetime:
    """Keep ``fold=1`` only where it changes the offset: the stored text carries
    the offset, not the fold, so elsewhere ``fold`` is not part of the value."""
    if value.fold and value.replace(fold=0).utcoffset() == value.utcoffset():
        return value.replace(fold=0)
    return value


@st.composite
def _zoned(draw: st.DrawFn) -> datetime:
    key = draw(st.sampled_from(ZONE_KEYS))
    wall = draw(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)))
    fold = draw(st.sampled_from([0, 1]))
    return _normal_fold(wall.replace(tzinfo=zoneinfo.ZoneInfo(key), fold=fold))


@st.composite
def _near_transition(draw: st.DrawFn) -> datetime:
    key, start = draw(st.sampled_from(_TRANSITIONS))
    offset = draw(st.integers(min_value=0, max_value=3 * 3600 * 10**6))
    fold = draw(st.sampled_from([0, 1]))
    wall = start + timedelta(microseconds=offset)
    return _normal_fold(wall.replace(tzinfo=zoneinfo.ZoneInfo(key), fold=fold))


def _fixed_offsets() -> st.SearchStrategy[tzinfo]:
    minutes = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1)
    return st.one_of(
        st.just(UTC),
        minutes.map(lambda m: timezone(timedelta(minutes=m))),
    )


def datetimes() -> st.SearchStrategy[datetime]:
    """Datetimes: naive, at a fixed offset (whole minutes, unnamed), or in a
    ``zoneinfo`` zone from :data:`ZONE_KEYS`, often near a daylight-saving gap
    or overlap. ``fold`` is 1 only where it changes the offset."""
    options: list[st.SearchStrategy[datetime]] = [
        st.datetimes().map(_normal_fold),
        st.datetimes(timezones=_fixed_offsets()).map(_normal_fold),
    ]
    if ZONE_KEYS:
        options.append(_zoned())
    if _TRANSITIONS:
        options.append(_near_transition())
    return st.one_of(options)


def utc_millis(
    min_value: datetime = datetime(2000, 1, 1, tzinfo=UTC),
    max_value: datetime = datetime(2200, 1, 1, tzinfo=UTC),
) -> st.SearchStrategy[datetime]:
    """Aware UTC datetimes in whole milliseconds: the precision the storage
    contract promises for its own time values (schedule slots, for example)."""
    low = math.ceil(min_value.timestamp() * 1000)
    high = math.floor(max_value.timestamp() * 1000)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return st.integers(min_value=low, max_value=high).map(
        lambda ms: epoch + timedelta(milliseconds=ms)
    )


def scalars() -> st.SearchStrategy[Any]:
    """Plain values that are not containers."""
    return st.one_of(st.none(), st.booleans(), integers(), floats(), texts(), datetimes())


def plain_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any plain data: scalars, and lists and dicts of plain data, nested."""

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(dict_keys(), children, max_size=5),
            # Exactly one "$" key: what the codec must escape so it is not read as a tag.
            st.builds(lambda key, item: {key: item}, st.sampled_from(_TAG_LIKE_KEYS), children),
        )

    return st.recursive(scalars(), containers, max_leaves=max_leaves)


def _same_tz(a: tzinfo | None, b: tzinfo | None) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, zoneinfo.ZoneInfo) or isinstance(b, zoneinfo.ZoneInfo):
        return (
            isinstance(a, zoneinfo.ZoneInfo) and isinstance(b, zoneinfo.ZoneInfo) and a.key == b.key
        )
    return type(a) is type(b) and a == b


def plain_differences(expected: object, actual: object, path: str = "$") -> list[str]:
    """Where ``actual`` differs from ``expected``, strictly: types must be the
    same (``True`` is not ``1``, ``1.0`` is not ``1``), floats keep their sign,
    and a datetime keeps its wall time, its zone or offset and its fold. Dict
    key order is not compared (encoded text sorts keys). Empty when the same."""
    if type(actual) is not type(expected):
        return [
            f"{path}: {actual!r} ({type(actual).__name__}) != "
            f"{expected!r} ({type(expected).__name__})"
        ]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(actual)} items != {len(expected)} items"]
        found: list[str] = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            found += plain_differences(e, a, f"{path}[{i}]")
        return found
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            return [f"{path}: keys {sorted(actual)!r} != {sorted(expected)!r}"]
        found = []
        for key in expected:
            found += plain_differences(expected[key], actual[key], f"{path}[{key!r}]")
        return found
    if isinstance(expected, float) and isinstance(actual, float):
        same = expected == actual and math.copysign(1, expected) == math.copysign(1, actual)
        return [] if same else [f"{path}: {actual!r} != {expected!r}"]
    if isinstance(expected, datetime) and isinstance(actual, datetime):
        same = (
            expected.replace(tzinfo=None) == actual.replace(tzinfo=None)
            and _same_tz(expected.tzinfo, actual.tzinfo)
            and expected.utcoffset() == actual.utcoffset()
            and expected.fold == actual.fold
        )
        if same:
            return []
        return [
            f"{path}: {actual!r} (offset {actual.utcoffset()}, fold {actual.fold}) != "
            f"{expected!r} (offset {expected.utcoffset()}, fold {expected.fold})"
        ]
    return [] if expected == actual else [f"{path}: {actual!r} != {expected!r}"]


def same_plain(expected: object, actual: object) -> bool:
    """True if ``actual`` is exactly ``expected`` (see :func:`plain_differences`)."""
    return not plain_differences(expected, actual)
