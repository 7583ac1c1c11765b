"""How the suite reaches the adapter under test: :class:`AdapterFactory` and
:class:`Harness`, and how it reports a broken promise: :func:`promise`."""

from __future__ import annotations

import asyncio
import importlib
import os
import traceback
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import pytest

from reflow_core import open_storage
from reflow_core.storage import Storage

__all__ = [
    "AREAS",
    "CAPABILITIES",
    "AdapterFactory",
    "AreaNotImplemented",
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

AREAS: dict[str, tuple[str, ...]] = {
    "schedules": (
        "upsert_schedule",
        "delete_schedule",
        "list_schedules",
        "due_schedules",
        "claim_schedule_slot",
        "set_schedule_paused",
    ),
    "workers": ("announce_worker", "list_workers", "remove_worker"),
    "queue_stats": ("queue_stats",),
    "children": ("start_child", "wait_children", "list_children"),
    "dashboard": ("find_runs_by_key", "list_buffered_events", "finished_history"),
    "batches": ("create_runs", "get_runs"),
}
"""Areas of the contract, each with its storage methods, that an adapter under
construction may declare it does not implement yet (``AdapterFactory(without=...)``,
``--reflow-without=NAME``): the tests of an area declared missing are skipped,
and the other tests leave it alone."""


def _check_names(kind: str, names: frozenset[str], known: Collection[str]) -> None:
    unknown = sorted(names - set(known))
    if unknown:
        raise ValueError(
            f"unknown {kind} {', '.join(map(repr, unknown))}; "
            f"the known ones are: {', '.join(sorted(known))}"
        )


def area_skip_reason(adapter: str, area: str) -> str:
    """Why the tests of ``area`` are skipped for ``adapter``, which declares it missing."""
    return (
        f"adapter {adapter} declares it does not implement {area!r} yet: "
        f"{', '.join(AREAS[area])} are not tested"
    )


class AreaNotImplemented(AssertionError):
    """The adapter raised :class:`NotImplementedError` from a method of an
    area of :data:`AREAS` it did not declare missing.

    The message names the area and how to declare it.
    """


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
    from :data:`CAPABILITIES`, and ``without`` the areas of :data:`AREAS` it
    does not implement yet. An unknown name in either is a ``ValueError``.
    """

    make: Callable[[], Storage]
    target: str | None = None
    capabilities: frozenset[str] = field(default_factory=frozenset)
    name: str = "adapter"
    without: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        # Any collection of names will do (a set literal, a list).
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))
        object.__setattr__(self, "without", frozenset(self.without))
        _check_names("capability", self.capabilities, CAPABILITIES)
        _check_names("area", self.without, AREAS)

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


def load_factory(
    target: str, capabilities: Collection[str] = (), without: Collection[str] = ()
) -> AdapterFactory:
    """Build a factory from a storage URL or a ``"module:callable"`` path.

    A callable named by path is called with no arguments each time a storage
    is needed; it may also return an :class:`AdapterFactory` when called
    once with no arguments by :func:`load_factory` (a factory of factories),
    which is how it declares its capabilities and the areas it lacks.
    ``capabilities`` and ``without`` add to what it declares.
    """
    if "://" in target:
        # A memory:// store lives in one process: another one opening the URL
        # would get a store of its own.
        in_process = target.partition("://")[0].lower() == "memory"
        return AdapterFactory(
            make=lambda: open_storage(target),
            target=target,
            capabilities=frozenset(capabilities) | (set() if in_process else {"multiprocess"}),
            name=target.split("://", 1)[0] + "://",
            without=frozenset(without),
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
            without=probe.without | frozenset(without),
        )
    del probe  # never initialized, so it holds nothing to release
    return AdapterFactory(
        make=obj,
        target=target,
        capabilities=frozenset(capabilities),
        name=target,
        without=frozenset(without),
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

    def implements(self, area: str) -> bool:
        """False if the adapter declares it does not implement ``area`` (of
        :data:`AREAS`) yet: a test that touches it in part leaves that part out."""
        if area not in AREAS:
            raise ValueError(f"unknown area {area!r}; the known ones are: {', '.join(AREAS)}")
        return area not in self.factory.without

    def area_failure(self, error: NotImplementedError) -> AreaNotImplemented | None:
        """The failure to report for ``error``, raised by the adapter from a
        method of an area of :data:`AREAS`: it names the area and how to
        declare it missing. ``None`` if no such method raised it."""
        method = area_method(error)
        if method is None:
            return None
        area = next(area for area, methods in AREAS.items() if method in methods)
        name = self.factory.name
        if area in self.factory.without:
            return AreaNotImplemented(
                f"the suite called {method} although adapter {name} declares it does not "
                f"implement {area!r}: a test of that area is not marked reflow_area({area!r})"
            )
        return AreaNotImplemented(
            f"adapter {name} does not implement {area!r} ({method} raised NotImplementedError); "
            f"declare it with AdapterFactory(without=frozenset({{{area!r}}})) or "
            f"--reflow-without={area} to skip the tests of {area} until it does"
        )

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
            except NotImplementedError as exc:
                failure = self.area_failure(exc)
                if failure is None:
                    raise
                raise failure from exc
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


_PACKAGE_DIR = os.path.join(os.path.dirname(__file__), "")


def area_method(error: BaseException) -> str | None:
    """The innermost storage method of an area of :data:`AREAS` on the way to
    ``error`` (frames of this package, whose rules may share the names, are
    passed over)."""
    methods = {method for area in AREAS.values() for method in area}
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for frame in reversed(frames):
        code = frame.f_code
        if code.co_name in methods and not code.co_filename.startswith(_PACKAGE_DIR):
            return code.co_name
    return None
