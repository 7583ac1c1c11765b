"""Reflow in a FastAPI application: :func:`reflow_lifespan` starts an
engine with the application and stops it at shutdown, and ``EngineDep``
hands it to a route.

.. code-block:: python

    from fastapi import FastAPI
    from reflow_core.contrib.fastapi import EngineDep, reflow_lifespan

    app = FastAPI(lifespan=reflow_lifespan("postgresql://...", workflows=[checkout]))

    @app.post("/orders")
    async def create(order: Order, engine: EngineDep) -> dict[str, str]:
        run = await engine.enqueue(checkout, order)
        return {"run_id": run.id}
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from reflow_core.engine import Engine

from .starlette import STATE_KEY, reflow_lifespan
from .starlette import get_engine as _get_engine

__all__ = ["STATE_KEY", "EngineDep", "get_engine", "reflow_lifespan"]


def get_engine(request: Request) -> Engine:
    """The application's engine, started by :func:`reflow_lifespan`: a
    FastAPI dependency (``Depends(get_engine)``), which ``EngineDep`` spells
    as a type. Raises :class:`RuntimeError` when the application has none."""
    return _get_engine(request)


EngineDep = Annotated[Engine, Depends(get_engine)]
"""A route's parameter of this type receives the application's engine."""
