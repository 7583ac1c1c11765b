"""Sleeps, waits, parallel groups and early completion survive a worker
process killed with SIGKILL: another process on the same SQLite file picks
the run up and neither repeats what was saved nor loses what was not.

The workflows and the worker are :mod:`reflow_conformance.testsupport`'s
(its ``sleep``, ``wait``, ``parallel`` and ``complete`` scenarios); every
step logs a line before it returns, so the logs say which steps ran, where
and how often.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reflow_conformance.testsupport import NAP_SECONDS, Workers, build
from reflow_core import Engine, Run, open_storage

pytestmark = pytest.mark.slow


class Scenario:
    """One database, the worker processes started on it, and their logs."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.name = name
        self.db = tmp_path / "wf.db"
        logdir = tmp_path / "logs"
        logdir.mkdir()
        self.workers = Workers(f"sqlite:///{self.db}", logdir)

    def worker(self, *args: str) -> subprocess.Popen[bytes]:
        """A worker on the scenario's workflow (``args`` come last and win)."""
        common = ("--scenario", self.name, "--lease", "1s", "--until-idle", "0.3")
        return self.workers.start(*common, *args)

    def lines(self) -> list[dict[str, Any]]:
        """Every step execution logged: ``kind`` is ``ran`` or ``started``."""
        return [x for x in self.workers.lines() if x["kind"] in ("ran", "started")]

    def ran(self) -> Counter[tuple[str, str]]:
        return Counter((line["step"], line["kind"]) for line in self.lines())

    def entry(self, step: str, kind: str = "ran") -> dict[str, Any]:
        (found,) = [x for x in self.lines() if x["step"] == step and x["kind"] == kind]
        return found

    def run(self) -> Run:
        async def read() -> Run:
            engine = Engine(storage=open_storage(f"sqlite:///{self.db}"), worker=False)
            async with engine:
                (record,) = (await engine.list_runs(limit=10)).runs
                return await engine.get_run_status(record.id)

        return asyncio.run(read())

    def send_event(self, run_id: str, event: str, payload: Any) -> bool:
        async def send() -> bool:
            engine = Engine(
                storage=open_storage(f"sqlite:///{self.db}"),
                workflows=[build(self.name)],
                worker=False,
            )
            async with engine:
                return await engine.send_event(run_id, event, payload)

        return asyncio.run(send())

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 20) -> None:
        self.workers.wait_for(what, condition, timeout)

    def ready(self, proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
        return self.workers.logged("ready", proc)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        self.workers.kill(proc)

    def run_has(self, status: str) -> Callable[[], bool]:
        def check() -> bool:
            return self.db.exists() and self._status() == status

        return check

    def _status(self) -> str | None:
        async def read() -> str | None:
            storage = open_storage(f"sqlite:///{self.db}")
            await storage.initialize()
            try:
                page = await storage.list_runs(limit=1)
                return page.runs[0].status if page.runs else None
            finally:
                await storage.close()

        return asyncio.run(read())

    def cleanup(self) -> None:
        self.workers.cleanup()


@pytest.fixture
def scenario(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    made: list[Scenario] = []

    def make(name: str) -> Scenario:
        made.append(Scenario(tmp_path, name))
        return made[-1]

    yield make
    for item in made:
        item.cleanup()


def test_sleep_resumes_in_another_process_when_due_without_starting_over(
    scenario: Callable[[str], Scenario],
) -> None:
    s = scenario("sleep")
    victim = s.worker("--enqueue")
    s.wait_for("the run to fall asleep", s.run_has("sleeping"))
    asleep = s.run()
    assert asleep.wake_at is not None
    wake_at = asleep.wake_at.timestamp()
    assert asleep.steps["nap"].status == "sleeping"
    rescuer = s.worker()
    s.wait_for("the second worker to start", s.ready(rescuer))
    # Kill the first worker a second into the nap: a nap started over by the
    # second one would end a second late.
    time.sleep(max(0.0, wake_at - NAP_SECONDS + 1.0 - time.time()))
    s.kill(victim)
    killed_at = time.time()
    assert killed_at < wake_at - 0.5, "the machine is too slow for this test's timing"
    assert rescuer.wait(30) == 0

    done = s.run()
    assert done.status == "completed"
    assert done.output == "slept"
    assert s.ran() == {("before", "ran"): 1, ("after", "ran"): 1}
    assert s.entry("before")["pid"] == victim.pid
    after = s.entry("after")
    assert after["pid"] == rescuer.pid
    assert after["prev"] == {"step": "before"}  # prev passed through the sleep
    # On time (the poll is 50 ms), not a nap after the kill.
    assert wake_at - 0.05 <= after["t"] < wake_at + 0.5, after["t"] - wake_at
    assert after["t"] < killed_at + NAP_SECONDS - 0.5
    assert done.reclaims == 0  # the sleeping run held no lease to lapse


def test_killed_while_waiting_the_event_is_consumed_by_another_process(
    scenario: Callable[[str], Scenario],
) -> None:
    s = scenario("wait")
    victim = s.worker("--enqueue")
    s.wait_for("the run to wait", s.run_has("waiting"))
    s.kill(victim)
    run_id = s.run().id
    assert s.send_event(run_id, "approval", {"by": "ann"})  # nobody is running now

    rescuer = s.worker()
    assert rescuer.wait(30) == 0

    done = s.run()
    assert done.status == "completed"
    assert done.output == "approved"
    assert s.ran() == {("before", "ran"): 1, ("after", "ran"): 1}
    after = s.entry("after")
    assert after["pid"] == rescuer.pid
    assert after["prev"] == {"by": "ann"}
    assert done.steps["approval"].output == {"by": "ann"}


def test_killed_after_taking_the_event_the_event_is_not_taken_twice(
    scenario: Callable[[str], Scenario],
) -> None:
    s = scenario("wait")
    victim = s.worker("--enqueue", "--crash-in", "after")
    s.wait_for("the run to wait", s.run_has("waiting"))
    run_id = s.run().id
    assert s.send_event(run_id, "approval", {"n": 1})
    s.wait_for("the next step to start", lambda: ("after", "started") in s.ran())
    # A second event arrives while the first is being handled; it must not
    # replace the first when the run is picked up again.
    assert s.send_event(run_id, "approval", {"n": 2})
    s.kill(victim)

    rescuer = s.worker()
    assert rescuer.wait(30) == 0

    done = s.run()
    assert done.status == "completed"
    assert done.reclaims == 1
    assert done.steps["approval"].output == {"n": 1}
    assert s.entry("after", "started")["prev"] == {"n": 1}
    after = s.entry("after")
    assert after["pid"] == rescuer.pid
    assert after["prev"] == {"n": 1}  # the saved event, consumed once
    assert s.ran() == {("before", "ran"): 1, ("after", "started"): 1, ("after", "ran"): 1}


def test_parallel_branches_saved_before_the_kill_do_not_run_again(
    scenario: Callable[[str], Scenario],
) -> None:
    s = scenario("parallel")
    victim = s.worker("--enqueue", "--crash-in", "slow")

    def fast_saved_and_slow_running() -> bool:
        if ("slow", "started") not in s.ran() or ("fast", "ran") not in s.ran():
            return False
        return "fast" in s.run().steps

    s.wait_for("fast to be saved while slow runs", fast_saved_and_slow_running)
    s.kill(victim)

    rescuer = s.worker()
    assert rescuer.wait(30) == 0

    done = s.run()
    assert done.status == "completed"
    assert done.output == "joined"
    assert done.reclaims == 1
    assert s.ran() == {
        ("before", "ran"): 1,
        ("fast", "ran"): 1,
        ("slow", "started"): 1,
        ("slow", "ran"): 1,
        ("after", "ran"): 1,
    }
    assert s.entry("fast")["pid"] == victim.pid
    assert s.entry("slow")["pid"] == rescuer.pid
    assert s.entry("after")["prev"] == {"fast": "F", "slow": "S"}


def test_early_completion_killed_before_it_landed_reruns_the_step(
    scenario: Callable[[str], Scenario],
) -> None:
    s = scenario("complete")
    victim = s.worker("--enqueue", "--crash-in", "check")
    s.wait_for("the step to start", lambda: ("check", "started") in s.ran())
    s.kill(victim)
    killed = s.run()
    assert killed.status == "running"
    assert killed.steps == {}  # neither the step's output nor the run's was written

    rescuer = s.worker()
    assert rescuer.wait(30) == 0
    done = s.run()
    assert done.status == "completed"
    assert done.output == {"early": {"order": 1}}
    assert set(done.steps) == {"check"}
    assert done.reclaims == 1

    # Another worker finds nothing to do: a completed run never runs later steps.
    late = s.worker("--until-idle", "0.2")
    assert late.wait(30) == 0
    assert s.ran() == {("check", "started"): 1, ("check", "ran"): 1}
    assert s.entry("check")["pid"] == rescuer.pid
    assert s.run().status == "completed"
