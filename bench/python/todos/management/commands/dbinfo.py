"""``manage.py dbinfo``: prints, as one JSON object, the database settings a connection of
this project really has (read back from the database, not from settings.py), for
bench/run.sh to record in meta.json."""
import json

from django.core.management.base import BaseCommand
from django.db import connection

SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def _one(cursor, sql):
    cursor.execute(sql)
    row = cursor.fetchone()
    return row[0] if row else None


class Command(BaseCommand):
    help = "Print the effective database settings as JSON."

    def handle(self, *args, **options):
        connection.ensure_connection()
        info = {"engine": connection.settings_dict["ENGINE"], "vendor": connection.vendor}
        with connection.cursor() as c:
            if connection.vendor == "sqlite":
                info.update(
                    sqlite_version=_one(c, "SELECT sqlite_version()"),
                    sqlite_source_id=_one(c, "SELECT sqlite_source_id()"),
                    journal_mode=_one(c, "PRAGMA journal_mode"),
                    synchronous=SYNCHRONOUS.get(_one(c, "PRAGMA synchronous"), "?"),
                    busy_timeout_ms=_one(c, "PRAGMA busy_timeout"),
                )
            elif connection.vendor == "postgresql":
                info.update(
                    server_version=_one(c, "SHOW server_version"),
                    synchronous_commit=_one(c, "SHOW synchronous_commit"),
                    fsync=_one(c, "SHOW fsync"),
                    isolation=_one(c, "SHOW transaction_isolation"),
                )
        self.stdout.write(json.dumps(info))
