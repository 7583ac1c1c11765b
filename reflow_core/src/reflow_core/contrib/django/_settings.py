"""The ``REFLOW`` setting, read and checked."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from reflow_core.workflow import Workflow

__all__ = ["ReflowSettings", "load_workflows", "reflow_settings"]

_KEYS = frozenset({"STORAGE", "WORKFLOWS", "WORKER", "CLIENT"})


@dataclass(frozen=True)
class ReflowSettings:
    """The ``REFLOW`` setting of the project."""

    storage: str
    workflows: tuple[str, ...] = ()
    worker: dict[str, Any] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)


def _improperly(message: str) -> Exception:
    from django.core.exceptions import ImproperlyConfigured

    return ImproperlyConfigured(f"settings.REFLOW: {message}")


def reflow_settings() -> ReflowSettings:
    """The ``REFLOW`` setting. Raises Django's ``ImproperlyConfigured``,
    naming the key, when it is missing or malformed."""
    from django.conf import settings

    conf = getattr(settings, "REFLOW", None)
    if not isinstance(conf, dict):
        raise _improperly(
            'add REFLOW = {"STORAGE": "<storage URL>", "WORKFLOWS": [...]} to the settings'
        )
    unknown = sorted(set(conf) - _KEYS)
    if unknown:
        raise _improperly(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    storage = conf.get("STORAGE")
    if not isinstance(storage, str) or "://" not in storage:
        raise _improperly('"STORAGE" must be a storage URL such as "postgresql://..."')
    workflows = conf.get("WORKFLOWS", [])
    if isinstance(workflows, str) or not all(isinstance(w, str) for w in workflows):
        raise _improperly('"WORKFLOWS" must be a list of dotted paths (strings)')
    options: dict[str, dict[str, Any]] = {}
    for key in ("WORKER", "CLIENT"):
        value = conf.get(key, {})
        if not isinstance(value, dict):
            raise _improperly(f'"{key}" must be a dict of options')
        if {"storage", "workflows"} & set(value):
            raise _improperly(f'"{key}" must not set storage or workflows: set them once')
        options[key] = dict(value)
    return ReflowSettings(storage, tuple(workflows), options["WORKER"], options["CLIENT"])


def load_workflows(paths: Iterable[str] | None = None) -> list[Workflow[Any, Any]]:
    """The workflows ``paths`` (default: ``REFLOW["WORKFLOWS"]``) name. A
    path is a module, whose every module-level workflow counts, or the
    dotted path of a workflow or of a list of them. Raises
    ``ImproperlyConfigured`` for a path that names none."""
    if paths is None:
        paths = reflow_settings().workflows
    found: list[Workflow[Any, Any]] = []
    for path in paths:
        for wf in _workflows_at(path):
            if wf not in found:
                found.append(wf)
    return found


def _workflows_at(path: str) -> list[Workflow[Any, Any]]:
    try:
        module: ModuleType | None = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name is None or not path.startswith(exc.name):
            raise
        module = None
    if module is not None:
        found = [v for v in vars(module).values() if isinstance(v, Workflow)]
        if not found:
            raise _improperly(f'"WORKFLOWS": module {path!r} defines no workflow')
        return found
    from django.utils.module_loading import import_string

    try:
        obj = import_string(path)
    except ImportError as exc:
        raise _improperly(f'"WORKFLOWS": cannot import {path!r}: {exc}') from None
    if isinstance(obj, Workflow):
        return [obj]
    if isinstance(obj, list | tuple) and obj and all(isinstance(w, Workflow) for w in obj):
        return list(obj)
    raise _improperly(
        f'"WORKFLOWS": {path!r} is a {type(obj).__name__}, not a workflow, a list of '
        "workflows or a module defining some"
    )
