"""Reflow demo: an order workflow that survives its worker being killed.

    python examples/order_demo.py [--db PATH]

1. Enqueue an order on the embedded SQLite backend.
2. Start a worker in a child process. It charges the card, starts packing,
   and is killed with SIGKILL in the middle of the "pack" step.
3. Start a second worker. Once the dead worker's lease lapses (2 s, measured
   by the storage clock), it reclaims the run and resumes at "pack": the card
   is not charged twice, because the "charge" result was saved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from reflow_core import Engine, Retry, StepContext, open_storage, workflow


@dataclass
class Order:
    order_id: str
    amount_cents: int
    email: str


LEDGER = Path(os.environ.get("REFLOW_DEMO_LEDGER", "ledger.txt"))


def say(text: str) -> None:
    print(f"  [pid {os.getpid()}] {text}", flush=True)


def charge(ctx: StepContext[Order, Order]) -> dict[str, object]:
    say(f"charge: charging {ctx.input.amount_cents} cents for {ctx.input.order_id}")
    with LEDGER.open("a") as ledger:  # the "payment provider": one line per real charge
        ledger.write(f"charged {ctx.input.order_id} {ctx.input.amount_cents}\n")
    return {"charge_id": f"ch_{ctx.input.order_id}", "amount": ctx.input.amount_cents}


def pack(ctx: StepContext[Order, dict[str, object]]) -> dict[str, object]:
    say(f"pack: packing order paid by {ctx.prev['charge_id']}")
    if os.environ.get("REFLOW_DEMO_CRASH") == "1":
        say("pack: *** the worker dies here (SIGKILL) ***")
        os.kill(os.getpid(), signal.SIGKILL)
    ctx.signal.wait(0.2)  # packing takes a moment; interruptible
    return {"parcel": f"parcel-{ctx.input.order_id}", "weight_g": 1200}


async def ship(ctx: StepContext[Order, dict[str, object]]) -> dict[str, object]:
    say(f"ship: handing {ctx.prev['parcel']} to the carrier")
    return {"tracking": f"TRK-{ctx.input.order_id}"}


async def email(ctx: StepContext[Order, dict[str, object]]) -> str:
    say(f"email: telling {ctx.input.email} about {ctx.prev['tracking']}")
    return f"sent to {ctx.input.email}"


order_flow = (
    workflow("order-fulfillment", input=Order)
    .step(
        "charge", charge, retry=Retry(max_attempts=5, backoff="exponential", initial_delay="200ms")
    )
    .step("pack", pack, timeout="30s")
    .step("ship", ship)
    .step("email", email)
)


def make_engine(db: str, *, worker: bool = True) -> Engine:
    return Engine(
        worker=worker,
        storage=open_storage(f"sqlite:///{db}"),
        workflows=[order_flow],
        concurrency=4,
        lease="2s",
        poll_interval="200ms",
    )


async def worker(db: str, run_id: str) -> None:
    async with make_engine(db) as engine:
        while True:  # the run's state lives in the storage, which another process writes too
            if (await engine.get_run_status(run_id)).status in ("completed", "failed"):
                return
            await asyncio.sleep(0.05)


async def enqueue(db: str) -> str:
    order = {"order_id": "ORD-1001", "amount_cents": 4999, "email": "ada@example.com"}
    async with make_engine(db, worker=False) as engine:
        run = await engine.enqueue(order_flow, order, idempotency_key="checkout:ORD-1001")
        again = await engine.enqueue(order_flow, order, idempotency_key="checkout:ORD-1001")
        assert again.id == run.id
    print(f"enqueued run {run.id} (enqueueing it again with the same key returned the same run)")
    return run.id


async def report(db: str, run_id: str) -> None:
    async with make_engine(db, worker=False) as engine:
        info = await engine.get_run_status(run_id)
    print(
        f"\nrun {info.id}: {info.status}, claimed {info.attempts} times, reclaimed {info.reclaims}"
    )
    for name, step in info.steps.items():
        print(f"  step {name:<7} {step.status:<9} output={step.output}")
    print(f"  final output: {info.output}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--db", help="SQLite file (default: a fresh temporary one)")
    parser.add_argument("--worker", metavar="RUN_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(args.db, args.worker))
        return

    workdir = Path(tempfile.mkdtemp(prefix="reflow-demo-"))
    db = args.db or str(workdir / "workflows.db")
    os.environ["REFLOW_DEMO_LEDGER"] = str(workdir / "ledger.txt")
    global LEDGER
    LEDGER = Path(os.environ["REFLOW_DEMO_LEDGER"])
    print(f"Reflow demo on sqlite:///{db}\n")

    run_id = asyncio.run(enqueue(db))
    print("\nworker 1 starts (it will be killed mid-step):")
    child = subprocess.run(
        [sys.executable, __file__, "--db", db, "--worker", run_id],
        env={**os.environ, "REFLOW_DEMO_CRASH": "1"},
        check=False,
    )
    if child.returncode < 0:
        print(f"worker 1 was killed by signal {-child.returncode}")
    started = time.monotonic()
    print("\nworker 2 starts; it waits for worker 1's lease to lapse, then resumes the run:")
    asyncio.run(worker(db, run_id))
    print(f"worker 2 finished the run {time.monotonic() - started:.1f}s after starting")
    asyncio.run(report(db, run_id))
    charges = LEDGER.read_text().splitlines()
    print(f"\nthe payment ledger has {len(charges)} charge(s): {charges}")


if __name__ == "__main__":
    main()
