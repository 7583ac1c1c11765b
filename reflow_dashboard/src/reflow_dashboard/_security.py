"""Cookies, CSRF protection, flash messages and the headers every page carries.

CSRF is a double-submit token: a random value in an HttpOnly,
SameSite=Strict cookie, repeated in a hidden field of every form; a POST
whose field does not match the cookie is refused, and so is one whose
``Origin`` (or, without it, ``Referer``) names another host, or that has
neither.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "FLASH_COOKIE",
    "SECURITY_HEADERS",
    "Flash",
    "cookie_path",
    "csrf_problem",
    "csrf_token",
    "read_flash",
    "set_cookie",
    "write_flash",
]

CSRF_COOKIE = "reflow_csrf"
CSRF_FIELD = "csrf_token"
FLASH_COOKIE = "reflow_flash"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")

SECURITY_HEADERS = {
    # Nothing but the dashboard's own files: an injected tag, were one ever
    # to slip past the escaping, could neither run nor load anything.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


def cookie_path(request: Request) -> str:
    """The path the dashboard is served under (its mount point, or ``/``)."""
    root = str(request.scope.get("root_path") or "").rstrip("/")
    return root or "/"


def set_cookie(
    response: Response,
    request: Request,
    name: str,
    value: str,
    *,
    max_age: int | None = None,
) -> None:
    """Set an HttpOnly, SameSite=Strict cookie for the dashboard's path
    (``Secure`` when the request came over HTTPS)."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=cookie_path(request),
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def csrf_token(request: Request) -> tuple[str, bool]:
    """The CSRF token of this browser, and whether it is new (then the
    response must set the cookie)."""
    current = request.cookies.get(CSRF_COOKIE, "")
    if _TOKEN.match(current):
        return current, False
    return secrets.token_urlsafe(32), True


def _host_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return parts.netloc.lower() or None


def csrf_problem(request: Request, submitted: object) -> str | None:
    """Why a POST must be refused, or ``None`` when it may go ahead.

    The host is compared rather than the whole origin, so a proxy that ends
    TLS in front of the dashboard (the browser says ``https``, the server
    sees ``http``) does not break every form."""
    host = request.headers.get("host", "").lower()
    origin = request.headers.get("origin")
    referer = request.headers.get("referer")
    if origin and origin != "null":
        if _host_of(origin) != host:
            return "the form was sent from another site"
    elif referer:
        if _host_of(referer) != host:
            return "the form was sent from another site"
    else:
        return "the request says neither where it came from (Origin) nor Referer"
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not isinstance(submitted, str) or not cookie or not _TOKEN.match(cookie):
        return "the form has no valid security token (reload the page and try again)"
    if not hmac.compare_digest(submitted.encode(), cookie.encode()):
        return "the form's security token is out of date (reload the page and try again)"
    return None


FlashKind = Literal["success", "error", "info"]


@dataclass(frozen=True, slots=True)
class Flash:
    """A one-time message shown after an action (``#flash``)."""

    kind: FlashKind
    text: str
    link: str | None = None
    """A path inside the dashboard to link from the message."""
    link_text: str | None = None


def _sign(secret: bytes, payload: bytes) -> str:
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


def write_flash(response: Response, request: Request, secret: bytes, flash: Flash) -> None:
    """Carry ``flash`` to the next page through a short-lived signed cookie."""
    payload = json.dumps([flash.kind, flash.text, flash.link, flash.link_text]).encode()
    value = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    set_cookie(
        response,
        request,
        FLASH_COOKIE,
        f"{value}.{_sign(secret, payload)}",
        max_age=60,
    )


def read_flash(request: Request, secret: bytes) -> Flash | None:
    """The flash message carried by the request's cookie, if it is one this
    dashboard signed."""
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw or "." not in raw:
        return None
    value, _, signature = raw.rpartition(".")
    try:
        payload = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError):
        return None
    if not hmac.compare_digest(signature.encode(), _sign(secret, payload).encode()):
        return None
    try:
        kind, text, link, link_text = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if kind not in ("success", "error", "info") or not isinstance(text, str):
        return None
    return Flash(kind, text, link if isinstance(link, str) else None, link_text)
