"""A workflow that misuses prev: the second step expects the first step's
output to be an Order, but the first step returns a Charge. The checker must
reject it."""

from dataclasses import dataclass

from reflow_core import StepContext, workflow


@dataclass
class Order:
    order_id: str
    amount: int


@dataclass
class Charge:
    charge_id: str
    amount: int


async def charge(ctx: StepContext[Order, Order]) -> Charge:
    return Charge(charge_id=f"ch_{ctx.input.order_id}", amount=ctx.prev.amount)


def ship(ctx: StepContext[Order, Order]) -> str:
    return ctx.prev.order_id


order = workflow("order", input=Order).step("charge", charge).step("ship", ship)
