"""A fake OpenAI server: a real ASGI app, served by a real uvicorn on loopback.

It speaks `POST /v1/chat/completions` (whole and streamed, with usage and
tool-call deltas) and misbehaves on demand. Tests queue `Plan`s; each request
takes the next one (or the default answer). It records every request it
received and whether each stream was closed early by its client.

The Responses API (tests/fakes/responses_api.py), conversations, embeddings
and model pages (tests/fakes/conversations_api.py) are served from the same
app and the same plan queue: each model call (chat completion, response,
compaction, embedding) takes the first plan whose `endpoint` is None; any
other request takes only a plan that names its endpoint (`"responses.retrieve"`,
`"conversations.items.list"`…). What the upstream billed for them is in `biller`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.types import Message, Receive, Scope, Send

from tests.fakes.billing import Biller

DEFAULT_TEXT = "Hello from the fake upstream. It has several words to stream."
MODEL_CALLS = frozenset(
    {"chat.completions.create", "responses.create", "responses.compact", "embeddings.create"}
)


@dataclass
class Plan:
    """How the fake answers one request."""

    text: str = DEFAULT_TEXT
    status: int = 200
    error_body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"  # responses: "length" or "content_filter" make it incomplete
    usage: dict[str, Any] | None = None  # default: words counted
    send_usage: bool = True
    delay_before_headers: float = 0.0
    chunk_interval: float = 0.0
    first_chunk_delay: float = 0.0
    drop_after_chunks: int | None = None  # break the connection after N chunks
    stall_after_chunks: int | None = None  # stop sending (forever) after N chunks
    error_event_after_chunks: int | None = None  # send an error event after N chunks
    malformed_after_chunks: int | None = None  # send broken JSON after N chunks
    omit_done: bool = False
    raw_chunks: list[bytes] | None = None  # send these bytes as the body, as they are
    raw_body: bytes | None = None  # a whole 200 answer's JSON body, as it is (any endpoint)
    comments_forever: bool = False  # only ': keep-alive' lines, never data
    # Sent as they are on a 200 answer, whole or streamed (bytes need not be latin-1).
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # None: the next model call takes this plan; else only a request to this endpoint.
    endpoint: str | None = None
    # The Responses API also reads these (chunks are its events):
    reasoning_tokens: int = 0  # a reasoning item first, and this many reasoning tokens
    cached_tokens: int = 0  # input_tokens_details.cached_tokens
    failed_after_chunks: int | None = None  # send response.failed after N events
    queued_for: float = 0.0  # a background response stays queued this long


@dataclass
class Received:
    body: dict[str, Any]
    headers: dict[str, str]
    path: str
    method: str = "POST"
    query: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    closed_early: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


class FakeOpenAI:
    """The ASGI app plus what it saw."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []
        self.received: list[Received] = []
        self.arrived: list[str] = []  # every request's method and raw path, routed or not
        self.lock = threading.Lock()
        self.api_key = "sk-test-fake-upstream-key-0123456789abcdef"
        self.biller = Biller()
        # Imported here: both modules build on this one.
        from tests.fakes.conversations_api import ConversationsAPI
        from tests.fakes.responses_api import ResponsesAPI

        self.responses = ResponsesAPI(self)
        self.conversations = ConversationsAPI(self)
        self.routes = [
            (method, re.compile(pattern), name, handler)
            for method, pattern, name, handler in [
                *self.responses.routes(),
                *self.conversations.routes(),
            ]
        ]

    # --- test-side helpers --------------------------------------------------

    def queue(self, *plans: Plan) -> None:
        with self.lock:
            self.plans.extend(plans)

    @property
    def hits(self) -> int:
        return len(self.received)

    def last(self) -> Received:
        return self.received[-1]

    def _next_plan(self, endpoint: str = "chat.completions.create") -> Plan:
        with self.lock:
            for index, plan in enumerate(self.plans):
                if plan.endpoint == endpoint or (plan.endpoint is None and endpoint in MODEL_CALLS):
                    return self.plans.pop(index)
            return Plan()

    def _route(
        self, method: str, raw_path: str
    ) -> tuple[str, Callable[[Any], Awaitable[None]], dict[str, str]] | None:
        """Matched on the path as sent, as OpenAI does: an id's `%2F` stays in its segment."""
        for route_method, pattern, name, handler in self.routes:
            match = pattern.fullmatch(raw_path)
            if match and route_method == method:
                return name, handler, {k: unquote(v) for k, v in match.groupdict().items()}
        return None

    # --- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.responses.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        self.arrived.append(f"{scope['method']} {raw_path}")
        if scope["path"] == "/v1/models":
            await _send_json(send, 200, {"object": "list", "data": []})
            return
        route = None
        if scope["path"] != "/v1/chat/completions":
            route = self._route(scope["method"], raw_path)
            if route is None:
                await _send_json(send, 404, {"error": {"message": "no such path"}})
                return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = dict(parse_qsl(scope["query_string"].decode()))
        record = Received(json.loads(raw or b"{}"), headers, scope["path"], scope["method"], query)
        self.received.append(record)
        plan = self._next_plan(route[0] if route else "chat.completions.create")
        if headers.get("authorization") != f"Bearer {self.api_key}":
            plan = Plan(status=401, error_body=_error("Incorrect API key provided: sk-te****", 401))
        watcher = asyncio.ensure_future(_watch_disconnect(receive, record))
        try:
            if route is None:
                await self._answer(plan, record, send)
            else:
                await self._serve(route, plan, record, send)
            record.finished.set()
        finally:
            await asyncio.sleep(0)
            watcher.cancel()

    async def _serve(
        self,
        route: tuple[str, Callable[[Any], Awaitable[None]], dict[str, str]],
        plan: Plan,
        record: Received,
        send: Send,
    ) -> None:
        from tests.fakes.responses_api import Refusal
        from tests.fakes.responses_events import Call

        name, handler, params = route
        if plan.delay_before_headers:
            await asyncio.sleep(plan.delay_before_headers)
        if plan.status != 200:
            body = plan.error_body or _error("fake error", plan.status)
            await _send_json(send, plan.status, body, plan.headers)
            return
        if plan.raw_body is not None:
            await _send_raw_json(send, plan.raw_body)
            return
        try:
            await handler(Call(name, params, record.query, record.body, plan, record, send))
        except Refusal as refusal:
            await _send_json(
                send, refusal.status, refusal.body, {"x-request-id": "req_fake_upstream"}
            )

    async def _answer(self, plan: Plan, record: Received, send: Send) -> None:
        if plan.delay_before_headers:
            await asyncio.sleep(plan.delay_before_headers)
        if plan.status != 200:
            await _send_json(
                send,
                plan.status,
                plan.error_body or _error("fake error", plan.status),
                plan.headers,
            )
            return
        body = record.body
        if plan.raw_body is not None and not body.get("stream"):
            await _send_raw_json(send, plan.raw_body)
            return
        model = body.get("model", "gpt-4o-mini")
        words = _words(plan.text)
        usage = plan.usage or {
            "prompt_tokens": 7,
            "completion_tokens": len(words),
            "total_tokens": 7 + len(words),
        }
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": plan.text, "refusal": None}
            if plan.tool_calls:
                message = {"role": "assistant", "content": None, "tool_calls": plan.tool_calls}
            n = int(body.get("n") or 1)
            answer = {
                "id": "chatcmpl-fake123",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": i,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if plan.tool_calls else plan.finish_reason,
                    }
                    for i in range(n)
                ],
                "usage": usage,
            }
            await _send_json(
                send,
                200,
                answer,
                {**_default_request_id(plan), **plan.headers},
                plan.raw_headers,
            )
            return
        if await start_stream(plan, record, send, b"text/event-stream"):
            return
        head = {
            "id": "chatcmpl-fake123",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "system_fingerprint": "fp_fake",
        }

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

        chunks = [
            event(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
        ]
        if plan.tool_calls:
            for i, call in enumerate(plan.tool_calls):
                args = call["function"]["arguments"]
                first = {
                    "index": i,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }
                chunks.append(
                    event([{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}])
                )
                for start in range(0, len(args), 8):
                    piece = {"index": i, "function": {"arguments": args[start : start + 8]}}
                    chunks.append(
                        event(
                            [{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}]
                        )
                    )
        else:
            chunks += [
                event([{"index": 0, "delta": {"content": w}, "finish_reason": None}]) for w in words
            ]
        finish = "tool_calls" if plan.tool_calls else plan.finish_reason
        chunks.append(event([{"index": 0, "delta": {}, "finish_reason": finish}]))
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if wants_usage and plan.send_usage:
            chunks.append(event([], usage=usage))

        for index, chunk in enumerate(chunks):
            if index == 1 and plan.first_chunk_delay:
                await asyncio.sleep(plan.first_chunk_delay)
            if plan.drop_after_chunks is not None and index >= plan.drop_after_chunks:
                raise ConnectionAbortedError("fake upstream drops the connection")
            if plan.stall_after_chunks is not None and index >= plan.stall_after_chunks:
                # closed_early is a threading.Event (tests wait on it), so poll it.
                while not record.closed_early.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                return
            if plan.error_event_after_chunks is not None and index >= plan.error_event_after_chunks:
                err = (
                    b'data: {"error": {"message": "The server had an error while processing'
                    b' your request.", "type": "server_error"}}\n\n'
                )
                await send({"type": "http.response.body", "body": err, "more_body": False})
                return
            if plan.malformed_after_chunks is not None and index >= plan.malformed_after_chunks:
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: {not json\n\n",
                        "more_body": True,
                    }
                )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if plan.chunk_interval:
                await asyncio.sleep(plan.chunk_interval)
        tail = b"" if plan.omit_done else b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def _default_request_id(plan: Plan) -> dict[str, str]:
    if any(name.lower() == b"x-request-id" for name, _ in plan.raw_headers):
        return {}
    return {"x-request-id": "req_fake_upstream"}


async def start_stream(plan: Plan, record: Received, send: Send, content_type: bytes) -> bool:
    """Start a 200 event stream; True when the plan's raw bytes or comments were the whole of it."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", content_type),
                *((k.encode(), v.encode()) for k, v in _default_request_id(plan).items()),
                *plan.raw_headers,
            ],
        }
    )
    if plan.raw_chunks is not None:
        for piece in plan.raw_chunks:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(plan.chunk_interval)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True
    if plan.comments_forever:
        while not record.closed_early.is_set():
            await send(
                {"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True}
            )
            await asyncio.sleep(0.05)
        return True
    return False


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]] if text else []


def _error(message: str, status: int) -> dict[str, Any]:
    kind = {401: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _send_json(
    send: Send,
    status: int,
    body: Any,
    headers: dict[str, str] | None = None,
    raw_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    raw = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    extra += raw_headers or []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


async def _send_raw_json(send: Send, raw: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


async def _watch_disconnect(receive: Receive, record: Received) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            if not record.finished.is_set():
                record.closed_early.set()
            return
