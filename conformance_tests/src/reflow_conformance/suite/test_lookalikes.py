"""Names, run ids and keys that look alike are different.

A store compares text by its code points: two names that differ only by
case, by a space at either end or by Unicode normalization (``é`` as one
code point or as ``e`` and a combining accent) are two names. A database
column with a case-insensitive, space-padding or normalizing collation
(MySQL's default, SQL Server's) merges them: two workflows share their runs,
two idempotency keys collide, a step's result overwrites another's.
"""

from __future__ import annotations

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.errors import IdempotencyConflictError, StorageError
from reflow_core.storage import NewRun, StepRecord, Storage

from ._events import drain_events
from ._util import claim_one, create, decoded

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestLookalikeNames"]

PAIRS = [
    ("a", "A"),
    ("a", "a "),
    ("a", " a"),
    ("\u00e9", "e\u0301"),
    ("ss", "\u00df"),
]
"""Text a collation may take for equal: by case, padding, normalization, folding."""


def _lookalikes(base: str) -> list[tuple[str, str]]:
    """Each pair of :data:`PAIRS` around ``base`` (numbered, so no two pairs
    share a name), at its start and its end."""
    return [(f"{x}{base}{i}{x}", f"{y}{base}{i}{y}") for i, (x, y) in enumerate(PAIRS)]


class TestLookalikeNames:
    def test_lookalike_workflows_have_their_own_runs(self, reflow: Harness) -> None:
        async def body(s: Storage) -> None:
            for one, other in _lookalikes(reflow.unique()):
                mine = (await create(s, one, "mine")).run.id
                theirs = (await create(s, other, "theirs")).run.id
                claimed = [c.run.id for c in await s.claim_runs([one], 10, reflow.long_lease)]
                promise(
                    claimed == [mine],
                    P.LOOKALIKES_DISTINCT,
                    f"a claim of workflow {one!r} took {claimed}; its run is {mine}, "
                    f"{theirs} is {other!r}'s",
                )
                listed = [run.id for run in (await s.list_runs(workflow=other)).runs]
                promise(
                    listed == [theirs],
                    P.LOOKALIKES_DISTINCT,
                    f"list_runs(workflow={other!r}) gave {listed}, not [{theirs!r}]",
                )

        reflow.run(body)

    def test_lookalike_run_ids_are_two_runs(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            for one, other in _lookalikes(reflow.unique("run")):
                try:
                    for run_id in (one, other):
                        await s.create_run(NewRun(wf, codec.encode(run_id), run_id=run_id))
                except StorageError as exc:
                    promise(
                        False,
                        P.LOOKALIKES_DISTINCT,
                        f"run ids {one!r} and {other!r} taken for one: {exc}",
                    )
                for run_id in (one, other):
                    run = await s.get_run(run_id)
                    promise(
                        run is not None and decoded(run.input) == run_id,
                        P.LOOKALIKES_DISTINCT,
                        f"get_run({run_id!r}) gave {run!r}",
                    )

        reflow.run(body)

    def test_lookalike_idempotency_keys_do_not_collide(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            for one, other in _lookalikes("key"):
                first = await create(s, wf, 1, key=one)
                try:
                    second = await create(s, wf, 2, key=other)
                except IdempotencyConflictError as exc:
                    promise(
                        False,
                        P.LOOKALIKES_DISTINCT,
                        f"keys {one!r} and {other!r} taken for one: {exc}",
                    )
                    raise
                promise(
                    second.created and second.run.id != first.run.id,
                    P.LOOKALIKES_DISTINCT,
                    f"key {other!r} returned the run of key {one!r}",
                )

        reflow.run(body)

    def test_lookalike_step_names_keep_their_own_results(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await claim_one(s, wf)
            pairs = _lookalikes("step")
            for one, other in pairs:
                for name in (one, other):
                    step = StepRecord(name, "completed", output=codec.encode(name))
                    saved = await s.save_step_result(held.lease, step, reflow.long_lease)
                    promise(saved, P.LIVE_LEASE_ACCEPTED, "save_step_result with a fresh lease")
            steps = await s.get_step_results(held.run.id)
            for one, other in pairs:
                for name in (one, other):
                    stored = steps.get(name)
                    promise(
                        stored is not None and decoded(stored.output) == name,
                        P.LOOKALIKES_DISTINCT,
                        f"step {name!r} (saved beside {one!r} and {other!r}) reads back "
                        f"as {stored!r}",
                    )

        reflow.run(body)

    def test_lookalike_events_and_event_ids_are_apart(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            await create(s, wf)
            held = await claim_one(s, wf)
            for index, (one, other) in enumerate(_lookalikes("event")):
                for name in (one, other):
                    sent = await s.deliver_event(held.run.id, name, codec.encode(name))
                    promise(sent, P.EVENT_BUFFERED, f"deliver {name!r} to a running run: False")
                for name in (one, other):
                    found = await drain_events(s, held.lease, name, f"take-{index}-{name}")
                    promise(
                        found == [name],
                        P.LOOKALIKES_DISTINCT,
                        f"event {name!r} (beside {one!r} and {other!r}) took {found}",
                    )
                for event_id in (one, other):
                    sent = await s.deliver_event(
                        held.run.id, "ids", codec.encode(event_id), event_id=event_id
                    )
                    promise(sent, P.EVENT_BUFFERED, f"deliver id {event_id!r}: False")
                found = await drain_events(s, held.lease, "ids", f"ids-{index}")
                promise(
                    sorted(map(str, found)) == sorted((one, other)),
                    P.LOOKALIKES_DISTINCT,
                    f"events with ids {one!r} and {other!r} took {found}",
                )

        reflow.run(body)
