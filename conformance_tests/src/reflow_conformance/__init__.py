"""reflow-conformance: the Reflow storage contract as a pytest plugin.

See :mod:`reflow_conformance.plugin` for how to run it against an adapter.
"""

from __future__ import annotations

from .harness import (
    AREAS,
    CAPABILITIES,
    AdapterFactory,
    AreaNotImplemented,
    Harness,
    PromiseBroken,
    load_factory,
    promise,
)
from .stores import OwnedStore

__version__ = "0.1.0"

__all__ = [
    "AREAS",
    "CAPABILITIES",
    "AdapterFactory",
    "AreaNotImplemented",
    "Harness",
    "OwnedStore",
    "PromiseBroken",
    "__version__",
    "load_factory",
    "promise",
]
