"""The pytest plugin of reflow-core: fixtures for testing workflows.

pytest loads it through the ``pytest11`` entry point ``reflow``; nothing
else imports it, so reflow-core does not depend on pytest. It needs no async
test plugin. See :mod:`reflow_core.testing` for the API and the
``Testing workflows`` guide for examples.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import SyncTestEngine, VirtualClock

__all__ = ["reflow_test_engine", "virtual_clock"]


@pytest.fixture
def virtual_clock() -> VirtualClock:
    """A :class:`~reflow_core.testing.VirtualClock` at
    :data:`~reflow_core.testing.DEFAULT_START`; ``reflow_test_engine`` runs on it."""
    return VirtualClock()


@pytest.fixture
def reflow_test_engine(virtual_clock: VirtualClock) -> Iterator[SyncTestEngine]:
    """A :class:`~reflow_core.testing.SyncTestEngine` on an in-memory storage
    and ``virtual_clock``, closed after the test.

    Call its methods directly in a plain ``def`` test; in an ``async def``
    test enter ``reflow_test_engine.async_engine()`` with ``async with``.
    Workflows are registered by ``run()``, or up front with ``register()``.
    """
    with SyncTestEngine(clock=virtual_clock) as engine:
        yield engine
