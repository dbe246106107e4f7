"""OpenAI, or any server that speaks its chat-completions API, through the official SDK.

One `AsyncOpenAI` client is shared by every request. We ask it for the raw
HTTP response (`cast_to=httpx2.Response`) so answers are relayed as the bytes
OpenAI sent, with no model objects built per chunk; the SDK still does what
it is good at: auth, retries with backoff before any byte is read, timeouts.
Three things it is told: a request that was sent and timed out is not sent
again (`_SentIsFinal`: OpenAI may be billing its answer still), a 429 that
says the account is out of credit is not retried
(`_no_retry_without_credit`), and after its retries the client is told not
to retry again (`final`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import orjson
from openai._constants import RAW_RESPONSE_HEADER

from chat_api.config import Settings
from chat_api.errors import (
    CONNECT_FAILED,
    ChatAPIError,
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
    read_capped,
    retry_after_for_client,
    upstream_request_id,
)

MAX_BODY_BYTES = 32 * 1024 * 1024  # a whole answer larger than this is not an answer
MAX_ERROR_BYTES = 64 * 1024


class OpenAISDKProvider:
    """Calls the configured upstream with the operator's key."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        assert settings.openai_api_key is not None
        timeout = httpx2.Timeout(settings.upstream_timeout, connect=settings.connect_timeout)
        limits = httpx2.Limits(
            max_connections=settings.upstream_max_connections,
            max_keepalive_connections=min(settings.upstream_max_connections, 1000),
            keepalive_expiry=30,
        )
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            max_retries=settings.upstream_retries,
            timeout=timeout,
            http_client=_SentIsFinal(
                timeout=timeout,
                limits=limits,
                event_hooks={"response": [_no_retry_without_credit]},
            ),
        )
        self._deadline = settings.stream_deadline

    async def complete(
        self, path: str, body: dict[str, Any] | None, request_id: str, *, method: str = "POST"
    ) -> Completion:
        response = await self._post(path, body, request_id, stream=True, method=method)
        try:
            length = response.headers.get("content-length", "")
            declared = int(length) if length.isdigit() else None
            raw = await read_capped(response.aiter_bytes(), declared, MAX_BODY_BYTES)
        except httpx2.HTTPError as exc:
            raise _from_sdk(exc) from None
        finally:
            await response.aclose()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("OpenAI sent an answer that is not valid JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamError("OpenAI sent an answer that is not a JSON object.")
        return Completion(raw, data, upstream_request_id(response.headers.get("x-request-id")))

    async def open_stream(self, path: str, body: dict[str, Any], request_id: str) -> _SDKStream:
        response = await self._post(path, body, request_id, stream=True)
        return _SDKStream(response, asyncio.get_running_loop().time() + self._deadline)

    async def forward(
        self, method: str, path: str, body: dict[str, Any] | None, request_id: str
    ) -> Completion:
        return await self.complete(path, body, request_id, method=method)

    async def open_replay(self, path: str, request_id: str) -> _SDKStream:
        response = await self._post(path, None, request_id, stream=True, method="GET")
        return _SDKStream(response, asyncio.get_running_loop().time() + self._deadline)

    async def _post(
        self,
        path: str,
        body: dict[str, Any] | None,
        request_id: str,
        *,
        stream: bool,
        method: str = "POST",
    ) -> httpx2.Response:
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
        if stream:
            headers[RAW_RESPONSE_HEADER] = "stream"  # hand back the response unread
        try:
            if method == "POST":
                return await self._client.post(
                    path,
                    cast_to=httpx2.Response,
                    content=orjson.dumps(body),
                    options={"headers": headers},
                )
            if method == "DELETE":
                return await self._client.delete(
                    path, cast_to=httpx2.Response, options={"headers": headers}
                )
            return await self._client.get(
                path, cast_to=httpx2.Response, options={"headers": headers}
            )
        except openai.OpenAIError as exc:
            raise _from_sdk(exc) from None

    async def aclose(self) -> None:
        await self._client.close()


class _SDKStream(ReadingStream):
    """The SSE body of one upstream answer, read as it arrives."""

    def __init__(self, response: httpx2.Response, deadline: float) -> None:
        super().__init__(response.headers.get("x-request-id"), deadline)
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for payload in self._reader.payloads(self._response.aiter_bytes()):
                yield payload
        except httpx2.HTTPError as exc:
            raise _from_sdk(exc) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class _SentIsFinal(openai.DefaultAsyncHttpxClient):
    """The SDK's client, except that a request sent and not answered in time is not sent again.

    The SDK retries every timeout; one after the request went out may still be
    written, and billed, by OpenAI: a retry would be a second bill that no
    ledger row shows. The SDK passes its own errors on without retrying.
    """

    async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        try:
            return await super().send(request, **kwargs)
        except (httpx2.ReadTimeout, httpx2.WriteTimeout) as exc:
            raise openai.APITimeoutError(request=request) from exc


async def _no_retry_without_credit(response: httpx2.Response) -> None:
    """Mark a 429 "insufficient_quota" as final before the SDK decides to retry it.

    The SDK retries every 429; one that says the operator's account has no
    credit left only repeats itself (the SDK then gave up after 44 s). The SDK
    reads an error body anyway; this reads it a moment earlier.
    """
    if response.status_code != 429:
        return
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_ERROR_BYTES:
        return
    await response.aread()
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return
    if is_out_of_quota(body):
        response.headers.update(ChatAPIError.DO_NOT_RETRY)


def _retried(request: httpx2.Request | None) -> bool:
    """Whether the SDK's last attempt was a retry (it numbers them in a header)."""
    count = request.headers.get("x-stainless-retry-count", "0") if request is not None else "0"
    return count.isdigit() and int(count) > 0


def _from_sdk(exc: BaseException) -> ChatAPIError:
    """The SDK's exceptions (and its HTTP client's) in our tree."""
    if isinstance(exc, openai.APIStatusError):
        return from_status(
            exc.status_code,
            exc.body,
            retry_after_for_client(exc.response.headers),
            retried=_retried(exc.response.request),
        )
    request = exc.request if isinstance(exc, openai.APIConnectionError) else None
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        cause = exc.__cause__ if isinstance(exc, openai.APITimeoutError) else exc
        sent = not isinstance(cause, httpx2.ConnectTimeout | httpx2.PoolTimeout)
        # Sent: OpenAI may still bill it, so the SDKs are told not to send it again.
        return final(UpstreamTimeout(sent=sent), retried=sent or _retried(request))
    if isinstance(exc, openai.APIConnectionError):
        return final(UpstreamError(CONNECT_FAILED), retried=_retried(request))
    return from_upstream(exc)
