"""The answers routes send that are not streams: JSON, and a call that notices the client leave.

`until_disconnect` awaits a non-streamed call and cancels it the moment the
client disconnects, so the upstream call is closed at once; streams do the
same in `sse.EventStreamResponse`. Both cancel with the message
`CLIENT_LEFT`, which is how the ledger tells a client leaving
(`client_closed`) from the server stopping a call at the end of its shutdown
grace (`server_stopped`): any other cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive

from chat_api.errors import CLIENT_LEFT

T = TypeVar("T")


class JSONResponse(Response):
    """JSON via orjson: several times faster than the standard library."""

    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


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
