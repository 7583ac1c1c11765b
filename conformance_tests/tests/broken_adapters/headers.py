"""Adapters that break a promise about a run's propagation headers: that
they are stored as given, and that a debounced create replaces them."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from reflow_core.adapter import check_headers
from reflow_core.memory import MemoryStorage
from reflow_core.storage import CreateResult, Lease, NewRun, RunRecord

from ._common import _store


class DropsHeaders(MemoryStorage):
    """Breaks *a run's headers read back as given*: headers are checked but
    never stored, as an adapter that predates the field and forgot its
    column would; every worker starts a new trace instead of continuing the
    enqueuer's."""

    async def create_run(self, new: NewRun) -> CreateResult:
        check_headers(new.headers)
        return await super().create_run(dataclasses.replace(new, headers={}))

    async def start_child(self, lease: Lease, step: str, new: NewRun) -> RunRecord | None:
        check_headers(new.headers)
        return await super().start_child(lease, step, dataclasses.replace(new, headers={}))


def drops_headers() -> MemoryStorage:
    return DropsHeaders(name=_store("drops_headers"))


class DebounceKeepsHeaders(MemoryStorage):
    """Breaks *a debounced create replaces the headers with its own*: the
    open run keeps the headers of the create that made it, as an UPDATE
    that sets the input, priority, limits and rates but forgot the headers
    column would; the run is traced as the first trigger, not the last."""

    def _replace_debounced(self, entry: Any, new: NewRun, now: datetime) -> RunRecord:
        old = dataclasses.replace(new, headers=entry.record.headers)
        return super()._replace_debounced(entry, old, now)


def debounce_keeps_headers() -> MemoryStorage:
    return DebounceKeepsHeaders(name=_store("debounce_keeps_headers"))
