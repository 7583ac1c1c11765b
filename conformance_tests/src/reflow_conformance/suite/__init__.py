"""The storage contract's tests.

Run them with ``pytest --pyargs reflow_conformance.suite --reflow-storage=...``,
or import them into one of your test modules to run them there with your own
``reflow_storage_factory`` fixture::

    from reflow_conformance.suite import *  # noqa: F403

Each module lists its test classes in ``__all__``.
"""

from __future__ import annotations

from .test_arguments import *  # noqa: F403
from .test_children import *  # noqa: F403
from .test_claims import *  # noqa: F403
from .test_clock import *  # noqa: F403
from .test_codec import *  # noqa: F403
from .test_connections import *  # noqa: F403
from .test_create_many import *  # noqa: F403
from .test_dashboard_reads import *  # noqa: F403
from .test_deadlines import *  # noqa: F403
from .test_delayed import *  # noqa: F403
from .test_event_buffer import *  # noqa: F403
from .test_events import *  # noqa: F403
from .test_finish_hints import *  # noqa: F403
from .test_get_runs import *  # noqa: F403
from .test_headers import *  # noqa: F403
from .test_leases import *  # noqa: F403
from .test_limits import *  # noqa: F403
from .test_listing import *  # noqa: F403
from .test_lookalikes import *  # noqa: F403
from .test_process_crash import *  # noqa: F403
from .test_processes import *  # noqa: F403
from .test_queue_stats import *  # noqa: F403
from .test_races import *  # noqa: F403
from .test_rates import *  # noqa: F403
from .test_records import *  # noqa: F403
from .test_retention import *  # noqa: F403
from .test_runs import *  # noqa: F403
from .test_schedules import *  # noqa: F403
from .test_sleep_wait import *  # noqa: F403
from .test_stateful import *  # noqa: F403
from .test_steps import *  # noqa: F403
from .test_versions import *  # noqa: F403
from .test_workers import *  # noqa: F403
