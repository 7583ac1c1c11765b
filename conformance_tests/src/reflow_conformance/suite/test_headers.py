"""A run's propagation headers (``NewRun.headers``, ``RunRecord.headers``).

Headers are what an enqueuer hands on to the workers that run a run (W3C
``traceparent``, ``tracestate``, ``baggage``): the store keeps them as given,
names and values exactly, and nothing of a run's life changes them but a
debounced create, which replaces them with its own. Headers that break the
rules (:data:`~reflow_core.storage.MAX_HEADERS` names of 1-64 characters from
``a-z 0-9 - _ .``, values of printable ASCII, within
:data:`~reflow_core.storage.MAX_HEADER_BYTES` in all) are refused."""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pytest

from reflow_conformance import promises as P
from reflow_conformance.harness import Harness, promise
from reflow_core import codec
from reflow_core.storage import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    ClaimedRun,
    NewRun,
    RunRecord,
    ScheduleSpec,
    StepRecord,
    Storage,
)

from ._util import (
    LONG,
    claim_only,
    far_slot,
    read_run,
    refused,
    refused_creates,
    refused_slots,
    refused_starts,
)

pytestmark = pytest.mark.reflow_conformance

__all__ = ["TestHeaders"]

PRINTABLE = "".join(chr(code) for code in range(0x20, 0x7F))
"""Every printable ASCII character, space to ``~``: quotes, backslash, ``%``,
``{`` and ``}`` among them."""

TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
    "baggage": "userId=alice,serverNode=DF%2028,isProduction=false",
}
"""A W3C trace context with baggage, as a tracing library hands it on."""

_SIXTEEN = {f"h{i:02}": "v" * (MAX_HEADER_BYTES // MAX_HEADERS - 3) for i in range(MAX_HEADERS)}
"""As many headers as a run may carry, weighing exactly the most it may."""

GOOD: list[tuple[str, Mapping[str, str]]] = [
    ("a trace context", TRACE),
    ("every printable character", {"all": PRINTABLE, "x-request-id": "7"}),
    ("the most headers", {f"n{i}": f"value {i}" for i in range(MAX_HEADERS)}),
    ("the largest value", {"big": "x" * (MAX_HEADER_BYTES - 3)}),
    ("the most headers at the largest size", _SIXTEEN),
    ("the longest name", {"n" * 64: "v", "a.b_c-9": "every name character"}),
    (
        "values that look like something else",
        {"json": '{"a": [1, "b"]}', "null": "null", "number": "007", "empty": ""},
    ),
    ("values with spaces at their ends", {"pad": "  both ends  ", "space": " "}),
    ("a read-only mapping", types.MappingProxyType({"traceparent": TRACE["traceparent"]})),
]
"""Headers every store keeps exactly, each with what they test."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"


def _differences(got: object, expected: Mapping[str, str]) -> list[str]:
    """How headers read back differ from those given (nothing if they match)."""
    if not isinstance(got, Mapping):
        return [f"not a mapping but {type(got).__name__}: {_short(got)}"]
    found: list[str] = []
    for name, value in got.items():
        if not isinstance(name, str) or not isinstance(value, str):
            found.append(f"{_short(name)}: {_short(value)} is not str to str")
        elif name not in expected:
            found.append(f"{name!r} is not among those given")
        elif value != expected[name]:
            found.append(f"{name!r} is {_short(value)}, expected {_short(expected[name])}")
    found.extend(f"{name!r} is missing" for name in expected if name not in got)
    return found


def _stored(run: RunRecord, expected: Mapping[str, str], where: str) -> None:
    wrong = _differences(run.headers, expected)
    promise(not wrong, P.HEADERS_STORED, f"{where}: {run.id}'s headers: {'; '.join(wrong)}")


def _check_all(
    runs: Sequence[RunRecord], cases: Mapping[str, Mapping[str, str]], when: str
) -> None:
    for run in runs:
        if run.id in cases:
            _stored(run, cases[run.id], f"{when} ({run.status})")


async def _read_all(s: Storage, cases: Mapping[str, Mapping[str, str]], when: str) -> None:
    runs = [await read_run(s, run_id) for run_id in cases]
    _check_all(runs, cases, f"as stored {when}")


async def _claim_all(
    s: Storage, workflows: Collection[str], ids: Collection[str], name: str, when: str
) -> dict[str, ClaimedRun]:
    """Claim every run of ``ids`` (due now, or within moments: a store may
    round a time up to its millisecond); promise ``name`` says why they are due."""
    claimed: dict[str, ClaimedRun] = {}
    for _ in range(100):
        for c in await s.claim_runs(list(workflows), 4 * len(ids), LONG):
            claimed[c.run.id] = c
        if set(ids) <= claimed.keys():
            break
        await asyncio.sleep(0.01)
    missing = sorted(set(ids) - claimed.keys())
    promise(not missing, name, f"{when}: no claim took {missing}")
    return claimed


class TestHeaders:
    def test_headers_read_back_as_given_through_a_runs_life(self, reflow: Harness) -> None:
        """Headers read back as given (none by default) from ``create_run``,
        ``start_child`` and ``claim_schedule_slot``: a trace context, every
        printable character, the most headers, the largest size, the longest
        name. No claim, heartbeat, step save, sleep, wait, event, finish,
        requeue or cancel changes them."""
        wf, cwf, pwf = reflow.unique(), reflow.unique("child"), reflow.unique("parent")

        async def body(s: Storage) -> None:
            cases: dict[str, Mapping[str, str]] = {}
            plain = (await s.create_run(NewRun(wf, codec.encode("plain")))).run
            _stored(plain, {}, "a run created without headers")
            cases[plain.id] = {}
            for what, headers in GOOD:
                made = (await s.create_run(NewRun(wf, codec.encode(what), headers=headers))).run
                _stored(made, headers, f"create_run with {what} returned")
                cases[made.id] = dict(headers)
            if reflow.implements("children"):
                await s.create_run(NewRun(pwf, codec.encode("parent"), headers=TRACE))
                held = await claim_only(s, pwf, P.NEW_RUN_CLAIMABLE)
                for i, (what, headers) in enumerate([("no headers", {}), *GOOD[:3]]):
                    child_id = reflow.unique("c")
                    new = NewRun(cwf, codec.encode(i), run_id=child_id, headers=headers)
                    child = await s.start_child(held.lease, f"spawn{i}", new)
                    promise(child is not None, P.LIVE_LEASE_ACCEPTED, "start_child returned None")
                    assert child is not None
                    _stored(child, headers, f"start_child with {what} returned")
                    cases[child_id] = dict(headers)
                await s.finish_run(held.lease, "completed", output=codec.encode(1))
            if reflow.implements("schedules"):
                key, slot = reflow.unique("sched"), far_slot()
                await s.upsert_schedule(
                    ScheduleSpec(key, cwf, codec.encode(None), "every:60", slot)
                )
                try:
                    new = NewRun(
                        cwf,
                        codec.encode({"slot": slot}),
                        idempotency_key=f"{key}@{slot.isoformat()}",
                        headers=TRACE,
                    )
                    fired = await s.claim_schedule_slot(key, slot, slot + timedelta(minutes=1), new)
                    promise(fired is not None, P.SCHEDULE_SLOT_FIRES, "the slot did not fire")
                    assert fired is not None
                    _stored(fired, TRACE, "claim_schedule_slot returned")
                    cases[fired.id] = TRACE
                finally:
                    await s.delete_schedule(key)
            await _read_all(s, cases, "after their creation")
            workflows = [wf, cwf]

            claimed = await _claim_all(s, workflows, cases, P.NEW_RUN_CLAIMABLE, "new runs")
            _check_all([c.run for c in claimed.values()], cases, "the first claim returned")
            for c in claimed.values():
                await s.heartbeat_run(c.lease, LONG)
                step = StepRecord("s", "completed", output=codec.encode(1))
                await s.save_step_result(c.lease, step, LONG)
            await _read_all(s, cases, "after heartbeats and step saves")
            for c in claimed.values():
                await s.sleep_run(c.lease, "nap", timedelta(0))
            await _read_all(s, cases, "after sleeps")

            claimed = await _claim_all(s, workflows, cases, P.DUE_CLAIMABLE, "woken sleepers")
            _check_all([c.run for c in claimed.values()], cases, "the claim after a sleep returned")
            for c in claimed.values():
                await s.wait_run(c.lease, "w", "go", None)
            await _read_all(s, cases, "after waits")
            for run_id in cases:
                await s.deliver_event(run_id, "go", codec.encode(run_id))
            await _read_all(s, cases, "after their events")

            claimed = await _claim_all(s, workflows, cases, P.EVENT_WAKES, "woken waiters")
            _check_all([c.run for c in claimed.values()], cases, "the claim after a wait returned")
            for c in claimed.values():
                await s.take_event(c.lease, "w", "go")
                await s.update_run_status(c.run.id, "pending", lease=c.lease)
            await _read_all(s, cases, "after takes and hand-backs")

            claimed = await _claim_all(s, workflows, cases, P.HAND_BACK, "runs handed back")
            for c in claimed.values():
                await s.finish_run(c.lease, "failed", error=codec.encode("boom"))
            await _read_all(s, cases, "after they failed")
            for run_id in cases:
                await s.requeue_run(run_id)
            await _read_all(s, cases, "after requeues")
            for run_id in cases:
                await s.update_run_status(run_id, "cancelled")
            await _read_all(s, cases, "after cancels")

        reflow.run(body)

    def test_a_debounced_create_replaces_the_headers(self, reflow: Harness) -> None:
        """A create with the debounce key of an open run gives it the create's
        headers, whole: none of the old ones are kept, none merged, and a
        create without headers leaves it none. Once a claim took it, it keeps
        its headers, and the next create with the key makes a run of its own."""
        wf = reflow.unique()
        key = reflow.unique("debounce")

        async def debounce(s: Storage, value: object, headers: Mapping[str, str]) -> RunRecord:
            new = NewRun(wf, codec.encode(value), debounce_key=key, headers=headers)
            return (await s.create_run(new)).run

        async def body(s: Storage) -> None:
            first = await debounce(s, 1, TRACE)
            _stored(first, TRACE, "the first create with the key returned")
            changes: list[tuple[str, Mapping[str, str]]] = [
                ("fewer headers with other values", {"traceparent": "00-" + "1" * 32 + "-01"}),
                ("no headers", {}),
                ("other names", {"x-tenant": "acme", "all": PRINTABLE}),
            ]
            for what, headers in changes:
                again = await debounce(s, what, headers)
                promise(
                    again.id == first.id,
                    P.DEBOUNCE_REPLACES,
                    f"a create with the key of the open run {first.id} made {again.id}",
                )
                _stored(again, headers, f"a debounced create with {what} returned")
                _stored(await read_run(s, first.id), headers, f"after a create with {what}")
            last = changes[-1][1]
            taken = await claim_only(s, wf, P.NEW_RUN_CLAIMABLE)
            _stored(taken.run, last, "the claim of the debounced run returned")
            later = await debounce(s, "later", TRACE)
            promise(later.id != first.id, P.DEBOUNCE_AFTER_CLAIM, "the claimed run was replaced")
            _stored(later, TRACE, "a create with the key of a claimed run returned")
            _stored(await read_run(s, first.id), last, "the claimed run, after a later create")

        reflow.run(body)

    def test_bad_headers_are_refused_and_write_nothing(self, reflow: Harness) -> None:
        """Headers that are not a mapping of at most ``MAX_HEADERS`` names of
        1-64 characters from ``a-z 0-9 - _ .`` to str of printable ASCII,
        within ``MAX_HEADER_BYTES`` in all, are refused with ``ConfigError``
        by ``create_run`` (with a fresh key, the key of an existing run and the
        debounce key of an open run alike), ``start_child`` and
        ``claim_schedule_slot``, which write nothing."""
        wf, cwf, pwf = reflow.unique(), reflow.unique("child"), reflow.unique("parent")
        bad_headers: list[tuple[str, Any]] = [
            ("a list of pairs", [("traceparent", "v")]),
            ("a str", "traceparent=v"),
            ("None", None),
            ("a set of names", {"traceparent"}),
            ("one header too many", {f"n{i}": "v" for i in range(MAX_HEADERS + 1)}),
            ("an empty name", {"": "v"}),
            ("an upper-case name", {"Traceparent": "v"}),
            ("a name with a space", {"trace parent": "v"}),
            ("a name with a colon", {"trace:parent": "v"}),
            ("a name with a slash", {"a/b": "v"}),
            ("a name of 65 characters", {"n" * 65: "v"}),
            ("a name with a non-ASCII letter", {"caf\u00e9": "v"}),
            ("a name with a NUL", {"a\x00": "v"}),
            ("a name with a newline", {"a\n": "v"}),
            ("a name that is not a str", {5: "v"}),
            ("a name of bytes", {b"a": "v"}),
            ("a value with a NUL", {"a": "x\x00y"}),
            ("a value with a newline", {"a": "x\ny"}),
            ("a value with a carriage return", {"a": "x\r\ny"}),
            ("a value with a tab", {"a": "x\ty"}),
            ("a value with DEL", {"a": "x\x7fy"}),
            ("a value with a non-ASCII letter", {"a": "caf\u00e9"}),
            ("a value with a line separator", {"a": "x\u2028y"}),
            ("a value that is not a str", {"a": 5}),
            ("a value of bytes", {"a": b"v"}),
            ("a value of None", {"a": None}),
            ("one byte too many", {"big": "x" * (MAX_HEADER_BYTES - 2)}),
            ("one byte too many in names", {"n" * 64: "x" * (MAX_HEADER_BYTES - 63)}),
            ("one byte too many in many headers", {**_SIXTEEN, "h00": _SIXTEEN["h00"] + "x"}),
        ]
        bad = [(f"headers that are {what}", {"headers": value}) for what, value in bad_headers]

        async def body(s: Storage) -> None:
            await refused_creates(s, wf, bad, P.HEADERS_ARGS)
            key = reflow.unique("debounce")
            dwf = reflow.unique("debounced")
            kept = (
                await s.create_run(NewRun(dwf, codec.encode("v"), debounce_key=key, headers=TRACE))
            ).run
            for what, args in bad:
                new = NewRun(dwf, codec.encode("w"), debounce_key=key, **args)
                await refused(
                    functools.partial(s.create_run, new),
                    f"create_run({what}, with the debounce key of an open run)",
                    P.HEADERS_ARGS,
                )
            runs = [r.id for r in (await s.list_runs(workflow=dwf)).runs]
            promise(runs == [kept.id], P.HEADERS_ARGS, f"refused creates left the runs {runs}")
            promise(
                await s.get_run(kept.id) == kept,
                P.HEADERS_ARGS,
                "a refused create with the debounce key of an open run changed it",
            )
            if reflow.implements("children"):
                starts = [(f"start_child with {what}", args) for what, args in bad]
                await refused_starts(reflow, s, pwf, cwf, starts, P.HEADERS_ARGS)
            if reflow.implements("schedules"):
                slots = [(f"claim_schedule_slot with {w}", a) for w, a in bad]
                await refused_slots(reflow, s, cwf, slots, P.HEADERS_ARGS)
            runs = [r.id for r in (await s.list_runs(workflow=cwf)).runs]
            promise(not runs, P.HEADERS_ARGS, f"refused starts and slots made {runs}")

        reflow.run(body)
