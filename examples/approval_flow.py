"""Reflow example: an expense claim that sleeps, waits for approval and fans out.

    python examples/approval_flow.py

Shows durable sleep, waiting for an external event, a parallel group, a
conditional step, early completion, a failure handler, awaiting results and
the event stream, on a temporary SQLite file.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reflow_core import (
    Branch,
    Engine,
    FailureContext,
    Retry,
    RunCompleted,
    RunFailedError,
    StepCompleted,
    StepContext,
    StepSkipped,
    workflow,
)


@dataclass
class Claim:
    employee: str
    amount: int
    receipt: bool = True


@dataclass
class Approval:
    approved: bool
    by: str


def check(ctx: StepContext[Claim, Claim]) -> dict[str, object]:
    if ctx.input.amount == 0:
        ctx.complete({"nothing_to_pay": True})  # finishes the run here
    if not ctx.input.receipt:
        raise ValueError("a receipt is required")
    return {"amount": ctx.input.amount}


async def record_approval(ctx: StepContext[Claim, Approval]) -> dict[str, object]:
    if not ctx.prev.approved:
        raise PermissionError(f"rejected by {ctx.prev.by}")
    return {"approved_by": ctx.prev.by}


async def pay(ctx: StepContext[Claim, dict[str, object]]) -> str:
    return f"paid {ctx.input.amount} to {ctx.input.employee}"


async def ledger(ctx: StepContext[Claim, dict[str, object]]) -> str:
    return f"ledger entry for {ctx.input.employee}"


async def audit(ctx: StepContext[Claim, dict[str, object]]) -> str:
    return f"large claim audited: {ctx.prev['pay']}"


failures: list[str] = []


def tell_employee(ctx: FailureContext[Claim]) -> None:
    failures.append(f"{ctx.input.employee}: claim failed at {ctx.step!r}: {ctx.error['message']}")


expenses = (
    workflow("expense-claim", input=Claim)
    .step("check", check)
    .sleep("cooling-off", "300ms")  # durable: no process holds the run meanwhile
    .wait_for_event("approval", schema=Approval, timeout="1h")
    .step("record", record_approval)
    .parallel(
        {"pay": Branch(pay, retry=Retry(max_attempts=3, initial_delay="100ms")), "book": ledger}
    )
    .step("audit", audit, when=lambda ctx: ctx.input.amount >= 1000)
    .on_failure(tell_employee)
)


async def main() -> None:
    db = Path(tempfile.mkdtemp(prefix="reflow-example-")) / "claims.db"
    async with Engine(
        storage=f"sqlite:///{db}", workflows=[expenses], poll_interval="100ms"
    ) as engine:
        seen: list[str] = []

        async def watch() -> None:
            async for event in engine.stream():
                if isinstance(event, StepCompleted | StepSkipped):
                    seen.append(f"{type(event).__name__}:{event.step}")
                elif isinstance(event, RunCompleted):
                    seen.append("RunCompleted")

        watcher = asyncio.create_task(watch())
        big = await engine.enqueue(expenses, Claim("ada", 1500))
        small = await engine.enqueue(expenses, Claim("grace", 40))
        nothing = await engine.enqueue(expenses, Claim("alan", 0))
        rejected = await engine.enqueue(expenses, Claim("edsger", 90))

        # Approvals may arrive before the runs reach their wait: they are kept.
        await engine.send_event(big.id, "approval", {"approved": True, "by": "finance"})
        await engine.send_event(small.id, "approval", {"approved": True, "by": "manager"})
        await engine.send_event(rejected.id, "approval", {"approved": False, "by": "manager"})

        print("big claim:    ", await engine.result(big.id, timeout="10s"))
        print("small claim:  ", await engine.result(small.id, timeout="10s"))
        print("empty claim:  ", await engine.result(nothing.id, timeout="10s"))
        try:
            await engine.result(rejected.id, timeout="10s")
        except RunFailedError as exc:
            print("rejected:     ", exc)
        status = await engine.get_run_status(small.id)
        print("small claim steps:", {name: step.status for name, step in status.steps.items()})
    await watcher
    print("failure handler:", failures)
    print("events seen:", len(seen), "including", seen[:4])


if __name__ == "__main__":
    asyncio.run(main())
