"""Reflow demo: an order workflow that starts a shipment as a child workflow.

    python examples/order_with_shipment.py [--db PATH]

On a SQLite file, one worker with a single slot:

* the order charges the card, then its ``ship`` step starts a ``shipment``
  child run and waits for it, durably: the order is stored as ``waiting``
  and gives up its slot, so the shipment runs on the same one-slot worker;
* the shipment books a carrier and waits for the carrier's pick-up event,
  which the script sends a moment later;
* when the shipment completes, the same write wakes the order, which takes
  the shipment's output and closes;
* a second order ships to an address the carrier refuses: the shipment
  fails, and the order's ``ship`` step fails with ``ChildFailedError``
  naming the child and its error.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any, TypedDict

from reflow_core import Engine, RunFailedError, StepContext, Workflow, open_storage, workflow


class Order(TypedDict):
    id: str
    amount: int
    address: str


class Shipment(TypedDict):
    order_id: str
    address: str


def book(ctx: StepContext[Shipment, Shipment]) -> dict[str, str]:
    if ctx.input["address"].startswith("nowhere"):
        raise ValueError(f"no carrier delivers to {ctx.input['address']!r}")
    return {"carrier": "parcelco", "tracking": f"PC-{ctx.input['order_id']}"}


def delivered(ctx: StepContext[Shipment, Any]) -> dict[str, str]:
    booking = ctx.steps["book"]
    return {"tracking": booking["tracking"], "picked_up_at": ctx.prev["at"]}


shipment = (
    workflow("shipment", input=Shipment)
    .step("book", book)
    .wait_for_event("picked_up", timeout="1m")
    .step("delivered", delivered)
)


def charge(ctx: StepContext[Order, Order]) -> dict[str, int]:
    return {"charged": ctx.input["amount"]}


def shipment_for(ctx: StepContext[Order, dict[str, int]]) -> Shipment:
    return {"order_id": ctx.input["id"], "address": ctx.input["address"]}


def close(ctx: StepContext[Order, dict[str, str]]) -> str:
    return f"order {ctx.input['id']} shipped, tracking {ctx.prev['tracking']}"


order = (
    workflow("order", input=Order)
    .step("charge", charge)
    .child(
        "ship", shipment, lambda ctx: {"order_id": ctx.input["id"], "address": ctx.input["address"]}
    )
    .step("close", close)
)


async def wait_for_status(engine: Engine, run_id: str, status: str) -> None:
    for _ in range(500):
        run = await engine.get_run(run_id)
        if run is not None and run.status == status:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"run {run_id} never became {status}")


async def main(db: Path) -> int:
    storage = open_storage(f"sqlite:///{db}")
    flows: list[Workflow[Any, Any]] = [order, shipment]
    async with Engine(
        storage=storage, workflows=flows, concurrency=1, poll_interval="100ms"
    ) as engine:
        run = await engine.enqueue(order, {"id": "A-1", "amount": 42, "address": "1 Main St"})
        await wait_for_status(engine, run.id, "waiting")
        (child,) = (await engine.get_run_status(run.id)).children
        print(f"order {run.id}: waiting for child {child.id} ({child.workflow})")
        await wait_for_status(engine, child.id, "waiting")
        print("shipment: booked, waiting for the carrier's pick-up")
        await engine.send_event(child.id, "picked_up", {"at": "10:42"})
        print(f"order: {await engine.result(run.id, timeout='10s')}")
        status = await engine.get_run_status(child.id)
        print(f"shipment {status.id}: {status.status}, parent {status.parent_id}")

        doomed = await engine.enqueue(
            order, {"id": "B-2", "amount": 7, "address": "nowhere in particular"}
        )
        try:
            await engine.result(doomed.id, timeout="10s")
        except RunFailedError as failed:
            print(f"second order: failed at step {failed.step!r} with {failed.error_type}")
            print(f"  {failed.info.get('message')}")
            return 0
    return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raise SystemExit(asyncio.run(main(args.db or Path(tmp) / "orders.db")))
