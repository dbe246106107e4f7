"""The offline demo model: no key, no network, the same wire format as OpenAI.

It answers deterministically (the same question gets the same answer),
streams word by word at `CHAT_API_DEMO_DELAY` seconds a word, honours
`max_tokens`, and reports usage, so that everything above the provider —
limits, budgets, the ledger, the page — works exactly as with a real model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import orjson

from chat_api.config import Settings
from chat_api.errors import NotFound
from chat_api.providers.base import Completion
from chat_api.providers.demo_responses import DemoResponses, demo_embeddings
from chat_api.providers.demo_text import demo_answer, words_of
from chat_api.sse import SSEParser
from chat_api.tokens import estimate_prompt_tokens


class DemoProvider:
    """Answers from `demo_answer`, one word per token."""

    name = "demo"

    def __init__(self, settings: Settings) -> None:
        self._delay = settings.demo_delay
        self._responses = DemoResponses(settings.demo_delay)

    def _plan(self, body: dict[str, Any]) -> tuple[list[str], str, int]:
        words = words_of(demo_answer(body.get("messages", [])))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and 0 < limit < len(words):
            words, finish = words[:limit], "length"
        return words, finish, estimate_prompt_tokens(body.get("messages", []))

    async def complete(self, path: str, body: dict[str, Any], request_id: str) -> Completion:
        if path == "/embeddings":
            data: dict[str, Any] = demo_embeddings(body)
            return Completion(orjson.dumps(data), data, f"demo-{request_id}")
        if path == "/responses":
            run = self._responses.start(body)
            await asyncio.sleep(self._delay)
            data = run.whole()
            return Completion(orjson.dumps(data), data, f"demo-{request_id}")
        if path != "/chat/completions":
            raise NotFound(f"The demo model does not offer {path}.")
        words, finish, prompt_tokens = self._plan(body)
        await asyncio.sleep(self._delay)
        n = int(body.get("n") or 1)
        data = {
            "id": f"chatcmpl-demo-{request_id[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": "demo",
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": "".join(words), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for index in range(n)
            ],
            "usage": _usage(prompt_tokens, len(words) * n),
        }
        return Completion(orjson.dumps(data), data, f"demo-{request_id}")

    async def open_stream(
        self, path: str, body: dict[str, Any], request_id: str
    ) -> _DemoStream | _DemoEvents:
        if path == "/responses":
            return _DemoEvents(self._responses.start(body).events(), f"demo-{request_id}")
        words, finish, prompt_tokens = self._plan(body)
        return _DemoStream(body, request_id, words, finish, prompt_tokens, self._delay)

    async def forward(
        self, method: str, path: str, body: dict[str, Any] | None, request_id: str
    ) -> Completion:
        """Stored responses and conversations, kept in memory by `DemoResponses`."""
        where, _, query_text = path.partition("?")
        query = dict(parse_qsl(query_text))
        parts = where.strip("/").split("/")
        store = self._responses
        given = body or {}
        data: Any
        match method, parts:
            case "GET", ["responses", response_id]:
                data = store.retrieve(response_id)
            case "DELETE", ["responses", response_id]:
                data = store.delete(response_id)
            case "POST", ["responses", response_id, "cancel"]:
                data = store.cancel(response_id)
            case "GET", ["responses", response_id, "input_items"]:
                data = store.input_items(response_id, query)
            case "POST", ["responses", "input_tokens"]:
                data = store.input_tokens(given)
            case "POST", ["conversations"]:
                data = store.create_conversation(given)
            case "GET", ["conversations", conversation_id]:
                data = store.conversation(conversation_id)
            case "POST", ["conversations", conversation_id]:
                data = store.update_conversation(conversation_id, given)
            case "DELETE", ["conversations", conversation_id]:
                data = store.delete_conversation(conversation_id)
            case "GET", ["conversations", conversation_id, "items"]:
                data = store.conversation_items(conversation_id, query)
            case "POST", ["conversations", conversation_id, "items"]:
                data = store.add_conversation_items(conversation_id, given)
            case "GET", ["conversations", conversation_id, "items", item_id]:
                data = store.conversation_item(conversation_id, item_id)
            case "DELETE", ["conversations", conversation_id, "items", item_id]:
                data = store.delete_conversation_item(conversation_id, item_id)
            case "GET", ["models", model]:
                data = {"id": model, "object": "model", "created": 0, "owned_by": "demo"}
            case _:
                raise NotFound(f"The demo model keeps nothing at {where}.")
        return Completion(orjson.dumps(data), data, f"demo-{request_id}")

    async def open_replay(self, path: str, request_id: str) -> _DemoEvents:
        raise NotFound("The demo model does not replay responses; retrieve them whole.")

    async def aclose(self) -> None:
        return None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _DemoStream:
    def __init__(
        self,
        body: dict[str, Any],
        request_id: str,
        words: list[str],
        finish: str,
        prompt_tokens: int,
        delay: float,
    ) -> None:
        self._head = {
            "id": f"chatcmpl-demo-{request_id[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": "demo",
        }
        self._words = words
        self._finish = finish
        self._prompt_tokens = prompt_tokens
        self._delay = delay
        options = body.get("stream_options")
        self._usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self.upstream_request_id: str | None = f"demo-{request_id}"
        self.saw_done = False
        self._closed = False

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return orjson.dumps({**self._head, "choices": [choice]})

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._chunk({"role": "assistant", "content": ""}, None)
        for word in self._words:
            await asyncio.sleep(self._delay)
            if self._closed:
                return
            yield self._chunk({"content": word}, None)
        yield self._chunk({}, self._finish)
        if self._usage:
            usage = _usage(self._prompt_tokens, len(self._words))
            yield orjson.dumps({**self._head, "choices": [], "usage": usage})
        self.saw_done = True

    async def aclose(self) -> None:
        self._closed = True


class _DemoEvents:
    """A demo response's framed events, read back as the payloads an upstream stream yields."""

    def __init__(self, frames: AsyncIterator[bytes], upstream_request_id: str) -> None:
        self._frames = frames
        self._parser = SSEParser()
        self.upstream_request_id: str | None = upstream_request_id
        self.saw_done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for framed in self._frames:
            for payload in self._parser.feed(framed):
                yield payload

    async def aclose(self) -> None:
        close = getattr(self._frames, "aclose", None)
        if close is not None:
            await close()
