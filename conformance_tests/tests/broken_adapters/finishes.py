"""Adapters that break a promise of the finish hints: cancelled runs never
hinted, and children cancelled by their parent's cascade never hinted."""

from __future__ import annotations

from reflow_core.memory import MemoryStorage
from reflow_core.storage import RunRecord

from ._common import _store


class HintsMissCancels(MemoryStorage):
    """Breaks *every end is hinted*: a cancelled run is not, as an adapter
    that sends the hint from its finish statement only (and not from the one
    that cancels) would."""

    def _hint_finished(self, record: RunRecord) -> None:
        if record.status != "cancelled":
            super()._hint_finished(record)


def hints_miss_cancels() -> MemoryStorage:
    return HintsMissCancels(name=_store("hints_miss_cancels"))


class HintsMissCascade(MemoryStorage):
    """Breaks *every end is hinted*: the children a cancel cascades to are
    not, as a cancel statement that hints the run it was given but not the
    rows its cascade updated would."""

    def _hint_finished(self, record: RunRecord) -> None:
        if record.parent_id is None or record.status != "cancelled":
            super()._hint_finished(record)


def hints_miss_cascade() -> MemoryStorage:
    return HintsMissCascade(name=_store("hints_miss_cascade"))
