"""What an operation tells the engine about its kind of call.

The engine runs every operation the same way: admission (limits and the
worst-case reservation), the provider call, the relay of the answer, and
settlement (the ledger row at what the upstream billed). An operation only
says what differs: how a request is checked and bounded (`prepare`), where
it goes upstream, how usage is read from a whole answer and from stream
events, and when a stream is complete.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from chat_api.calls import Caller, Chunk, Prepared, StreamStats
from chat_api.errors import BadRequest, UpstreamError
from chat_api.redact import redact, relayable

if TYPE_CHECKING:
    from chat_api.catalog import Catalog, ModelInfo
    from chat_api.config import Settings

# Request fields that would change where or as whom we call upstream.
FORBIDDEN_FIELDS = frozenset(
    {"api_key", "base_url", "api_base", "organization", "project", "headers", "extra_headers"}
)
# service_tier values that cost more than the list price: refused for keys with a budget.
COSTLIER_TIERS = frozenset({"priority", "scale"})


class Operation:
    """One kind of metered call. Subclasses fill in what their kind needs."""

    name: ClassVar[str]
    upstream_path: ClassVar[str]
    # Does a stream end with `data: [DONE]` (chat), or with a final event (responses)?
    ends_with_done: ClassVar[bool] = True

    def __init__(
        self, settings: Settings, catalog: Catalog, *, field_policy: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        # `CHAT_API_FIELD_POLICY`, for the bodies clients write; the simple API writes its
        # own (and its `stream_options`), so its chat completion is given none.
        self.field_policy = settings.field_policy if field_policy is None else field_policy

    def prepare(self, body: dict[str, Any], caller: Caller | None) -> Prepared:
        """Check `body` and work out its worst case; `BadRequest` before anything is sent."""
        raise NotImplementedError

    def usage(self, data: dict[str, Any]) -> tuple[int, int] | None:
        """(prompt, completion) tokens from a whole answer, if it says."""
        raise NotImplementedError

    def observe(self, chunk: Chunk, stats: StreamStats, client_wants_usage: bool) -> None:
        """Note what a stream event says (usage, text written, the end); mark it not relayed."""
        raise NotImplementedError

    def pending(self, data: dict[str, Any]) -> str | None:
        """The id of a stored answer still being written upstream (background mode), if so."""
        return None

    def stream_usage(self, stats: StreamStats) -> tuple[int, int] | None:
        """(prompt, completion) tokens from what a stream's events said, if they did."""
        raise NotImplementedError

    def check_common(self, body: dict[str, Any], caller: Caller | None) -> None:
        """What every operation refuses, whatever its kind; drops the fields the operator drops."""
        apply_field_policy(body, self.field_policy)
        for name in FORBIDDEN_FIELDS.intersection(body):
            raise BadRequest(f"The field '{name}' cannot be set by clients.", param=name)
        tier = body.get("service_tier")
        if tier in COSTLIER_TIERS and caller is not None and caller.budget_usd is not None:
            raise BadRequest(
                f"service_tier '{tier}' costs more than the list price, so keys with a budget "
                "cannot use it. Leave it out or use 'auto'.",
                param="service_tier",
                code="invalid_value",
            )

    def checked_chat_model(self, body: dict[str, Any], caller: Caller | None) -> ModelInfo:
        """The common checks, then the chat model asked for, if this caller may use it."""
        self.check_common(body, caller)
        model_name = body.get("model")
        if model_name is not None and not isinstance(model_name, str):
            raise BadRequest("'model' must be a string.", param="model", code="invalid_type")
        info = self.catalog.resolve(model_name)
        if caller is not None:
            caller.check_model(info.name)
        return info

    def stream_flag(self, body: dict[str, Any]) -> bool:
        stream = body.get("stream")
        if stream is None:
            return False  # the Node SDK sends null for "not set"
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false.", param="stream")
        return stream


def apply_field_policy(body: dict[str, Any], policy: Mapping[str, str]) -> None:
    """`CHAT_API_FIELD_POLICY`: drop the fields the operator drops, refuse those it refuses.

    For fields that change who pays or what OpenAI keeps (`store`, `metadata`,
    `user`, `service_tier`, `prompt_cache_key`, `safety_identifier`, ...):
    passed through unless the operator says otherwise.
    """
    for name, rule in policy.items():
        if name not in body:
            continue
        if rule == "refuse":
            raise BadRequest(
                f"This server does not accept the field '{name}'. Send the request without it.",
                param=name,
                code="unsupported_parameter",
            )
        if rule == "drop":
            del body[name]


def parse_event(raw: bytes) -> Chunk:
    """A stream event's JSON, made safe (`relayable`); an error event or broken JSON ends it.

    Responses error events (`error`, `response.failed`) are relayed with their error
    parts scrubbed as the upstream's error bodies are, the rest unchanged; an event
    holding a remembered secret as it is (an echoed key in an id) with every string.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("OpenAI sent a broken event; the answer stopped.") from None
    if not isinstance(data, dict):
        raise UpstreamError("OpenAI sent a broken event; the answer stopped.")
    raw, data = relayable(raw, data)
    error = data.get("error")
    if error is not None and data.get("type") in (None, "error"):
        message = error.get("message") if isinstance(error, dict) else None
        raise UpstreamError(
            f"OpenAI stopped the answer: {redact(str(message))}"
            if message
            else "OpenAI stopped the answer."
        )
    return Chunk(raw, data)


def positive_int(body: dict[str, Any], name: str, ceiling: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON does not tell 1 from 1.0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(
            f"'{name}' must be a whole number of at least 1.", param=name, code="invalid_value"
        )
    if value > ceiling:
        raise BadRequest(
            f"'{name}' is too large: at most {ceiling} is allowed.",
            param=name,
            code="invalid_value",
        )
    return value


def token_usage(usage: Any, prompt_name: str, completion_name: str) -> tuple[int, int] | None:
    if isinstance(usage, dict):
        prompt, completion = usage.get(prompt_name), usage.get(completion_name)
        if isinstance(prompt, int) and isinstance(completion, int):
            return prompt, completion
    return None
