"""The worker: claims runs, keeps their leases alive, and hands them back on stop.

A :class:`Worker` belongs to one :class:`~reflow_core.engine.Engine`. It keeps
up to ``concurrency`` runs in flight, refills a freed slot at once while work
is waiting, wakes on the storage's hints (when it gives any) and polls
otherwise, fires due schedules, renews the leases of its runs, and on
:meth:`Worker.stop` drains them. Each claimed run is driven by the engine's
:class:`~reflow_core.engine.driver.RunDriver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import random
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from reflow_core import codec
from reflow_core._tasks import cancel_and_wait, raise_if_cancelled
from reflow_core.errors import ReflowError
from reflow_core.limits import RunShape
from reflow_core.schedules import Scheduler
from reflow_core.storage import (
    ClaimedRun,
    RunRecord,
    Storage,
    WakeupSource,
    WakeupSubscription,
)
from reflow_core.workflow import Workflow

from .driver import InFlight, LeaseLost, RunDriver
from .presence import Presence
from .views import Clock

__all__ = ["Worker"]

logger = logging.getLogger("reflow.engine")

_PURGE_EVERY = 60.0
"""Seconds between retention passes (a tenth of a shorter retention)."""
_PURGE_LIMIT = 1000
"""Runs one retention pass deletes at most."""
_PURGE_BATCH = 250
"""Runs deleted per storage transaction in a retention pass."""
_UNSERVED_CHECK_EVERY = 60.0
"""Seconds between looks for runs of workflows no worker serves (a fifth
of a shorter ``warn_unserved_after``, no less than the poll interval)."""
_UNSERVED_SAMPLE = 100
"""The newest pending runs read by one such look."""
_SCHEDULE_BATCH = 100
_LOGGED_REPEATS = frozenset({1, 10, 100})
"""Which repeats of an unexpected error from firing schedules are logged
(then every thousandth), so a storage lacking schedules does not flood the log."""
"""Due schedules fired per look; a full batch makes the dispatcher look again at once."""
_HINT_GAP_MIN = 0.002
_HINT_GAP_MAX = 0.05
"""After claims that came back empty, a storage wake-up hint is acted on no
sooner than this gap (seconds, doubling per empty claim up to the maximum)
after the last empty one. Another worker took that work; when many workers
share one notification channel, this keeps a burst of hints from sending
every idle worker into the claim query for each of them."""
_HINT_GAPS = tuple(
    min(_HINT_GAP_MIN * 2**n, _HINT_GAP_MAX)
    for n in range(int(math.log2(_HINT_GAP_MAX / _HINT_GAP_MIN)) + 2)
)
"""The gap after 1, 2, ... empty claims; the last one holds from then on."""


class Worker:
    """The claim loop of one engine, and the runs it holds."""

    def __init__(
        self,
        *,
        storage: Storage,
        workflows: Mapping[str, Workflow[Any, Any]],
        driver: RunDriver,
        versions: Mapping[str, Mapping[int, Workflow[Any, Any]]] | None = None,
        concurrency: int,
        claim_batch: int,
        lease: timedelta,
        heartbeat: float,
        poll: float,
        clock: Clock,
        scheduler: Scheduler,
        retention: timedelta | None = None,
        unserved_after: float | None = None,
    ) -> None:
        self._storage = storage
        self._workflows = workflows
        self._versions: Mapping[str, Mapping[int, Workflow[Any, Any]]] = versions or {}
        self._filters_versions: tuple[Storage, bool] | None = None
        """The storage, and whether its ``claim_runs`` takes ``versions``."""
        self._driver = driver
        self._concurrency = concurrency
        self._claim_batch = claim_batch
        self._lease = lease
        self._heartbeat = heartbeat
        self._poll = poll
        self._clock = clock
        self._scheduler = scheduler
        self._retention = retention
        self._purger: asyncio.Task[None] | None = None
        self._unserved_after = unserved_after
        self._unserved_checker: asyncio.Task[None] | None = None
        self._unserved_warned: set[str] = set()
        """Workflows already warned about: each is logged once per worker."""
        self._unserved_suspects: dict[str, str] = {}
        """For each workflow not served here with pending runs not yet old
        enough to warn about: the oldest such run seen, to look at again."""
        self.inflight: dict[str, InFlight] = {}
        """The runs this worker holds, by id."""
        self.wake = asyncio.Event()
        """Set to make the dispatcher look for work now (local enqueues, events)."""
        self._dispatcher: asyncio.Task[None] | None = None
        self._heartbeater: asyncio.Task[None] | None = None
        self._wakeups: WakeupSubscription | None = None
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._more_work = False
        self._empty_claims = 0
        self._adapter_errors = 0
        self._last_empty_claim = 0.0
        self._hint_timer: asyncio.TimerHandle | None = None
        self._due_timer: asyncio.TimerHandle | None = None
        self.presence = Presence(
            storage,
            describe=lambda: (tuple(self._workflows), self._concurrency, len(self.inflight)),
            every=heartbeat,
            ttl=lease,
        )
        """This worker's entry in the storage's worker registry, while it runs."""

    @property
    def running(self) -> bool:
        """True while the claim loop started by :meth:`start` is running."""
        return self._dispatcher is not None and not self._dispatcher.done()

    @property
    def served(self) -> Mapping[str, Workflow[Any, Any]]:
        """The workflows this worker claims runs of."""
        return self._workflows

    def served_versions(self) -> dict[str, range | tuple[int, ...]]:
        """The versions of each served workflow this worker takes runs of:
        those it registers, and, unless its current definition says
        ``on_incompatible="old_version"``, every older one too (each checked
        when claimed). Never a version newer than its current one."""
        served: dict[str, range | tuple[int, ...]] = {}
        for name, wf in self._workflows.items():
            if wf.on_incompatible == "old_version":
                served[name] = tuple(self._versions.get(name, {wf.version: wf})) or (wf.version,)
            else:
                served[name] = range(1, wf.version + 1)
        return served

    def configure(
        self,
        *,
        concurrency: int,
        claim_batch: int,
        workflows: Mapping[str, Workflow[Any, Any]] | None,
    ) -> None:
        """Before :meth:`start`: the runs to keep in flight, the claim batch,
        and (unless ``None``) the workflows to claim runs of, instead of every
        one the engine has."""
        self._concurrency = concurrency
        self._claim_batch = claim_batch
        if workflows is not None:
            self._workflows = workflows

    def ensure_background(self) -> None:
        """Start the step threads and the heartbeat loop, if not running."""
        if self._driver.executor is None:
            self._driver.executor = ThreadPoolExecutor(
                max_workers=self._concurrency + 4, thread_name_prefix="reflow-step"
            )
        if self._heartbeater is None or self._heartbeater.done():
            self._heartbeater = asyncio.create_task(self._heartbeat_loop(), name="reflow-heartbeat")

    async def start(self) -> None:
        """Start claiming (the storage is initialized by the engine)."""
        if self.running:
            return
        self._stopping = False
        self.ensure_background()
        await self._subscribe_wakeups()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="reflow-dispatch")
        self.presence.start()
        if self._retention is not None and self._purger is None:
            self._purger = asyncio.create_task(
                self._retention_loop(self._retention), name="reflow-retention"
            )
        if self._unserved_after is not None and self._unserved_checker is None:
            self._unserved_checker = asyncio.create_task(
                self._unserved_loop(self._unserved_after), name="reflow-unserved-check"
            )

    async def _subscribe_wakeups(self) -> None:
        """Let a backend that can tell when work arrives wake the dispatcher,
        so polling is only the fallback. A failure leaves polling alone."""
        if self._wakeups is not None or not isinstance(self._storage, WakeupSource):
            return
        try:
            self._wakeups = await self._storage.subscribe_wakeups(
                self._workflows.keys(), self._hinted
            )
        except ReflowError as exc:
            logger.warning("wake-ups unavailable (%s); polling every %gs", exc, self._poll)

    async def stop(self, grace: float) -> None:
        """Stop claiming, let in-flight runs finish for up to ``grace``
        seconds, then hand the rest back to the storage as ``pending``."""
        self._stopping = True
        self.wake.set()
        wakeups, self._wakeups = self._wakeups, None
        if wakeups is not None:
            with contextlib.suppress(ReflowError):
                await wakeups.close()
        if self._hint_timer is not None:
            self._hint_timer.cancel()
            self._hint_timer = None
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        self._slot_freed.set()
        if self._purger is not None:
            await cancel_and_wait(self._purger)
            self._purger = None
        if self._unserved_checker is not None:
            await cancel_and_wait(self._unserved_checker)
            self._unserved_checker = None
        if self._dispatcher is not None:
            # Let a claim in progress complete instead of cancelling it: the
            # storage may already have handed its runs over, and they must be
            # handed back below, not left leased to nobody. The loop exits at
            # its next check of _stopping; a claim that outlasts a lease is moot.
            await asyncio.wait({self._dispatcher}, timeout=self._lease.total_seconds())
            await cancel_and_wait(self._dispatcher)
            self._dispatcher = None
        tasks = [s.task for s in self.inflight.values() if s.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for state in list(self.inflight.values()):
            state.interrupt("shutdown")
        tasks = [s.task for s in self.inflight.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        if self._heartbeater is not None:
            await cancel_and_wait(self._heartbeater)
            self._heartbeater = None
        await self.presence.leave()
        if self._driver.executor is not None:
            self._driver.executor.shutdown(wait=False, cancel_futures=True)
            self._driver.executor = None

    # -- claiming -----------------------------------------------------------

    def _run_shape(self, name: str, text: str) -> RunShape:
        """The priority and limits of a scheduled run of workflow ``name``
        with encoded input ``text`` (no key limit for an input that no
        longer validates: the run fails when it is claimed)."""
        wf = self._workflows[name]
        try:
            shape = wf.flow.shape(name, wf.validate_input(codec.decode(text)))
        except ReflowError:
            shape = wf.flow.workflow_shape(name)
        return dataclasses.replace(shape, version=wf.version, fingerprint=wf.fingerprint)

    async def tick(self) -> int:
        """Fire due schedules, claim one batch, run it to the end; how many runs."""
        self.ensure_background()
        await self._fire_schedules(force=True)
        claimed = await self._claim()
        tasks = [self._spawn(c) for c in claimed]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(claimed)

    async def _claim(self) -> list[ClaimedRun]:
        free = self._concurrency - len(self.inflight)
        if free <= 0 or not self._workflows:
            return []
        limit = min(free, self._claim_batch)
        names = list(self._workflows)
        began = time.perf_counter()
        if self._filters_versions is None or self._filters_versions[0] is not self._storage:
            self._filters_versions = (self._storage, _takes_versions(self._storage))
        if self._filters_versions[1]:
            claimed = await self._storage.claim_runs(
                names, limit, self._lease, versions=self.served_versions()
            )
        else:
            claimed = await self._storage.claim_runs(names, limit, self._lease)
        self._driver.observers.scopes.claimed(names, len(claimed), time.perf_counter() - began)
        self._more_work = len(claimed) == limit
        return claimed

    async def _fire_schedules(self, *, force: bool = False) -> None:
        """Fire due schedules of this engine's workflows: at most once per poll
        interval, or sooner when a slot known here falls due, unless ``force``.
        A look reads the storage's clock, by which slots are computed.
        Storage trouble is logged and retried at a later look."""
        if not self._workflows:
            return
        if not force and not self._scheduler.should_check(self._clock.now()):
            return
        try:
            deadlines = {n: w.timeout for n, w in self._workflows.items() if w.timeout is not None}
            fired = await self._scheduler.fire_due(
                self._storage, self._workflows, _SCHEDULE_BATCH, deadlines, self._run_shape
            )
        except ReflowError as exc:
            logger.warning("firing schedules failed (%s); retrying at the next poll", exc)
            return
        except Exception:  # an adapter bug: say so, and keep claiming runs
            self._adapter_errors += 1
            if self._adapter_errors in _LOGGED_REPEATS or self._adapter_errors % 1000 == 0:
                logger.exception(
                    "firing schedules failed: the storage raised an unexpected error "
                    "(%d so far); runs are still claimed, schedules retried at the next poll",
                    self._adapter_errors,
                )
            return
        if fired:
            self.wake.set()

    def _spawn(self, claimed: ClaimedRun) -> asyncio.Task[None]:
        state = InFlight(lease=claimed.lease, renewed_at=time.monotonic())
        self.inflight[claimed.run.id] = state
        task = asyncio.create_task(
            self._run_claimed(claimed, state), name=f"reflow-run-{claimed.run.id}"
        )
        state.task = task
        return task

    async def _dispatch_loop(self) -> None:
        failures = 0
        while not self._stopping:
            raise_if_cancelled()
            if len(self.inflight) >= self._concurrency:
                # Wake up for due schedules even while every slot is busy.
                await self._fire_schedules()
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._schedule_wait(self._poll)):
                        await self._slot_freed.wait()
                continue
            # A wake-up (a storage hint, a local enqueue, a freed slot with
            # work waiting) says work is there: claim it first, and look at
            # the schedules (a round trip once per poll interval) after the
            # claimed runs have started. A timed look (the poll, a schedule
            # slot) fires the schedules first, so their runs join this claim.
            woken = self.wake.is_set()
            if not woken:
                await self._fire_schedules()
            self.wake.clear()
            try:
                claimed = await self._claim()
                failures = 0
            except ReflowError as exc:
                failures += 1
                delay = min(self._poll * 2 ** min(failures, 6), 30.0)
                logger.warning("claim failed (%s); retrying in %.1fs", exc, delay)
                await self._idle(delay)
                continue
            except Exception:  # an adapter bug: say so, and keep the loop alive
                failures += 1
                delay = min(self._poll * 2 ** min(failures, 6), 30.0)
                logger.exception(
                    "claim failed: the storage raised an unexpected error; retrying in %.1fs",
                    delay,
                )
                await self._idle(delay)
                continue
            if claimed:
                # Halve rather than reset: a worker that wins now and then in
                # a contested burst keeps some of its gap.
                self._empty_claims //= 2
            else:
                # Bounded: past the longest gap, more empty claims change nothing.
                self._empty_claims = min(self._empty_claims + 1, len(_HINT_GAPS))
                self._last_empty_claim = time.monotonic()
            for c in claimed:
                self._spawn(c)
            if woken and not self._stopping:
                if claimed:
                    # Let the claimed runs reach their first await before
                    # a look at the schedules sends anything.
                    await asyncio.sleep(0)
                await self._fire_schedules()
            if not self._more_work:
                # The queue looked empty: wait for local work, the next poll
                # or the next schedule slot known here.
                await self._idle(self._schedule_wait(self._poll * random.uniform(0.9, 1.1)))

    def _hinted(self, *_: object) -> None:
        """A wake-up hint from the storage: work may be ready elsewhere.

        Acted on at once, unless this worker's last claims found nothing
        (other workers are taking the work): then no sooner than a short,
        growing gap after the last empty claim. Local work (this engine's
        own enqueues, freed slots) never waits for the gap."""
        if self.wake.is_set() or self._hint_timer is not None:
            return
        if self._empty_claims:
            gap = _HINT_GAPS[min(self._empty_claims, len(_HINT_GAPS)) - 1]
            delay = self._last_empty_claim + gap - time.monotonic()
            if delay > 0:
                self._hint_timer = asyncio.get_running_loop().call_later(delay, self._hint_due)
                return
        self.wake.set()

    def wake_in(self, seconds: float) -> None:
        """Look for work in ``seconds`` (a delayed run enqueued here falls
        due then). Only the earliest such moment is kept: a later one is
        found by the poll, or by the storage's wake-up hints."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(seconds, 0.0)
        timer = self._due_timer
        if timer is not None and loop.time() <= timer.when() <= when:
            return  # an earlier look is already set
        if timer is not None:
            timer.cancel()
        self._due_timer = loop.call_at(when, self.wake.set)

    def _hint_due(self) -> None:
        self._hint_timer = None
        self.wake.set()

    def _schedule_wait(self, seconds: float) -> float:
        # The scheduler corrects the engine's clock by the storage's offset.
        return self._scheduler.wait(self._clock.now(), seconds)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.wake.wait()

    # -- retention ------------------------------------------------------------

    async def _retention_loop(self, keep: timedelta) -> None:
        """Purge runs finished longer ago than ``keep``: a pass about once a
        minute (a tenth of a short retention), each deleting at most
        ``_PURGE_LIMIT`` runs; a pass that hit the limit is followed by
        another one a poll interval later."""
        interval = min(_PURGE_EVERY, max(keep.total_seconds() / 10, self._poll))
        pause = min(interval, self._poll)  # a first pass soon after start
        while True:
            raise_if_cancelled()
            await asyncio.sleep(pause * random.uniform(0.9, 1.1))
            pause = interval
            try:
                deleted = await self._storage.purge_finished(
                    keep, batch=_PURGE_BATCH, limit=_PURGE_LIMIT
                )
            except ReflowError as exc:
                logger.warning("purging finished runs failed (%s); retrying later", exc)
                continue
            if deleted:
                logger.info("purged %d runs finished more than %s ago", deleted, keep)
            if deleted >= _PURGE_LIMIT:
                pause = self._poll

    # -- runs nobody serves ---------------------------------------------------

    async def _unserved_loop(self, after: float) -> None:
        """Now and then, look for pending runs of workflows this worker does
        not serve that have waited longer than ``after`` seconds, and warn
        once per workflow. Never part of a claim."""
        interval = min(_UNSERVED_CHECK_EVERY, max(after / 5, self._poll))
        pause = min(interval, self._poll)  # a first look soon after start
        while True:
            raise_if_cancelled()
            await asyncio.sleep(pause * random.uniform(0.9, 1.1))
            pause = interval
            try:
                await self.check_unserved(after)
            except ReflowError as exc:
                logger.debug("looking for runs no worker serves failed (%s)", exc)

    async def check_unserved(self, after: float) -> None:
        """One look: the newest pending runs (one read), and, while runs of a
        workflow not served here were seen that were too young to warn
        about, the oldest of them again at the next look (one read each).

        A run counts from when it last became pending (its ``updated_at``,
        or its ``wake_at`` if later), by the storage's clock."""
        page = await self._storage.list_runs(status=["pending"], limit=_UNSERVED_SAMPLE)
        oldest: dict[str, RunRecord] = {}
        counts: dict[str, int] = {}
        for record in page.runs:
            name = record.workflow
            if name in self._workflows or name in self._unserved_warned:
                continue
            counts[name] = counts.get(name, 0) + 1
            known = oldest.get(name)
            if known is None or _pending_since(record) < _pending_since(known):
                oldest[name] = record
        for name, run_id in list(self._unserved_suspects.items()):
            if name in self._workflows or name in self._unserved_warned:
                del self._unserved_suspects[name]
                continue
            if name in oldest and oldest[name].id == run_id:
                continue
            earlier = await self._storage.get_run(run_id)
            if earlier is None or earlier.status != "pending":
                del self._unserved_suspects[name]
                continue
            if name not in oldest or _pending_since(earlier) < _pending_since(oldest[name]):
                oldest[name] = earlier
            counts[name] = counts.get(name, 0) or 1
        if not oldest:
            return
        now = await self._storage.now()
        for name, record in oldest.items():
            waited = (now - _pending_since(record)).total_seconds()
            if waited < after:
                self._unserved_suspects[name] = record.id
                continue
            self._unserved_suspects.pop(name, None)
            self._unserved_warned.add(name)
            serves = ", ".join(repr(n) for n in sorted(self._workflows)) or "no workflows"
            logger.warning(
                "runs of workflow %r are waiting and no worker has claimed them: run %s has "
                "been pending for %.0fs (%d such run(s) among the newest pending); this worker "
                "does not serve %r (it serves: %s): is it registered on a running worker, "
                "under this name?",
                name,
                record.id,
                waited,
                counts[name],
                name,
                serves,
            )

    # -- leases ---------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [s for s in self.inflight.values() if now - s.renewed_at >= self._heartbeat]
            if due:
                await asyncio.gather(*(self._renew(s) for s in due))
            raise_if_cancelled()
            pending = [s.renewed_at + self._heartbeat for s in self.inflight.values()]
            wait = min(pending, default=now + self._heartbeat) - time.monotonic()
            await asyncio.sleep(min(max(wait, 0.01), self._heartbeat))

    async def _renew(self, state: InFlight) -> None:
        started = time.monotonic()
        try:
            ok = await self._storage.heartbeat_run(state.lease, self._lease)
        except ReflowError as exc:
            logger.warning("heartbeat for run %s failed: %s", state.lease.run_id, exc)
            return
        if ok:
            state.renewed_at = max(state.renewed_at, started)
        elif state.stop_reason is None and state.task is not None and not state.task.done():
            logger.warning(
                "lease on run %s was lost; stopping its step and writing nothing more",
                state.lease.run_id,
            )
            state.interrupt("lease_lost")

    async def _run_claimed(self, claimed: ClaimedRun, state: InFlight) -> None:
        run_id = claimed.run.id
        state.started = True
        try:
            if state.stop_reason is not None:  # interrupted before it started
                raise asyncio.CancelledError
            await self._driver.drive(claimed, state)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if state.stop_reason is None or task is None:
                raise
            task.uncancel()
            if state.stop_reason == "shutdown":
                with contextlib.suppress(ReflowError):
                    await self._storage.update_run_status(run_id, "pending", lease=state.lease)
        except LeaseLost:
            logger.warning("lease on run %s was lost; another worker may own it", run_id)
        except ReflowError as exc:
            # Storage trouble mid-run: the lease will lapse and the run is reclaimed.
            logger.error("run %s stopped: %s", run_id, exc)
        except Exception:  # an engine bug; never let it kill the worker
            logger.exception("run %s stopped by an unexpected error", run_id)
        finally:
            self.inflight.pop(run_id, None)
            if self._more_work:
                self.wake.set()
            self._slot_freed.set()


def _pending_since(record: RunRecord) -> datetime:
    """When a pending run became claimable: when it last became pending, or
    its ``wake_at`` if that is later."""
    if record.wake_at is not None and record.wake_at > record.updated_at:
        return record.wake_at
    return record.updated_at


def _takes_versions(storage: Storage) -> bool:
    """Whether ``storage.claim_runs`` can be passed ``versions`` (every
    adapter of this release; not one written before the parameter), judged
    by its signature. A signature that cannot be read counts as this
    release's. Without it, runs of every version are claimed, and the
    driver hands back the ones this worker does not serve."""
    try:
        signature = inspect.signature(storage.claim_runs)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind((), 1, timedelta(seconds=1), versions=None)
    except TypeError:
        logger.warning(
            "%s.claim_runs takes no versions: runs of every version of a workflow are "
            "claimed, and those of versions this worker does not serve are handed back; "
            "update the adapter to claim_runs(workflows, limit, lease, *, versions=None)",
            type(storage).__name__,
        )
        return False
    return True
