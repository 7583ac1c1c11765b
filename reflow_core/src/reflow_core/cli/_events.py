"""``reflow events``: send an event to a run."""

from __future__ import annotations

import json

import click

from reflow_core import codec
from reflow_core.admin import MAX_BUFFERED
from reflow_core.errors import SerializationError

from ._common import State, echo_json, fail, pass_state, run_async

__all__ = ["MAX_BUFFERED", "events"]


@click.group()
def events() -> None:
    """Send events to runs."""


@events.command("send")
@click.argument("run_id")
@click.argument("name")
@click.argument("payload", metavar="[JSON]", required=False)
@click.option(
    "--id",
    "event_id",
    metavar="EVENT_ID",
    help="An id for this event: sending the same id to the run again does nothing.",
)
@click.option(
    "--max-buffered",
    metavar="N",
    default=MAX_BUFFERED,
    show_default=True,
    type=click.IntRange(min=1),
    help="Refuse the event if the run already holds this many unconsumed events.",
)
@pass_state
def send(
    state: State,
    run_id: str,
    name: str,
    payload: str | None,
    event_id: str | None,
    max_buffered: int,
) -> None:
    """Send event NAME, with an optional JSON payload, to run RUN_ID.

    A run waiting for NAME wakes up; one that has not reached its wait yet
    keeps the event until it gets there. The payload is checked only by the
    worker, against the wait's schema, since this command does not load
    workflow code. Exit status 1 if the run is missing or finished.
    """
    try:
        value = None if payload is None else json.loads(payload)
        text = codec.encode(value)
    except (ValueError, SerializationError) as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="JSON") from None

    async def work() -> bool:
        async with state.storage() as store:
            return await store.deliver_event(
                run_id, name, text, event_id=event_id, max_buffered=max_buffered
            )

    if not run_async(work):
        fail(f"run {run_id!r} not found or already finished; the event was not stored")
    if state.json:
        echo_json({"run_id": run_id, "event": name, "event_id": event_id, "delivered": True})
    else:
        state.console.print(f"sent event {name!r} to run {run_id}", markup=False)
