"""Option parsing for adapter authors: URL query options, flags, sizes, secrets.

Backends take their options from a URL's query string (always text) or from
keyword arguments (typed); these helpers accept both and refuse anything else
with a :class:`~reflow_core.errors.ConfigError` that names the option.
:func:`split_url` separates a backend's own query options from those meant
for its driver and gives a copy of the URL that is safe to log.

Secrets are kept out of sight in two ways. A URL shown to people is rebuilt
from its parsed parts with every password replaced (:func:`safe_url`), so
however the password was spelled it is not there. Text that may quote a
secret (a driver's error message) goes through :func:`redact`, which matches
each secret in every spelling a URL, a libpq connection string or a Python
or JSON escape can give it, one character at a time: as itself, percent-
encoded with upper- or lower-case hex, ``+`` for a space, or escaped with a
backslash.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import (
    SplitResult,
    parse_qsl,
    quote,
    unquote,
    unquote_plus,
    urlencode,
    urlsplit,
    urlunsplit,
)

from ._durations import to_seconds
from .errors import ConfigError

__all__ = [
    "SECRET_NAMES",
    "SplitUrl",
    "bool_option",
    "int_option",
    "kwarg_secrets",
    "parse_url",
    "redact",
    "safe_url",
    "seconds_option",
    "split_url",
    "unknown_option",
    "url_secrets",
]

SECRET_NAMES: frozenset[str] = frozenset(
    {"password", "sslpassword", "ssl_password", "oauth_client_secret"}
)
"""Query parameters and keyword arguments whose value is a secret: libpq's
``password``, ``sslpassword`` (the client key's passphrase) and
``oauth_client_secret``, redis-py's ``password`` and ``ssl_password``."""

_MASK = "***"
_PORTS = re.compile(r"[0-9]*(?:,.*)?")
"""What follows a host's ``:``: a port, or ports of more hosts (libpq's ``h1:5432,h2``)."""

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
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())  # ASCII only: "²" is a digit that int() refuses
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
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise ConfigError(
            f"{name} must be a positive duration (seconds, a timedelta or a string "
            f"like '30s'), got {value!r}",
            option=name,
        )
    # Also refuses infinite, NaN and longer-than-MAX_DURATION values.
    return to_seconds(value, option=name, allow_zero=False)


def unknown_option(
    name: str,
    known: Iterable[str],
    *,
    kind: str,
    where: str = "",
    extra: Iterable[str] = (),
    driver: str = "the driver",
    hint: str = "",
    secrets: Collection[str] = (),
) -> ConfigError:
    """The :class:`~reflow_core.errors.ConfigError` for an option ``kind``
    does not know (``kind`` is the backend, ``where`` says where it was given,
    such as ``" in the URL"``).

    The message suggests the closest names (:func:`difflib.get_close_matches`)
    among ``known`` and ``extra`` (options passed on to a driver), lists
    ``known``, then ``extra`` (as passed on to ``driver``) if any, and ends
    with ``hint``. Any of
    ``secrets`` is masked.
    """
    own = list(dict.fromkeys(known))
    passed_on = [n for n in dict.fromkeys(extra) if n not in own]
    close = difflib.get_close_matches(name, [*own, *passed_on], n=3, cutoff=0.6)
    message = f"unknown {kind} option {name!r}{where}"
    if close:
        message += f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    message += f"; known options: {', '.join(own) or 'none'}"
    if passed_on:
        message += f"; passed on to {driver}: {', '.join(passed_on)}"
    if hint:
        message += f"; {hint}"
    return ConfigError(redact(message, secrets) if secrets else message, option=name)


def _hex(value: int, width: int) -> str:
    """``value`` as ``width`` hex digits, each letter matching either case."""
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{value:0{width}x}")


def _spellings(char: str) -> str:
    """A pattern for every way text may spell ``char``: itself; percent-encoded
    (its UTF-8 bytes, hex in either case); ``+`` for a space (a query string);
    a backslash before a quote or a backslash (a libpq connection string, a
    ``repr``); ``\\xNN`` per byte (a bytes ``repr``); or ``\\xNN``,
    ``\\uNNNN``, ``\\UNNNNNNNN`` or a JSON surrogate pair for its code point."""
    data = char.encode("utf-8", "surrogatepass")
    point = ord(char)
    forms = [
        "".join("%" + _hex(b, 2) for b in data),
        "".join(r"\\x" + _hex(b, 2) for b in data),
    ]
    if point < 0x100:
        forms.append(r"\\x" + _hex(point, 2))
    if point < 0x10000:
        forms.append(r"\\u" + _hex(point, 4))
    else:
        high, low = divmod(point - 0x10000, 0x400)
        forms.append(r"\\u" + _hex(0xD800 + high, 4) + r"\\u" + _hex(0xDC00 + low, 4))
    forms.append(r"\\U" + _hex(point, 8))
    if char == " ":
        forms.append(r"\+")
    if char in "\\'\"":
        forms.append(r"\\" + re.escape(char))
    forms.append(re.escape(char))
    unique = list(dict.fromkeys(forms))
    # A backslash has forms that are prefixes of others; keep its choice
    # atomic so that a long run of backslashes cannot backtrack for ever
    # (its plain form is still replaced by :func:`redact` on its own).
    return f"(?>{'|'.join(unique)})" if char == "\\" else f"(?:{'|'.join(unique)})"


@functools.lru_cache(maxsize=64)
def _pattern(secret: str) -> re.Pattern[str]:
    return re.compile("".join(_spellings(c) for c in secret))


def redact(text: str, secrets: Collection[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``***`` in every spelling.

    A secret is matched as itself and with any of its characters
    percent-encoded (upper- or lower-case hex, ``+`` or ``%20`` for a space)
    or backslash-escaped, in any mix; replacing goes on until no spelling is
    left (a mask next to the rest of the text cannot form a secret anew).
    Text that merely happens to contain a secret is masked too.
    """
    ordered = sorted({s for s in secrets if s}, key=len, reverse=True)
    # A secret of asterisks only looks like the mask: one pass, first.
    for secret in (s for s in ordered if not s.strip("*")):
        text = _pattern(secret).sub(_MASK, text)
    others = [s for s in ordered if s.strip("*")]
    while True:  # each pass that masks something leaves fewer other characters
        before = text
        for secret in others:
            text = _pattern(secret).sub(_MASK, text).replace(secret, _MASK)
        if text == before:
            return text


def kwarg_secrets(
    kwargs: Mapping[str, object] | None, names: Collection[str] = SECRET_NAMES
) -> list[str]:
    """The secrets among keyword arguments for a driver: the non-empty text
    (or UTF-8 bytes) given for any of ``names``."""
    found: list[str] = []
    for name, value in (kwargs or {}).items():
        if name in names and isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if name in names and isinstance(value, str) and value:
            found.append(value)
    return found


def _misplaced_user_info(parts: SplitResult, url: str) -> str | None:
    """The user info of a URL whose password holds an unescaped ``/``, ``?``
    or ``#``, which ends the host part early (``redis://:pa/ss@host/0``
    parses as host ``:pa``); ``None`` for a URL that parses as meant."""
    if "@" in parts.netloc or ":" not in parts.netloc:
        return None
    scheme_end = len(parts.scheme) + 3 if parts.scheme else 2
    rest = url[scheme_end + len(parts.netloc) :]
    if "@" not in rest:
        return None
    host, _, port = parts.netloc.partition(":")
    if parts.netloc.startswith("[") or (host and _PORTS.fullmatch(port)):
        return None  # a host (an IPv6 one, or one with ports): '@' is later on for a reason
    return url[scheme_end:].rpartition("@")[0]


def parse_url(url: str, *, kind: str) -> SplitResult:
    """``url`` split into its parts (:func:`urllib.parse.urlsplit`).

    Raises :class:`~reflow_core.errors.ConfigError`, repeating no part of
    the URL, for one that cannot be parsed, and for one whose user info
    holds an unescaped ``/``, ``?`` or ``#``: that ends the host part early,
    so the driver would take pieces of the password for the host, the
    path or the query. ``kind`` names the URL in the message (``"redis"``).
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"malformed {kind} URL", option="url") from exc
    if _misplaced_user_info(parts, url) is not None:
        raise ConfigError(
            f"malformed {kind} URL: its user info holds an unescaped '/', '?' or '#'; "
            "percent-encode them in the user name and password",
            option="url",
        )
    return parts


def url_secrets(url: str, names: Collection[str] = SECRET_NAMES) -> list[str]:
    """The passwords in ``url``, decoded: the user info's, and the value of
    every query parameter named in ``names`` (a name may be percent-encoded
    too, as drivers decode it). Empty for a URL that cannot be parsed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    misplaced = _misplaced_user_info(parts, url)
    if misplaced is not None and ":" in misplaced:
        found.append(unquote(misplaced.partition(":")[2]))
    if parts.password:
        found.append(unquote(parts.password))
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in names and value:
            found.append(value)
    # redact() finds every spelling of these; a value decoded once more is
    # added too, for drivers that decode a query twice (redis-py before 6).
    return list(dict.fromkeys([*found, *(unquote(s) for s in found)]))


def safe_url(url: str, names: Collection[str] = SECRET_NAMES) -> str:
    """``url`` rebuilt from its parts with the user info's password and every
    query parameter named in ``names`` replaced by ``***``, safe to log.

    Everything else keeps its spelling. A fragment is shown as ``#***`` (a
    password with an unescaped ``#`` starts one), a URL whose password ends
    its host part early (an unescaped ``/`` or ``?``) shows ``***`` for all
    of its user info, and what cannot be parsed at all is
    ``<unparseable URL>``.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    user_info, at, host = netloc.rpartition("@")
    if at and ":" in user_info:
        netloc = f"{user_info.partition(':')[0]}:{_MASK}@{host}"
    misplaced = _misplaced_user_info(parts, url)
    if misplaced is not None:
        # Everything up to the last '@' is user info: show none of it.
        tail = url[url.index(misplaced) + len(misplaced) + 1 :]
        try:
            parts = urlsplit(f"{parts.scheme}://{tail}")
        except ValueError:
            return "<unparseable URL>"
        netloc = f"{_MASK}@{parts.netloc}"
    shown = f"{url[: len(parts.scheme)]}:" if parts.scheme else ""  # the scheme as written
    if misplaced is not None or url[len(shown) :].startswith("//"):
        shown += "//" + netloc
    shown += parts.path
    if parts.query:
        pieces = []
        for piece in parts.query.split("&"):
            key, eq, _ = piece.partition("=")
            pieces.append(f"{key}={_MASK}" if eq and unquote_plus(key) in names else piece)
        shown += "?" + "&".join(pieces)
    if parts.fragment:
        shown += "#" + _MASK
    return redact(shown, url_secrets(url, names))


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
    """The passwords found (in the user info or a query parameter named in
    :data:`SECRET_NAMES`), for :func:`redact`."""


def split_url(
    url: str,
    *,
    schemes: Collection[str],
    own: Collection[str],
    kind: str,
    scheme: str | None = None,
    secret_names: Collection[str] = SECRET_NAMES,
) -> SplitUrl:
    """Split ``url`` into the driver's URL and the options named in ``own``.

    ``schemes`` are the accepted schemes (any case); the driver's URL keeps
    the given scheme, or uses ``scheme``. ``kind`` names the URL in errors
    (``"postgresql"``). Query parameters named in ``secret_names`` are
    secrets like the user info's password. A repeated own option, a
    fragment, another scheme, or a password with an unescaped ``/``, ``?``
    or ``#`` raises :class:`~reflow_core.errors.ConfigError`; no error
    repeats a secret.
    """
    parts = parse_url(url, kind=kind)
    if parts.scheme.lower() not in schemes:
        raise ConfigError(f"not a {kind} URL (scheme {parts.scheme!r})", option="url")
    if parts.fragment:
        raise ConfigError(f"{kind} URLs take no fragment", option="url")
    options: dict[str, str] = {}
    passthrough: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
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
    secrets = url_secrets(url, secret_names)
    return SplitUrl(target, options, safe_url(url, secret_names), secrets)
