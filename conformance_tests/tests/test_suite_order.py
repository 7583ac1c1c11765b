"""The suite runs cheapest first, and a stateful failure that Hypothesis finds
unrepeatable still names a broken promise."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from hypothesis.errors import FlakyFailure, FlakyStrategyDefinition

import reflow_conformance.suite as suite
from reflow_conformance import promises as P
from reflow_conformance.harness import PromiseBroken
from reflow_conformance.plugin import COST_TIERS
from reflow_conformance.suite.test_stateful import _stopped_by_pytest, _unrepeatable

pytest_plugins = ["pytester"]

_MODULES = sorted(
    info.name for info in pkgutil.iter_modules(suite.__path__) if info.name.startswith("test_")
)
_ENTRIES = [entry for _, entries in COST_TIERS for entry in entries]


def test_every_suite_module_has_a_place_in_the_order() -> None:
    listed = {entry for entry in _ENTRIES if "::" not in entry}
    assert sorted(listed) == _MODULES
    assert len(_ENTRIES) == len(set(_ENTRIES))


@pytest.mark.parametrize("entry", [e for e in _ENTRIES if "::" in e])
def test_every_single_test_in_the_order_exists(entry: str) -> None:
    module, cls, name = entry.split("::")
    owner = getattr(importlib.import_module(f"reflow_conformance.suite.{module}"), cls)
    assert callable(getattr(owner, name))


def test_the_suite_is_collected_cheapest_first_and_other_tests_keep_their_place(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_bound="""
        import pytest
        from reflow_conformance.suite import *  # noqa: F403

        def test_first_of_mine():
            pass

        @pytest.fixture(params=["one", "two"])
        def reflow_storage_factory(request):
            return lambda: None
        """
    )
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider")
    ids = [line for line in result.outlines if "::" in line]
    # Collected after the suite's classes (imported first), and left there.
    assert ids[-1] == "test_bound.py::test_first_of_mine"
    suite_ids = ids[:-1]
    names = [line.split("::")[2].split("[")[0] for line in suite_ids]
    # Each backend's copies of a test stay together.
    blocks = [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]
    assert len(blocks) == len(set(blocks))
    assert all(line.rpartition("[")[2].startswith(("one", "two")) for line in suite_ids)
    assert names[-2:] == ["test_stateful_machine"] * 2
    crash = names.index("test_a_worker_killed_mid_step_loses_no_run_and_saves_no_step_twice")
    races = names.index("test_a_fenced_write_racing_a_cancel_never_undoes_it")
    partition = names.index("test_repeated_claims_partition_the_runs")
    limit = names.index("test_a_claim_takes_at_most_limit_runs")
    assert limit < partition < races < crash < len(names) - 2


def test_an_unrepeatable_failure_names_the_promise_its_first_run_broke() -> None:
    first = PromiseBroken(f"broken promise: {P.LIVE_LEASE_ACCEPTED}\n  heartbeat_run with r1#1")
    reported = _unrepeatable(FlakyFailure("Inconsistent results", [first]))
    lines = str(reported).splitlines()
    assert lines[0] == f"broken promise: {P.LIVE_LEASE_ACCEPTED}"
    assert lines[1] == "  heartbeat_run with r1#1"
    assert "answered the same operations differently" in str(reported)


def test_inconsistent_data_generation_names_the_promise_broken_during_it() -> None:
    try:
        try:
            raise PromiseBroken(f"broken promise: {P.ONE_LIVE_LEASE}")
        except PromiseBroken:
            raise FlakyStrategyDefinition("Inconsistent data generation!") from None
    except FlakyStrategyDefinition as error:
        reported = _unrepeatable(error)
    assert str(reported).startswith(f"broken promise: {P.ONE_LIVE_LEASE}\n")
    assert "FlakyStrategyDefinition: Inconsistent data generation!" in str(reported)


def test_an_unrepeatable_run_without_a_broken_promise_names_the_model() -> None:
    reported = _unrepeatable(FlakyStrategyDefinition("Inconsistent data generation!"))
    assert str(reported).startswith(f"broken promise: {P.STATE_MATCHES_MODEL}\n")


def test_a_timeout_during_the_machine_is_reported_as_the_timeout() -> None:
    """pytest-timeout fails the machine mid-operation; Hypothesis then sees a
    repeat that stops elsewhere. The report is the timeout, not the adapter."""
    try:
        try:
            pytest.fail("Timeout (>120.0s) from pytest-timeout.")
        except pytest.fail.Exception:
            raise FlakyStrategyDefinition("Inconsistent data generation!") from None
    except FlakyStrategyDefinition as error:
        stopped = _stopped_by_pytest(error)
    assert isinstance(stopped, pytest.fail.Exception)
    assert "Timeout" in str(stopped)


def test_a_broken_promise_wins_over_a_timeout() -> None:
    try:
        try:
            raise PromiseBroken(f"broken promise: {P.ONE_LIVE_LEASE}")
        except PromiseBroken as broken:
            raise FlakyFailure("Inconsistent results", [broken]) from None
    except FlakyFailure as error:
        stopped = _stopped_by_pytest(error)
    assert stopped is None
