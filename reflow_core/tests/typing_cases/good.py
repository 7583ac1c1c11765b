"""A correctly typed workflow: the checker must accept it."""

from dataclasses import dataclass

from reflow_core import Retry, StepContext, workflow


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


def ship(ctx: StepContext[Order, Charge]) -> dict[str, str]:
    return {"tracking": ctx.prev.charge_id}


async def notify(ctx: StepContext[Order, dict[str, str]]) -> None:
    print(ctx.prev["tracking"].upper(), ctx.input.amount)


order = (
    workflow("order", input=Order)
    .step("charge", charge, retry=Retry(max_attempts=3))
    .step("ship", ship)
    .step("notify", notify)
)
reveal_type(order)  # noqa: F821
