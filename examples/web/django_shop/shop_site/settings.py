"""Settings of the Django example: an order is saved in Django's database
and, once that transaction commits, a Reflow run confirms it.

Environment: ``REFLOW_URL`` (the Reflow store, default a SQLite file here)
and ``DJANGO_DB`` (Django's own database: a SQLite file, or a
``postgresql://`` URL, which may name the very database Reflow uses: Reflow
keeps to its own schema).
"""

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

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


def _database(where: str) -> dict[str, object]:
    if where.startswith(("postgresql://", "postgres://")):
        url = urlsplit(where)
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path.lstrip("/"),
            "USER": unquote(url.username or ""),
            "PASSWORD": unquote(url.password or ""),
            "HOST": url.hostname or "",
            "PORT": str(url.port or ""),
        }
    # The web server and the worker both write to it.
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": where, "OPTIONS": {"timeout": 20}}


DATABASES = {"default": _database(os.environ.get("DJANGO_DB", str(BASE_DIR / "db.sqlite3")))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

REFLOW = {
    "STORAGE": os.environ.get("REFLOW_URL", f"sqlite:///{BASE_DIR / 'reflow.db'}"),
    # Every workflow defined in orders/workflows.py.
    "WORKFLOWS": ["orders.workflows"],
    # Options of the engine `python manage.py reflow_worker` runs.
    "WORKER": {"concurrency": 8, "poll_interval": "200ms"},
}
