"""A web dashboard for Reflow: runs, failures, schedules and workers in a browser.

::

    from reflow_dashboard import TokenAuth, create_app

    app = create_app("sqlite:///workflows.db", auth=TokenAuth(token))

``create_app`` returns a Starlette (ASGI) application: serve it with any
ASGI server, or mount it in a Starlette or FastAPI application. ``reflow
dashboard --url URL`` serves it from the command line.
"""

from __future__ import annotations

from ._app import create_app
from ._auth import Auth, AuthHook, BasicAuth, TokenAuth
from ._version import __version__

__all__ = ["Auth", "AuthHook", "BasicAuth", "TokenAuth", "__version__", "create_app"]
