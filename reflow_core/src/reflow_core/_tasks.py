"""Stopping the engine's background tasks without swallowing a cancellation
of whoever stops them."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has finished.

    The ``CancelledError`` the task ends with is expected and dropped; one
    meant for the caller (the caller's own task being cancelled meanwhile,
    by a timeout or a Ctrl-C) propagates, so that stopping something can
    itself be cancelled. An exception the task ended with otherwise
    propagates too.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
