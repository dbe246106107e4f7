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

    Three tasks share the connection: the producer writes events, a watcher
    waits for the client's disconnect and cancels the producer, and a pinger
    writes `: ping` whenever nothing was written for `keepalive` seconds.
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
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        last_write = loop.time()

        async def produce() -> None:
            nonlocal last_write
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                last_write = loop.time()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def ping() -> None:
            nonlocal last_write
            while True:
                await asyncio.sleep(max(0.0, last_write + self.keepalive - loop.time()))
                if loop.time() - last_write >= self.keepalive:
                    await send({"type": "http.response.body", "body": PING, "more_body": True})
                    last_write = loop.time()

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        producer = asyncio.ensure_future(produce())
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        pinger = asyncio.ensure_future(ping())
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The server is stopping and its grace period is over: end the
            # stream with a clear last event rather than a cut connection.
            client_gone = watcher.done()
            await _stop(producer, watcher, pinger)
            if self.on_shutdown is not None and not client_gone:
                with contextlib.suppress(Exception):
                    await send(
                        {"type": "http.response.body", "body": self.on_shutdown, "more_body": False}
                    )
            raise
        finally:
            await _stop(producer, watcher, pinger)
        if producer.done() and not producer.cancelled():
            error = producer.exception()
            if error is not None and not isinstance(error, OSError | ClientDisconnect):
                raise error


async def _stop(*tasks: asyncio.Future[None]) -> None:
    """Cancel `tasks` and let their cleanup (closing the upstream) run to the end."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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
