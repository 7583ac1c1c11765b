"""After a conditional step, ``prev`` may be the skipped step's input."""

from dataclasses import dataclass

from reflow_core import StepContext, workflow


@dataclass
class Order:
    gift: bool


def price(ctx: StepContext[Order, Order]) -> int:
    return 10


def wrap(ctx: StepContext[Order, int]) -> str:
    return f"wrapped {ctx.prev}"


def shout(ctx: StepContext[Order, str]) -> str:
    return ctx.prev.upper()


order = (
    workflow("order", input=Order)
    .step("price", price)
    .step("wrap", wrap, when=lambda ctx: ctx.input.gift)
    .step("shout", shout)
)
