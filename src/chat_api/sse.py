"""Server-sent events: reading the upstream's, writing ours, keeping idle ones alive.

Both dialects frame their events here. Parsing works on bytes, so a UTF-8
character split across two network reads is put back together before
anyone decodes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from chat_api.errors import UpstreamError, UpstreamTimeout

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [  # encoded once: every stream sends the same
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
]


def frame(payload: bytes) -> bytes:
    """One `data:` event."""
    return b"data: " + payload + b"\n\n"


class SSEParser:
    """Turns raw upstream bytes into the `data` payload of each event.

    Comment lines and other fields are skipped; a multi-line `data` is joined
    with newlines as the SSE spec says. `max_event_bytes` caps how much one
    event may hold, so a broken upstream cannot fill our memory.
    """

    __slots__ = ("_buffer", "_cr", "_max")

    def __init__(self, max_event_bytes: int = 8 * 1024 * 1024) -> None:
        self._buffer = b""
        self._cr = False  # the last read ended in \r: its \n may come in the next one
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._cr:
            self._cr = False
            chunk = chunk if chunk.startswith(b"\n") else b"\n" + chunk
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        if len(self._buffer) > self._max:
            raise UpstreamError("OpenAI sent an event that is too large to relay.")
        payloads: list[bytes] = []
        for block in events:
            if block.startswith(b"data: ") and b"\n" not in block:
                payloads.append(block[6:])  # the common case: one data line
            elif block:
                payload = _data_of(block)
                if payload is not None:
                    payloads.append(payload)
        return payloads

    def finish(self) -> list[bytes]:
        """Whatever the upstream sent after its last blank line."""
        rest, self._buffer, self._cr = self._buffer, b"", False
        payload = _data_of(rest) if rest.strip() else None
        return [payload] if payload is not None else []


def _data_of(block: bytes) -> bytes | None:
    lines = [
        line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


class EventReader:
    """The `data` payloads of an upstream SSE body, up to `[DONE]`, within a deadline.

    Both providers read their streams through this; `saw_done` tells whether
    the `[DONE]` marker arrived (a stream that ends without it was cut off).
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.saw_done = False

    async def payloads(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        parser = SSEParser()
        loop = asyncio.get_running_loop()
        async for chunk in chunks:
            if loop.time() > self.deadline:
                raise UpstreamTimeout("The answer took longer than the server allows.")
            for payload in parser.feed(chunk):
                if payload == b"[DONE]":
                    self.saw_done = True
                    return
                yield payload
        for payload in parser.finish():
            if payload == b"[DONE]":
                self.saw_done = True
                return
            yield payload
