"""The gateway's one middleware, written as plain ASGI (no per-request task).

For every HTTP request it: picks the request id (the client's `X-Request-ID`
when it is sane, else a new one) and returns it; caps the body size (413),
whether or not a Content-Length was sent, and gives up on a body that has
not arrived within `body_timeout` seconds (408); adds security headers; when
the answer is complete, hands the status and duration to `observe` (the
metrics and the log line). In front of it, `CrossOrigin` answers CORS for
requests from browsers.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chat_api.errors import PayloadTooLarge, RequestTimeout
from chat_api.redact import redact

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
# What CORS adds to an answer for a request without an Origin header: caches
# must not hand it to a browser page, whose request does carry one.
VARY_ORIGIN = (b"vary", b"Origin")
SECURITY_HEADERS_AND_VARY = (*SECURITY_HEADERS, VARY_ORIGIN)


class CrossOrigin(CORSMiddleware):
    """Starlette's CORS, for the requests that carry an `Origin` header.

    Only browsers send one, and only then is there anything to allow or to
    refuse. Every other call (SDKs, curl, servers: nearly all the traffic)
    goes straight on, without CORS's header parsing and send wrapper; the
    gateway layer gives its answer the one header CORS would have added,
    `Vary: Origin`.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, _ in scope.get("headers", ()):  # lifespan has none
            if name == b"origin":
                await super().__call__(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_openai_dialect(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


Observer = Callable[[Scope, int, float], None]


class GatewayMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, body_timeout: float, observe: Observer
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = ""
        declared = -1
        extra_headers = SECURITY_HEADERS_AND_VARY  # CrossOrigin adds Vary for browsers
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                # A key sent as a request id would end up in logs: refuse it.
                if _SANE_ID.match(candidate) and redact(candidate) == candidate:
                    request_id = candidate
            elif name == b"content-length":
                declared = int(value) if value.isdigit() else -1
            elif name == b"origin":
                extra_headers = SECURITY_HEADERS
        if not request_id:
            request_id = os.urandom(16).hex()  # as random as a uuid4, a third of the cost
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        exchange = _Exchange(
            receive,
            send,
            [(b"x-request-id", request_id.encode("latin-1")), *extra_headers],
            max_body=self.max_body,
            body_timeout=self.body_timeout,
        )
        try:
            if declared > self.max_body:
                await _reject_too_large(scope, exchange.send, self.max_body)
            else:
                await self.app(scope, exchange.receive, exchange.send)
        finally:
            self.observe(scope, exchange.status, time.perf_counter() - started)


class _Exchange:
    """One request's side of `GatewayMiddleware`: the send and receive it passes on.

    An object with slots rather than two closures over ten variables:
    thousands of open streams hold one each.
    """

    __slots__ = (
        "_deadline",
        "_headers",
        "_max_body",
        "_receive",
        "_send",
        "_timeout",
        "body_done",
        "received",
        "status",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        *,
        max_body: int,
        body_timeout: float,
    ) -> None:
        self._receive, self._send, self._headers = receive, send, headers
        self._max_body, self._timeout = max_body, body_timeout
        self._deadline = asyncio.get_running_loop().time() + body_timeout
        self.status = 500  # until an answer starts
        self.received = 0
        self.body_done = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message["headers"] = [*message.get("headers", ()), *self._headers]
        await self._send(message)

    async def receive(self) -> Message:
        """The body, capped in size and time; after it, only the disconnect is left."""
        if self.body_done:
            return await self._receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise RequestTimeout(self._timeout) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
            if self.received > self._max_body:
                raise PayloadTooLarge(self._max_body)
        return message


async def _reject_too_large(scope: Scope, send: Send, limit: int) -> None:
    error = PayloadTooLarge(limit)
    body = error.body(is_openai_dialect(scope["path"]))
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
