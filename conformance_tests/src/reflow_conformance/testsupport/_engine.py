"""Engines for tests that drive them step by step."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from reflow_core import Engine, Workflow
from reflow_core.events import Event
from reflow_core.storage import Storage

__all__ = ["collect_events", "engine_on"]


@contextlib.asynccontextmanager
async def engine_on(
    storage: Storage, *workflows: Workflow[Any, Any], **options: Any
) -> AsyncIterator[Engine]:
    """An engine that is not started (drive it with ``tick``) and leaves the
    storage open (the test's fixture closes it); stopped at the end."""
    options.setdefault("close_storage", False)
    engine = Engine(storage=storage, workflows=workflows, **options)
    try:
        yield engine
    finally:
        await engine.stop(timeout=0)


async def collect_events(stream: AsyncIterator[Event], into: list[Event]) -> None:
    """Append every event of ``stream`` to ``into`` until it ends."""
    async for event in stream:
        into.append(event)
