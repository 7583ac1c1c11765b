"""``reflow conformance``: the ``reflow-conformance`` command under ``reflow``.

Registered through the ``reflow_register_commands`` hook (the
``reflow.commands`` entry point of this distribution). Every argument goes
to :func:`reflow_conformance.cli.main` unchanged, ``--help`` included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from reflow_core.hookspecs import hookimpl

__all__ = ["conformance", "reflow_register_commands"]


@click.command(
    "conformance",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def conformance(ctx: click.Context, args: Sequence[str]) -> None:
    """Run the storage conformance suite against an adapter.

    The reflow-conformance command: every argument goes to it, --help too."""
    # Imported here: the suite's modules load pytest and Hypothesis, which
    # the other reflow commands do not need.
    from .cli import main

    ctx.exit(main(list(args)))


@hookimpl
def reflow_register_commands(cli: Any) -> None:
    """Add ``reflow conformance``."""
    cli.add_command(conformance)
