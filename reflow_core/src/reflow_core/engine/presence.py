"""A running worker's entry in the storage's worker registry.

While an engine's worker runs, :class:`Presence` announces it
(:meth:`~reflow_core.storage.Storage.announce_worker`) at the heartbeat
interval with a time to live of one lease, so ``reflow workers ls`` shows every
live worker of a store with its in-flight count, and a worker that dies
vanishes from the list when its leases lapse, by the storage's clock, at the
same moment its runs become reclaimable. A worker that stops cleanly removes
its entry at once.

The registry is advisory: an announcement that fails is logged and retried at
the next interval, and never stops the worker. A storage without a registry
(an adapter that lacks the methods or raises :class:`NotImplementedError`)
is noted once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from datetime import timedelta

from reflow_core._tasks import cancel_and_wait, raise_if_cancelled
from reflow_core.errors import ReflowError
from reflow_core.storage import Storage, WorkerInfo

__all__ = ["Presence", "new_worker_id"]

logger = logging.getLogger("reflow.engine")


def new_worker_id(host: str, pid: int) -> str:
    """``host.pid.xxxxxx``: readable in a listing, unique with the random tail
    (pids repeat across machines and after restarts)."""
    return f"{host}.{pid}.{secrets.token_hex(3)}"


def _host() -> str:
    return socket.gethostname() or "localhost"


class Presence:
    """Announces one worker until it stops; :meth:`leave` removes its entry."""

    def __init__(
        self,
        storage: Storage,
        *,
        describe: Callable[[], tuple[tuple[str, ...], int, int]],
        every: float,
        ttl: timedelta,
    ) -> None:
        self._storage = storage
        self._describe = describe
        """Returns (workflows served, concurrency, runs in flight) now."""
        self._every = every
        self._ttl = ttl
        self.host = _host()
        self.pid = os.getpid()
        self.worker_id = new_worker_id(self.host, self.pid)
        self._task: asyncio.Task[None] | None = None
        self._unsupported = not (
            hasattr(storage, "announce_worker") and hasattr(storage, "remove_worker")
        )
        """An adapter written before the registry lacks its methods or raises
        NotImplementedError from them: the worker runs, unlisted."""
        self._failing = False
        self._joined = False
        """Between :meth:`start` and :meth:`leave`: there may be an entry to remove."""

    def info(self) -> WorkerInfo:
        """What the next announcement says."""
        workflows, concurrency, in_flight = self._describe()
        return WorkerInfo(
            id=self.worker_id,
            host=self.host,
            pid=self.pid,
            workflows=workflows,
            concurrency=concurrency,
            in_flight=in_flight,
        )

    def start(self) -> None:
        """Announce now and then at every interval, in the background."""
        if self._unsupported or (self._task is not None and not self._task.done()):
            return
        self._joined = True
        self._task = asyncio.create_task(self._loop(), name="reflow-presence")

    async def announce(self) -> bool:
        """Announce once; False if the storage refused or has no registry."""
        if self._unsupported:
            return False
        try:
            await self._storage.announce_worker(self.info(), self._ttl)
        except NotImplementedError:
            self._unsupported = True
            logger.info(
                "the storage keeps no worker registry; this worker is not listed by "
                "`reflow workers ls`",
                extra={"reflow": {"event": "worker_registry_unsupported"}},
            )
            return False
        except ReflowError as exc:
            if not self._failing:
                logger.warning(
                    "could not announce worker %s: %s",
                    self.worker_id,
                    exc,
                    extra={"reflow": {"event": "announce_failed", "worker_id": self.worker_id}},
                )
            self._failing = True
            return False
        if self._failing:
            logger.info(
                "worker %s announced again",
                self.worker_id,
                extra={"reflow": {"event": "announced_again", "worker_id": self.worker_id}},
            )
        self._failing = False
        return True

    async def _loop(self) -> None:
        while not self._unsupported:
            await self.announce()
            raise_if_cancelled()
            await asyncio.sleep(self._every)

    async def leave(self) -> None:
        """Stop announcing and remove the entry (best effort: if the storage
        cannot be reached, the entry lapses by itself after one lease)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        joined, self._joined = self._joined, False
        if self._unsupported or not joined:
            return
        try:
            await self._storage.remove_worker(self.worker_id)
        except (NotImplementedError, ReflowError) as exc:
            logger.info(
                "could not remove worker %s from the registry: %s",
                self.worker_id,
                exc,
                extra={"reflow": {"event": "leave_failed", "worker_id": self.worker_id}},
            )
