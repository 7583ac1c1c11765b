"""Engines in several processes on one store, one of them killed with SIGKILL
while it holds runs mid-step (capability ``multiprocess``).

Each worker process (``python -m reflow_conformance.testsupport work``) runs a
real :class:`~reflow_core.Engine` on the adapter rebuilt from the factory's
``target``, working a three-step workflow. Every execution of a step logs a
fresh random token before it returns it as part of its output, and every save
that returns logs whether the store acknowledged it (see
:mod:`reflow_conformance.testsupport`). Together with what the store holds
afterwards they show that no run is lost, that every saved step is the output
of one real execution and was saved once, and that steps ran again only in
the runs whose lease lapsed: the ones the killed worker held.

The engines' lease is 2 s, or five times ``--reflow-short-lease`` if that is
longer: a live worker must keep its leases through heartbeats at a third of
that, however busy the machine, while the killed worker's runs are taken
over once theirs lapse.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.testsupport import (
    SAVED_ONCE,
    STEPS,
    Workers,
    check_outcome,
    create_runs,
    read_outcome,
)

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestProcessCrash"]

_PROCESSES = 3
_CONCURRENCY = 4
_RUNS = 300
_BLOCK_AFTER = 3 * _CONCURRENCY
"""Steps the doomed worker runs before every later step but a run's first blocks."""
_START_TIMEOUT = 60.0
_FINISH_TIMEOUT = 60.0


@pytest.mark.reflow_requires("multiprocess")
class TestProcessCrash:
    def test_a_worker_killed_mid_step_loses_no_run_and_saves_no_step_twice(
        self, reflow: Harness, tmp_path: Path
    ) -> None:
        target = reflow.process_target()
        wf = reflow.unique("crash")
        lease = max(2.0, 5 * reflow.short_lease.total_seconds())
        logdir = tmp_path / "logs"
        logdir.mkdir()
        go_victim = tmp_path / "go-victim"
        go = tmp_path / "go"
        inputs = reflow.run(lambda s: create_runs(s, wf, _RUNS))

        workers = Workers(target, logdir, workflow=wf)
        common = [f"--lease={lease:g}s", f"--concurrency={_CONCURRENCY}", "--until-idle=0.5"]
        try:
            # The victim runs a few steps normally; after that every step but
            # a run's first blocks, so it ends up holding _CONCURRENCY runs,
            # each inside a step with the steps before it saved. It starts
            # first: on a busy machine the other workers could otherwise take
            # every run before it claims one (a store's write lock does not
            # queue its waiters fairly).
            victim = workers.start(
                *common, f"--go-file={go_victim}", "--block-after", str(_BLOCK_AFTER)
            )
            for _ in range(_PROCESSES - 1):
                workers.start(*common, f"--go-file={go}")
            workers.wait_for(
                "every worker to open the store",
                lambda: all(workers.logged("opened", proc)() for proc in workers.procs),
                timeout=_START_TIMEOUT,
            )
            go_victim.touch()
            started = time.monotonic()

            def held() -> set[str]:
                lines = workers.lines(victim.pid)
                return {line["run"] for line in lines if line["kind"] == "blocked"}

            workers.wait_for(
                "the doomed worker to hold its runs mid-step",
                lambda: len(held()) == _CONCURRENCY,
                timeout=_START_TIMEOUT,
            )
            go.touch()  # the live workers work beside it until it dies, and after
            workers.wait_for(
                "the live workers to start",
                lambda: all(workers.logged("ready", proc)() for proc in workers.procs),
                timeout=_START_TIMEOUT,
            )
            time.sleep(0.1)  # no other step starts there: every slot is blocked
            victim_lines = workers.lines(victim.pid)
            workers.kill(victim)
            killed_at = time.monotonic()
            held_runs = held()
            workers.finish(timeout=_FINISH_TIMEOUT)
            finished_at = time.monotonic()
        finally:
            workers.cleanup()

        outcome = reflow.run(lambda s: read_outcome(s, wf, inputs))
        executions = workers.executions()
        saves = workers.saves()
        repeated = check_outcome(outcome, executions, saves, may_repeat=held_runs)

        assert workers.lines(victim.pid) == victim_lines, "the killed worker wrote after its death"
        # The runs it held were reclaimed, once each, and each one's blocked
        # step ran to the end once, elsewhere, after the steps it had saved.
        reclaimed = {run_id for run_id, record in outcome.runs.items() if record.reclaims}
        promise(
            reclaimed <= held_runs,
            P.HEARTBEAT_EXTENDS,
            f"live workers' runs were reclaimed: {sorted(reclaimed - held_runs)}",
        )
        promise(
            reclaimed == held_runs,
            P.RECLAIM_AFTER_LAPSE,
            f"runs the killed worker held were not reclaimed: {sorted(held_runs - reclaimed)}",
        )
        promise(
            repeated == held_runs,
            P.RECLAIM_AFTER_LAPSE,
            f"steps ran again in {sorted(repeated)}, the killed worker held {sorted(held_runs)}",
        )
        for run_id in sorted(held_runs):
            record = outcome.runs[run_id]
            promise(
                (record.attempts, record.reclaims) == (2, 1),
                P.CLAIM_COUNTS,
                f"{run_id}: {record.attempts} attempts and {record.reclaims} reclaims "
                "after one claim and one reclaim",
            )
            mine = [ex for ex in executions if ex.run == run_id]
            (blocked,) = [ex for ex in mine if ex.kind == "blocked"]
            assert blocked.pid == victim.pid
            assert blocked.step != STEPS[0]
            saved_before = STEPS[: STEPS.index(blocked.step)]
            for ex in mine:
                if ex.step in saved_before:
                    promise(
                        (ex.kind, ex.pid) == ("ran", victim.pid),
                        P.CLAIM_CARRIES_STEPS,
                        f"{run_id}: step {ex.step!r}, saved before the kill, ran again: {ex}",
                    )
                elif ex.kind == "ran":
                    assert ex.pid != victim.pid, ex
            ran = Counter(ex.step for ex in mine if ex.kind == "ran")
            promise(
                ran == dict.fromkeys(STEPS, 1),
                P.CLAIM_CARRIES_STEPS,
                f"{run_id}: steps ran {dict(ran)} times",
            )
        # Every step was saved once, by the execution whose output is stored,
        # and no live worker's save was refused.
        refused = [save for save in saves if not save.ok]
        promise(not refused, P.LIVE_LEASE_ACCEPTED, f"saves refused: {refused[:10]}")
        per_step = Counter((save.run, save.step) for save in saves)
        promise(
            set(per_step.values()) == {1} and len(per_step) == _RUNS * len(STEPS),
            SAVED_ONCE,
            f"{len(per_step)} steps saved, {sum(per_step.values())} saves acknowledged",
        )
        stored = {(run_id, name) for run_id, steps in outcome.steps.items() for name in steps}
        promise(
            set(per_step) == stored,
            P.STEP_SAVED,
            f"saves acknowledged but not stored: {sorted(set(per_step) - stored)[:10]}; "
            f"stored but never acknowledged: {sorted(stored - set(per_step))[:10]}",
        )
        # All the workers did work.
        assert len({ex.pid for ex in executions if ex.kind == "ran"}) == _PROCESSES
        print(
            f"killed worker held {len(held_runs)} runs; killed {killed_at - started:.1f}s "
            f"after the start; the rest done {finished_at - killed_at:.1f}s later"
        )
