"""A wait that goes on after its timeout: ``prev`` is the payload or a WaitTimedOut."""

from dataclasses import dataclass

from reflow_core import StepContext, WaitTimedOut, workflow


@dataclass
class Approval:
    approved: bool


def decide(ctx: StepContext[None, Approval | WaitTimedOut]) -> bool:
    if isinstance(ctx.prev, WaitTimedOut):
        return False
    return ctx.prev.approved


strict = workflow("strict").wait_for_event("approval", schema=Approval, timeout="1h")
reveal_type(strict)  # noqa: F821
lenient = workflow("lenient").wait_for_event(
    "approval", schema=Approval, timeout="1h", on_timeout="continue"
)
reveal_type(lenient)  # noqa: F821
finished = lenient.step("decide", decide)
