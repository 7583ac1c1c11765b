"""The whole storage contract, run by pytest against the fixture in conftest.py."""

from reflow_conformance.suite import *  # noqa: F403
