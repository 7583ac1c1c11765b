"""Render the reST markup of Reflow's docstrings as mkdocstrings Markdown.

Reflow's docstrings are written in reStructuredText style: cross-reference
roles (``:class:`~reflow_core.errors.StorageError```), ``::`` literal-block
markers. This Griffe extension rewrites them before the docstrings are parsed:

* a role whose target is a public object of a Reflow package becomes an
  autorefs cross-reference, so a broken reference fails ``mkdocs build --strict``;
* a role whose target is private or outside Reflow (``datetime.datetime``)
  becomes an optional reference, rendered as code when nothing documents it;
* a definition list (a term line followed at once by indented lines) becomes
  a Markdown definition list;
* a paragraph ending in ``::`` ends in ``:`` (the indented block after it is
  already a Markdown code block).
"""

from __future__ import annotations

import re
from importlib.util import find_spec
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|meth|func|attr|data|mod|exc|obj|const|type)"
    r":`(?P<tilde>~?)(?P<target>[\w.]+)`"
)
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)
_LIST_ITEM = re.compile(r"([*+-]|\d+[.)]|#\.)\s")
_PACKAGES = ("reflow_core", "reflow_sqlite", "reflow_postgres", "reflow_redis")


def _resolve(obj: griffe.Object, target: str) -> str | None:
    head, _, rest = target.partition(".")
    if head in _PACKAGES or (rest and find_spec(head) is not None):
        return target  # already absolute, like reflow_core.codec.encode or datetime.datetime
    scopes: list[griffe.Object] = [obj]
    if obj.parent is not None:
        scopes.append(obj.parent)
    for scope in scopes:
        try:
            path = scope.resolve(head)
        except Exception:  # noqa: S112 - not resolvable from this scope
            continue
        return f"{path}.{rest}" if rest else path
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _definition_lists(text: str) -> str:
    """Turn reST definition lists at the docstring's top level into Markdown ones."""
    lines = text.split("\n")
    out: list[str] = []
    literal = False  # inside the indented block that follows a "::" paragraph
    i = 0
    while i < len(lines):
        line = lines[i]
        if literal and (not line.strip() or _indent(line) > 0):
            out.append(line)
            i += 1
            continue
        literal = False
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        is_term = (
            line.strip()
            and _indent(line) == 0
            and (i == 0 or not lines[i - 1].strip())
            and nxt.strip()
            and _indent(nxt) > 0
            and not _LIST_ITEM.match(line)
            and not line.startswith((">>>", "```"))
            and not line.rstrip().endswith("::")
        )
        if not is_term:
            literal = line.rstrip().endswith("::")
            out.append(line)
            i += 1
            continue
        body_indent = _indent(nxt)
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > 0):
            j += 1
        body = lines[i + 1 : j]
        while body and not body[-1].strip():
            body.pop()
        out.append(line)
        out.append(":   " + body[0].strip())
        out.extend("    " + b[body_indent:] if b.strip() else "" for b in body[1:])
        out.append("")
        i = j
    return "\n".join(out)


def _documented(path: str) -> bool:
    parts = path.split(".")
    return parts[0] in _PACKAGES and not any(part.startswith("_") for part in parts)


class SphinxRoles(griffe.Extension):
    """Rewrite reST roles and literal markers in every docstring of a package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)  # type: ignore[arg-type]

    def _rewrite(self, obj: griffe.Object, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            target = match["target"]
            title = target.rsplit(".", 1)[-1] if match["tilde"] else target
            if match["role"] in ("meth", "func"):
                title += "()"
            path = _resolve(obj, target)
            if path is None:
                return f"`{title}`"
            if _documented(path):
                return f"[`{title}`][{path}]"
            return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'

        text = _definition_lists(_ROLE.sub(replace, text))
        return _LITERAL_MARKER.sub(":", text)
