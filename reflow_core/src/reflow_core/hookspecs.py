"""Every pluggy hook specification of Reflow, in one place.

Plugins are modules or objects with functions named after these specs and
marked with :data:`hookimpl`. Installed distributions announce them under the
``reflow`` entry-point group, one entry point per URL scheme they serve, named
after the scheme (``sqlite = "reflow_sqlite.plugin"``), so opening a URL loads
only the backend it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pluggy

from .storage import Storage

__all__ = [
    "PROJECT_NAME",
    "Register",
    "StorageFactory",
    "hookimpl",
    "hookspec",
    "reflow_register_backends",
]

PROJECT_NAME = "reflow"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class StorageFactory(Protocol):
    """Builds a storage object from a URL and keyword options."""

    def __call__(self, url: str, /, **options: Any) -> Storage: ...


Register = Callable[..., None]
"""``register(scheme, factory, *, description="")``: announce one URL scheme."""


@hookspec
def reflow_register_backends(register: Register) -> None:
    """Announce the storage backends this plugin provides.

    Call ``register(scheme, factory, description=...)`` once per URL scheme,
    where ``factory(url, **options)`` returns an object implementing
    :class:`reflow_core.storage.Storage` without connecting yet (the engine
    calls ``initialize()``). Registering a scheme that another plugin already
    registered is an error naming both.

    Added in 0.1.
    """
