"""Embeddings (`POST /embeddings`): read only, nothing written.

Its worst case is its input at a token per byte (or the token ids it was
sent as), never past the model's context.
"""

from __future__ import annotations

from typing import Any

from chat_api.calls import Caller, Chunk, Prepared, StreamStats
from chat_api.errors import BadRequest
from chat_api.operations.base import Operation, token_usage
from chat_api.tokens import prompt_bound


class Embedding(Operation):
    name = "embedding"
    upstream_path = "/embeddings"

    def prepare(self, body: dict[str, Any], caller: Caller | None) -> Prepared:
        self.check_common(body, caller)
        model_name = body.get("model")
        if not isinstance(model_name, str) or not model_name:
            raise BadRequest(
                "'model' is required: name an embedding model.",
                param="model",
                code="missing_required_parameter",
            )
        info = self.catalog.resolve_embedding(model_name)
        if caller is not None:
            caller.check_model(info.name)
        given = body.get("input")
        if not isinstance(given, str | list) or not given:
            raise BadRequest(
                "'input' must be a non-empty string or list.",
                param="input",
                code="missing_required_parameter" if given is None else "invalid_value",
            )
        if body.get("stream"):
            raise BadRequest("Embeddings cannot be streamed.", param="stream", code="invalid_value")
        upstream = dict(body)
        upstream["model"] = info.name
        return Prepared(
            operation=self,
            model=info,
            body=upstream,
            stream=False,
            prompt_bound=prompt_bound(body, info.context_window * _count(given), info.image_tokens),
            output_bound=0,
        )

    def usage(self, data: dict[str, Any]) -> tuple[int, int] | None:
        usage = data.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            return usage["prompt_tokens"], 0
        return token_usage(usage, "prompt_tokens", "completion_tokens")

    def observe(self, chunk: Chunk, stats: StreamStats, client_wants_usage: bool) -> None:
        return None  # never streamed

    def stream_usage(self, stats: StreamStats) -> tuple[int, int] | None:
        return None


def _count(given: str | list[Any]) -> int:
    """How many inputs: each is bounded by the model's context on its own."""
    if isinstance(given, list) and given and not isinstance(given[0], int):
        return len(given)
    return 1
