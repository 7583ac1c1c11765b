"""Repository-wide pytest setup.

Each distribution's directory (``reflow_core/``, ``reflow_sqlite/``, ...) has
the same name as the package it installs, and pytest's importlib import mode
names test modules after their path (``reflow_core.tests.test_engine``). If
pytest met that path first it would register the directory as a namespace
package called ``reflow_core`` and hide the installed package. Importing the
installed packages here, before any test module, puts the real ones in place.
"""

from __future__ import annotations

import importlib

for _name in ("reflow_core", "reflow_sqlite", "reflow_conformance"):
    importlib.import_module(_name)
