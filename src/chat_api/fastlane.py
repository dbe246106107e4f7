"""The fast lane: the hot routes, called without FastAPI's router.

Every request through the gateway pays for routing before it pays for the
answer. FastAPI finds a route by trying each one in turn, then builds and
solves its dependencies, through three more middleware layers: about half
the CPU a `/v1/chat/completions` call costs here. Routes marked `@hot` take
the same two arguments, the request and its caller, so this ASGI layer
calls them directly: one dictionary lookup, the same authentication
dependency (`authenticate` or `authenticate_call`), the same endpoint
function, the same exception handlers.
Everything else (and every other method on these paths) goes on to FastAPI,
which still documents these routes in the OpenAPI document.

It cannot diverge silently: the lane is built from FastAPI's own routes
(`hot_routes`), and a hot route that has any other dependency (its own or
its router's) stops startup, as does middleware added to the app, which the
lane would skip (`GatewayApp.build_middleware_stack`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from chat_api.calls import Caller
from chat_api.routes.deps import authenticate, authenticate_call

Endpoint = Callable[[Request, Caller | None], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]
Authenticate = Callable[[Request], Awaitable[Caller | None]]
AUTHENTICATORS: tuple[Authenticate, ...] = (authenticate, authenticate_call)
_HOT = "_chat_api_hot"


def hot(endpoint: Endpoint) -> Endpoint:
    """Mark a route's endpoint to be served by the fast lane."""
    setattr(endpoint, _HOT, True)
    return endpoint


def _api_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Every API route as it is served, with its routers' dependencies merged in.

    FastAPI 0.165 keeps an included router as one entry whose effective
    routes it builds on demand (`effective_candidates`); walk into those.
    """
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from _api_routes(candidates())
        elif isinstance(route, APIRoute) or getattr(route, "dependant", None) is not None:
            yield route


@dataclass(frozen=True, slots=True)
class HotRoute:
    """A hot route; the log line and metrics read its `path` from `scope["route"]`."""

    path: str
    endpoint: Endpoint
    authenticate: Authenticate


def hot_routes(routes: Iterable[BaseRoute]) -> dict[tuple[str, str], HotRoute]:
    """The routes marked `@hot`; a hot route with anything the lane would skip stops startup."""
    found: dict[tuple[str, str], HotRoute] = {}
    for route in _api_routes(routes):
        if not getattr(route.endpoint, _HOT, False):
            continue
        calls = [d.call for d in route.dependant.dependencies]
        extra = [call for call in calls if call not in AUTHENTICATORS]
        if extra or len(calls) != 1:
            names = ", ".join(getattr(call, "__name__", repr(call)) for call in extra)
            raise RuntimeError(
                f"{route.path} is served by the fast lane, which would skip its dependencies "
                f"({names or 'none'}): a hot route takes exactly one of authenticate or "
                "authenticate_call; make the rest part of it, or do not mark the route @hot."
            )
        for method in route.methods or ():
            found[(method, route.path)] = HotRoute(route.path, route.endpoint, calls[0])
    return found


class FastLane:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[tuple[str, str], HotRoute],
        handlers: Mapping[type[Exception], Handler],
    ) -> None:
        self.app = app
        self.routes: dict[tuple[Any, Any], HotRoute] = dict(routes)
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
            response = await route.endpoint(request, await route.authenticate(request))
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
