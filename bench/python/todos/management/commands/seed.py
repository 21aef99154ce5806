"""``manage.py seed N``: replaces every todo with N todos titled "Todo 1" .. "Todo N", with
ids 1..N (as dcrf-demo's --seed does)."""
from django.core.management.base import BaseCommand
from django.db import connection, transaction

from todos.models import Todo


class Command(BaseCommand):
    help = "Replace all todos with N seeded ones (ids 1..N)."

    def add_arguments(self, parser):
        parser.add_argument("n", type=int)

    def handle(self, *args, n, **options):
        with transaction.atomic():
            table = Todo._meta.db_table
            with connection.cursor() as cursor:
                if connection.vendor == "postgresql":
                    cursor.execute(f'TRUNCATE "{table}" RESTART IDENTITY')
                else:
                    Todo.objects.all().delete()
                    cursor.execute("DELETE FROM sqlite_sequence WHERE name = %s", [table])
            Todo.objects.bulk_create(
                (Todo(title=f"Todo {i}") for i in range(1, n + 1)), batch_size=500
            )
        self.stdout.write(f"seeded {n} todos")
