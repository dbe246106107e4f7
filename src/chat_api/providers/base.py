"""The interface every provider offers the engine.

A provider speaks OpenAI's wire format: it takes the API path of an
operation (`/chat/completions`, `/responses`, `/embeddings`) and a request
body (a dict), and gives back raw JSON bytes, so the gateway can relay what
it receives without rebuilding it.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from chat_api.errors import UpstreamError
from chat_api.redact import contains_secret
from chat_api.sse import EventReader


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) answer: the bytes as received, and their parse."""

    raw: bytes
    data: dict[str, Any]
    upstream_request_id: str | None = None


class UpstreamStream(Protocol):
    """An open streamed answer.

    Iterating yields each event's `data` payload (JSON bytes) and stops at
    `[DONE]`; `saw_done` tells whether that marker arrived. `aclose` closes
    the upstream connection at once; it is safe to call twice.
    """

    upstream_request_id: str | None

    @property
    def saw_done(self) -> bool: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    """A source of chat completions."""

    name: str

    async def complete(self, path: str, body: dict[str, Any], request_id: str) -> Completion:
        """One whole answer from `POST <base><path>`. Raises `ChatAPIError` subclasses."""
        ...

    async def open_stream(self, path: str, body: dict[str, Any], request_id: str) -> UpstreamStream:
        """Start a streamed answer; returns once the upstream has answered with 200."""
        ...

    async def forward(
        self, method: str, path: str, body: dict[str, Any] | None, request_id: str
    ) -> Completion:
        """Any other call (`GET /responses/{id}`, `DELETE …`, conversations): its JSON answer.

        `path` may carry a query string. Non-200 answers raise as for `complete`.
        """
        ...

    async def open_replay(self, path: str, request_id: str) -> UpstreamStream:
        """`GET <path>` answered as a stream (a stored response resumed)."""
        ...

    async def aclose(self) -> None:
        """Release connections at shutdown."""
        ...


async def read_capped(chunks: AsyncIterator[bytes], declared: int | None, limit: int) -> bytes:
    """A whole upstream body, refused as soon as it is known to pass `limit` bytes."""
    if declared is not None and declared > limit:
        raise UpstreamError("OpenAI sent an answer that is too large to relay.")
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UpstreamError("OpenAI sent an answer that is too large to relay.")
        parts.append(chunk)
    return b"".join(parts)


def header_seconds(value: str | None) -> float | None:
    """A number of seconds from a header such as Retry-After; None unless sane."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def retry_after_for_client(headers: Mapping[str, str]) -> float | None:
    """The wait the upstream asked for, to pass on: its `Retry-After`, else `retry-after-ms`.

    Never an invented one: without either, the client is told no time.
    """
    seconds = header_seconds(headers.get("retry-after"))
    if seconds is None:
        milliseconds = header_seconds(headers.get("retry-after-ms"))
        seconds = None if milliseconds is None else milliseconds / 1000
    return seconds


_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]{1,200}")


def upstream_request_id(value: str | None) -> str | None:
    """The upstream's `x-request-id`, if it is safe to relay, log and store; else None.

    It goes back to the client as a header, which must be latin-1 (anything else
    was a 500 after a billed call), and into the ledger: printable ASCII only,
    and never a secret the upstream echoed.
    """
    if value is None or not _PRINTABLE_ASCII.fullmatch(value) or contains_secret(value):
        return None
    return value


class ReadingStream:
    """What both upstream clients' streams share: the request id and the event reader."""

    def __init__(self, request_id: str | None, deadline: float) -> None:
        self._reader = EventReader(deadline)
        self.upstream_request_id = upstream_request_id(request_id)

    @property
    def saw_done(self) -> bool:
        return self._reader.saw_done
