"""Reading many runs at once (:meth:`~reflow_core.storage.Storage.get_runs`):
each as ``get_run`` reads it, the missing ones left out (area ``batches``)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_conformance.plugin import suite_settings
from reflow_conformance.strategies import BAD_TEXT
from reflow_core import codec
from reflow_core.errors import ConfigError
from reflow_core.storage import MAX_GET_RUNS, NewRun, RunRecord, StepRecord, Storage

from ._util import LONG, claim_one, create

pytestmark = [pytest.mark.reflow_conformance, pytest.mark.reflow_area("batches")]

__all__ = ["TestGetRuns", "TestGetRunsArguments"]


async def _read(s: Storage, run_ids: list[str]) -> dict[str, RunRecord]:
    found = await s.get_runs(run_ids)
    promise(
        isinstance(found, dict) and all(isinstance(r, RunRecord) for r in found.values()),
        P.GET_RUNS,
        f"get_runs returned {found!r:.200}",
    )
    return found


async def _one_by_one(s: Storage, run_ids: list[str]) -> dict[str, RunRecord]:
    expected: dict[str, RunRecord] = {}
    for run_id in run_ids:
        record = await s.get_run(run_id)
        if record is not None:
            expected[run_id] = record
    return expected


class TestGetRuns:
    def test_runs_in_every_state_read_as_get_run_reads_them(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            pending = (await create(s, wf, {"n": 1}, key="k")).run.id
            delayed = (
                await s.create_run(NewRun(wf, codec.encode(2), delay=timedelta(hours=1)))
            ).run.id
            running = (await create(s, wf, {"n": 3})).run.id
            ended = (await create(s, wf, {"n": 4})).run.id
            failed = (await create(s, wf, {"n": 5})).run.id
            claimed = {}
            for _ in range(4):
                one = await claim_one(s, wf, LONG)
                claimed[one.run.id] = one
            step = StepRecord("s", "completed", output=codec.encode({"ok": True}))
            await s.save_step_result(claimed[running].lease, step, LONG)
            await s.finish_run(claimed[ended].lease, "completed", output=codec.encode("done"))
            await s.finish_run(claimed[failed].lease, "failed", error=codec.encode("boom"))
            missing = reflow.unique("run")
            ids = [pending, delayed, running, ended, failed, missing, pending]
            found = await _read(s, ids)
            expected = await _one_by_one(s, ids)
            promise(
                set(found) == {pending, delayed, running, ended, failed},
                P.GET_RUNS,
                f"get_runs of {len(set(ids))} ids (one missing, one twice) "
                f"answered for {sorted(found)}",
            )
            for run_id, record in expected.items():
                promise(
                    found.get(run_id) == record,
                    P.GET_RUNS,
                    f"run {run_id}: get_runs read {found.get(run_id)}, get_run {record}",
                )
            promise(await s.get_runs([]) == {}, P.GET_RUNS, "no ids did not answer {}")
            promise(
                await s.get_runs([missing]) == {},
                P.GET_RUNS,
                "a missing run was answered for",
            )

        reflow.run(body)

    def test_a_full_read_sees_every_run_and_its_latest_write(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def body(s: Storage) -> None:
            news = [NewRun(wf, codec.encode({"n": n})) for n in range(MAX_GET_RUNS // 2)]
            made = [outcome.run.id for outcome in await s.create_runs(news)]  # type: ignore[union-attr]
            ids = made + [reflow.unique("run") for _ in range(MAX_GET_RUNS - len(made))]
            found = await _read(s, ids)
            promise(
                set(found) == set(made),
                P.GET_RUNS,
                f"{len(found)} of {len(made)} stored runs read among {len(ids)} ids",
            )
            one = await claim_one(s, wf, LONG)
            await s.finish_run(one.lease, "completed", output=codec.encode("x"))
            again = await _read(s, [one.run.id])
            promise(
                again.get(one.run.id) is not None and again[one.run.id].status == "completed",
                P.GET_RUNS,
                f"after its finish, get_runs read {again.get(one.run.id)}",
            )

        reflow.run(body)

    def test_any_ids_read_as_get_run_reads_each(self, reflow: Harness) -> None:
        wf = reflow.unique()

        async def setup(s: Storage) -> list[str]:
            made = [(await create(s, wf, {"n": n})).run.id for n in range(6)]
            one = await claim_one(s, wf, LONG)
            await s.finish_run(one.lease, "completed", output=codec.encode(1))
            return made

        made = reflow.run(setup)
        absent = [reflow.unique("run") for _ in range(3)]
        pool = st.sampled_from(made + absent)

        @suite_settings()
        @given(st.lists(pool, max_size=12))
        def check(ids: list[str]) -> None:
            async def body(s: Storage) -> None:
                found = await _read(s, ids)
                expected = await _one_by_one(s, ids)
                promise(
                    found == expected,
                    P.GET_RUNS,
                    f"get_runs({ids}) answered for {sorted(found)}, "
                    f"get_run finds {sorted(expected)}",
                )

            reflow.run(body)

        check()


class TestGetRunsArguments:
    def test_bad_ids_and_too_many_are_config_errors(self, reflow: Harness) -> None:
        wf = reflow.unique()
        bad: list[tuple[str, object]] = [
            ("one string instead of a list of ids", "some-run-id"),
            ("more than MAX_GET_RUNS ids", [f"r{n}" for n in range(MAX_GET_RUNS + 1)]),
            *((f"the id {text!r}", ["fine", text]) for text in BAD_TEXT),
        ]

        async def body(s: Storage) -> None:
            run_id = (await create(s, wf)).run.id
            for what, run_ids in bad:
                try:
                    await s.get_runs(run_ids)  # type: ignore[arg-type]
                except ConfigError:
                    continue
                promise(False, P.GET_RUNS_ARGS, f"{what} raised no ConfigError")
            enough = [run_id] * (MAX_GET_RUNS + 5)  # many times one id: one id
            found = await s.get_runs(enough)
            promise(
                list(found) == [run_id],
                P.GET_RUNS_ARGS,
                f"one id given {len(enough)} times answered {sorted(found)}",
            )

        reflow.run(body)
