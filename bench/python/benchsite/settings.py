"""Settings of the Python DCRF baseline: the same surface as dcrf-demo, production-like
(DEBUG off, persistent database connection), SQLite and the in-memory channel layer."""
import os
from pathlib import Path

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

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DCRF_BENCH_PY_DB", str(BASE_DIR / "db.sqlite3")),
        # Keep the connection open (channels closes it after every action otherwise).
        "CONN_MAX_AGE": None,
        "OPTIONS": {
            # WAL and synchronous=NORMAL: no fsync per write, as a tuned deployment would do.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
