"""The ``reflow`` command: inspect and control runs, events, schedules,
workers, queues and storage.

``reflow --url sqlite:///app.db runs ls`` (or ``REFLOW_URL=... reflow runs ls``;
``python -m reflow_core`` is the same command). Built on click; tables,
colour and progress bars come from rich. Other distributions add
subcommands through the :func:`~reflow_core.hookspecs.reflow_register_commands`
hook (see :mod:`reflow_core.cli._plugins`).

Exit status: 0 when the command did what it was asked, 1 when something was
not found, was refused or failed (one ``Error: ...`` line on standard error,
a traceback only with ``--debug``), 2 for a usage error.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

import click

from ._common import URL_ENV, State, describe_error, pass_state, run_async
from ._deploy import deploy_check
from ._events import events
from ._fleet import stats, workers
from ._plugins import COMMANDS_GROUP, register_commands
from ._runs import runs
from ._schedules import schedules
from ._storage import storage
from .worker import worker

__all__ = ["COMMANDS_GROUP", "URL_ENV", "State", "build_cli", "main", "pass_state", "run_async"]


class ReflowGroup(click.Group):
    """The root group: turns an error of any command into one line (exit
    status 1) with every secret of the storage URL masked, unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # the reader went away (`| head`): click exits quietly
            state = ctx.find_object(State) or State()
            if state.debug:
                raise
            raise click.ClickException(state.clean(describe_error(exc))) from None


def _root(ctx: click.Context, url: str | None, as_json: bool, debug: bool) -> None:
    ctx.obj = State(url=url or None, json=as_json, debug=debug)


def build_cli(*, plugins: bool | list[object] = True) -> click.Group:
    """The ``reflow`` command group: the built-in commands, then those the
    plugins add (``plugins=False``: none; a list: those plugin objects
    instead of the installed ones)."""
    root = ReflowGroup(
        name="reflow",
        callback=click.pass_context(_root),
        help=(
            "Inspect and control Reflow runs, events, schedules, workers and storage.\n\n"
            f"Every command works on the storage named by --url or ${URL_ENV}."
        ),
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
        params=[
            click.Option(
                ["--url"],
                envvar=URL_ENV,
                show_envvar=True,
                metavar="URL",
                help="Storage URL, e.g. sqlite:///app.db or postgresql://host/db. "
                "Passwords in it are never printed.",
            ),
            click.Option(
                ["--json", "as_json"],
                is_flag=True,
                help="Write JSON, one object per line, instead of tables.",
            ),
            click.Option(["--debug"], is_flag=True, help="Show the full traceback of an error."),
        ],
    )
    click.version_option(package_name="reflow-core", prog_name="reflow")(root)
    for command in (runs, events, schedules, workers, stats, storage, worker, deploy_check):
        root.add_command(command)
    if plugins is not False:
        register_commands(root, None if plugins is True else plugins)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``reflow`` console script and ``python -m reflow_core``."""
    build_cli().main(args=None if argv is None else list(argv), prog_name="reflow")
