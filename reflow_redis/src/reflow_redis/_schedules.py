"""The schedule operations of :class:`~reflow_redis.RedisStorage`.

A schedule is a hash ``P:sched:<key>`` (``wf``, ``in``, ``rec``, ``next``,
``c``, ``u``, and ``p`` = ``1`` while paused), indexed by its next slot in
``P:schedule-due`` (every workflow's) and ``P:schedule-due:<workflow>`` (its
workflow's), and by key in ``P:schedule-keys``. ``due_schedules`` with
``workflows`` reads the index of each workflow named and merges them, so the
due schedules of other workflows are never walked, however many; without,
it reads ``P:schedule-due``. Firing a slot (``claim_slot.lua``) advances the
schedule and creates the slot's run in one script, or does neither. A paused
schedule is out of both due indexes (``set_paused.lua`` takes it out and puts
it back in the same script), so ``due_schedules`` never reads it;
``claim_slot.lua`` refuses it too.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from reflow_core.adapter import (
    check_aware,
    check_new_run,
    check_stats_workflows,
    check_text,
    new_run_id,
    to_epoch_us,
)
from reflow_core.errors import IdempotencyConflictError
from reflow_core.storage import NewRun, RunRecord, ScheduleRecord, ScheduleSpec

from ._connection import _Connection
from ._records import (
    _BadData,
    _deadline_arg,
    _delay_arg,
    _limit_args,
    _pairs,
    _schedule_record,
    _text,
)


class _Schedules(_Connection):
    """``upsert_schedule``, ``delete_schedule``, ``list_schedules``,
    ``due_schedules``, ``claim_schedule_slot`` and ``set_schedule_paused``,
    one script each."""

    def _schedules(self, operation: str, reply: Any) -> list[ScheduleRecord]:
        try:
            return [
                _schedule_record(_text(key, "schedule"), _pairs(flat, "schedule"))
                for key, flat in reply
            ]
        except _BadData as exc:
            raise self._bad(operation, exc) from exc

    async def upsert_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        check_text(spec.key, "key")
        check_text(spec.workflow, "workflow")
        reply = await self._call(
            "upsert_schedule",
            "upsert_schedule",
            [
                spec.key,
                spec.workflow,
                spec.input,
                spec.recurrence,
                to_epoch_us(spec.next_run_at, "next_run_at"),
            ],
            retry=True,
        )
        return self._schedules("upsert_schedule", [reply])[0]

    async def delete_schedule(self, key: str) -> bool:
        check_text(key, "key")
        return bool(await self._call("delete_schedule", "delete_schedule", [key]))

    async def list_schedules(self) -> list[ScheduleRecord]:
        reply = await self._call("list_schedules", "list_schedules", [], retry=True)
        return self._schedules("list_schedules", reply)

    async def due_schedules(
        self, limit: int, workflows: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        names = check_stats_workflows(workflows)
        if limit < 1 or names == []:
            return []
        if names is None:
            args: list[Any] = [limit, "1"]
        else:
            args = [limit, "0", *names]
        reply = await self._call("due_schedules", "due_schedules", args, retry=True)
        return self._schedules("due_schedules", reply)

    async def claim_schedule_slot(
        self, key: str, slot: datetime, next_run_at: datetime, run: NewRun
    ) -> RunRecord | None:
        check_text(key, "key")
        check_new_run(run)
        run_id = run.run_id or new_run_id()
        reply = await self._call(
            "claim_schedule_slot",
            "claim_slot",
            [
                key,
                to_epoch_us(slot, "slot"),
                to_epoch_us(next_run_at, "next_run_at"),
                run_id,
                run.workflow,
                run.input,
                run.idempotency_key or "",
                _delay_arg(run),
                _deadline_arg(run),
                *_limit_args(run),
            ],
        )
        outcome = int(reply[0])
        # {0} is a slot already fired or gone; {0, run} is create_run's
        # answer for the slot's run that already exists (the slot fired now).
        if outcome == -1 or (outcome == 0 and len(reply) < 2):
            return None
        if outcome == 1:
            return self._new_record(run_id, run, reply[1])
        record = self._stored_run("claim_schedule_slot", reply[1])
        if outcome == -2:
            assert run.idempotency_key is not None
            raise IdempotencyConflictError(run.workflow, run.idempotency_key, record.id)
        return record

    async def set_schedule_paused(
        self, key: str, paused: bool, *, next_run_at: datetime | None = None
    ) -> ScheduleRecord | None:
        check_text(key, "key")
        moved = ""
        if next_run_at is not None:
            moved = str(to_epoch_us(check_aware(next_run_at, "next_run_at"), "next_run_at"))
        reply = await self._call(
            "set_schedule_paused",
            "set_paused",
            [key, "1" if paused else "0", moved],
            retry=True,
        )
        if reply is None or reply is False:
            return None
        return self._schedules("set_schedule_paused", [reply])[0]
