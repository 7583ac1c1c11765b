"""``reflow schedules``: list, pause, resume, delete and trigger stored schedules."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from reflow_core.admin import recurrence_text
from reflow_core.schedules import find_schedule, set_paused
from reflow_core.storage import NewRun, RunRecord, ScheduleRecord

from ._common import (
    State,
    compact,
    decode_stored,
    echo_json,
    fail,
    pass_state,
    relative,
    run_async,
    stamp,
)

__all__ = ["schedules"]


def _schedule_json(record: ScheduleRecord) -> dict[str, Any]:
    value, problem = decode_stored(record.input)
    found: dict[str, Any] = {
        "key": record.key,
        "workflow": record.workflow,
        "recurrence": record.recurrence,
        "next_run_at": record.next_run_at,
        "paused": record.paused,
        "input": value,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }
    if problem:
        found["read_error"] = f"input: {problem}"
    return found


@click.group()
def schedules() -> None:
    """List, pause, resume, delete and trigger schedules."""


@schedules.command("ls")
@pass_state
def ls(state: State) -> None:
    """List every stored schedule, by key, with its next slot and whether it is paused."""

    async def work() -> tuple[list[ScheduleRecord], datetime]:
        async with state.storage() as store:
            return await store.list_schedules(), await store.now()

    records, now = run_async(work)
    if state.json:
        for record in records:
            echo_json(_schedule_json(record))
        return
    if not records:
        state.console.print("no schedules")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("KEY", "WORKFLOW", "RECURRENCE", "STATE", "NEXT RUN", "INPUT"):
        table.add_column(column, no_wrap=column != "INPUT")
    for record in records:
        value, problem = decode_stored(record.input)
        table.add_row(
            record.key,
            record.workflow,
            recurrence_text(record.recurrence),
            Text("paused", style="yellow") if record.paused else "active",
            "-"
            if record.paused
            else f"{stamp(record.next_run_at)} ({relative(record.next_run_at, now)})",
            f"(unreadable: {problem})" if problem else compact(value),
        )
    state.show(table)


@schedules.command("rm")
@click.argument("key")
@pass_state
def rm(state: State, key: str) -> None:
    """Delete schedule KEY: no later slot fires. Runs it created stay.

    A worker whose code still schedules KEY stores it again when it starts.
    Exit status 1 if there is no such schedule.
    """

    async def work() -> bool:
        async with state.storage() as store:
            return await store.delete_schedule(key)

    if not run_async(work):
        fail(f"no schedule with key {key!r}")
    if state.json:
        echo_json({"key": key, "deleted": True})
    else:
        state.console.print(f"deleted schedule {key!r}", markup=False)


@schedules.command("trigger")
@click.argument("key")
@pass_state
def trigger(state: State, key: str) -> None:
    """Start a run of schedule KEY now, with its workflow and input.

    The schedule itself is unchanged: its next slot still fires as planned.
    The run waits for a worker that serves the workflow. Exit status 1 if
    there is no such schedule.
    """

    async def work() -> RunRecord | None:
        async with state.storage() as store:
            found = await find_schedule(store, key)
            if found is None:
                return None
            created = await store.create_run(NewRun(workflow=found.workflow, input=found.input))
            return created.run

    run = run_async(work)
    if run is None:
        fail(f"no schedule with key {key!r}")
    if state.json:
        echo_json({"key": key, "run_id": run.id, "workflow": run.workflow})
    else:
        state.console.print(
            f"started run {run.id} of workflow {run.workflow!r} from schedule {key!r}",
            markup=False,
        )


def _set_paused(state: State, key: str, paused: bool) -> None:
    async def work() -> ScheduleRecord | None:
        async with state.storage() as store:
            return await set_paused(store, key, paused)

    record = run_async(work)
    if record is None:
        fail(f"no schedule with key {key!r}")
    if state.json:
        echo_json(_schedule_json(record))
    elif paused:
        state.console.print(f"paused schedule {key!r}", markup=False)
    else:
        state.console.print(
            f"resumed schedule {key!r}; next run {stamp(record.next_run_at)}", markup=False
        )


@schedules.command("pause")
@click.argument("key")
@pass_state
def pause(state: State, key: str) -> None:
    """Pause schedule KEY: no slot fires until it is resumed.

    The pause is stored, so it holds for every worker, across restarts and
    deploys (a worker that registers KEY again keeps it paused). Runs it
    already started are not touched. Exit status 1 if there is no such schedule.
    """
    _set_paused(state, key, True)


@schedules.command("resume")
@click.argument("key")
@pass_state
def resume(state: State, key: str) -> None:
    """Resume schedule KEY. Slots that passed while it was paused are
    skipped: it next fires at its first slot after now. Exit status 1 if
    there is no such schedule.
    """
    _set_paused(state, key, False)
