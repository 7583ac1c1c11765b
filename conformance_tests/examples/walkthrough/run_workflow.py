"""Run a real workflow on the tutorial adapter, through its URL.

    python run_workflow.py tutorial-sqlite:///walkthrough.db

Steps, a child run, a durable sleep and a wait for an event: every kind of
write the engine makes goes through the adapter.
"""

import asyncio
import sys

from reflow_core import Engine, StepContext, open_storage, workflow


def reserve(ctx: StepContext[dict[str, int], None]) -> int:
    return ctx.input["seats"]


def issue(ctx: StepContext[int, int]) -> str:
    return f"{ctx.input} tickets"


def confirm(ctx: StepContext[dict[str, int], dict[str, str]]) -> str:
    return f"{ctx.steps['tickets']}, paid by {ctx.prev['payer']}"


tickets = workflow("tickets").step("issue", issue)

booking = (
    workflow("booking")
    .step("reserve", reserve)
    .child("tickets", tickets)  # a child run: this run waits for it, holding no lease
    .sleep("hold", "200ms")  # the run sleeps in the store, holding no lease
    .wait_for_event("paid", timeout="30s")  # and waits there for an event
    .step("confirm", confirm)
)


async def main(url: str) -> None:
    storage = open_storage(url)  # found through the entry point named after the URL's scheme
    async with Engine(
        storage=storage, workflows=[booking, tickets], poll_interval="0.1s"
    ) as engine:
        run = await engine.enqueue(booking, {"seats": 2}, idempotency_key="booking-1")
        await engine.send_event(run.id, "paid", {"payer": "ada"}, event_id="payment-1")
        print(await engine.result(run.id, timeout=30))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
