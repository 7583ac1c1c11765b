"""``reflow runs``: list, show, cancel, resume and purge runs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from reflow_core._durations import describe, to_seconds
from reflow_core.admin import (
    ACTIVE_STATUSES,
    RESUMABLE_STATUSES,
    STATUSES,
    Outcome,
    cancel_run,
    error_lines,
    error_summary,
    resume_run,
    visible_steps,
)
from reflow_core.engine import Engine
from reflow_core.errors import ConfigError, RunNotFoundError
from reflow_core.limits import Rate, hold_reason
from reflow_core.storage import (
    CHILDREN_WAIT_PREFIX,
    RATE_BLOCK_PREFIX,
    RunRecord,
    StepRecord,
    Storage,
)
from reflow_core.versions import held_reason, is_held, release_held

from ._common import (
    State,
    decode_stored,
    echo_json,
    fail,
    pass_state,
    pretty,
    progress_task,
    relative,
    run_async,
    stamp,
)

__all__ = ["runs"]

STATUS_STYLES = {
    "delayed": "blue",
    "pending": "yellow",
    "running": "cyan",
    "sleeping": "blue",
    "waiting": "magenta",
    "completed": "green",
    "failed": "red",
    "cancelled": "dim",
    "skipped": "dim",
}
_PAGE = 500
"""Runs read per page while selecting runs for a bulk change."""
_PURGE_BATCH = 500
_MS = timedelta(milliseconds=1)
"""Runs deleted per call of ``purge_finished`` (the progress advances by these)."""


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def run_summary(record: RunRecord) -> dict[str, Any]:
    """A run's fields for ``--json``, without its stored values."""
    return {
        "id": record.id,
        "workflow": record.workflow,
        "status": record.status,
        "attempts": record.attempts,
        "reclaims": record.reclaims,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "wake_at": record.wake_at,
        "waiting_for": record.waiting_for,
        "deadline_at": record.deadline_at,
        "idempotency_key": record.idempotency_key,
        "parent_id": record.parent_id,
        "parent_step": record.parent_step,
        "priority": record.priority,
        "limits": [{"key": limit.key, "max": limit.max} for limit in record.limits],
        "blocked_by": record.blocked_by,
        "rates": [
            {
                "key": rate.key,
                "max": rate.max,
                "period_ms": rate.period // timedelta(milliseconds=1),
            }
            for rate in record.rates
        ],
        "debounce_key": record.debounce_key,
        "held_back": hold_reason(record),
        "version": record.version,
        "fingerprint": record.fingerprint,
        "held": is_held(record),
    }


@click.group()
def runs() -> None:
    """List, inspect, cancel, resume and purge runs."""


# -- ls ---------------------------------------------------------------------------


@runs.command("ls")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Only runs in this status (repeat for several).",
)
@click.option("--workflow", metavar="NAME", help="Only runs of this workflow.")
@click.option(
    "--limit",
    metavar="N",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Runs per page.",
)
@click.option(
    "--before",
    "cursor",
    metavar="CURSOR",
    help="Continue after the last page: the cursor printed with it.",
)
@pass_state
def ls(
    state: State, statuses: Sequence[str], workflow: str | None, limit: int, cursor: str | None
) -> None:
    """List runs, newest first, one page at a time.

    The next page is the one after the cursor printed below the table
    (with --json, the last line: {"next_cursor": ...}, null on the last page).
    """

    async def work() -> tuple[list[RunRecord], str | None, datetime]:
        async with state.storage() as store:
            try:
                page = await store.list_runs(
                    status=list(statuses) or None,  # type: ignore[arg-type]
                    workflow=workflow,
                    limit=limit,
                    cursor=cursor,
                )
            except ConfigError as exc:
                if cursor is None:
                    raise
                raise click.BadParameter(
                    f"not a cursor printed by reflow runs ls ({exc})", param_hint="--before"
                ) from None
            return list(page.runs), page.next_cursor, await store.now()

    records, next_cursor, now = run_async(work)
    if state.json:
        for record in records:
            echo_json(run_summary(record))
        echo_json({"next_cursor": next_cursor})
        return
    if not records:
        state.console.print("no runs")
    else:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("ID", "WORKFLOW", "STATUS", "ATTEMPTS", "CREATED", "UPDATED"):
            table.add_column(
                column, no_wrap=True, justify="right" if column == "ATTEMPTS" else "left"
            )
        for record in records:
            shown = _status(record.status)
            if record.blocked_by:
                why = "rate" if record.blocked_by.startswith(RATE_BLOCK_PREFIX) else "blocked"
                shown.append(f" ({why})", style="dim")
            elif hold_reason(record):
                shown.append(" (debounced)", style="dim")
            table.add_row(
                record.id,
                record.workflow,
                shown,
                str(record.attempts),
                relative(record.created_at, now),
                relative(record.updated_at, now),
            )
        state.show(table)
    if next_cursor is not None:
        state.console.print(f"next page: --before {next_cursor}", markup=False)


# -- show -------------------------------------------------------------------------


def _step_json(step: StepRecord) -> dict[str, Any]:
    output, output_problem = decode_stored(step.output)
    error, error_problem = decode_stored(step.error)
    found: dict[str, Any] = {
        "name": step.name,
        "status": step.status,
        "attempts": step.attempts,
        "completed_at": step.completed_at,
        "wake_at": step.wake_at,
        "output": output,
        "error": error,
    }
    problems = [p for p in (output_problem, error_problem) if p]
    if problems:
        found["read_error"] = "; ".join(problems)
    return found


@runs.command("show")
@click.argument("run_id")
@pass_state
def show(state: State, run_id: str) -> None:
    """Show one run with its steps, errors and tracebacks.

    Prints the run's input, its output or error, and each saved step with
    its status, attempts, when it finished (or wakes) and its error, with
    the traceback and cause chain stored when it failed; for a run that
    started child runs, each child with its step and status, and for a
    child run, its parent."""

    async def work() -> tuple[RunRecord, dict[str, StepRecord], list[RunRecord], datetime]:
        async with state.storage() as store:
            record = await store.get_run(run_id)
            if record is None:
                raise RunNotFoundError(run_id)
            steps = await store.get_step_results(run_id)
            list_children = getattr(store, "list_children", None)
            children = [] if list_children is None else await list_children(run_id)
            return record, steps, children, await store.now()

    record, steps, children, now = run_async(work)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for what in ("input", "output", "error"):
        values[what], problem = decode_stored(getattr(record, what))
        if problem:
            problems.append(f"{what}: {problem}")
    visible = visible_steps(steps)
    if state.json:
        echo_json(
            {
                **run_summary(record),
                "lease_expires_at": record.lease_expires_at,
                **values,
                "steps": [_step_json(s) for s in visible],
                "children": [
                    {
                        "id": c.id,
                        "workflow": c.workflow,
                        "step": c.parent_step,
                        "status": c.status,
                        "created_at": c.created_at,
                    }
                    for c in children
                ],
                **({"read_error": "; ".join(problems)} if problems else {}),
            }
        )
        return
    out = state.console
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("run", record.id)
    head.add_row("workflow", record.workflow)
    head.add_row(
        "version", f"{record.version} (fingerprint {record.fingerprint or 'not recorded'})"
    )
    head.add_row("status", _status(record.status))
    held = held_reason(record, steps)
    if held:
        head.add_row("held", f"{held} (reflow runs release {record.id})")
    if record.parent_id:
        head.add_row("parent", f"{record.parent_id} (step {record.parent_step})")
    hold = None if is_held(record) else hold_reason(record)
    if hold:
        head.add_row("held back", hold)
    if record.priority:
        head.add_row("priority", str(record.priority))
    if record.limits:
        head.add_row(
            "limits", ", ".join(f"{limit.key} (max {limit.max})" for limit in record.limits)
        )
    if record.rates:
        head.add_row(
            "rates",
            ", ".join(f"{rate.key} ({Rate(rate.max, rate.period)})" for rate in record.rates),
        )
    if record.waiting_for and record.waiting_for.startswith(CHILDREN_WAIT_PREFIX):
        waited = record.waiting_for.removeprefix(CHILDREN_WAIT_PREFIX)
        head.add_row("waiting for", f"the child runs of step {waited!r}")
    elif record.waiting_for and not is_held(record):
        head.add_row("waiting for", record.waiting_for)
    if record.wake_at:
        head.add_row("wakes", f"{stamp(record.wake_at)} ({relative(record.wake_at, now)})")
    if record.deadline_at:
        head.add_row(
            "deadline", f"{stamp(record.deadline_at)} ({relative(record.deadline_at, now)})"
        )
    head.add_row("attempts", f"{record.attempts} (reclaims {record.reclaims})")
    head.add_row("created", f"{stamp(record.created_at)} ({relative(record.created_at, now)})")
    head.add_row("updated", f"{stamp(record.updated_at)} ({relative(record.updated_at, now)})")
    if record.idempotency_key:
        head.add_row("idempotency key", record.idempotency_key)
    state.show(head)
    for problem in problems:
        out.print(Text(f"cannot read the stored {problem}", style="red"))
    out.print(Text("\ninput", style="bold"))
    out.print(pretty(values["input"]), markup=False, soft_wrap=True)
    if record.output is not None:
        out.print(Text("\noutput", style="bold"))
        out.print(pretty(values["output"]), markup=False, soft_wrap=True)
    if record.error is not None:
        error = values["error"]
        failed_step = error.get("step") if isinstance(error, dict) else None
        # The traceback of a failed step is shown with the step, below.
        brief = any(s.name == failed_step and s.error is not None for s in visible)
        out.print(Text("\nerror", style="bold red"))
        out.print("\n".join(error_lines(error, brief=brief)), markup=False, soft_wrap=True)
    if children:
        kids = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("CHILD", "WORKFLOW", "STEP", "STATUS", "CREATED"):
            kids.add_column(column, no_wrap=True)
        for child in children:
            kids.add_row(
                child.id,
                child.workflow,
                child.parent_step or "",
                _status(child.status),
                relative(child.created_at, now),
            )
        out.print(Text(f"\nchildren ({len(children)})", style="bold"))
        state.show(kids)
    if not visible:
        out.print(Text("\nno steps saved", style="dim"))
        return
    table = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    for column in ("STEP", "STATUS", "ATTEMPTS", "FINISHED", "WAKES", "ERROR"):
        table.add_column(column, no_wrap=column != "ERROR")
    for step in visible:
        step_error, _ = decode_stored(step.error)
        summary = "" if step_error is None else error_summary(step_error)
        table.add_row(
            step.name,
            _status(step.status),
            str(step.attempts),
            relative(step.completed_at, now),
            relative(step.wake_at, now) if step.wake_at else "",
            summary,
        )
    out.print(Text("\nsteps", style="bold"))
    state.show(table)
    for step in visible:
        step_error, _ = decode_stored(step.error)
        if step_error is not None:
            out.print(Text(f"\nstep {step.name!r} failed", style="bold red"))
            out.print("\n".join(error_lines(step_error)), markup=False, soft_wrap=True)


# -- cancel / resume ----------------------------------------------------------------


async def _select(store: Storage, statuses: Sequence[str], workflow: str | None) -> list[str]:
    """The ids of every run matching the filter, newest first."""
    found: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_runs(
            status=list(statuses),  # type: ignore[arg-type]
            workflow=workflow,
            limit=_PAGE,
            cursor=cursor,
        )
        found += [r.id for r in page.runs]
        cursor = page.next_cursor
        if cursor is None:
            return found


def _describe_filter(statuses: Sequence[str], workflow: str | None) -> str:
    parts = [f"status {'/'.join(statuses)}"]
    if workflow is not None:
        parts.append(f"workflow {workflow!r}")
    return ", ".join(parts)


def _change(
    state: State,
    *,
    verb: str,
    doing: str,
    done: str,
    run_ids: Sequence[str],
    statuses: Sequence[str],
    workflow: str | None,
    default_statuses: Sequence[str],
    yes: bool,
) -> None:
    """Cancel or resume the runs named, or those a filter selects (after
    confirmation), and report what changed and what was skipped, and why."""
    by_filter = bool(statuses or workflow)
    if run_ids and by_filter:
        raise click.UsageError("give run ids or a filter (--status, --workflow), not both")
    if not run_ids and not by_filter:
        raise click.UsageError("give run ids, or select runs with --status and/or --workflow")

    async def act(engine: Engine, store: Storage, run_id: str) -> Outcome:
        if verb == "cancel":
            return await cancel_run(engine, store, run_id)
        return await resume_run(store, run_id)

    async def work() -> list[Outcome]:
        async with state.storage() as store:
            engine = Engine(
                storage=store, worker=False, close_storage=False, load_entry_points=False
            )
            async with engine:
                targets = list(dict.fromkeys(run_ids))
                if by_filter:
                    chosen = list(statuses) or list(default_statuses)
                    targets = await _select(store, chosen, workflow)
                    if not targets:
                        return []
                    if not yes:
                        state.confirm(
                            f"{verb.capitalize()} {len(targets)} run(s) "
                            f"({_describe_filter(chosen, workflow)})?"
                        )
                outcomes = []
                with progress_task(state, doing, len(targets)) as advance:
                    for run_id in targets:
                        outcomes.append(await act(engine, store, run_id))
                        advance()
                return outcomes

    outcomes = run_async(work)
    changed = [o for o in outcomes if o.changed]
    skipped = [o for o in outcomes if not o.changed]
    if state.json:
        for o in outcomes:
            echo_json({"id": o.run_id, "changed": o.changed, "reason": o.reason})
        echo_json({"changed": len(changed), "skipped": len(skipped)})
    else:
        for o in skipped:
            state.console.print(f"skipped {o.run_id}: {o.reason}", markup=False)
        state.console.print(f"{done} {len(changed)}, skipped {len(skipped)}", markup=False)
    if run_ids and skipped:
        # Runs named one by one that could not be changed are a refusal.
        fail(f"{len(skipped)} of {len(outcomes)} run(s) not {done}")


_FILTER_OPTIONS = [
    click.option(
        "--status",
        "statuses",
        multiple=True,
        type=click.Choice(STATUSES),
        help="Select the runs in this status (repeat for several).",
    ),
    click.option("--workflow", metavar="NAME", help="Select the runs of this workflow."),
    click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
]


def _with_filter(f: Any) -> Any:
    for option in reversed(_FILTER_OPTIONS):
        f = option(f)
    return f


@runs.command("cancel")
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@_with_filter
@pass_state
def cancel(
    state: State, run_ids: Sequence[str], statuses: Sequence[str], workflow: str | None, yes: bool
) -> None:
    """Cancel runs that have not finished.

    Name the runs, or select them with --status and --workflow (default
    status: every unfinished one); a selection is confirmed first (--yes
    skips the question; without a terminal it is refused unless --yes). A
    step running on a worker stops at its next heartbeat or write. Exit
    status 1 if a run named could not be cancelled (missing or finished).
    """
    _change(
        state,
        verb="cancel",
        doing="cancelling runs",
        done="cancelled",
        run_ids=run_ids,
        statuses=statuses,
        workflow=workflow,
        default_statuses=ACTIVE_STATUSES,
        yes=yes,
    )


@runs.command("release")
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID...")
@pass_state
def release(state: State, run_ids: Sequence[str]) -> None:
    """Let held runs go on.

    A run is held when a new definition of its workflow cannot continue it
    where it stands (a step it ran was renamed without was=, a step was
    inserted before its position...) and the workflow's on_incompatible is
    "hold" or unset. Released, it goes on with the definition of the next
    worker that claims it: its own version's if that worker registers it,
    else the current one, as it stands. Exit status 1 if a run named is
    missing or not held.
    """

    async def work() -> list[str]:
        async with state.storage() as store:
            return [run_id for run_id in run_ids if not await release_held(store, run_id)]

    refused = run_async(work)
    for run_id in run_ids:
        if run_id not in refused:
            state.note(f"released {run_id}")
    if refused:
        fail(f"not held (or missing): {', '.join(refused)}")


@runs.command("resume")
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@_with_filter
@pass_state
def resume(
    state: State, run_ids: Sequence[str], statuses: Sequence[str], workflow: str | None, yes: bool
) -> None:
    """Queue failed or cancelled runs again.

    Each continues at its first unfinished step once a worker that serves
    its workflow claims it. Name the runs, or select them with --status and
    --workflow (default status: failed and cancelled); a selection is
    confirmed first (--yes skips the question; without a terminal it is
    refused unless --yes). Exit status 1 if a run named could not be
    resumed (missing, or neither failed nor cancelled).
    """
    _change(
        state,
        verb="resume",
        doing="resuming runs",
        done="resumed",
        run_ids=run_ids,
        statuses=statuses,
        workflow=workflow,
        default_statuses=RESUMABLE_STATUSES,
        yes=yes,
    )


# -- purge ------------------------------------------------------------------------


@runs.command("purge")
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="Delete runs that finished longer ago than this (30d, 12h, 90m).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def purge(state: State, older_than: str, yes: bool) -> None:
    """Delete runs that finished long ago.

    Deletes completed, failed and cancelled runs with their steps and
    events, in batches; their idempotency keys become free again.
    Unfinished runs are never touched. Asks first unless --yes (refused
    without a terminal)."""
    try:
        seconds = to_seconds(older_than, option="--older-than")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    age = timedelta(seconds=seconds)
    if not yes:
        state.confirm(f"Delete every run that finished more than {describe(seconds)} ago?")

    async def work() -> int:
        deleted = 0
        async with state.storage() as store:
            with progress_task(state, "purging runs", None) as advance:
                while True:
                    n = await store.purge_finished(age, batch=_PURGE_BATCH, limit=_PURGE_BATCH)
                    deleted += n
                    advance(n)
                    if n < _PURGE_BATCH:
                        return deleted

    deleted = run_async(work)
    if state.json:
        echo_json({"deleted": deleted, "older_than": seconds})
    else:
        state.console.print(
            f"deleted {deleted} run(s) that finished more than {describe(seconds)} ago",
            markup=False,
        )
