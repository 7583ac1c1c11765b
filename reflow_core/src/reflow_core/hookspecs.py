"""Every pluggy hook specification of Reflow, in one place.

Plugins are modules or objects with functions named after these specs and
marked with :data:`hookimpl`. Three kinds:

* **Backends** implement :func:`reflow_register_backends`. Installed
  distributions announce them under the ``reflow`` entry-point group, one
  entry point per URL scheme they serve, named after the scheme
  (``sqlite = "reflow_sqlite.plugin"``), so opening a URL loads only the
  backend it needs.
* **Observers** implement the lifecycle hooks of :class:`LifecycleSpecs`
  (logging, metrics, tracing). Register them on an engine
  (``Engine(plugins=[...])``) or announce them under the same group with an
  entry point whose name starts with ``observer-``; engines load those unless
  created with ``load_entry_points=False`` or with
  ``REFLOW_DISABLE_PLUGIN_AUTOLOAD`` set. Lifecycle hook implementations may
  be ``async def`` or plain ``def``; they are called one after the other and
  awaited in turn, and one that raises never affects a run: the error goes
  to ``reflow_error``.
* **Commands** implement :func:`reflow_register_commands` to add
  subcommands to the ``reflow`` command line; they are announced under the
  ``reflow.commands`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pluggy

from .storage import Storage

__all__ = [
    "PROJECT_NAME",
    "LifecycleSpecs",
    "Register",
    "StorageFactory",
    "hookimpl",
    "hookspec",
    "reflow_register_backends",
    "reflow_register_commands",
]

PROJECT_NAME = "reflow"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class StorageFactory(Protocol):
    """Builds a storage object from a URL and keyword options."""

    def __call__(self, url: str, /, **options: Any) -> Storage: ...


Register = Callable[..., None]
"""``register(scheme, factory, *, description="")``: announce one URL scheme."""


@hookspec
def reflow_register_commands(cli: Any) -> None:
    """Add subcommands to the ``reflow`` command line.

    ``cli`` is the root ``click.Group``; call ``cli.add_command(...)``
    (or ``cli.group()``). Announce the implementing module under the
    ``reflow.commands`` entry-point group (``conformance =
    "reflow_conformance.commands"``); the ``reflow`` command loads those when
    it starts, unless ``REFLOW_DISABLE_PLUGIN_AUTOLOAD`` is set. Commands
    read the global options (``--url``, ``--json``, ``--debug``) from
    ``click.get_current_context().find_object(reflow_core.cli.State)``.

    Added in 0.1.
    """


@hookspec
def reflow_register_backends(register: Register) -> None:
    """Announce the storage backends this plugin provides.

    Call ``register(scheme, factory, description=...)`` once per URL scheme,
    where ``factory(url, **options)`` returns an object implementing
    :class:`reflow_core.storage.Storage` without connecting yet (the engine
    calls ``initialize()``). Registering a scheme that another plugin already
    registered is an error naming both.

    Added in 0.1.
    """


class LifecycleSpecs:
    """The lifecycle hooks an observer plugin may implement.

    Each receives the event dataclass from :mod:`reflow_core.events`. All were
    added in 0.1.
    """

    @hookspec
    def reflow_run_started(self, event: Any) -> None:
        """A worker claimed a run and starts or resumes it
        (:class:`~reflow_core.events.RunStarted`)."""

    @hookspec
    def reflow_run_reclaimed(self, event: Any) -> None:
        """A worker claimed a run whose previous worker's lease lapsed
        (:class:`~reflow_core.events.RunReclaimed`); ``reflow_run_started``
        follows unless the run is failed at once."""

    @hookspec
    def reflow_step_started(self, event: Any) -> None:
        """An attempt of a step or parallel branch starts
        (:class:`~reflow_core.events.StepStarted`)."""

    @hookspec
    def reflow_step_completed(self, event: Any) -> None:
        """A step produced its output (:class:`~reflow_core.events.StepCompleted`)."""

    @hookspec
    def reflow_step_attempt_failed(self, event: Any) -> None:
        """An attempt of a step or parallel branch raised, with the error and
        the delay before the next attempt, or ``None`` when the step gives up
        (:class:`~reflow_core.events.StepAttemptFailed`)."""

    @hookspec
    def reflow_step_skipped(self, event: Any) -> None:
        """A step's ``when=`` predicate was false (:class:`~reflow_core.events.StepSkipped`)."""

    @hookspec
    def reflow_run_sleeping(self, event: Any) -> None:
        """A run reached a durable sleep and was released until its wake-up
        time (:class:`~reflow_core.events.RunSleeping`)."""

    @hookspec
    def reflow_run_waiting(self, event: Any) -> None:
        """A run reached a wait with no event buffered and was released until
        the event or the timeout (:class:`~reflow_core.events.RunWaiting`)."""

    @hookspec
    def reflow_run_completed(self, event: Any) -> None:
        """A run finished with an output (:class:`~reflow_core.events.RunCompleted`)."""

    @hookspec
    def reflow_run_failed(self, event: Any) -> None:
        """A run failed for good (:class:`~reflow_core.events.RunFailed`)."""

    @hookspec
    def reflow_run_cancelled(self, event: Any) -> None:
        """A run was cancelled through this engine
        (:class:`~reflow_core.events.RunCancelled`)."""

    @hookspec
    def reflow_error(self, error: BaseException, where: str) -> None:
        """Something that must not affect runs failed: a hook implementation,
        an ``on_failure`` handler. ``where`` says what; ``error`` carries a
        note naming the plugin. An exception raised here is only logged."""
