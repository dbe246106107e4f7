"""One exception tree for everything a client can be told went wrong.

    ChatAPIError                    500 server_error
    ├── BadRequest                  400 invalid_request_error, invalid_value (or a closer code)
    │   └── ModelNotAllowed         400 (simple API) / 404 (/v1) model_not_found
    ├── MethodNotAllowed            405 invalid_request_error
    ├── RequestTimeout              408 invalid_request_error
    ├── PayloadTooLarge             413 invalid_request_error
    ├── Unauthorized                401 invalid_api_key
    ├── Forbidden                   403 permission_denied
    ├── NotFound                    404 not_found (model_not_found from the upstream)
    ├── RateLimited                 429 requests|tokens rate_limit_exceeded,
    │                                   insufficient_quota insufficient_quota
    │                                   (+ Retry-After when waiting helps)
    ├── ServiceUnavailable          503 service_unavailable (+ Retry-After when known)
    │   ├── NotConfigured           503 no OpenAI key and no demo mode
    │   ├── ChangeNotAnnounced      503 a key changed, but Redis could not tell the replicas
    │   └── ServerStopping          503 server_stopping: shut down before the answer was ready
    ├── UpstreamError               502 upstream_error
    └── UpstreamTimeout             504 upstream_timeout

Each class carries its HTTP status and its OpenAI `type`/`code`, as OpenAI
spells them where it has the case. Routes raise them; `body` renders the
simple-API body (`{"error": "..."}`) or the OpenAI body (`{"error": {"message",
"type", "param", "code"}}`), chosen by the path. `from_upstream` and
`from_status` translate what the upstream call raised or answered; `final`
marks an error the gateway already retried (`x-should-retry: false`), so the
SDKs do not multiply the retries. Messages are written for people and never
carry a key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import aiohttp
import orjson

from chat_api.redact import redact


class ChatAPIError(Exception):
    """Base of every error a client sees."""

    status: ClassVar[int] = 500
    v1_status: ClassVar[int | None] = None
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    DO_NOT_RETRY: ClassVar[dict[str, str]] = {"x-should-retry": "false"}  # read by the SDKs

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
        self.error_type: str = self.type  # the OpenAI `type`; a rate limit says which one
        self.reason: str | None = self.code  # the label of a refusal in the metrics

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
                        "type": self.error_type,
                        "param": self.param,
                        "code": self.code,
                    }
                }
            )
        return orjson.dumps({"error": self.message})


class BadRequest(ChatAPIError):
    """A request the gateway will not send. Raise sites name a closer code where OpenAI has one
    (`invalid_json`, `invalid_type`, `missing_required_parameter`, `unsupported_parameter`)."""

    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"


class ModelNotAllowed(BadRequest):
    v1_status = 404
    default_code = "model_not_found"

    def __init__(self, model: str, allowed: tuple[str, ...]) -> None:
        # The name is the client's: a key sent as a model is not echoed back.
        super().__init__(
            f"The model '{redact(model)}' is not available here. "
            f"Choose one of: {', '.join(allowed)}.",
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


RateKind = Literal["requests", "tokens", "insufficient_quota"]


class RateLimited(ChatAPIError):
    """429. `kind` is OpenAI's `type`: `requests` or `tokens` for a rate limit (code
    `rate_limit_exceeded`), `insufficient_quota` for money (a budget, or the operator's
    OpenAI credit). `Retry-After` only when waiting is known to help."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        kind: RateKind = "requests",
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
        reason: str | None = None,
    ) -> None:
        """`retry_after=None`: no wait is known to help (a budget that never renews, no
        credit left), so no Retry-After, and SDKs are told not to retry."""
        if code == "insufficient_quota":
            kind = "insufficient_quota"
        elif kind == "insufficient_quota":
            code = "insufficient_quota"
        seconds = None if retry_after is None else max(1, int(retry_after + 0.999))
        wait = dict(self.DO_NOT_RETRY) if seconds is None else {"Retry-After": str(seconds)}
        super().__init__(message, code=code, headers={**(headers or {}), **wait})
        self.retry_after = seconds
        self.error_type = kind
        self.reason = reason or self.code


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


class ChangeNotAnnounced(ServiceUnavailable):
    default_code = "change_not_announced"

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"Key {key_id} is revoked, but the other replicas could not be told at once "
            "(Redis is away): they refuse it within a minute. Revoke it again to tell them now.",
            headers={"Retry-After": "5"},
        )


SHUTDOWN_MESSAGE = "The server is restarting and had to stop this answer. Please send it again."


class ServerStopping(ServiceUnavailable):
    """The server stopped (its shutdown grace ran out) before the answer was ready."""

    default_code = "server_stopping"

    def __init__(self) -> None:
        # Another replica (or this one, restarted) takes the request at once.
        super().__init__(SHUTDOWN_MESSAGE, headers={"Retry-After": "1"})


class UpstreamError(ChatAPIError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class UpstreamTimeout(ChatAPIError):
    status = 504
    type = "upstream_timeout"
    default_code = "upstream_timeout"

    def __init__(
        self, message: str = "OpenAI did not answer in time. Try again.", *, sent: bool = True
    ) -> None:
        super().__init__(message)
        # The request reached OpenAI, which may still write (and bill) the whole answer;
        # False: the connection was never made, nothing was sent.
        self.sent = sent


CONNECT_FAILED = "Could not reach OpenAI: the connection failed. Try again."


def final(error: ChatAPIError, *, retried: bool) -> ChatAPIError:
    """`error`, marked for the SDKs as not worth retrying when the gateway already retried.

    An SDK retries 429 and 5xx answers itself (openai-python and openai-node twice by
    default): on top of the gateway's own retries that made up to 9 upstream calls for
    one SDK call. Once the gateway has retried, it says `x-should-retry: false`.
    """
    if retried:
        error.headers.update(ChatAPIError.DO_NOT_RETRY)
    return error


def from_upstream(exc: BaseException, *, retried: bool = False) -> ChatAPIError:
    """Translate an exception from the upstream call (after retries) into our tree.

    Covers aiohttp's exceptions and the standard library's; the SDK provider
    translates the SDK's own first (so nothing else loads the SDK). Status
    answers go through `from_status`.
    """
    if isinstance(exc, ChatAPIError):
        return final(exc, retried=retried)
    if isinstance(exc, TimeoutError):
        return final(UpstreamTimeout(), retried=retried)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return final(UpstreamError(CONNECT_FAILED), retried=retried)
    return final(UpstreamError("The connection to OpenAI broke. Try again."), retried=retried)


def is_out_of_quota(body: Any) -> bool:
    """Whether an upstream 429 says the operator's account is out of credit (no wait helps)."""
    return "insufficient_quota" in (_upstream_field(body, "code"), _upstream_field(body, "type"))


def from_status(
    status: int, body: Any, retry_after: float | None, *, retried: bool = False
) -> ChatAPIError:
    """The error for an upstream answer with a non-200 status, as OpenAI would say it.

    The upstream's own message is passed on only for 400-class answers about
    the request itself; OpenAI masks keys in it, and we scrub anything that
    is or looks like one, in `param` and `code` too. Answers that no retry can
    change (a bad operator key, no credit left) say `x-should-retry: false`
    even when the gateway did not retry them.
    """
    if status == 401:
        error: ChatAPIError = UpstreamError(
            "OpenAI rejected the server's key. The operator needs to check it.",
            code="upstream_auth",
        )
        return final(error, retried=True)
    if status == 403:
        return Forbidden(
            "OpenAI does not allow this server's account to use this model or feature. "
            "Choose another model, or ask the operator to enable it."
        )
    if status == 429 and is_out_of_quota(body):
        error = RateLimited(
            "The server's OpenAI account has run out of credit. "
            "The operator needs to add credit or raise its spending limit.",
            retry_after=None,
            kind="insufficient_quota",
            reason="upstream_insufficient_quota",
        )
        return final(error, retried=True)
    if status == 429:
        kind = _upstream_field(body, "type")
        error = RateLimited(
            "OpenAI is rate-limiting this server. Try again shortly.",
            retry_after=retry_after,
            kind="tokens" if kind == "tokens" else "requests",
            reason="upstream_rate_limited",
        )
    elif status == 404:
        code = _upstream_field(body, "code")
        param = _upstream_field(body, "param")
        error = NotFound(
            _upstream_message(body, "OpenAI does not know that model."),
            param=param or ("model" if code == "model_not_found" else None),
            code=code,
        )
    elif 400 <= status < 500:
        error = BadRequest(
            _upstream_message(body, "OpenAI rejected the request."),
            param=_upstream_field(body, "param"),
            code=_upstream_field(body, "code"),
        )
    else:
        error = UpstreamError(f"OpenAI had a problem (status {status}). Try again.")
    return final(error, retried=retried)


def _upstream_field(body: Any, name: str) -> str | None:
    """A field of the upstream's error object, scrubbed of keys, at most 200 characters."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            value = inner.get(name)
            return redact(str(value)[:200]) if value is not None else None
    return None


def _upstream_message(body: Any, fallback: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("error", body), dict):
        message = body.get("error", body).get("message")
        if message is not None:
            return redact(str(message))
    return fallback


# The message our disconnect watchers cancel a call with (sse.py, http_responses.py). Any other
# cancellation of a call is the server stopping it: its shutdown grace ran out.
CLIENT_LEFT = "the client disconnected"


def outcome_of(exc: BaseException) -> str:
    """The ledger's word for how a call that raised `exc` ended."""
    if isinstance(exc, asyncio.CancelledError):
        return "client_closed" if exc.args[:1] == (CLIENT_LEFT,) else "server_stopped"
    if isinstance(exc, GeneratorExit):  # a stream closed while it waited for its client
        return "client_closed"
    if isinstance(exc, ServerStopping):
        return "server_stopped"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, ChatAPIError):
        return "upstream_error"
    return "error"
