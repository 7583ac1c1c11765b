"""Reflow in a Django project: add ``"reflow_core.contrib.django"`` to
``INSTALLED_APPS`` and describe the storage and workflows in settings.

.. code-block:: python

    REFLOW = {
        "STORAGE": "postgresql://app@db/app",    # required: the storage URL
        "WORKFLOWS": ["orders.workflows"],       # modules, or dotted paths to workflows
        "WORKER": {"concurrency": 20},           # Engine options of `manage.py reflow_worker`
        "CLIENT": {},                            # SyncClient options of client()
    }

Views enqueue with :func:`client` (a process-wide
:class:`~reflow_core.sync.SyncClient`) or, when the run must exist only if
the view's transaction commits, with :func:`enqueue_on_commit`. The
workflows run in ``python manage.py reflow_worker``.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any

from ._connections import DatabaseConnections
from ._settings import load_workflows, reflow_settings

if TYPE_CHECKING:
    from reflow_core.engine import Engine, Run
    from reflow_core.sync import SyncClient
    from reflow_core.workflow import Workflow

__all__ = [
    "DatabaseConnections",
    "client",
    "engine",
    "enqueue_on_commit",
    "load_workflows",
    "reflow_settings",
]

_client: SyncClient | None = None
_client_lock = threading.Lock()


def client() -> SyncClient:
    """The process's :class:`~reflow_core.sync.SyncClient`, built from the
    ``REFLOW`` setting at the first call and shared by every thread (and
    rebuilt in a forked child by the client itself)."""
    global _client
    with _client_lock:
        if _client is None:
            from reflow_core.sync import SyncClient

            conf = reflow_settings()
            _client = SyncClient(conf.storage, workflows=load_workflows(), **conf.client)
        return _client


def _forget_client(*, setting: str, **kwargs: Any) -> None:
    """Django's ``setting_changed`` (sent by ``override_settings`` in tests):
    a changed ``REFLOW`` setting gets a new client at the next call."""
    global _client
    if setting != "REFLOW":
        return
    with _client_lock:
        stale, _client = _client, None
    if stale is not None:
        stale.close()


def engine() -> Engine:
    """A new :class:`~reflow_core.engine.Engine` from the ``REFLOW``
    setting, with every workflow of ``WORKFLOWS`` and the ``WORKER``
    options: what ``manage.py reflow_worker`` runs (as ``reflow worker
    reflow_core.contrib.django:engine``). Sets Django up first when it is
    not yet (a worker process started by the supervisor).

    Its plain (``def``) steps use Django's ORM as a view does: the
    :class:`DatabaseConnections` plugin closes a step thread's broken or
    expired (``CONN_MAX_AGE``) connections before and after each step, as
    Django does around each request."""
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()
    from reflow_core.engine import Engine

    conf = reflow_settings()
    options = dict(conf.worker)
    plugins = [DatabaseConnections(), *options.pop("plugins", ())]
    return Engine(storage=conf.storage, workflows=load_workflows(), plugins=plugins, **options)


def enqueue_on_commit(
    workflow: Workflow[Any, Any] | str,
    input: Any = None,
    *,
    using: str | None = None,
    robust: bool = False,
    **options: Any,
) -> concurrent.futures.Future[Run]:
    """Enqueue a run of ``workflow`` with ``input`` when the current
    transaction of database ``using`` commits, with :func:`client`; when it
    rolls back, nothing is enqueued. Outside a transaction (autocommit) it
    enqueues at once. ``options`` are :meth:`Engine.enqueue
    <reflow_core.engine.Engine.enqueue>`'s (``idempotency_key``, ``delay``,
    ...); an ``idempotency_key`` made from what the transaction saved
    (``f"order-{order.pk}"``) makes a retried request find the same run.

    Returns a :class:`concurrent.futures.Future` that holds the
    :class:`~reflow_core.engine.Run` once the commit has enqueued it (or
    the error enqueueing raised). After the outermost ``atomic()`` block
    has committed it is done, so a view can read ``future.result()`` there;
    inside it (or with ``ATOMIC_REQUESTS``, until the response is sent) it
    is not yet, and after a rollback it never will be.

    The workflow and input are checked now, inside the transaction: an
    unknown workflow name raises
    :class:`~reflow_core.errors.WorkflowNotFoundError` and an invalid input
    :class:`~reflow_core.errors.ValidationError` (or
    :class:`~reflow_core.errors.SerializationError`), so the view can still
    roll back. A failure of the enqueue itself, after the commit, is raised
    from the commit as Django raises what ``on_commit`` callbacks raise, or
    only logged with ``robust=True``.
    """
    from django.db import transaction

    from reflow_core import codec
    from reflow_core.errors import WorkflowNotFoundError
    from reflow_core.workflow import Workflow, to_plain_input

    the_client = client()
    if isinstance(workflow, str):
        known = {wf.name: wf for wf in the_client.workflows}
        found = known.get(workflow)
        if found is None:
            raise WorkflowNotFoundError(workflow, list(known))
        workflow = found
    elif not isinstance(workflow, Workflow):
        raise TypeError(f"workflow must be a Workflow or its name, got {type(workflow).__name__}")
    raw = to_plain_input(input)
    workflow.validate_input(raw)
    codec.encode(raw)
    chosen: Workflow[Any, Any] = workflow
    future: concurrent.futures.Future[Run] = concurrent.futures.Future()

    def enqueue() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            run = the_client.enqueue(chosen, raw, **options)
        except Exception as exc:
            future.set_exception(exc)
            raise
        future.set_result(run)

    transaction.on_commit(enqueue, using=using, robust=robust)
    return future
