"""``reflow workers ls`` and ``reflow stats``: who is working, and how deep each queue is."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from reflow_core.storage import QueueStats, WorkerRecord

from ._common import State, echo_json, pass_state, relative, run_async

__all__ = ["stats", "workers"]


def _worker_json(record: WorkerRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "host": record.host,
        "pid": record.pid,
        "workflows": list(record.workflows),
        "concurrency": record.concurrency,
        "in_flight": record.in_flight,
        "started_at": record.started_at,
        "last_seen_at": record.last_seen_at,
        "expires_at": record.expires_at,
    }


@click.group()
def workers() -> None:
    """See the workers that serve the storage."""


@workers.command("ls")
@pass_state
def ls(state: State) -> None:
    """List the live workers, oldest first.

    Each running worker announces itself at every heartbeat; one that stops
    leaves the list at once, and one that died leaves it when its leases
    lapse (then its runs are reclaimed). IN FLIGHT is as of its last
    announcement.
    """

    async def work() -> tuple[list[WorkerRecord], datetime]:
        async with state.storage() as store:
            return await store.list_workers(), await store.now()

    records, now = run_async(work)
    if state.json:
        for record in records:
            echo_json(_worker_json(record))
        return
    if not records:
        state.console.print("no live workers")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "HOST", "PID", "IN FLIGHT", "STARTED", "LAST SEEN", "WORKFLOWS"):
        table.add_column(
            column,
            no_wrap=column != "WORKFLOWS",
            justify="right" if column in ("PID", "IN FLIGHT") else "left",
        )
    for record in records:
        table.add_row(
            record.id,
            record.host,
            str(record.pid),
            f"{record.in_flight}/{record.concurrency}",
            relative(record.started_at, now),
            relative(record.last_seen_at, now),
            ", ".join(record.workflows),
        )
    state.show(table)


def _age(since: datetime | None, now: datetime) -> float | None:
    return None if since is None else max((now - since).total_seconds(), 0.0)


@click.command()
@click.option(
    "--workflow",
    "-w",
    "names",
    multiple=True,
    metavar="NAME",
    help="Only this workflow (repeat for several); shown even with nothing queued.",
)
@pass_state
def stats(state: State, names: tuple[str, ...]) -> None:
    """Show how deep each workflow's queue is, and who serves it.

    For each workflow: its unfinished runs by status (DELAYED: enqueued
    with a delay, due or not), how long the oldest
    pending run has waited, and how many live workers serve it.

    Without --workflow, every workflow with unfinished runs. Finished runs
    are not counted (list them with `reflow runs ls --status`); the counts
    come from the storage's index of unfinished runs, so this is cheap on a
    store with a long history. A workflow with pending runs and no worker
    serving it is shown in red.
    """

    async def work() -> tuple[list[QueueStats], list[WorkerRecord], datetime]:
        async with state.storage() as store:
            found = await store.queue_stats(list(names) if names else None)
            return found, await store.list_workers(), await store.now()

    queues, live, now = run_async(work)
    serving: dict[str, int] = {}
    for worker in live:
        for name in set(worker.workflows):
            serving[name] = serving.get(name, 0) + 1
    if state.json:
        for queue in queues:
            echo_json(
                {
                    "workflow": queue.workflow,
                    "delayed": queue.delayed,
                    "pending": queue.pending,
                    "running": queue.running,
                    "sleeping": queue.sleeping,
                    "waiting": queue.waiting,
                    "oldest_pending_since": queue.oldest_pending_since,
                    "oldest_pending_age": _age(queue.oldest_pending_since, now),
                    "workers": serving.get(queue.workflow, 0),
                }
            )
        return
    if not queues:
        state.console.print("no unfinished runs")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ("WORKFLOW", "DELAYED", "PENDING", "RUNNING", "SLEEPING", "WAITING", "OLDEST PENDING")
    for column in (*columns, "WORKERS"):
        table.add_column(column, no_wrap=True, justify="left" if column == "WORKFLOW" else "right")
    for queue in queues:
        count = serving.get(queue.workflow, 0)
        unserved = count == 0 and queue.pending > 0
        table.add_row(
            Text(queue.workflow, style="red" if unserved else ""),
            str(queue.delayed),
            str(queue.pending),
            str(queue.running),
            str(queue.sleeping),
            str(queue.waiting),
            relative(queue.oldest_pending_since, now).removesuffix(" ago"),
            Text(str(count), style="red" if unserved else ""),
        )
    state.show(table)
