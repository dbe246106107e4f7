"""One exception tree for everything a client can be told went wrong.

    ChatAPIError                    500 server_error
    ├── BadRequest                  400 invalid_request_error
    │   └── ModelNotAllowed         400 (simple API) / 404 (/v1) model_not_found
    ├── MethodNotAllowed            405 invalid_request_error
    ├── RequestTimeout              408 invalid_request_error
    ├── PayloadTooLarge             413 invalid_request_error
    ├── Unauthorized                401 invalid_api_key
    ├── Forbidden                   403 permission_denied
    ├── NotFound                    404 not_found
    ├── RateLimited                 429 rate_limit_exceeded (+ Retry-After when waiting helps)
    ├── ServiceUnavailable          503 service_unavailable (+ Retry-After when known)
    │   └── NotConfigured           503 no OpenAI key and no demo mode
    ├── UpstreamError               502 upstream_error
    └── UpstreamTimeout             504 upstream_timeout

Each class carries its HTTP status and its OpenAI `type`/`code`. Routes raise
them; `render` turns one into the simple-API body (`{"error": "..."}`) or the
OpenAI body (`{"error": {"message", "type", "param", "code"}}`), chosen by the
path. `from_upstream` and `from_status` translate what the upstream call
raised or answered. Messages are written for people and never carry a key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

import aiohttp
import orjson

from chat_api.redact import redact


class ChatAPIError(Exception):
    """Base of every error a client sees."""

    status: ClassVar[int] = 500
    v1_status: ClassVar[int | None] = None
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers: dict[str, str] = dict(headers or {})

    def status_for(self, openai_dialect: bool) -> int:
        if openai_dialect and self.v1_status is not None:
            return self.v1_status
        return self.status

    def body(self, openai_dialect: bool) -> bytes:
        if openai_dialect:
            return orjson.dumps(
                {
                    "error": {
                        "message": self.message,
                        "type": self.type,
                        "param": self.param,
                        "code": self.code,
                    }
                }
            )
        return orjson.dumps({"error": self.message})


class BadRequest(ChatAPIError):
    status = 400
    type = "invalid_request_error"


class ModelNotAllowed(BadRequest):
    v1_status = 404
    default_code = "model_not_found"

    def __init__(self, model: str, allowed: tuple[str, ...]) -> None:
        super().__init__(
            f"The model '{model}' is not available here. Choose one of: {', '.join(allowed)}.",
            param="model",
        )


class MethodNotAllowed(ChatAPIError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeout(ChatAPIError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"

    def __init__(self, seconds: float) -> None:
        # Close the connection: kept alive, the rest of the slow body would still be read
        # (each byte resetting the keep-alive timer), and the deadline would be no deadline.
        super().__init__(
            f"The request body did not arrive within {seconds:g} seconds. Send it again.",
            headers={"Connection": "close"},
        )


class PayloadTooLarge(ChatAPIError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than the {limit}-byte limit. Send a shorter request."
        )


class Unauthorized(ChatAPIError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__(
            "A valid API key is required. Send it as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )


class Forbidden(ChatAPIError):
    status = 403
    type = "permission_denied"
    default_code = "permission_denied"


class NotFound(ChatAPIError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class RateLimited(ChatAPIError):
    status = 429
    type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        """`retry_after=None`: waiting will not help (a budget that never renews), so no
        Retry-After, and SDKs are told not to retry (`x-should-retry: false`)."""
        seconds = None if retry_after is None else max(1, int(retry_after + 0.999))
        wait = {"x-should-retry": "false"} if seconds is None else {"Retry-After": str(seconds)}
        super().__init__(message, code=code, headers={**(headers or {}), **wait})
        self.retry_after = seconds


class ServiceUnavailable(ChatAPIError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class NotConfigured(ServiceUnavailable):
    default_code = "no_api_key"

    def __init__(self) -> None:
        super().__init__(
            "No OpenAI key is set on the server. Set OPENAI_API_KEY_CYB_SEC "
            "(or OPENAI_API_KEY), or start with CHAT_API_DEMO=1 to try the demo model."
        )


class UpstreamError(ChatAPIError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class UpstreamTimeout(ChatAPIError):
    status = 504
    type = "upstream_timeout"
    default_code = "upstream_timeout"

    def __init__(self, message: str = "OpenAI did not answer in time. Try again.") -> None:
        super().__init__(message)


CONNECT_FAILED = "Could not reach OpenAI: the connection failed. Try again."


def from_upstream(exc: BaseException) -> ChatAPIError:
    """Translate an exception from the upstream call (after retries) into our tree.

    Covers aiohttp's exceptions and the standard library's; the SDK provider
    translates the SDK's own first (so nothing else loads the SDK). Status
    answers go through `from_status`.
    """
    if isinstance(exc, ChatAPIError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout()
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(CONNECT_FAILED)
    return UpstreamError("The connection to OpenAI broke. Try again.")


def from_status(status: int, body: Any, retry_after: float | None) -> ChatAPIError:
    """The error for an upstream answer with a non-200 status.

    The upstream's own message is passed on only for 400-class answers about
    the request itself; OpenAI masks keys in it, and we scrub anything that
    still looks like one.
    """
    if status in (401, 403):
        return UpstreamError(
            "OpenAI rejected the server's key. The operator needs to check it.",
            code="upstream_auth",
        )
    if status == 429:
        return RateLimited(
            "OpenAI is rate-limiting this server. Try again shortly.",
            retry_after=20.0 if retry_after is None else retry_after,
            code="upstream_rate_limited",
        )
    if status == 404:
        return NotFound(_upstream_message(body, "OpenAI does not know that model."))
    if 400 <= status < 500:
        return BadRequest(
            _upstream_message(body, "OpenAI rejected the request."),
            param=_upstream_field(body, "param"),
            code=_upstream_field(body, "code"),
        )
    return UpstreamError(f"OpenAI had a problem (status {status}). Try again.")


def _upstream_field(body: Any, name: str) -> str | None:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            value = inner.get(name)
            return str(value) if value is not None else None
    return None


def _upstream_message(body: Any, fallback: str) -> str:
    message = _upstream_field(body, "message")
    return redact(message) if message else fallback


def outcome_of(exc: BaseException) -> str:
    """The ledger's word for how a call that raised `exc` ended."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "client_closed"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, ChatAPIError):
        return "upstream_error"
    return "error"
