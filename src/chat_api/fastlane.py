"""The fast lane: the chat routes, called without FastAPI's router.

Every request through the gateway pays for routing before it pays for the
answer. FastAPI finds a route by trying each one in turn, then builds and
solves its dependencies, through three more middleware layers: about a
quarter of the CPU a `/v1/chat/completions` call costs here. The chat
routes take the same two arguments, the request and its caller, so this
ASGI layer calls them directly: one dictionary lookup, the same
`authenticate` dependency, the same endpoint function, the same exception
handlers. Everything else (and every other method on these paths) goes on
to FastAPI, which still documents these routes in the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from chat_api.calls import Caller
from chat_api.routes.deps import authenticate

Endpoint = Callable[[Request, Caller | None], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class HotRoute:
    """What the log line and metrics read from `scope["route"]`: the path."""

    path: str
    endpoint: Endpoint


class FastLane:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[tuple[str, str], Endpoint],
        handlers: Mapping[type[Exception], Handler],
    ) -> None:
        self.app = app
        self.routes: dict[tuple[Any, Any], HotRoute] = {
            key: HotRoute(key[1], endpoint) for key, endpoint in routes.items()
        }
        self.handlers = dict(handlers)  # Exception's handler is the 500 for anything unexpected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only an HTTP scope has a method: lifespan and websockets always pass on.
        route = self.routes.get((scope.get("method"), scope.get("path")))
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request, await authenticate(request))
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        del request  # with its body: an answer may stream for minutes, thousands at once
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None
