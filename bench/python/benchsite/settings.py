"""Settings of the Python DCRF baseline: the same surface as dcrf-demo, production-like
(DEBUG off, persistent database connection), the in-memory channel layer, and the database
bench/run.sh chooses:

- ``DATABASE_URL=postgres://user:password@host:port/name``: PostgreSQL through
  ``django.db.backends.postgresql`` (psycopg 3, pinned in requirements.txt);
- otherwise a SQLite file, ``DCRF_BENCH_PY_DB`` (default ``bench/python/db.sqlite3``), with
  ``PRAGMA journal_mode=WAL`` and ``PRAGMA synchronous=$DCRF_BENCH_SQLITE_SYNCHRONOUS``
  (default FULL: what dcrf-demo runs with, see bench/run.sh) and a 5 s busy timeout (dcrf
  sets ``busy_timeout=5000``).

``manage.py dbinfo`` prints the settings a connection really has (bench/run.sh records them).
"""
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "benchmark-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
    "channels",
    "todos",
]
MIDDLEWARE = []
ROOT_URLCONF = "benchsite.urls"
ASGI_APPLICATION = "benchsite.asgi.application"


def _database():
    url = os.environ.get("DATABASE_URL", "")
    if url:
        u = urlsplit(url)
        if u.scheme not in ("postgres", "postgresql"):
            raise ValueError(f"DATABASE_URL: unsupported scheme {u.scheme!r} (postgres only)")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(u.path.lstrip("/")),
            "USER": unquote(u.username or ""),
            "PASSWORD": unquote(u.password or ""),
            "HOST": u.hostname or "",
            "PORT": str(u.port or ""),
            # Keep the connection open (channels closes it after every action otherwise).
            "CONN_MAX_AGE": None,
        }
    synchronous = os.environ.get("DCRF_BENCH_SQLITE_SYNCHRONOUS", "FULL").upper()
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"DCRF_BENCH_SQLITE_SYNCHRONOUS: unknown level {synchronous!r}")
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DCRF_BENCH_PY_DB", str(BASE_DIR / "db.sqlite3")),
        "CONN_MAX_AGE": None,
        "OPTIONS": {
            "init_command": f"PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}",
            # sqlite3's busy timeout, seconds (dcrf: busy_timeout=5000 ms).
            "timeout": 5,
        },
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
