"""The dashboard's reads of :class:`~reflow_redis.RedisStorage`: runs by
idempotency key, a run's buffered events, and finished runs per minute.

Each is one script that reads an index the writing scripts keep in the
same script as the change they index, so an index never disagrees with the
runs (``find_by_key.lua`` only drops entries written behind their back):

- ``P:bykey:<key>`` (zset, score 0, members ``<created µs>:<id>``): the runs
  created with an idempotency key, of every workflow (``P:idem:<workflow>``
  only knows a key within its workflow). ``create_run`` adds a run, a purge
  removes it; ``find_by_key.lua`` reads it newest first.
- ``P:evm:<n>.<id>:<name>`` (list): the arrival number (the run's ``es``
  counter) and event id of each event of the buffer ``P:ev:<n>.<id>:<name>``,
  in step with it: ``deliver.lua`` pushes to both, ``take.lua`` pops both,
  and a run's end or purge deletes both. ``list_events.lua`` merges a run's
  buffers by arrival number.
- ``P:done:<status>`` (zset, score the finish time in µs, member the run
  id): the runs stored and finished with that status. Finishing or
  cancelling a run adds it, a requeue or a purge removes it;
  ``history.lua`` counts a minute with one ``ZCOUNT`` per status, so a call
  grows with the minutes asked for, never with older history (the script
  says why these sets rather than counters per minute).

Stores written before these indexes (layout version 1) are indexed at
``initialize`` (``migrate.lua``); events buffered before the upgrade have no
arrival number or event id, so they list first, by name, without an id.
"""

from __future__ import annotations

from typing import Any

from reflow_core.adapter import (
    HistoryRow,
    check_count,
    check_text,
    finished_minutes_from_counts,
    from_epoch_us,
)
from reflow_core.storage import MAX_HISTORY_MINUTES, BufferedEvent, FinishedMinute, RunRecord

from ._connection import _Connection
from ._records import _BadData, _pairs, _run_record, _text


class _Dashboard(_Connection):
    """``find_runs_by_key``, ``list_buffered_events`` and ``finished_history``."""

    async def find_runs_by_key(self, idempotency_key: str, *, limit: int = 20) -> list[RunRecord]:
        check_text(idempotency_key, "idempotency_key")
        check_count(limit, "limit")
        reply = await self._call(
            "find_runs_by_key", "find_by_key", [idempotency_key, limit], retry=True
        )
        try:
            return [
                _run_record(_text(run_id, "find_runs_by_key"), _pairs(flat, "found run"))
                for run_id, flat in reply
            ]
        except _BadData as exc:
            raise self._bad("find_runs_by_key", exc) from exc

    async def list_buffered_events(self, run_id: str, *, limit: int = 100) -> list[BufferedEvent]:
        check_text(run_id, "run_id")
        check_count(limit, "limit")
        reply = await self._call("list_buffered_events", "list_events", [run_id, limit], retry=True)
        where = "buffered event"
        try:
            return [
                BufferedEvent(
                    event=_text(name, where),
                    payload=_text(payload, where),
                    event_id=_text(event_id, where) or None,
                )
                for name, payload, event_id in reply
            ]
        except (_BadData, TypeError, ValueError) as exc:
            bad = exc if isinstance(exc, _BadData) else _BadData(f"a malformed reply: {exc}")
            raise self._bad("list_buffered_events", bad) from exc

    async def finished_history(self, minutes: int) -> list[FinishedMinute]:
        check_count(minutes, "minutes", most=MAX_HISTORY_MINUTES)
        reply: Any = await self._call("finished_history", "history", [minutes], retry=True)
        rows: list[HistoryRow] = []
        try:
            for minute, status, count in reply:
                start = _text(minute, "finished_history")
                if not start.isdigit():
                    raise _BadData(f"finished_history has a minute {start!r}")
                rows.append((from_epoch_us(int(start)), _text(status, "status"), int(count)))
        except (_BadData, TypeError, ValueError) as exc:
            bad = exc if isinstance(exc, _BadData) else _BadData(f"a malformed reply: {exc}")
            raise self._bad("finished_history", bad) from exc
        return finished_minutes_from_counts(rows)
