"""Stopping the engine's background tasks without swallowing a cancellation
of whoever stops them."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait", "raise_if_cancelled"]


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


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop.

    A driver may swallow the cancellation that reaches it mid-call (redis-py
    on Python 3.11 does while it sends a command) and return, or raise an
    error of its own instead; a background loop that then went on would keep
    whoever stops it (``cancel_and_wait``) waiting forever. Each loop calls
    this once a turn: the request stays on the task (``cancelling()``) until
    it is acted on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
