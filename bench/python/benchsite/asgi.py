"""ASGI entry point: /ws/echo/ and /ws/todos/ over WebSockets (no auth middleware, like the
demo without a token)."""
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from todos.consumers import EchoConsumer, TodoConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [
                path("ws/echo/", EchoConsumer.as_asgi()),
                path("ws/todos/", TodoConsumer.as_asgi()),
            ]
        ),
    }
)
