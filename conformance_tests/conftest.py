"""pytest setup for ``pytest conformance_tests``.

The suite's test modules under ``src/`` need an adapter to run against: this
repository binds them to its backends in ``tests/`` (see
``tests/test_suite_on_our_backends.py``), so they are not collected from
``src/`` by themselves.
"""

collect_ignore = ["src"]
