"""The promises of the storage contract, in words.

Every check in the suite names one of these when it fails (see
:func:`reflow_conformance.promise`), so a failure report says which promise
the adapter broke.
"""

from __future__ import annotations

IDEMPOTENT_CREATE = "same idempotency key and equal input returns the same run"
IDEMPOTENCY_CONFLICT = "same idempotency key with a different input is a conflict"
IDEMPOTENCY_SCOPE = "idempotency keys are scoped per workflow"
ONE_RUN_PER_KEY = "concurrent creates with one idempotency key produce exactly one run"
CREATE_SHAPE = "a created run is pending with zero attempts, reclaims and epoch"
ONE_LIVE_LEASE = "a run is held by at most one live lease"
CLAIM_LIMIT = "a claim takes at most `limit` runs, of the named workflows only"
CLAIM_COUNTS = "every claim increments attempts and lease_epoch"
RECLAIM_AFTER_LAPSE = "once a lease lapses the run can be reclaimed, counted as a reclaim"
STALE_LEASE_REFUSED = "a lapsed or superseded lease's heartbeats and writes are all refused"
LIVE_LEASE_ACCEPTED = "a live lease's heartbeats and writes are accepted"
HEARTBEAT_EXTENDS = "a heartbeat keeps a lease alive past its original length"
NO_LOST_RUNS = "no run is lost or duplicated"
STEP_SAVED = "a saved step reads back exactly as written"
FINISH_ATOMIC = "finish_run stores the last step and the terminal status together"
TERMINAL_STAYS = "a finished run is never claimed again"
HAND_BACK = "a run handed back is pending, claimable, and not counted as a reclaim"
CANCEL = "cancelling a run ends it and breaks its holder's fence"
NOT_DUE_NOT_CLAIMABLE = "sleeping and waiting runs are not claimable before they are due"
DUE_CLAIMABLE = "sleeping and waiting runs are claimable once due"
DEADLINE_FIXED = "a sleep or wait deadline is fixed the first time it is reached"
EVENT_ONCE_IN_ORDER = "a buffered event is consumed once, oldest first"
EVENT_ISOLATION = "events never cross runs or event names"
EVENT_BEFORE_WAIT = "an event delivered before a wait leaves the run runnable, not stranded"
EVENT_WAKES = "an event for a waiting run makes it claimable"
EVENT_DEDUPE = "a repeated event id is delivered once"
DELIVER_FINISHED = "events for missing or finished runs are refused"
REQUEUE = "requeue keeps completed steps and drops failed ones"
PAGINATION = "keyset pagination visits every matching run exactly once, newest first"
SCHEDULE_KEEP_CADENCE = "re-registering a schedule with the same recurrence keeps its next slot"
SCHEDULE_SLOT_ONCE = "a schedule slot is claimed once"
ROUND_TRIP = "values round-trip exactly through the codec and the store"
MISSING_IS_NONE = "reading a missing run gives None, not an error"
