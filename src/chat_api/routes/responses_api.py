"""OpenAI's Responses API, conversations and embeddings under `/v1`, relayed as sent.

The gateway adds only keys, limits, metering and ownership. Creating a
response (or compacting one) and embeddings go through the engine like
chat: admitted at their worst case, settled at what the upstream billed.
Everything else (retrieve, resume a stream, delete, cancel, input items,
conversations) is passed on unmetered, after the ownership check: a stored
response or conversation belongs to the key that created it, and any other
client key asking for it — directly, as `previous_response_id` or as
`conversation` — gets 404 as if it did not exist, before anything reaches
the upstream. The master key, and everyone when keys are off, sees all.

Ids (in a path, or as `previous_response_id` / `conversation`) are up to
512 printable ASCII characters, not `.` or `..` (`_is_id`): OpenAI's, and
those of compatible proxies (LiteLLM's are `resp_` and base64, `+ / =`
included: `_ObjectId` takes them in a gateway path). Anything else gets 404
for everyone, unsent. Each id goes into an upstream path as one
percent-encoded segment (`_segment`), so `..%2F`, `?` or `#` in it cannot
address another object, another key's, or add a query.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Request
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from chat_api.calls import Caller, Chunk, Prepared
from chat_api.errors import BadRequest, ChatAPIError, NotFound, ServerStopping
from chat_api.fastlane import hot
from chat_api.http_responses import until_disconnect
from chat_api.providers.base import Completion, Provider, UpstreamStream
from chat_api.redact import REDACTED, redact
from chat_api.routes.deps import (
    CallerDep,
    CallingCallerDep,
    context,
    engine_of,
    read_json,
    relayed,
    runtime_of,
)
from chat_api.routes.openai_compat import V1_ERRORS
from chat_api.sse import EventStreamResponse, frame
from chat_api.store.owners import Kind, Owner, OwnerStore
from chat_api.tokens import media_parts, stored_media_tokens

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible API"], responses=V1_ERRORS)
# The bodies follow OpenAI's API reference and are relayed as they are.
_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}
# What an id may be made of: printable ASCII, no space or control character. OpenAI's
# (`resp_68b…`) are letters, digits and `_`; a LiteLLM proxy's are `resp_` + base64 of
# ~200 characters (`+ / =`).
_ID = re.compile(r"[!-~]{1,512}")


class _ObjectId(Convertor[str]):
    """An id in a gateway path, `/` included: a proxy's base64 id holds `/`, and the server
    decodes `%2F` before routing, so `{id}` (no `/`) would miss it.

    Not one of this API's own path parts (`/cancel`, `/input_items`, `/items`): those
    belong to the route after it, so `/responses/x/cancel` is the cancel route, and a
    method it does not take a 405 saying which it does. Not empty, and no `/` at its
    end: a trailing slash is an unknown URL (404), as everywhere.
    """

    regex = r"[^/](?:(?!/(?:cancel|input_items|items)(?:/|$)).)*(?<!/)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# Registered before the routes below are compiled (Starlette keeps convertors by name).
register_url_convertor("object_id", _ObjectId())
_REFERENCE_REFUSED = "An 'item_reference' cannot be used with a client key: send the item itself."


def _owners(request: Request) -> OwnerStore:
    return runtime_of(request).owners


def _key_of(caller: Caller | None) -> str | None:
    return caller.key_id if caller is not None else None


def _is_id(value: str) -> bool:
    """Whether `value` may be an id: `_ID`, and no `.` or `..` between its `/` (never sent).

    Sent encoded as one segment, `..%2F` is harmless here, but a proxy before the
    upstream that decodes `%2F` would resolve it into another conversation.
    """
    if _ID.fullmatch(value) is None:
        return False
    return "." not in value or not any(part in (".", "..") for part in value.split("/"))


def _segment(object_id: str) -> str:
    """`object_id` as one segment of an upstream path: `/ ? # %` and the rest encoded."""
    return quote(object_id, safe="")


def _ownable(object_id: object) -> TypeGuard[str]:
    """An id the upstream made that may be recorded (one scrubbed of a key is not)."""
    return isinstance(object_id, str) and _is_id(object_id) and REDACTED not in object_id


def _not_found(noun: str, object_id: str, param: str) -> NotFound:
    # The id is echoed only if it looks like one, and never a key in it.
    named = f" with id '{redact(object_id)}'" if _is_id(object_id) else " with that id"
    return NotFound(f"No {noun}{named} was found.", param=param, code=f"{noun}_not_found")


async def _check_owner(
    request: Request, caller: Caller | None, object_id: str, kind: Kind
) -> Owner | None:
    """404, as if it did not exist, unless `object_id` may be an id and `caller` may see it.

    The owner, for a client key (None for the master key and with keys off: not looked up).
    """
    param = "previous_response_id" if kind == "response" else "conversation"
    if not _is_id(object_id):
        raise _not_found(kind, object_id, param)  # for everyone: it is no id
    if not _is_client_key(caller):
        return None  # keys off, or the master key: everything
    owner = await _owners(request).owner_of(object_id)
    if owner is None or owner.key_id != caller.key_id or owner.kind != kind:
        raise _not_found(kind, object_id, param)
    return owner


def _is_client_key(caller: Caller | None) -> TypeGuard[Caller]:
    """A client key's call: the only kind with limits and budgets, and with owners to check."""
    return caller is not None and caller.key_id is not None


def _check_item_id(item_id: str) -> None:
    if not _is_id(item_id):
        raise _not_found("item", item_id, "item_id")


def _is_reference(item: Any) -> bool:
    """An item reference: so typed, or (OpenAI's `type` is optional on it) an id with no role."""
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    if kind is None:
        return item.get("id") is not None and item.get("role") is None
    return bool(kind == "item_reference")


def _refuse_references(caller: Caller | None, items: Any, param: str) -> None:
    """A client key sends items themselves: an item id can point into any key's objects.

    The gateway does not track items one by one, so a reference cannot be checked.
    """
    if caller is None or caller.key_id is None or not isinstance(items, list):
        return
    if any(_is_reference(item) for item in items):
        raise BadRequest(_REFERENCE_REFUSED, param=param, code="invalid_value")


def _conversation_id(body: dict[str, Any]) -> str | None:
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and not isinstance(conversation, str):
        raise BadRequest(
            "'conversation' must be an id or {\"id\": ...}.",
            param="conversation",
            code="invalid_type",
        )
    return conversation


@dataclass(frozen=True, slots=True)
class _Continued:
    """The stored context a request continues, and what it counted into its conversation.

    `media`: the images and PDF pages already in that context (its own input
    not included), for a client key's call (the only kind with a budget).
    `conversation` and `counted`: the request's own images and PDF pages,
    counted into its conversation before it is sent (for any caller: a
    backend with the master key may add to a client's conversation).
    """

    media: int = 0
    conversation: str | None = None
    counted: int = 0


async def _check_references(
    request: Request, caller: Caller | None, body: dict[str, Any], *, counting: int | None = None
) -> _Continued:
    """Stored objects a request would read: each must be the caller's own.

    `counting` (a call that is sent on): its own input's images and PDF pages,
    counted into its conversation now, before it is sent, in the statement
    that reads what the conversation held: a call the client leaves goes on
    upstream and joins the conversation all the same, and a call at the same
    moment in it is reserved for them. A database that is away is a 503 here,
    with nothing sent. None (counting input tokens, not billed): no count.
    """
    _refuse_references(caller, body.get("input"), "input")
    media = 0
    previous = body.get("previous_response_id")
    if isinstance(previous, str):
        owner = await _check_owner(request, caller, previous, "response")
        media += owner.media if owner is not None else 0
    conversation = _conversation_id(body)
    if conversation is None:
        return _Continued(media)
    await _check_owner(request, caller, conversation, "conversation")
    if counting is None or (counting == 0 and not _is_client_key(caller)):
        return _Continued(media)
    media += await _owners(request).count_into(conversation, counting)
    return _Continued(media, conversation, counting)


def _reserve_stored(prepared: Prepared, continued: _Continued) -> None:
    """The stored context's images and PDF pages are read again, and billed again."""
    prepared.prompt_bound += stored_media_tokens(continued.media, prepared.model.image_tokens)


async def _take_back_unless_sent(
    request: Request, continued: _Continued, error: Exception, *, never_sent: bool
) -> None:
    """Take a count back if its call never reached OpenAI, or OpenAI refused it (4xx).

    A call that failed any other way (timed out, 5xx, the client left once it
    was sent) may have run: its count stays.
    """
    refused = isinstance(error, ChatAPIError) and error.status < 500
    if continued.conversation is not None and continued.counted and (never_sent or refused):
        await _owners(request).take_back(continued.conversation, continued.counted)


async def _json_body(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_type")
    return body


def _provider(request: Request) -> Provider:
    provider = engine_of(request).provider
    if provider is None:
        from chat_api.errors import NotConfigured

        raise NotConfigured()
    return provider


def _json(answer: Completion, headers: dict[str, str] | None = None) -> Response:
    return Response(answer.raw, media_type="application/json", headers=headers)


async def _record(
    request: Request, answer: Completion, kind: Kind, caller: Caller | None, media: int
) -> None:
    """Note who owns the object the upstream just made (see `_ownable`), and its media."""
    object_id = answer.data.get("id")
    if _ownable(object_id):
        await _owners(request).record(object_id, kind, _key_of(caller), media)


@router.post("/responses", openapi_extra=_BODY)
@hot
async def create_response(request: Request, caller: CallingCallerDep) -> Response:
    """OpenAI's `POST /v1/responses`: whole, streamed (every event as sent) or in the background."""
    runtime = runtime_of(request)
    engine = runtime.engine
    body = await _json_body(request)
    prepared = engine.responses.prepare(body, caller)
    continued = await _check_references(request, caller, body, counting=prepared.media)
    _reserve_stored(prepared, continued)
    ctx = context(request, "/v1/responses", caller)
    keeps = body.get("store") is not False
    media = continued.media + prepared.media  # what the new response's context holds
    try:
        if prepared.stream:
            events = await until_disconnect(request.receive, engine.stream(prepared, ctx))
        else:
            call = engine.complete(prepared, ctx)
            completion = relayed(await until_disconnect(request.receive, call))
    except (ChatAPIError, ClientDisconnect) as error:  # no admission, no call: never sent
        await _take_back_unless_sent(request, continued, error, never_sent=ctx.result is None)
        raise
    if prepared.stream:
        recorder = _Recorder(_owners(request), _key_of(caller), media) if keeps else None
        return EventStreamResponse(
            _response_events(events, recorder),
            owner=events,
            keepalive=runtime.settings.keepalive_interval,
            headers=ctx.headers,
            on_shutdown=_error_event(ServerStopping()),
        )
    if keeps:
        await _record(request, completion, "response", caller, media)
    return _json(completion, _upstream_id(ctx.headers, completion.upstream_request_id))


@router.post("/responses/compact", openapi_extra=_BODY)
async def compact_response(request: Request, caller: CallingCallerDep) -> Response:
    """OpenAI's `POST /v1/responses/compact`, metered like a response."""
    engine = engine_of(request)
    body = await _json_body(request)
    prepared = engine.compaction.prepare(body, caller)
    _reserve_stored(prepared, await _check_references(request, caller, body, counting=0))
    ctx = context(request, "/v1/responses/compact", caller)
    completion = relayed(await until_disconnect(request.receive, engine.complete(prepared, ctx)))
    return _json(completion, _upstream_id(ctx.headers, completion.upstream_request_id))


@router.post("/responses/input_tokens", openapi_extra=_BODY)
async def count_input_tokens(request: Request, caller: CallerDep) -> Response:
    """OpenAI's `POST /v1/responses/input_tokens`: counting costs nothing, so it is not metered."""
    engine = engine_of(request)
    body = await _json_body(request)
    model = body.get("model")
    info = engine.catalog.resolve(model if isinstance(model, str) else None)
    if caller is not None:
        caller.check_model(info.name)
    await _check_references(request, caller, body)
    answer = await _provider(request).forward(
        "POST", "/responses/input_tokens", {**body, "model": info.name}, _request_id(request)
    )
    return _json(relayed(answer))


_RESPONSE = "/responses/{response_id:object_id}"
_CONVERSATION = "/conversations/{conversation_id:object_id}"
_ITEM = _CONVERSATION + "/items/{item_id:object_id}"


@router.get(_RESPONSE + "/input_items")
async def list_input_items(response_id: str, request: Request, caller: CallerDep) -> Response:
    """The input items of a stored response."""
    await _check_owner(request, caller, response_id, "response")
    path = _with_query(f"/responses/{_segment(response_id)}/input_items", request)
    answer = await _provider(request).forward("GET", path, None, _request_id(request))
    return _json(relayed(answer))


@router.post(_RESPONSE + "/cancel")
async def cancel_response(response_id: str, request: Request, caller: CallerDep) -> Response:
    """Cancel a background response; it is settled when the upstream says it is final."""
    await _check_owner(request, caller, response_id, "response")
    answer = await _provider(request).forward(
        "POST", f"/responses/{_segment(response_id)}/cancel", None, _request_id(request)
    )
    return _json(relayed(answer))


@router.get(_RESPONSE)
async def retrieve_response(response_id: str, request: Request, caller: CallerDep) -> Response:
    """A stored response; with `stream=true` (and `starting_after=N`) its events again."""
    await _check_owner(request, caller, response_id, "response")
    provider = _provider(request)
    path = _with_query(f"/responses/{_segment(response_id)}", request)
    if request.query_params.get("stream") == "true":
        upstream = await until_disconnect(
            request.receive, provider.open_replay(path, _request_id(request))
        )
        replay = _Replay(upstream)
        return EventStreamResponse(
            _response_events(replay, None),
            owner=replay,
            keepalive=runtime_of(request).settings.keepalive_interval,
        )
    return _json(relayed(await provider.forward("GET", path, None, _request_id(request))))


@router.delete(_RESPONSE)
async def delete_response(response_id: str, request: Request, caller: CallerDep) -> Response:
    """Delete a stored response (it is then forgotten here too)."""
    await _check_owner(request, caller, response_id, "response")
    answer = await _provider(request).forward(
        "DELETE", f"/responses/{_segment(response_id)}", None, _request_id(request)
    )
    await _owners(request).forget(response_id)
    return _json(relayed(answer))


# --- conversations -----------------------------------------------------------------------


@router.post("/conversations", openapi_extra=_BODY)
async def create_conversation(request: Request, caller: CallerDep) -> Response:
    """Create a conversation; it belongs to the key that created it."""
    body = await _json_body(request)
    _refuse_references(caller, body.get("items"), "items")
    answer = relayed(
        await _provider(request).forward("POST", "/conversations", body, _request_id(request))
    )
    await _record(request, answer, "conversation", caller, media_parts(body.get("items")))
    return _json(answer)


async def _conversation_call(
    request: Request, caller: Caller | None, conversation_id: str, method: str, rest: str = ""
) -> Response:
    """`rest` is a path below the conversation, its ids already `_segment`s."""
    await _check_owner(request, caller, conversation_id, "conversation")
    body = await _json_body(request) if method == "POST" else None
    continued = _Continued()
    if body is not None and rest == "/items":
        _refuse_references(caller, body.get("items"), "items")
        # New items' images are counted before they are sent, as a response's input is.
        parts = media_parts(body.get("items"))
        if parts:
            await _owners(request).count_into(conversation_id, parts)
            continued = _Continued(conversation=conversation_id, counted=parts)
    path = _with_query(f"/conversations/{_segment(conversation_id)}{rest}", request)
    try:
        answer = await _provider(request).forward(method, path, body, _request_id(request))
    except ChatAPIError as error:
        await _take_back_unless_sent(request, continued, error, never_sent=False)
        raise
    if method == "DELETE" and not rest:
        await _owners(request).forget(conversation_id)
    return _json(relayed(answer))


@router.get(_ITEM)
async def retrieve_conversation_item(
    conversation_id: str, item_id: str, request: Request, caller: CallerDep
) -> Response:
    """One item of a conversation."""
    _check_item_id(item_id)
    rest = f"/items/{_segment(item_id)}"
    return await _conversation_call(request, caller, conversation_id, "GET", rest)


@router.delete(_ITEM)
async def delete_conversation_item(
    conversation_id: str, item_id: str, request: Request, caller: CallerDep
) -> Response:
    """Delete one item of a conversation."""
    _check_item_id(item_id)
    rest = f"/items/{_segment(item_id)}"
    return await _conversation_call(request, caller, conversation_id, "DELETE", rest)


@router.get(_CONVERSATION + "/items")
async def list_conversation_items(
    conversation_id: str, request: Request, caller: CallerDep
) -> Response:
    """A conversation's items."""
    return await _conversation_call(request, caller, conversation_id, "GET", "/items")


@router.post(_CONVERSATION + "/items", openapi_extra=_BODY)
async def create_conversation_items(
    conversation_id: str, request: Request, caller: CallerDep
) -> Response:
    """Add items to a conversation."""
    return await _conversation_call(request, caller, conversation_id, "POST", "/items")


@router.get(_CONVERSATION)
async def retrieve_conversation(
    conversation_id: str, request: Request, caller: CallerDep
) -> Response:
    """A conversation."""
    return await _conversation_call(request, caller, conversation_id, "GET")


@router.post(_CONVERSATION, openapi_extra=_BODY)
async def update_conversation(
    conversation_id: str, request: Request, caller: CallerDep
) -> Response:
    """Update a conversation's metadata."""
    return await _conversation_call(request, caller, conversation_id, "POST")


@router.delete(_CONVERSATION)
async def delete_conversation(
    conversation_id: str, request: Request, caller: CallerDep
) -> Response:
    """Delete a conversation."""
    return await _conversation_call(request, caller, conversation_id, "DELETE")


_EMBEDDINGS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "input"],
                    "properties": {
                        "model": {"type": "string", "minLength": 1},
                        "input": {
                            "anyOf": [
                                {"type": "string", "minLength": 1},
                                {"type": "array", "minItems": 1},
                            ]
                        },
                    },
                }
            }
        },
    }
}

# --- embeddings ----------------------------------------------------------------------------


@router.post("/embeddings", openapi_extra=_EMBEDDINGS_BODY)
async def create_embeddings(request: Request, caller: CallingCallerDep) -> Response:
    """OpenAI's `POST /v1/embeddings`, metered at its input."""
    engine = engine_of(request)
    prepared = engine.embeddings.prepare(await _json_body(request), caller)
    ctx = context(request, "/v1/embeddings", caller)
    completion = relayed(await until_disconnect(request.receive, engine.complete(prepared, ctx)))
    return _json(completion, _upstream_id(ctx.headers, completion.upstream_request_id))


# --- helpers ---------------------------------------------------------------------------------


class _Recorder:
    """Records the owner of a streamed response as soon as its id is known."""

    def __init__(self, owners: OwnerStore, key_id: str | None, media: int) -> None:
        self.owners = owners
        self.key_id = key_id
        self.media = media
        self.done = False

    def see(self, data: dict[str, Any]) -> None:
        response = data.get("response")
        if isinstance(response, dict) and isinstance(response.get("id"), str):
            self.done = True
            if _ownable(response["id"]):
                self.owners.record_soon(response["id"], "response", self.key_id, self.media)


class _Replay:
    """An unmetered upstream stream (a stored response replayed), closed whatever happens."""

    def __init__(self, upstream: UpstreamStream) -> None:
        self._upstream = upstream

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        from chat_api.operations.base import parse_event

        try:
            async for raw in self._upstream:
                yield parse_event(raw)
        finally:
            await self._upstream.aclose()

    async def aclose(self) -> None:
        await self._upstream.aclose()


async def _response_events(
    events: AsyncIterable[Chunk], recorder: _Recorder | None
) -> AsyncIterator[bytes]:
    """Each event as OpenAI framed it: `event: <type>` and its data, unchanged."""
    try:
        async for chunk in events:
            kind = chunk.data.get("type")
            if recorder is not None and not recorder.done:
                recorder.see(chunk.data)
            head = b"event: " + kind.encode() + b"\n" if isinstance(kind, str) else b""
            yield head + frame(chunk.raw)
            del chunk
    except ChatAPIError as exc:
        yield _error_event(exc)


def _error_event(error: ChatAPIError) -> bytes:
    """An `error` event as the Responses API sends one."""
    payload = {"type": "error", "code": error.code, "message": error.message, "param": error.param}
    return b"event: error\n" + frame(orjson.dumps(payload))


def _with_query(path: str, request: Request) -> str:
    query = request.url.query
    return f"{path}?{query}" if query else path


def _request_id(request: Request) -> str:
    request_id: str = request.scope["state"]["request_id"]
    return request_id


def _upstream_id(headers: dict[str, str], upstream_request_id: str | None) -> dict[str, str]:
    extra = dict(headers)
    if upstream_request_id:
        extra["X-Upstream-Request-ID"] = upstream_request_id
    return extra
