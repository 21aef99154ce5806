from django.db import models


class Todo(models.Model):
    """One todo: {"id", "title", "done", "owner"}, ordered by id."""

    title = models.CharField(max_length=200)
    done = models.BooleanField(default=False)
    owner = models.CharField(max_length=200, default="", blank=True)

    class Meta:
        ordering = ["id"]
