"""Models: the allow-list, the default, per-model quirks, limits and prices.

Reasoning models (o1-preview, o1-mini, and newer ones an operator names) do
not take a system role, sampling fields or `max_tokens`, and some cannot
stream. `Catalog.adapt` rewrites a request so that clients never need to know.

Money: every allow-listed model has a price (built in below, or from
`CHAT_API_PRICES`); a model without one stops startup, so nothing is free by
accident. Each model also knows the most it may write (`output_ceiling`) and
read (`context_window`): a call that sets no `max_tokens` may write up to
the ceiling, so that is what its budget reservation covers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal

from chat_api.config import Settings
from chat_api.errors import ModelNotAllowed
from chat_api.prices import DEFAULT_PRICES, list_price

TokenField = Literal["max_tokens", "max_completion_tokens"]

# Fields reasoning models refuse; dropped when `sampling` is off.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
)

MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the gateway knows about one model."""

    name: str
    system_role: bool = True
    streaming: bool = True
    sampling: bool = True
    token_field: TokenField = "max_tokens"
    output_ceiling: int = 16_384  # the most one answer (one choice) may write
    context_window: int = 128_000  # the most the model reads; a longer prompt is refused
    embedding: bool = False  # an embedding model: /v1/embeddings only, nothing written
    input_price: Decimal = Decimal(0)  # USD per million prompt tokens
    output_price: Decimal = Decimal(0)  # USD per million completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (prompt_tokens * self.input_price + completion_tokens * self.output_price) / MILLION


_REASONING_LEGACY = ModelInfo(
    "", system_role=False, streaming=False, sampling=False, token_field="max_completion_tokens"
)
_REASONING = ModelInfo("", sampling=False, token_field="max_completion_tokens")

# Longest prefix wins; names not matched are ordinary chat models.
_FAMILIES: tuple[tuple[str, ModelInfo], ...] = (
    ("o1-preview", replace(_REASONING_LEGACY, output_ceiling=32_768)),
    ("o1-mini", replace(_REASONING_LEGACY, output_ceiling=65_536)),
    ("o1", replace(_REASONING, output_ceiling=100_000, context_window=200_000)),
    ("o3", replace(_REASONING, output_ceiling=100_000, context_window=200_000)),
    ("o4", replace(_REASONING, output_ceiling=100_000, context_window=200_000)),
    ("gpt-5", replace(_REASONING, output_ceiling=128_000, context_window=400_000)),
    ("gpt-4.1", ModelInfo("", output_ceiling=32_768, context_window=1_047_576)),
    ("gpt-4-turbo", ModelInfo("", output_ceiling=4_096)),
    ("gpt-4", ModelInfo("", output_ceiling=8_192, context_window=8_192)),
    ("gpt-4o", ModelInfo("")),
    ("gpt-3.5-turbo", ModelInfo("", output_ceiling=4_096, context_window=16_385)),
    ("text-embedding", ModelInfo("", output_ceiling=0, context_window=8_192, embedding=True)),
)


# When OpenAI published each model: the `created` of its entry in OpenAI's own model list.
PUBLISHED: dict[str, int] = {
    "gpt-3.5-turbo": 1677610602,
    "gpt-4": 1687882411,
    "gpt-4-turbo": 1712361441,
    "gpt-4o": 1715367049,
    "gpt-4o-mini": 1721172741,
    "o1-preview": 1725648897,
    "o1-mini": 1725649008,
    "o1": 1734375816,
    "o3-mini": 1737146383,
    "o3": 1744225308,
    "o4-mini": 1744225351,
    "gpt-4.1": 1744316542,
    "gpt-4.1-mini": 1744318173,
    "gpt-5": 1754425777,
    "text-embedding-ada-002": 1671217299,
    "text-embedding-3-small": 1705948997,
    "text-embedding-3-large": 1705953180,
}


def _family(name: str) -> ModelInfo:
    best: tuple[int, ModelInfo] | None = None
    for prefix, info in _FAMILIES:
        if name.startswith(prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), info)
    return best[1] if best else ModelInfo("")


class Catalog:
    """The allow-list with each model's capabilities and prices."""

    def __init__(self, settings: Settings) -> None:
        self.names: tuple[str, ...] = settings.models
        self.default: str = settings.default_model
        self.embedding_names: tuple[str, ...] = settings.embedding_models
        # `created` of each model, as OpenAI lists it; others are asked of the upstream once.
        self.published: dict[str, int] = dict(PUBLISHED)
        prices = {**DEFAULT_PRICES, **settings.prices}
        self._models: dict[str, ModelInfo] = {}
        unpriced: list[str] = []
        for name in (*self.names, *self.embedding_names):
            info = replace(_family(name), name=name)
            if name in self.embedding_names:
                info = replace(info, embedding=True, output_ceiling=0)
            override = settings.model_capabilities.get(name)
            if override is not None:
                info = replace(info, **override.model_dump(exclude_none=True))
            price = list_price(name, prices)
            if settings.demo:
                price = (Decimal(0), Decimal(0))  # the demo model costs nothing
            if price is None:
                unpriced.append(name)
                continue
            self._models[name] = replace(info, input_price=price[0], output_price=price[1])
        # Settings refuse an allowed model without a price; this is the second line.
        assert not unpriced, unpriced

    def resolve(self, name: str | None) -> ModelInfo:
        """The chat model a request asked for (or the default); 400/404 when not allowed."""
        chosen = name or self.default
        info = self._models.get(chosen)
        if info is None or info.embedding:
            raise ModelNotAllowed(chosen, self.names)
        return info

    def resolve_embedding(self, name: str | None) -> ModelInfo:
        """The embedding model a request asked for; 404 when not allowed."""
        info = self._models.get(name or "")
        if info is None or not info.embedding:
            raise ModelNotAllowed(str(name), self.embedding_names)
        return info

    def adapt(self, info: ModelInfo, body: dict[str, Any]) -> dict[str, Any]:
        """Rewrite an OpenAI request body so that `info`'s model accepts it.

        Returns `body` itself when nothing needs to change (the common case).
        """
        if info.system_role and info.sampling and info.token_field == "max_tokens":
            return body
        body = dict(body)
        if not info.sampling:
            for field in SAMPLING_FIELDS:
                body.pop(field, None)
        if info.token_field == "max_completion_tokens" and "max_tokens" in body:
            limit = body.pop("max_tokens")
            body.setdefault("max_completion_tokens", limit)
        if not info.system_role:
            body["messages"] = fold_system_messages(body.get("messages", []))
        return body


def fold_system_messages(messages: list[Any]) -> list[Any]:
    """Move system/developer text into the first user turn, for models without a system role."""
    system_parts: list[str] = []
    rest: list[Any] = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            system_parts.append(_text_of(message.get("content")))
        else:
            rest.append(message)
    if not system_parts:
        return messages
    preface = "\n\n".join(part for part in system_parts if part)
    for index, message in enumerate(rest):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                merged: Any = [{"type": "text", "text": preface}, *content]
            else:
                merged = f"{preface}\n\n{content or ''}".rstrip()
            rest[index] = {**message, "content": merged}
            return rest
    return [{"role": "user", "content": preface}, *rest]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""
