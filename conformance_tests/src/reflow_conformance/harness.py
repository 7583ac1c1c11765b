"""How the suite reaches the adapter under test: :class:`AdapterFactory` and
:class:`Harness`, and how it reports a broken promise: :func:`promise`."""

from __future__ import annotations

import asyncio
import importlib
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import pytest

from reflow_core import open_storage
from reflow_core.storage import Storage

__all__ = [
    "CAPABILITIES",
    "AdapterFactory",
    "Harness",
    "PromiseBroken",
    "load_factory",
    "promise",
]

T = TypeVar("T")

CAPABILITIES: dict[str, str] = {
    "multiprocess": (
        "several processes can open the same store (the factory has a `target` another "
        "process can rebuild it from: a URL or 'module:callable')"
    ),
}
"""Optional abilities an adapter may declare; tests that need one are skipped without it."""


class PromiseBroken(AssertionError):
    """An adapter broke a promise of the storage contract.

    The message starts with ``broken promise: `` and the promise in words, then
    what was seen.
    """


def promise(condition: object, name: str, detail: str = "") -> None:
    """Check one promise of the contract; fail naming it if it does not hold."""
    if not condition:
        raise PromiseBroken(f"broken promise: {name}" + (f"\n  {detail}" if detail else ""))


@dataclass(frozen=True)
class AdapterFactory:
    """How the suite gets storage objects for the adapter under test.

    ``make()`` returns a new, uninitialized storage object connected to the
    store under test. Every call must reach the *same* store (as a second
    connection to one database would): the suite isolates its tests with
    unique workflow names and schedule keys, so the store may hold other data,
    except finished runs worth keeping: ``purge_finished`` acts on the whole
    store, and the retention tests purge every run in it that has finished.
    ``target`` (a storage URL or ``"module:callable"``) lets another process
    build the same factory; ``capabilities`` names what the adapter supports
    from :data:`CAPABILITIES`.
    """

    make: Callable[[], Storage]
    target: str | None = None
    capabilities: frozenset[str] = field(default_factory=frozenset)
    name: str = "adapter"

    def __call__(self) -> Storage:
        return self.make()

    @classmethod
    def coerce(cls, value: AdapterFactory | Callable[[], Storage]) -> AdapterFactory:
        """Accept a plain zero-argument callable where a factory is expected."""
        if isinstance(value, AdapterFactory):
            return value
        if callable(value):
            name = getattr(value, "__qualname__", None) or repr(value)
            return cls(make=value, name=name)
        raise TypeError(
            "reflow_storage_factory must return an AdapterFactory or a zero-argument "
            f"callable returning a storage, not {type(value).__name__}"
        )


def load_factory(target: str, capabilities: Collection[str] = ()) -> AdapterFactory:
    """Build a factory from a storage URL or a ``"module:callable"`` path.

    A callable named by path is called with no arguments each time a storage
    is needed; it may also return an :class:`AdapterFactory` when called
    once with no arguments by :func:`load_factory` (a factory of factories),
    which is how it declares its capabilities.
    """
    if "://" in target:
        return AdapterFactory(
            make=lambda: open_storage(target),
            target=target,
            capabilities=frozenset(capabilities) | {"multiprocess"},
            name=target.split("://", 1)[0] + "://",
        )
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:callable' or a storage URL, got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    probe = obj()
    if isinstance(probe, AdapterFactory):
        return AdapterFactory(
            make=probe.make,
            target=target,
            capabilities=probe.capabilities | frozenset(capabilities),
            name=probe.name,
        )
    del probe  # never initialized, so it holds nothing to release
    return AdapterFactory(
        make=obj, target=target, capabilities=frozenset(capabilities), name=target
    )


class Harness:
    """One test's access to the adapter, on an event loop the suite owns.

    :meth:`run` opens an initialized storage, awaits a coroutine function with
    it and closes it; :meth:`open` gives further connections inside it. Every
    storage opened is closed when the test ends, even on failure.
    """

    def __init__(self, factory: AdapterFactory, *, short_lease: timedelta) -> None:
        self.factory = factory
        self.short_lease = short_lease
        self.long_lease = timedelta(minutes=10)
        self._runner = asyncio.Runner()
        self._open: list[Storage] = []

    def supports(self, capability: str) -> bool:
        return capability in self.factory.capabilities

    def process_target(self) -> str:
        """The target another process rebuilds the adapter from; a test of
        the ``multiprocess`` capability fails, naming the adapter, without one."""
        target = self.factory.target
        if target is None:
            pytest.fail(
                f"adapter {self.factory.name} declares 'multiprocess' but its "
                "AdapterFactory has no target another process can rebuild it from"
            )
        return target

    def unique(self, prefix: str = "wf") -> str:
        """A name no other test, run or process uses."""
        return f"{prefix}-{uuid.uuid4().hex[:16]}"

    async def open(self) -> Storage:
        """Another initialized storage on the same store (closed at the end)."""
        storage = self.factory()
        self._open.append(storage)
        await storage.initialize()
        return storage

    async def lapse(self, lease: timedelta | None = None) -> None:
        """Sleep until a lease taken now has certainly lapsed by any sane clock."""
        span = (lease or self.short_lease).total_seconds()
        await asyncio.sleep(span * 1.5 + 0.05)

    def run(self, body: Callable[[Storage], Awaitable[T]]) -> T:
        """Run ``body(storage)`` to the end on the suite's loop.

        The storage, and any opened with :meth:`open` during the call, are
        closed when it returns, so a Hypothesis test holds one connection per
        example at a time, not one per example for the whole test.
        """

        async def main() -> T:
            mark = len(self._open)
            try:
                storage = await self.open()
                return await body(storage)
            finally:
                opened = self._open[mark:]
                del self._open[mark:]
                for storage in reversed(opened):
                    await storage.close()

        return self._runner.run(main())

    def close(self) -> None:
        async def close_all() -> None:
            for storage in reversed(self._open):
                await storage.close()
            self._open.clear()

        try:
            if self._open:
                self._runner.run(close_all())
        finally:
            self._runner.close()
