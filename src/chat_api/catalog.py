"""Models: the allow-list, the default, per-model quirks and prices.

Reasoning models (o1-preview, o1-mini, and newer ones an operator names) do
not take a system role, sampling fields or `max_tokens`, and some cannot
stream. `Catalog.adapt` rewrites a request so that clients never need to know.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal

from chat_api.config import Settings
from chat_api.errors import ModelNotAllowed

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
    ("o1-preview", _REASONING_LEGACY),
    ("o1-mini", _REASONING_LEGACY),
    ("o1", _REASONING),
    ("o3", _REASONING),
    ("o4", _REASONING),
    ("gpt-5", _REASONING),
)

# USD per million tokens (input, output), list prices at the time of writing.
DEFAULT_PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "gpt-4-turbo": (Decimal("10.00"), Decimal("30.00")),
    "gpt-4": (Decimal("30.00"), Decimal("60.00")),
    "gpt-3.5-turbo": (Decimal("0.50"), Decimal("1.50")),
    "o1-preview": (Decimal("15.00"), Decimal("60.00")),
    "o1-mini": (Decimal("3.00"), Decimal("12.00")),
    "gpt-4.1": (Decimal("2.00"), Decimal("8.00")),
    "gpt-4.1-mini": (Decimal("0.40"), Decimal("1.60")),
    "o1": (Decimal("15.00"), Decimal("60.00")),
    "o3": (Decimal("2.00"), Decimal("8.00")),
    "o3-mini": (Decimal("1.10"), Decimal("4.40")),
    "o4-mini": (Decimal("1.10"), Decimal("4.40")),
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
        # The demo model costs nothing, whatever model name a request uses.
        prices = {} if settings.demo else {**DEFAULT_PRICES, **settings.prices}
        self._models: dict[str, ModelInfo] = {}
        for name in self.names:
            info = replace(_family(name), name=name)
            override = settings.model_capabilities.get(name)
            if override is not None:
                info = replace(info, **override.model_dump(exclude_none=True))
            if name in prices:
                info = replace(info, input_price=prices[name][0], output_price=prices[name][1])
            self._models[name] = info

    def resolve(self, name: str | None) -> ModelInfo:
        """The model a request asked for (or the default); 400/404 when not allowed."""
        chosen = name or self.default
        info = self._models.get(chosen)
        if info is None:
            raise ModelNotAllowed(chosen, self.names)
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
