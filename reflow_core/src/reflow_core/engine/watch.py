"""One reader for every waiter of an engine: the runs that :meth:`Engine.result`
and :meth:`Engine.wait` calls wait for are read together, a batch of up to
:data:`~reflow_core.storage.MAX_GET_RUNS` per round trip
(:meth:`~reflow_core.storage.Storage.get_runs`), however many callers wait.

On a backend with a finish channel (:class:`~reflow_core.storage.FinishSource`)
the reader subscribes while the engine is open, and a hint naming a run
waited for makes the next read come at once: results travel back in
milliseconds from any process. The stored state stays the truth: a hint
only says when to read, and a lost one costs at most a poll interval."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Literal, get_args

from reflow_core.adapter import check_text
from reflow_core.errors import ConfigError, EngineClosedError, RunNotFoundError
from reflow_core.storage import (
    MAX_GET_RUNS,
    TERMINAL_STATUSES,
    FinishSource,
    RunRecord,
    Storage,
    WakeupSubscription,
)

__all__ = [
    "BURST",
    "MIN_GAP",
    "RETURN_WHEN",
    "ReturnWhen",
    "RunWatcher",
    "check_wait_args",
    "wait_records",
]

logger = logging.getLogger("reflow.engine")

MIN_GAP = 0.01
"""Seconds between two reads, on average over :data:`BURST` reads at the
least: the tick that bounds the reads a second, whatever the number of
waiters."""
BURST = 3
"""Reads that may follow one another without a gap after a quiet spell, so
that a run read when its waiter came and hinted a few milliseconds later is
read again at once."""


class RunWatcher:
    """Reads the runs waited for, together, until each has finished.

    Each run waited for is read when its waiter comes, then again after a
    pause that doubles from :data:`MIN_GAP` up to ``poll`` seconds, as one
    waiter's polling did on its own (straight to ``poll`` when its end will
    be told: a store's finish hints reach this reader, or the engine's own
    worker runs the run's workflow; those reads only cover the rest); the runs
    due are read in one batch per tick. A run this engine finished, or one a
    finish hint names, is read at once, or at the next tick when reads come
    faster than :data:`BURST` in as many ticks, alone or with the others
    due then: the runs read are those that may have changed, so that
    thousands of waiters cost a read of the runs that finished, not of all
    of them, every tick."""

    def __init__(
        self, storage: Storage, poll: float, runs_here: Callable[[str], bool] | None = None
    ) -> None:
        self._storage = storage
        self._poll = poll
        self._runs_here = runs_here
        self._read_starts: deque[float] = deque(maxlen=BURST)
        self._waiting: dict[str, list[asyncio.Future[RunRecord]]] = {}
        self._pause: dict[str, float] = {}
        """Each run's current pause between reads."""
        self._next: dict[str, float] = {}
        """When each run is read next (loop time), unless it is sooner dirty."""
        self._schedule: list[tuple[float, str]] = []
        """``_next`` as a heap; an entry that no longer matches it is skipped."""
        self._dirty: set[str] = set()
        """Runs to read at the next tick: new waiters, finished here or hinted."""
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches = True
        self._hints: WakeupSubscription | None = None
        self._subscribing = False
        self.hinted = 0
        """Finish hints that named a run waited for (for tests and metrics)."""
        self.reads = 0
        """Round trips made (for tests and metrics)."""
        self.runs_read = 0
        """Runs asked for, over all round trips (for tests and metrics)."""

    def watch(self, run_id: str) -> asyncio.Future[RunRecord]:
        """A future of the run's record once it has finished; it fails with
        :class:`RunNotFoundError` if there is no such run (or it was purged),
        or with the storage's error if a read fails."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RunRecord] = loop.create_future()
        futures = self._waiting.setdefault(run_id, [])
        futures.append(future)
        if len(futures) == 1:
            self._pause[run_id] = MIN_GAP
        self._mark(run_id)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._read_loop())
        return future

    def forget(self, run_id: str, future: asyncio.Future[RunRecord]) -> None:
        """Stop waiting with ``future`` (its caller gave up)."""
        futures = self._waiting.get(run_id)
        if futures is None:
            return
        with contextlib.suppress(ValueError):
            futures.remove(future)
        if not futures:
            self._drop(run_id)

    def _drop(self, run_id: str) -> None:
        self._waiting.pop(run_id, None)
        self._pause.pop(run_id, None)
        self._next.pop(run_id, None)
        self._dirty.discard(run_id)

    def _mark(self, run_id: str) -> None:
        self._dirty.add(run_id)
        self._kick.set()

    def finished(self, run_id: str) -> None:
        """This engine finished ``run_id``: read it now if someone waits for it."""
        if run_id in self._waiting:
            self._mark(run_id)

    def _hinted(self, run_ids: Collection[str] | None) -> None:
        """A finish hint from the store: read now the runs it names that are
        waited for (all of them for ``None``: runs may have ended unseen)."""
        if not self._waiting:
            return
        named = (
            list(self._waiting)
            if run_ids is None
            else [run_id for run_id in run_ids if run_id in self._waiting]
        )
        if named:
            self.hinted += 1
            self._dirty.update(named)
            self._kick.set()

    async def _subscribe(self) -> None:
        """Listen for finish hints, once, if the store sends them."""
        if self._hints is not None or self._subscribing:
            return
        if not isinstance(self._storage, FinishSource):
            return
        self._subscribing = True
        try:
            self._hints = await self._storage.subscribe_finishes(self._hinted)
        except Exception as exc:  # polling covers it
            logger.warning("could not listen for finished runs (%s); polling instead", exc)

    async def close(self) -> None:
        """Stop reading; waiters still waiting are told the engine closed."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        hints, self._hints = self._hints, None
        if hints is not None:
            with contextlib.suppress(Exception):
                await hints.close()
        self._fail_all(EngineClosedError("result"))

    def _fail_all(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        self._pause.clear()
        self._next.clear()
        self._schedule.clear()
        self._dirty.clear()
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    def _due(self, now: float) -> list[str]:
        """The runs to read now: the dirty ones and those whose pause ended."""
        due = self._dirty
        self._dirty = set()
        schedule = self._schedule
        while schedule and schedule[0][0] <= now:
            at, run_id = heapq.heappop(schedule)
            if self._next.get(run_id) == at:
                due.add(run_id)
        return [run_id for run_id in due if run_id in self._waiting]

    def _told_of(self, workflow: str) -> bool:
        """Whether the end of a run of ``workflow`` will be told to this
        reader: the store's finish hints reach it, or this engine's worker
        runs the workflow and tells of the ends it makes itself."""
        if self._hints is not None and getattr(self._hints, "live", True):
            return True
        return self._runs_here is not None and self._runs_here(workflow)

    def _ready(self, now: float) -> bool:
        """Whether some run is to be read now."""
        return bool(self._dirty) or bool(self._schedule and self._schedule[0][0] <= now)

    async def _read_loop(self) -> None:
        await self._subscribe()
        loop = asyncio.get_running_loop()
        while self._waiting:
            self._kick.clear()
            now = loop.time()
            starts = self._read_starts
            if len(starts) == BURST and self._ready(now):
                # At most BURST reads per BURST ticks: what comes meanwhile
                # is read together.
                allowed = starts[0] + BURST * MIN_GAP
                if allowed > now:
                    await asyncio.sleep(allowed - now)
                    continue
            ids = self._due(now)
            if not ids:
                timeout = None
                if self._schedule:
                    timeout = max(self._schedule[0][0] - loop.time(), 0)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._kick.wait()
                continue
            starts.append(now)
            try:
                records = await self._read(ids)
            except Exception as exc:
                # Each waiter would have met this error on its own read.
                self._fail_all(exc)
                return
            now = loop.time()
            for run_id in ids:
                record = records.get(run_id)
                if record is not None and record.status not in TERMINAL_STATUSES:
                    pause = self._pause.get(run_id)
                    if pause is not None:  # still waited for: read again later
                        if self._told_of(record.workflow):
                            pause = self._poll  # its end is told: this covers a lost hint
                        at = now + pause
                        self._next[run_id] = at
                        heapq.heappush(self._schedule, (at, run_id))
                        self._pause[run_id] = min(pause * 2, self._poll)
                    continue
                futures = self._waiting.get(run_id, [])
                self._drop(run_id)
                for future in futures:
                    if future.done():
                        continue
                    if record is None:
                        future.set_exception(RunNotFoundError(run_id))
                    else:
                        future.set_result(record)
            if len(self._schedule) > 2 * len(self._next) + 64:
                # Entries of runs no longer waited for, or read sooner: drop them.
                self._schedule = [(at, i) for at, i in self._schedule if self._next.get(i) == at]
                heapq.heapify(self._schedule)

    async def _read(self, ids: Sequence[str]) -> dict[str, RunRecord]:
        found: dict[str, RunRecord] = {}
        self.runs_read += len(ids)
        if self._batches:
            try:
                for start in range(0, len(ids), MAX_GET_RUNS):
                    self.reads += 1
                    found.update(await self._storage.get_runs(ids[start : start + MAX_GET_RUNS]))
                return found
            except NotImplementedError:
                self._batches = False  # an adapter without the batches area
        self.reads += 1
        for run_id in ids:
            record = await self._storage.get_run(run_id)
            if record is not None:
                found[run_id] = record
        return found


ReturnWhen = Literal["FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"]
"""When :meth:`~reflow_core.engine.Engine.wait` returns (the values of
:data:`asyncio.FIRST_COMPLETED`, :data:`asyncio.FIRST_EXCEPTION` and
:data:`asyncio.ALL_COMPLETED`, which may be passed instead)."""

RETURN_WHEN: frozenset[str] = frozenset(get_args(ReturnWhen))


def check_wait_args(run_ids: Iterable[str], return_when: object) -> list[str]:
    """The distinct run ids of a :meth:`~reflow_core.engine.Engine.wait` call,
    in the order first given; a :class:`ConfigError` for a bad argument."""
    if isinstance(run_ids, str):
        raise ConfigError(
            "run_ids must be a collection of run ids, not one string", option="run_ids"
        )
    if not isinstance(return_when, str) or return_when not in RETURN_WHEN:
        raise ConfigError(
            f"return_when must be one of {', '.join(sorted(RETURN_WHEN))}, not {return_when!r}",
            option="return_when",
        )
    return list(dict.fromkeys(check_text(run_id, "run_id") for run_id in run_ids))


async def wait_records(
    watcher: RunWatcher, run_ids: list[str], return_when: str, timeout: float | None
) -> tuple[list[RunRecord], list[str]]:
    """The finished records among ``run_ids`` (in their order) and the ids of
    those still unfinished, once ``return_when`` holds or ``timeout`` passed."""
    futures = {run_id: watcher.watch(run_id) for run_id in run_ids}
    try:
        remaining = set(futures.values())
        async with asyncio.timeout(timeout):
            if return_when == "FIRST_EXCEPTION":
                # Finished runs resolve their futures, failed or not: look
                # at each as it ends.
                while remaining:
                    done, remaining = await asyncio.wait(
                        remaining, return_when=asyncio.FIRST_COMPLETED
                    )
                    if any(future.result().status != "completed" for future in done):
                        break
            else:
                # A future fails only for a missing run or a failed read:
                # that ends the wait at once.
                await asyncio.wait(
                    remaining,
                    return_when=asyncio.FIRST_COMPLETED
                    if return_when == "FIRST_COMPLETED"
                    else asyncio.FIRST_EXCEPTION,
                )
    except TimeoutError:
        pass
    finally:
        for run_id, future in futures.items():
            watcher.forget(run_id, future)
            if not future.done():
                future.cancel()
    done_records: list[RunRecord] = []
    pending: list[str] = []
    for run_id, future in futures.items():
        if future.cancelled():
            pending.append(run_id)
        else:
            # A missing run, a failed read, a closed engine raise here.
            done_records.append(future.result())
    return done_records, pending
