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
EVENT_BUFFER_CAP = (
    "a run holding max_buffered untaken events refuses another with EventBufferFullError, "
    "storing nothing"
)
EVENT_BUFFER_ALL_NAMES = "the cap on buffered events counts untaken events of every name"
EVENT_BUFFER_FULL_DEDUPE = "a repeated event id is still acknowledged when the buffer is full"
EVENT_BUFFER_TAKE_FREES = "taking an event frees room under the cap on buffered events"
EVENTS_END_WITH_RUN = "a run's buffered events are dropped when it finishes, fails or is cancelled"
REQUEUE = "requeue keeps completed steps and drops failed ones"
PAGINATION = "keyset pagination visits every matching run exactly once, newest first"
SCHEDULE_KEEP_CADENCE = "re-registering a schedule with the same recurrence keeps its next slot"
SCHEDULE_SLOT_ONCE = "a schedule slot is claimed once"
ROUND_TRIP = "values round-trip exactly through the codec and the store"
MISSING_IS_NONE = "reading a missing run gives None, not an error"
CLAIMED_RUNNING = "a claimed run is running under a lease of the requested length"
CLAIM_CARRIES_STEPS = "a claimed run carries its saved steps"
SAVE_EXTENDS = "saving a step renews the lease"
STATUS_UPDATE_ARGS = "update_run_status refuses a bad target, or pending without a lease, unchanged"
REQUEUE_ONLY_ENDED = "requeue applies only to failed or cancelled runs and changes nothing else"
CONCURRENT_ACCESS = "concurrent callers on several connections or processes get answers, not errors"
STATE_MATCHES_MODEL = "every run, step and schedule reads back as the operations so far left it"
RECLAIM_PREFERRED = "a claim takes runs with lapsed leases before other claimable runs"
DEADLINE_FROM_DURATION = "a sleep or wait deadline is the storage's now plus the duration given"
STORAGE_CLOCK = (
    "now() is aware UTC and is the clock the storage judges by: leases, deadlines and due schedules"
)
PAUSE_DROPS_LEASE = "a sleeping run, or a waiting run with no event buffered, holds no lease"
PAUSE_RECORDED = "a sleep or wait is recorded on the run and as its step, with its deadline"
PAUSE_REPLACES_RECORD = "a sleep or wait replaces a record of its step that has another status"
WAIT_READY_KEEPS_LEASE = (
    "a wait for an already buffered event keeps the run running under its lease"
)
EVENT_BUFFERED = "an event for a live run is buffered until taken, whatever the run's status"
EVENT_TAKE_SAVES = "taking an event saves it as the wait step's result; a retried take repeats it"
LIST_FILTERS = "list_runs returns exactly the runs matching its status and workflow filters"
LIST_ARGS = "list_runs refuses a malformed cursor or a limit below 1 with ConfigError"
SCHEDULE_STORED = "a schedule reads back as registered; a changed recurrence replaces it"
SCHEDULE_DELETE = "deleting a schedule removes it and says whether there was one"
SCHEDULE_ORDER = "schedules are listed by key"
SCHEDULE_DUE = "due_schedules gives the schedules due by now, earliest first, at most `limit`"
SCHEDULE_DUE_FILTERED = (
    "due_schedules with `workflows` gives only the due schedules of those workflows, earliest "
    "first then by key, up to `limit` (none for an empty collection); without, those of every "
    "workflow"
)
SCHEDULE_SLOT_FIRES = "firing a schedule's current slot creates its run and moves the schedule on"
TEXT_KEPT = "names, run ids and keys of any text without NUL or lone surrogates are kept exactly"
BAD_TEXT_REFUSED = (
    "a name, run id or key that is not a non-empty str, or holds a NUL or a lone surrogate, "
    "is refused with ConfigError and nothing is written"
)
DURATION_BOUNDS = (
    "a lease, sleep or wait duration outside 0 to 100 years is refused with ConfigError "
    "and nothing is written"
)
PURGE_LEAVES_NOTHING = (
    "a purged run is gone with its steps, events and event ids: get_run gives None, "
    "get_step_results nothing, and a new run with its id starts empty"
)
PURGE_FREES_KEY = "a purged run's idempotency key is free again: a create with it makes a new run"
PURGE_UNFINISHED_KEPT = "purge_finished never touches a run that has not finished, however old"
PURGE_BY_FINISH_TIME = (
    "purge_finished deletes the runs that finished more than older_than ago by the storage "
    "clock, and no run that finished after that cut-off"
)
PURGE_RACING_FINISH = "a run that finishes while a purge runs is younger than its cut-off and stays"
PURGE_OLDEST_FIRST = "purge_finished deletes the runs that finished first before later ones"
PURGE_LIMIT = (
    "one purge_finished call deletes at most `limit` runs, and that many when as many are due"
)
PURGE_BATCHES = "a batch smaller than the runs due still deletes them all when there is no limit"
PURGE_COUNT = "purge_finished returns the number of runs it deleted"
PURGE_ARGS = (
    "purge_finished refuses a negative older_than, a batch below 1, or a limit below 1 or a "
    "bool, with ConfigError, deleting nothing"
)
WRITES_SEEN_EVERYWHERE = (
    "what one connection writes, every other connection reads and claims at once: "
    "steps, their updates, and the run's status"
)
CLAIM_EVERY_WORKFLOW = (
    "a claim for several workflows takes the claimable runs, lapsed leases included, of each"
)
FENCE_RACES_CANCEL = (
    "a fenced write racing a cancel or requeue of its run lands before it or is refused: "
    "a cancel or requeue that reported success is never undone"
)
FENCE_RACES_RECLAIM = (
    "a holder's write racing a reclaim of its lapsed lease lands before it or is refused: "
    "never both"
)
LEASE_LIVES_ITS_LENGTH = (
    "a lease stays live for its whole length by the storage clock, whichever connection judges it"
)
RECORD_CREATED_FIXED = "a run's created_at is the storage's now at its creation and never changes"
RECORD_UPDATED_ON_WRITE = (
    "a run's updated_at is its created_at on create, then the storage's now at every write"
)
RECORD_WAKE_AT = (
    "a run's wake_at is its created_at when new (plus its delay, if it was created delayed), "
    "now when handed back, requeued or woken by its event, its sleep's or wait's deadline "
    "while paused (or its own deadline_at, if that comes first), and None while running or ended"
)
RECORD_LEASE_EXPIRES = (
    "a run's lease_expires_at is set only while it is running, to the storage's now at its "
    "claim or last renewal plus the lease, and None otherwise"
)
NEW_RUN_CLAIMABLE = "a new run is due at once: a claim of its workflow takes it"
TERMINAL_UNCHANGED = (
    "cancelling or failing a run that has ended (completed, failed or cancelled) reports False "
    "and changes nothing"
)
RECORD_TIMES_AWARE = (
    "every time the storage returns is an aware UTC datetime: on runs, steps, schedules, "
    "deadlines and now()"
)
RUN_ID_TAKEN = "a create with the id of an existing run raises StorageError and changes nothing"
KEY_OUTLIVES_RUN = (
    "an idempotency key names its run after the run completes, fails or is cancelled, "
    "until the run is purged"
)
LOOKALIKES_DISTINCT = (
    "names, run ids and keys that differ only by case, by surrounding spaces or by Unicode "
    "normalization are different names"
)
DUE_ORDER = (
    "a claim takes a workflow's due runs in the order they fell due, earliest first, "
    "after any lapsed leases"
)
ONLY_CLAIMS_COUNT = (
    "attempts and lease_epoch change only when the run is claimed; reclaims only when a "
    "claim takes over a lapsed lease, or a requeue resets it"
)
SCHEDULE_PAUSE_SET = (
    "set_schedule_paused sets the paused flag, and the next slot only when one is given, "
    "changes nothing else and returns the schedule as stored; for a missing key it returns "
    "None and creates nothing"
)
SCHEDULE_PAUSED_NOT_DUE = "a paused schedule is never due, however far its next slot has passed"
SCHEDULE_PAUSED_NO_FIRE = (
    "a paused schedule's slot does not fire: claim_schedule_slot returns None and creates no run"
)
SCHEDULE_PAUSE_KEPT = (
    "re-registering a schedule keeps it paused or running, whatever its recurrence; "
    "a new schedule is not paused"
)
SCHEDULE_PAUSE_ARGS = (
    "set_schedule_paused refuses a naive next_run_at with ConfigError and changes nothing"
)
WORKER_STORED = (
    "announce_worker returns the worker's entry as stored, and list_workers lists it so: "
    "every field as announced, its workflows in the order given"
)
WORKER_TIMES = (
    "a worker entry's last_seen_at is the storage's now at its latest announcement, "
    "and its expires_at exactly that plus the ttl"
)
WORKER_STARTED_KEPT = (
    "a worker that announces itself again while its entry is live keeps its started_at"
)
WORKER_STARTED_RESET = (
    "a worker that announces itself after its entry lapsed or was removed starts anew: "
    "its started_at is the storage's now"
)
WORKER_LAPSED_UNLISTED = (
    "a worker entry whose expires_at has passed by the storage clock is never listed, "
    "and a live one always is"
)
WORKER_REMOVE = (
    "remove_worker deletes a live entry and returns True, and returns False when there is none"
)
WORKER_ORDER = "workers are listed by started_at, then by id"
WORKER_ARGS = (
    "announce_worker refuses a worker with a bad id, host, pid, workflows, concurrency or "
    "in_flight, or a ttl that is not a positive duration, with ConfigError, storing nothing"
)
STATS_COUNTS = (
    "queue_stats counts a workflow's unfinished runs by their status, as every transition "
    "leaves them: a running run counts as running whether its lease is live or lapsed"
)
STATS_FINISHED_UNCOUNTED = (
    "queue_stats never counts a run that finished: completed, failed and cancelled runs are history"
)
STATS_ISOLATION = "queue_stats counts each workflow's runs in its own entry, never in another's"
STATS_ENTRIES = (
    "queue_stats gives one entry per workflow named, zeros included, or without names one "
    "per workflow with an unfinished run, ordered by workflow name"
)
STATS_OLDEST_PENDING = (
    "oldest_pending_since is the earliest wake_at of the workflow's pending runs, "
    "and None when none is pending"
)
STATS_ARGS = (
    "queue_stats refuses a bare string or a bad workflow name in place of the workflows "
    "with ConfigError"
)
CREATE_DELAYED = (
    "a run created with a positive delay is delayed, with zero attempts, reclaims and epoch "
    "and no lease; with no delay or a zero one it is pending, due at once"
)
DELAY_FROM_STORAGE_CLOCK = (
    "a delayed run's wake_at is the storage's now at its creation plus the delay: its "
    "created_at plus the delay, to the millisecond"
)
DELAYED_NOT_CLAIMABLE = "a delayed run is not claimable before its wake_at by the storage clock"
DELAYED_CLAIMABLE = (
    "a delayed run is claimable once its wake_at has passed, as a first claim (not a reclaim), "
    "running under a new lease"
)
DELAYED_IDEMPOTENT = (
    "a create that hits an existing run's idempotency key returns that run unchanged, "
    "whatever delay it asks for: it neither delays nor hastens it"
)
STATS_DELAYED = (
    "queue_stats counts delayed runs as delayed, due or not, never as pending, and they "
    "do not move oldest_pending_since"
)
DELAY_ARGS = (
    "create_run refuses a delay that is not a timedelta from 0 to 100 years with ConfigError, "
    "and writes nothing"
)
RUN_DEADLINE_FROM_STORAGE_CLOCK = (
    "a run's deadline_at is the storage's now at its creation plus NewRun.deadline: its "
    "created_at plus the deadline, to the millisecond; None for a run created without one"
)
RUN_DEADLINE_KEPT = (
    "a run's deadline_at changes only by a requeue: claims, heartbeats, saves, sleeps, waits, "
    "events, hand-backs, ends and repeated creates with its key all keep it"
)
RUN_DEADLINE_CAPS_DELAY = (
    "a delayed run whose deadline comes before its delay's end is due at its deadline: "
    "its wake_at is its deadline_at"
)
RUN_DEADLINE_CAPS_SLEEP = (
    "a sleeping run's wake_at is the earlier of its sleep's end and its deadline_at; the step "
    "record and sleep_run's result keep the sleep's own end, the storage's now plus the duration"
)
RUN_DEADLINE_CAPS_WAIT = (
    "a waiting run's wake_at is the earlier of its wait's deadline and its deadline_at (its "
    "deadline_at for a wait without a timeout); the step record and WaitResult.deadline keep "
    "the wait's own deadline, None without a timeout"
)
RUN_DEADLINE_CLAIMABLE = (
    "a delayed, sleeping or waiting run is claimable once its deadline_at has passed by the "
    "storage clock, as a first claim under a new lease"
)
RUN_DEADLINE_REQUEUE = "requeue_run clears deadline_at: a requeued run has no deadline"
RUN_DEADLINE_SCHEDULED = (
    "a run fired by claim_schedule_slot has the deadline of the NewRun given, as create_run "
    "would give it"
)
RUN_DEADLINE_ARGS = (
    "create_run and claim_schedule_slot refuse a deadline that is not a timedelta from 0 to "
    "100 years with ConfigError, and write nothing"
)
CHILD_START = (
    "start_child creates the child as create_run would (pending, or delayed with a delay; zero "
    "attempts, reclaims and epoch), linked to its parent: parent_id is the lease's run, "
    "parent_step the step given"
)
CHILD_START_ONCE = (
    "start_child with the id of an existing child of the same run and step returns that child "
    "as stored and writes nothing: a replayed step never starts a second child"
)
CHILD_ID_TAKEN = (
    "start_child with a run id taken by a run that is not that parent's child at that step "
    "raises StorageError and writes nothing"
)
CHILD_FENCED = (
    "start_child and wait_children on a lost lease (lapsed, superseded, cancelled, finished) "
    "return None and write nothing"
)
CHILD_DEADLINE = (
    "a child's deadline_at is the earlier of the storage's now plus NewRun.deadline and its "
    "parent's deadline_at; None only when both are absent"
)
CHILD_WAIT_READY = (
    "wait_children when every child of the run at that step has ended (or there is none) "
    "returns True, saves the step record and leaves the run running under its lease"
)
CHILD_WAIT_PARKS = (
    "wait_children while a child at that step is unfinished returns False, saves the step "
    "record, and leaves the run waiting, its lease dropped, waiting_for the children prefix and "
    "the step, not claimable before a child ends (or its deadline)"
)
CHILD_END_WAKES = (
    "the write that ends a waiting parent's last unfinished child at that step (finish_run, or "
    "update_run_status to failed or cancelled) makes the parent claimable at once, as a first "
    "claim under a new lease"
)
CHILD_WAKE_LAST = (
    "a waiting parent stays unclaimable while another child of it at that step is unfinished; "
    "children at other steps neither hold nor wake it"
)
CANCEL_CASCADES = (
    "cancelling a run cancels every unfinished run below it (children, grandchildren) in the "
    "same write, breaking their leases; finished ones are left as they are"
)
CHILDREN_LISTED = (
    "list_children returns the run's children, as stored, in creation order (created_at, then "
    "id); nothing for a run without children or a missing run"
)
CHILD_ARGS = (
    "start_child refuses a NewRun without a run_id, with an idempotency_key, or with bad names "
    "or durations, with ConfigError, and writes nothing"
)
PRIORITY_ORDER = (
    "a claim takes due runs by priority, highest first, then by due time, earliest first; "
    "runs with lapsed leases before all of them"
)
PRIORITY_STORED = (
    "a run's priority reads back as created (0 by default), by create_run, start_child and "
    "claim_schedule_slot alike, and no later write changes it"
)
LIMITS_STORED = (
    "a run's concurrency limits read back as created, in the order given (none by default), "
    "by create_run, start_child and claim_schedule_slot alike, and no later write changes them"
)
LIMIT_NEVER_EXCEEDED = (
    "never more than max runs holding a limit's key are running at once (lapsed leases "
    "included), runs taken earlier in the same claim counting, whatever the connections"
)
LIMIT_BLOCKED = (
    "a claimable run a claim passes over because one of its limits is full has blocked_by "
    "that key, and no claim takes it while it is blocked, even after its turn has come"
)
LIMIT_UNBLOCKED = (
    "the write that stops a run holding a key (finish_run, update_run_status of any kind, "
    "a cancel or its cascade, sleep_run, wait_run or wait_children that park it) lets go "
    "exactly the blocked run of that key a claim would take first: blocked_by None, "
    "claimable at once"
)
LIMIT_RECLAIM = (
    "a run with a lapsed lease is reclaimed whatever its limits (it still holds its slots) "
    "and is never blocked"
)
LIMIT_CANCEL_CLEARS = (
    "a cancelled run has blocked_by None, and a requeued run is pending with blocked_by None"
)
LIMIT_ARGS = (
    "create_run, start_child and claim_schedule_slot refuse a priority outside "
    "PRIORITY_RANGE or not an int, and limits that are not a tuple of at most MAX_RUN_LIMITS "
    "ConcurrencyLimit with distinct good keys and a max of at least 1, with ConfigError, "
    "writing nothing"
)
LIMIT_TURN_PASSED = (
    "a run that is not blocked and ends without running (cancelled or failed without a lease, "
    "a run let go by a slot before any claim took it) lets the first blocked run of each of "
    "its keys that has room go, in the same write, so a freed slot is never lost"
)
RATES_STORED = (
    "a run's rate limits read back as created, in the order given (none by default), and its "
    "debounce_key as given (None by default), by create_run, start_child and "
    "claim_schedule_slot alike, and no claim or later write changes them"
)
RATE_NEVER_EXCEEDED = (
    "no window of a rate's period holds more than max claims of runs holding its key, "
    "claims in one call and claims of runs of other workflows counting, whatever the "
    "connections"
)
RATE_BLOCKED = (
    "a due run a claim passes over because one of its rates is full has blocked_by "
    "RATE_BLOCK_PREFIX and that key (a full limit's key first), and no claim takes it "
    "while the rate's window stays full"
)
RATE_RELEASED = (
    "once a rate's window has room again, the next claim, whatever workflows it asks for, "
    "lets go the key's first blocked runs, by priority then due time, as many as there is "
    "room for, and the others stay blocked"
)
RATE_RECLAIM = (
    "a run with a lapsed lease is reclaimed only while its rates have room, the reclaim "
    "counting as a claim; otherwise it is left as it is, running on its lapsed lease and "
    "not blocked, for a later claim"
)
RATE_OTHERS_UNDELAYED = (
    "runs blocked by a rate take no place in a claim: a claim of limit n takes n other "
    "claimable runs however many blocked runs of a higher priority are due"
)
RATE_ARGS = (
    "create_run, start_child and claim_schedule_slot refuse rates that are not a tuple of "
    "at most MAX_RUN_RATES RateLimit with distinct good keys, a max from 1 to MAX_RATE (not "
    "a bool) and a period of whole milliseconds from 1 ms to MAX_RATE_PERIOD, and a limit "
    "key starting with RATE_BLOCK_PREFIX, with ConfigError, writing nothing"
)
DEBOUNCE_REPLACES = (
    "a create with the workflow and debounce_key of an open run (pending or delayed, never "
    "claimed) returns that run with created=False, holding the new input, priority, limits "
    "and rates, not blocked, due the new delay from now (never after its deadline), its id, "
    "created_at and deadline_at kept, and makes no other run"
)
DEBOUNCE_AFTER_CLAIM = (
    "once a claim has taken a debounced run, or it has ended, the next create with its key "
    "makes a new run; runs of other workflows, other debounce keys or none are never replaced"
)
DEBOUNCE_REQUEUE = (
    "requeue_run of a debounced run never claimed makes it open for its key again, unless "
    "another open run of its workflow holds the key: then its debounce_key is cleared and "
    "creates with the key keep replacing the other"
)
DEBOUNCE_ONE_OPEN = (
    "concurrent creates with one workflow and debounce_key, on several connections, "
    "leave exactly one open run, which all of them return"
)
DEBOUNCE_ARGS = (
    "create_run and claim_schedule_slot refuse a debounce_key with an idempotency_key, or a "
    "bad debounce_key, and start_child any debounce_key, with ConfigError, writing nothing"
)
HEADERS_STORED = (
    "a run's headers read back as given, names and values exactly ({} by default), by "
    "create_run, start_child and claim_schedule_slot alike; no claim, step save, sleep, wait, "
    "finish or requeue changes them, and a debounced create replaces them with its own"
)
HEADERS_ARGS = (
    "create_run, start_child and claim_schedule_slot refuse headers that are not a mapping of "
    "at most MAX_HEADERS names matching [a-z0-9_.-]{1,64} to printable-ASCII values, within "
    "MAX_HEADER_BYTES in all, with ConfigError, writing nothing"
)
RUNS_BY_KEY = (
    "find_runs_by_key returns the stored runs created with that idempotency key, of every "
    "workflow and in every status, as stored, and no others: nothing for a key no stored run "
    "has, nor for a purged run"
)
RUNS_BY_KEY_ORDER = (
    "find_runs_by_key lists runs newest first (created_at, then id), at most `limit`: "
    "the newest `limit` of them"
)
BUFFERED_LISTED = (
    "list_buffered_events returns exactly the run's events not taken yet, each with its name, "
    "payload and event_id as delivered: a taken event, a repeated event id or another run's "
    "event is not listed"
)
BUFFERED_ORDER = (
    "list_buffered_events lists a run's buffered events in arrival order across their names "
    "(the order take_event takes them in), the first `limit` of them"
)
BUFFERED_ENDED = (
    "list_buffered_events returns nothing for a missing run or a finished one, and a requeued "
    "run lists only what was delivered after its requeue"
)
HISTORY_COUNTS = (
    "finished_history counts every stored finished run once, by its status, in the minute it "
    "finished (its updated_at as it ended) by the storage clock; the minutes come oldest "
    "first, each once, as aware UTC datetimes with zero seconds"
)
HISTORY_WINDOW = (
    "finished_history(minutes) covers the current minute by the storage clock and the "
    "minutes - 1 before it and nothing else: a run that finished before them is not counted, "
    "and minutes in which no run finished are left out"
)
HISTORY_REQUEUE = (
    "a requeued run no longer counts in finished_history, and counts again, with its new "
    "status, in the minute it finishes again"
)
HISTORY_PURGE = "a purged run no longer counts in finished_history"
DASHBOARD_ARGS = (
    "find_runs_by_key and list_buffered_events refuse a limit that is not an int of at least 1 "
    "(a bool too), finished_history refuses minutes that are not an int from 1 to "
    "MAX_HISTORY_MINUTES, and all three a bad key or run id, with ConfigError, writing nothing"
)

BATCH_OUTCOMES = (
    "create_runs gives each item, at its index, the outcome create_run would give it if the "
    "items were created one after another: created, found by its idempotency key, or an "
    "IdempotencyConflictError returned in its place (that item writes nothing, the others "
    "are created)"
)
BATCH_SEES_EARLIER = (
    "items of one create_runs batch see the items before them: a repeated idempotency key "
    "returns the earlier item's run (a different input is a conflict), a repeated debounce "
    "key updates the run the earlier item made or found"
)
BATCH_SHAPE = (
    "runs made by create_runs are stored and returned as create_run stores them: status, "
    "due time, deadline, priority, limits, rates and headers"
)
BATCH_ALL_OR_NOTHING = (
    "a create_runs batch refused for any of its items (malformed, a run id taken or given "
    "twice) or for its size writes nothing"
)
BATCH_ARGS = (
    "create_runs refuses a malformed item with a ConfigError naming its index, and a batch of "
    "more than MAX_CREATE_BATCH items with a ConfigError"
)
GET_RUNS = (
    "get_runs returns the stored runs among the ids given, each as get_run reads it, by id; "
    "a missing run is left out, an id given twice is read once, no ids read nothing"
)
GET_RUNS_ARGS = (
    "get_runs refuses one string instead of a collection of ids, an id check_text refuses and "
    "more than MAX_GET_RUNS distinct ids with a ConfigError"
)
FINISH_HINTED = (
    "a store that sends finish hints (FinishSource) tells every subscriber of every run that "
    "ends, however it ends (finished completed or failed, with or without a last step, "
    "cancelled pending or running, cancelled by its parent's cascade): it names the run, or "
    "calls notify(None) after the end, within 5 seconds"
)
FINISH_HINT_CLOSED = "a closed finish subscription is told nothing more"
VERSION_STORED = (
    "a run's version and fingerprint read back as created (version 1 and fingerprint None by "
    "default), from create_run, create_runs, start_child, get_run, get_runs, list_runs and "
    "the claim alike; no claim or later write changes them, and a debounced create replaces "
    "them with its own"
)
CLAIM_VERSIONS_SERVED = (
    "a claim with `versions` takes only runs of the versions listed for the workflows it "
    "keys, and runs of any version of the others; it leaves every other run as it was "
    "(status, attempts, lease_epoch, blocked_by and wake_at), a lapsed lease included, and "
    "however many of them come first they never keep a served run from being taken, which "
    "it takes in priority order across the versions served"
)
CLAIM_VERSIONS_CHECKED = (
    "claim_runs refuses `versions` naming a workflow it is not asked for, or giving one an "
    "empty collection or a version that is not an int from 1 to MAX_VERSION (a bool, a str), "
    "and create_run a bad version or a fingerprint that is not 1 to MAX_FINGERPRINT "
    "characters of 0-9 a-z, with ConfigError, claiming and writing nothing"
)
