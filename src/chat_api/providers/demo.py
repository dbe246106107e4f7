"""The offline demo model: no key, no network, the same wire format as OpenAI.

It answers deterministically (the same question gets the same answer),
streams word by word at `CHAT_API_DEMO_DELAY` seconds a word, honours
`max_tokens`, and reports usage, so that everything above the provider —
limits, budgets, the ledger, the page — works exactly as with a real model.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from chat_api.config import Settings
from chat_api.errors import NotFound
from chat_api.providers.base import Completion
from chat_api.tokens import estimate_prompt_tokens

_OPENERS = (
    "Hello! I am the demo model of chat-api.",
    "Hi there, this is chat-api's built-in demo model.",
    "Thanks for trying chat-api. You are talking to its demo model.",
)

_BODY = (
    "I answer on this machine without calling OpenAI, so no key is needed and nothing is spent. "
    "You wrote: “{question}”. "
    "To talk to a real model, set **OPENAI_API_KEY_CYB_SEC** and start the service "
    "without `CHAT_API_DEMO`. Here is a small code block, to show formatting:\n\n"
    '```python\nprint("hello from chat-api")\n```\n'
)


def demo_answer(messages: list[Any]) -> str:
    """The demo's answer to a conversation: fixed text around the last user message."""
    question = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            question = content if isinstance(content, str) else "(a message with parts)"
            break
    question = " ".join(question.split())
    if len(question) > 200:
        question = question[:200] + "…"
    seed = hashlib.sha256(question.encode()).digest()[0]
    return f"{_OPENERS[seed % len(_OPENERS)]} {_BODY.format(question=question)}"


def _words(text: str) -> list[str]:
    """Split keeping the spaces, so joining the pieces gives the text back."""
    pieces: list[str] = []
    start = 0
    for index, char in enumerate(text):
        if char == " " and index > start:
            pieces.append(text[start:index])
            start = index
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


class DemoProvider:
    """Answers from `demo_answer`, one word per token."""

    name = "demo"

    def __init__(self, settings: Settings) -> None:
        self._delay = settings.demo_delay

    def _plan(self, body: dict[str, Any]) -> tuple[list[str], str, int]:
        words = _words(demo_answer(body.get("messages", [])))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and 0 < limit < len(words):
            words, finish = words[:limit], "length"
        return words, finish, estimate_prompt_tokens(body.get("messages", []))

    async def complete(self, path: str, body: dict[str, Any], request_id: str) -> Completion:
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

    async def open_stream(self, path: str, body: dict[str, Any], request_id: str) -> _DemoStream:
        words, finish, prompt_tokens = self._plan(body)
        return _DemoStream(body, request_id, words, finish, prompt_tokens, self._delay)

    async def forward(
        self, method: str, path: str, body: dict[str, Any] | None, request_id: str
    ) -> Completion:
        raise NotFound(f"The demo model keeps nothing at {path.partition('?')[0]}.")

    async def open_replay(self, path: str, request_id: str) -> _DemoStream:
        raise NotFound(f"The demo model keeps nothing at {path.partition('?')[0]}.")

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
