"""Test helpers: run workflows to the end in a test, with time under the test's control.

:class:`TestEngine` wraps a real :class:`~reflow_core.engine.Engine` on an
in-memory storage (or one you pass), with a :class:`VirtualClock` shared by
the engine and the storage. Time only moves when the test says so, and then
instantly::

    async with TestEngine([order]) as t:
        result = await t.run(order, {"order_id": "A1", "amount": 100})
        assert result.status == "sleeping"          # at .sleep("cool-off", "1h")
        await t.advance("1h")
        result = await t.get(result.id)
        print(result.blocked_reason)                # waiting for event 'approval' (timeout at ...)
        result = await t.send_event(result.id, "approval", {"by": "ann"})
        assert result.output == {"tracking": "TRK-A1"}

What moves the clock:

* **Retry back-off** passes by itself. While every step attempt in flight
  is waiting out its back-off, the clock jumps to the end of the earliest
  one, so ``Retry(max_attempts=10, backoff="exponential")`` takes no real
  time. This is shared time: other runs see it pass too.
* **Durable sleeps, wait timeouts and schedule slots** pass only when asked:
  :meth:`TestEngine.advance` (or :meth:`~TestEngine.advance_to`) moves the
  clock forward through every wake-up on the way, in order, and runs what
  became due at each; ``run(..., advance=True)`` does the same up to the
  run's own wake-ups until it finishes.

A run that cannot finish is returned as it stands, with
:attr:`RunResult.blocked_reason` saying why in words ("sleeping in step
'cool-off' until ...", "waiting for event 'approval' (no timeout) ...",
"step 'charge' keeps failing: its retry back-off never ends ...").

Step timeouts (``timeout=`` of a step) are measured in real time, as are
handlers' own waits: only the engine's and the storage's notion of *now*
is virtual.

**pytest.** Installing reflow-core registers a pytest plugin
(``reflow_core.pytest_plugin``, entry point ``reflow``) with two fixtures;
it needs no async test plugin. ``reflow_test_engine`` is a
:class:`SyncTestEngine`: the same API with plain methods, running on an
event loop of its own for the test, so a plain ``def`` test calls
``reflow_test_engine.run(order, {...})`` directly. In an ``async def`` test
(pytest-asyncio, anyio, or any runner) take the async engine from it, on the
test's own loop: ``async with reflow_test_engine.async_engine() as t``.
``virtual_clock`` is the :class:`VirtualClock` it runs on.

The fixture is the synchronous facade because that works in every test
suite as is, whatever runs its coroutines (or nothing does); the async
:class:`TestEngine` is the same engine for suites whose tests are coroutines.
"""

from ._clock import DEFAULT_START, VirtualClock
from ._engine import TestEngine
from ._result import RunBlockedError, RunResult
from ._sync import SyncTestEngine

__all__ = [
    "DEFAULT_START",
    "RunBlockedError",
    "RunResult",
    "SyncTestEngine",
    "TestEngine",
    "VirtualClock",
]
