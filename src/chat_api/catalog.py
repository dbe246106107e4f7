"""Models: the allow-list, the default, per-model quirks, limits and prices.

Reasoning models (o1-preview, o1-mini, and newer ones an operator names) do
not take a system role, sampling fields or `max_tokens`, and some cannot
stream. `Catalog.adapt` rewrites a request so that clients never need to know.

Money: every allow-listed model has a price (built in below, or from
`CHAT_API_PRICES`); a model without one stops startup, so nothing is free by
accident. Each model also knows the most it may write (`output_ceiling`) and
read (`context_window`), and what one image can cost (`image_tokens`, billed
on top of the context window): a call that sets no `max_tokens` may write up
to the ceiling, so that is what its budget reservation covers. Figures go by
exact name or dated snapshot (`gpt-4o-2024-08-06`), never by a looser prefix:
a name not listed gets the largest figures of any model, since they only cap
a reservation and too small would let a call cost more than it reserved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal

from chat_api.config import Settings
from chat_api.errors import ModelNotAllowed
from chat_api.prices import DEFAULT_PRICES, list_price, snapshot_of

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
    image_tokens: int = 0  # one image at its worst, billed on top of the context window
    embedding: bool = False  # an embedding model: /v1/embeddings only, nothing written
    input_price: Decimal = Decimal(0)  # USD per million prompt tokens
    output_price: Decimal = Decimal(0)  # USD per million completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (prompt_tokens * self.input_price + completion_tokens * self.output_price) / MILLION


_REASONING_LEGACY = ModelInfo(
    "", system_role=False, streaming=False, sampling=False, token_field="max_completion_tokens"
)
_REASONING = ModelInfo("", sampling=False, token_field="max_completion_tokens")
_CHAT = ModelInfo("")
_EMBEDDING = ModelInfo("", output_ceiling=0, context_window=8_192, embedding=True)


def _tiles(base: int, tile: int) -> int:
    """An image at its worst by OpenAI's tile rule: once it fits in 2048 x 2048 px with
    its shortest side at 768 px, at most 8 tiles of 512 px (2048 x 768), each `tile`."""
    return base + 8 * tile


def _patches(multiplier: str) -> int:
    """An image at its worst on a patch-based model: 1,536 patches of 32 px, times a multiplier."""
    return math.ceil(1_536 * Decimal(multiplier))


# How the way a name begins decides how a request is adapted (longest prefix wins).
_QUIRKS: tuple[tuple[str, ModelInfo], ...] = (
    ("o1-preview", _REASONING_LEGACY),
    ("o1-mini", _REASONING_LEGACY),
    ("o1", _REASONING),
    ("o3", _REASONING),
    ("o4", _REASONING),
    ("gpt-5", _REASONING),
    ("text-embedding", _EMBEDDING),
)


def _known(quirks: ModelInfo, output: int, context: int, image: int) -> ModelInfo:
    return replace(quirks, output_ceiling=output, context_window=context, image_tokens=image)


# The models OpenAI documents, by exact name (a dated snapshot takes its model's figures):
# the most one answer writes, the most the model reads, and one image at its worst
# (OpenAI's vision guide: 85 + 170 a tile for gpt-4o, gpt-4.1, gpt-4.5 and older; 2,833 +
# 5,667 for gpt-4o-mini, priced like gpt-4o; 75 + 150 for o1 and o3; 65 + 129 for
# computer-use-preview; patches times 1.62, 2.46 and 1.72 for the mini, nano and o4-mini
# models). gpt-5 is counted at 85 + 170, above its documented 70 + 140.
_MODELS: dict[str, ModelInfo] = {
    "gpt-4o": _known(_CHAT, 16_384, 128_000, _tiles(85, 170)),
    "chatgpt-4o-latest": _known(_CHAT, 16_384, 128_000, _tiles(85, 170)),
    "gpt-4o-mini": _known(_CHAT, 16_384, 128_000, _tiles(2_833, 5_667)),
    "gpt-4-turbo": _known(_CHAT, 4_096, 128_000, _tiles(85, 170)),
    "gpt-4": _known(_CHAT, 8_192, 8_192, _tiles(85, 170)),
    "gpt-4.5-preview": _known(_CHAT, 16_384, 128_000, _tiles(85, 170)),
    "gpt-3.5-turbo": _known(_CHAT, 4_096, 16_385, _tiles(85, 170)),
    "gpt-4.1": _known(_CHAT, 32_768, 1_047_576, _tiles(85, 170)),
    "gpt-4.1-mini": _known(_CHAT, 32_768, 1_047_576, _patches("1.62")),
    "gpt-4.1-nano": _known(_CHAT, 32_768, 1_047_576, _patches("2.46")),
    "computer-use-preview": _known(_CHAT, 1_024, 8_192, _tiles(65, 129)),
    "o1-preview": _known(_REASONING_LEGACY, 32_768, 128_000, _tiles(75, 150)),
    "o1-mini": _known(_REASONING_LEGACY, 65_536, 128_000, _tiles(75, 150)),
    "o1": _known(_REASONING, 100_000, 200_000, _tiles(75, 150)),
    "o1-pro": _known(_REASONING, 100_000, 200_000, _tiles(75, 150)),
    "o3": _known(_REASONING, 100_000, 200_000, _tiles(75, 150)),
    "o3-pro": _known(_REASONING, 100_000, 200_000, _tiles(75, 150)),
    "o3-mini": _known(_REASONING, 100_000, 200_000, _tiles(75, 150)),
    "o4-mini": _known(_REASONING, 100_000, 200_000, _patches("1.72")),
    "gpt-5": _known(_REASONING, 128_000, 400_000, _tiles(85, 170)),
    "gpt-5-mini": _known(_REASONING, 128_000, 400_000, _patches("1.62")),
    "gpt-5-nano": _known(_REASONING, 128_000, 400_000, _patches("2.46")),
    "gpt-5-pro": _known(_REASONING, 272_000, 400_000, _tiles(85, 170)),
    "gpt-5-codex": _known(_REASONING, 128_000, 400_000, _tiles(85, 170)),
    "text-embedding-3-small": _EMBEDDING,
    "text-embedding-3-large": _EMBEDDING,
    "text-embedding-ada-002": _EMBEDDING,
}
# A name not listed (`gpt-4-1106-preview`, `gpt-4-32k`, `gpt-5.2`) may read, write and
# see as much as any model: these figures only cap its reservation, so too large is safe
# and too small is not. CHAT_API_MODEL_CAPABILITIES narrows them.
_UNKNOWN_OUTPUT = max(info.output_ceiling for info in _MODELS.values())
_UNKNOWN_CONTEXT = max(info.context_window for info in _MODELS.values())
UNKNOWN_IMAGE_TOKENS = max(info.image_tokens for info in _MODELS.values())


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


def _listed(name: str) -> ModelInfo | None:
    known = _MODELS.get(name)
    if known is None:
        base = snapshot_of(name)
        known = _MODELS.get(base) if base is not None else None
    return known


def model_info(name: str) -> ModelInfo:
    """What is known of `name`: its figures, its model's for a dated snapshot, else the largest."""
    known = _listed(name)
    if known is not None:
        return replace(known, name=name)
    quirks = _CHAT
    longest = 0
    for prefix, info in _QUIRKS:
        if name.startswith(prefix) and len(prefix) > longest:
            quirks, longest = info, len(prefix)
    return replace(
        quirks,
        name=name,
        output_ceiling=0 if quirks.embedding else _UNKNOWN_OUTPUT,
        context_window=_UNKNOWN_CONTEXT,
        image_tokens=UNKNOWN_IMAGE_TOKENS,
    )


def image_tokens(name: object) -> int:
    """The most one image (or one page of a PDF) sent to `name` can be billed.

    A request that names no model is answered by the default one, whichever it is.
    """
    known = _listed(name) if isinstance(name, str) else None
    return UNKNOWN_IMAGE_TOKENS if known is None else known.image_tokens


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
            info = model_info(name)
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
