"""The ``reflow`` entry point: registers the ``tutorial-sqlite`` URL scheme."""

from __future__ import annotations

from typing import Any

from reflow_core.hookspecs import Register, hookimpl
from reflow_core.storage import Storage


def _factory(url: str, /, **options: Any) -> Storage:
    # Imported here, so that listing the installed backends loads no driver.
    from .storage import TutorialStorage

    return TutorialStorage.from_url(url, **options)


@hookimpl
def reflow_register_backends(register: Register) -> None:
    register("tutorial-sqlite", _factory, description="one SQLite file, stdlib sqlite3 (tutorial)")
