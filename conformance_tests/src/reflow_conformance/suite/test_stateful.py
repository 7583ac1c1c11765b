"""The stateful test: random operation sequences against the adapter and the model.

:class:`StorageMachine` is a Hypothesis ``RuleBasedStateMachine``. Each rule
performs one storage operation on the adapter and the same operation on
:class:`reflow_conformance.model.Model`, then compares the outcomes; the
invariants compare every run, step and schedule the machine made after every
step. Each rule logs a one-line ``note()``, so a shrunk failure reads as the
story of the operations that led to it, ending with the promise that broke.

The rules come in families, one module each: runs and leases
(``_machine_runs``), events (``_machine_events``) and schedules
(``_machine_schedules``), on the shared state and checks of ``_machine``.
The machine adds the rules that cross them (a given-up lease trying any
fenced write, operations on a missing run, paging through the runs) and the
invariants.
"""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest
from hypothesis import Phase, note, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from hypothesis.stateful import invariant, precondition, rule, run_state_machine_as_test

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, PromiseBroken, promise
from reflow_conformance.plugin import SHRINK_PROFILE, machine_shrinks, suite_settings
from reflow_core.storage import Lease, RunStatus

from ._machine import EVENTS, SPENT, STATUSES, STEP_NAMES, encoded
from ._machine_events import EventRules
from ._machine_runs import RunRules
from ._machine_schedules import ScheduleRules

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestStorageStateMachine"]


class StorageMachine(RunRules, EventRules, ScheduleRules):
    """Drives one adapter and one :class:`Model` through the same operations."""

    @rule(
        lease=SPENT,
        operation=st.sampled_from(
            ("heartbeat", "save", "finish", "hand back", "fail", "sleep", "wait", "take")
        ),
    )
    def reuse_spent_lease(self, lease: Lease, operation: str) -> None:
        """A lease given up earlier tries a fenced write: it must be refused."""
        note(f"{self._lease(lease)}, given up earlier, tries to {operation}")
        promise(
            self.model.live(lease.run_id, lease.epoch) is None,
            P.ONE_LIVE_LEASE,
            f"the model holds given-up lease {self._lease(lease)} live",
        )
        if operation == "heartbeat":
            self.heartbeat(lease)
        elif operation == "save":
            self.save_step(lease, STEP_NAMES[0], "completed", "late", 1)
        elif operation == "finish":
            self.finish(lease, "completed", "late", STEP_NAMES[0])
        elif operation == "hand back":
            self.update_status_with_lease(lease, "pending", None)
        elif operation == "fail":
            self.update_status_with_lease(lease, "failed", "late")
        elif operation == "sleep":
            self.sleep(lease, STEP_NAMES[0], True)
        elif operation == "wait":
            self.wait(lease, STEP_NAMES[0], EVENTS[0], None)
        else:
            self.take(lease, STEP_NAMES[0], EVENTS[0])

    @precondition(lambda self: not self.touched_missing)
    @rule()
    def touch_missing_run(self) -> None:
        """Every operation on a run that does not exist refuses and creates nothing."""
        self.touched_missing = True
        ghost = self.reflow.unique("run")
        note("read, cancel, requeue, deliver to and take for a missing run")
        s = self.storage
        promise(self._run(s.get_run(ghost)) is None, P.MISSING_IS_NONE, "get_run")
        promise(self._run(s.get_step_results(ghost)) == {}, P.MISSING_IS_NONE, "get_step_results")
        promise(not self._run(s.update_run_status(ghost, "cancelled")), P.CANCEL, "cancel")
        promise(not self._run(s.requeue_run(ghost)), P.REQUEUE_ONLY_ENDED, "requeue_run")
        delivered = self._run(s.deliver_event(ghost, EVENTS[0], encoded(1), event_id="x"))
        promise(not delivered, P.DELIVER_FINISHED, "deliver_event to a missing run returned True")
        taken = self._run(s.take_event(Lease(ghost, 1), STEP_NAMES[0], EVENTS[0]))
        promise(taken is None, P.STALE_LEASE_REFUSED, f"take_event for a missing run: {taken}")
        promise(self._run(s.get_run(ghost)) is None, P.MISSING_IS_NONE, "a refused call made it")

    @rule(
        wf=st.sampled_from((0, 1)),
        page_size=st.integers(1, 3),
        statuses=st.none() | st.sets(st.sampled_from(STATUSES), min_size=1, max_size=3),
    )
    def list_pages(self, wf: int, page_size: int, statuses: set[RunStatus] | None) -> None:
        workflow = self.workflows[wf]
        wanted = self.model.matching(workflow, statuses)
        shown = "any status" if statuses is None else "/".join(sorted(statuses))
        seen = self._list(workflow, page_size, statuses, max_pages=len(wanted) + 2)
        note(f"list {'AB'[wf]} ({shown}) {page_size} per page -> {self._labels(seen)}")
        promise(
            sorted(seen) == sorted(wanted),
            P.PAGINATION,
            f"visited {self._labels(seen)}, expected {self._labels(sorted(wanted))}",
        )

    def _list(
        self,
        workflow: str,
        page_size: int,
        statuses: set[RunStatus] | None,
        max_pages: int,
    ) -> list[str]:
        """Follow ``next_cursor`` to the end; the ids in the order visited."""
        seen: list[str] = []
        order: list[tuple[datetime, str]] = []
        cursor: str | None = None
        for _ in range(max_pages):
            page = self._run(
                self.storage.list_runs(
                    status=statuses, workflow=workflow, limit=page_size, cursor=cursor
                )
            )
            promise(
                len(page.runs) <= page_size,
                P.PAGINATION,
                f"page of {len(page.runs)} runs with limit {page_size}",
            )
            for record in page.runs:
                wrong = record.workflow != workflow or (
                    statuses is not None and record.status not in statuses
                )
                promise(not wrong, P.PAGINATION, f"listed {record.workflow}/{record.status}")
                seen.append(record.id)
                order.append((record.created_at, record.id))
            cursor = page.next_cursor
            if cursor is None:
                break
        else:
            promise(False, P.PAGINATION, f"still a next_cursor after {max_pages} pages")
        promise(
            all(a > b for a, b in itertools.pairwise(order)),
            P.PAGINATION,
            f"not newest first, each once: {self._labels(seen)}",
        )
        return seen

    # -- invariants --------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        """After every step: every run reads back as the model has it, none is
        lost or duplicated, and no run is held by two live leases. (One
        invariant, so a failing example prints one line per step for it.)"""
        for run in self.model:
            self._check_run(run.id, P.STATE_MATCHES_MODEL)
        self._no_run_lost_or_duplicated()
        self._at_most_one_live_lease()

    def _no_run_lost_or_duplicated(self) -> None:
        for workflow in self.workflows:
            wanted = self.model.matching(workflow, None)
            listed: list[str] = []
            cursor: str | None = None
            for _ in range(len(wanted) // 100 + 2):
                page = self._run(self.storage.list_runs(workflow=workflow, cursor=cursor))
                listed.extend(r.id for r in page.runs)
                cursor = page.next_cursor
                if cursor is None:
                    break
            promise(
                len(listed) == len(set(listed)) and set(listed) == wanted,
                P.NO_LOST_RUNS,
                f"{self._wf(workflow)} lists {self._labels(listed)}, "
                f"expected {self._labels(sorted(wanted))}",
            )

    def _at_most_one_live_lease(self) -> None:
        """No two claims of a run share an epoch, and at most one of the leases
        handed out is live; the adapter agrees on which (its ``lease_epoch``,
        compared with every run, and claims never return a run held live)."""
        for run_id, epochs in self.epochs.items():
            live = [e for e in epochs if self.model.live(run_id, e) is not None]
            promise(
                len(set(epochs)) == len(epochs) and len(live) <= 1,
                P.ONE_LIVE_LEASE,
                f"{self.model.label(run_id)} was handed epochs {epochs}, live: {live}",
            )


def _machine_settings() -> settings:
    """The suite's settings without the ``explain`` phase: it traces every line
    of every replay while shrinking, which makes shrinking a failing machine
    several times slower, and for this machine it can only point at
    :func:`~reflow_conformance.promise`, which the failure names anyway. Under
    the default profile, without the ``shrink`` phase too (see
    :func:`~reflow_conformance.plugin.machine_shrinks`)."""
    chosen = suite_settings()
    dropped = {Phase.explain} if machine_shrinks() else {Phase.explain, Phase.shrink}
    return settings(chosen, phases=[p for p in chosen.phases if p not in dropped])


_UNSHRUNK = (
    "The operations above are the failing sequence as found, not shrunk: the default "
    f"reflow-ci profile does not shrink the stateful machine. Run it again with "
    f"--hypothesis-profile={SHRINK_PROFILE} for the shortest sequence that fails (Hypothesis "
    "replays this one from its example database, then shrinks it; the lease lapses replay "
    "in real time, so that can take minutes)."
)


def _promises_broken(error: BaseException) -> list[PromiseBroken]:
    """The broken promises an error from Hypothesis carries: itself, the
    errors of a group, and what it was raised from or during."""
    found: list[PromiseBroken] = []
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PromiseBroken):
            found.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return found


def _stopped_by_pytest(error: BaseException) -> BaseException | None:
    """The failure pytest raised into the test (``pytest-timeout``'s, a
    ``pytest.fail``), if that is what Hypothesis saw before it found the run
    did not repeat and no promise was broken: the test ran out of time, and
    the adapter is not to blame."""
    if _promises_broken(error):
        return None
    todo: list[BaseException] = [error]
    seen: set[int] = set()
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, pytest.fail.Exception):
            return current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def _unrepeatable(error: Flaky) -> PromiseBroken:
    """What to report when Hypothesis finds the adapter answered the same
    operations differently when it repeated them (it blames the test's data)."""
    broken = _promises_broken(error)
    if broken:
        first = str(broken[0]).splitlines()
        name = first[0].removeprefix("broken promise: ")
        seen = "\n  ".join(line.strip() for line in first[1:] if line.strip())
    else:
        name, seen = P.STATE_MATCHES_MODEL, ""
    return PromiseBroken(
        f"broken promise: {name}\n"
        + (f"  {seen}\n" if seen else "")
        + "  The adapter answered the same operations differently when Hypothesis repeated "
        "them on a new store: a run of them broke the promise above, a repeat broke it at "
        "another step or not at all (Hypothesis calls this a flaky test or inconsistent data "
        "generation, blaming the test; the operations only depend on the adapter's answers). "
        "Answers that depend on timing rather than on the operations and the lengths of "
        "leases, sleeps and waits are the usual cause: a lease that lapses before its end, a "
        "clock that jumps, a read that sees a write late.\n"
        f"  Hypothesis reported: {type(error).__name__}: {str(error).splitlines()[0]}"
    )


@pytest.mark.reflow_conformance
class TestStorageStateMachine:
    """Random operation sequences, each checked against the contract's model."""

    def test_stateful_machine(self, reflow: Harness) -> None:
        # Hypothesis documents any zero-argument factory of a machine here,
        # though its annotation names only the class.
        try:
            run_state_machine_as_test(
                lambda: StorageMachine(reflow),  # type: ignore[arg-type]
                settings=_machine_settings(),
            )
        except Flaky as error:
            stopped = _stopped_by_pytest(error)
            if stopped is not None:
                raise stopped from error  # a timeout, not the adapter
            raise _unrepeatable(error) from error
        except Exception as error:
            if not machine_shrinks():
                error.add_note(_UNSHRUNK)
            raise
