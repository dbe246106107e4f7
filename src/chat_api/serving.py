"""How uvicorn serves the app: its options, and an HTTP protocol that bounds request headers.

uvicorn waits forever for the headers of a request, so a client that drips
them a byte at a time (slowloris) can hold connections open indefinitely.
This protocol closes a connection whose request headers are not complete
within `HEADER_TIMEOUT` seconds of their first byte (or of connecting).

Nor does uvicorn's httptools protocol bound their size (its
`h11_max_incomplete_event_size` applies to the h11 protocol only): 100
connections sending 2 MB of headers each and never finishing grew the
process from 219 to 410 MiB. Here a request whose headers pass
`MAX_HEADER_BYTES` is answered 431 and its connection closed, with the JSON
error body of every other error (OpenAI's shape when the request line
already named a `/v1` path). Request bodies have their own deadline and limit
in the middleware.

`SERVER_OPTIONS` are the uvicorn settings every way of serving the app uses
(`chat-api serve`, its workers and gunicorn's): uvloop, this protocol, and no
`X-Forwarded-For` handling by uvicorn, which would believe it from 127.0.0.1
by default: the gateway reads it itself, from `CHAT_API_TRUSTED_PROXIES` only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from chat_api.errors import BadRequest
from chat_api.middleware import is_openai_dialect

HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 64 * 1024  # request line and headers; nginx allows 32 KiB by default
LINGER = 2.0  # after a 431: how long what the client still sends is read and dropped


def _too_large(openai_dialect: bool) -> bytes:
    error = BadRequest(
        f"The request headers are larger than the {MAX_HEADER_BYTES}-byte limit. "
        "Send fewer or shorter headers.",
        code="request_headers_too_large",
    )
    body = error.body(openai_dialect)
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


_TOO_LARGE = {dialect: _too_large(dialect) for dialect in (False, True)}


def _target(url: bytes, data: bytes) -> str:
    """The request's path as far as it is known: what the parser read, else this first chunk."""
    if not url:  # the headers' first chunk alone is too large: it holds the request line
        url = data.partition(b" ")[2].partition(b" ")[0]
    return url.partition(b"?")[0].decode("latin-1")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _lingering = False  # answered 431: what else the client sends is read and dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self._header_timer is not None:  # headers still awaited: count what they take
            # Only up to their end: a client may send a large body in the same write.
            end = data.find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else end + 4
            if self._header_bytes > MAX_HEADER_BYTES:
                self._disarm()
                if not self.transport.is_closing():
                    path = _target(getattr(self, "url", b""), data)  # set per request by uvicorn
                    self.transport.write(_TOO_LARGE[is_openai_dialect(path)])
                    self._linger()
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

    def _linger(self) -> None:
        """Close once the client has read the answer, not under it.

        Closed at once with the rest of its headers still coming, the
        connection is reset, and the client may lose the 431 before it reads
        it (seen in one test run of three). So, as nginx does: the answer
        and the end of what this side sends go out, what the client still
        sends is read and dropped (never kept), and the connection closes
        when the client closes its side, or after `LINGER` seconds.
        """
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)

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
