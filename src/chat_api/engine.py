"""The one chat engine both API dialects use.

A request goes: `prepare` (validate, pick the model, adapt it) → the meter's
`admit` (key limits and budget; reserve the worst case) → the provider → the
meter's `settle` (the ledger row, the real cost). The simple API and `/v1` are
thin adapters over `complete` and `stream`; neither can skip a step.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from chat_api.catalog import Catalog, ModelInfo
from chat_api.config import Settings
from chat_api.errors import BadRequest, NotConfigured, UpstreamError
from chat_api.meter import Admission, Caller, CallResult, Meter
from chat_api.providers.base import Completion, Provider, UpstreamStream
from chat_api.redact import redact
from chat_api.tokens import estimate_prompt_tokens, tokens_for_chars

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Request fields that would change where or as whom we call upstream.
FORBIDDEN_FIELDS = frozenset(
    {"api_key", "base_url", "api_base", "organization", "project", "headers", "extra_headers"}
)


@dataclass(slots=True)
class CallContext:
    """Who asked, through which endpoint, under which request id."""

    request_id: str
    endpoint: str
    caller: Caller | None = None
    headers: dict[str, str] = field(default_factory=dict)  # rate-limit headers for the answer
    result: CallResult | None = None  # set once the call is let through, for the log line


@dataclass(slots=True)
class Prepared:
    """A validated request, ready for the upstream."""

    model: ModelInfo
    body: dict[str, Any]
    stream: bool
    client_wants_usage: bool
    prompt_estimate: int
    max_tokens: int | None
    choices: int


@dataclass(slots=True)
class Chunk:
    """One streamed event: the bytes as received, and their parse."""

    raw: bytes
    data: dict[str, Any]
    is_usage_only: bool = False


@dataclass(slots=True)
class StreamStats:
    """What a stream relayed so far, for the ledger."""

    content_chars: int = 0
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    first_token_at: float | None = None
    upstream_request_id: str | None = None


class ChatEngine:
    """Validates, meters and forwards chat requests to the provider."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        provider: Provider | None,
        meter: Meter,
        streams_changed: Callable[[int], None] = lambda delta: None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.provider = provider
        self.meter = meter
        self.open_streams = 0
        self._streams_changed = streams_changed

    # --- validation -----------------------------------------------------------

    def prepare(self, body: dict[str, Any], *, caller: Caller | None = None) -> Prepared:
        """Check an OpenAI-shaped request body and adapt it for its model.

        Raises `BadRequest` (400) or `ModelNotAllowed` (400/404) before
        anything is sent upstream.
        """
        s = self.settings
        for name in FORBIDDEN_FIELDS.intersection(body):
            raise BadRequest(f"The field '{name}' cannot be set by clients.", param=name)
        model_name = body.get("model")
        if model_name is not None and not isinstance(model_name, str):
            raise BadRequest("'model' must be a string.", param="model")
        info = self.catalog.resolve(model_name)
        if caller is not None:
            caller.check_model(info.name)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of messages.", param="messages")
        if len(messages) > s.max_messages:
            raise BadRequest(
                f"Too many messages: at most {s.max_messages} are allowed.", param="messages"
            )
        for index, message in enumerate(messages):
            _check_message(message, index, s.max_message_chars)
        stream = False if body.get("stream") is None else body["stream"]  # null: false
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false.", param="stream")
        max_tokens = _positive_int(body, "max_completion_tokens", s.max_tokens_limit)
        if max_tokens is None:
            max_tokens = _positive_int(body, "max_tokens", s.max_tokens_limit)
        choices = _positive_int(body, "n", s.max_choices) or 1
        temperature = body.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            raise BadRequest("'temperature' must be a number from 0 to 2.", param="temperature")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object.", param="stream_options")
        wants_usage = bool(options and options.get("include_usage"))

        upstream = self.catalog.adapt(info, body)
        if upstream is body:
            upstream = dict(body)
        upstream["model"] = info.name
        if stream and info.streaming:
            # Always ask for usage, so the ledger is exact; clients that did
            # not ask never see the extra chunk.
            upstream["stream_options"] = {**(options or {}), "include_usage": True}
        else:
            upstream.pop("stream", None)
            upstream.pop("stream_options", None)
        return Prepared(
            model=info,
            body=upstream,
            stream=stream,
            client_wants_usage=wants_usage,
            prompt_estimate=estimate_prompt_tokens(messages),
            max_tokens=max_tokens,
            choices=choices,
        )

    # --- calls ------------------------------------------------------------------

    def _provider(self) -> Provider:
        if self.provider is None:
            raise NotConfigured()
        return self.provider

    async def complete(self, prepared: Prepared, ctx: CallContext) -> Completion:
        """One whole answer. Every call that reached the upstream is settled."""
        provider = self._provider()
        admission = await self.meter.admit(ctx, prepared)
        started = time.monotonic()
        result = ctx.result = CallResult.start(ctx, prepared, streamed=False)
        try:
            completion = await provider.complete(prepared.body, ctx.request_id)
        except BaseException as exc:
            result.fail(exc)
            raise
        else:
            result.upstream_request_id = completion.upstream_request_id
            result.use_usage(completion.data.get("usage"), estimate_completion=0)
            result.outcome = "ok"
            return completion
        finally:
            result.latency = time.monotonic() - started
            result.first_token = result.latency
            admission.settle(result)

    async def stream(self, prepared: Prepared, ctx: CallContext) -> AsyncIterator[Chunk]:
        """Open a streamed answer.

        Errors before the upstream answered (retries done) are raised here,
        so the caller can still answer with a status code. The returned
        iterator raises `ChatAPIError` for failures after that.
        """
        provider = self._provider()
        admission = await self.meter.admit(ctx, prepared)
        started = time.monotonic()
        result = ctx.result = CallResult.start(ctx, prepared, streamed=True)
        if prepared.model.streaming:
            try:
                upstream = await provider.open_stream(prepared.body, ctx.request_id)
            except BaseException as exc:
                result.fail(exc)
                result.latency = time.monotonic() - started
                admission.settle(result)
                raise
            if upstream.upstream_request_id:
                ctx.headers["X-Upstream-Request-ID"] = upstream.upstream_request_id
        else:
            upstream = _SingleChunkStream(provider, prepared, ctx.request_id)
        # Only what the relay needs: the request body (the whole conversation)
        # is not held for as long as the answer streams.
        return self._relay(upstream, prepared.client_wants_usage, admission, result, started)

    async def _relay(
        self,
        upstream: UpstreamStream,
        client_wants_usage: bool,
        admission: Admission,
        result: CallResult,
        started: float,
    ) -> AsyncIterator[Chunk]:
        stats = StreamStats(upstream_request_id=upstream.upstream_request_id)
        self.open_streams += 1
        self._streams_changed(1)
        try:
            async for raw in upstream:
                chunk = _parse_chunk(raw)
                _observe(chunk, stats)
                if stats.first_token_at is None:
                    stats.first_token_at = time.monotonic()
                if not chunk.is_usage_only or client_wants_usage:
                    yield chunk
                del raw, chunk  # not held while the next event is awaited: thousands wait at once
            if not upstream.saw_done and stats.finish_reason is None:
                raise UpstreamError("The answer was cut off: the connection to OpenAI ended early.")
            result.outcome = "ok"
        except BaseException as exc:
            result.fail(exc)
            raise
        finally:
            self.open_streams -= 1
            self._streams_changed(-1)
            await upstream.aclose()
            result.upstream_request_id = upstream.upstream_request_id
            result.latency = time.monotonic() - started
            if stats.first_token_at is not None:
                result.first_token = stats.first_token_at - started
            result.use_usage(stats.usage, estimate_completion=tokens_for_chars(stats.content_chars))
            admission.settle(result)


def _parse_chunk(raw: bytes) -> Chunk:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("OpenAI sent a broken event; the answer stopped.") from None
    if not isinstance(data, dict):
        raise UpstreamError("OpenAI sent a broken event; the answer stopped.")
    error = data.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else None
        raise UpstreamError(
            f"OpenAI stopped the answer: {redact(str(message))}"
            if message
            else "OpenAI stopped the answer."
        )
    return Chunk(raw, data, is_usage_only=not data.get("choices") and bool(data.get("usage")))


def _observe(chunk: Chunk, stats: StreamStats) -> None:
    data = chunk.data
    usage = data.get("usage")
    if usage:
        stats.usage = usage
    for choice in data.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            stats.content_chars += len(content)
        for call in delta.get("tool_calls") or ():
            arguments = (call.get("function") or {}).get("arguments")
            if arguments:
                stats.content_chars += len(arguments)
        if choice.get("finish_reason"):
            stats.finish_reason = choice["finish_reason"]


def _check_message(message: Any, index: int, max_chars: int) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRequest(f"'{where}' must be an object with 'role' and 'content'.", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:  # a dict or list role is unhashable
        raise BadRequest(
            f"'{where}.role' must be one of: system, developer, user, assistant, tool.",
            param=f"{where}.role",
        )
    content = message.get("content")
    if content is None:
        calls = message.get("tool_calls")
        if role in ("assistant", "function") or (isinstance(calls, list) and calls):
            return
        raise BadRequest(f"'{where}.content' is required.", param=f"{where}.content")
    if isinstance(content, str):
        size = len(content)
    elif isinstance(content, list):
        size = sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
        if not all(isinstance(part, dict) for part in content):
            raise BadRequest(f"'{where}.content' parts must be objects.", param=f"{where}.content")
    else:
        raise BadRequest(
            f"'{where}.content' must be a string or a list of parts.", param=f"{where}.content"
        )
    if size > max_chars:
        raise BadRequest(
            f"'{where}.content' is too long: at most {max_chars} characters are allowed.",
            param=f"{where}.content",
        )


def _positive_int(body: dict[str, Any], name: str, ceiling: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON does not tell 1 from 1.0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{name}' must be a whole number of at least 1.", param=name)
    if value > ceiling:
        raise BadRequest(f"'{name}' is too large: at most {ceiling} is allowed.", param=name)
    return value


class _SingleChunkStream:
    """A whole answer presented as a stream of one chunk, for models that cannot stream."""

    def __init__(self, provider: Provider, prepared: Prepared, request_id: str) -> None:
        self._provider = provider
        self._prepared = prepared
        self._request_id = request_id
        self.upstream_request_id: str | None = None
        self.saw_done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        completion = await self._provider.complete(self._prepared.body, self._request_id)
        self.upstream_request_id = completion.upstream_request_id
        data = completion.data
        head = {
            "id": data.get("id"),
            "object": "chat.completion.chunk",
            "created": data.get("created"),
            "model": data.get("model"),
            "system_fingerprint": data.get("system_fingerprint"),
        }
        choices = []
        for choice in data.get("choices") or ():
            message = dict(choice.get("message") or {})
            calls = message.get("tool_calls")
            if calls:
                message["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            choices.append(
                {
                    "index": choice.get("index", 0),
                    "delta": message,
                    "logprobs": choice.get("logprobs"),
                    "finish_reason": choice.get("finish_reason"),
                }
            )
        yield orjson.dumps({**head, "choices": choices})
        if data.get("usage"):
            yield orjson.dumps({**head, "choices": [], "usage": data["usage"]})
        self.saw_done = True

    async def aclose(self) -> None:
        return None
