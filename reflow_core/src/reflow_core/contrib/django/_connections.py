"""Django's database connections in the worker's threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from reflow_core.hookspecs import hookimpl
from reflow_core.tracing import StepScope

__all__ = ["DatabaseConnections"]


class DatabaseConnections:
    """A plugin doing for each plain (``def``) step what Django does for
    each request: before and after it, the step thread's database
    connections that are broken, or older than ``CONN_MAX_AGE``, are closed
    (``django.db.close_old_connections``), so the next query opens a fresh
    one. Without it a worker thread would keep its first connection for
    ever, and one broken by a database restart would fail every later step
    run in that thread. ``reflow_core.contrib.django.engine()`` registers it."""

    @hookimpl
    def reflow_thread_scope(
        self, scope: StepScope | None
    ) -> contextlib.AbstractContextManager[None]:
        return _checked()


@contextlib.contextmanager
def _checked() -> Iterator[None]:
    from django.db import close_old_connections

    close_old_connections()
    try:
        yield
    finally:
        close_old_connections()
