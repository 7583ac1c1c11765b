"""Reflow in a Flask application: an extension holding one
:class:`~reflow_core.sync.SyncClient` per application, built from its
config.

.. code-block:: python

    from flask import Flask
    from reflow_core.contrib.flask import Reflow

    reflow = Reflow(workflows=[checkout])

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["REFLOW_STORAGE"] = "postgresql://..."
        reflow.init_app(app)
        return app

    @bp.post("/orders")
    def create():
        run = reflow.client.enqueue(checkout, request.get_json())
        return {"run_id": run.id}, 202

Config keys: ``REFLOW_STORAGE`` (required: the storage URL) and
``REFLOW_CLIENT_OPTIONS`` (a dict of other :class:`SyncClient` options).
The client connects at its first call in each process, so it is safe under
pre-forking servers (gunicorn with ``--preload``), and is closed at
interpreter exit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import Flask, current_app

from reflow_core.errors import ConfigError
from reflow_core.sync import SyncClient
from reflow_core.workflow import Workflow

__all__ = ["EXTENSION_KEY", "Reflow"]

EXTENSION_KEY = "reflow"
"""The extension's name in ``app.extensions``."""


class Reflow:
    """The Flask extension: ``Reflow(app, workflows=[...])``, or
    ``Reflow(workflows=[...])`` and later :meth:`init_app` (the application
    factory pattern). ``workflows`` are registered on each application's
    client (see :class:`SyncClient`)."""

    def __init__(
        self, app: Flask | None = None, *, workflows: Iterable[Workflow[Any, Any]] = ()
    ) -> None:
        self.workflows = list(workflows)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Build ``app``'s client from its config (``REFLOW_STORAGE``,
        ``REFLOW_CLIENT_OPTIONS``). Raises
        :class:`~reflow_core.errors.ConfigError` when ``REFLOW_STORAGE`` is
        missing or not a storage URL."""
        url = app.config.get("REFLOW_STORAGE")
        if not isinstance(url, str) or not url:
            raise ConfigError(
                "set app.config['REFLOW_STORAGE'] to a storage URL before Reflow.init_app(app)",
                option="REFLOW_STORAGE",
            )
        options = dict(app.config.get("REFLOW_CLIENT_OPTIONS") or {})
        app.extensions[EXTENSION_KEY] = SyncClient(url, workflows=self.workflows, **options)

    @property
    def client(self) -> SyncClient:
        """The current application's client (inside a request or an
        application context)."""
        return self.client_for(current_app)

    @staticmethod
    def client_for(app: Flask) -> SyncClient:
        """``app``'s client. Raises :class:`RuntimeError` when
        :meth:`init_app` was not called on it."""
        client = app.extensions.get(EXTENSION_KEY)
        if not isinstance(client, SyncClient):
            raise RuntimeError(f"Reflow.init_app() was not called on the Flask app {app.name!r}")
        return client
