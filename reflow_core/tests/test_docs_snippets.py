"""Every program in the README and the documentation runs as written.

The rule, for each fenced ``python`` block of ``README.md`` and ``docs/*.md``:

- a block is a **program** when a line of it starts with ``asyncio.run(``
  or ``if __name__ == "__main__":``; every other block is a **fragment**
  (an excerpt, a signature, a configuration line) and is not run;
- a program is run, as its own file, by this repository's Python in a
  fresh temporary directory, and must exit with status 0 within
  :data:`TIMEOUT` seconds;
- a program that needs what this check cannot give it (your own database
  server, say) carries ``<!-- not run: REASON -->`` on the line before its
  fence: it is reported here as skipped, with the reason.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```py(?:thon)?\b[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)
_PROGRAM = re.compile(r'^(?:asyncio\.run\(|if __name__ == "__main__":)', re.M)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    source: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    """Every fenced python block of the pages, dedented."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
            indent = match["indent"]
            lines = match["body"].splitlines(keepends=True)
            source = "".join(line.removeprefix(indent) for line in lines)
            marker = _NOT_RUN.search(before.strip())
            found.append(
                Block(
                    page=str(page.relative_to(ROOT)),
                    line=text.count("\n", 0, match.start()) + 1,
                    source=source,
                    not_run=marker[1] if marker else None,
                )
            )
    return found


PROGRAMS = [block for block in blocks() if _PROGRAM.search(block.source)]


def test_the_rule_finds_the_programs_the_pages_promise() -> None:
    """The README's quickstart, the home page's first example and the
    getting-started program are programs, and run."""
    running = {block.page for block in PROGRAMS if block.not_run is None}
    assert {"README.md", "docs/index.md", "docs/getting-started.md"} <= running
    first_on_home = next(block for block in blocks() if block.page == "docs/index.md")
    assert first_on_home in PROGRAMS


@pytest.mark.parametrize("block", PROGRAMS, ids=[block.id for block in PROGRAMS])
def test_program_runs(block: Block, tmp_path: Path) -> None:
    if block.not_run is not None:
        pytest.skip(f"{block.id} is not run: {block.not_run}")
    program = tmp_path / "program.py"
    program.write_text(block.source, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(program)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (
        f"the program at {block.id} exited with {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
