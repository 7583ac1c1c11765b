"""The worker registry and queue statistics of :class:`~reflow_redis.RedisStorage`.

Workers: ``P:workers`` scores worker ids by when their entry lapses (µs, by
the server's ``TIME``, as leases are) and ``P:worker:<id>`` is a hash of an
entry's fields. ``workers.lua`` deletes lapsed entries first, then announces,
lists or removes, so a lapsed entry is never returned, refreshed or counted.

Queue statistics read only indexes of unfinished runs (see
``queue_stats.lua``): the due sets ``P:due:<wf>`` and ``P:pdue:<pr>:<wf>``
(the priorities of ``P:prios:<wf>``) and ``P:vdue:<v>:<pr>:<wf>`` (those of
``P:vprios:<wf>``), ``P:blocked-wf:<wf>`` (runs blocked by
a full concurrency limit) and ``P:running:<wf>``, which the run scripts
already keep, ``P:parked:<wf>`` (sleeping, waiting and delayed runs, kept
by the create, sleep, wait, deliver, claim and cancel scripts) and ``P:workflows``, the
names of workflows that may have unfinished runs (added on create and
requeue, dropped lazily by ``queue_stats`` once nothing of a workflow is
left). A call costs a few ``ZCARD``/``ZCOUNT`` per workflow, never a walk of
finished history.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta
from typing import Any

from reflow_core.adapter import (
    StatsRow,
    check_stats_workflows,
    check_text,
    check_worker,
    encode_workflows,
    queue_stats_from_counts,
    span_us,
)
from reflow_core.storage import QueueStats, WorkerInfo, WorkerRecord

from ._connection import _Connection
from ._records import _BadData, _pairs, _text, _time, _worker_record

_STATUSES = ("pending", "running", "sleeping", "waiting")
"""The counts a ``queue_stats.lua`` row carries, in order, after the name
(then the oldest pending wake, then the ``delayed`` count)."""


class _Workers(_Connection):
    """``announce_worker``, ``list_workers``, ``remove_worker`` and ``queue_stats``."""

    def _workers(self, operation: str, reply: Any) -> list[WorkerRecord]:
        try:
            return [
                _worker_record(_text(worker_id, "worker"), _pairs(flat, "worker"))
                for worker_id, flat in reply
            ]
        except _BadData as exc:
            raise self._bad(operation, exc) from exc

    async def announce_worker(self, worker: WorkerInfo, ttl: timedelta) -> WorkerRecord:
        check_worker(worker, ttl)
        reply = await self._call(
            "announce_worker",
            "workers",
            [
                "announce",
                worker.id,
                worker.host,
                worker.pid,
                encode_workflows(worker.workflows),
                worker.concurrency,
                worker.in_flight,
                max(1, span_us(ttl)),
            ],
            retry=True,
        )
        return self._workers("announce_worker", [reply])[0]

    async def list_workers(self) -> list[WorkerRecord]:
        reply = await self._call("list_workers", "workers", ["list"], retry=True)
        workers = self._workers("list_workers", reply)
        return sorted(workers, key=lambda w: (w.started_at, w.id))

    async def remove_worker(self, worker_id: str) -> bool:
        check_text(worker_id, "worker_id")
        return bool(await self._call("remove_worker", "workers", ["remove", worker_id]))

    async def queue_stats(self, workflows: Collection[str] | None = None) -> list[QueueStats]:
        names = check_stats_workflows(workflows)
        if names == []:
            self._lifecycle.check("queue_stats")
            return []
        args: list[Any] = ["1"] if names is None else ["0", *names]
        reply = await self._call("queue_stats", "queue_stats", args, retry=True)
        rows: list[StatsRow] = []
        try:
            for row in reply:
                workflow = _text(row[0], "queue_stats")
                since = _time(_text(row[5], "queue_stats"), "queue_stats")
                for status, count in zip(_STATUSES, row[1:5], strict=True):
                    rows.append((workflow, status, int(count), since))
                rows.append((workflow, "delayed", int(row[6]), None))
        except (_BadData, ValueError, TypeError, IndexError) as exc:
            bad = exc if isinstance(exc, _BadData) else _BadData(f"a malformed reply: {exc}")
            raise self._bad("queue_stats", bad) from exc
        return queue_stats_from_counts(rows, names)
