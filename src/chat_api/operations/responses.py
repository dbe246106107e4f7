"""The Responses API (`POST /responses`), relayed as OpenAI sends it.

Its worst case: everything the model reads — `input` (text, images, files),
`instructions`, `tools`, `text.format` schemas — plus `max_output_tokens`
or else the model's own output ceiling. A request that continues stored
context (`previous_response_id`, `conversation`) is bounded by the model's
whole context window (the earlier turns are read again and billed again,
and their size is known only upstream), with the images and PDF pages of its
new input on top, as for any request, and those of the stored context (which
the gateway counts as it stores them: `store/owners.py`) added by the route.
Usage comes from the answer or from the final stream event
(`response.completed`, `.incomplete`, `.failed`).
"""

from __future__ import annotations

from typing import Any

from chat_api.calls import Caller, Chunk, Prepared, StreamStats
from chat_api.catalog import SAMPLING_FIELDS
from chat_api.errors import BadRequest
from chat_api.operations.base import Operation, positive_int, token_usage
from chat_api.redact import redact
from chat_api.tokens import measure

# Stream events after which a response is in a final state, and its usage known.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
FINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})
# Tools billed by the call on top of tokens (searches, code runs, images): not priced
# here, so refused for keys with a budget.
TOKEN_PRICED_TOOLS = frozenset({"function", "custom"})


class Response(Operation):
    name = "response"
    upstream_path = "/responses"
    ends_with_done = False

    def prepare(self, body: dict[str, Any], caller: Caller | None) -> Prepared:
        s = self.settings
        info = self.checked_chat_model(body, caller)
        given = body.get("input")
        if given is not None and not isinstance(given, str | list):
            raise BadRequest(
                "'input' must be a string or a list of input items.",
                param="input",
                code="invalid_type",
            )
        for name in ("instructions", "previous_response_id"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise BadRequest(f"'{name}' must be a string.", param=name, code="invalid_type")
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("'tools' must be a list.", param="tools", code="invalid_type")
        if caller is not None and caller.budget_usd is not None:
            for tool in tools or ():
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind not in TOKEN_PRICED_TOOLS:
                    raise BadRequest(
                        f"The tool '{redact(str(kind))}' is billed per call on top of tokens, "
                        "so keys with a budget cannot use it. Use function tools.",
                        param="tools",
                        code="invalid_value",
                    )
        stream = self.stream_flag(body)
        background = body.get("background")
        if background is not None and not isinstance(background, bool):
            raise BadRequest(
                "'background' must be true or false.", param="background", code="invalid_type"
            )
        max_output = positive_int(body, "max_output_tokens", s.max_tokens_limit)
        upstream = dict(body)
        upstream["model"] = info.name
        if not info.sampling:  # the Responses API takes `reasoning` and max_output_tokens as is
            for field in SAMPLING_FIELDS:
                upstream.pop(field, None)
        continues = body.get("previous_response_id") or body.get("conversation")
        bound, media = measure(
            body, info.context_window, info.image_tokens, whole_context=bool(continues)
        )
        return Prepared(
            operation=self,
            model=info,
            body=upstream,
            stream=stream,
            prompt_bound=bound,
            output_bound=min(max_output or info.output_ceiling, info.output_ceiling),
            media=media,
        )

    def usage(self, data: dict[str, Any]) -> tuple[int, int] | None:
        return token_usage(data.get("usage"), "input_tokens", "output_tokens")

    def observe(self, chunk: Chunk, stats: StreamStats, client_wants_usage: bool) -> None:
        data = chunk.data
        kind = data.get("type")
        if kind in FINAL_EVENTS:
            response = data.get("response")
            if isinstance(response, dict):
                stats.usage = response.get("usage")
            stats.finished = True
        elif kind == "error":
            stats.finished = True  # the upstream ended the response: relayed as it is
        elif kind == "response.created":
            response = data.get("response")
            if isinstance(response, dict):
                stats.pending = self.pending(response)
        else:
            delta = data.get("delta")
            if isinstance(delta, str) and delta:
                stats.pieces += 1
                stats.generated_bytes += len(delta)

    def stream_usage(self, stats: StreamStats) -> tuple[int, int] | None:
        return token_usage(stats.usage, "input_tokens", "output_tokens")

    def pending(self, data: dict[str, Any]) -> str | None:
        response_id = data.get("id")
        if data.get("background") and not is_final(data) and isinstance(response_id, str):
            return response_id
        return None


class Compaction(Response):
    """`POST /responses/compact`: a model reads the context and writes a shorter one."""

    name = "response.compact"
    upstream_path = "/responses/compact"

    def prepare(self, body: dict[str, Any], caller: Caller | None) -> Prepared:
        prepared = super().prepare(body, caller)
        prepared.stream = False
        prepared.body.pop("stream", None)
        return prepared


def is_final(data: dict[str, Any]) -> bool:
    """Has this stored response reached a state it will not leave?"""
    return data.get("status") in FINAL_STATUSES
