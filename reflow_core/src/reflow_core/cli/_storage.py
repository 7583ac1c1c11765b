"""``reflow storage``: create or migrate a store's schema, and check a store."""

from __future__ import annotations

import inspect
import time
from typing import Any

import click
from rich.table import Table

from reflow_core.registry import default_registry, open_storage
from reflow_core.storage import Storage

from ._common import State, echo_json, pass_state, run_async

__all__ = ["storage"]

_ROUND_TRIPS = 3
"""``now()`` calls timed by ``storage check``; the fastest is reported."""


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _backend(url: str, store: Storage) -> dict[str, str]:
    info = default_registry().get(_scheme(url))
    return {
        "scheme": info.scheme,
        "class": f"{type(store).__module__}.{type(store).__qualname__}",
        "description": info.description,
        "plugin": info.plugin,
    }


async def _schema_version(store: Storage) -> Any:
    """The schema version a backend reports through an optional
    ``schema_version`` attribute, method or coroutine; ``None`` without one."""
    found = getattr(store, "schema_version", None)
    if callable(found):
        found = found()
    if inspect.isawaitable(found):
        found = await found
    return found


@click.group()
def storage() -> None:
    """Create, migrate and check the storage."""


@storage.command("init")
@click.argument("url", required=False, metavar="[URL]")
@pass_state
def init(state: State, url: str | None) -> None:
    """Create or migrate the schema of a store.

    Works on the store at URL (default: --url): creates its schema, or
    migrates it to this version. Safe to run again, and while workers run:
    it changes nothing on a current schema, and refuses a schema written by
    a newer version or a store that holds other data."""
    if url:
        state.url = url

    async def work() -> float:
        started = time.perf_counter()
        store = open_storage(state.require_url())
        try:
            await store.initialize()
        finally:
            await store.close()
        return time.perf_counter() - started

    seconds = run_async(work)
    if state.json:
        echo_json({"url": state.shown_url, "initialized": True, "seconds": round(seconds, 3)})
    else:
        state.console.print(
            f"storage at {state.shown_url} is initialized ({seconds * 1000:.0f} ms)",
            markup=False,
        )


@storage.command("check")
@pass_state
def check(state: State) -> None:
    """Check that the storage can be reached and used.

    Reports its backend, its schema version (when the backend reports one),
    the time to connect and the round-trip time of a clock read.

    Connecting runs the backend's initialize, which creates the schema of
    an empty store. Exit status 1 if the store cannot be reached or used.
    """

    async def work() -> dict[str, Any]:
        url = state.require_url()
        store = open_storage(url)
        try:
            started = time.perf_counter()
            await store.initialize()
            connect = time.perf_counter() - started
            trips = []
            now = None
            for _ in range(_ROUND_TRIPS):
                started = time.perf_counter()
                now = await store.now()
                trips.append(time.perf_counter() - started)
            return {
                "url": state.shown_url,
                "ok": True,
                "backend": _backend(url, store),
                "schema_version": await _schema_version(store),
                "connect_ms": round(connect * 1000, 3),
                "now_round_trip_ms": round(min(trips) * 1000, 3),
                "storage_now": now,
                "clock_skew_ms": round(
                    (time.time() - now.timestamp()) * 1000 if now is not None else 0.0, 1
                ),
            }
        finally:
            await store.close()

    report = run_async(work)
    if state.json:
        echo_json(report)
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    backend = report["backend"]
    version = report["schema_version"]
    table.add_row("storage", report["url"])
    table.add_row("backend", f"{backend['scheme']}: {backend['description']} ({backend['class']})")
    table.add_row(
        "schema version", "not reported by this backend" if version is None else str(version)
    )
    table.add_row("connect", f"{report['connect_ms']:.1f} ms (initialize)")
    table.add_row("now() round trip", f"{report['now_round_trip_ms']:.2f} ms")
    table.add_row("storage clock", f"{report['storage_now']:%Y-%m-%d %H:%M:%S.%f} UTC")
    table.add_row("clock skew", f"{report['clock_skew_ms']:+.1f} ms (this host minus storage)")
    table.add_row("health", "ok")
    state.show(table)
