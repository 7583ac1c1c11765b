"""Duration parsing and retry policies."""

from __future__ import annotations

import dataclasses
import math
from datetime import timedelta
from typing import Any

import pytest

from reflow_core import ConfigError, Retry
from reflow_core._durations import to_seconds, to_timedelta

# -- durations --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("1.5s", 1.5),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        (" 30s ", 30.0),
        ("1h 30m", 5400.0),
        ("0s", 0.0),
        (timedelta(minutes=2, milliseconds=250), 120.25),
        (3, 3.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_durations_parse(value: Any, seconds: float) -> None:
    assert to_seconds(value) == pytest.approx(seconds)
    assert to_timedelta(value) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "abc",
        "30",
        "30x",
        "s",
        "ms",
        "-5s",
        "5s-",
        "1e3s",
        "5 seconds",
        "5S",
        "1h30",
        "30s!",
        ".5s",
    ],
)
def test_malformed_duration_strings_are_config_errors(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        to_seconds(value, option="lease")
    assert caught.value.option == "lease"
    assert "lease" in str(caught.value)
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [-1, -0.001, float("inf"), float("nan"), timedelta(seconds=-1), True, None, [1], b"1s"],
)
def test_invalid_duration_values_are_config_errors(value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        to_seconds(value, option="poll_interval")
    assert caught.value.option == "poll_interval"
    assert "poll_interval" in str(caught.value)


@pytest.mark.parametrize("value", [0, "0s", "0ms", timedelta(0)])
def test_zero_is_refused_where_it_must_be_positive(value: Any) -> None:
    assert to_seconds(value) == 0.0
    with pytest.raises(ConfigError, match="heartbeat must be positive"):
        to_seconds(value, option="heartbeat", allow_zero=False)


# -- retry delays -----------------------------------------------------------


def test_fixed_backoff_waits_the_same_every_time() -> None:
    retry = Retry(max_attempts=5, backoff="fixed", initial_delay="200ms")
    assert [retry.delay(n) for n in range(1, 5)] == pytest.approx([0.2, 0.2, 0.2, 0.2])


def test_linear_backoff_grows_by_the_initial_delay() -> None:
    retry = Retry(max_attempts=5, backoff="linear", initial_delay="200ms")
    assert [retry.delay(n) for n in range(1, 5)] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_exponential_backoff_multiplies_by_the_factor() -> None:
    retry = Retry(max_attempts=6, backoff="exponential", initial_delay="100ms")
    assert [retry.delay(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    tripled = Retry(backoff="exponential", initial_delay=1, factor=3)
    assert [tripled.delay(n) for n in range(1, 4)] == pytest.approx([1, 3, 9])


def test_exponential_is_the_default_backoff() -> None:
    retry = Retry()
    assert retry.max_attempts == 3
    assert retry.delay(1) == pytest.approx(1.0)
    assert retry.delay(2) == pytest.approx(2.0)


@pytest.mark.parametrize("backoff", ["fixed", "linear", "exponential"])
def test_max_delay_caps_every_backoff(backoff: Any) -> None:
    retry = Retry(max_attempts=20, backoff=backoff, initial_delay="3s", max_delay="5s")
    delays = [retry.delay(n) for n in range(1, 20)]
    assert max(delays) <= 5.0
    assert delays[0] == pytest.approx(3.0)
    if backoff != "fixed":
        assert delays[-1] == pytest.approx(5.0)


def test_no_max_delay_means_no_cap() -> None:
    retry = Retry(backoff="exponential", initial_delay="1s", max_delay=None)
    assert retry.delay(20) == pytest.approx(2.0**19)


def test_default_cap_is_five_minutes() -> None:
    assert Retry(initial_delay="1s").delay(30) == pytest.approx(300.0)


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_jitter_stays_within_its_bounds(jitter: float) -> None:
    retry = Retry(backoff="fixed", initial_delay="1s", jitter=jitter)
    samples = [retry.delay(1) for _ in range(500)]
    assert all(1.0 - jitter - 1e-9 <= s <= 1.0 + jitter + 1e-9 for s in samples)
    assert all(s >= 0 for s in samples)
    # It really spreads: both sides of the base delay are reached.
    assert min(samples) < 1.0 - jitter / 2 < 1.0 + jitter / 2 < max(samples)


def test_jitter_applies_around_the_capped_delay() -> None:
    retry = Retry(backoff="exponential", initial_delay="1s", max_delay="2s", jitter=0.25)
    samples = [retry.delay(10) for _ in range(300)]
    assert all(1.5 - 1e-9 <= s <= 2.5 + 1e-9 for s in samples)


def test_zero_jitter_is_deterministic() -> None:
    retry = Retry(backoff="linear", initial_delay="10ms")
    assert len({retry.delay(3) for _ in range(50)}) == 1


@pytest.mark.parametrize("value", ["250ms", 0.25, timedelta(milliseconds=250)])
def test_retry_accepts_every_duration_form(value: Any) -> None:
    assert Retry(backoff="fixed", initial_delay=value).delay(1) == pytest.approx(0.25)


def test_retry_is_frozen() -> None:
    retry = Retry()
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.max_attempts = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -3}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
        ({"max_attempts": 2.0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"backoff": "quadratic"}, "backoff"),
        ({"factor": 0.5}, "factor"),
        ({"factor": math.nan}, "factor"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": math.nan}, "jitter"),
        ({"initial_delay": "soon"}, "initial_delay"),
        ({"initial_delay": -1}, "initial_delay"),
        ({"max_delay": "-5s"}, "max_delay"),
        ({"max_delay": "forever"}, "max_delay"),
    ],
)
def test_invalid_retry_is_a_config_error(kwargs: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Retry(**kwargs)
    assert caught.value.option == option
    assert option in str(caught.value)
