"""Test support shared by Reflow's own test suites and the conformance suite.

* :func:`run_async_tests` makes the ``pytest_pyfunc_call`` hook that runs
  ``async def`` tests with :func:`asyncio.run`, under a timeout.
* :class:`FakeClock` is a storage clock that moves only when a test moves it.
* :func:`engine_on` is an engine a test drives with ``tick``, on a storage it
  keeps open; :func:`collect_events` gathers what an event stream yields.
* The crash worker: a process running a real :class:`~reflow_core.Engine` on
  the store an adapter target names (a storage URL or ``"module:callable"``,
  see :func:`reflow_conformance.load_factory`)::

      python -m reflow_conformance.testsupport work TARGET LOGDIR [options]
      python -m reflow_conformance.testsupport enqueue TARGET LOGDIR --runs N [--pace S]

  :class:`Workers` starts such processes, kills them, and reads what they did.
* Every worker process appends what it does to ``LOGDIR/exec-<pid>.log``, one
  JSON object a line, each line written with a single ``write`` to a file
  opened with ``O_APPEND``: a line written survives the process being killed,
  and a line without its newline is never read as whole.
* :func:`check_outcome` checks what the workers left in the store against
  their logs: every run completed, every saved step is the output of one real
  execution of it, saved once, and a step ran more than once only in a run
  whose lease lapsed.

The lines of the log (``kind`` names the line; every line also has ``pid``
and ``t``, the wall-clock time):

``opened``
    The worker opened the store and waits for its ``--go-file``.
``ready``
    The engine works.
``ran`` (``run``, ``step``, ``attempt``, ``prev``, ``token``)
    A step is about to return. In the ``steps`` scenario its output is
    ``{"step": name, "token": token, "prev": prev}``, with ``token`` fresh
    and random, so the store says which execution a saved result came from.
    In the ``map`` scenario each item ``m[i]`` returns ``{"step", "token",
    "prev"}`` alike, and computing the list of items logs one of step
    ``reflow:map:m`` (its token is in every item of the list).
``started`` (``run``, ``step``, ``attempt``, ``prev``)
    The step named by ``--crash-in`` began; it blocks until the process is killed.
``blocked`` (``run``, ``step``, ``attempt``)
    With ``--block-after K``: once the process has run K steps, every later
    step but a workflow's first writes this and blocks until the process is
    killed, so the worker ends up holding ``--concurrency`` runs, each mid-step
    with the steps before it saved.
``saved`` / ``refused`` (``run``, ``step``, ``token``, ``epoch``)
    A ``save_step_result``, or a ``finish_run`` carrying a step, returned
    True (the store acknowledged it) or False (the fence refused it).
``acked`` (``n``, ``run``)
    The ``enqueue`` command created run number ``n`` (idempotency key
    ``load-<n>``, input ``{"n": n}``) and the store acknowledged it.

Engine and driver logs go to ``LOGDIR/worker-<pid>.log``.
"""

from __future__ import annotations

# The promise texts and ``main`` are not in ``__all__`` (as before the split),
# but tests import them from here.
from ._check import RUN_ONCE as RUN_ONCE
from ._check import RUNS_COMPLETE as RUNS_COMPLETE
from ._check import SAVED_ONCE as SAVED_ONCE
from ._check import STEP_FROM_EXECUTION as STEP_FROM_EXECUTION
from ._check import (
    Outcome,
    check_outcome,
    create_runs,
    enqueue_runs,
    read_outcome,
    read_outcome_at,
    with_storage,
)
from ._engine import collect_events, engine_on
from ._fleet import AppFleet, now_and_then
from ._log import Execution, ExecutionLog, Save, read_log
from ._processes import Workers, child_env, free_port
from ._runner import FakeClock, run_async_tests, wait_until
from ._worker import main as main
from ._workflows import MAP, MAP_CONCURRENCY, MAP_ITEMS, NAP_SECONDS, SCENARIOS, STEPS, build

__all__ = [
    "MAP",
    "MAP_CONCURRENCY",
    "MAP_ITEMS",
    "NAP_SECONDS",
    "SCENARIOS",
    "STEPS",
    "AppFleet",
    "Execution",
    "ExecutionLog",
    "FakeClock",
    "Outcome",
    "Save",
    "Workers",
    "build",
    "check_outcome",
    "child_env",
    "collect_events",
    "create_runs",
    "engine_on",
    "enqueue_runs",
    "free_port",
    "now_and_then",
    "read_log",
    "read_outcome",
    "read_outcome_at",
    "run_async_tests",
    "wait_until",
    "with_storage",
]
