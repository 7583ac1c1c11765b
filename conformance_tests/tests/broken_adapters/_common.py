"""What every broken adapter shares: its named store, the controls, a millisecond clock."""

from __future__ import annotations

import uuid
from datetime import datetime

from reflow_core.adapter import utcnow
from reflow_core.memory import MemoryStorage

_PROCESS = uuid.uuid4().hex
"""Chosen once per process, so each factory's store is new in every test run."""


def _store(kind: str) -> str:
    return f"broken-adapters-{kind}-{_PROCESS}"


def _millisecond_clock() -> datetime:
    """The local clock, cut to whole milliseconds: the precision the contract
    requires and many databases keep, so runs created together share a time."""
    now = utcnow()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def correct() -> MemoryStorage:
    """The unbroken in-memory backend: the control, which must pass."""
    return MemoryStorage(name=_store("correct"))


def correct_millisecond_clock() -> MemoryStorage:
    """The unbroken backend on a millisecond clock: the control for ``sloppy_pagination``."""
    return MemoryStorage(name=_store("correct_millisecond_clock"), clock=_millisecond_clock)
