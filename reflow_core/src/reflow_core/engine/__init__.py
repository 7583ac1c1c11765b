"""The engine: enqueues runs, claims them, runs their steps, persists each result.

One :class:`Engine` is a worker (it claims and runs workflows) and a client
(it enqueues, inspects and cancels runs). Any number of engines may share one
storage, in one process or many; the storage's leases decide who runs what.

The package is cut along the engine's four jobs:

* ``engine.core``: the :class:`Engine` facade (configuration,
  lifecycle, the client API);
* ``engine.worker``: the claim loop, wake-up hints,
  heartbeats, start, stop and drain;
* ``engine.driver`` and ``engine.units``:
  driving one run, with one executor per kind of unit (step, sleep, wait,
  parallel group, map), retries and fenced writes;
* ``engine.enqueue``: the checks of what is enqueued, one run or a batch
  (:class:`EnqueueItem`);
* ``engine.watch``: one reader for every :meth:`Engine.result` and
  :meth:`Engine.wait` waiter, woken by finish hints;
* ``engine.children``: starting child runs from a step, with ids that a
  replayed step finds again;
* ``engine.views``: the read-only :class:`Run`,
  :class:`StepResult`, :class:`RunList`, :class:`WaitedRuns` and the
  :class:`Clock`.
"""

from __future__ import annotations

from .core import MAX_LEASE, MIN_HEARTBEAT, MIN_LEASE, POLL_INTERVAL_RANGE, Engine
from .enqueue import EnqueueItem
from .views import ChildRun, Clock, Run, RunList, StepResult, SystemClock, WaitedRuns

__all__ = [
    "MAX_LEASE",
    "MIN_HEARTBEAT",
    "MIN_LEASE",
    "POLL_INTERVAL_RANGE",
    "ChildRun",
    "Clock",
    "Engine",
    "EnqueueItem",
    "Run",
    "RunList",
    "StepResult",
    "SystemClock",
    "WaitedRuns",
]
