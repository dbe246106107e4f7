"""The simple API, exactly as the original service defined it.

`/health`, `/models`, `/api`, `/chat` and `/chat/stream`. Errors are
`{"error": "<sentence>"}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from chat_api import __version__
from chat_api.calls import Chunk
from chat_api.errors import ChatAPIError, ServerStopping
from chat_api.fastlane import hot
from chat_api.http_responses import JSONResponse, until_disconnect
from chat_api.routes.deps import (
    CallingCallerDep,
    context,
    engine_of,
    read_json,
    relayed,
    runtime_of,
)
from chat_api.routes.schemas import (
    ChatRequest,
    ChatResponse,
    HealthResponse,
    ModelsResponse,
    SimpleError,
    parse_chat_request,
)
from chat_api.sse import EventStreamResponse, frame
from chat_api.tokens import tokens_for_chars

router = APIRouter(tags=["simple API"])

SERVICE_NAME = "OpenAI Chat API"
_ON_SHUTDOWN = frame(ServerStopping().body(openai_dialect=False))  # a stream's last event

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": SimpleError, "description": text}
    for status, text in {
        400: "Malformed JSON, a missing or blank message, a wrong type, or a model not allowed.",
        401: "A client key is required and was missing or wrong.",
        403: "The key may not use this model, OpenAI refuses it for the server's account, "
        "or the request came from a website that may not call this server.",
        413: "The body is larger than the limit.",
        429: "A rate limit or budget is used up; see Retry-After.",
        502: "OpenAI rejected the server's key, failed, or broke the connection.",
        503: "No OpenAI key is configured.",
        504: "OpenAI did not answer in time.",
    }.items()
}
_CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}},
    }
}
_STREAM_EXAMPLE = (
    'data: {"content": "Hel"}\n\ndata: {"content": "lo"}\n\n'
    'data: {"done": true, "model": "gpt-4o-mini", "usage": {"prompt_tokens": 9, '
    '"completion_tokens": 2, "total_tokens": 11}}\n\n'
)

ENDPOINTS = {
    "GET /health": "Is the service up, and which provider does it use.",
    "GET /models": "The models you may ask for, and the default.",
    "POST /chat": "Send a message, get the whole answer.",
    "POST /chat/stream": "Send a message, get the answer as it is written (server-sent events).",
    "GET /api": "This description.",
    "GET /": "The chat page.",
    "GET /v1/models": "OpenAI-compatible model list.",
    "POST /v1/chat/completions": "OpenAI-compatible chat completions, streaming or not.",
    "GET /usage": "Usage and remaining budget of the calling key.",
    "GET /docs": "Interactive API documentation.",
}


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> Response:
    """Liveness: 200 while the process runs; `degraded` when no OpenAI key is set."""
    settings = runtime_of(request).settings
    demo = settings.demo
    return JSONResponse(
        {
            "status": "healthy" if demo or settings.has_upstream_key else "degraded",
            "service": SERVICE_NAME,
            "provider": "demo" if demo else "OpenAI",
            "integration": "demo" if demo else "openai-direct",
        }
    )


@router.get("/models", response_model=ModelsResponse)
async def models(request: Request) -> Response:
    """The allow-list, in order, and the model used when a request names none."""
    catalog = engine_of(request).catalog
    return JSONResponse({"models": list(catalog.names), "default": catalog.default})


@router.get("/api")
async def api(request: Request) -> Response:
    """What this service is and which endpoints it offers."""
    return JSONResponse(
        {
            "name": SERVICE_NAME,
            "version": __version__,
            "description": (
                "Chat with OpenAI models through this server; the OpenAI key stays here. "
                "Speaks a simple API and the OpenAI API under /v1."
            ),
            "endpoints": ENDPOINTS,
        }
    )


def _openai_body(chat: ChatRequest, *, stream: bool) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if chat.system:
        messages.append({"role": "system", "content": chat.system})
    messages.extend({"role": m.role, "content": m.content} for m in chat.messages)
    messages.append({"role": "user", "content": chat.message})
    body: dict[str, Any] = {"messages": messages}
    if chat.model is not None:
        body["model"] = chat.model
    if chat.temperature is not None:
        body["temperature"] = chat.temperature
    if chat.max_tokens is not None:
        body["max_tokens"] = chat.max_tokens
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


@router.post(
    "/chat",
    response_model=ChatResponse,
    responses=_ERRORS,
    openapi_extra=_CHAT_BODY,
)
@hot
async def chat(request: Request, caller: CallingCallerDep) -> Response:
    """Send one message (with optional history) and get the whole answer."""
    engine = engine_of(request)
    chat_request = parse_chat_request(await read_json(request))
    prepared = engine.simple_chat.prepare(_openai_body(chat_request, stream=False), caller)
    ctx = context(request, "/chat", caller)
    completion = relayed(await until_disconnect(request.receive, engine.complete(prepared, ctx)))
    choices = completion.data.get("choices") or [{}]
    text = (choices[0].get("message") or {}).get("content") or ""
    history = [m.model_dump() for m in chat_request.messages]
    return JSONResponse(
        {
            "response": text,
            "model": prepared.model.name,
            "conversation": [
                *history,
                {"role": "user", "content": chat_request.message},
                {"role": "assistant", "content": text},
            ],
            "usage": _usage_of(completion.data.get("usage"), prepared.prompt_bound, len(text)),
        },
        headers={**ctx.headers, **_upstream_id(completion.upstream_request_id)},
    )


@router.post(
    "/chat/stream",
    responses={
        200: {
            "description": "Server-sent events: content pieces, then a done event.",
            "content": {"text/event-stream": {"example": _STREAM_EXAMPLE}},
        },
        **_ERRORS,
    },
    openapi_extra=_CHAT_BODY,
)
@hot
async def chat_stream(request: Request, caller: CallingCallerDep) -> Response:
    """Send one message and read the answer piece by piece as server-sent events.

    Each event is `data: {"content": "..."}`; the last is
    `data: {"done": true, "model": ..., "usage": {...}}`, or
    `data: {"error": "..."}` if the answer failed after it started.
    """
    runtime = runtime_of(request)
    engine = runtime.engine
    chat_request = parse_chat_request(await read_json(request))
    prepared = engine.simple_chat.prepare(_openai_body(chat_request, stream=True), caller)
    ctx = context(request, "/chat/stream", caller)
    chunks = await until_disconnect(request.receive, engine.stream(prepared, ctx))
    return EventStreamResponse(
        _simple_events(chunks, prepared.model.name, prepared.prompt_bound),
        owner=chunks,
        keepalive=runtime.settings.keepalive_interval,
        headers=ctx.headers,
        on_shutdown=_ON_SHUTDOWN,
    )


async def _simple_events(
    chunks: AsyncIterable[Chunk], model: str, prompt_estimate: int
) -> AsyncIterator[bytes]:
    usage: Any = None
    relayed = 0
    try:
        async for chunk in chunks:
            usage = chunk.data.get("usage") or usage
            content = _first_choice_content(chunk.data)
            del chunk  # not held while the next event is awaited: thousands wait at once
            if content:
                relayed += len(content)
                yield frame(orjson.dumps({"content": content}))
        done = {"done": True, "model": model}
        done["usage"] = _usage_of(usage, prompt_estimate, relayed)
        yield frame(orjson.dumps(done))
    except ChatAPIError as exc:
        yield frame(orjson.dumps({"error": exc.message}))


def _first_choice_content(data: dict[str, Any]) -> str:
    """The text a stream chunk adds to the first choice (the simple API has one)."""
    for choice in data.get("choices") or ():
        if choice.get("index", 0) == 0:
            content = (choice.get("delta") or {}).get("content")
            return content if isinstance(content, str) else ""
    return ""


def _usage_of(usage: Any, prompt_estimate: int, answer_chars: int) -> dict[str, int]:
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        prompt = usage["prompt_tokens"]
        completion = int(usage.get("completion_tokens") or 0)
    else:
        prompt, completion = prompt_estimate, tokens_for_chars(answer_chars)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _upstream_id(upstream_request_id: str | None) -> dict[str, str]:
    return {"X-Upstream-Request-ID": upstream_request_id} if upstream_request_id else {}
