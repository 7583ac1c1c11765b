"""Subcommands from other distributions, through the ``reflow_register_commands`` hook.

A distribution announces a plugin module under the ``reflow.commands``
entry-point group; the module implements
:func:`reflow_core.hookspecs.reflow_register_commands` and adds its click
commands to the group it is given. ``REFLOW_DISABLE_PLUGIN_AUTOLOAD`` turns
the loading off, as it does for backends and observers. A plugin that fails
to load, or whose hook raises, is skipped with a warning: the other commands
keep working.
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import entry_points

import click
import pluggy

from reflow_core import hookspecs
from reflow_core.registry import DISABLE_AUTOLOAD_ENV, load_entry_point

__all__ = ["COMMANDS_GROUP", "register_commands"]

COMMANDS_GROUP = "reflow.commands"
"""The entry-point group of plugins that add ``reflow`` subcommands."""


def _load(pm: pluggy.PluginManager) -> None:
    for ep in entry_points(group=COMMANDS_GROUP):
        loaded = load_entry_point(ep, "reflow command plugin", stacklevel=3)
        if loaded is not None and not pm.is_registered(loaded[1]):
            pm.register(loaded[1], name=loaded[0])


def register_commands(group: click.Group, plugins: list[object] | None = None) -> None:
    """Let plugins add their subcommands to ``group``: the ``plugins`` given,
    else those announced under :data:`COMMANDS_GROUP` (unless autoloading is
    disabled)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if plugins is None:
        if not os.environ.get(DISABLE_AUTOLOAD_ENV):
            _load(pm)
    else:
        for plugin in plugins:
            pm.register(plugin)
    pm.check_pending()
    # Each implementation is called on its own, so one that raises leaves
    # the others' commands in place.
    for impl in pm.hook.reflow_register_commands.get_hookimpls():
        kwargs = {"cli": group}
        try:
            impl.function(*[kwargs[name] for name in impl.argnames])
        except Exception as exc:
            warnings.warn(
                f"reflow command plugin {impl.plugin_name!r} failed to add its commands "
                f"and was skipped: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
