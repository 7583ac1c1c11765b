"""An adapter module as a third party would ship one, for the suite to load.

    reflow-conformance --storage third_party_adapter:factory

A real adapter returns its own storage class here; this one returns the
in-memory reference backend on one named store, so the command can be tried
anywhere with only reflow-core and reflow-conformance installed.
"""

from __future__ import annotations

import uuid

from reflow_conformance import AdapterFactory
from reflow_core import MemoryStorage

_STORE = f"third-party-{uuid.uuid4().hex}"


def factory() -> AdapterFactory:
    """Called once by the suite; ``make`` is then called for every storage it needs."""
    return AdapterFactory(make=lambda: MemoryStorage(name=_STORE), name="third-party example")
