"""Server-sent events: reading the upstream's, framing and writing ours, keeping idle ones alive.

Both dialects frame their events here and stream them with
`EventStreamResponse`, which cancels the call the moment the client leaves
(Starlette's own streaming response leaves that to the next write) and gets
`: ping` from `KeepAlive` when a stream has been quiet. Parsing works on
bytes, so a UTF-8 character split across two network reads is put back
together before anyone decodes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Mapping

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chat_api.errors import CLIENT_LEFT, UpstreamError, UpstreamTimeout

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


class EventStreamResponse(Response):
    """`text/event-stream` from an iterator of ready-framed events.

    The request's own task writes the events. One watcher task waits for the
    client: if it disconnects, the watcher cancels the writer at once, so the
    upstream call is closed. A stream with nothing written for `keepalive`
    seconds gets `: ping` from `KeepAlive`, which looks after every stream
    on the event loop. One extra task per stream, no timer of its own, no
    `asyncio.wait`: thousands of streams stay open at once.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        keepalive: float,
        headers: Mapping[str, str] | None = None,
        on_shutdown: bytes | None = None,
        owner: object | None = None,
    ) -> None:
        self.events = events
        # What the events come from (an engine.CallStream): closed at the end whatever
        # happens, even if the events were never started (a failed first write).
        self.owner = owner
        self.keepalive = keepalive
        self.on_shutdown = on_shutdown  # the last event when the server stops mid-stream
        self.status_code = 200
        self.background = None
        extra = headers or {}
        self.raw_headers = [
            *SSE_HEADERS,
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
        ]
        self.last_write = 0.0
        self.send: Send | None = None
        self.pinging: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        writer = asyncio.current_task()
        assert writer is not None
        client_gone = finished = False

        async def watch() -> None:
            nonlocal client_gone
            while (await receive())["type"] != "http.disconnect":
                pass
            client_gone = True
            if not finished:
                writer.cancel(CLIENT_LEFT)

        keepalive = KeepAlive.of(loop)
        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            self.send, self.last_write = send, loop.time()
            keepalive.add(self)
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                self.last_write = loop.time()
                del event  # sent: not held while the next one is awaited
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if writer.uncancel() > 0:
                raise  # cancelled twice over: not ours to finish
            if client_gone:
                return  # the client left: nobody to tell
            # The server is stopping and its grace period is over: end the
            # stream with a clear last event rather than a cut connection, and
            # end the request as answered (no traceback for a planned stop).
            await _close(self.events)
            with contextlib.suppress(Exception):
                await send(
                    {
                        "type": "http.response.body",
                        "body": self.on_shutdown or b"",
                        "more_body": False,
                    }
                )
        except (OSError, ClientDisconnect):
            return  # the connection broke while writing
        finally:
            finished = True
            keepalive.discard(self)
            self.send = None  # a ping still on its way is dropped, not sent after the end
            if self.pinging is not None:
                self.pinging.cancel()
            watcher.cancel()
            await _close(self.events)
            await _close(self.owner)

    async def ping(self) -> None:
        if self.send is None:
            return
        with contextlib.suppress(Exception):  # a broken connection ends the stream's own way
            await self.send({"type": "http.response.body", "body": PING, "more_body": True})


class KeepAlive:
    """Writes `: ping` to every stream on one event loop that has gone quiet.

    One task looks over the open streams four times per keepalive interval
    (at most every second) and pings those quiet for nearly `keepalive`
    seconds (at most one look early, never late); it stops as the last
    stream ends. A timer per stream instead cost about 1.4 KiB each with
    thousands of streams open.
    """

    def __init__(self) -> None:
        self.streams: dict[EventStreamResponse, None] = {}  # a set that keeps order
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> KeepAlive:
        keepalive = _KEEPALIVES.get(loop)
        if keepalive is None:
            keepalive = _KEEPALIVES[loop] = cls()
        return keepalive

    def add(self, stream: EventStreamResponse) -> None:
        self.streams[stream] = None
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="keepalive")

    def discard(self, stream: EventStreamResponse) -> None:
        self.streams.pop(stream, None)
        if not self.streams and self.task is not None:
            self.task.cancel()  # the last stream ended: nothing to wait a tick for
            self.task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.streams:
                now = loop.time()
                tick = 1.0
                for stream in list(self.streams):
                    own_tick = min(1.0, stream.keepalive / 4)
                    tick = min(tick, own_tick)
                    # A tick early rather than late: a proxy's idle timeout may sit just above.
                    quiet = now - stream.last_write >= stream.keepalive - own_tick
                    if quiet and (stream.pinging is None or stream.pinging.done()):
                        stream.last_write = now
                        stream.pinging = loop.create_task(stream.ping())  # a slow one waits alone
                await asyncio.sleep(tick)
        finally:
            if self.task is asyncio.current_task():
                self.task = None  # a finished task holds its loop, which keys this object


_KEEPALIVES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, KeepAlive] = (
    weakref.WeakKeyDictionary()
)


async def _close(events: object) -> None:
    """Run the events' cleanup (closing the upstream, the ledger row) to the end."""
    close = getattr(events, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
