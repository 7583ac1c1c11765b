"""A test engine's results carry the workflow's output type."""

from typing import TypedDict

from reflow_core import StepContext, workflow
from reflow_core.testing import SyncTestEngine, TestEngine


class Shipment(TypedDict):
    tracking: str


def ship(ctx: StepContext[str, str]) -> Shipment:
    return {"tracking": ctx.input}


wf = workflow("ship", input=str).step("ship", ship)


async def in_an_async_test() -> None:
    async with TestEngine([wf]) as t:
        result = await t.run(wf, "A1")
        reveal_type(result)  # noqa: F821
        reveal_type(result.output)  # noqa: F821
        by_name = await t.run("ship", "A1")
        reveal_type(by_name)  # noqa: F821


def in_a_plain_test(t: SyncTestEngine) -> str:
    return t.run(wf, "A1").output["tracking"]
