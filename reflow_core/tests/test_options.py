"""Option helpers for adapter authors: flags, sizes, durations, secrets, URLs."""

from __future__ import annotations

from datetime import timedelta

import pytest

from reflow_core.errors import ConfigError
from reflow_core.options import bool_option, int_option, redact, seconds_option, split_url


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
