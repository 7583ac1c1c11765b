"""What every ``reflow`` command shares: the global options, the storage
session, output (tables, JSON lines, progress), confirmation and errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from reflow_core.admin import (
    compact,
    decode_stored,
    describe_error,
    one_line,
    pretty,
    relative,
    stamp,
    to_jsonable,
)
from reflow_core.options import redact, safe_url, url_secrets
from reflow_core.registry import open_storage
from reflow_core.storage import Storage

__all__ = [
    "URL_ENV",
    "State",
    "compact",
    "decode_stored",
    "describe_error",
    "echo_json",
    "fail",
    "one_line",
    "pass_state",
    "pretty",
    "relative",
    "run_async",
    "stamp",
    "to_jsonable",
]

T = TypeVar("T")

URL_ENV = "REFLOW_URL"
"""The environment variable that names the storage when ``--url`` is not given."""

_PLAIN_WIDTH = 200
"""Columns of tables written to a file or pipe (a terminal's own width otherwise)."""


@dataclass
class State:
    """The global options, shared by every command through ``ctx.obj``."""

    url: str | None = None
    json: bool = False
    debug: bool = False
    _console: Console | None = field(default=None, repr=False)
    _err_console: Console | None = field(default=None, repr=False)

    @property
    def shown_url(self) -> str:
        """The storage URL with every password masked, safe to print."""
        return "(none)" if self.url is None else safe_url(self.url)

    def require_url(self) -> str:
        if not self.url:
            raise click.UsageError(
                f"no storage given: pass --url URL or set {URL_ENV} (for example sqlite:///app.db)"
            )
        return self.url

    @property
    def console(self) -> Console:
        """Standard output, through rich (colour only on a terminal)."""
        if self._console is None:
            self._console = _console(sys.stdout, stderr=False)
        return self._console

    @property
    def err_console(self) -> Console:
        """Standard error, through rich: progress bars and notes."""
        if self._err_console is None:
            self._err_console = _console(sys.stderr, stderr=True)
        return self._err_console

    def show(self, renderable: Any) -> None:
        """Print a table or other rich renderable on standard output; into a
        file or pipe, without the padding at the ends of its lines."""
        if self.console.is_terminal:
            self.console.print(renderable)
            return
        with self.console.capture() as captured:
            self.console.print(renderable)
        click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))

    def clean(self, text: str) -> str:
        """``text`` with every secret of the storage URL masked."""
        return redact(text, url_secrets(self.url)) if self.url else text

    @contextlib.asynccontextmanager
    async def storage(self, url: str | None = None) -> AsyncIterator[Storage]:
        """The storage of ``--url`` (or ``url``), initialized, closed after."""
        store = open_storage(url or self.require_url())
        try:
            await store.initialize()
            yield store
        finally:
            await store.close()

    def note(self, message: str) -> None:
        """A line for people on standard error (kept out of ``--json`` output)."""
        self.err_console.print(self.clean(message), highlight=False, markup=False)

    def progress(self, *, total: bool = True) -> Progress:
        """A progress display on standard error; silent unless it is a terminal."""
        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
        if total:
            columns += [BarColumn(), MofNCompleteColumn()]
        else:
            columns += [TextColumn("{task.completed} done")]
        columns.append(TimeElapsedColumn())
        return Progress(
            *columns,
            console=self.err_console,
            transient=True,
            disable=not self.err_console.is_terminal,
        )

    def confirm(self, question: str) -> None:
        """Ask before a change: refused (exit 1) unless answered yes; without
        a terminal on standard input, refused outright."""
        if not stdin_is_terminal():
            fail(f"{question.rstrip('?')}: refused, standard input is not a terminal; pass --yes")
        if not click.confirm(question, default=False, err=True):
            fail("nothing changed: not confirmed")


def stdin_is_terminal() -> bool:
    """Whether a person can answer a question on standard input."""
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _console(file: Any, *, stderr: bool) -> Console:
    terminal = bool(getattr(file, "isatty", lambda: False)())
    return Console(
        file=file,
        stderr=stderr,
        highlight=False,
        # Names, ids and payloads are printed as they are: never as markup or emoji codes.
        markup=False,
        emoji=False,
        width=None if terminal else _PLAIN_WIDTH,
        force_terminal=None,
        soft_wrap=False,
    )


pass_state = click.make_pass_decorator(State, ensure=True)
"""Hand a command the :class:`State` of the global options."""


def fail(message: str) -> NoReturn:
    """Stop the command: ``Error: message`` on one line, exit status 1."""
    raise click.ClickException(one_line(message))


def run_async(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()`` on a fresh event loop (errors are reported by the root group)."""

    async def main() -> T:
        return await work()

    return asyncio.run(main())


def echo_json(obj: Mapping[str, Any]) -> None:
    """One JSON object on one line of standard output."""
    click.echo(json.dumps(to_jsonable(obj), ensure_ascii=False, sort_keys=False))


@contextlib.contextmanager
def progress_task(state: State, description: str, total: int | None) -> Iterator[Any]:
    """A progress bar (or counter, without ``total``) on standard error;
    yields ``advance(n=1)``."""
    with state.progress(total=total is not None) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance
