"""Option parsing for adapter authors: URL query options, flags, sizes, secrets.

Backends take their options from a URL's query string (always text) or from
keyword arguments (typed); these helpers accept both and refuse anything else
with a :class:`~reflow_core.errors.ConfigError` that names the option.
:func:`split_url` separates a backend's own query options from those meant
for its driver and gives a copy of the URL that is safe to log.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ._durations import to_seconds
from .errors import ConfigError

__all__ = ["SplitUrl", "bool_option", "int_option", "redact", "seconds_option", "split_url"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def bool_option(name: str, value: object) -> bool:
    """A flag: a bool, or one of ``true/false``, ``yes/no``, ``on/off``, ``1/0``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}", option=name)


def int_option(name: str, value: object, minimum: int) -> int:
    """A whole number at least ``minimum``, given as an int or as digits."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}", option=name)
    return value


def seconds_option(name: str, value: object) -> float:
    """A positive duration in seconds: a number, a ``timedelta``, digits, or a
    duration string such as ``"500ms"`` or ``"7d"``."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return to_seconds(value, option=name, allow_zero=False)
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            f"{name} must be a positive duration (seconds, a timedelta or a string "
            f"like '30s'), got {value!r}",
            option=name,
        )
    return float(value)


def redact(text: str, secrets: Collection[str]) -> str:
    """``text`` with each of ``secrets`` (and its URL-quoted form) replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


@dataclass(frozen=True, slots=True)
class SplitUrl:
    """What :func:`split_url` found in a URL."""

    target: str
    """The URL for the driver: the backend's own options removed."""
    options: dict[str, str]
    """The backend's own query options."""
    safe: str
    """The URL with every password replaced by ``***``, safe to log."""
    secrets: list[str] = field(default_factory=list)
    """The passwords found (in the user info or a ``password`` parameter)."""


def split_url(
    url: str,
    *,
    schemes: Collection[str],
    own: Collection[str],
    kind: str,
    scheme: str | None = None,
) -> SplitUrl:
    """Split ``url`` into the driver's URL and the options named in ``own``.

    ``schemes`` are the accepted schemes (any case); the driver's URL keeps
    the given scheme, or uses ``scheme``. ``kind`` names the URL in errors
    (``"postgresql"``). A repeated own option, a fragment or another scheme
    raises :class:`~reflow_core.errors.ConfigError`; no error repeats a secret.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError as exc:
        raise ConfigError(f"malformed {kind} URL", option="url") from exc
    if parts.scheme.lower() not in schemes:
        raise ConfigError(f"not a {kind} URL (scheme {parts.scheme!r})", option="url")
    if parts.fragment:
        raise ConfigError(f"{kind} URLs take no fragment", option="url")
    options: dict[str, str] = {}
    passthrough: list[tuple[str, str]] = []
    secrets = [unquote(password)] if password else []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "password" and value:
            secrets.append(value)
        if name in own:
            if name in options:
                raise ConfigError(f"option {name!r} is given twice in the URL", option=name)
            options[name] = value
        else:
            passthrough.append((name, value))
    target = urlunsplit(
        (
            scheme or parts.scheme.lower(),
            parts.netloc,
            parts.path,
            urlencode(passthrough, quote_via=quote),
            "",
        )
    )
    safe = redact(url, secrets)
    if password is not None:
        host = parts.netloc.rpartition("@")[2]
        safe = safe.replace(parts.netloc, f"{parts.username or ''}:***@{host}", 1)
    return SplitUrl(target, options, safe, secrets)
