"""A conditional step: after it, ``prev`` is its output or its input."""

from dataclasses import dataclass

from reflow_core import StepContext, workflow


@dataclass
class Order:
    order_id: str
    gift: bool


def price(ctx: StepContext[Order, Order]) -> int:
    return 10


def wrap(ctx: StepContext[Order, int]) -> str:
    return f"wrapped {ctx.prev}"


async def wants_gift(ctx: StepContext[Order, int]) -> bool:
    return ctx.input.gift


def total(ctx: StepContext[Order, int | str]) -> str:
    return str(ctx.prev)


order = (
    workflow("order", input=Order)
    .step("price", price)
    .step("wrap", wrap, when=lambda ctx: ctx.input.gift)
)
reveal_type(order)  # noqa: F821
awaited = workflow("order", input=Order).step("price", price).step("wrap", wrap, when=wants_gift)
reveal_type(awaited)  # noqa: F821
finished = order.step("total", total)
