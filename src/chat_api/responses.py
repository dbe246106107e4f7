"""Responses that notice when the client goes away.

`EventStreamResponse` streams SSE and, the moment the client disconnects,
cancels the producer so the upstream call is closed at once (Starlette's own
streaming response leaves that to the next write). `until_disconnect` does the
same for a non-streamed call still waiting on the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

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
    upstream call is closed; if nothing was written for `keepalive` seconds,
    it writes `: ping`. One extra task per stream, not three, and no
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
    ) -> None:
        self.events = events
        self.keepalive = keepalive
        self.on_shutdown = on_shutdown  # the last event when the server stops mid-stream
        self.status_code = 200
        self.background = None
        extra = headers or {}
        self.raw_headers = [
            *SSE_HEADERS,
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        writer = asyncio.current_task()
        assert writer is not None
        last_write = loop.time()
        client_gone = finished = False

        async def watch() -> None:
            nonlocal last_write, client_gone
            while True:
                try:
                    async with asyncio.timeout_at(last_write + self.keepalive):
                        message = await receive()
                except TimeoutError:
                    if loop.time() - last_write >= self.keepalive:
                        with contextlib.suppress(Exception):  # a broken connection ends below
                            ping = {"type": "http.response.body", "body": PING, "more_body": True}
                            await send(ping)
                        last_write = loop.time()
                    continue
                if message["type"] == "http.disconnect":
                    client_gone = True
                    if not finished:
                        writer.cancel()
                    return

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(watch())
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                last_write = loop.time()
                del event  # sent: not held while the next one is awaited
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if client_gone and writer.uncancel() == 0:
                return  # the client left: nobody to tell
            # The server is stopping and its grace period is over: end the
            # stream with a clear last event rather than a cut connection.
            await _close(self.events)
            if self.on_shutdown is not None and not client_gone:
                with contextlib.suppress(Exception):
                    await send(
                        {"type": "http.response.body", "body": self.on_shutdown, "more_body": False}
                    )
            raise
        except (OSError, ClientDisconnect):
            return  # the connection broke while writing
        finally:
            finished = True
            watcher.cancel()
            await _close(self.events)


async def _close(events: AsyncIterator[bytes]) -> None:
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
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        result = await work
        finished = True
        return result
    except asyncio.CancelledError:
        # Ours if the watcher cancelled and nobody else did (a server stopping, say).
        if watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
            raise ClientDisconnect() from None
        raise
    finally:
        finished = True
        watcher.cancel()
