"""Settings of the Django example: an order is saved in Django's database
and, once that transaction commits, a Reflow run confirms it.

Environment: ``REFLOW_URL`` (the Reflow store, default a SQLite file here)
and ``DJANGO_DB`` (Django's own SQLite database).
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# An example's key: set DJANGO_SECRET_KEY to a secret of your own in production.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "reflow-example-only")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "reflow_core.contrib.django",
    "orders",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "shop_site.urls"
WSGI_APPLICATION = "shop_site.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB", str(BASE_DIR / "db.sqlite3")),
        # The web server and the worker both write to it.
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

REFLOW = {
    "STORAGE": os.environ.get("REFLOW_URL", f"sqlite:///{BASE_DIR / 'reflow.db'}"),
    # Every workflow defined in orders/workflows.py.
    "WORKFLOWS": ["orders.workflows"],
    # Options of the engine `python manage.py reflow_worker` runs.
    "WORKER": {"concurrency": 8, "poll_interval": "200ms"},
}
