"""The command reference of ``docs/cli.md``, generated from the commands.

``python -m reflow_core.cli.reference docs/cli.md`` rewrites the part of the
page between :data:`BEGIN` and :data:`END` with every command's ``--help``;
``--check`` only says whether it is current (exit status 1 if not). A test
runs the check, so the page cannot drift from the code.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import click

__all__ = ["BEGIN", "END", "render", "replace_section"]

BEGIN = "<!-- BEGIN GENERATED REFERENCE: python -m reflow_core.cli.reference docs/cli.md -->"
END = "<!-- END GENERATED REFERENCE -->"
WIDTH = 100
"""Columns of the help text in the page, whatever the terminal."""


def _walk(
    command: click.Command, path: list[str], parent: click.Context | None
) -> Iterator[tuple[list[str], click.Command, click.Context]]:
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    ctx = click.Context(command, info_name=path[-1], parent=parent, **settings)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, [*path, name], ctx)


def render(root: click.Command | None = None) -> str:
    """The reference in Markdown: a section per command, with its help.

    ``root`` defaults to the ``reflow`` group without plugin commands (the
    page documents what reflow-core ships)."""
    if root is None:
        from . import build_cli

        root = build_cli(plugins=False)
    parts = []
    for path, command, ctx in _walk(root, ["reflow"], None):
        title = " ".join(path)
        summary = command.get_short_help_str(limit=WIDTH)
        help_text = command.get_help(ctx).rstrip()
        parts.append(f"### `{title}`\n\n{summary}\n\n```text\n{help_text}\n```\n")
    return "\n".join(parts)


def replace_section(page: str, section: str) -> str:
    """``page`` with what lies between :data:`BEGIN` and :data:`END` replaced."""
    start = page.index(BEGIN) + len(BEGIN)
    end = page.index(END, start)
    return f"{page[:start]}\n\n{section.rstrip()}\n\n{page[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    if len(paths) != 1:
        print("usage: python -m reflow_core.cli.reference [--check] PAGE.md", file=sys.stderr)
        return 2
    path = Path(paths[0])
    page = path.read_text(encoding="utf-8")
    updated = replace_section(page, render())
    if updated == page:
        return 0
    if check:
        print(f"{path} is out of date: run python -m reflow_core.cli.reference {path}")
        return 1
    path.write_text(updated, encoding="utf-8")
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
