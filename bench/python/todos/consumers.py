"""The DCRF 1.3 consumers of the baseline, mirroring dcrf-demo's surface.

- /ws/echo/: ``echo`` (every message field but ``action`` and ``request_id``, status 200) and
  ``whoami`` (the user, or null).
- /ws/todos/: list (limit/offset, default limit 100), retrieve, create, update, patch, delete,
  subscribe_instance / unsubscribe_instance, subscribe_to_all / unsubscribe_from_all, and
  bulk_set_done.
"""
from djangochannelsrestframework import mixins
from djangochannelsrestframework.consumers import AsyncAPIConsumer
from djangochannelsrestframework.decorators import action
from djangochannelsrestframework.generics import GenericAsyncAPIConsumer
from djangochannelsrestframework.observer import model_observer
from djangochannelsrestframework.observer.generics import ObserverModelInstanceMixin
from djangochannelsrestframework.pagination import WebsocketLimitOffsetPagination
from djangochannelsrestframework.permissions import AllowAny
from rest_framework import status
from rest_framework.exceptions import ValidationError

from .models import Todo
from .serializers import TodoSerializer


class EchoConsumer(AsyncAPIConsumer):
    permission_classes = (AllowAny,)

    @action()
    async def echo(self, request_id=None, action=None, **kwargs):
        return kwargs, status.HTTP_200_OK

    @action()
    async def whoami(self, **kwargs):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return None, status.HTTP_200_OK
        return {"id": user.pk, "username": user.get_username()}, status.HTTP_200_OK


class TodoPagination(WebsocketLimitOffsetPagination):
    default_limit = 100
    max_limit = 1000


class TodoConsumer(
    mixins.PaginatedModelListMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.PatchModelMixin,
    mixins.DeleteModelMixin,
    ObserverModelInstanceMixin,
    GenericAsyncAPIConsumer,
):
    queryset = Todo.objects.all()
    serializer_class = TodoSerializer
    pagination_class = TodoPagination
    permission_classes = (AllowAny,)

    @model_observer(Todo, serializer_class=TodoSerializer)
    async def todo_activity(
        self, message, observer=None, action=None, subscribing_request_ids=None, **kwargs
    ):
        for request_id in subscribing_request_ids or []:
            await self.reply(
                action=action, data=message, status=status.HTTP_200_OK, request_id=request_id
            )

    @action()
    async def subscribe_to_all(self, request_id=None, **kwargs):
        await self.todo_activity.subscribe(request_id=request_id)
        return {"subscribed": True}, status.HTTP_201_CREATED

    @action()
    async def unsubscribe_from_all(self, request_id=None, **kwargs):
        await self.todo_activity.unsubscribe(request_id=request_id)
        return {"subscribed": False}, status.HTTP_204_NO_CONTENT

    @action()
    def bulk_set_done(self, ids=None, done=None, **kwargs):
        """Sets ``done`` on the todos in ``ids``, saving each one so observers see it."""
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValidationError({"ids": ["Expected a list of integers."]})
        if not isinstance(done, bool):
            raise ValidationError({"done": ["Must be a valid boolean."]})
        updated = 0
        for todo in Todo.objects.filter(pk__in=ids):
            todo.done = done
            todo.save(update_fields=["done"])
            updated += 1
        return {"updated": updated}, status.HTTP_200_OK
