"""Chat completions (`POST /chat/completions`): the operation behind `/chat`, `/chat/stream`
and `/v1/chat/completions`.

Its worst case: every message part, tool, function and schema the model
reads (`tokens.prompt_bound`), plus `max_completion_tokens` / `max_tokens`
or else the model's own output ceiling, for each of the `n` choices.
"""

from __future__ import annotations

from typing import Any

import orjson

from chat_api.calls import Caller, Chunk, Prepared, StreamStats
from chat_api.errors import BadRequest
from chat_api.operations.base import Operation, positive_int, token_usage
from chat_api.providers.base import Completion
from chat_api.tokens import prompt_bound

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")  # what bounds a chat answer's length


class ChatCompletion(Operation):
    name = "chat.completion"
    upstream_path = "/chat/completions"

    def prepare(self, body: dict[str, Any], caller: Caller | None) -> Prepared:
        """Check an OpenAI-shaped request body and adapt it for its model.

        Raises `BadRequest` (400) or `ModelNotAllowed` (400/404) before
        anything is sent upstream.
        """
        s = self.settings
        info = self.checked_chat_model(body, caller)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(
                "'messages' must be a non-empty list of messages.",
                param="messages",
                code="missing_required_parameter" if messages is None else "invalid_value",
            )
        if len(messages) > s.max_messages:
            raise BadRequest(
                f"Too many messages: at most {s.max_messages} are allowed.",
                param="messages",
                code="invalid_value",
            )
        for index, message in enumerate(messages):
            _check_message(message, index, s.max_message_chars)
        stream = self.stream_flag(body)
        given = [positive_int(body, name, s.max_tokens_limit) for name in TOKEN_FIELDS]
        # Both set: the larger, whichever the model obeys. A null one is not sent at all: a
        # reasoning model's `max_tokens` becomes its `max_completion_tokens`, not a null.
        max_tokens = max((limit for limit in given if limit is not None), default=None)
        if any(name in body and body[name] is None for name in TOKEN_FIELDS):
            body = {k: v for k, v in body.items() if not (k in TOKEN_FIELDS and v is None)}
        choices = positive_int(body, "n", s.max_choices) or 1
        temperature = body.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            raise BadRequest(
                "'temperature' must be a number from 0 to 2.",
                param="temperature",
                code="invalid_value",
            )
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest(
                "'stream_options' must be an object.", param="stream_options", code="invalid_type"
            )
        include = (options or {}).get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise BadRequest(
                "'stream_options.include_usage' must be true or false.",
                param="stream_options.include_usage",
                code="invalid_type",
            )
        wants_usage = bool(include)

        upstream = self.catalog.adapt(info, body)
        if upstream is body:
            upstream = dict(body)
        upstream["model"] = info.name
        if stream and info.streaming:
            # Always ask for usage, so the ledger is exact; clients that did
            # not ask never see the extra chunk.
            upstream["stream"] = True
            upstream["stream_options"] = {**(options or {}), "include_usage": True}
        else:
            upstream.pop("stream", None)
            upstream.pop("stream_options", None)
        output = min(max_tokens or info.output_ceiling, info.output_ceiling)
        return Prepared(
            operation=self,
            model=info,
            body=upstream,
            stream=stream,
            client_wants_usage=wants_usage,
            prompt_bound=prompt_bound(body, info.context_window, info.image_tokens),
            output_bound=output * choices,
        )

    def usage(self, data: dict[str, Any]) -> tuple[int, int] | None:
        return token_usage(data.get("usage"), "prompt_tokens", "completion_tokens")

    def observe(self, chunk: Chunk, stats: StreamStats, client_wants_usage: bool) -> None:
        data = chunk.data
        usage = data.get("usage")
        choices = data.get("choices")
        if usage:
            stats.usage = usage
            if not choices and not client_wants_usage:
                chunk.relay = False  # the usage chunk the gateway asked for, not the client
        for choice in choices or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                stats.pieces += 1
                stats.generated_bytes += len(content)
            for call in delta.get("tool_calls") or ():
                arguments = (call.get("function") or {}).get("arguments")
                if arguments:
                    stats.pieces += 1
                    stats.generated_bytes += len(arguments)
            if choice.get("finish_reason"):
                stats.finished = True

    def stream_usage(self, stats: StreamStats) -> tuple[int, int] | None:
        return token_usage(stats.usage, "prompt_tokens", "completion_tokens")


def as_chunks(completion: Completion) -> list[bytes]:
    """A whole answer as the stream events it would have been, for models that cannot stream."""
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
    events = [orjson.dumps({**head, "choices": choices})]
    if data.get("usage"):
        events.append(orjson.dumps({**head, "choices": [], "usage": data["usage"]}))
    return events


def _check_message(message: Any, index: int, max_chars: int) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRequest(
            f"'{where}' must be an object with 'role' and 'content'.",
            param=where,
            code="invalid_type",
        )
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:  # a dict or list role is unhashable
        raise BadRequest(
            f"'{where}.role' must be one of: system, developer, user, assistant, tool.",
            param=f"{where}.role",
            code="invalid_value",
        )
    content = message.get("content")
    if content is None:
        calls = message.get("tool_calls")
        if role in ("assistant", "function") or (isinstance(calls, list) and calls):
            return
        raise BadRequest(
            f"'{where}.content' is required.",
            param=f"{where}.content",
            code="missing_required_parameter",
        )
    if isinstance(content, str):
        size = len(content)
    elif isinstance(content, list):
        size = sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
        if not all(isinstance(part, dict) for part in content):
            raise BadRequest(
                f"'{where}.content' parts must be objects.",
                param=f"{where}.content",
                code="invalid_type",
            )
    else:
        raise BadRequest(
            f"'{where}.content' must be a string or a list of parts.",
            param=f"{where}.content",
            code="invalid_type",
        )
    if size > max_chars:
        raise BadRequest(
            f"'{where}.content' is too long: at most {max_chars} characters are allowed.",
            param=f"{where}.content",
            code="invalid_value",
        )
