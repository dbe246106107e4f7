"""The demo model on the Responses API, conversations and embeddings: offline, deterministic.

`make demo` serves an OpenAI Agents SDK (or AI SDK, pydantic-ai, LangChain)
user with no key and no network. The answers mirror the chat demo
(`demo_answer`: fixed text around the last user message); with function
`tools`, the demo calls a tool when the question names it (or `tool_choice`
requires one), with arguments read from the question, and after the tool's
result it answers with that result. Streams follow OpenAI's event order and
numbering, a word every `delay` seconds. Responses and conversations are kept
in memory (the most recent `capacity` of each), so retrieve, delete,
input_items, `previous_response_id` and `conversation` work.

Everything here is plain data in, plain data out: the caller (providers/demo.py)
maps a `ChatAPIError` to HTTP as for any other call.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from chat_api.errors import BadRequest, NotFound
from chat_api.providers.demo_text import demo_answer, words_of
from chat_api.tokens import estimate_text_tokens

CAPACITY = 1_000  # responses (and conversations) kept in memory
EMBEDDING_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
Item = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def frame(event: Mapping[str, Any]) -> bytes:
    """One server-sent event as OpenAI frames it: `event:` names the type, then `data:`."""
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


# --- reading the input ---------------------------------------------------------------


def input_items(value: Any) -> list[Item]:
    """The request's `input` as stored items, each with an id."""
    if value is None:
        return []
    raw = (
        [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value
    )
    if not isinstance(raw, list):
        raise BadRequest("'input' must be a string or a list of items.", param="input")
    items: list[Item] = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise BadRequest("Each item of 'input' must be an object.", param="input")
        item = dict(entry)
        kind = item.setdefault("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            content = item.get("content")
            if isinstance(content, str):
                part = "output_text" if role == "assistant" else "input_text"
                extra: dict[str, Any] = {"annotations": []} if role == "assistant" else {}
                item["content"] = [{"type": part, "text": content, **extra}]
            item.setdefault("status", "completed")
        item.setdefault("id", new_id(str(kind).split("_")[0]))
        items.append(item)
    return items


def _text(item: Item) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return " ".join(
        p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def _function_tools(body: Mapping[str, Any]) -> list[Item]:
    tools = body.get("tools")
    return (
        [t for t in tools if isinstance(t, dict) and t.get("type") == "function"]
        if isinstance(tools, list)
        else []
    )


def _tool_to_call(body: Mapping[str, Any], question: str) -> Item | None:
    """The tool the demo calls for this question, if any (mirrors a model's tool choice)."""
    tools = _function_tools(body)
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("name"):
        return next((t for t in tools if t.get("name") == choice["name"]), None)
    if choice == "required":
        return tools[0]
    words = set(re.findall(r"[a-z0-9]+", question.lower()))
    for tool in tools:
        name = str(tool.get("name", ""))
        parts = re.findall(r"[a-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower())
        if name.lower() in words or any(len(p) >= 4 and p in words for p in parts):
            return tool
    return None


def _argument(schema: Any, question: str) -> Any:
    """A value for one parameter, read from the question where it can be."""
    schema = schema if isinstance(schema, dict) else {}
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind in ("integer", "number"):
        found = re.search(r"-?\d+(\.\d+)?", question)
        number = float(found.group()) if found else 1
        return int(number) if kind == "integer" else number
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    names = re.findall(r"\b[A-Z][\w'-]*", question)[1:]  # not the sentence's first word
    return names[-1].removesuffix("'s") if names else question


def demo_arguments(tool: Item, question: str) -> dict[str, Any]:
    """The arguments the demo passes: every required parameter (all, for strict tools)."""
    parameters = tool.get("parameters") if isinstance(tool.get("parameters"), dict) else {}
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    properties = properties if isinstance(properties, dict) else {}
    required = parameters.get("required") if isinstance(parameters, dict) else None
    names = required if isinstance(required, list) else list(properties)
    return {name: _argument(properties.get(name), question) for name in names}


# --- the answer ------------------------------------------------------------------------


@dataclass
class Answer:
    """What the demo writes for one request: words of text, or function calls."""

    words: list[str] = field(default_factory=list)
    calls: list[Item] = field(default_factory=list)
    incomplete: bool = False


def demo_plan(body: Mapping[str, Any], history: list[Item], items: list[Item]) -> Answer:
    """Decide the answer: a tool call, text about a tool's result, or the chat demo's text."""
    seen = [*history, *items]
    last = items[-1] if items else (history[-1] if history else {})
    if last.get("type") == "function_call_output":
        call = next(
            (
                i
                for i in seen
                if i.get("type") == "function_call" and i.get("call_id") == last.get("call_id")
            ),
            {},
        )
        output = last.get("output")
        shown = output if isinstance(output, str) else orjson.dumps(output).decode()
        text = f"The tool {call.get('name', 'you ran')} answered: {shown}"
        words = words_of(text)
    else:
        users = [
            i for i in seen if i.get("type", "message") == "message" and i.get("role") == "user"
        ]
        question = _text(users[-1]) if users else ""
        tool = _tool_to_call(body, question)
        if tool is not None:
            arguments = orjson.dumps(demo_arguments(tool, question)).decode()
            call = {
                "name": tool.get("name"),
                "arguments": arguments,
                "call_id": new_id("call")[:29],
            }
            return Answer(calls=[call])
        words = words_of(demo_answer([{"role": "user", "content": question}]))
    limit = body.get("max_output_tokens")
    if isinstance(limit, int) and 0 < limit < len(words):
        return Answer(words=words[:limit], incomplete=True)
    return Answer(words=words)


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def response_object(
    response_id: str, body: Mapping[str, Any], status: str, conversation: str | None
) -> dict[str, Any]:
    given = body.get("reasoning")
    reasoning: dict[str, Any] = given if isinstance(given, dict) else {}
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
        "model": body.get("model"),
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "service_tier": "default",
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


class DemoRun:
    """One response being made: as a whole object, or as its stream of framed events."""

    def __init__(
        self,
        owner: DemoResponses,
        body: Mapping[str, Any],
        items: list[Item],
        history: list[Item],
        conversation: str | None,
    ) -> None:
        self._owner = owner
        self._items = items
        self._history = history
        self._conversation = conversation
        self.answer = demo_plan(body, history, items)
        self.input_tokens = estimate_text_tokens(
            orjson.dumps([body.get("instructions"), body.get("tools"), history, items]).decode()
        )
        self.response = response_object(new_id("resp"), body, "in_progress", conversation)
        self.response_id: str = self.response["id"]
        self._sequence = 0

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return frame(event)

    def _snapshot(self) -> dict[str, Any]:
        copied: dict[str, Any] = orjson.loads(orjson.dumps(self.response))
        return copied

    def whole(self) -> dict[str, Any]:
        """The finished Response object (kept, unless the request said store=false)."""
        self.response["output"] = self._output_items()
        self._finish(len(self._tokens()))
        return self._snapshot()

    def _tokens(self) -> list[str]:
        pieces = list(self.answer.words)
        for call in self.answer.calls:
            text = str(call["arguments"])
            pieces += [text[i : i + 8] for i in range(0, len(text), 8)]
        return pieces

    def _output_items(self) -> list[Item]:
        status = "incomplete" if self.answer.incomplete else "completed"
        if self.answer.calls:
            return [
                {"id": new_id("fc"), "type": "function_call", "status": status, **call}
                for call in self.answer.calls
            ]
        text = "".join(self.answer.words)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return [
            {
                "id": new_id("msg"),
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [part],
            }
        ]

    def _finish(self, output_tokens: int) -> str:
        status = "incomplete" if self.answer.incomplete else "completed"
        self.response["status"] = status
        if self.answer.incomplete:
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            self.response["completed_at"] = int(time.time())
        self.response["usage"] = usage(self.input_tokens, output_tokens)
        self._owner._keep(self, self._items, self._history, self._conversation)
        return status

    async def events(self) -> AsyncIterator[bytes]:
        """The response as OpenAI streams it, a word (or 8 characters of arguments) a tick."""
        delay = self._owner.delay
        yield self._event("response.created", response=self._snapshot())
        yield self._event("response.in_progress", response=self._snapshot())
        written = 0
        for index, item in enumerate(self._output_items()):
            done = dict(item)
            if item["type"] == "function_call":
                start = {**item, "status": "in_progress", "arguments": ""}
                yield self._event("response.output_item.added", output_index=index, item=start)
                where = {"item_id": item["id"], "output_index": index}
                arguments = str(item["arguments"])
                for at in range(0, len(arguments), 8):
                    await asyncio.sleep(delay)
                    written += 1
                    delta = arguments[at : at + 8]
                    yield self._event(
                        "response.function_call_arguments.delta", **where, delta=delta
                    )
                yield self._event(
                    "response.function_call_arguments.done", **where, arguments=arguments
                )
            else:
                start = {**item, "status": "in_progress", "content": []}
                yield self._event("response.output_item.added", output_index=index, item=start)
                where = {"item_id": item["id"], "output_index": index, "content_index": 0}
                empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                yield self._event("response.content_part.added", **where, part=empty)
                for word in self.answer.words:
                    await asyncio.sleep(delay)
                    written += 1
                    yield self._event(
                        "response.output_text.delta", **where, delta=word, logprobs=[]
                    )
                part = item["content"][0]
                yield self._event(
                    "response.output_text.done", **where, text=part["text"], logprobs=[]
                )
                yield self._event("response.content_part.done", **where, part=part)
            self.response["output"].append(done)
            yield self._event("response.output_item.done", output_index=index, item=done)
        status = self._finish(written)
        yield self._event(f"response.{status}", response=self._snapshot())


# --- the store ---------------------------------------------------------------------------


@dataclass
class _Stored:
    response: dict[str, Any]
    items: list[Item]
    history: list[Item]


class DemoResponses:
    """The demo's Responses API and conversations, kept in memory."""

    def __init__(self, delay: float, *, capacity: int = CAPACITY) -> None:
        self.delay = delay
        self._capacity = capacity
        self._responses: OrderedDict[str, _Stored] = OrderedDict()
        self._conversations: OrderedDict[str, tuple[dict[str, Any], list[Item]]] = OrderedDict()

    # responses

    def start(self, body: Mapping[str, Any]) -> DemoRun:
        """Check the request and begin its response; refusals come before any byte is sent."""
        previous = body.get("previous_response_id")
        conversation = body.get("conversation")
        conversation_id = (
            str(conversation.get("id")) if isinstance(conversation, dict) else conversation
        )
        if previous and conversation_id:
            raise BadRequest(
                "Send either 'previous_response_id' or 'conversation', not both.",
                param="previous_response_id",
                code="mutually_exclusive_parameters",
            )
        history: list[Item] = []
        if previous:
            stored = self._responses.get(str(previous))
            if stored is None:
                raise BadRequest(
                    f"Previous response with id '{previous}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = [*stored.history, *stored.items, *stored.response["output"]]
        if conversation_id:
            history = list(self._conversation(str(conversation_id))[1])
        return DemoRun(self, body, input_items(body.get("input")), history, conversation_id)

    def _keep(
        self, run: DemoRun, items: list[Item], history: list[Item], conversation: str | None
    ) -> None:
        response = run.response
        if conversation and conversation in self._conversations:
            self._conversations[conversation][1].extend([*items, *response["output"]])
        if response["store"]:
            self._responses[run.response_id] = _Stored(response, items, history)
            while len(self._responses) > self._capacity:
                self._responses.popitem(last=False)

    def _response(self, response_id: str) -> _Stored:
        stored = self._responses.get(response_id)
        if stored is None:
            raise NotFound(f"Response with id '{response_id}' not found.")
        return stored

    def retrieve(self, response_id: str) -> dict[str, Any]:
        return self._response(response_id).response

    def delete(self, response_id: str) -> dict[str, Any]:
        self._response(response_id)
        del self._responses[response_id]
        return {"id": response_id, "object": "response", "deleted": True}

    def cancel(self, response_id: str) -> dict[str, Any]:
        """Demo responses finish at once, so cancelling one returns it as it is."""
        stored = self._response(response_id)
        if not stored.response["background"]:
            raise BadRequest("Only responses created with background=true can be cancelled.")
        return stored.response

    def input_items(self, response_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        return page(self._response(response_id).items, query)

    def input_tokens(self, body: Mapping[str, Any]) -> dict[str, Any]:
        run = self.start(body)
        return {"object": "response.input_tokens", "input_tokens": run.input_tokens}

    # conversations

    def _conversation(self, conversation_id: str) -> tuple[dict[str, Any], list[Item]]:
        found = self._conversations.get(conversation_id)
        if found is None:
            raise NotFound(f"Conversation with id '{conversation_id}' not found.")
        return found

    def create_conversation(self, body: Mapping[str, Any]) -> dict[str, Any]:
        conversation_id = new_id("conv")
        conversation: dict[str, Any] = {
            "id": conversation_id,
            "object": "conversation",
            "created_at": int(time.time()),
            "metadata": body.get("metadata") or {},
        }
        self._conversations[conversation_id] = (
            conversation,
            input_items(body.get("items") or []),
        )
        while len(self._conversations) > self._capacity:
            self._conversations.popitem(last=False)
        return conversation

    def conversation(self, conversation_id: str) -> dict[str, Any]:
        return self._conversation(conversation_id)[0]

    def update_conversation(self, conversation_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        conversation = self._conversation(conversation_id)[0]
        conversation["metadata"] = body.get("metadata") or {}
        return conversation

    def delete_conversation(self, conversation_id: str) -> dict[str, Any]:
        self._conversation(conversation_id)
        del self._conversations[conversation_id]
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    def conversation_items(self, conversation_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        return page(self._conversation(conversation_id)[1], query)

    def add_conversation_items(
        self, conversation_id: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        items = input_items(body.get("items") or [])
        self._conversation(conversation_id)[1].extend(items)
        return page(items, {"order": "asc", "limit": str(len(items) + 1)})

    def conversation_item(self, conversation_id: str, item_id: str) -> Item:
        for item in self._conversation(conversation_id)[1]:
            if item["id"] == item_id:
                return item
        raise NotFound(f"Item with id '{item_id}' not found.")

    def delete_conversation_item(self, conversation_id: str, item_id: str) -> dict[str, Any]:
        item = self.conversation_item(conversation_id, item_id)
        conversation, items = self._conversation(conversation_id)
        items.remove(item)
        return conversation


def page(items: list[Item], query: Mapping[str, str]) -> dict[str, Any]:
    """OpenAI's cursor page: `order` (default desc), `after` an item id, `limit` (default 20)."""
    ordered = items if query.get("order") == "asc" else items[::-1]
    after = query.get("after")
    if after:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = max(1, min(100, int(query.get("limit", "20"))))
    except ValueError:
        raise BadRequest("'limit' must be a whole number from 1 to 100.", param="limit") from None
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


# --- embeddings ----------------------------------------------------------------------------


def demo_vector(model: str, text: str, dimensions: int) -> list[float]:
    """A unit vector seeded by the text's hash: the same text always lands on the same point."""
    full = EMBEDDING_DIMENSIONS.get(model, 1536)
    values: list[float] = []
    counter = 0
    while len(values) < min(dimensions, full):
        block = hashlib.sha256(f"{model}\0{text}\0{counter}".encode()).digest()
        values += [b / 127.5 - 1.0 for b in block]
        counter += 1
    values = values[: min(dimensions, full)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def demo_embeddings(body: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /v1/embeddings` for the demo: floats or base64, `dimensions` honoured."""
    model = str(body.get("model") or "text-embedding-3-small")
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if (
        not isinstance(inputs, list)
        or not inputs
        or not all(bool(i) and isinstance(i, str | list) for i in inputs)
    ):
        raise BadRequest(
            "'input' must be a non-empty string or a list of non-empty strings.", param="input"
        )
    full = EMBEDDING_DIMENSIONS.get(model, 1536)
    dimensions = body.get("dimensions", full)
    if not isinstance(dimensions, int) or not 1 <= dimensions <= full:
        raise BadRequest(
            f"'dimensions' must be a whole number from 1 to {full}.", param="dimensions"
        )
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else orjson.dumps(item).decode()
        tokens += estimate_text_tokens(text) if isinstance(item, str) else len(item)
        vector = demo_vector(model, text, dimensions)
        encoded: Any = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
