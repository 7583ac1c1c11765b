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
import logging
from collections.abc import Collection, Iterable, Sequence
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

__all__ = ["MIN_GAP", "RETURN_WHEN", "ReturnWhen", "RunWatcher", "check_wait_args", "wait_records"]

logger = logging.getLogger("reflow.engine")

MIN_GAP = 0.01
"""Seconds between two reads at the least: the tick that bounds the reads a
second, whatever the number of waiters."""


class RunWatcher:
    """Reads the runs waited for, all at once, until each has finished.

    A new waiter, a run this engine finished, or a finish hint naming a run
    waited for makes the next read come at once (after :data:`MIN_GAP`);
    otherwise the pause between reads doubles up to ``poll`` seconds, as one
    waiter's did on its own."""

    def __init__(self, storage: Storage, poll: float) -> None:
        self._storage = storage
        self._poll = poll
        self._waiting: dict[str, list[asyncio.Future[RunRecord]]] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches = True
        self._hints: WakeupSubscription | None = None
        self._subscribing = False
        self.hinted = 0
        """Finish hints that named a run waited for (for tests and metrics)."""
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

    def _hinted(self, run_ids: Collection[str] | None) -> None:
        """A finish hint from the store: read now if it concerns a run waited for."""
        if not self._waiting:
            return
        if run_ids is None or any(run_id in self._waiting for run_id in run_ids):
            self.hinted += 1
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
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def _read_loop(self) -> None:
        await self._subscribe()
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
