"""Reflow demo: start a run later, give a run a deadline, and go on without an answer.

    python examples/later_and_in_time.py [--db PATH]

On a SQLite file, one worker:

* a trial reminder enqueued with ``delay="1s"`` is stored as ``delayed`` and
  starts a second later, by the storage's clock;
* an expense review waits up to half a second for a manager's approval and,
  when none comes, goes on with a ``WaitTimedOut`` marker instead of failing;
* an export bounded by ``timeout="1s"`` whose step hangs is cancelled at its
  deadline and fails with ``RunDeadlineError``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from reflow_core import Engine, RunFailedError, StepContext, WaitTimedOut, open_storage, workflow


def remind(ctx: StepContext[dict[str, str], dict[str, str]]) -> str:
    return f"reminded {ctx.input['user']} that the trial ends soon"


def decide(ctx: StepContext[dict[str, Any], Any]) -> str:
    if isinstance(ctx.prev, WaitTimedOut):
        return f"no answer by {ctx.prev.deadline:%H:%M:%S}: escalated to finance"
    return "approved" if ctx.prev["approved"] else "rejected"


async def export(ctx: StepContext[None, None]) -> str:
    await asyncio.sleep(60)  # a hung upstream: the deadline stops it
    return "exported"


reminder = workflow("trial-reminder").step("remind", remind)
review = (
    workflow("expense-review")
    .wait_for_event("approval", timeout="500ms", on_timeout="continue")
    .step("decide", decide)
)
nightly_export = workflow("nightly-export", timeout="1s").step("export", export)


async def main(db: Path) -> int:
    storage = open_storage(f"sqlite:///{db}")
    flows = [reminder, review, nightly_export]
    async with Engine(storage=storage, workflows=flows, poll_interval="100ms") as engine:
        started = time.monotonic()
        later = await engine.enqueue(reminder, {"user": "ada"}, delay="1s")
        print(f"reminder enqueued: {later.status}, due at {later.wake_at:%H:%M:%S.%f} UTC")
        asked = await engine.enqueue(review, {"amount": 420})
        bounded = await engine.enqueue(nightly_export)

        print(f"review: {await engine.result(asked.id, timeout='10s')}")
        print(f"reminder: {await engine.result(later.id, timeout='10s')}")
        print(f"  started after {time.monotonic() - started:.1f}s")
        try:
            await engine.result(bounded.id, timeout="10s")
        except RunFailedError as failed:
            print(f"export: failed with {failed.error_code} at step {failed.step!r}")
            return 0
    return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raise SystemExit(asyncio.run(main(args.db or Path(tmp) / "later.db")))
