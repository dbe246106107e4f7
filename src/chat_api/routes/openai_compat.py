"""The OpenAI-compatible API under `/v1`, for the official SDKs and every tool built on them.

Requests pass through with every field the client sent (tools,
response_format, n, stop, seed, logprobs, ...); answers and stream chunks are
relayed as the bytes the upstream sent. Errors are OpenAI-shaped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from chat_api.engine import Chunk
from chat_api.errors import BadRequest, ChatAPIError, ModelNotAllowed, ServiceUnavailable
from chat_api.meter import Caller
from chat_api.responses import EventStreamResponse, JSONResponse, until_disconnect
from chat_api.routes.deps import SHUTDOWN_MESSAGE, CallerDep, context, engine_of, read_json
from chat_api.sse import DONE, frame

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible API"])

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
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for status, text in {
        400: "The request is malformed.",
        401: "A client key is required and was missing or wrong.",
        403: "The key may not use this model, OpenAI refuses it for the server's account, "
        "or the request came from a website that may not call this server.",
        404: "The model is not available here (`model_not_found`).",
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
                        "stream": {"type": ["boolean", "null"]},  # null: not streamed
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


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "openai"}


def _visible(names: tuple[str, ...], caller: Caller | None) -> list[str]:
    if caller is None or not caller.models:
        return list(names)
    return [name for name in names if name in caller.models]


@router.get("/models", responses=_ERRORS)
async def list_models(request: Request, caller: CallerDep) -> Response:
    """The models this key may use, as OpenAI's `GET /v1/models` lists them."""
    names = _visible(engine_of(request).catalog.names, caller)
    return JSONResponse({"object": "list", "data": [_model_object(name) for name in names]})


@router.get("/models/{model}", responses=_ERRORS)
async def retrieve_model(model: str, request: Request, caller: CallerDep) -> Response:
    """One model, as OpenAI's `GET /v1/models/{model}` returns it."""
    names = engine_of(request).catalog.names
    if model not in _visible(names, caller):
        raise ModelNotAllowed(model, tuple(_visible(names, caller)))
    return JSONResponse(_model_object(model))


@router.post("/chat/completions", responses=_ERRORS, openapi_extra=_COMPLETION_BODY)
async def chat_completions(request: Request, caller: CallerDep) -> Response:
    """OpenAI's chat completions: same request, same response, same stream.

    With `"stream": true` the answer is server-sent `chat.completion.chunk`
    events ending in `data: [DONE]`.
    """
    engine = engine_of(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_type")
    apply_field_policy(body, request.app.state.settings.field_policy)
    prepared = engine.prepare(body, caller=caller)
    ctx = context(request, "/v1/chat/completions", caller)
    if prepared.stream:
        chunks = await engine.stream(prepared, ctx)
        return EventStreamResponse(
            _openai_events(chunks),
            keepalive=request.app.state.settings.keepalive_interval,
            headers=ctx.headers,
            on_shutdown=frame(ServiceUnavailable(SHUTDOWN_MESSAGE).body(openai_dialect=True)),
        )
    completion = await until_disconnect(request.receive, engine.complete(prepared, ctx))
    headers = dict(ctx.headers)
    if completion.upstream_request_id:
        headers["X-Upstream-Request-ID"] = completion.upstream_request_id
    return Response(completion.raw, media_type="application/json", headers=headers)


def apply_field_policy(body: dict[str, Any], policy: Mapping[str, str]) -> None:
    """`CHAT_API_FIELD_POLICY`: drop the fields the operator drops, refuse those it refuses.

    For fields that change who pays or what OpenAI keeps (`store`, `metadata`,
    `user`, `service_tier`, `prompt_cache_key`, `safety_identifier`, ...):
    passed through unless the operator says otherwise.
    """
    for name, rule in policy.items():
        if name not in body:
            continue
        if rule == "refuse":
            raise BadRequest(
                f"This server does not accept the field '{name}'. Send the request without it.",
                param=name,
                code="unsupported_parameter",
            )
        if rule == "drop":
            del body[name]


async def _openai_events(chunks: AsyncIterator[Chunk]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield frame(chunk.raw)
            del chunk  # see ChatEngine._relay
        yield DONE
    except ChatAPIError as exc:
        yield frame(exc.body(openai_dialect=True))
