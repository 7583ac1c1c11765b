"""The stateful machine's rules for events: deliveries (with event ids and
caps on the buffer, to any run, to a held run, to a waiting run the event it
waits for) and takes."""

from __future__ import annotations

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from reflow_conformance import promises as P
from reflow_conformance.harness import promise
from reflow_core.errors import EventBufferFullError
from reflow_core.storage import Lease

from ._machine import (
    EVENT_IDS,
    LEASES,
    RUNS,
    STEP_NAMES,
    MachineBase,
    decoded,
    encoded,
    event_names,
    same_value,
    show,
    values,
)

__all__ = ["EventRules"]


class EventRules(MachineBase):
    """Rules that deliver and take events."""

    @rule(
        run_id=RUNS,
        event=event_names,
        value=values,
        event_id=st.none() | st.sampled_from(EVENT_IDS),
        cap=st.none() | st.integers(1, 3),
    )
    def deliver(
        self, run_id: str, event: str, value: object, event_id: str | None, cap: int | None = None
    ) -> None:
        run = self.model.runs[run_id]
        before = run.status + (f" for {run.waiting_for}" if run.status == "waiting" else "")
        before += f", holding {run.held}"
        repeat = event_id is not None and event_id in run.event_ids
        expected = self.model.deliver(run_id, event, encoded(value), event_id, cap)
        got: bool | str
        try:
            got = self._run(
                self.storage.deliver_event(
                    run_id, event, encoded(value), event_id=event_id, max_buffered=cap
                )
            )
        except EventBufferFullError:
            got = "full"
        shown_id = "" if event_id is None else f" id={event_id}" + (" (repeat)" if repeat else "")
        shown = show(value) + ("" if cap is None else f" (cap {cap})")
        note(f"deliver {event}{shown_id} {shown} to {run.label} ({before}) -> {got}")
        if run.terminal:
            name = P.DELIVER_FINISHED
        elif repeat:
            name = P.EVENT_BUFFER_FULL_DEDUPE if got == "full" else P.EVENT_DEDUPE
        elif "full" in (got, expected):
            name = P.EVENT_BUFFER_CAP
        else:
            name = P.EVENT_BUFFERED
        promise(got == expected, name, f"deliver_event returned {got} for a {before} run")
        self._check_run(run_id, P.EVENT_WAKES)

    @rule(
        lease=LEASES,
        event=event_names,
        value=values,
        event_id=st.none() | st.sampled_from(EVENT_IDS),
    )
    def deliver_to_held_run(
        self, lease: Lease, event: str, value: object, event_id: str | None
    ) -> None:
        """Deliver to the run of a lease handed out, as a worker's wait would expect."""
        self.deliver(lease.run_id, event, value, event_id)

    def _open_runs(self) -> list[str]:
        return sorted(r.id for r in self.model if not r.terminal)

    @precondition(lambda self: bool(self._open_runs()))
    @rule(
        run_id=st.runner().flatmap(lambda machine: st.sampled_from(machine._open_runs())),
        event=event_names,
        value=values,
    )
    def deliver_at_the_cap(self, run_id: str, event: str, value: object) -> None:
        """Deliver under a cap of what the run holds (at least one): refused
        if it holds any event, accepted if it holds none."""
        self.deliver(run_id, event, value, None, max(1, self.model.runs[run_id].held))

    def _waiting(self) -> list[str]:
        return sorted(r.id for r in self.model if r.status == "waiting")

    @precondition(lambda self: bool(self._waiting()))
    @rule(
        run_id=st.runner().flatmap(lambda machine: st.sampled_from(machine._waiting())),
        value=values,
        event_id=st.none() | st.sampled_from(EVENT_IDS),
    )
    def deliver_awaited(self, run_id: str, value: object, event_id: str | None) -> None:
        """Deliver the event a waiting run waits for."""
        event = self.model.runs[run_id].waiting_for
        assert event is not None
        self.deliver(run_id, event, value, event_id)

    @rule(lease=LEASES, name=st.sampled_from(STEP_NAMES), event=event_names)
    def take(self, lease: Lease, name: str, event: str) -> None:
        run = self.model.runs[lease.run_id]
        buffered = [decoded(p) for p in run.events.get(event, ())]
        expected = self.model.take(lease.run_id, lease.epoch, name, event)
        got = self._run(self.storage.take_event(lease, name, event))
        shown = (
            "lease lost"
            if got is None
            else f"found {show(decoded(got.payload))}"
            if got.found
            else "nothing"
        )
        note(f"{self._lease(lease)} takes {event} at step {name!r} -> {shown}")
        self._fenced(lease, expected is not None, got is not None, "take_event")
        if expected is not None and got is not None:
            found, payload = expected
            promise(
                got.found == found and same_value(got.payload, payload),
                P.EVENT_ONCE_IN_ORDER,
                f"took {got}, expected found={found} {payload!r}; "
                f"{event} buffered for {run.label}: {show(buffered, 80)}",
            )
        self._check_fenced(lease, expected is not None, P.EVENT_TAKE_SAVES)
