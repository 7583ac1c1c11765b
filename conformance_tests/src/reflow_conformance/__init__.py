"""reflow-conformance: the Reflow storage contract as a pytest plugin.

See :mod:`reflow_conformance.plugin` for how to run it against an adapter.
"""

from __future__ import annotations

from .harness import CAPABILITIES, AdapterFactory, Harness, PromiseBroken, load_factory, promise

__version__ = "0.1.0"

__all__ = [
    "CAPABILITIES",
    "AdapterFactory",
    "Harness",
    "PromiseBroken",
    "__version__",
    "load_factory",
    "promise",
]
