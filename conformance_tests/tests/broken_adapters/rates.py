"""Adapters that break a promise about rate limits and debounced creates:
the count of a rate's window, the release of its blocked runs, and which
run a create with a debounce key replaces."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from reflow_core.adapter import rate_block
from reflow_core.memory import MemoryStorage
from reflow_core.storage import NewRun, RateLimit, RunRecord

from ._common import _store


class IgnoresRates(MemoryStorage):
    """Breaks *no window of a rate's period holds more than max claims*: a
    claim never finds a rate full, as a claim query that forgot the rates
    would; a workflow limited to ten calls a minute makes them all at once."""

    def _rate_full(self, rec: RunRecord, now: datetime) -> tuple[RateLimit, datetime] | None:
        return None


def ignores_rates() -> MemoryStorage:
    return IgnoresRates(name=_store("ignores_rates"))


class RateWindowOffByOne(MemoryStorage):
    """Breaks *no window holds more than max claims*: a rate is full only
    once its window holds more than ``max`` claims, as a comparison written
    ``>`` for ``>=`` would; every window lets one claim too many in."""

    def _rate_full(self, rec: RunRecord, now: datetime) -> tuple[RateLimit, datetime] | None:
        for rate in rec.rates:
            window = self._in_window(rate, now)
            if len(window) > rate.max:
                return rate, window[len(window) - rate.max - 1] + rate.period
        return None


def rate_window_off_by_one() -> MemoryStorage:
    return RateWindowOffByOne(name=_store("rate_window_off_by_one"))


class NeverReleasesRates(MemoryStorage):
    """Breaks *once a rate's window has room, a claim lets its first blocked
    runs go*: a run blocked by a rate stays blocked for good, as a backend
    that marks runs blocked but never looks at the key again would; once a
    rate has been full, its waiting runs never start."""

    def _release_rates(self, now: datetime) -> None:
        return None


def never_releases_rates() -> MemoryStorage:
    return NeverReleasesRates(name=_store("never_releases_rates"))


class ReleasesOneAtATime(MemoryStorage):
    """Breaks *a claim lets go as many blocked runs as the window has room
    for*: one blocked run goes per window, as a release that unblocks only the
    first would; a rate of 100 a minute runs once a minute after a burst."""

    def _release_rates(self, now: datetime) -> None:
        for key, at in list(self._rate_waits.items()):
            if at > now:
                continue
            del self._rate_waits[key]
            blocked = self._blocked.get(rate_block(key))
            if not blocked:
                continue
            self._unblock(rate_block(key), now)
            if blocked:
                rate = next(r for r in self._runs[next(iter(blocked))].record.rates if r.key == key)
                self._rate_waits[key] = now + rate.period


def releases_one_at_a_time() -> MemoryStorage:
    return ReleasesOneAtATime(name=_store("releases_one_at_a_time"))


class DebounceCreatesNew(MemoryStorage):
    """Breaks *a create with the debounce key of an open run replaces it*:
    every create makes a run, as a backend that stores the key but never
    looks it up would; a burst of triggers runs the workflow once each."""

    def _debounced(self, new: NewRun, now: datetime) -> RunRecord | None:
        return None


def debounce_creates_new() -> MemoryStorage:
    return DebounceCreatesNew(name=_store("debounce_creates_new"))


class DebounceKeepsFirst(MemoryStorage):
    """Breaks *a debounced create gives the open run its input*: the open run
    is returned as it is, as a create that treats the key like an
    idempotency key would; the run starts with the first trigger's input,
    not the last one's, and at the first one's time."""

    def _replace_debounced(self, entry: Any, new: NewRun, now: datetime) -> RunRecord:
        record: RunRecord = entry.record
        return record


def debounce_keeps_first() -> MemoryStorage:
    return DebounceKeepsFirst(name=_store("debounce_keeps_first"))


class DebounceReplacesClaimed(MemoryStorage):
    """Breaks *once a claim took a debounced run, the next create makes a new
    run*: a pending run of the key is replaced although a claim took it
    before (it was handed back), as a lookup that checks the status but not
    the attempts would; a run retried after a hand-back has its input
    rewritten under the steps it already saved."""

    def _replaced_by_debounce(self, record: RunRecord) -> bool:
        return record.status in ("pending", "delayed")


def debounce_replaces_claimed() -> MemoryStorage:
    return DebounceReplacesClaimed(name=_store("debounce_replaces_claimed"))


class RequeueKeepsDebounceKey(MemoryStorage):
    """Breaks *a requeued debounced run whose key another open run holds
    lets go of it*: the requeue keeps the key, as an UPDATE that forgot the
    debounce column would; two open runs then hold one key, and a store
    with a unique index on open keys refuses the requeue instead."""

    def _requeued_debounce_key(self, entry: Any) -> str | None:
        key: str | None = entry.record.debounce_key
        return key


def requeue_keeps_debounce_key() -> MemoryStorage:
    return RequeueKeepsDebounceKey(name=_store("requeue_keeps_debounce_key"))
