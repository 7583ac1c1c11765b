"""The order workflow. Its steps are plain functions, so the worker runs
them in threads, where Django's ORM works as in a view."""

from __future__ import annotations

import os
from dataclasses import dataclass

from reflow_core import NonRetryableError, StepContext, workflow

from .models import Order

PRICES = {"tea": 450, "coffee": 600, "cake": 325}


@dataclass
class OrderInput:
    order_id: int
    item: str
    quantity: int


def price(ctx: StepContext[OrderInput, OrderInput]) -> dict[str, int]:
    unit = PRICES.get(ctx.input.item)
    if unit is None:
        raise NonRetryableError(f"we do not sell {ctx.input.item!r}")
    return {"total_cents": unit * ctx.input.quantity}


def confirm(ctx: StepContext[OrderInput, dict[str, int]]) -> dict[str, object]:
    total = ctx.prev["total_cents"]
    Order.objects.filter(pk=ctx.input.order_id).update(status="confirmed", total_cents=total)
    return {"order_id": ctx.input.order_id, "total_cents": total, "confirmed_by": os.getpid()}


place_order = (
    workflow("place_order", input=OrderInput).step("price", price).step("confirm", confirm)
)
