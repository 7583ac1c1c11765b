"""The pytest plugin: options, fixtures and Hypothesis profiles of the suite.

It defines no tests itself. The tests live in :mod:`reflow_conformance.suite`;
run them against an adapter with::

    pytest --pyargs reflow_conformance.suite --reflow-storage=my_pkg.testing:factory
    pytest --pyargs reflow_conformance.suite --reflow-storage-url=sqlite:///tmp/x.db

or bind them in your own tests: override the ``reflow_storage_factory``
fixture in a ``conftest.py`` and import the suite into a test module with
``from reflow_conformance.suite import *``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from importlib import metadata

import pytest
from hypothesis import HealthCheck, Phase, settings

from .harness import CAPABILITIES, AdapterFactory, Harness, load_factory

pytest.register_assert_rewrite("reflow_conformance.suite")

_CI = "reflow-ci"
_THOROUGH = "reflow-thorough"
_health = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile(
    _CI, max_examples=20, stateful_step_count=25, deadline=None, suppress_health_check=_health
)
settings.register_profile(
    _THOROUGH,
    max_examples=300,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=_health,
)

# The first failure as found, unshrunk: a stateful failure shrinks through
# real lease lapses and can take minutes to reduce.
settings.register_profile(
    "reflow-no-shrink",
    parent=settings.get_profile(_CI),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)

_chosen_profile = _CI


def suite_settings() -> settings:
    """The Hypothesis settings of the suite's tests: the profile given with
    ``--hypothesis-profile``, else the fast ``reflow-ci`` profile."""
    return settings.get_profile(_chosen_profile)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reflow-conformance", "Reflow storage conformance suite")
    group.addoption(
        "--reflow-storage",
        metavar="MODULE:FACTORY",
        default=os.environ.get("REFLOW_CONFORMANCE_STORAGE"),
        help="adapter under test: a zero-argument callable returning a new storage "
        "(or an AdapterFactory); env REFLOW_CONFORMANCE_STORAGE",
    )
    group.addoption(
        "--reflow-storage-url",
        metavar="URL",
        default=os.environ.get("REFLOW_CONFORMANCE_URL"),
        help="adapter under test, as a storage URL for reflow_core.open_storage; "
        "env REFLOW_CONFORMANCE_URL",
    )
    group.addoption(
        "--reflow-capability",
        action="append",
        default=[],
        metavar="NAME",
        help=f"declare an optional capability of the adapter ({', '.join(CAPABILITIES)})",
    )
    group.addoption(
        "--reflow-short-lease",
        type=float,
        default=0.3,
        metavar="SECONDS",
        help="the lease the suite lets lapse in real time (default 0.3 s)",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _chosen_profile
    chosen = config.getoption("hypothesis_profile", default=None)
    _chosen_profile = chosen or _CI
    config.addinivalue_line("markers", "reflow_conformance: a test of the Reflow storage contract")
    config.addinivalue_line(
        "markers", "reflow_requires(capability): skip unless the adapter declares the capability"
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    target = config.getoption("--reflow-storage") or config.getoption("--reflow-storage-url")
    version = metadata.version("reflow-conformance")
    lines = [f"reflow-conformance {version}, hypothesis profile {_chosen_profile}"]
    if target:
        shown = target.split("@")[-1] if "://" in target else target
        lines.append(f"reflow adapter under test: {shown}")
    return lines


@pytest.fixture
def reflow_storage_factory(pytestconfig: pytest.Config) -> AdapterFactory:
    """The adapter under test. Override this fixture to bind the suite to your
    adapter: return an :class:`~reflow_conformance.AdapterFactory`, or any
    zero-argument callable returning a new, uninitialized storage."""
    capabilities = pytestconfig.getoption("--reflow-capability")
    target = pytestconfig.getoption("--reflow-storage") or pytestconfig.getoption(
        "--reflow-storage-url"
    )
    if not target:
        raise pytest.UsageError(
            "the Reflow conformance suite needs an adapter: pass "
            "--reflow-storage=package.module:factory or --reflow-storage-url=URL, or "
            "override the reflow_storage_factory fixture in your conftest.py"
        )
    return load_factory(target, capabilities)


@pytest.fixture
def reflow(
    request: pytest.FixtureRequest,
    reflow_storage_factory: AdapterFactory,
    pytestconfig: pytest.Config,
) -> Iterator[Harness]:
    """The harness a suite test drives the adapter through."""
    factory = AdapterFactory.coerce(reflow_storage_factory)
    for marker in request.node.iter_markers("reflow_requires"):
        for capability in marker.args:
            if capability not in factory.capabilities:
                pytest.skip(
                    f"adapter {factory.name} does not declare capability {capability!r}: "
                    f"{CAPABILITIES.get(capability, '')}"
                )
    short = timedelta(seconds=pytestconfig.getoption("--reflow-short-lease"))
    harness = Harness(factory, short_lease=short)
    try:
        yield harness
    finally:
        harness.close()
