"""The Django application of Reflow."""

from __future__ import annotations

from django.apps import AppConfig

from ._settings import reflow_settings


class ReflowConfig(AppConfig):
    """Checks the ``REFLOW`` setting when Django starts, so a mistake fails
    ``manage.py check`` and the server's start, not the first request."""

    name = "reflow_core.contrib.django"
    label = "reflow"
    verbose_name = "Reflow"

    def ready(self) -> None:
        from django.test.signals import setting_changed

        from . import _forget_client

        reflow_settings()
        setting_changed.connect(_forget_client, dispatch_uid="reflow-client")
