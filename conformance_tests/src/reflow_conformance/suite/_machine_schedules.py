"""The stateful machine's rules for schedules: registering, deleting, and
firing a slot (the current one, or one that is not next)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import MultipleResults, multiple, precondition, rule

from reflow_conformance import promises as P
from reflow_conformance.harness import promise
from reflow_core.storage import NewRun, ScheduleSpec

from ._machine import (
    MILLISECOND,
    RECURRENCES,
    RUNS,
    SLOT_STEP,
    SLOTS,
    MachineBase,
    encoded,
    schedule_matches,
    values,
)

__all__ = ["ScheduleRules"]


class ScheduleRules(MachineBase):
    """Rules that register, delete and fire schedules; none runs when the
    adapter declares it does not implement schedules (nothing is registered,
    so deleting and firing never become possible)."""

    @precondition(lambda self: self.reflow.implements("schedules"))
    @rule(
        key=st.sampled_from((0, 1)),
        wf=st.sampled_from((0, 1)),
        value=values,
        recurrence=st.sampled_from(RECURRENCES),
        slot=st.sampled_from(SLOTS),
    )
    def upsert_schedule(
        self, key: int, wf: int, value: object, recurrence: str, slot: datetime
    ) -> None:
        name = self.schedule_keys[key]
        spec = ScheduleSpec(name, self.workflows[wf], encoded(value), recurrence, slot)
        old = self.model.schedules.get(name)
        want = self.model.upsert_schedule(name, spec.workflow, spec.input, recurrence, slot)
        got = self._run(self.storage.upsert_schedule(spec))
        kept = old is not None and old.recurrence == recurrence
        note(
            f"upsert schedule S{key + 1} of {'AB'[wf]} {recurrence!r} next {slot:%Y-%m-%d} "
            f"-> next {got.next_run_at:%Y-%m-%d}" + (" (cadence kept)" if kept else "")
        )
        promise(
            schedule_matches(got, want.workflow, want.input, want.recurrence, want.next_run_at),
            P.SCHEDULE_KEEP_CADENCE if kept else P.SCHEDULE_STORED,
            f"returned {got}, expected {want}",
        )
        self._check_schedules(P.SCHEDULE_KEEP_CADENCE if kept else P.SCHEDULE_STORED)

    @precondition(lambda self: bool(self.model.schedules))
    @rule(key=st.sampled_from((0, 1)))
    def delete_schedule(self, key: int) -> None:
        name = self.schedule_keys[key]
        expected = self.model.delete_schedule(name)
        got = self._run(self.storage.delete_schedule(name))
        note(f"delete schedule S{key + 1} -> {got}")
        promise(got == expected, P.SCHEDULE_DELETE, f"delete_schedule returned {got}")
        self._check_schedules(P.SCHEDULE_DELETE)

    @precondition(lambda self: bool(self.model.schedules))
    @rule(target=RUNS, key=st.sampled_from((0, 1)), right=st.booleans())
    def claim_slot(self, key: int, right: bool) -> str | MultipleResults[str]:
        """Fire a schedule's slot; only its current next slot fires, once."""
        name = self.schedule_keys[key]
        current = self.model.schedules.get(name)
        if current is None:
            slot = SLOTS[0]
        else:
            slot = current.next_run_at if right else current.next_run_at + MILLISECOND
        after = slot + SLOT_STEP
        fired = self.model.fire_slot(name, slot, after)
        new = None
        if fired is not None:
            slot_input = encoded({"schedule": name, "slot": slot})
            slot_key = f"{name}@{slot.isoformat()}"
            new = NewRun(fired.workflow, slot_input, slot_key, self._new_run_id())
        run_for = new or NewRun(self.workflows[0], encoded(None), f"{name}@{slot.isoformat()}")
        got = self._run(self.storage.claim_schedule_slot(name, slot, after, run_for))
        which = "its next slot" if fired is not None else "a slot that is not next"
        note(
            f"fire S{key + 1} at {which} {slot:%Y-%m-%d %H:%M:%S.%f} -> "
            + (
                "nothing"
                if got is None
                else self.model.label(got.id)
                if got.id in self.model.runs
                else "new run"
            )
        )
        if new is None:
            promise(got is None, P.SCHEDULE_SLOT_ONCE, f"fired a slot that is not next: {got}")
            self._check_schedules(P.SCHEDULE_SLOT_ONCE)
            return multiple()
        promise(got is not None, P.SCHEDULE_SLOT_FIRES, "the schedule's next slot did not fire")
        assert got is not None
        self._check_schedules(P.SCHEDULE_SLOT_FIRES)
        expected = self.model.create(new.workflow, new.input, new.idempotency_key)
        if expected.kind == "existing":
            promise(
                got.id == expected.existing,
                P.IDEMPOTENT_CREATE,
                f"slot fired again made {got.id}, not {self.model.label(expected.existing or '')}",
            )
        else:
            promise(
                got.id == new.run_id and got.id not in self.model.runs,
                P.CREATE_SHAPE,
                f"asked for id {new.run_id!r}, got {got.id!r}",
            )
            label = self.model.add_run(got.id, new.workflow, new.input, new.idempotency_key).label
            note(f"  the slot's run is {label}")
        self._check_run(got.id, P.SCHEDULE_SLOT_FIRES)
        return got.id

    def _check_schedules(self, name: str) -> None:
        mine = set(self.schedule_keys)
        listed = [s for s in self._run(self.storage.list_schedules()) if s.key in mine]
        found: list[str] = []
        if [s.key for s in listed] != sorted(self.model.schedules):
            found.append(
                f"listed {[s.key for s in listed]}, expected {sorted(self.model.schedules)}"
            )
        for record in listed:
            want = self.model.schedules.get(record.key)
            if want is not None and not schedule_matches(
                record, want.workflow, want.input, want.recurrence, want.next_run_at
            ):
                found.append(f"{record} is not {want}")
        promise(not found, name, "; ".join(found))
        due = [s for s in self._run(self.storage.due_schedules(1000)) if s.key in mine]
        now = datetime.now(UTC)
        want_due = {k for k, s in self.model.schedules.items() if s.next_run_at <= now}
        promise(
            {s.key for s in due} == want_due
            and [s.next_run_at for s in due] == sorted(s.next_run_at for s in due),
            P.SCHEDULE_DUE,
            f"due {[(s.key, s.next_run_at) for s in due]}, expected {sorted(want_due)}",
        )
