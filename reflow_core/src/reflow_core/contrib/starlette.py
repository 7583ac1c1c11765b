"""Reflow in a Starlette (or FastAPI) application: an engine started and
stopped with the application, and handed to each request.

.. code-block:: python

    from reflow_core.contrib.starlette import get_engine, reflow_lifespan

    app = Starlette(routes=..., lifespan=reflow_lifespan(URL, workflows=[checkout]))

    async def create(request: Request) -> Response:
        run = await get_engine(request).enqueue(checkout, await request.json())

FastAPI users import the same from :mod:`reflow_core.contrib.fastapi`,
which adds the ``EngineDep`` dependency.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

from starlette.requests import HTTPConnection

from reflow_core.engine import Engine
from reflow_core.errors import ConfigError
from reflow_core.storage import Storage
from reflow_core.workflow import Workflow

__all__ = ["STATE_KEY", "get_engine", "reflow_lifespan"]

AppT = TypeVar("AppT")

STATE_KEY = "reflow_engine"
"""The name of the engine in the lifespan state and in ``app.state``."""

Lifespan = Callable[[AppT], contextlib.AbstractAsyncContextManager[Any]]


def reflow_lifespan(
    storage: str | Callable[[], Storage],
    /,
    *,
    workflows: Iterable[Workflow[Any, Any]] = (),
    worker: bool = False,
    lifespan: Lifespan[AppT] | None = None,
    **engine_options: Any,
) -> Callable[[AppT], contextlib.AbstractAsyncContextManager[dict[str, Any]]]:
    """The ``lifespan`` of an application that uses Reflow: at startup it
    builds an :class:`~reflow_core.engine.Engine` on ``storage`` (a URL,
    or a function returning a new storage) with ``workflows`` and
    ``engine_options`` (any of :class:`Engine`'s), and enters it; at
    shutdown it leaves it, which stops its worker (runs in flight drain for
    its ``drain_timeout`` and the rest are handed back) and closes the
    storage.

    With ``worker=False`` (the default) the engine only enqueues, inspects
    and waits for runs, which ``reflow worker`` processes execute; with
    ``worker=True`` each server process also executes runs of
    ``workflows``. A new engine is built at each startup, so an application
    may be started more than once (as test clients do).

    ``lifespan`` is the application's own lifespan, if it has one: it is
    entered inside Reflow's (the engine is running during all of it), and
    the state it yields is merged into the application's. Routes get the
    engine with :func:`get_engine` (or FastAPI's ``EngineDep``).
    """
    workflows = list(workflows)
    if "storage" in engine_options or "workflows" in engine_options:
        raise ConfigError("pass storage and workflows once, as reflow_lifespan's own arguments")

    @contextlib.asynccontextmanager
    async def run(app: AppT) -> AsyncIterator[dict[str, Any]]:
        opened: Storage | str = storage if isinstance(storage, str) else storage()
        engine = Engine(storage=opened, workflows=workflows, worker=worker, **engine_options)
        async with engine:
            app_state = getattr(app, "state", None)
            if app_state is not None:
                setattr(app_state, STATE_KEY, engine)
            try:
                state: dict[str, Any] = {STATE_KEY: engine}
                if lifespan is None:
                    yield state
                else:
                    async with lifespan(app) as theirs:
                        if isinstance(theirs, Mapping):
                            state.update(theirs)
                        yield state
            finally:
                if app_state is not None and getattr(app_state, STATE_KEY, None) is engine:
                    delattr(app_state, STATE_KEY)

    return run


def get_engine(conn: HTTPConnection) -> Engine:
    """The engine of the application serving ``conn`` (a request or a
    websocket), started by :func:`reflow_lifespan`. Raises
    :class:`RuntimeError` when the application has none (its ``lifespan``
    is not Reflow's, or the server runs no lifespan)."""
    engine = getattr(conn.state, STATE_KEY, None)
    if engine is None:
        engine = getattr(conn.app.state, STATE_KEY, None)
    if not isinstance(engine, Engine):
        raise RuntimeError(
            "this application has no Reflow engine: create it with "
            "lifespan=reflow_lifespan(...) (reflow_core.contrib.starlette or "
            ".fastapi), and run it on a server that runs lifespans"
        )
    return engine
