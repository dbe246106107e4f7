"""How uvicorn serves the app: its options, and an HTTP protocol that bounds request headers.

uvicorn waits forever for the headers of a request, so a client that drips
them a byte at a time (slowloris) can hold connections open indefinitely.
This protocol closes a connection whose request headers are not complete
within `HEADER_TIMEOUT` seconds of their first byte (or of connecting).

Nor does uvicorn's httptools protocol bound their size (its
`h11_max_incomplete_event_size` applies to the h11 protocol only): 100
connections sending 2 MB of headers each and never finishing grew the
process from 219 to 410 MiB. Here a request whose headers pass
`MAX_HEADER_BYTES` is answered 431 and its connection closed. Request bodies
have their own deadline and limit in the middleware.

`SERVER_OPTIONS` are the uvicorn settings every way of serving the app uses
(`chat-api serve`, its workers and gunicorn's): uvloop, this protocol, and no
`X-Forwarded-For` handling by uvicorn, which would believe it from 127.0.0.1
by default: the gateway reads it itself, from `CHAT_API_TRUSTED_PROXIES` only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 64 * 1024  # request line and headers; nginx allows 32 KiB by default

_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 33\r\n"
    b"connection: close\r\n\r\n"
    b"The request headers are too large"
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:  # headers still awaited: count what they take
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._disarm()
                if not self.transport.is_closing():
                    self.transport.write(_TOO_LARGE)
                    self.transport.close()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._headers_too_slow)

    def _disarm(self) -> None:
        self._header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


SERVER_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": GuardedHttpToolsProtocol,
    "proxy_headers": False,
    "h11_max_incomplete_event_size": MAX_HEADER_BYTES,  # should h11 ever be chosen instead
}
