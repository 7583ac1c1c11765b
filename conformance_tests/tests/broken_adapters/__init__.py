"""Deliberately broken storage adapters, to prove the conformance suite catches them.

Each class in the modules of this package (one per area of the contract:
``batches``, ``claims``, ``children``, ``dashboard``, ``delays``, ``deadlines``,
``finishes`` (finish hints), ``headers``,
``leases``, ``limits``, ``rates``, ``runs``, ``records``, ``events``, ``retention``,
``schedules``, ``versions``, and
``workers`` for the worker registry and queue statistics)
is the in-memory reference backend (or, where the bug lives in a query, the
SQLite backend) with exactly one promise of the storage
contract broken, the way a real adapter might get it wrong (a claim query
missing a clause, a fence that checks too little). Each has a
zero-argument factory usable as ``--reflow-storage=broken_adapters:<factory>``;
every call of one factory opens the same named store of this process, as a
second connection to one database would. ``correct`` is the unbroken backend,
the control; ``correct_millisecond_clock`` is the control for the one broken
adapter that runs on a millisecond clock.

The breakages override private helpers of :class:`~reflow_core.memory.MemoryStorage`
where that is the smallest change. If the memory backend is refactored and an
override stops taking effect, the adapter turns correct again and
``test_catches_broken_adapters`` fails, so a stale breakage cannot go unnoticed.

Loaded as a pytest plugin (``-p broken_adapters``), the module also registers
the Hypothesis profile :data:`NO_SHRINK_PROFILE` for those checks. They ask only
whether the suite fails and which promise it names, so they skip shrinking
(the stateful machine sleeps for real to let leases lapse, and shrinking a
failure it found replays those sleeps for minutes) and draw the same examples
on every run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import Phase, settings

from reflow_conformance import AdapterFactory
from reflow_core.memory import MemoryStorage
from reflow_sqlite import SQLiteStorage

from ._common import correct, correct_millisecond_clock
from .batches import (
    batch_blind_to_itself,
    batch_not_atomic,
    batch_raises_conflicts,
    get_runs_capped,
    get_runs_lists_missing,
)
from .children import (
    cancel_no_cascade,
    child_end_no_wake,
    child_outlives_parent,
    child_twice,
    unfenced_child,
    wakes_on_first_child,
)
from .claims import (
    claims_backlog_first,
    claims_newest_first,
    double_claim,
    limit_per_workflow,
    reclaims_first_workflow_only,
    sleep_resets_attempts,
)
from .dashboard import (
    buffered_by_name,
    history_counts_purged,
    history_counts_requeued,
    key_oldest_first,
)
from .deadlines import (
    caps_sleep_step,
    deadline_by_client_clock,
    ignores_deadline,
    requeue_keeps_deadline,
    sleep_ignores_deadline,
)
from .delays import (
    claims_delayed_early,
    delay_by_client_clock,
    delayed_as_pending,
    stats_delayed_as_pending,
)
from .events import (
    event_crosses_runs,
    events_dropped_on_pause,
    events_outlive_run,
    events_twice,
    unbounded_events,
)
from .finishes import hints_miss_cancels, hints_miss_cascade
from .headers import debounce_keeps_headers, drops_headers
from .leases import (
    fast_client_clock,
    immortal_leases,
    leases_lapse_at_random,
    no_fencing,
    skewed_now,
    split_fence,
)
from .limits import (
    blocked_after_cancel,
    ignores_limits,
    loses_turn,
    no_unblock,
    priority_ignored,
    reclaim_checks_limits,
    unblocks_last,
)
from .rates import (
    debounce_creates_new,
    debounce_keeps_first,
    debounce_replaces_claimed,
    ignores_rates,
    never_releases_rates,
    rate_window_off_by_one,
    releases_one_at_a_time,
    requeue_keeps_debounce_key,
)
from .records import (
    created_at_moves,
    lease_outlives_run,
    naive_reads,
    pending_without_wake_at,
    updated_at_stale,
)
from .retention import (
    purge_by_creation_time,
    purge_ignores_limit,
    purge_keeps_event_ids,
    purge_keeps_keys,
    purge_leaves_steps,
    purge_miscounts,
    purges_unfinished,
)
from .runs import (
    caseless_step_names,
    clamped_sleeps,
    key_freed_when_run_ends,
    lax_run_ids,
    lossy_requeue,
    no_idempotency,
    run_id_overwrites,
    sloppy_pagination,
    stale_reads,
)
from .schedules import (
    due_limit_before_workflows,
    due_paused,
    fires_paused,
    no_schedules,
    no_schedules_declared,
    schedule_forgets_created_at,
    schedule_slot_twice,
    upsert_unpauses,
)
from .versions import (
    claims_ignore_versions,
    lapsed_lease_ignores_versions,
    version_lost_on_debounce,
)
from .workers import (
    lists_lapsed_workers,
    oldest_by_creation,
    started_at_outlives_lapse,
    started_at_resets,
    stats_by_prefix,
    stats_count_finished,
    stats_skip_idle,
    workers_by_host_clock,
    workers_by_id,
)

__all__ = [
    "FACTORIES",
    "NO_SHRINK_PROFILE",
    "UNFINISHED",
    "batch_blind_to_itself",
    "batch_not_atomic",
    "batch_raises_conflicts",
    "blocked_after_cancel",
    "buffered_by_name",
    "cancel_no_cascade",
    "caps_sleep_step",
    "caseless_step_names",
    "child_end_no_wake",
    "child_outlives_parent",
    "child_twice",
    "claims_backlog_first",
    "claims_delayed_early",
    "claims_ignore_versions",
    "claims_newest_first",
    "clamped_sleeps",
    "correct",
    "correct_millisecond_clock",
    "created_at_moves",
    "deadline_by_client_clock",
    "debounce_creates_new",
    "debounce_keeps_first",
    "debounce_keeps_headers",
    "debounce_replaces_claimed",
    "delay_by_client_clock",
    "delayed_as_pending",
    "double_claim",
    "drops_headers",
    "due_limit_before_workflows",
    "due_paused",
    "event_crosses_runs",
    "events_dropped_on_pause",
    "events_outlive_run",
    "events_twice",
    "fast_client_clock",
    "fires_paused",
    "get_runs_capped",
    "get_runs_lists_missing",
    "hints_miss_cancels",
    "hints_miss_cascade",
    "history_counts_purged",
    "history_counts_requeued",
    "ignores_deadline",
    "ignores_limits",
    "ignores_rates",
    "immortal_leases",
    "key_freed_when_run_ends",
    "key_oldest_first",
    "lapsed_lease_ignores_versions",
    "lax_run_ids",
    "lease_outlives_run",
    "leases_lapse_at_random",
    "limit_per_workflow",
    "lists_lapsed_workers",
    "loses_turn",
    "lossy_requeue",
    "naive_reads",
    "never_releases_rates",
    "no_fencing",
    "no_idempotency",
    "no_schedules",
    "no_schedules_declared",
    "no_unblock",
    "oldest_by_creation",
    "pending_without_wake_at",
    "priority_ignored",
    "purge_by_creation_time",
    "purge_ignores_limit",
    "purge_keeps_event_ids",
    "purge_keeps_keys",
    "purge_leaves_steps",
    "purge_miscounts",
    "purges_unfinished",
    "rate_window_off_by_one",
    "reclaim_checks_limits",
    "reclaims_first_workflow_only",
    "releases_one_at_a_time",
    "requeue_keeps_deadline",
    "requeue_keeps_debounce_key",
    "run_id_overwrites",
    "schedule_forgets_created_at",
    "schedule_slot_twice",
    "skewed_now",
    "sleep_ignores_deadline",
    "sleep_resets_attempts",
    "sloppy_pagination",
    "split_fence",
    "stale_reads",
    "started_at_outlives_lapse",
    "started_at_resets",
    "stats_by_prefix",
    "stats_count_finished",
    "stats_delayed_as_pending",
    "stats_skip_idle",
    "unblocks_last",
    "unbounded_events",
    "unfenced_child",
    "updated_at_stale",
    "upsert_unpauses",
    "version_lost_on_debounce",
    "wakes_on_first_child",
    "workers_by_host_clock",
    "workers_by_id",
]

NO_SHRINK_PROFILE = "reflow-ci-no-shrink"
"""The suite's ``reflow-ci`` profile without shrinking, derandomized (the same
examples every run) and without an example database."""


@pytest.hookimpl(tryfirst=True)
def pytest_configure() -> None:
    # Every entry-point plugin is imported by now, so reflow-ci is registered;
    # tryfirst registers this profile before Hypothesis loads the chosen one.
    settings.register_profile(
        NO_SHRINK_PROFILE,
        parent=settings.get_profile("reflow-ci"),
        # Twice reflow-ci's examples: the machine's interleavings depend on
        # timing (runs created in one millisecond order by their random ids),
        # so a broken adapter it catches is caught on more than one of them.
        # A run stops at its first failure; only the controls pay in full.
        max_examples=40,
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
        database=None,
    )


FACTORIES: dict[str, Callable[[], MemoryStorage | SQLiteStorage]] = {
    factory.__name__: factory
    for factory in (
        double_claim,
        reclaims_first_workflow_only,
        claims_backlog_first,
        limit_per_workflow,
        claims_newest_first,
        sleep_resets_attempts,
        no_fencing,
        immortal_leases,
        skewed_now,
        split_fence,
        leases_lapse_at_random,
        fast_client_clock,
        no_idempotency,
        lossy_requeue,
        lax_run_ids,
        clamped_sleeps,
        sloppy_pagination,
        stale_reads,
        run_id_overwrites,
        key_freed_when_run_ends,
        caseless_step_names,
        created_at_moves,
        updated_at_stale,
        pending_without_wake_at,
        lease_outlives_run,
        naive_reads,
        events_twice,
        event_crosses_runs,
        unbounded_events,
        events_outlive_run,
        events_dropped_on_pause,
        purges_unfinished,
        purge_by_creation_time,
        purge_miscounts,
        purge_ignores_limit,
        purge_keeps_keys,
        purge_leaves_steps,
        purge_keeps_event_ids,
        schedule_slot_twice,
        schedule_forgets_created_at,
        due_paused,
        due_limit_before_workflows,
        upsert_unpauses,
        fires_paused,
        lists_lapsed_workers,
        workers_by_host_clock,
        started_at_resets,
        started_at_outlives_lapse,
        workers_by_id,
        stats_count_finished,
        stats_by_prefix,
        stats_skip_idle,
        oldest_by_creation,
        claims_delayed_early,
        delayed_as_pending,
        delay_by_client_clock,
        stats_delayed_as_pending,
        ignores_deadline,
        sleep_ignores_deadline,
        caps_sleep_step,
        requeue_keeps_deadline,
        deadline_by_client_clock,
        child_twice,
        unfenced_child,
        cancel_no_cascade,
        child_end_no_wake,
        wakes_on_first_child,
        child_outlives_parent,
        ignores_limits,
        loses_turn,
        priority_ignored,
        no_unblock,
        unblocks_last,
        reclaim_checks_limits,
        blocked_after_cancel,
        ignores_rates,
        rate_window_off_by_one,
        never_releases_rates,
        releases_one_at_a_time,
        debounce_creates_new,
        debounce_keeps_first,
        requeue_keeps_debounce_key,
        debounce_replaces_claimed,
        drops_headers,
        debounce_keeps_headers,
        key_oldest_first,
        buffered_by_name,
        history_counts_requeued,
        history_counts_purged,
        batch_not_atomic,
        batch_blind_to_itself,
        batch_raises_conflicts,
        get_runs_capped,
        get_runs_lists_missing,
        hints_miss_cancels,
        hints_miss_cascade,
        claims_ignore_versions,
        version_lost_on_debounce,
        lapsed_lease_ignores_versions,
    )
}
"""Every broken adapter's factory by name (``correct`` is not among them)."""

UNFINISHED: dict[str, Callable[[], MemoryStorage | AdapterFactory]] = {
    no_schedules.__name__: no_schedules,
    no_schedules_declared.__name__: no_schedules_declared,
}
"""Adapters that lack an area of the contract, undeclared and declared (not
broken adapters: they are checked by their own tests, not by a ``Case``)."""
