"""``reflow deploy-check APP``: what deploying APP does to the runs in flight.

It loads the workflow definitions from ``APP`` (the code about to be
deployed), reads every run in flight of those workflows from the storage
(through the storage protocol alone, so on every backend), and says, per
workflow and per version and shape the runs were started on, how many
would go on, re-run a step, get a step out of order, skip a saved step, be
held, be failed or wait for a worker of their own version, with example run
ids. Exit status 1 when a run would re-run, skip or get a step out of order,
or be held, while the workflow sets no ``on_incompatible`` policy saying
so, or when a run is of a version newer than APP's; meant for CI, before a
deploy.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import click
from rich.table import Table

from reflow_core.engine import Engine
from reflow_core.storage import Storage
from reflow_core.versions import Fate, RunFate, deploy_fates

from ._common import State, echo_json, pass_state, run_async
from .worker import app_dir_option, load_app_or_fail

__all__ = ["deploy_check"]

_FATES: dict[Fate, str] = {
    "continue": "continue",
    "rerun": "re-run",
    "insert": "out of order",
    "skip": "skip",
    "held": "held",
    "failed": "failed",
    "old_version": "old version",
    "newer": "newer",
}
"""How each fate reads in the table, in the order rows are printed."""


@dataclass
class _Group:
    """Runs of one workflow, version and shape that meet one fate."""

    workflow: str
    version: int
    fingerprint: str | None
    fate: Fate
    planned: bool
    runs: int = 0
    examples: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)


def _grouped(fates: list[RunFate], examples: int) -> list[_Group]:
    groups: dict[tuple[Any, ...], _Group] = {}
    for f in fates:
        key = (f.workflow, f.version, f.fingerprint or "", f.fate, f.planned)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(f.workflow, f.version, f.fingerprint, f.fate, f.planned)
        group.runs += 1
        group.reasons[f.reason] += 1
        if len(group.examples) < examples:
            group.examples.append(f.run_id)
    order = list(_FATES)
    return sorted(
        groups.values(),
        key=lambda g: (g.workflow, g.version, g.fingerprint or "", order.index(g.fate)),
    )


def _policy(engine: Engine, name: str) -> str:
    policy = engine.workflows[name].on_incompatible
    return "on_incompatible not set" if policy is None else f"on_incompatible={policy!r}"


@click.command("deploy-check")
@click.argument("app")
@click.option(
    "--url",
    "url",
    metavar="URL",
    help="Storage URL to read the runs in flight from (default: the global --url, "
    "or else APP's own storage).",
)
@app_dir_option
@click.option(
    "--examples",
    type=click.IntRange(min=0, max=100),
    default=3,
    show_default=True,
    help="Run ids shown for each line of the report.",
)
@pass_state
def deploy_check(state: State, app: str, url: str | None, app_dir: str, examples: int) -> None:
    """Check what deploying APP does to the runs in flight, before it ships.

    APP is a `module:attribute` naming an Engine (or a function returning
    one) built from the code about to be deployed. For each of its
    workflows, every run in flight (pending, delayed, running, sleeping,
    waiting) is matched with the definition APP would run it with, as a
    worker of APP would: continue, re-run (a saved step is gone and an
    unsaved one takes its place: a rename needs was=), out of order (a
    step before where the run stands never ran in it), skip (a saved
    step's result would be ignored), held, failed, old version (waits for a
    worker that registers its version) or newer (APP is older than the code
    that enqueued it).

    Exit status 1 when a run would re-run, go out of order, skip or be held
    while its workflow sets no on_incompatible policy, or is newer than
    APP; 0 when every run goes on or follows its workflow's policy.
    """
    if url is not None:
        state.url = url
    engine = load_app_or_fail(app, app_dir)
    if not engine.workflows:
        raise click.ClickException(f"{app} has no workflows to check: register some first")

    async def read(store: Storage) -> list[RunFate]:
        return [f async for f in deploy_fates(store, engine.definition_for, engine.workflows)]

    async def work() -> list[RunFate]:
        if state.url is not None:
            async with state.storage() as store:
                return await read(store)
        store = engine.storage
        await store.initialize()
        try:
            return await read(store)
        finally:
            await store.close()

    fates = run_async(work)
    groups = _grouped(fates, examples)
    unplanned = sum(1 for f in fates if not f.planned)
    if state.json:
        echo_json(
            {
                "app": app,
                "runs": len(fates),
                "unplanned": unplanned,
                "ok": unplanned == 0,
                "workflows": [
                    {
                        "workflow": name,
                        "version": wf.version,
                        "fingerprint": wf.fingerprint,
                        "on_incompatible": wf.on_incompatible,
                    }
                    for name, wf in sorted(engine.workflows.items())
                ],
                "groups": [
                    {
                        "workflow": g.workflow,
                        "version": g.version,
                        "fingerprint": g.fingerprint,
                        "fate": g.fate,
                        "planned": g.planned,
                        "runs": g.runs,
                        "examples": g.examples,
                        "reason": g.reasons.most_common(1)[0][0],
                    }
                    for g in groups
                ],
            }
        )
        sys.exit(0 if unplanned == 0 else 1)
    counts = Counter(f.workflow for f in fates)
    for name, wf in sorted(engine.workflows.items()):
        click.echo(
            f"{name}: deploying version {wf.version} (fingerprint {wf.fingerprint}, "
            f"{_policy(engine, name)}); {counts[name]} run(s) in flight"
        )
        mine = [g for g in groups if g.workflow == name]
        if not mine:
            continue
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("VERSION", "FINGERPRINT", "FATE", "RUNS", "EXAMPLES", "WHY"):
            table.add_column(
                column,
                justify="right" if column == "RUNS" else "left",
                no_wrap=column != "WHY",
                overflow="fold",
            )
        for g in mine:
            reason, seen = g.reasons.most_common(1)[0]
            if seen < g.runs:
                reason += f" (and {len(g.reasons) - 1} other reason(s))"
            table.add_row(
                str(g.version),
                g.fingerprint or "-",
                _FATES[g.fate] + ("" if g.planned else " !"),
                str(g.runs),
                ",".join(g.examples),
                reason,
            )
        state.show(table)
    if unplanned:
        click.echo(
            f"FAIL: {unplanned} of {len(fates)} run(s) in flight would re-run, skip or get a "
            "step out of order, or be held, with no on_incompatible policy saying so, or are "
            "newer than APP (marked !). Add was= for a renamed step, set on_incompatible, or "
            "keep the old version registered."
        )
        sys.exit(1)
    click.echo(f"OK: all {len(fates)} run(s) in flight go on or follow their workflow's policy.")
