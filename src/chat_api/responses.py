"""Responses that notice when the client goes away.

`EventStreamResponse` streams SSE and, the moment the client disconnects,
cancels the producer so the upstream call is closed at once (Starlette's own
streaming response leaves that to the next write). `until_disconnect` does the
same for a non-streamed call still waiting on the upstream.

Both cancel with the message `CLIENT_LEFT`, which is how the ledger tells a
client leaving (`client_closed`) from the server stopping a call at the end
of its shutdown grace (`server_stopped`): any other cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chat_api.errors import CLIENT_LEFT
from chat_api.sse import PING, SSE_HEADERS

T = TypeVar("T")


class JSONResponse(Response):
    """JSON via orjson: several times faster than the standard library."""

    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


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
    seconds (at most one look early, never late); it stops when the last
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


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` in this task, cancelling it if the client disconnects first.

    One watcher task, no second task for `work` and no `asyncio.wait`: this
    runs on every non-streamed call.
    """
    task = asyncio.current_task()
    assert task is not None
    finished = False

    async def watch() -> None:
        await _wait_for_disconnect(receive)
        if not finished:  # an answer that is already in is not thrown away
            task.cancel(CLIENT_LEFT)

    watcher = asyncio.ensure_future(watch())
    try:
        result = await work
        finished = True
        return result
    except asyncio.CancelledError:
        # Ours if the watcher cancelled and nobody else did. Anyone else is the
        # server stopping: the cancellation goes on to GatewayMiddleware's 503.
        if watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
            raise ClientDisconnect() from None
        raise
    finally:
        finished = True
        watcher.cancel()
