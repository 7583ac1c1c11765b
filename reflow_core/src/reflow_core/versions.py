"""What a change of a workflow's definition does to a run already in flight.

A run records the ``version`` and ``fingerprint`` of the definition that
enqueued it. When another definition takes it over (a deploy changed the
workflow), :func:`check_replay` compares the run's saved records with the
new definition's units and says whether the run can go on where it stands
(``continue``) or what would go wrong:

``rerun``
    a result the run saved is under a name the new definition no longer has,
    and a unit the run has not run takes its place: a rename without
    ``was=`` (the step runs again), or a removal followed by a unit that now
    gets another ``prev``. The two cannot be told apart from the run alone.
``insert``
    a unit of the new definition comes before the run's position but the run
    never ran it: it would run now, out of order.
``skip``
    a result the run saved is under a name the new definition no longer
    has, and nothing takes its place: the result is ignored.

Only the units the run has reached matter: anything may change after its
position. The same check serves the engine (before it drives a run claimed
on another shape) and ``reflow deploy-check`` (over every run in flight).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeAlias

from .codec import decode
from .errors import SerializationError
from .storage import HOLD_EVENT, RunRecord, RunStatus, StepRecord, Storage
from .workflow import (
    RESERVED_PREFIX,
    MapDefinition,
    Node,
    ParallelDefinition,
    SleepDefinition,
    StepDefinition,
    WaitDefinition,
    Workflow,
)

__all__ = [
    "HOLD_EVENT",
    "HOLD_PREFIX",
    "HOLD_REASON",
    "IN_FLIGHT",
    "Fate",
    "Outcome",
    "ReplayCheck",
    "RunFate",
    "check_replay",
    "deploy_fates",
    "fate_of",
    "fingerprint_of",
    "held_reason",
    "is_held",
    "release_held",
    "remap_saved",
    "shape_of",
]

HOLD_PREFIX = RESERVED_PREFIX + "hold:"
"""The wait step of a hold: this prefix and the fingerprint of the
definition that held the run. Completed, it says the run was released for
that definition, which then goes on with it."""
HOLD_REASON = RESERVED_PREFIX + "hold-reason"
"""The record of why a run is held: ``{"reason", "version", "fingerprint"}``
of the definition that held it."""

Outcome: TypeAlias = Literal["continue", "rerun", "insert", "skip"]
"""What taking a run over on another definition does to it, worst first
after ``continue``: see the module's description."""

_PREFIXES = (RESERVED_PREFIX + "when:", RESERVED_PREFIX + "map:", RESERVED_PREFIX + "children:")
"""The engine's own records that belong to one unit: a ``when=`` decision, a
map's items, a step's wait for its children (the unit's name follows)."""
_ITEM = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)\]$")
_NO_TIME = datetime.min


def _kind(node: Node) -> str:
    if isinstance(node, StepDefinition):
        return "step" if node.child is None else "child"
    if isinstance(node, SleepDefinition):
        return "sleep"
    if isinstance(node, WaitDefinition):
        return "wait"
    if isinstance(node, MapDefinition):
        return "map"
    return "parallel"


def shape_of(nodes: Sequence[Node]) -> list[dict[str, object]]:
    """The shape a fingerprint hashes: each unit's kind and name in order,
    a parallel group's branch names, a child step's workflow."""
    shape: list[dict[str, object]] = []
    for node in nodes:
        unit: dict[str, object] = {"kind": _kind(node), "name": node.name}
        if isinstance(node, ParallelDefinition):
            unit["branches"] = [b.name for b in node.branches]
        if isinstance(node, StepDefinition) and node.child is not None:
            unit["workflow"] = node.child
        shape.append(unit)
    return shape


def fingerprint_of(nodes: Sequence[Node]) -> str:
    """The first 16 hex digits of the SHA-256 of :func:`shape_of` as
    canonical JSON: equal for equal shapes in every process and release."""
    text = json.dumps(shape_of(nodes), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _names(node: Node) -> list[tuple[str, str]]:
    """(record name, current name) for every name a unit's records may be
    saved under: the unit's and its branches', current and earlier."""
    pairs = [(n, node.name) for n in (node.name, *node.was)]
    if isinstance(node, ParallelDefinition):
        for branch in node.branches:
            pairs.extend((n, branch.name) for n in (branch.name, *branch.was))
    return pairs


def _base(record: str) -> str | None:
    """The unit name a saved record belongs to, or ``None`` for a record of
    the run as a whole (an owed failure handler, a hold)."""
    if record.startswith(RESERVED_PREFIX):
        for prefix in _PREFIXES:
            if record.startswith(prefix):
                return record[len(prefix) :]
        return None
    item = _ITEM.match(record)
    return record if item is None else item.group("name")


@dataclass(frozen=True, slots=True)
class ReplayCheck:
    """What :func:`check_replay` found. ``outcome`` is the worst finding;
    ``rerun`` maps each unrecognised saved result to the unit that would
    run in its place, ``inserted`` lists units that would run out of order,
    ``skipped`` saved results that would be ignored, ``renamed`` the saved
    names matched through ``was=``."""

    outcome: Outcome
    rerun: Mapping[str, str] = field(default_factory=dict)
    inserted: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One sentence for an error, a hold's reason or a report."""
        parts: list[str] = []
        for old, new in self.rerun.items():
            parts.append(
                f"its saved step {old!r} is not in this definition and {new!r} would run in its "
                f"place (a rename needs was={old!r})"
            )
        for name in self.inserted:
            parts.append(f"step {name!r} comes before where the run stands but never ran in it")
        for name in self.skipped:
            parts.append(f"its saved step {name!r} is not in this definition and would be ignored")
        return "; ".join(parts) if parts else "the run fits this definition"


def check_replay(nodes: Sequence[Node], saved: Mapping[str, StepRecord]) -> ReplayCheck:
    """Whether a run with the ``saved`` records can go on under the
    definition made of ``nodes``; see the module's description."""
    index: dict[str, int] = {}
    current: dict[str, str] = {}
    for i, node in enumerate(nodes):
        for record_name, name in _names(node):
            index[record_name] = i
            current[record_name] = name
    reached: set[int] = set()
    renamed: dict[str, str] = {}
    orphans: dict[str, datetime] = {}
    history: list[tuple[datetime, int]] = []
    bases: set[str] = set()
    for record_name, record in saved.items():
        base = _base(record_name)
        if base is None:
            continue
        bases.add(base)
        at = record.completed_at or _NO_TIME
        if at.tzinfo is not None:
            at = at.replace(tzinfo=None)
        if base in index:
            reached.add(index[base])
            history.append((at, index[base]))
            if current[base] != base:
                renamed[base] = current[base]
        elif base not in orphans or at < orphans[base]:
            orphans[base] = at
    position = max(reached, default=-1)
    history.sort()
    rerun: dict[str, str] = {}
    skipped: list[str] = []
    taken: set[int] = set()
    for orphan, at in sorted(orphans.items(), key=lambda item: (item[1], item[0])):
        before = [i for when, i in history if when <= at]
        slot = (max(before) if before else -1) + 1
        if slot < len(nodes) and slot not in reached and slot not in taken:
            rerun[orphan] = nodes[slot].name
            taken.add(slot)
        else:
            skipped.append(orphan)
    inserted = [nodes[i].name for i in range(position + 1) if i not in reached and i not in taken]
    for i in sorted(reached):
        node = nodes[i]
        if i < position and isinstance(node, ParallelDefinition):
            # A group the run is past: a branch it never ran would run now.
            inserted.extend(b.name for b in node.branches if bases.isdisjoint((b.name, *b.was)))
    outcome: Outcome = "continue"
    if rerun:
        outcome = "rerun"
    elif inserted:
        outcome = "insert"
    elif skipped:
        outcome = "skip"
    return ReplayCheck(outcome, rerun, tuple(inserted), tuple(skipped), renamed)


def remap_saved(nodes: Sequence[Node], saved: Mapping[str, StepRecord]) -> dict[str, StepRecord]:
    """``saved`` with every record kept under an earlier name (``was=``) of a
    unit also found under its current name, so the engine treats the unit as
    saved. Records under current names win; nothing is written back."""
    current: dict[str, str] = {}
    for node in nodes:
        for record_name, name in _names(node):
            if record_name != name:
                current[record_name] = name
    out = dict(saved)
    if not current:
        return out
    for record_name, record in saved.items():
        base = _base(record_name)
        if base is None or base not in current:
            continue
        new = record_name.replace(base, current[base], 1)
        if record_name.startswith(RESERVED_PREFIX):
            prefix = record_name[: len(record_name) - len(base)]
            new = prefix + current[base]
        out.setdefault(new, record)
    return out


async def release_held(storage: Storage, run_id: str) -> bool:
    """Send a held run the event that lets it go on (:meth:`Engine.release
    <reflow_core.Engine.release>`, ``reflow runs release``). True when the
    run is held (sending again before a worker takes it adds nothing);
    False, writing nothing, for a run that is missing or not held."""
    record = await storage.get_run(run_id)
    if not is_held(record):
        return False
    assert record is not None
    return await storage.deliver_event(
        run_id, HOLD_EVENT, "null", event_id=f"{HOLD_EVENT}:{record.attempts}"
    )


def is_held(record: RunRecord | None) -> bool:
    """Whether ``record`` is a run held after a change of its workflow."""
    return record is not None and record.status == "waiting" and record.waiting_for == HOLD_EVENT


def held_reason(record: RunRecord, steps: Mapping[str, StepRecord] | None) -> str | None:
    """Why a run is held after a change of its workflow, in words (from its
    saved reason, when ``steps`` has it), or ``None`` for a run that is not
    held."""
    if not is_held(record):
        return None
    saved = None if steps is None else steps.get(HOLD_REASON)
    about: Any = None
    if saved is not None and saved.output is not None:
        with contextlib.suppress(SerializationError):
            about = decode(saved.output)
    if isinstance(about, dict) and isinstance(about.get("reason"), str):
        return f"held by version {about.get('version')}: {about['reason']}; release it to go on"
    return (
        f"held after a change of workflow {record.workflow!r}: its new definition cannot go on "
        "with it where it stands; release it to go on"
    )


# -- the deploy check -------------------------------------------------------------------

Fate: TypeAlias = Literal[
    "continue", "rerun", "insert", "skip", "held", "failed", "old_version", "newer"
]
"""What a deploy does to one run in flight: it goes on (``continue``, or
``rerun``/``insert``/``skip`` under ``on_incompatible="continue"``; with no
policy those three are reported as they are, unplanned, and the run is
held), is held,
is failed, waits for a worker of its own version (``old_version``), or is of
a version newer than any the deployed code has (``newer``: nothing in it
takes the run)."""

IN_FLIGHT: tuple[RunStatus, ...] = ("pending", "delayed", "running", "sleeping", "waiting")
"""The statuses of runs a deploy can affect."""


@dataclass(frozen=True, slots=True)
class RunFate:
    """One run in flight, and what a deploy of ``definition`` does to it."""

    run_id: str
    workflow: str
    version: int
    fingerprint: str | None
    fate: Fate
    reason: str
    planned: bool
    """False when no policy says so: a run that would re-run, skip or get a
    step out of order, or be held, with ``on_incompatible`` unset; or a run
    of a version newer than the deployed code's."""


def fate_of(
    record: RunRecord,
    definition: Workflow[Any, Any] | None,
    current: Workflow[Any, Any],
    saved: Mapping[str, StepRecord] | None,
) -> RunFate:
    """What a deploy whose newest definition of the run's workflow is
    ``current``, and which takes the run with ``definition`` (``None``:
    nothing takes it), does to the run ``record`` with its ``saved``
    records (read only when the shapes differ; ``None`` otherwise)."""

    def fate(kind: Fate, reason: str, planned: bool) -> RunFate:
        return RunFate(
            record.id, record.workflow, record.version, record.fingerprint, kind, reason, planned
        )

    if definition is None:
        if record.version > current.version:
            return fate(
                "newer",
                f"version {record.version} is newer than the deployed {current.version}: "
                "no worker of this code takes it",
                False,
            )
        return fate(
            "old_version",
            f"waits for a worker that registers version {record.version} "
            "(on_incompatible='old_version')",
            True,
        )
    policy = definition.on_incompatible
    if is_held(record):
        return fate(
            "held",
            "already held after an earlier change: it goes on once released",
            policy is not None,
        )
    if record.fingerprint == definition.fingerprint:
        return fate("continue", "same shape", True)
    check = check_replay(definition.steps, saved or {})
    if check.outcome == "continue":
        renamed = ", ".join(f"{old!r} as {new!r}" for old, new in check.renamed.items())
        return fate("continue", f"fits ({renamed})" if renamed else "fits", True)
    reason = check.describe()
    if policy == "continue":
        return fate(check.outcome, reason, True)
    if policy == "fail":
        return fate("failed", reason, True)
    if policy is None:
        return fate(check.outcome, reason + " (no on_incompatible policy: held)", False)
    return fate("held", reason, True)


async def deploy_fates(
    storage: Storage,
    resolve: Callable[[RunRecord], Workflow[Any, Any] | None],
    current: Mapping[str, Workflow[Any, Any]],
    *,
    page: int = 500,
) -> AsyncIterator[RunFate]:
    """The fate of every run in flight of the workflows in ``current`` (the
    newest definition of each), each taken by ``resolve(record)``: read
    through the storage protocol alone, a page of runs at a time, saved
    records only of runs whose shape differs."""
    for name in sorted(current):
        cursor: str | None = None
        while True:
            found = await storage.list_runs(
                status=IN_FLIGHT, workflow=name, limit=page, cursor=cursor
            )
            for record in found.runs:
                definition = resolve(record)
                saved = None
                if definition is not None and record.fingerprint != definition.fingerprint:
                    saved = await storage.get_step_results(record.id)
                yield fate_of(record, definition, current[name], saved)
            cursor = found.next_cursor
            if cursor is None:
                break
