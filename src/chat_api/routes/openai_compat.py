"""The OpenAI-compatible API under `/v1`, for the official SDKs and every tool built on them.

Requests pass through with every field the client sent (tools,
response_format, n, stop, seed, logprobs, ...); answers and stream chunks are
relayed as the bytes the upstream sent. Errors are OpenAI-shaped.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from starlette.responses import Response

from chat_api.calls import Caller, Chunk
from chat_api.catalog import Catalog
from chat_api.errors import BadRequest, ChatAPIError, ModelNotAllowed, ServerStopping
from chat_api.fastlane import hot
from chat_api.http_responses import JSONResponse, until_disconnect
from chat_api.routes.deps import (
    CallerDep,
    CallingCallerDep,
    context,
    engine_of,
    read_json,
    relayed,
    runtime_of,
)
from chat_api.sse import DONE, EventStreamResponse, frame

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible API"])
_ON_SHUTDOWN = frame(ServerStopping().body(openai_dialect=True))  # a stream's last event

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
V1_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for status, text in {
        400: "The request is malformed.",
        403: "This key may not use that model, OpenAI refused it for this project, "
        "or the request came from a website that may not call this server.",
        401: "A client key is required and was missing or wrong.",
        404: "The model, or the stored object, is not available here.",
        413: "The body is larger than the limit.",
        429: "A rate limit or budget is used up; see Retry-After.",
        502: "OpenAI rejected the server's key, failed, or broke the connection.",
        503: "No OpenAI key is configured.",
        504: "OpenAI did not answer in time.",
    }.items()
}
_COMPLETION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["messages"],
                    "properties": {
                        "model": {"type": ["string", "null"]},  # none: the default
                        "messages": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["role"],
                                "properties": {
                                    "role": {
                                        "type": "string",
                                        "enum": [
                                            "system",
                                            "developer",
                                            "user",
                                            "assistant",
                                            "tool",
                                            "function",
                                        ],
                                    },
                                    "content": {
                                        "anyOf": [
                                            {"type": "string"},
                                            {"type": "array", "items": {"type": "object"}},
                                            {"type": "null"},
                                        ]
                                    },
                                },
                                # Only assistant turns (and tool calls) may leave content out.
                                "if": {
                                    "properties": {
                                        "role": {"enum": ["system", "developer", "user", "tool"]}
                                    },
                                    "not": {
                                        "required": ["tool_calls"],
                                        "properties": {
                                            "tool_calls": {"type": "array", "minItems": 1}
                                        },
                                    },
                                },
                                "then": {
                                    "required": ["content"],
                                    "properties": {"content": {"not": {"type": "null"}}},
                                },
                            },
                        },
                        "stream": {"type": ["boolean", "null"]},  # null: not set (Node SDK)
                        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
                        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
                    },
                    "additionalProperties": True,
                },
                "example": {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "stream": False,
                },
            }
        },
    }
}


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "openai"}


def _visible(catalog: Catalog, caller: Caller | None) -> list[str]:
    names = [*catalog.names, *catalog.embedding_names]
    if caller is None or not caller.models:
        return names
    return [name for name in names if name in caller.models]


@router.get("/models", responses=V1_ERRORS)
async def list_models(request: Request, caller: CallerDep) -> Response:
    """The models this key may use (chat and embedding), as OpenAI's `GET /v1/models` lists them."""
    catalog = engine_of(request).catalog
    data = [
        _model_object(name, catalog.published.get(name, 0)) for name in _visible(catalog, caller)
    ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/models/{model}", responses=V1_ERRORS)
async def retrieve_model(model: str, request: Request, caller: CallerDep) -> Response:
    """One model, as OpenAI's `GET /v1/models/{model}` returns it, with its real `created`."""
    engine = engine_of(request)
    catalog = engine.catalog
    visible = _visible(catalog, caller)
    if model not in visible:
        raise ModelNotAllowed(model, tuple(visible))
    created = catalog.published.get(model)
    if created is None and engine.provider is not None:
        try:
            path = f"/models/{quote(model, safe='')}"  # one path segment, whatever the name
            answer = await engine.provider.forward(
                "GET", path, None, request.scope["state"]["request_id"]
            )
        except ChatAPIError:
            answer = None
        value = answer.data.get("created") if answer is not None else None
        if isinstance(value, int):
            created = catalog.published[model] = value
    return JSONResponse(_model_object(model, created or 0))


@router.post("/chat/completions", responses=V1_ERRORS, openapi_extra=_COMPLETION_BODY)
@hot
async def chat_completions(request: Request, caller: CallingCallerDep) -> Response:
    """OpenAI's chat completions: same request, same response, same stream.

    With `"stream": true` the answer is server-sent `chat.completion.chunk`
    events ending in `data: [DONE]`.
    """
    runtime = runtime_of(request)
    engine = runtime.engine
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_type")
    prepared = engine.chat.prepare(body, caller)
    ctx = context(request, "/v1/chat/completions", caller)
    if prepared.stream:
        chunks = await until_disconnect(request.receive, engine.stream(prepared, ctx))
        return EventStreamResponse(
            _openai_events(chunks),
            owner=chunks,
            keepalive=runtime.settings.keepalive_interval,
            headers=ctx.headers,
            on_shutdown=_ON_SHUTDOWN,
        )
    completion = relayed(await until_disconnect(request.receive, engine.complete(prepared, ctx)))
    headers = dict(ctx.headers)
    if completion.upstream_request_id:
        headers["X-Upstream-Request-ID"] = completion.upstream_request_id
    return Response(completion.raw, media_type="application/json", headers=headers)


async def _openai_events(chunks: AsyncIterable[Chunk]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield frame(chunk.raw)
            del chunk  # see engine.CallStream._relay
        yield DONE
    except ChatAPIError as exc:
        yield frame(exc.body(openai_dialect=True))
