"""The fake upstream's Responses API, as OpenAI documents it.

`POST /v1/responses` answers whole or streamed (`event:` + `data:` lines,
a `sequence_number` on every event, no `[DONE]`), in OpenAI's order:

    response.created, response.in_progress,
    [response.output_item.added/done of a reasoning item, with Plan.reasoning_tokens]
    response.output_item.added, response.content_part.added,
    response.output_text.delta x N, response.output_text.done,
    response.content_part.done, response.output_item.done,
    response.completed | response.incomplete | response.failed

or, when the request has `tools` and the plan has `tool_calls`, one
`function_call` item per call (`response.function_call_arguments.delta/done`).
Background responses start with response.created (queued) + response.queued
and run on the server's loop whether or not anyone listens.

Stored responses (`store`, default true) answer retrieve (and
`?stream=true&starting_after=N` for background streams), delete, cancel
(background only), input_items, `previous_response_id` and `conversation`.
Every model call is billed through the fake's `Biller` the moment it starts
(its whole context: previous responses and conversation items included) and
every output token as it is generated, so a client that leaves mid-stream is
billed for what was made before it left.

Conversations, embeddings and model pages live in `tests/fakes/conversations_api.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import Send

from tests.fakes.billing import Bill, prompt_tokens
from tests.fakes.openai_server import Plan, Received, _send_json, _words

if TYPE_CHECKING:
    from tests.fakes.openai_server import FakeOpenAI

MIN_OUTPUT_TOKENS = 16  # OpenAI refuses a smaller max_output_tokens
TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
FAILED_MESSAGE = "An error occurred while processing your request. Please retry your request."


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


class Refusal(Exception):
    """An OpenAI error answer: raised anywhere in a handler, sent as JSON by the dispatcher."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def not_found(what: str, object_id: str) -> Refusal:
    return Refusal(404, f"{what} with id '{object_id}' not found.")


@dataclass
class Call:
    """One request to a route of the fake: what it asked, and how to answer it."""

    route: str
    params: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any]
    plan: Plan
    record: Received
    send: Send


@dataclass
class StoredResponse:
    obj: dict[str, Any]
    input_items: list[dict[str, Any]]
    context: list[dict[str, Any]]  # what the model read before input_items
    streamed: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.obj["status"] in TERMINAL

    def history(self) -> list[dict[str, Any]]:
        """What a response continuing this one reads first."""
        return [*self.context, *self.input_items, *self.obj["output"]]


# --- input items ------------------------------------------------------------------


def _parts(content: Any, role: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        if role == "assistant":
            return [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}]
        return [{"type": "input_text", "text": content}]
    return list(content) if isinstance(content, list) else []


def normalize_input(value: Any) -> list[dict[str, Any]]:
    """The request's `input` as OpenAI stores it: a list of items, each with an id."""
    if value is None:
        return []
    raw = (
        [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value
    )
    items: list[dict[str, Any]] = []
    for entry in raw:
        item = dict(entry)
        kind = item.setdefault("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            item["content"] = _parts(item.get("content"), role)
            item.setdefault("id", new_id("msg"))
            item.setdefault("status", "completed")
        elif kind == "function_call_output":
            item.setdefault("id", new_id("fco"))
            item.setdefault("status", "completed")
        else:
            item.setdefault("id", new_id(kind.split("_")[0]))
        items.append(item)
    return items


def check_tool_outputs(items: list[dict[str, Any]], context: list[dict[str, Any]]) -> None:
    """OpenAI refuses a function_call_output whose call it never saw."""
    calls = {i.get("call_id") for i in [*context, *items] if i.get("type") == "function_call"}
    for item in items:
        if item.get("type") == "function_call_output" and item.get("call_id") not in calls:
            raise Refusal(
                400,
                f"No tool call found for function call output with call_id {item.get('call_id')}.",
                param="input",
            )


# --- the response object and its usage ------------------------------------------------


def response_object(
    response_id: str, body: dict[str, Any], *, status: str, conversation: str | None
) -> dict[str, Any]:
    reasoning = body.get("reasoning") or {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "background": bool(body.get("background", False)),
        "completed_at": None,
        "conversation": {"id": conversation} if conversation else None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": body.get("model"),
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_logprobs": body.get("top_logprobs", 0),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def usage_object(bill: Bill, cached: int, reasoning: int) -> dict[str, Any]:
    return {
        "input_tokens": bill.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": min(cached, bill.prompt_tokens),
            "cache_write_tokens": 0,
        },
        "output_tokens": bill.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": min(reasoning, bill.completion_tokens)},
        "total_tokens": bill.prompt_tokens + bill.completion_tokens,
    }


def function_calls(plan: Plan) -> list[tuple[str, str, str]]:
    """The plan's tool calls as (call_id, name, arguments): chat-shaped or flat dicts."""
    calls = []
    for call in plan.tool_calls or []:
        function = call.get("function", call)
        calls.append(
            (
                call.get("call_id") or call.get("id") or new_id("call"),
                function["name"],
                function.get("arguments", "{}"),
            )
        )
    return calls


def frame(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


# --- generation ----------------------------------------------------------------------


class Generation:
    """Makes one response's events in order, keeping its object and its bill up to date.

    `run()` yields each event as it is made, waiting as the plan says; output
    tokens are billed as they are made, so closing the iterator early (a
    client that left) leaves the bill at what was generated.
    """

    def __init__(
        self, stored: StoredResponse, plan: Plan, body: dict[str, Any], bill: Bill
    ) -> None:
        self.stored = stored
        self.obj = stored.obj
        self.plan = plan
        self.bill = bill
        self.sequence = 0
        self.obfuscate = (body.get("stream_options") or {}).get("include_obfuscation", True)
        calls = function_calls(plan) if body.get("tools") else []
        self.calls = calls
        self.words = [] if calls else _words(plan.text)
        limit = body.get("max_output_tokens")
        self.limit = limit if isinstance(limit, int) else None
        self.reasoning = plan.reasoning_tokens
        self.incomplete: str | None = {
            "length": "max_output_tokens",
            "content_filter": "content_filter",
        }.get(plan.finish_reason)
        self.interrupted = False

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next event, numbered; or the plan's interruption, when its turn has come."""
        plan = self.plan
        for cut in (plan.error_event_after_chunks, plan.failed_after_chunks):
            if cut is not None and self.sequence >= cut and not self.interrupted:
                self.interrupted = True
                raise _Interrupted
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        if self.obj["store"]:
            self.stored.events.append(event)
        return event

    def snapshot(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.obj))

    def _room(self, tokens: int = 1) -> int:
        """How many of `tokens` more the model may write before max_output_tokens."""
        if self.limit is None:
            return tokens
        room = max(0, min(tokens, self.limit - self.bill.completion_tokens))
        if room < tokens:
            self.incomplete = "max_output_tokens"
        return room

    def _pad(self) -> dict[str, str]:
        if self.obfuscate is False:
            return {}
        return {"obfuscation": secrets.token_urlsafe(8)[: secrets.randbelow(10) + 1]}

    async def _pause(self) -> None:
        if self.plan.chunk_interval:
            await asyncio.sleep(self.plan.chunk_interval)

    async def run(self) -> AsyncGenerator[dict[str, Any]]:
        try:
            async for event in self._events():
                yield event
        except _Interrupted:
            if self.plan.error_event_after_chunks is not None:
                yield self._error_event()
            else:
                yield self._finish("failed")

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        plan = self.plan
        if plan.first_chunk_delay:
            await asyncio.sleep(plan.first_chunk_delay)
        yield self.event("response.created", response=self.snapshot())
        if self.obj["status"] == "queued":
            yield self.event("response.queued", response=self.snapshot())
            if plan.queued_for:
                await asyncio.sleep(plan.queued_for)
            self.obj["status"] = "in_progress"
        yield self.event("response.in_progress", response=self.snapshot())
        for step in (self._reasoning(), self._calls() if self.calls else self._message()):
            async for event in step:
                yield event
        if not plan.omit_done:
            yield self._finish("incomplete" if self.incomplete else "completed")

    async def _reasoning(self) -> AsyncIterator[dict[str, Any]]:
        if not self.reasoning:
            return
        item = {"id": new_id("rs"), "type": "reasoning", "summary": []}
        index = len(self.obj["output"])
        self.obj["output"].append(item)
        yield self.event("response.output_item.added", output_index=index, item=dict(item))
        self.bill.completion_tokens += self._room(self.reasoning)
        await self._pause()
        yield self.event("response.output_item.done", output_index=index, item=dict(item))

    async def _message(self) -> AsyncIterator[dict[str, Any]]:
        item: dict[str, Any] = {
            "id": new_id("msg"),
            "type": "message",
            "status": "in_progress",
            "content": [],
            "role": "assistant",
        }
        index = len(self.obj["output"])
        self.obj["output"].append(item)
        yield self.event("response.output_item.added", output_index=index, item=_copy(item))
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        item["content"].append(part)
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        yield self.event("response.content_part.added", **where, part=dict(part))
        for word in self.words:
            if not self._room():
                break
            event = self.event(
                "response.output_text.delta", **where, delta=word, logprobs=[], **self._pad()
            )
            self.bill.completion_tokens += 1
            part["text"] += word
            yield event
            await self._pause()
        yield self.event("response.output_text.done", **where, text=part["text"], logprobs=[])
        yield self.event("response.content_part.done", **where, part=dict(part))
        item["status"] = "incomplete" if self.incomplete else "completed"
        yield self.event("response.output_item.done", output_index=index, item=_copy(item))

    async def _calls(self) -> AsyncIterator[dict[str, Any]]:
        for call_id, name, arguments in self.calls:
            item = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": call_id,
                "name": name,
            }
            index = len(self.obj["output"])
            self.obj["output"].append(item)
            yield self.event("response.output_item.added", output_index=index, item=dict(item))
            where = {"item_id": item["id"], "output_index": index}
            for start in range(0, len(arguments), 8):
                if not self._room():
                    break
                piece = arguments[start : start + 8]
                event = self.event(
                    "response.function_call_arguments.delta", **where, delta=piece, **self._pad()
                )
                self.bill.completion_tokens += 1
                item["arguments"] += piece
                yield event
                await self._pause()
            yield self.event(
                "response.function_call_arguments.done", **where, arguments=item["arguments"]
            )
            item["status"] = "incomplete" if self.incomplete else "completed"
            yield self.event("response.output_item.done", output_index=index, item=dict(item))

    def _error_event(self) -> dict[str, Any]:
        self.obj["status"] = "failed"
        self.obj["error"] = {"code": "server_error", "message": FAILED_MESSAGE}
        self.settle()
        return self.event("error", code="server_error", message=FAILED_MESSAGE, param=None)

    def _finish(self, status: str) -> dict[str, Any]:
        self.obj["status"] = status
        if status == "incomplete":
            self.obj["incomplete_details"] = {"reason": self.incomplete}
        if status == "failed":
            self.obj["error"] = {"code": "server_error", "message": FAILED_MESSAGE}
        self.settle()
        return self.event(f"response.{status}", response=self.snapshot())

    def settle(self) -> None:
        """Write the usage so far into the object (also for a cancelled response)."""
        if self.obj["status"] == "completed":
            self.obj["completed_at"] = int(time.time())
        usage = usage_object(self.bill, self.plan.cached_tokens, self.reasoning)
        if self.plan.usage is not None:
            usage = self.plan.usage
        self.obj["usage"] = usage if self.plan.send_usage else None


class _Interrupted(Exception):
    """The plan's error event or response.failed is due now."""


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(value))
    return copied


# --- the endpoints ------------------------------------------------------------------


class ResponsesAPI:
    """`/v1/responses` and everything under it, with the responses it stored."""

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.stored: dict[str, StoredResponse] = {}

    def routes(self) -> list[tuple[str, str, str, Callable[[Call], Awaitable[None]]]]:
        one = r"/v1/responses/(?P<id>[^/]+)"
        return [
            ("POST", r"/v1/responses", "responses.create", self.create),
            ("POST", r"/v1/responses/input_tokens", "responses.input_tokens", self.input_tokens),
            ("POST", r"/v1/responses/compact", "responses.compact", self.compact),
            ("GET", one, "responses.retrieve", self.retrieve),
            ("DELETE", one, "responses.delete", self.delete),
            ("POST", one + "/cancel", "responses.cancel", self.cancel),
            ("GET", one + "/input_items", "responses.input_items", self.input_items),
        ]

    def get(self, response_id: str) -> StoredResponse:
        stored = self.stored.get(response_id)
        if stored is None:
            raise not_found("Response", response_id)
        return stored

    def context_for(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        """What the model reads before this request's input, and the conversation it joins."""
        previous = body.get("previous_response_id")
        conversation = body.get("conversation")
        if previous and conversation:
            raise Refusal(
                400,
                "Mutually exclusive parameters: Ensure you are only providing one of: "
                "'previous_response_id' or 'conversation'.",
                code="mutually_exclusive_parameters",
            )
        if previous:
            stored = self.stored.get(previous)
            if stored is None:
                raise Refusal(
                    400,
                    f"Previous response with id '{previous}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            return stored.history(), None
        if conversation:
            conv_id = conversation["id"] if isinstance(conversation, dict) else str(conversation)
            return list(self.fake.conversations.get(conv_id).items), conv_id
        return [], None

    def model_body(self, body: dict[str, Any], context: list[dict[str, Any]]) -> dict[str, Any]:
        """The request as the model reads it, and as it is billed: context, then input.

        Without context this is the body exactly as the client sent it, so a
        gateway that counts the body it relays counts what is billed.
        """
        if not context:
            return body
        given = body.get("input")
        current = [given] if isinstance(given, str) else list(given or [])
        return {**body, "input": [*context, *current]}

    async def create(self, call: Call) -> None:
        body = call.body
        if not body.get("model"):
            raise Refusal(
                400,
                "Missing required parameter: 'model'.",
                param="model",
                code="missing_required_parameter",
            )
        limit = body.get("max_output_tokens")
        if isinstance(limit, int) and limit < MIN_OUTPUT_TOKENS:
            raise Refusal(
                400,
                f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                f"{MIN_OUTPUT_TOKENS}, but got {limit} instead.",
                param="max_output_tokens",
                code="integer_below_min_value",
            )
        background = bool(body.get("background"))
        store = body.get("store", True) is not False
        if background and not store:
            raise Refusal(
                400,
                "Background mode requires store=true: it cannot run with store=false.",
                param="store",
            )
        context, conversation = self.context_for(body)
        items = normalize_input(body.get("input"))
        check_tool_outputs(items, context)
        response_id = new_id("resp")
        obj = response_object(
            response_id,
            body,
            status="queued" if background else "in_progress",
            conversation=conversation,
        )
        stored = StoredResponse(obj, items, context, streamed=bool(body.get("stream")))
        if store:
            self.stored[response_id] = stored
        bill = self.fake.biller.open(self.model_body(body, context))
        generation = Generation(stored, call.plan, body, bill)
        if background:
            stored.task = asyncio.ensure_future(self._background(stored, generation, conversation))
            if body.get("stream"):
                await send_events(call, self._tail(stored, -1))
            else:
                await _json(call.send, 200, generation.snapshot())
            return
        if not body.get("stream"):
            async for _ in generation.run():
                pass
            self._joined(conversation, stored)
            await _json(call.send, 200, generation.snapshot())
            return
        events = generation.run()
        try:
            await send_events(call, events)
        finally:
            await events.aclose()
            if not stored.done:  # the client left: what was made so far stands
                generation.settle()
            self._joined(conversation, stored)

    async def _background(
        self, stored: StoredResponse, generation: Generation, conversation: str | None
    ) -> None:
        try:
            async for _ in generation.run():
                async with stored.changed:
                    stored.changed.notify_all()
        finally:
            if not stored.done:
                generation.settle()
            self._joined(conversation, stored)
            async with stored.changed:
                stored.changed.notify_all()

    def _joined(self, conversation: str | None, stored: StoredResponse) -> None:
        if conversation and stored.obj["status"] in ("completed", "incomplete"):
            conv = self.fake.conversations.stored.get(conversation)
            if conv is not None:
                conv.items.extend([*stored.input_items, *stored.obj["output"]])

    async def _tail(self, stored: StoredResponse, after: int) -> AsyncIterator[dict[str, Any]]:
        """The stored events after sequence number `after`, then live ones until it ends."""
        index = 0
        while True:
            while index < len(stored.events):
                event = stored.events[index]
                index += 1
                if event["sequence_number"] > after:
                    yield event
            if stored.done and index >= len(stored.events):
                return
            async with stored.changed:
                await stored.changed.wait_for(lambda n=index: n < len(stored.events) or stored.done)

    async def retrieve(self, call: Call) -> None:
        stored = self.get(call.params["id"])
        if call.query.get("stream") != "true":
            await _json(call.send, 200, stored.obj)
            return
        if not (stored.obj["background"] and stored.streamed):
            raise Refusal(
                400,
                "Only responses created with background=true and stream=true can be streamed"
                " again.",
                param="stream",
            )
        after = int(call.query.get("starting_after", "-1"))
        await send_events(call, self._tail(stored, after))

    async def delete(self, call: Call) -> None:
        stored = self.get(call.params["id"])
        if stored.task is not None:
            stored.task.cancel()
        del self.stored[call.params["id"]]
        await _json(call.send, 200, {"id": stored.obj["id"], "object": "response", "deleted": True})

    async def cancel(self, call: Call) -> None:
        stored = self.get(call.params["id"])
        if not stored.obj["background"]:
            raise Refusal(400, "Only responses created with background=true can be cancelled.")
        if not stored.done and stored.task is not None:
            stored.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stored.task
            stored.obj["status"] = "cancelled"
            async with stored.changed:
                stored.changed.notify_all()
        await _json(call.send, 200, stored.obj)

    async def input_items(self, call: Call) -> None:
        stored = self.get(call.params["id"])
        await _json(call.send, 200, page(stored.input_items, call.query))

    async def input_tokens(self, call: Call) -> None:
        context, _ = self.context_for(call.body)
        tokens = prompt_tokens(self.model_body(call.body, context))
        await _json(call.send, 200, {"object": "response.input_tokens", "input_tokens": tokens})

    async def compact(self, call: Call) -> None:
        context, _ = self.context_for(call.body)
        items = normalize_input(call.body.get("input"))
        bill = self.fake.biller.open(self.model_body(call.body, context))
        users = [i for i in [*context, *items] if i.get("role") == "user"]
        summary = secrets.token_urlsafe(48)
        bill.completion_tokens = len(summary)
        compaction = {"id": new_id("cmp"), "type": "compaction", "encrypted_content": summary}
        await _json(
            call.send,
            200,
            {
                "id": new_id("resp"),
                "object": "response.compaction",
                "created_at": int(time.time()),
                "output": [*users, compaction],
                "usage": usage_object(bill, call.plan.cached_tokens, 0),
            },
        )


def page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """OpenAI's cursor page: `order` (default desc), `after` an item id, `limit` (default 20)."""
    ordered = items if query.get("order") == "asc" else items[::-1]
    after = query.get("after")
    if after:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    limit = int(query.get("limit", "20"))
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


async def _json(send: Send, status: int, body: Any) -> None:
    await _send_json(send, status, body, {"x-request-id": "req_fake_upstream"})


async def send_events(call: Call, events: AsyncIterator[dict[str, Any]]) -> None:
    """Stream `events` as server-sent events, misbehaving as the plan says.

    Stops taking events (so stops the generation, and its bill) as soon as the
    client has gone.
    """
    plan, record, send = call.plan, call.record, call.send
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"x-request-id", b"req_fake_upstream"),
            ],
        }
    )
    if plan.raw_chunks is not None:
        for piece in plan.raw_chunks:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(plan.chunk_interval)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if plan.comments_forever:
        while not record.closed_early.is_set():
            await send(
                {"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True}
            )
            await asyncio.sleep(0.05)
        return
    sent = 0
    async for event in events:
        if record.closed_early.is_set():
            return
        if plan.drop_after_chunks is not None and sent >= plan.drop_after_chunks:
            raise ConnectionAbortedError("fake upstream drops the connection")
        if plan.stall_after_chunks is not None and sent >= plan.stall_after_chunks:
            while not record.closed_early.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            return
        if plan.malformed_after_chunks is not None and sent >= plan.malformed_after_chunks:
            broken = b"event: response.output_text.delta\ndata: {not json\n\n"
            await send({"type": "http.response.body", "body": broken, "more_body": True})
            break
        await send({"type": "http.response.body", "body": frame(event), "more_body": True})
        sent += 1
    await send({"type": "http.response.body", "body": b"", "more_body": False})
