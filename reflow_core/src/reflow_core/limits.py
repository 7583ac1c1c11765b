"""Flow control across the fleet: ``Limit`` and the options a workflow gives
every run it enqueues (priority, ``max_running``, a concurrency ``Limit``).

The limits are enforced by the storage, inside the claim: a claim never takes
a run that would put more runs holding a key at once than the key allows,
whichever worker, on whichever host, claims (see
:meth:`~reflow_core.storage.Storage.claim_runs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .adapter import check_text
from .errors import ConfigError, ValidationError
from .storage import PRIORITY_RANGE, ConcurrencyLimit

__all__ = ["WORKFLOW_LIMIT_PREFIX", "FlowControl", "Limit", "check_priority"]

WORKFLOW_LIMIT_PREFIX = "reflow:workflow:"
"""The key of a workflow's ``max_running`` limit: this prefix and its name."""


def check_priority(priority: object, where: str) -> int:
    """``priority`` if it is an int within :data:`~reflow_core.storage.PRIORITY_RANGE`."""
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise ConfigError(
            f"{where}: priority must be an int from {low} to {high}, got {priority!r}",
            option="priority",
        )
    return priority


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``max`` runs with the same key running at once, across every
    worker: ``workflow(..., concurrency=Limit(key=lambda i: i["customer_id"], max=1))``.

    ``key`` is called with a run's validated input when it is enqueued and
    returns its key (a ``str`` or an ``int``). Keys are the workflow's own,
    unless ``name`` is given: the workflows whose limits share a ``name``
    share their keys (at most 5 runs of any of them calling one partner API).
    """

    key: Callable[[Any], object]
    max: int
    name: str | None = None

    def __post_init__(self) -> None:
        if not callable(self.key):
            raise ConfigError(
                "Limit.key must be a callable of the input (for example lambda i: i['id'])",
                option="key",
            )
        if isinstance(self.max, bool) or not isinstance(self.max, int) or self.max < 1:
            raise ConfigError(f"Limit.max must be an int of at least 1, got {self.max!r}")
        if self.name is not None:
            check_text(self.name, "Limit.name")
            if self.name.startswith("reflow:"):
                raise ConfigError(
                    f"Limit.name {self.name!r}: names starting with 'reflow:' are reserved",
                    option="name",
                )


@dataclass(frozen=True, slots=True)
class FlowControl:
    """What a workflow gives every run it enqueues."""

    priority: int = 0
    max_running: int | None = None
    concurrency: Limit | None = None

    def workflow_limits(self, workflow: str) -> tuple[ConcurrencyLimit, ...]:
        """The ``max_running`` limit of ``workflow``, if it has one."""
        if self.max_running is None:
            return ()
        return (ConcurrencyLimit(WORKFLOW_LIMIT_PREFIX + workflow, self.max_running),)

    def limits(self, workflow: str, input: Any) -> tuple[ConcurrencyLimit, ...]:
        """The limits of a run of ``workflow`` with validated ``input``.
        Raises :class:`~reflow_core.errors.ValidationError` when the key
        cannot be computed from the input."""
        found = list(self.workflow_limits(workflow))
        limit = self.concurrency
        if limit is not None:
            try:
                key = limit.key(input)
            except Exception as exc:
                raise ValidationError(
                    f"the concurrency key of workflow {workflow!r} could not be computed "
                    f"from the input: {type(exc).__name__}: {exc}",
                    workflow=workflow,
                    issues=[{"type": type(exc).__name__, "msg": str(exc)}],
                ) from exc
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise ValidationError(
                    f"the concurrency key of workflow {workflow!r} must be a str or an int, "
                    f"got {type(key).__name__}",
                    workflow=workflow,
                    issues=[{"type": "key_type", "msg": f"got {type(key).__name__}"}],
                )
            text = check_text(str(key), "concurrency key") if isinstance(key, str) else str(key)
            found.append(ConcurrencyLimit(f"{limit.name or workflow}:{text}", limit.max))
        return tuple(found)
