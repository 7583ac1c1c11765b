"""The whole storage contract, on every backend of this repository."""

from reflow_conformance.suite import *  # noqa: F403
