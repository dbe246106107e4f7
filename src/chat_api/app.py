"""Build the application: `create_app(settings)`. Nothing happens at import time.

Clients, pools and storage are opened in the lifespan, so a test builds an
app from the `Settings` it chooses and a server process builds exactly one.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, Response
from starlette.routing import Match
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from chat_api import __version__
from chat_api.access_log import RequestObserver
from chat_api.catalog import Catalog
from chat_api.config import Settings
from chat_api.errors import (
    BadRequest,
    ChatAPIError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
)
from chat_api.fastlane import FastLane, Handler, hot_routes
from chat_api.metrics import Metrics
from chat_api.middleware import (
    PAGE_CSP,
    CrossOrigin,
    GatewayMiddleware,
    is_openai_dialect,
    own_host_names,
    parse_networks,
)
from chat_api.redact import remember
from chat_api.routes import admin, openai_compat, ops, page, responses_api, simple, usage
from chat_api.routes.schemas import ChatRequest
from chat_api.runtime import open_runtime

log = logging.getLogger("chat_api")

WEB_DIR = files("chat_api") / "web"
# The documentation pages run only this server's scripts too; Swagger UI and ReDoc
# style themselves inline and ReDoc searches in a worker it builds from a blob.
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


class GatewayApp(FastAPI):
    """FastAPI, with the gateway's own layers in front of its middleware stack.

    Every request goes through the layers `front` builds: CORS (for
    browsers), then `GatewayMiddleware` (request id, body limits, security
    headers, the log line and metrics), then the fast lane, which answers the
    `@hot` routes itself. Only what the fast lane passes on enters FastAPI's
    own stack, with its error layer, telemetry hooks, body limit and router.
    Placed as FastAPI middleware, those layers ran inside FastAPI's own, and
    every request and every streamed event went through three more send
    wrappers. They sit where Starlette expects outer layers: in
    `build_middleware_stack`, which runs when the app starts.
    """

    front: Callable[[ASGIApp], ASGIApp] | None = None  # the gateway's layers, given the lane
    hot_handlers: dict[type[Exception], Handler] | None = None
    fast_lane: FastLane | None = None

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        if self.front is None or self.hot_handlers is None:
            return inner
        if self.user_middleware:
            names = ", ".join(getattr(m.cls, "__name__", repr(m.cls)) for m in self.user_middleware)
            raise RuntimeError(
                f"Middleware added to the app ({names}) would not see the fast lane's routes: "
                "add it to the gateway's layers in chat_api/app.py instead."
            )
        self.fast_lane = FastLane(inner, routes=hot_routes(self.routes), handlers=self.hot_handlers)
        return self.front(self.fast_lane)


def create_app(settings: Settings | None = None, *, own_process: bool = False) -> GatewayApp:
    """The ASGI app for `settings` (read from the environment when omitted).

    `own_process`: this app is all the process serves (`chat-api serve`), so it
    may tune the process-wide garbage collector while it runs (see below).
    Tests and other hosts leave it off: the tuning starts with a full
    collection of everything the host has loaded.
    """
    settings = settings or Settings()
    for secret in (settings.openai_api_key, settings.master_key):
        remember(secret.get_secret_value() if secret else None)  # scrubbed by value everywhere
    catalog = Catalog(settings)

    metrics = Metrics(settings.prometheus_multiproc_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            # The one thing the app keeps for its routes: read through routes.deps.runtime_of.
            app.state.runtime = await open_runtime(settings, catalog, metrics, stack)
            if own_process:
                stack.enter_context(_quiet_garbage_collector())
            yield

    app = GatewayApp(
        title="chat-api",
        version=__version__,
        description=(
            "Use OpenAI chat models through this server; the OpenAI key never leaves it. "
            "A simple API (`/chat`, `/chat/stream`) and the OpenAI API under `/v1`."
        ),
        lifespan=lifespan,
        default_response_class=Response,
        docs_url=None,  # served from the package below, not from a CDN
        redoc_url=None,
        # `/v1/chat/completions/` is a 404 like any unknown path, not a 307 to a
        # `Location` built from the request's Host header.
        redirect_slashes=False,
    )
    app.hot_handlers = _add_error_handlers(app, metrics)
    observe = RequestObserver(metrics)

    def front(fast_lane: ASGIApp) -> ASGIApp:
        gateway = GatewayMiddleware(
            fast_lane,
            max_body_bytes=settings.max_body_bytes,
            body_timeout=settings.body_timeout,
            observe=observe,
            trusted_proxies=parse_networks(settings.trusted_proxies),
        )
        return CrossOrigin(
            gateway,
            # Keys off: a browser may call only on a name the gateway is known by.
            own_hosts=None
            if settings.keys_enabled
            else own_host_names(settings.allowed_origins, settings.host),
            allow_origins=list(settings.allowed_origins),
            allow_credentials=False,  # keys travel in headers, never in cookies
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "X-Upstream-Request-ID",
                *(
                    f"x-ratelimit-{what}-{kind}"
                    for what in ("limit", "remaining", "reset")
                    for kind in ("requests", "tokens")
                ),
            ],
            max_age=600,
        )

    app.front = front
    app.include_router(simple.router)
    app.include_router(openai_compat.router)
    app.include_router(responses_api.router)
    app.include_router(usage.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    _add_page(app)
    _document(app, settings)
    return app


def serve_app() -> GatewayApp:
    """The app for one `chat-api serve` worker process (uvicorn's factory)."""
    return create_app(own_process=True)


@contextmanager
def _quiet_garbage_collector() -> Iterator[None]:
    """Keep Python's garbage collector from stalling requests.

    Everything built at start-up (modules, the app, pools: about 170,000
    objects) lives until exit, yet each full collection walked all of it,
    about 150 ms with every request waiting: frozen, those objects are
    skipped. And with hundreds of calls in flight, the default of a young
    collection every 700 new objects walked their live objects over and
    over; every 50,000 (a few hundred requests) it measured 20 % less CPU and
    an added p99 of 10 ms instead of 200-400 ms at 500 requests/s (bench/).
    Reference counting still frees almost everything at once; this only
    spaces out the search for reference cycles.
    """
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(
            str(WEB_DIR / "index.html"),
            media_type="text/html",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )

    def docs_page(name: str) -> Response:
        return FileResponse(
            str(WEB_DIR / "docs" / name),
            media_type="text/html",
            headers={"Content-Security-Policy": DOCS_CSP, "Cache-Control": "no-cache"},
        )

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> Response:
        return docs_page("swagger.html")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> Response:
        return docs_page("redoc.html")

    app.mount("/static", StaticFiles(directory=str(WEB_DIR)), name="static")


def _error_response(request: Request, error: ChatAPIError) -> Response:
    openai_dialect = is_openai_dialect(request.url.path)
    call = request.scope.get("state", {}).get("call")  # a call let through: its rate headers
    headers = {**call.headers, **error.headers} if call is not None else error.headers
    return Response(
        error.body(openai_dialect),
        status_code=error.status_for(openai_dialect),
        media_type="application/json",
        headers=headers,
    )


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
V1_ENDPOINTS = (
    "/v1/models",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/conversations",
    "/v1/embeddings",
)


def _routes_to(request: Request, method: str) -> bool:
    scope = {**request.scope, "method": method}
    return any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes)


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> dict[type[Exception], Handler]:
    async def on_chat_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ChatAPIError)
        if exc.status == 429 or isinstance(exc, ServiceUnavailable):
            metrics.rejections.labels(exc.reason or "unknown").inc()
        return _error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else "request"
        return _error_response(request, BadRequest(f"'{where}' is not valid."))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404 and is_openai_dialect(request.url.path):
            error: ChatAPIError = NotFound(
                f"Invalid URL ({request.method} {request.url.path}): this server offers "
                f"{', '.join(V1_ENDPOINTS)}.",
                code="unknown_url",
            )
        elif exc.status_code == 404:
            error = NotFound(f"There is nothing at {request.url.path}.")
        elif exc.status_code == 405:
            # RFC 9110: a 405 lists every method the path takes; ask the router for each.
            allowed = [method for method in METHODS if _routes_to(request, method)]
            error = MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}.",
                headers={"Allow": ", ".join(allowed)},
            )
        else:
            error = BadRequest(str(exc.detail))
        return _error_response(request, error)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody is listening any more

    async def on_crash(request: Request, exc: Exception) -> Response:
        request_id = request.scope.get("state", {}).get("request_id", "?")
        log.error("unexpected error", exc_info=exc, extra={"request_id": request_id})
        error = ChatAPIError(
            f"Something went wrong on the server (request id {request_id}). Try again."
        )
        return _error_response(request, error)

    handlers: dict[type[Exception], Handler] = {
        ChatAPIError: on_chat_error,
        RequestValidationError: on_validation,
        HTTPException: on_http,
        ClientDisconnect: on_disconnect,
        Exception: on_crash,
    }
    for cls, handler in handlers.items():
        app.add_exception_handler(cls, handler)
    return handlers


def _document(app: FastAPI, settings: Settings) -> None:
    """Add the simple API's request schema, which routes read by hand for speed."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            request_schema = ChatRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_schema.pop("$defs", {}))
            components["ChatRequest"] = request_schema
            _document_limits(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_limits(schema: dict[str, Any], settings: Settings) -> None:
    """Put the configured ceilings into the document, so it says what is really accepted."""
    simple = schema["components"]["schemas"]["ChatRequest"]["properties"]["max_tokens"]
    for branch in simple.get("anyOf", [simple]):
        if branch.get("type") == "integer":
            branch["maximum"] = settings.max_tokens_limit
    components = schema["components"]["schemas"]
    models = list(settings.models)
    # An empty model means the default, as does none.
    components["ChatRequest"]["properties"]["model"]["anyOf"][0]["enum"] = [*models, ""]
    key_body = schema["paths"]["/admin/keys"]["post"]["requestBody"]["content"]
    key_body["application/json"]["schema"]["properties"]["models"]["items"]["enum"] = models
    v1 = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    v1["application/json"]["schema"]["properties"]["max_tokens"]["maximum"] = (
        settings.max_tokens_limit
    )
