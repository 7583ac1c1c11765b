"""Option helpers for adapter authors: flags, sizes, durations, secrets, URLs."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflow_core.errors import ConfigError
from reflow_core.options import (
    bool_option,
    int_option,
    kwarg_secrets,
    parse_url,
    redact,
    safe_url,
    seconds_option,
    split_url,
    url_secrets,
)
from reflow_core.registry import redact_url


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), ("yes", True), (" ON ", True), ("1", True), (False, False), ("off", False)],
)
def test_flags(value: object, expected: bool) -> None:
    assert bool_option("notify", value) is expected


@pytest.mark.parametrize("value", ["maybe", 1, None, ""])
def test_bad_flags_name_the_option(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        bool_option("notify", value)
    assert caught.value.option == "notify"


def test_integers() -> None:
    assert int_option("size", "12", 1) == 12
    assert int_option("size", 0, 0) == 0
    for bad in ("-1", 0, True, 2.5, "x"):
        with pytest.raises(ConfigError, match="size must be an integer >= 1"):
            int_option("size", bad, 1)


def test_durations() -> None:
    assert seconds_option("t", "1.5") == 1.5
    assert seconds_option("t", "7d") == 7 * 86400
    assert seconds_option("t", timedelta(milliseconds=250)) == 0.25
    assert seconds_option("t", 3) == 3.0
    for bad in ("0", 0, -1, True, "soon"):
        with pytest.raises(ConfigError):
            seconds_option("t", bad)


def test_redact_hides_plain_and_url_quoted_secrets() -> None:
    assert redact("pw a/b and a%2Fb", ["a/b"]) == "pw *** and ***"
    assert redact("nothing", ["", "x y"]) == "nothing"


def test_split_url_takes_out_own_options_and_hides_passwords() -> None:
    split = split_url(
        "DB://u:p%40ss@h:1/d?mine=1&theirs=2&password=q2",
        schemes=("db",),
        own=("mine",),
        kind="db",
    )
    assert split.options == {"mine": "1"}
    assert split.target == "db://u:p%40ss@h:1/d?theirs=2&password=q2"
    assert "p@ss" not in split.safe
    assert "p%40ss" not in split.safe
    assert "q2" not in split.safe
    assert split.safe.startswith("DB://u:***@h:1/d?")
    assert split.secrets == ["p@ss", "q2"]


@pytest.mark.parametrize(
    "url", ["other://h/d", "db://h/d#frag", "db://h/d?mine=1&mine=2", "db://[bad/d"]
)
def test_split_url_refuses_what_it_cannot_take(url: str) -> None:
    with pytest.raises(ConfigError):
        split_url(url, schemes=("db",), own=("mine",), kind="db")


def test_argument_checks_shared_by_backends_name_what_was_wrong() -> None:
    from reflow_core.adapter import check_finish_status, check_list_limit, check_purge

    assert check_list_limit(5) == 5
    for bad in (0, -1, True, "3", 2.0):
        with pytest.raises(ConfigError, match="limit must be a positive int") as caught:
            check_list_limit(bad)
        assert caught.value.option == "limit"
    check_finish_status("completed")
    with pytest.raises(ConfigError, match="not 'cancelled'"):
        check_finish_status("cancelled")
    assert check_purge(timedelta(days=1), "20") == 20
    with pytest.raises(ConfigError, match="older_than must be a non-negative timedelta"):
        check_purge(timedelta(seconds=-1), 10)
    with pytest.raises(ConfigError, match="older_than"):
        check_purge(3600, 10)
    with pytest.raises(ConfigError, match="batch must be an integer >= 1, got 0"):
        check_purge(timedelta(0), 0)


# -- every spelling of a secret ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("pw=my secret", "my secret"),
        ("pw=my+secret", "my secret"),  # '+' is a space in a query string
        ("pw=my%20secret", "my secret"),
        ("pw=a%2fb", "a/b"),  # lower-case hex
        ("pw=a%2Fb", "a/b"),
        ("pw=%61%2f%62", "a/b"),  # any character may be escaped
        ("pw=s%C3%a9cret", "sécret"),  # UTF-8 bytes, mixed case
        ("pw=s\\xc3\\xa9cret", "sécret"),  # a bytes repr
        ("pw=s\\u00e9cret", "sécret"),  # a JSON or str repr escape
        ("pw='it\\'s'", "it's"),  # a libpq key=value string
        ("pw=a\\\\b", "a\\b"),  # a repr doubles a backslash
        ("pw=\\ud83d\\ude00!", "😀!"),  # a JSON surrogate pair
    ],
)
def test_redact_hides_every_spelling_of_a_secret(text: str, secret: str) -> None:
    assert redact(text, [secret]) == "pw=***" or redact(text, [secret]) == "pw='***'"


def test_redact_masks_until_no_spelling_is_left() -> None:
    # masking "x*" in "xx*" leaves "x***", which holds "x*" again
    assert "x*" not in redact("xx* and x%2A", ["x*"])
    assert redact("a ** b", ["**"]) == "a *** b"  # a secret of asterisks: one pass
    assert redact("nothing", ["", "x y"]) == "nothing"


def test_redact_of_many_backslashes_is_quick() -> None:
    assert redact("\\" * 2000 + "x", ["\\" * 40 + "y"]) == "\\" * 2000 + "x"


@pytest.mark.parametrize(
    ("url", "safe", "secrets"),
    [
        ("redis://h/0?password=my+secret&a=b", "redis://h/0?password=***&a=b", ["my secret"]),
        ("redis://:a%2fb@h/0", "redis://:***@h/0", ["a/b"]),
        ("Redis://u:a%2Fb@h:1/0?x=1", "Redis://u:***@h:1/0?x=1", ["a/b"]),
        ("redis://h/0?pass%77ord=x%2By", "redis://h/0?pass%77ord=***", ["x+y"]),
        ("rediss://h/0?ssl_password=k", "rediss://h/0?ssl_password=***", ["k"]),
        ("postgresql://u@h/d?sslpassword=k2", "postgresql://u@h/d?sslpassword=***", ["k2"]),
        (
            "postgresql://h/d?oauth_client_secret=s3",
            "postgresql://h/d?oauth_client_secret=***",
            ["s3"],
        ),
        ("unix:///run/r.sock?db=2&password=p4", "unix:///run/r.sock?db=2&password=***", ["p4"]),
        ("redis://:pa/ss@h/0", "redis://***@h/0", ["pa/ss"]),  # unescaped '/'
        ("redis://u:pa#ss@h/0", "redis://***@h/0", ["pa#ss"]),
        ("redis://h/0#frag", "redis://h/0#***", []),
        ("redis://h:6379/0?client_name=a@b", "redis://h:6379/0?client_name=a@b", []),
        ("postgresql://h1:5432,h2:5433/d?x=a@b", "postgresql://h1:5432,h2:5433/d?x=a@b", []),
        ("redis://[::1]/0?x=a@b", "redis://[::1]/0?x=a@b", []),
        ("redis://[bad/0", "<unparseable URL>", []),
    ],
)
def test_safe_url_rebuilds_the_url_with_each_password_replaced(
    url: str, safe: str, secrets: list[str]
) -> None:
    assert safe_url(url) == safe
    assert url_secrets(url) == secrets


def test_safe_url_masks_a_password_wherever_else_it_shows() -> None:
    assert safe_url("redis://app:app@h/0") == "redis://***:***@h/0"


def test_the_registry_helper_hides_query_passwords_too() -> None:
    assert redact_url("redis://h/0?password=s3cret") == "redis://h/0?password=***"


def test_secrets_in_keyword_arguments() -> None:
    kwargs = {"password": "a", "sslpassword": b"b", "ssl_password": "", "user": "u"}
    assert kwarg_secrets(kwargs) == ["a", "b"]
    assert kwarg_secrets(None) == []


@pytest.mark.parametrize("url", ["redis://:pa/ss@h/0", "redis://u:pa?ss@h/0", "db://[bad/d"])
def test_parse_url_refuses_a_url_it_would_misread_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_url(url, kind="redis")
    assert caught.value.option == "url"
    assert "ss@" not in str(caught.value)
    assert "[bad" not in str(caught.value)


def test_integers_are_ascii_digits() -> None:
    with pytest.raises(ConfigError, match="db must be an integer >= 0"):
        int_option("db", "²", 0)  # a digit to str.isdigit(), not to int()


def _hex_case(text: str, upper: bool) -> str:
    return re.sub(r"%[0-9A-Fa-f]{2}", lambda m: m[0].upper() if upper else m[0].lower(), text)


_passwords = st.text(
    st.one_of(st.sampled_from(" +%@/:#?&=\\'\"é😀"), st.characters(exclude_categories=("Cs",))),
    min_size=1,
    max_size=20,
).filter(lambda p: p.strip("*") != "")


@st.composite
def _spelled(draw: st.DrawFn, password: str, plus_for_space: bool) -> str:
    out = []
    for char in password:
        if char == " " and plus_for_space and draw(st.booleans()):
            out.append("+")
        elif char.isascii() and char.isalnum() and draw(st.booleans()):
            out.append(char)
        else:
            out.append(_hex_case(quote(char, safe=""), draw(st.booleans())))
    return "".join(out)


@given(password=_passwords, data=st.data())
def test_no_spelling_of_a_password_survives_safe_url_or_redact(
    password: str, data: st.DataObject
) -> None:
    in_user_info = data.draw(_spelled(password, plus_for_space=False))
    in_query = data.draw(_spelled(password, plus_for_space=True))
    forms = {password, in_user_info, in_query}
    for encoded in (quote(password, safe=""), quote_plus(password, safe="")):
        forms |= {_hex_case(encoded, True), _hex_case(encoded, False)}
    for url in (
        f"redis://app:{in_user_info}@h/0?x=1",
        f"redis://h/0?x=1&password={in_query}",
        f"postgresql://h/d?sslpassword={in_query}",
    ):
        secrets = url_secrets(url)
        assert password in secrets
        message = f"failed for {url} ({password!r}, {password.encode()!r}, {in_query})"
        for text in (safe_url(url), redact(message, secrets)):
            for form in forms:
                assert form not in text
