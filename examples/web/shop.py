"""The workflow behind the web examples: an order is priced, then confirmed.

Each web example (``fastapi_app.py``, ``flask_app.py``) enqueues it from a
request and reads its result in another; a worker process runs it:

    REFLOW_URL=sqlite:///shop.db reflow worker shop:make_engine
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from reflow_core import Engine, NonRetryableError, StepContext, workflow

PRICES = {"tea": 450, "coffee": 600, "cake": 325}
"""Price of one item, in cents."""


@dataclass
class Order:
    item: str
    quantity: int


def price(ctx: StepContext[Order, Order]) -> dict[str, int]:
    unit = PRICES.get(ctx.input.item)
    if unit is None:
        # Retrying cannot make an unknown item known.
        raise NonRetryableError(f"we do not sell {ctx.input.item!r}")
    return {"unit_cents": unit, "total_cents": unit * ctx.input.quantity}


def confirm(ctx: StepContext[Order, dict[str, int]]) -> dict[str, object]:
    return {
        "item": ctx.input.item,
        "quantity": ctx.input.quantity,
        "total_cents": ctx.prev["total_cents"],
        "confirmed_by": f"worker {os.getpid()}",
    }


place_order = workflow("place_order", input=Order).step("price", price).step("confirm", confirm)


def storage_url() -> str:
    """The store every process of the example shares."""
    return os.environ.get("REFLOW_URL", "sqlite:///shop.db")


def make_engine() -> Engine:
    """The worker's engine: ``reflow worker shop:make_engine``."""
    return Engine(storage=storage_url(), workflows=[place_order], poll_interval="200ms")
