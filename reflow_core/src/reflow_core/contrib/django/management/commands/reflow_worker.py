"""``python manage.py reflow_worker``: ``reflow worker`` on the project's
``REFLOW`` setting."""

from __future__ import annotations

import os
from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from reflow_core.contrib.django import engine

_FORWARDED = (
    "concurrency",
    "processes",
    "workflows",
    "log_format",
    "log_level",
    "max_crashes",
    "crash_window",
)
"""The options passed on to ``reflow worker``."""


class Command(BaseCommand):
    help = (
        "Run Reflow workers for the workflows of settings.REFLOW until SIGTERM or SIGINT, "
        "then drain: `reflow worker` with the project's engine."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--concurrency", type=int, help="Runs in flight per process.")
        parser.add_argument(
            "--processes",
            type=int,
            help="Worker processes; more than 1 runs a supervisor that restarts them.",
        )
        parser.add_argument("--workflows", metavar="NAME,...", help="Serve only these workflows.")
        parser.add_argument(
            "--log-format",
            choices=["text", "json"],
            help="One line per event: readable text, or one JSON object.",
        )
        parser.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error", "critical"],
            help="debug also logs every run and step event.",
        )
        parser.add_argument(
            "--max-crashes",
            type=int,
            help="With --processes > 1: give up after more crashes of children than this ...",
        )
        parser.add_argument("--crash-window", type=float, help="... within this many seconds.")

    def handle(self, *args: Any, **options: Any) -> None:
        from reflow_core.cli.worker import worker

        # The engine is checked here, where a mistake is a Django error.
        engine()
        # Children of --processes start `python -m reflow_core worker`
        # themselves: they find the project's modules and settings as this
        # process does.
        base = getattr(settings, "BASE_DIR", None)
        app_dir = os.fspath(base) if base is not None else os.getcwd()
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings.SETTINGS_MODULE)
        argv = ["reflow_core.contrib.django:engine", "--app-dir", app_dir]
        # Only what was given: `reflow worker` has the defaults (and says them).
        for name in _FORWARDED:
            if options[name] is not None:
                argv += [f"--{name.replace('_', '-')}", str(options[name])]
        worker.main(args=argv, prog_name="manage.py reflow_worker")
