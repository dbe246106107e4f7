"""The floor: a bare relay on the gateway's own stack, to show what the stack alone costs.

uvicorn (uvloop, httptools) takes the request and aiohttp forwards it to the
fake upstream, relaying the answer's bytes as they come: no checks, no keys,
no limits, no ledger, no metrics, no log line, no disconnect watch. Nobody
should run this; the bench runs the same loads through it as through the
gateway, so the table shows how much of the gateway's cost is its own.

    OPENAI_BASE_URL=http://127.0.0.1:PORT/v1 python -m uvicorn bench.floor:app
"""

from __future__ import annotations

import os

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from yarl import URL


class BareRelay:
    def __init__(self) -> None:
        self.url = URL(os.environ["OPENAI_BASE_URL"] + "/chat/completions")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["path"] == "/health":
            await _answer(send, 200, b"application/json", b'{"status":"ok"}')
        else:
            await self._relay(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0), headers={"Authorization": "Bearer x"}
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _relay(self, receive: Receive, send: Send) -> None:
        assert self.session is not None
        body = b""
        message: Message = {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            body += message.get("body", b"")
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.url, data=body, headers=headers) as upstream:
            kind = upstream.headers.get("Content-Type", "application/json").encode()
            start = {"type": "http.response.start", "status": upstream.status}
            await send({**start, "headers": [(b"content-type", kind)]})
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _answer(send: Send, status: int, kind: bytes, body: bytes) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}
    )
    await send({"type": "http.response.body", "body": body})


app = BareRelay()
