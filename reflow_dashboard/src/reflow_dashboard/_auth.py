"""Who may see the dashboard: a bearer token, HTTP Basic, or the embedding
application's own check.

Every secret is compared with :func:`hmac.compare_digest` and kept out of
``repr``. A token login stores a value derived from the token in its
cookie, never the token itself, so the cookie cannot be replayed as a
bearer token and changing the token logs every browser out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from starlette.requests import Request

__all__ = ["AUTH_COOKIE", "Auth", "AuthHook", "BasicAuth", "TokenAuth"]

AUTH_COOKIE = "reflow_dashboard_auth"
"""The cookie a token login sets (HttpOnly, SameSite=Strict)."""

AuthHook: TypeAlias = Callable[[Request], "bool | Awaitable[bool]"]
"""The embedding application's own check: called with each request, it
returns (or resolves to) True to let the request in."""


def _same(given: str, expected: bytes) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


class TokenAuth:
    """A shared secret: sent as ``Authorization: Bearer TOKEN``, or given
    once to the login form (or as ``?token=TOKEN`` in a link), which sets an
    HttpOnly, SameSite=Strict cookie for the dashboard's path."""

    __slots__ = ("_cookie", "_token")

    def __init__(self, token: str) -> None:
        if not isinstance(token, str) or not token.strip():
            raise ValueError("TokenAuth needs a non-empty token")
        self._token = token.encode("utf-8", "surrogateescape")
        self._cookie = hmac.new(
            self._token, b"reflow-dashboard login cookie", hashlib.sha256
        ).hexdigest()

    def __repr__(self) -> str:
        return "TokenAuth(token='***')"

    def check_token(self, candidate: str) -> bool:
        """Whether ``candidate`` is the token."""
        return _same(candidate, self._token)

    @property
    def cookie_value(self) -> str:
        """What the login cookie holds: derived from the token, not the token."""
        return self._cookie

    def __call__(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return self.check_token(value.strip())
        cookie = request.cookies.get(AUTH_COOKIE)
        return cookie is not None and _same(cookie, self._cookie.encode("ascii"))


class BasicAuth:
    """HTTP Basic authentication with one user name and password; the
    browser asks for them."""

    __slots__ = ("_password", "_username", "username")

    def __init__(self, username: str, password: str) -> None:
        if not isinstance(username, str) or not username or ":" in username:
            raise ValueError("BasicAuth needs a user name without ':'")
        if not isinstance(password, str) or not password:
            raise ValueError("BasicAuth needs a non-empty password")
        self.username = username
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8", "surrogateescape")

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password='***')"

    def __call__(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        username, sep, password = decoded.partition(":")
        # Both compared every time, so the time taken says nothing about which differed.
        user_ok = _same(username, self._username)
        password_ok = _same(password, self._password)
        return bool(sep) and user_ok and password_ok


Auth: TypeAlias = "TokenAuth | BasicAuth | AuthHook"
"""What ``create_app(auth=...)`` accepts."""
