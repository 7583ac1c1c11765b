"""Reading an attribute that the previous step's output does not have."""

from dataclasses import dataclass

from reflow_core import StepContext, workflow


@dataclass
class Order:
    order_id: str


async def first(ctx: StepContext[Order, Order]) -> int:
    return len(ctx.prev.order_id)


async def second(ctx: StepContext[Order, int]) -> str:
    return ctx.prev.upper()


order = workflow("order", input=Order).step("first", first).step("second", second)
