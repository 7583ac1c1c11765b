"""Running ``async def`` tests, and a clock that moves only when a test moves it."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

__all__ = ["FakeClock", "run_async_tests", "wait_until"]

# -- async tests ---------------------------------------------------------------------------


def run_async_tests(
    *, timeout: float, close: tuple[type[Any], ...] = ()
) -> Callable[[pytest.Function], bool | None]:
    """A ``pytest_pyfunc_call`` hook running ``async def`` tests with :func:`asyncio.run`.

    The test gets ``timeout`` seconds before it fails as hung. Afterwards,
    on the test's own loop, every fixture value of the test that is an
    instance of one of ``close`` has its ``aclose()`` awaited, pass or fail.
    Assign it in a ``conftest.py``::

        pytest_pyfunc_call = run_async_tests(timeout=30.0, close=(Opener,))
    """
    import pytest

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
        func = pyfuncitem.obj
        if not inspect.iscoroutinefunction(func):
            return None
        kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        closing: dict[int, Any] = {}
        if close:
            for value in pyfuncitem.funcargs.values():
                if isinstance(value, close):
                    closing.setdefault(id(value), value)

        async def main() -> None:
            try:
                async with asyncio.timeout(timeout):
                    await func(**kwargs)
            finally:
                for value in closing.values():
                    await value.aclose()

        asyncio.run(main())
        return True

    return pytest_pyfunc_call


# -- a clock ------------------------------------------------------------------------------


class FakeClock:
    """A storage clock that only moves when told to (safe to read from any thread)."""

    def __init__(self, start: datetime = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], *, timeout: float = 5.0, what: str = ""
) -> None:
    """Poll ``predicate`` (plain or async) every 10 ms until it is true;
    fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)
