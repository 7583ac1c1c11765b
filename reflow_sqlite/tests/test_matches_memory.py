"""The SQLite backend behaves exactly like the in-memory reference backend.

A seeded random sequence of operations (valid and stale leases, lapsing
leases, sleeps, waits, events, requeues, listings, schedules, child runs
and cancels that cascade to them, priorities and concurrency limits that
block and unblock runs, and the dashboard's reads: runs by key, buffered
events, finishes per minute) runs against
both backends on one shared virtual clock; every return value and every
exception must be equal.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from reflow_core.memory import MemoryStorage
from reflow_core.storage import (
    CHILDREN_WAIT_PREFIX,
    ConcurrencyLimit,
    EventTake,
    Lease,
    NewRun,
    RunPage,
    ScheduleSpec,
    StepRecord,
    Storage,
)

WORKFLOWS = ["a", "b"]
EVENTS = ["go", "stop"]
STATUSES = ["pending", "running", "sleeping", "waiting", "completed", "failed", "cancelled"]
PRIORITIES = [0, 0, 0, 1, -1, 7]
LIMITS: list[tuple[ConcurrencyLimit, ...]] = [
    (),
    (),
    (ConcurrencyLimit("x", 1),),
    (ConcurrencyLimit("y", 2),),
    (ConcurrencyLimit("x", 2),),  # the same key with another max
    (ConcurrencyLimit("x", 1), ConcurrencyLimit("y", 2)),
    (ConcurrencyLimit("y", 1), ConcurrencyLimit("z", 1)),
]


async def call(fn: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
    try:
        return ("ok", await fn())
    except Exception as exc:
        detail = getattr(exc, "existing_run_id", None)
        return ("raised", (type(exc).__name__, detail))


class Scenario:
    """Draws operations and applies each one to both backends."""

    def __init__(self, seed: int, memory: Storage, sqlite: Storage, clock: Any) -> None:
        self.rng = random.Random(seed)
        self.reads = random.Random(-seed)
        self.memory = memory
        self.sqlite = sqlite
        self.clock = clock
        self.run_ids: list[str] = []
        self.leases: list[Lease] = []
        self.cursors: list[str] = []
        self.schedule_keys = ["s1", "s2"]
        self.counter = 0
        self.child_ids: list[str] = []
        self.blocked: set[str] = set()
        """Runs seen blocked (by get_run or list_runs)."""
        self.unblocked: set[str] = set()
        """Runs seen blocked, then not blocked."""

    def pick_run(self) -> str:
        if not self.run_ids or self.rng.random() < 0.05:
            return "missing-run"
        return self.rng.choice(self.run_ids)

    def pick_lease(self) -> Lease:
        if not self.leases:
            return Lease("missing-run", 1)
        draw = self.rng.random()
        if draw < 0.75:  # one of the latest claims: often still live
            return self.rng.choice(self.leases[-3:])
        lease = self.rng.choice(self.leases)
        if draw < 0.9:
            return lease
        return Lease(lease.run_id, lease.epoch + self.rng.choice([-1, 1]))

    def duration(self) -> timedelta:
        return timedelta(seconds=self.rng.choice([0, 1, 5, 30, 120]))

    def step(self) -> StepRecord:
        status = self.rng.choice(["completed", "failed", "skipped"])
        return StepRecord(
            name=self.rng.choice(["s1", "s2", "s3", "w1", "w2"]),
            status=status,
            output=None if status != "completed" else f'"{self.rng.randint(0, 9)}"',
            error='"boom"' if status == "failed" else None,
            attempts=self.rng.randint(1, 3),
        )

    def operation(self) -> tuple[str, Callable[[Storage], Awaitable[Any]]]:
        rng = self.rng
        kind = rng.choice(
            [
                "create",
                "create",
                "claim",
                "claim",
                "heartbeat",
                "save",
                "save",
                "save",
                "finish",
                "status",
                "deliver",
                "take",
                "sleep",
                "wait",
                "deliver",
                "take",
                "get",
                "steps",
                "list",
                "requeue",
                "advance",
                "advance",
                "schedule",
                "due",
                "fire",
                "child",
                "child",
                "child",
                "join",
                "join",
                "children",
            ]
        )
        if kind == "create":
            self.counter += 1
            key = rng.choice([None, None, "k1", "k2"])
            new = NewRun(
                rng.choice(WORKFLOWS),
                rng.choice(['"x"', '"y"']),
                idempotency_key=key,
                run_id=rng.choice([f"run-{self.counter:04d}"] * 9 + ["run-0001"]),
                priority=rng.choice(PRIORITIES),
                limits=rng.choice(LIMITS),
            )
            return kind, lambda s: s.create_run(new)
        if kind == "claim":
            workflows = rng.sample(WORKFLOWS, rng.randint(1, 2))
            limit = rng.randint(0, 3)
            lease = timedelta(seconds=rng.choice([5, 60, 600]))
            return kind, lambda s: s.claim_runs(workflows, limit, lease)
        if kind == "heartbeat":
            lease, extend = self.pick_lease(), self.duration()
            return kind, lambda s: s.heartbeat_run(lease, extend)
        if kind == "save":
            lease, step, extend = self.pick_lease(), self.step(), self.duration()
            return kind, lambda s: s.save_step_result(lease, step, extend)
        if kind == "finish":
            lease = self.pick_lease()
            status = rng.choice(["completed", "failed"])
            step = self.step() if rng.random() < 0.5 else None
            return kind, lambda s: s.finish_run(
                lease,
                status,
                output='"done"',
                error='"e"' if status == "failed" else None,
                step=step,
            )
        if kind == "status":
            with_lease = rng.random() < 0.6
            lease = self.pick_lease() if with_lease else None
            run_id = lease.run_id if lease and rng.random() < 0.9 else self.pick_run()
            status = rng.choice(["pending", "cancelled", "failed"])
            return kind, lambda s: s.update_run_status(run_id, status, lease=lease, error='"x"')
        if kind == "sleep":
            lease, name, span = self.pick_lease(), rng.choice(["z1", "z2"]), self.duration()
            return kind, lambda s: s.sleep_run(lease, name, span)
        if kind == "wait":
            lease, name = self.pick_lease(), rng.choice(["w1", "w2"])
            event = rng.choice(EVENTS)
            timeout = rng.choice([None, self.duration()])
            return kind, lambda s: s.wait_run(lease, name, event, timeout)
        if kind == "deliver":
            run_id, event = self.pick_run(), rng.choice(EVENTS)
            payload = f'"{rng.randint(0, 99)}"'
            event_id = rng.choice([None, None, "e1", "e2"])
            return kind, lambda s: s.deliver_event(run_id, event, payload, event_id=event_id)
        if kind == "take":
            lease, name, event = self.pick_lease(), rng.choice(["w1", "w2"]), rng.choice(EVENTS)
            return kind, lambda s: s.take_event(lease, name, event)
        if kind == "get":
            run_id = self.pick_run()
            return kind, lambda s: s.get_run(run_id)
        if kind == "steps":
            run_id = self.pick_run()

            async def steps(s: Storage) -> Any:
                return list((await s.get_step_results(run_id)).items())

            return kind, steps
        if kind == "list":
            status = None if rng.random() < 0.5 else rng.sample(STATUSES, rng.randint(0, 3))
            workflow = rng.choice([None, *WORKFLOWS])
            limit = rng.randint(1, 4)
            cursor = rng.choice([None, *self.cursors[-3:]])
            return kind, lambda s: s.list_runs(
                status=status, workflow=workflow, limit=limit, cursor=cursor
            )
        if kind == "requeue":
            run_id = self.pick_run()
            return kind, lambda s: s.requeue_run(run_id)
        if kind == "schedule":
            spec = ScheduleSpec(
                rng.choice(self.schedule_keys),
                rng.choice(WORKFLOWS),
                rng.choice(['"p"', '"q"']),
                rng.choice(["every:60", "every:120"]),
                self.clock.now + self.duration(),
            )
            if rng.random() < 0.2:
                return "delete", lambda s: s.delete_schedule(spec.key)
            return kind, lambda s: s.upsert_schedule(spec)
        if kind == "due":
            limit = rng.randint(1, 3)
            return kind, lambda s: s.due_schedules(limit)
        if kind == "fire":
            key = rng.choice(self.schedule_keys)
            self.counter += 1
            run_id = f"sched-{self.counter:04d}"

            async def fire(s: Storage) -> Any:
                listed = {x.key: x for x in await s.list_schedules()}
                if key not in listed:
                    return await s.claim_schedule_slot(
                        key, self.clock.now, self.clock.now, NewRun("a", "1", run_id=run_id)
                    )
                slot = listed[key].next_run_at
                run = NewRun(
                    listed[key].workflow,
                    listed[key].input,
                    idempotency_key=f"schedule:{key}:{slot.isoformat()}",
                    run_id=run_id,
                )
                return await s.claim_schedule_slot(key, slot, slot + timedelta(seconds=60), run)

            return kind, fire
        if kind == "child":
            lease, step = self.pick_lease(), rng.choice(["c1", "c2"])
            self.counter += 1
            draw = rng.random()
            if draw < 0.8 or not self.child_ids:
                run_id = f"child-{self.counter:04d}"  # a new child
            elif draw < 0.95:
                run_id = rng.choice(self.child_ids)  # a replay, or another run's child
            else:
                run_id = self.pick_run()  # taken by a run that is no child
            new = NewRun(
                rng.choice(WORKFLOWS),
                '"c"',
                run_id=run_id,
                delay=rng.choice([None, None, self.duration()]),
                deadline=rng.choice([None, None, self.duration()]),
                priority=rng.choice(PRIORITIES),
                limits=rng.choice(LIMITS),
            )
            return kind, lambda s: s.start_child(lease, step, new)
        if kind == "join":
            lease = self.pick_lease()
            step = StepRecord(rng.choice(["c1", "c2"]), "waiting", attempts=rng.randint(1, 3))
            return kind, lambda s: s.wait_children(lease, step)
        if kind == "children":
            run_id = self.pick_run()
            return kind, lambda s: s.list_children(run_id)
        return "advance", lambda s: s.get_run("unused")

    def read(self) -> tuple[str, Callable[[Storage], Awaitable[Any]]]:
        """One of the dashboard's reads, drawn from a generator of its own,
        so the operations drawn for a seed are the same with or without them."""
        rng = self.reads
        kind = rng.choice(["bykey", "buffered", "buffered", "history"])
        if kind == "bykey":
            key, limit = rng.choice(["k1", "k2", "k3"]), rng.randint(1, 4)
            return kind, lambda s: s.find_runs_by_key(key, limit=limit)
        if kind == "buffered":
            run_id = rng.choice(self.run_ids) if self.run_ids else "missing-run"
            limit = rng.randint(1, 4)
            return kind, lambda s: s.list_buffered_events(run_id, limit=limit)
        minutes = rng.choice([1, 2, 3, 10, 60, 1440])
        return kind, lambda s: s.finished_history(minutes)

    def learn(self, kind: str, result: tuple[str, Any]) -> None:
        status, value = result
        if status != "ok":
            return
        if kind == "create" and value.run.id not in self.run_ids:
            self.run_ids.append(value.run.id)
        if kind == "fire" and value is not None and value.id not in self.run_ids:
            self.run_ids.append(value.id)
        if kind == "claim":
            self.leases.extend(c.lease for c in value)
        if kind == "child" and value is not None and value.id not in self.run_ids:
            self.run_ids.append(value.id)
            self.child_ids.append(value.id)
        if kind == "list" and value.next_cursor:
            self.cursors.append(value.next_cursor)
        records = [value] if kind == "get" and value is not None else []
        if kind == "list":
            records = list(value.runs)
        for record in records:
            if record.blocked_by is not None:
                self.blocked.add(record.id)
            elif record.id in self.blocked:
                self.unblocked.add(record.id)

    async def run(self, steps: int) -> dict[str, int]:
        seen: dict[str, int] = {}
        for index in range(steps):
            kind, op = self.operation()
            if kind == "advance":
                self.clock.advance(self.rng.choice([0.5, 1, 2, 5, 10, 61]))
                continue
            expected = await call(lambda op=op: op(self.memory))
            actual = await call(lambda op=op: op(self.sqlite))
            assert actual == expected, f"step {index}: {kind} differs"
            self.learn(kind, expected)
            if self.reads.random() < 0.3:
                read, op = self.read()
                result = await call(lambda op=op: op(self.memory))
                assert await call(lambda op=op: op(self.sqlite)) == result, f"step {index}: {read}"
                label = f"{read}:{self.verdict(result)}"
                seen[label] = seen.get(label, 0) + 1
            if index % 10 == 0:  # every run as stored, blocked_by included
                everything = await self.memory.list_runs(limit=1000)
                assert await self.sqlite.list_runs(limit=1000) == everything, f"step {index}"
                history = await self.memory.finished_history(1440)
                assert await self.sqlite.finished_history(1440) == history, f"step {index}"
                self.learn("list", ("ok", everything))
            label = f"{kind}:{self.verdict(expected)}"
            seen[label] = seen.get(label, 0) + 1
        return seen

    @staticmethod
    def verdict(result: tuple[str, Any]) -> str:
        """``yes`` for an outcome that did something, ``no`` for a refusal or nothing."""
        status, value = result
        if status != "ok":
            return "raised"
        if isinstance(value, EventTake):
            return "yes" if value.found else "no"
        if isinstance(value, RunPage):
            return "yes" if value.runs else "no"
        return "yes" if value not in (None, False, [], {}) else "no"


@pytest.fixture(params=["hook", "public"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_random_operations_match_the_memory_backend(opener, clock, seed: int) -> None:
    memory = MemoryStorage(clock=clock)
    await memory.initialize()
    sqlite = await opener()
    scenario = Scenario(seed, memory, sqlite, clock)
    seen = await scenario.run(1500)
    # The scenario reached the interesting outcomes, not just refusals.
    for kind in (
        "create",
        "claim",
        "heartbeat",
        "save",
        "finish",
        "status",
        "sleep",
        "wait",
        "deliver",
        "take",
        "requeue",
        "list",
        "due",
        "fire",
        "child",
        "join",
        "children",
        "bykey",
        "buffered",
        "history",
    ):
        assert seen.get(f"{kind}:yes", 0) > 0, (kind, seen)
    for kind in ("save", "finish", "heartbeat", "take", "fire", "requeue", "child", "join"):
        assert seen.get(f"{kind}:no", 0) > 0, (kind, seen)
    assert seen.get("create:raised", 0) > 0
    assert seen.get("child:raised", 0) > 0
    assert seen.get("status:raised", 0) > 0
    claimed = [r for r in (await sqlite.list_runs(limit=1000)).runs if r.attempts > 0]
    assert claimed
    assert any(r.reclaims > 0 for r in claimed)
    # Children were parked on, woken by their children's ends, and cancelled
    # with their parents.
    runs = (await sqlite.list_runs(limit=1000)).runs
    assert any(r.parent_id is not None and r.status == "cancelled" for r in runs)
    assert any(
        r.waiting_for is not None and r.waiting_for.startswith(CHILDREN_WAIT_PREFIX) for r in runs
    )
    # Claims blocked runs at full limits, and later writes unblocked some.
    assert scenario.blocked
    assert scenario.unblocked
