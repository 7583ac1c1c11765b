"""Helpers for backends that wake idle workers (see :class:`~reflow_core.storage.WakeupSource`).

A networked backend tells workers about new work with *hints*: short text
messages ``"<delay_ms>|<workflow>"`` sent on a channel of the store
(PostgreSQL ``NOTIFY``, Redis pub/sub). ``0|orders`` says a run of
``orders`` is claimable now; ``90000|orders`` says one falls due in 90
seconds by the store's clock; an empty workflow wakes every subscriber.

:class:`WakeupHub` is everything but the channel itself: it keeps the
subscriptions, wakes the subscribers a hint concerns, arms a timer for hints
about the future, and after a timer fires asks the store (``next_due``) when
the next sleeping or waiting run falls due, so sleeps that began before this
worker started are found too. A backend subclasses it and implements
:meth:`WakeupHub.listen`, a coroutine that connects, subscribes, calls
:meth:`WakeupHub.connected_now` and feeds every message to
:meth:`WakeupHub.hint` until the connection fails; the hub then reconnects with
jittered back-off.

A second channel carries *finish hints*: the ids of runs that reached a
terminal status, one per line (:func:`finish_payloads`), sent by the same
statement or script that ended them. Engines waiting for results subscribe
with :meth:`WakeupHub.subscribe_finishes`; the backend's listener then also
listens to that channel and feeds its messages to
:meth:`WakeupHub.finish_hint`. Each channel is listened to only while
someone subscribes to it, so workers that wait for no result never receive
the finishes of the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from ._tasks import cancel_and_wait

__all__ = ["FINISH_SEPARATOR", "WakeupHub", "finish_payloads", "hint_payload", "parse_finish_hint"]

logger = logging.getLogger("reflow.wakeups")

MIN_TIMER = 0.002
"""Due times closer than this (seconds) wake at once."""
MAX_BACKOFF = 5.0
"""The longest pause between reconnection attempts (seconds)."""
MAX_HINT_DELAY_MS = 86_400_000
"""Hints about work due later than this (a day) arm a timer for a day: the
timer's look at the store finds the real due time then."""


def hint_payload(workflow: str, delay_ms: int = 0) -> str:
    """The hint text for ``workflow``, due in ``delay_ms`` milliseconds."""
    return f"{max(0, int(delay_ms))}|{workflow}"


FINISH_SEPARATOR = "\n"
"""What separates the run ids of a finish hint."""
MAX_FINISH_ID = 1000
"""Run ids longer than this (in UTF-8 bytes) are sent as an empty entry."""
MAX_FINISH_PAYLOAD = 7900
"""The longest finish hint, in UTF-8 bytes (PostgreSQL's ``NOTIFY`` takes 8000)."""


def finish_payloads(run_ids: Iterable[str]) -> list[str]:
    """The finish hints telling that ``run_ids`` ended: their ids joined by
    :data:`FINISH_SEPARATOR`, as few hints as fit :data:`MAX_FINISH_PAYLOAD`.
    An id that holds the separator or is longer than :data:`MAX_FINISH_ID`
    is sent as an empty entry, which tells listeners to look at every run
    they wait for."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = 0
    for run_id in run_ids:
        length = len(run_id.encode())
        if length > MAX_FINISH_ID or FINISH_SEPARATOR in run_id:
            run_id, length = "", 0
        if chunk and size + length + 1 > MAX_FINISH_PAYLOAD:
            payloads.append(FINISH_SEPARATOR.join(chunk))
            chunk, size = [], 0
        chunk.append(run_id)
        size += length + 1
    if chunk:
        payloads.append(FINISH_SEPARATOR.join(chunk))
    return payloads


def parse_finish_hint(payload: str) -> list[str] | None:
    """The run ids a finish hint names, or ``None`` when it holds an empty
    entry (some run ended whose id could not be sent: look at them all)."""
    ids = payload.split(FINISH_SEPARATOR)
    return None if "" in ids else ids


class _Subscription:
    def __init__(
        self, hub: WakeupHub, workflows: Collection[str], wake: Callable[[], None]
    ) -> None:
        self._hub = hub
        self.workflows = workflows
        self.wake = wake

    async def close(self) -> None:
        self._hub.unsubscribe(self)


class _FinishSubscription:
    def __init__(self, hub: WakeupHub, notify: Callable[[Collection[str] | None], None]) -> None:
        self._hub = hub
        self.notify = notify

    @property
    def live(self) -> bool:
        """Whether hints reach this subscription now: the channel is
        subscribed (not with listening off, nor while reconnecting)."""
        return self._hub.connected.is_set()

    async def close(self) -> None:
        self._hub.unsubscribe_finishes(self)


class WakeupHub:
    """Subscriptions, hint dispatch and due timers for one storage's channel.

    ``next_due(workflows)`` returns the seconds until the next sleeping or
    waiting run of those workflows falls due by the store's clock, or
    ``None``. ``describe`` names the channel in log messages (never a secret).
    """

    def __init__(
        self,
        *,
        next_due: Callable[[list[str]], Awaitable[float | None]],
        describe: str,
        enabled: bool = True,
    ) -> None:
        self._next_due = next_due
        self._describe = describe
        self._enabled = enabled
        self._subs: list[_Subscription] = []
        self._finish_subs: list[_FinishSubscription] = []
        self._listening = (False, False)
        self._handover: tuple[asyncio.Task[None], tuple[bool, bool]] | None = None
        self._subscribed: asyncio.Task[Any] | None = None
        """The connection (its task) that last subscribed."""
        """The connection a new one replaces, and the channels it listens to,
        until the new one is subscribed."""
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._refreshing: asyncio.Task[None] | None = None
        self._ever_connected = False
        self._stopped = False
        self._backoff = 0.1
        self.connected = asyncio.Event()
        """Set while the channel is subscribed (for tests and health checks)."""
        self.reconnects = 0
        """How many times the channel was subscribed again after a failure."""

    # -- for the backend --------------------------------------------------------

    async def listen(self) -> None:
        """Connect, subscribe to the channels :meth:`channels_wanted` asks
        for, call :meth:`connected_now`, then feed wake-up messages to
        :meth:`hint` and finish messages to :meth:`finish_hint` until the
        connection fails (raise) or forever."""
        raise NotImplementedError

    def channels_wanted(self) -> tuple[bool, bool]:
        """Whether to listen to the wake-up channel, and to the finish channel:
        each only while someone subscribes to it. The hub connects again if
        a subscriber comes to a channel the connection does not listen to."""
        self._listening = (bool(self._subs), bool(self._finish_subs))
        return self._listening

    def connected_now(self) -> None:
        """Call once subscribed: anything sent meanwhile was lost, so everyone
        looks now; except on the channels of a connection this one replaces
        that listened until now (it is closed here)."""
        covered = (False, False)
        handover = self._handover
        if handover is not None and handover[0] is not asyncio.current_task():
            self._handover = None
            old, channels = handover
            if old is self._subscribed and not old.done():
                covered = channels  # it was subscribed, and still is
            old.cancel()
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._subscribed = asyncio.current_task()
        self._backoff = 0.1
        self.connected.set()
        if not covered[0]:
            self._wake(None)
        if not covered[1]:
            self._tell_finished(None)
        self._refresh_soon()

    def hint(self, payload: str) -> None:
        """Act on one hint message (malformed ones are ignored)."""
        delay_ms, sep, workflow = payload.partition("|")
        if not sep or not delay_ms.isascii() or not delay_ms.isdigit():
            logger.debug("ignoring a malformed wake-up hint %r", payload[:100])
            return
        # Compared as text first: a digit string too long for int() is just "later".
        if len(delay_ms) > len(str(MAX_HINT_DELAY_MS)) or int(delay_ms) > MAX_HINT_DELAY_MS:
            delay_ms = str(MAX_HINT_DELAY_MS)
        delay = int(delay_ms) / 1000
        if delay < MIN_TIMER:
            self._wake(workflow)
        elif workflow == "" or any(workflow in sub.workflows for sub in self._subs):
            self._arm(delay)

    def finish_hint(self, payload: str) -> None:
        """Act on one message of the finish channel: the ids of runs that
        ended, one per line (see :func:`finish_payloads`)."""
        self._tell_finished(parse_finish_hint(payload))

    # -- subscriptions --------------------------------------------------------------

    async def subscribe(
        self, workflows: Collection[str], wake: Callable[[], None]
    ) -> _Subscription:
        sub = _Subscription(self, workflows, wake)
        self._subs.append(sub)
        await self._ensure_listening()
        return sub

    async def subscribe_finishes(
        self, notify: Callable[[Collection[str] | None], None]
    ) -> _FinishSubscription:
        """Call ``notify(run_ids)`` with the ids of runs that ended, and
        ``notify(None)`` when any run may have ended unseen (the channel was
        subscribed anew, or a hint could not name its run)."""
        sub = _FinishSubscription(self, notify)
        self._finish_subs.append(sub)
        await self._ensure_listening()
        return sub

    async def _ensure_listening(self) -> None:
        if not self._enabled:
            return
        task = self._task
        if task is not None and not task.done():
            wakes, finishes = self._listening
            if (wakes or not self._subs) and (finishes or not self._finish_subs):
                return
            # A channel the connection does not listen to is wanted now: a
            # new connection listens to both, and the old one goes on until
            # the new one is subscribed (connected_now closes it), so that
            # no hint on the old one's channels is lost meanwhile.
            if self._handover is not None:
                self._handover[0].cancel()  # the older of two handovers
            self._handover = (task, self._listening)
            self._task = None
        self._stopped = False
        # What the new connection will listen to, so that a subscriber coming
        # before it connects does not connect again: listen() reads the
        # subscriptions as they are when it subscribes (channels_wanted).
        self._listening = (bool(self._subs), bool(self._finish_subs))
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"reflow-wakeups-{self._describe}"
        )

    def unsubscribe(self, sub: _Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)
        if not self._subs and not self._finish_subs:
            self._stop()

    def unsubscribe_finishes(self, sub: _FinishSubscription) -> None:
        with contextlib.suppress(ValueError):
            self._finish_subs.remove(sub)
        if not self._subs and not self._finish_subs:
            self._stop()

    async def close(self) -> None:
        """Drop every subscription and stop listening."""
        self._subs.clear()
        self._finish_subs.clear()
        tasks = [self._task, self._handover[0] if self._handover else None]
        self._stop()
        for task in tasks:
            if task is not None:
                await cancel_and_wait(task)

    def _stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._handover is not None:
            self._handover[0].cancel()
            self._handover = None
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None
        self._disarm()
        self.connected.clear()

    # -- waking -------------------------------------------------------------------

    def _wake(self, workflow: str | None) -> None:
        for sub in list(self._subs):
            if workflow is None or workflow == "" or workflow in sub.workflows:
                try:
                    sub.wake()
                except Exception:
                    # A subscriber's failure is its own: the channel, and
                    # every other subscriber's hints, go on.
                    logger.exception("a wake-up subscriber failed on a hint")

    def _tell_finished(self, run_ids: Collection[str] | None) -> None:
        for sub in list(self._finish_subs):
            try:
                sub.notify(run_ids)
            except Exception:
                logger.exception("a finish subscriber failed on a hint")

    def _workflows(self) -> list[str]:
        names: set[str] = set()
        for sub in self._subs:
            names.update(sub.workflows)
        return sorted(names)

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        if at >= self._timer_at - MIN_TIMER:
            return
        self._disarm()
        self._timer_at = at
        self._timer = loop.call_at(at, self._fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = float("inf")

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._wake(None)
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        workflows = self._workflows()
        if not workflows:
            return
        try:
            delay = await self._next_due(workflows)
        except Exception as exc:  # polling covers it; never kill the listener
            logger.debug("looking up the next due run failed: %s", exc)
            return
        if delay is not None:
            if delay < MIN_TIMER:
                self._wake(None)
            else:
                self._arm(delay)

    # -- the connection loop ------------------------------------------------------------

    async def _run(self) -> None:
        task = asyncio.current_task()
        while True:
            try:
                await self.listen()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if task is self._subscribed:
                    self._subscribed = None
                if task is not self._task:
                    # Replaced by a connection that listens to more channels:
                    # that one's connected_now sees this one ended early.
                    return
                self.connected.clear()
                if self._stopped or (task is not None and task.cancelling()):
                    # A driver turned our cancellation into a connection
                    # error (closing the connection under it): stop anyway.
                    raise asyncio.CancelledError from exc
                logger.warning(
                    "wake-up listener on %s failed (%s); retrying in about %.1fs, "
                    "polling meanwhile",
                    self._describe,
                    self.describe_error(exc),
                    self._backoff,
                )
            await asyncio.sleep(self._backoff * random.uniform(0.5, 1.5))
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def describe_error(self, exc: BaseException) -> str:
        """How a failure is logged; backends override it to redact secrets."""
        return f"{type(exc).__name__}: {exc}"
