"""How the fake upstream makes and sends a response's events (tests/fakes/responses_api.py).

`Generation.run()` yields one response's events in OpenAI's order, numbered,
waiting as the plan says, and keeps the response object and its bill up to
date as it goes; `send_events` streams them as server-sent events and
misbehaves as the plan says (a cut connection, a stall, broken JSON).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Send

from tests.fakes.billing import Bill
from tests.fakes.openai_server import Plan, Received, _words, start_stream

TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
FAILED_MESSAGE = "An error occurred while processing your request. Please retry your request."


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


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


async def send_events(call: Call, events: AsyncIterator[dict[str, Any]]) -> None:
    """Stream `events` as server-sent events, misbehaving as the plan says.

    Stops taking events (so stops the generation, and its bill) as soon as the
    client has gone.
    """
    plan, record, send = call.plan, call.record, call.send
    if await start_stream(plan, record, send, b"text/event-stream; charset=utf-8"):
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
