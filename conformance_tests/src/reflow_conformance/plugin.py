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

import dataclasses
import os
import re
from collections.abc import Generator, Iterator
from datetime import timedelta
from importlib import metadata

import pytest
from hypothesis import HealthCheck, Phase, settings

from . import promises
from .harness import (
    AREAS,
    CAPABILITIES,
    AdapterFactory,
    AreaNotImplemented,
    Harness,
    PromiseBroken,
    area_skip_reason,
    load_factory,
)
from .stores import OwnedStore, StoreUsageError, own_store

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

SHRINK_PROFILE = "reflow-shrink"
"""``reflow-ci`` with the stateful machine shrinking its failures too."""
settings.register_profile(SHRINK_PROFILE, parent=settings.get_profile(_CI))
_MACHINE_UNSHRUNK = frozenset({_CI})
"""Profiles under which a failing stateful machine is reported as found, not
shrunk: shrinking it replays its real lease lapses, for minutes. Every other
profile's phases apply to it as they are."""

_chosen_profile = _CI


def suite_settings() -> settings:
    """The Hypothesis settings of the suite's tests: the profile given with
    ``--hypothesis-profile``, else the fast ``reflow-ci`` profile."""
    return settings.get_profile(_chosen_profile)


def machine_shrinks() -> bool:
    """Whether the chosen profile shrinks a failing stateful machine (the
    default ``reflow-ci`` does not; ``reflow-shrink`` and ``reflow-thorough`` do)."""
    return _chosen_profile not in _MACHINE_UNSHRUNK


COST_TIERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "examples",
        (
            "test_arguments",
            "test_lookalikes",
            "test_runs",
            "test_steps",
            "test_claims",
            "test_leases",
            "test_clock",
            "test_records",
            "test_delayed",
            "test_deadlines",
            "test_children",
            "test_limits",
            "test_rates",
            "test_headers",
            "test_versions",
            "test_listing",
            "test_sleep_wait",
            "test_events",
            "test_event_buffer",
            "test_schedules",
            "test_workers",
            "test_queue_stats",
            "test_dashboard_reads",
            "test_create_many",
            "test_get_runs",
            "test_finish_hints",
            "test_codec",
        ),
    ),
    (
        "properties",
        (
            "test_arguments::TestOddText::test_any_good_text_is_kept_exactly",
            "test_arguments::TestOddText::test_text_with_a_nul_or_lone_surrogate_anywhere_is_refused",
            "test_claims::TestClaimBatches::test_repeated_claims_partition_the_runs",
            "test_listing::TestPagination::test_pages_with_any_limit_and_filter",
            "test_events::TestEventOrder::test_takes_follow_delivery_order_per_run_and_name",
            "test_codec::TestRoundTrip::test_any_plain_value_round_trips_everywhere",
            "test_dashboard_reads::TestRunsByKey::test_runs_created_together_are_ordered_by_id",
            "test_dashboard_reads::TestBufferedEvents::test_listing_follows_deliveries_and_takes",
            "test_dashboard_reads::TestHistoryWindow::test_a_window_is_the_last_minutes_of_the_whole_day",
            "test_dashboard_reads::TestDashboardArguments::test_any_minutes_outside_the_range_are_refused",
            "test_create_many::TestBatchOutcomes::test_any_batch_gives_the_outcomes_of_creates_one_by_one",
            "test_get_runs::TestGetRuns::test_any_ids_read_as_get_run_reads_each",
        ),
    ),
    (
        "concurrency",
        (
            "test_races",
            "test_connections",
            "test_limits::TestConcurrencyLimits::test_concurrent_claimers_never_exceed_a_limit",
            "test_rates::TestRateRaces::test_concurrent_claimers_never_exceed_a_rate",
            "test_create_many::TestBatchRaces"
            "::test_concurrent_batches_with_shared_keys_make_one_run_per_key",
            "test_retention",
        ),
    ),
    (
        "processes",
        (
            "test_processes",
            "test_process_crash",
            # Waits for the storage clock's next minute.
            "test_dashboard_reads::TestHistoryWindow"
            "::test_a_run_that_finished_before_the_window_is_not_counted",
        ),
    ),
    ("stateful", ("test_stateful",)),
)
"""The order the suite's tests run in, cheapest first, so that with ``-x`` a
simple bug is reported by a quick deterministic test before the slow ones
start: each tier lists suite modules, or single tests
(``module::Class::test``) that go to another tier than their module's. A test
goes to the place of its own entry, else of its module's, and the entries run
in the order listed; a suite module not listed runs after the property tests.
Tests of one entry keep the order they were collected in (so each backend's
parametrized copies of a test stay together)."""
_UNLISTED_TIER = "properties"
_RANK = {
    entry: (tier, place)
    for tier, (_, entries) in enumerate(COST_TIERS)
    for place, entry in enumerate(entries)
}


def _defined_in(item: pytest.Item) -> str:
    """The module that defines a test's class, or function."""
    cls = getattr(item, "cls", None)
    owner = cls if cls is not None else getattr(item, "function", None)
    return str(getattr(owner, "__module__", ""))


def is_suite_test(item: pytest.Item) -> bool:
    """A test of the suite: marked so, or defined in it and imported into a
    test module of the adapter's (which does not carry the suite's marks)."""
    return bool(item.get_closest_marker("reflow_conformance")) or _defined_in(item).startswith(
        f"{__package__}.suite."
    )


def cost_rank(item: pytest.Item) -> tuple[int, int]:
    """Where a suite test runs in :data:`COST_TIERS`: its tier, and its entry's place in it."""
    cls = getattr(item, "cls", None)
    module = _defined_in(item).rpartition(".")[2]
    name = getattr(item, "originalname", item.name)
    test = f"{module}::{cls.__qualname__}::{name}" if cls is not None else f"{module}::{name}"
    tier = [name for name, _ in COST_TIERS].index(_UNLISTED_TIER)
    unlisted = (tier, len(COST_TIERS[tier][1]))
    return _RANK.get(test, _RANK.get(module, unlisted))


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """A suite test that fails comparing a naive datetime with an aware one got
    the naive one from the adapter (the suite's own are aware): name the promise.
    The helpers that read records check it first; this catches the rest."""
    try:
        return (yield)
    except TypeError as error:
        naive = "offset-naive" in str(error)
        if naive and is_suite_test(pyfuncitem):
            raise PromiseBroken(
                f"broken promise: {promises.RECORD_TIMES_AWARE}\n  a time the adapter "
                f"returned could not be compared with an aware UTC datetime: {error}"
            ) from error
        raise


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the suite's tests cheapest first (:data:`COST_TIERS`), in the places
    they were collected in: other tests keep theirs. It runs before plugins
    that reorder on request (``--ff``, ``--nf``, random order), so they still can."""
    slots = [i for i, item in enumerate(items) if is_suite_test(item)]
    ordered = sorted((items[i] for i in slots), key=cost_rank)
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item


WAIT_MINUTES_ENV = "REFLOW_CONFORMANCE_WAIT_MINUTES"
"""Set (to anything) to run the tests marked ``reflow_waits_minute``, as
``--reflow-wait-minutes`` does."""


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
        "--reflow-keep",
        action="store_true",
        default=False,
        help="with --reflow-storage-url: keep the fresh store the suite works in (a Redis "
        "key prefix, a PostgreSQL schema, a SQLite file) instead of dropping it at the end, "
        "and say where it is",
    )
    group.addoption(
        "--reflow-capability",
        action="append",
        default=[],
        metavar="NAME",
        choices=sorted(CAPABILITIES),
        help=f"declare an optional capability of the adapter ({', '.join(CAPABILITIES)})",
    )
    group.addoption(
        "--reflow-without",
        action="append",
        default=[],
        metavar="AREA",
        choices=sorted(AREAS),
        help="declare an area of the contract the adapter does not implement yet; its "
        f"tests are skipped ({', '.join(AREAS)})",
    )
    group.addoption(
        "--reflow-short-lease",
        type=float,
        default=0.3,
        metavar="SECONDS",
        help="the lease the suite lets lapse in real time (default 0.3 s)",
    )
    group.addoption(
        "--reflow-wait-minutes",
        action="store_true",
        default=bool(os.environ.get(WAIT_MINUTES_ENV)),
        help="also run the tests that wait for the storage clock's next minute (up to a "
        f"minute of real time each; or set {WAIT_MINUTES_ENV}=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _chosen_profile
    chosen = config.getoption("hypothesis_profile", default=None)
    _chosen_profile = chosen or _CI
    config.addinivalue_line("markers", "reflow_conformance: a test of the Reflow storage contract")
    config.addinivalue_line(
        "markers", "reflow_requires(capability): skip unless the adapter declares the capability"
    )
    config.addinivalue_line(
        "markers",
        "reflow_waits_minute: waits for the storage clock's next minute; skipped unless "
        "--reflow-wait-minutes",
    )
    config.addinivalue_line(
        "markers",
        "reflow_area(area): a test of an area of the contract; skipped if the adapter "
        "declares it does not implement the area yet",
    )
    config.stash[_areas_left_out] = {}
    url = config.getoption("--reflow-storage-url", default=None)
    if url and not config.getoption("--reflow-storage", default=None):
        try:
            store, owned = own_store(url)
        except StoreUsageError as error:
            raise pytest.UsageError(str(error)) from None
        config.stash[_store] = _SessionStore(store, owned)


@dataclasses.dataclass
class _SessionStore:
    """The store of a session run with --reflow-storage-url, and what became of it."""

    store: OwnedStore
    owned: bool
    used: bool = False
    dropped: bool = False
    drop_error: str | None = None


_store = pytest.StashKey[_SessionStore]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the store the suite worked in, unless --reflow-keep keeps it."""
    state = session.config.stash.get(_store, None)
    if state is None or not state.used or state.store.drop is None:
        return
    if session.config.getoption("--reflow-keep"):
        return
    try:
        state.store.drop()
        state.dropped = True
    except Exception as error:  # reported in the summary; the tests' verdict stands
        state.drop_error = f"{type(error).__name__}: {error}"


def pytest_report_header(config: pytest.Config) -> list[str]:
    target = config.getoption("--reflow-storage") or config.getoption("--reflow-storage-url")
    state = config.stash.get(_store, None)
    if state is not None:
        target = state.store.url
    version = metadata.version("reflow-conformance")
    lines = [f"reflow-conformance {version}, hypothesis profile {_chosen_profile}"]
    if target:
        shown = target.split("@")[-1] if "://" in target else target
        lines.append(f"reflow adapter under test: {shown}")
    if state is not None:
        lines.append(f"reflow store: {_store_fate(config, state)}")
    without = config.getoption("--reflow-without", default=None)
    if without:
        lines.append(
            f"reflow areas declared not implemented, NOT tested: {', '.join(sorted(set(without)))}"
        )
    return lines


def _store_fate(config: pytest.Config, state: _SessionStore, *, done: bool = False) -> str:
    """Where the suite works, and what happens to that store at the end."""
    where = state.store.where
    if not state.owned:
        return (
            f"{where}: the suite cannot know how to make a store of its own under this "
            "URL scheme, so it works in the store as given and deletes nothing it writes"
        )
    if state.store.drop is None:
        return where
    if config.getoption("--reflow-keep"):
        return f"{'kept' if done else 'a fresh store, kept at the end (--reflow-keep)'}: {where}"
    return f"{'dropped' if done else 'a fresh store, dropped at the end'}: {where}"


_areas_left_out = pytest.StashKey[dict[str, set[str]]]()
"""The areas the suite left out, each with the adapters that declared it missing."""
_AREA_FAILURE = re.compile(
    rf"{AreaNotImplemented.__name__}: adapter .+? does not implement '(\w+)' "
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say once which areas of the contract went untested, and which failures
    come from an area the adapter lacks without declaring it."""
    config = terminalreporter.config
    state = config.stash.get(_store, None)
    if state is not None and state.used:
        if state.drop_error is not None:
            terminalreporter.write_line(
                f"reflow-conformance: could not drop {state.store.where}: {state.drop_error}; "
                "delete it yourself",
                red=True,
                bold=True,
            )
        else:
            terminalreporter.write_line(
                f"reflow-conformance: {_store_fate(config, state, done=True)}",
                yellow=not state.owned or state.store.drop is None or not state.dropped,
            )
    if _areas_left_out not in config.stash:
        return
    undeclared: dict[str, int] = {}
    for report in terminalreporter.stats.get("failed", []):
        found = _AREA_FAILURE.search(getattr(report, "longreprtext", ""))
        if found:
            undeclared[found[1]] = undeclared.get(found[1], 0) + 1
    for area, count in sorted(undeclared.items()):
        terminalreporter.write_line(
            f"reflow-conformance: {count} failure(s) because the adapter does not implement "
            f"{area!r}; declare it with AdapterFactory(without=frozenset({{{area!r}}})) or "
            f"--reflow-without={area} to skip the tests of {area} until it does",
            red=True,
            bold=True,
        )
    for area, adapters in sorted(config.stash[_areas_left_out].items()):
        terminalreporter.write_line(
            f"reflow-conformance: NOT tested: {area} (declared not implemented by "
            f"{', '.join(sorted(adapters))}): {', '.join(AREAS[area])}",
            yellow=True,
            bold=True,
        )


@pytest.fixture
def reflow_storage_factory(pytestconfig: pytest.Config) -> AdapterFactory:
    """The adapter under test. Override this fixture to bind the suite to your
    adapter: return an :class:`~reflow_conformance.AdapterFactory`, or any
    zero-argument callable returning a new, uninitialized storage."""
    capabilities = pytestconfig.getoption("--reflow-capability")
    target = pytestconfig.getoption("--reflow-storage") or pytestconfig.getoption(
        "--reflow-storage-url"
    )
    state = pytestconfig.stash.get(_store, None)
    if state is not None:
        state.used = True
        target = state.store.url
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
    without = frozenset(pytestconfig.getoption("--reflow-without"))
    if not without <= factory.without:
        factory = dataclasses.replace(factory, without=factory.without | without)
    left_out = pytestconfig.stash[_areas_left_out]
    for area in factory.without:
        left_out.setdefault(area, set()).add(factory.name)
    for marker in request.node.iter_markers("reflow_area"):
        for area in marker.args:
            if area not in AREAS:
                pytest.fail(f"reflow_area({area!r}): unknown area; known: {', '.join(AREAS)}")
            if area in factory.without:
                pytest.skip(area_skip_reason(factory.name, area))
    if request.node.get_closest_marker("reflow_waits_minute") and not pytestconfig.getoption(
        "--reflow-wait-minutes"
    ):
        pytest.skip(
            "waits up to a minute of real time for the storage clock's next minute: "
            f"run with --reflow-wait-minutes (or {WAIT_MINUTES_ENV}=1)"
        )
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
