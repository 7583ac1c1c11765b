"""Group commit for adapter authors: concurrent calls share one round trip.

A backend whose writes cost a network round trip each can send the step saves
of many in-flight runs together. :class:`GroupCommit` does this without a
timer: the first call is sent at once, and the calls that arrive while it is
on the wire go out together in the next batch. Under light load a call waits
for nothing; under heavy load each round trip carries many calls.

The batch function receives the items in arrival order and returns one result
per item, in the same order; if it raises, every caller of that batch gets the
exception. It must make each item's outcome independent of the others (for a
step save: one run's lost lease must not refuse the others' saves).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

_I = TypeVar("_I")
_R = TypeVar("_R")


class GroupCommit(Generic[_I, _R]):
    """Send concurrent ``submit`` calls through ``flush`` in batches of at most
    ``max_batch``, with up to ``in_flight`` batches on the wire at once (more
    than one lets the client prepare a batch while the store runs another;
    use it only where concurrent batches cannot deadlock each other)."""

    def __init__(
        self,
        flush: Callable[[Sequence[_I]], Awaitable[Sequence[_R]]],
        *,
        max_batch: int = 256,
        in_flight: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        self._flush = flush
        self._max = max_batch
        self._in_flight = in_flight
        self._queue: list[tuple[_I, asyncio.Future[_R]]] = []
        self._drainers = 0
        self.batches = 0
        """How many batches were sent (for tests and metrics)."""

    async def submit(self, item: _I) -> _R:
        """Queue ``item`` and wait for its result."""
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drainers < self._in_flight:
            self._drainers += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max]
                del self._queue[: self._max]
                self.batches += 1
                try:
                    results = await self._flush([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(
                            f"group commit got {len(results)} results for {len(batch)} items"
                        )
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._drainers -= 1
            if self._drainers == 0:
                for _, future in self._queue:  # only left behind when cancelled
                    if not future.done():
                        future.set_exception(asyncio.CancelledError())
                self._queue.clear()
