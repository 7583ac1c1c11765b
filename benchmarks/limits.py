"""Claims behind full concurrency limits or rates, against the unlimited claim, on each backend.

    python benchmarks/limits.py [--kind concurrency|rate] [--keys 10000] [--full 9000]
                                [--runs 10000] [--batch 100] [--passes 3]
                                [--backends memory sqlite postgres redis]
                                [--postgres-url ...] [--redis-url ...] [--pool-size 25]

Each pass builds two stores the same size and times the claims alone:

* ``limited``: ``--full`` keys (9,000 of ``--keys`` 10,000) are at their
  limit (``max=1``, one running run each), and each of them has one more
  run waiting, which a first, untimed round of claims meets and blocks
  (its time is reported apart: a one-time cost); then ``--runs`` runs
  (10,000) spread over the other keys (1,000, with room for all of them).
  Timed: claiming them in batches of ``--batch``, with the 9,000 blocked
  runs still there.
  With ``--kind rate`` the limits are rates instead: ``max`` starts per
  hour, so a full key has used its one start and its waiting run is
  blocked until the hour is over.
* ``unlimited`` (the baseline): the same runs without limits (the untimed
  round takes the 9,000 waiting runs). Timed: the same claims.

Figures are claims/s, medians over the passes with the spread, and the
ratio (limited over unlimited); the variants alternate, their order swapped
every pass. The target: the limited claim no worse than 2x slower.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from throughput import (
    BACKENDS,
    Backend,
    add_backend_options,
    cancel_on_sigterm,
    open_backend,
)

from reflow_core import codec
from reflow_core.storage import ConcurrencyLimit, NewRun, RateLimit, Storage

_WF = "bench-limits"
_LEASE = timedelta(minutes=10)
_HOUR = timedelta(hours=1)


def _new(key: str | None, max_: int = 1, kind: str = "concurrency") -> NewRun:
    if key is None:
        return NewRun(workflow=_WF, input=codec.encode(None))
    if kind == "rate":
        return NewRun(workflow=_WF, input=codec.encode(None), rates=(RateLimit(key, max_, _HOUR),))
    return NewRun(workflow=_WF, input=codec.encode(None), limits=(ConcurrencyLimit(key, max_),))


async def _create(storage: Storage, runs: list[NewRun], width: int = 50) -> None:
    for start in range(0, len(runs), width):
        await asyncio.gather(*(storage.create_run(new) for new in runs[start : start + width]))


async def _claim_all(storage: Storage, batch: int) -> tuple[int, float]:
    taken = 0
    started = time.perf_counter()
    while True:
        claimed = await storage.claim_runs([_WF], batch, _LEASE)
        if not claimed:
            break
        taken += len(claimed)
    return taken, time.perf_counter() - started


async def one_pass(
    backend: Backend, args: argparse.Namespace, limited: bool
) -> tuple[float, float]:
    """claims/s of the timed claims, and the seconds the untimed claim that
    met the waiting runs took (blocking them, or, without limits, taking them)."""
    storage = backend.make()
    await storage.initialize()
    try:
        free = args.keys - args.full
        full_keys = [f"full-{n}" for n in range(args.full)]
        kind = args.kind
        await _create(storage, [_new(key if limited else None, 1, kind) for key in full_keys])
        held, _ = await _claim_all(storage, 500)  # the full keys' running runs
        assert held == args.full, held
        await _create(storage, [_new(key if limited else None, 1, kind) for key in full_keys])
        # Untimed: the claims meet the waiting runs first; with limits they
        # are blocked (and never looked at again), without they are taken.
        met, meeting = await _claim_all(storage, 500)
        assert met == (0 if limited else args.full), met
        per_key = args.runs // free + 1
        work = [
            _new(f"free-{n % free}" if limited else None, per_key, kind) for n in range(args.runs)
        ]
        await _create(storage, work)
        taken, took = await _claim_all(storage, args.batch)
        assert taken == args.runs, (taken, args.runs)
        return taken / took, meeting
    finally:
        await storage.close()
        await backend.dispose(storage)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):>9,.0f} (spread {min(values):,.0f}-{max(values):,.0f})"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--kind", choices=["concurrency", "rate"], default="concurrency")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--full", type=int, default=9_000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--passes", type=int, default=3)
    add_backend_options(parser, BACKENDS)
    args = parser.parse_args()
    cancel_on_sigterm()
    print(
        f"python {sys.version.split()[0]}, {args.kind} limits, {args.keys} keys of which "
        f"{args.full} full, "
        f"{args.runs} claimable runs, claims of {args.batch}, {args.passes} passes, medians"
    )
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reflow-limits-")))
        for name in args.backends:
            backend = await open_backend(name, args, stack, tmp, database="reflow_bench_limits")
            rates: dict[bool, list[float]] = {True: [], False: []}
            blocking: list[float] = []
            for n in range(args.passes):
                for limited in (True, False) if n % 2 == 0 else (False, True):
                    rate, meeting = await one_pass(backend, args, limited)
                    rates[limited].append(rate)
                    if limited:
                        blocking.append(meeting)
            ratio = statistics.median(rates[True]) / statistics.median(rates[False])
            print(f"\n{backend.label}")
            print(f"  limited    claims/s {_median(rates[True])}")
            print(f"  unlimited  claims/s {_median(rates[False])}")
            print(f"  limited / unlimited {ratio:.2f}x")
            print(
                f"  blocking the {args.full} waiting runs once: {statistics.median(blocking):.2f} s"
            )


if __name__ == "__main__":
    asyncio.run(main())
