"""Child runs: how a step starts them (:class:`Children`) and how their ids
are derived, so that a step run again never starts a second child."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from reflow_core import codec
from reflow_core._durations import Duration, to_seconds
from reflow_core.errors import (
    ConfigError,
    ErrorInfo,
    SerializationError,
    StepCancelledError,
    StorageError,
)
from reflow_core.storage import TERMINAL_STATUSES, NewRun, RunRecord
from reflow_core.workflow import Workflow, to_plain_input

from .views import read_stored

if TYPE_CHECKING:
    from .driver import Execution, RunDriver

__all__ = ["Children", "child_run_id", "ended_children"]

logger = logging.getLogger("reflow.engine")

_RETRY_PAUSES = (0.05, 0.25, 1.0)
"""Pauses between retries of a start that failed with a StorageError."""


def child_run_id(parent_id: str, step: str, attempt: int, index: int) -> str:
    """The id of the ``index``-th child (from 0) started by attempt ``attempt``
    of step ``step`` of run ``parent_id``: the same every time the step runs
    that attempt again."""
    return f"{parent_id}:{step}:{attempt}:{index}"


class Children:
    """Starts the child runs of one attempt of one step (a
    :class:`~reflow_core.context.ChildStarter`)."""

    __slots__ = ("_attempt", "_count", "_driver", "_ended", "_run", "_step")

    def __init__(
        self,
        driver: RunDriver,
        run: Execution,
        step: str,
        attempt: int,
        ended: Mapping[str, RunRecord] | None = None,
    ) -> None:
        self._driver = driver
        self._run = run
        self._step = step
        self._attempt = attempt
        self._count = 0
        self._ended = ended or {}
        """Children of the step known to have ended (read in one call when the
        step resumes after waiting for them): starting one again needs no
        round trip, since an ended child is returned as it is."""

    async def start(
        self,
        workflow: Workflow[Any, Any],
        input: Any,
        *,
        timeout: Duration | None,
        delay: Duration | None,
    ) -> RunRecord:
        if not isinstance(workflow, Workflow):
            raise ConfigError(
                f"step {self._step!r}: start_child takes a Workflow, not {type(workflow).__name__}",
                option="workflow",
            )
        run = self._run
        index = self._count
        self._count += 1
        raw = to_plain_input(input)
        shape = workflow.flow.shape(workflow.name, workflow.validate_input(raw))
        text = codec.encode(raw)
        deadline = None
        if timeout is not None:
            deadline = to_seconds(timeout, option="start_child timeout", allow_zero=False)
        if workflow.timeout is not None:
            deadline = workflow.timeout if deadline is None else min(deadline, workflow.timeout)
        later = None if delay is None else to_seconds(delay, option="start_child delay")
        child_id = child_run_id(run.record.id, self._step, self._attempt, index)
        ended = self._ended.get(child_id)
        if ended is not None and ended.workflow == workflow.name:
            return ended
        new = NewRun(
            workflow=workflow.name,
            input=text,
            run_id=child_id,
            delay=None if later is None else timedelta(seconds=later),
            deadline=None if deadline is None else timedelta(seconds=deadline),
            priority=shape.priority,
            limits=shape.limits,
            rates=shape.rates,
            headers=self._driver.observers.scopes.headers(workflow.name),
            version=workflow.version,
            fingerprint=workflow.fingerprint,
        )
        storage = self._driver.storage
        start = getattr(storage, "start_child", None)
        if start is None:
            raise ConfigError(
                f"the storage {type(storage).__name__} does not implement child runs "
                "(start_child, wait_children, list_children)",
                option="start_child",
            )
        record: RunRecord | None = None
        for attempt, pause in enumerate((*_RETRY_PAUSES, None)):
            try:
                record = await start(run.lease, self._step, new)
                break
            except StorageError as exc:
                # A taken id is not transient: say so at once.
                if pause is None or "already exists" in str(exc):
                    raise
                logger.warning(
                    "starting a child of run %s failed (%s); retry %d in %.2fs",
                    run.record.id,
                    exc,
                    attempt + 1,
                    pause,
                )
                await asyncio.sleep(pause)
        if record is None:
            run.state.interrupt("lease_lost")
            raise StepCancelledError("lease_lost")
        if record.attempts == 0 and workflow.name in self._driver.workflows:
            self._driver.wake_worker()
        return record

    def decode_output(self, record: RunRecord) -> Any:
        return read_stored(record.output, f"output of child run {record.id}", self._run.record.id)

    def failure(self, record: RunRecord) -> ErrorInfo | None:
        if record.error is None:
            return None
        try:
            info = codec.decode(record.error)
        except SerializationError:
            return {"code": "corrupt_data", "message": "the child's stored error cannot be read"}
        return info if isinstance(info, dict) else None  # type: ignore[return-value]


async def ended_children(driver: RunDriver, run: Execution, step: str) -> dict[str, RunRecord]:
    """The ended children of ``step``, by id, in one read: what a step that
    resumes after waiting for its children will start again."""
    list_children = getattr(driver.storage, "list_children", None)
    if list_children is None:
        return {}
    children: list[RunRecord] = await list_children(run.record.id)
    return {
        child.id: child
        for child in children
        if child.parent_step == step and child.status in TERMINAL_STATUSES
    }
