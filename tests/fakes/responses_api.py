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

The events are made and sent by tests/fakes/responses_events.py; conversations,
embeddings and model pages live in tests/fakes/conversations_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.types import Send

from tests.fakes.billing import prompt_tokens
from tests.fakes.openai_server import _send_json
from tests.fakes.responses_events import (
    Call,
    Generation,
    StoredResponse,
    new_id,
    response_object,
    send_events,
    usage_object,
)

if TYPE_CHECKING:
    from tests.fakes.openai_server import FakeOpenAI

MIN_OUTPUT_TOKENS = 16  # OpenAI refuses a smaller max_output_tokens


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

    async def stop(self) -> None:
        """The server stops: end the background responses still running."""
        tasks = [s.task for s in self.stored.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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

    def resolve(self, item: dict[str, Any]) -> dict[str, Any]:
        """An `item_reference` stands for a stored item: of any response or conversation."""
        if item.get("type") != "item_reference":
            return item
        for stored in self.stored.values():
            for known in [*stored.input_items, *stored.obj["output"]]:
                if known.get("id") == item.get("id"):
                    return known
        for conversation in self.fake.conversations.stored.values():
            for known in conversation.items:
                if known.get("id") == item.get("id"):
                    return known
        raise Refusal(400, f"Item with id '{item.get('id')}' not found.", param="input")

    def model_body(self, body: dict[str, Any], context: list[dict[str, Any]]) -> dict[str, Any]:
        """The request as the model reads it, and as it is billed: context, then input.

        Without context or item references this is the body exactly as the client
        sent it, so a gateway that counts the body it relays counts what is billed.
        """
        given = body.get("input")
        current = [given] if isinstance(given, str) else list(given or [])
        references = [
            i for i in current if isinstance(i, dict) and i.get("type") == "item_reference"
        ]
        if not context and not references:
            return body
        read = [self.resolve(i) if isinstance(i, dict) else i for i in current]
        return {**body, "input": [*context, *read]}

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
        items = [self.resolve(item) for item in normalize_input(body.get("input"))]
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
