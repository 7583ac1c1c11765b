#!/usr/bin/env python
"""The Django example's command line: ``python manage.py runserver``,
``python manage.py reflow_worker``, ``python manage.py migrate``."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
