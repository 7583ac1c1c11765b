"""A test engine's results carry the workflow's output type, in the async
engine and in its synchronous facade alike."""

from datetime import datetime
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
    result = t.run(wf, "A1", idempotency_key="k", advance=True)
    reveal_type(result)  # noqa: F821
    reveal_type(t.run("ship", "A1"))  # noqa: F821
    reveal_type(t.send_event(result.id, "approval", {"by": "ann"}))  # noqa: F821
    reveal_type(t.advance("1h"))  # noqa: F821
    return result.output["tracking"]


def misuse(t: SyncTestEngine, moment: datetime) -> None:
    # Each error is expected: strict mode reports an ignore that is not needed,
    # so a facade method that lost its parameters' types fails the check.
    t.run(42)  # type: ignore[call-overload]
    t.run(wf, "A1", advance="yes")  # type: ignore[call-overload]
    t.drive(result_id="r")  # type: ignore[call-arg]
    t.advance_to("tomorrow")  # type: ignore[arg-type]
    t.advance_to(moment).output  # type: ignore[attr-defined]
    t.send_event("r")  # type: ignore[call-arg]
