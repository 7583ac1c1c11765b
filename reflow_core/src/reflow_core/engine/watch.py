"""One reader for every waiter of an engine: the runs that :meth:`Engine.result`
calls wait for are read together, a batch of up to
:data:`~reflow_core.storage.MAX_GET_RUNS` per round trip
(:meth:`~reflow_core.storage.Storage.get_runs`), however many callers wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from reflow_core.errors import EngineClosedError, RunNotFoundError
from reflow_core.storage import MAX_GET_RUNS, TERMINAL_STATUSES, RunRecord, Storage

__all__ = ["MIN_GAP", "RunWatcher"]

MIN_GAP = 0.01
"""Seconds between two reads at the least: the tick that bounds the reads a
second, whatever the number of waiters."""


class RunWatcher:
    """Reads the runs waited for, all at once, until each has finished.

    A new waiter, or a run this engine finished, makes the next read come at
    once (after :data:`MIN_GAP`); otherwise the pause between reads doubles
    up to ``poll`` seconds, as one waiter's did on its own."""

    def __init__(self, storage: Storage, poll: float) -> None:
        self._storage = storage
        self._poll = poll
        self._waiting: dict[str, list[asyncio.Future[RunRecord]]] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches = True
        self.reads = 0
        """Round trips made (for tests and metrics)."""

    def watch(self, run_id: str) -> asyncio.Future[RunRecord]:
        """A future of the run's record once it has finished; it fails with
        :class:`RunNotFoundError` if there is no such run (or it was purged),
        or with the storage's error if a read fails."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RunRecord] = loop.create_future()
        self._waiting.setdefault(run_id, []).append(future)
        self._kick.set()
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
            del self._waiting[run_id]

    def finished(self, run_id: str) -> None:
        """This engine finished ``run_id``: read it now if someone waits for it."""
        if run_id in self._waiting:
            self._kick.set()

    async def close(self) -> None:
        """Stop reading; waiters still waiting are told the engine closed."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        self._fail_all(EngineClosedError("result"))

    def _fail_all(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def _read_loop(self) -> None:
        pause = MIN_GAP
        while self._waiting:
            self._kick.clear()
            ids = list(self._waiting)
            try:
                records = await self._read(ids)
            except Exception as exc:
                # Each waiter would have met this error on its own read.
                self._fail_all(exc)
                return
            for run_id in ids:
                record = records.get(run_id)
                if record is not None and record.status not in TERMINAL_STATUSES:
                    continue
                for future in self._waiting.pop(run_id, ()):
                    if future.done():
                        continue
                    if record is None:
                        future.set_exception(RunNotFoundError(run_id))
                    else:
                        future.set_result(record)
            if not self._waiting:
                return
            await asyncio.sleep(MIN_GAP)
            if self._kick.is_set():
                pause = MIN_GAP
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(pause - MIN_GAP, 0)):
                    await self._kick.wait()
            pause = MIN_GAP if self._kick.is_set() else min(pause * 2, self._poll)

    async def _read(self, ids: Sequence[str]) -> dict[str, RunRecord]:
        self.reads += 1
        found: dict[str, RunRecord] = {}
        if self._batches:
            try:
                for start in range(0, len(ids), MAX_GET_RUNS):
                    found.update(await self._storage.get_runs(ids[start : start + MAX_GET_RUNS]))
                return found
            except NotImplementedError:
                self._batches = False  # an adapter without the batches area
        for run_id in ids:
            record = await self._storage.get_run(run_id)
            if record is not None:
                found[run_id] = record
        return found
