"""No spelling of a password shows in ``repr``, errors, their causes or logs:
URL user info or query (upper- or lower-case escapes, ``+`` or ``%20`` for a
space), a libpq ``key=value`` string, or ``connect_kwargs``; through
``open_storage`` and the constructor alike."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reflow_core import ConfigError, ReflowError, open_storage
from reflow_postgres import PostgresStorage

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1
FAST = "pool_timeout=0.05"


def _hex_case(text: str, upper: bool) -> str:
    return re.sub(r"%[0-9A-Fa-f]{2}", lambda m: m[0].upper() if upper else m[0].lower(), text)


def forms_of(password: str, *written: str) -> set[str]:
    """The texts that would give ``password`` away: itself, how it was
    written, and its percent-encoded forms (either case of hex, either
    spelling of a space)."""
    found = {password, *written}
    for encoded in (quote(password, safe=""), quote_plus(password, safe="")):
        found |= {_hex_case(encoded, True), _hex_case(encoded, False)}
    return {f for f in found if f}


def _libpq_quoted(value: str) -> str:
    """``value`` as a libpq ``key=value`` string writes it."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_SPECIAL = " +%@/:#?&=\\'\"éß€😀"
passwords = st.text(
    st.one_of(
        st.sampled_from(_SPECIAL),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    min_size=3,
    max_size=16,
).filter(lambda p: p.strip("*") != "")

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
RAW_IN_USER_INFO = _ALNUM + "-._~!$&'()*+,;=:"  # never '@': libpq stops at the first
RAW_IN_QUERY = _ALNUM + "-._~!$'()*,:@/?"


@st.composite
def spelled(draw: st.DrawFn, password: str, *, raw: str, plus_for_space: bool) -> str:
    """``password`` spelled character by character: as itself (if in ``raw``),
    ``+`` for a space, or percent-encoded with upper- or lower-case hex."""
    out = []
    for char in password:
        if char == " " and plus_for_space and draw(st.booleans()):
            out.append("+")
        elif char in raw and draw(st.booleans()):
            out.append(char)
        else:
            out.append(_hex_case(quote(char, safe=""), draw(st.booleans())))
    return "".join(out)


@dataclass(frozen=True)
class Case:
    password: str
    written: str
    path: str
    build: Callable[[], PostgresStorage]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    password = draw(passwords)
    path = draw(
        st.sampled_from(
            [
                "open_storage, user info",
                "open_storage, query",
                "constructor, user info",
                "constructor, query",
                "constructor, key=value",
                "open_storage, connect_kwargs",
            ]
        )
    )
    written = password
    kwargs: dict[str, Any] = {}
    if "user info" in path:
        written = draw(spelled(password, raw=RAW_IN_USER_INFO, plus_for_space=False))
        url = f"postgresql://app:{written}@{UNREACHABLE}/app"
    elif "query" in path:
        written = draw(spelled(password, raw=RAW_IN_QUERY, plus_for_space=True))
        # libpq decodes a parameter's name too; sslpassword is a secret as well
        name = draw(st.sampled_from(["password", "pass%77ord", "sslpassword"]))
        url = f"postgresql://app@{UNREACHABLE}/app?{name}={written}"
    elif "key=value" in path:
        assume("\x00" not in password)  # a key=value string cannot hold one
        written = _libpq_quoted(password)
        url = f"host=127.0.0.1 port=1 user=app dbname=app password={written}"
    else:
        url = f"postgresql://app@{UNREACHABLE}/app"
        kwargs["connect_kwargs"] = {"password": password}

    def build() -> PostgresStorage:
        if path.startswith("open_storage"):
            sep = "&" if "?" in url else "?"
            store = open_storage(f"{url}{sep}{FAST}", **kwargs)
            assert isinstance(store, PostgresStorage)
            return store
        return PostgresStorage(url, pool_timeout=0.05, **kwargs)

    return Case(password, written, path, build)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


async def _start(store: PostgresStorage) -> ReflowError:
    try:
        await store.initialize()
    except ReflowError as exc:
        return exc
    finally:
        await store.close()
    raise AssertionError("connected to a port where nothing listens")


def _texts(make: Callable[[], PostgresStorage], caplog: pytest.LogCaptureFixture) -> list[str]:
    """Everything shown: the storage's repr (or the error refusing to build
    it), the error of a failed start with its cause chain, and the log
    records meanwhile (psycopg's pool logs each failed connection)."""
    caplog.clear()
    try:
        store = make()
    except ConfigError as exc:
        return [str(exc), repr(exc), *(str(e) for e in _chain(exc.__cause__))]
    texts = [repr(store), str(store)]
    err = asyncio.run(_start(store))
    for exc in _chain(err):
        texts += [str(exc), repr(exc), repr(exc.args)]
    texts += [record.getMessage() for record in caplog.records]
    texts.append(caplog.text)
    return texts


_noise: list[str] = []


def _noise_texts(caplog: pytest.LogCaptureFixture) -> str:
    """What the same failure shows with no password: a password that is part
    of it (``127``, ``refused``) cannot be told from it."""
    if not _noise:
        url = f"postgresql://app@{UNREACHABLE}/app"

        def opened() -> PostgresStorage:
            store = open_storage(f"{url}?{FAST}")
            assert isinstance(store, PostgresStorage)
            return store

        # Both ways in, as the cases build them: their errors need not be
        # worded alike.
        _noise.extend(_texts(lambda: PostgresStorage(url, pool_timeout=0.05), caplog))
        _noise.extend(_texts(opened, caplog))
    return "\n".join(_noise)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_no_spelling_of_a_password_shows_in_repr_errors_or_logs(
    case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    forms = forms_of(case.password, case.written)
    noise = _noise_texts(caplog)
    assume(not any(form in noise for form in forms))
    for text in _texts(case.build, caplog):
        for form in forms:
            assert form not in text, (case.path, form, text)


@pytest.mark.parametrize(
    ("url", "forms"),
    [
        # '+' is a space in a query string (and a plus to libpq)
        (f"postgresql://app@{UNREACHABLE}/app?password=my+secret", ["my+secret", "my secret"]),
        # lower-case percent escapes
        (f"postgresql://app:Sup3r%2fs%c3%a9cret@{UNREACHABLE}/app", ["Sup3r", "%2f", "sécret"]),
        (f"postgresql://app@{UNREACHABLE}/app?password=Sup3r%2fs%c3%a9cret", ["Sup3r", "%2f"]),
        (f"postgresql://app@{UNREACHABLE}/app?sslpassword=Key%2bPass", ["Key", "%2b"]),
        # a password libpq cannot read (an invalid escape, a NUL): libpq's
        # complaint quotes it
        (f"postgresql://app:Sup3r%zz@{UNREACHABLE}/app", ["Sup3r", "%zz"]),
        (f"postgresql://app:Sup3r%00x@{UNREACHABLE}/app", ["Sup3r", "%00x"]),
    ],
)
@pytest.mark.parametrize("direct", [False, True])
def test_reported_spellings_stay_hidden(
    url: str, forms: list[str], direct: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def make() -> PostgresStorage:
        if direct:
            return PostgresStorage(url, pool_timeout=0.05)
        store = open_storage(f"{url}{'&' if '?' in url else '?'}{FAST}")
        assert isinstance(store, PostgresStorage)
        return store

    for text in _texts(make, caplog):
        for form in forms:
            assert form not in text


def test_a_storage_built_from_a_url_with_an_escaped_password_hides_it() -> None:
    store = PostgresStorage("postgresql://app:p%40ss%2Fw%2bord@db.example/app")
    assert "p%40ss" not in repr(store)
    assert "w%2bord" not in repr(store)
    assert "p@ss/w+ord" not in repr(store)
    assert repr(store) == "PostgresStorage('user=app dbname=app host=db.example', schema='reflow')"
    store = PostgresStorage(psycopg.conninfo.make_conninfo("", host="h", password="it's a secret"))
    assert "secret" not in repr(store)
    # a password that is also the schema's name is masked there too
    assert "jobs" not in repr(open_storage("postgresql://u:jobs@h/d?schema=jobs"))
