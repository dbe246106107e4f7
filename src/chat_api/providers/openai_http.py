"""OpenAI (or any compatible server) over aiohttp: the gateway's fast path.

The official SDK builds option models, copies them and runs a pure-Python
HTTP stack for every call: about 1.2-1.7 ms of CPU per request on this
project's benchmark machine, more than the whole latency budget of the
gateway. aiohttp's C-accelerated client does the same call in about
0.3 ms. So this provider speaks the one endpoint the gateway needs,
`POST /chat/completions`, directly, and keeps the SDK's behaviour: bearer
auth, retries with exponential backoff and jitter (honouring Retry-After
up to two minutes) on connection errors, 408/409/429 and 5xx, only before
any byte was read, except a 429 that says the account is out of credit; a
short connect timeout and a read timeout of `CHAT_API_UPSTREAM_TIMEOUT`.
Unlike the SDK, a request that was sent and timed out is not sent again:
OpenAI may be writing (and billing) its answer still.
`CHAT_API_UPSTREAM_CLIENT=sdk` switches back to the official `AsyncOpenAI`
client (`providers/openai_sdk.py`).
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from chat_api import __version__
from chat_api.config import Settings
from chat_api.errors import (
    UpstreamError,
    UpstreamTimeout,
    final,
    from_status,
    from_upstream,
    is_out_of_quota,
)
from chat_api.providers.base import (
    Completion,
    ReadingStream,
    header_seconds,
    read_capped,
    retry_after_for_client,
    upstream_request_id,
)

OPENAI_BASE_URL = "https://api.openai.com/v1"
MAX_BODY_BYTES = 32 * 1024 * 1024  # a whole answer larger than this is not an answer
MAX_ERROR_BYTES = 64 * 1024
LARGE_BODY_BYTES = 1024 * 1024  # aiohttp's own threshold for "too large to write at once"
RETRY_STATUSES = frozenset({408, 409, 429})
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 120.0
MAX_CACHED_URLS = 64  # parsed paths kept: the operations' own, and recent ones with ids

# What aiohttp raises when the upstream cannot be reached or breaks off.
CONNECTION_ERRORS = (aiohttp.ClientError, OSError)


class OpenAIHTTPProvider:
    """Calls the configured upstream with the operator's key, through aiohttp."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        assert settings.openai_api_key is not None
        self._base = (settings.openai_base_url or OPENAI_BASE_URL).rstrip("/")
        self._urls: dict[str, URL] = {}  # each operation's URL, parsed once, not per call
        self._headers = {
            "Authorization": "Bearer " + settings.openai_api_key.get_secret_value(),
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "User-Agent": f"chat-api/{__version__}",
        }
        self._retries = settings.upstream_retries
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.upstream_timeout
        )
        self._max_connections = settings.upstream_max_connections
        self._deadline = settings.stream_deadline
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made inside the running loop, on first use
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, keepalive_timeout=30
            )
            # No cookie jar: cookies set by the upstream must never travel
            # from one client's call to another's. No trust_env: it looks up
            # .netrc and proxy variables in a thread on every request; the
            # proxy (HTTPS_PROXY and friends) is looked up once, here.
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            try:
                self._proxy, self._proxy_auth = get_env_proxy_for_url(URL(self._base))
            except LookupError:
                self._proxy, self._proxy_auth = None, None
        return self._session

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= MAX_CACHED_URLS:  # paths with ids in them: never held long
                self._urls.clear()
            url = self._urls[path] = URL(self._base + path)
        return url

    async def complete(
        self, path: str, body: dict[str, Any] | None, request_id: str, *, method: str = "POST"
    ) -> Completion:
        response = await self._post(path, body, request_id, method=method)
        try:
            raw = await read_capped(
                response.content.iter_any(), response.content_length, MAX_BODY_BYTES
            )
        except TimeoutError:
            raise UpstreamTimeout() from None
        except CONNECTION_ERRORS as exc:
            raise from_upstream(exc) from None
        finally:
            response.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("OpenAI sent an answer that is not valid JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamError("OpenAI sent an answer that is not a JSON object.")
        return Completion(raw, data, upstream_request_id(response.headers.get("x-request-id")))

    async def open_stream(self, path: str, body: dict[str, Any], request_id: str) -> _HTTPStream:
        response = await self._post(path, body, request_id)
        return _HTTPStream(response, asyncio.get_running_loop().time() + self._deadline)

    async def forward(
        self, method: str, path: str, body: dict[str, Any] | None, request_id: str
    ) -> Completion:
        return await self.complete(path, body, request_id, method=method)

    async def open_replay(self, path: str, request_id: str) -> _HTTPStream:
        response = await self._post(path, None, request_id, method="GET")
        return _HTTPStream(response, asyncio.get_running_loop().time() + self._deadline)

    async def _post(
        self, path: str, body: dict[str, Any] | None, request_id: str, *, method: str = "POST"
    ) -> aiohttp.ClientResponse:
        """Send, retrying before any byte of an answer was read; a 200 response, unread."""
        payload = None if body is None else orjson.dumps(body)
        headers = {"X-Request-ID": request_id}
        session = self._client()
        url = self._url(path)
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                response = await session.request(
                    method,
                    url,
                    data=None if payload is None else _body(payload),
                    headers=headers,
                    proxy=self._proxy,
                    proxy_auth=self._proxy_auth,
                )
            except aiohttp.ConnectionTimeoutError:
                if last:  # never connected: nothing was sent, nothing billed
                    raise final(UpstreamTimeout(sent=False), retried=attempt > 0) from None
                await asyncio.sleep(_backoff(attempt, None))
                continue
            except TimeoutError:
                # Sent, and no answer in time: OpenAI may still write and bill it, so it
                # is not sent again, and the SDKs are told not to either.
                raise final(UpstreamTimeout(), retried=True) from None
            except CONNECTION_ERRORS as exc:
                if last:
                    raise from_upstream(exc, retried=attempt > 0) from None
                await asyncio.sleep(_backoff(attempt, None))
                continue
            if response.status == 200:
                return response
            try:
                detail = await read_capped(
                    response.content.iter_any(), response.content_length, MAX_ERROR_BYTES
                )
            except (TimeoutError, *CONNECTION_ERRORS):
                detail = b""
            finally:
                response.release()
            wait = _retry_after(response.headers)
            error = _json_or_none(detail)
            retryable = response.status in RETRY_STATUSES or response.status >= 500
            if response.status == 429 and is_out_of_quota(error):
                retryable = False  # no credit left: waiting changes nothing
            too_long = wait is not None and wait > MAX_RETRY_AFTER
            if retryable and not last and not too_long:
                await asyncio.sleep(_backoff(attempt, wait))
                continue
            told = retry_after_for_client(response.headers)
            raise from_status(response.status, error, told, retried=attempt > 0)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _HTTPStream(ReadingStream):
    """The SSE body of one upstream answer, read as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse, deadline: float) -> None:
        super().__init__(response.headers.get("x-request-id"), deadline)
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for payload in self._reader.payloads(self._response.content.iter_any()):
                yield payload
        except TimeoutError:
            raise UpstreamTimeout("OpenAI went silent in the middle of the answer.") from None
        except CONNECTION_ERRORS as exc:
            raise from_upstream(exc) from None

    async def aclose(self) -> None:
        if self.saw_done:
            self._response.release()  # finished cleanly: the connection can be reused
        else:
            self._response.close()  # cut short: close the socket so the upstream stops


def _body(payload: bytes) -> bytes | io.BytesIO:
    """What aiohttp sends: large bodies (images inline) as a stream it writes in pieces.

    aiohttp warns that one large bytes write might block the event loop; a
    fresh stream per attempt, since a retry reads it again.
    """
    return payload if len(payload) <= LARGE_BODY_BYTES else io.BytesIO(payload)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """How long the upstream asks us to wait: `retry-after-ms` first, as the SDK reads it."""
    milliseconds = header_seconds(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    return header_seconds(headers.get("retry-after"))


def _backoff(attempt: int, retry_after: float | None) -> float:
    """The SDK's schedule: the server's Retry-After if sane, else 0.5 s doubling, with jitter."""
    if retry_after is not None and 0 < retry_after <= MAX_RETRY_AFTER:
        return retry_after
    delay = min(INITIAL_RETRY_DELAY * 2.0**attempt, MAX_RETRY_DELAY)
    return delay * (1 - 0.25 * random.random())


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
