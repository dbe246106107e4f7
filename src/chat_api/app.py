"""Build the application: `create_app(settings)`. Nothing happens at import time.

Clients, pools and storage are opened in the lifespan, so a test builds an
app from the `Settings` it chooses and a server process builds exactly one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from redis.asyncio import Redis
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

from chat_api import __version__
from chat_api.auth import Guard
from chat_api.catalog import Catalog
from chat_api.config import Settings
from chat_api.engine import ChatEngine
from chat_api.errors import BadRequest, ChatAPIError, MethodNotAllowed, NotFound
from chat_api.limits.budgets import Budgets, MemoryBudgets, RedisBudgets
from chat_api.limits.counters import Counter, MemoryCounter, RedisCounter
from chat_api.limits.policy import KeyMeter
from chat_api.meter import CallResult
from chat_api.middleware import GatewayMiddleware, is_openai_dialect
from chat_api.providers import build_provider
from chat_api.routes import admin, openai_compat, simple, usage
from chat_api.routes.schemas import ChatRequest
from chat_api.store.database import migrate, open_engine
from chat_api.store.keys import KeyStore
from chat_api.store.ledger import Ledger

log = logging.getLogger("chat_api")

WEB_DIR = files("chat_api") / "web"
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)


def log_call(result: CallResult) -> None:
    """One line per upstream call, with ids only: never a key."""
    log.info(
        "call",
        extra={
            "request_id": result.request_id,
            "key_id": result.key_id,
            "endpoint": result.endpoint,
            "model": result.model,
            "streamed": result.streamed,
            "outcome": result.outcome,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "estimated": result.estimated,
            "latency_ms": round(result.latency * 1000, 1),
        },
    )


async def _open(app: FastAPI, settings: Settings, catalog: Catalog, stack: AsyncExitStack) -> None:
    """Open storage, Redis and the upstream client; `stack` closes them in reverse."""
    database = open_engine(settings.database_url)
    stack.push_async_callback(database.dispose)
    if settings.migrate_on_start:
        await migrate(database)
    ledger = Ledger(
        database,
        flush_interval=settings.ledger_flush_interval,
        batch_size=settings.ledger_batch_size,
    )
    ledger.start()
    stack.push_async_callback(ledger.close)

    counter: Counter = MemoryCounter()
    budgets: Budgets = MemoryBudgets()
    if settings.redis_url:
        redis = Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        stack.push_async_callback(redis.aclose)
        counter = RedisCounter(redis, prefix=settings.redis_prefix, replicas=settings.replicas)
        budgets = RedisBudgets(redis, prefix=settings.redis_prefix)

    def record(result: CallResult) -> None:
        ledger.add(result)
        log_call(result)

    meter = KeyMeter(catalog, counter, budgets, record, ledger.spent)
    stack.push_async_callback(meter.drain)  # runs before the ledger closes

    provider = build_provider(settings)
    if provider is not None:
        stack.push_async_callback(provider.aclose)
    else:
        log.warning(
            "No OpenAI key is set: chat answers 503. Set OPENAI_API_KEY_CYB_SEC, "
            "or CHAT_API_DEMO=1 for the demo model."
        )
    keys = KeyStore(database)
    app.state.engine = ChatEngine(settings, catalog, provider, meter)
    app.state.keys = keys
    app.state.ledger = ledger
    app.state.meter = meter
    app.state.guard = Guard(settings, keys, counter) if settings.keys_enabled else None
    if (
        not settings.keys_enabled
        and settings.has_upstream_key
        and settings.host not in ("127.0.0.1", "localhost", "::1")
    ):
        log.warning(
            "Anyone who can reach %s:%s can spend your OpenAI key: set CHAT_API_MASTER_KEY "
            "to require keys.",
            settings.host,
            settings.port,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app for `settings` (read from the environment when omitted)."""
    settings = settings or Settings()
    catalog = Catalog(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await _open(app, settings, catalog, stack)
            yield

    app = FastAPI(
        title="chat-api",
        version=__version__,
        description=(
            "Use OpenAI chat models through this server; the OpenAI key never leaves it. "
            "A simple API (`/chat`, `/chat/stream`) and the OpenAI API under `/v1`."
        ),
        lifespan=lifespan,
        default_response_class=Response,
    )
    app.state.settings = settings
    app.state.guard = None

    app.add_middleware(GatewayMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_credentials=False,  # keys travel in headers, never in cookies
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["X-Request-ID", "Retry-After", "X-Upstream-Request-ID"],
        max_age=600,
    )
    _add_error_handlers(app)
    app.include_router(simple.router)
    app.include_router(openai_compat.router)
    app.include_router(usage.router)
    app.include_router(admin.router)
    _add_page(app)
    _document(app)
    return app


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(
            str(WEB_DIR / "index.html"),
            media_type="text/html",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=str(WEB_DIR)), name="static")


def _error_response(request: Request, error: ChatAPIError) -> Response:
    openai_dialect = is_openai_dialect(request.url.path)
    return Response(
        error.body(openai_dialect),
        status_code=error.status_for(openai_dialect),
        media_type="application/json",
        headers=error.headers,
    )


def _add_error_handlers(app: FastAPI) -> None:
    async def on_chat_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ChatAPIError)
        return _error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else "request"
        return _error_response(request, BadRequest(f"'{where}' is not valid."))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            error: ChatAPIError = NotFound(f"There is nothing at {request.url.path}.")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}.")
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

    app.add_exception_handler(ChatAPIError, on_chat_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(Exception, on_crash)


def _document(app: FastAPI) -> None:
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
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
