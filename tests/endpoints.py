"""The four ways to ask for a chat answer, and how to read what each one says back.

Both dialects, whole and streamed: `/chat`, `/chat/stream`, and
`/v1/chat/completions` without and with `"stream": true`. Errors are a
sentence on the simple API (`{"error": "..."}`) and OpenAI's object on
`/v1` (`{"error": {"message", "type", "param", "code"}}`); a stream that
fails after its first byte ends with an error event in the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from tests.sse import events


@dataclass(frozen=True)
class Endpoint:
    """One way in: a dialect, streamed or not."""

    path: str
    stream: bool

    @property
    def openai_dialect(self) -> bool:
        return self.path.startswith("/v1/")

    def body(self, **extra: Any) -> dict[str, Any]:
        if self.openai_dialect:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **extra}
            if self.stream:
                body["stream"] = True
            return body
        return {"message": "hi", **extra}

    def __str__(self) -> str:
        kind = "simple" if not self.openai_dialect else "v1"
        return kind + ("-stream" if self.stream else "")


SIMPLE = Endpoint("/chat", stream=False)
SIMPLE_STREAM = Endpoint("/chat/stream", stream=True)
V1 = Endpoint("/v1/chat/completions", stream=False)
V1_STREAM = Endpoint("/v1/chat/completions", stream=True)
ENDPOINTS = [SIMPLE, SIMPLE_STREAM, V1, V1_STREAM]
STREAMS = [SIMPLE_STREAM, V1_STREAM]


def error_message(endpoint: Endpoint, payload: dict[str, Any]) -> str:
    """The human sentence of an error body or event, checked to have the dialect's shape."""
    error = payload["error"]
    if endpoint.openai_dialect:
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
        message = error["message"]
    else:
        message = error
    assert isinstance(message, str) and message, payload
    return message


def stream_text(endpoint: Endpoint, received: list[str]) -> str:
    """The answer's text, put together from a stream's events (the `data` of each)."""
    text = ""
    for data in received:
        if data == "[DONE]":
            continue
        event = json.loads(data)
        if endpoint.openai_dialect:
            for choice in event.get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += event.get("content", "")
    return text


def final_error(endpoint: Endpoint, received: list[str]) -> str:
    """The stream ended with one error event and nothing before it claimed success: its text."""
    assert received, "the stream had no events at all"
    assert "[DONE]" not in received, received[-3:]
    last = json.loads(received[-1])
    assert set(last) == {"error"}, f"the stream ended without an error event: {last}"
    for data in received[:-1]:
        earlier = json.loads(data)
        assert "error" not in earlier and "done" not in earlier, earlier
    return error_message(endpoint, last)


def finished_well(endpoint: Endpoint, received: list[str]) -> bool:
    """The stream ended as a complete answer does: `[DONE]`, or the simple API's done event."""
    if endpoint.openai_dialect:
        return bool(received) and received[-1] == "[DONE]"
    return bool(received) and json.loads(received[-1]).get("done") is True


def stream_events(response: httpx.Response) -> list[str]:
    """The events of a streamed 200, or the error body of a refusal as its only item."""
    if response.status_code == 200:
        return events(response)
    return [response.read().decode()]
