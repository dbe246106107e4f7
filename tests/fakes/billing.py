"""How the fake upstream bills, the way OpenAI does: the ground truth of every money test.

OpenAI bills the whole prompt as soon as a call starts (messages, tools,
schemas, images), and every output token it generated, up to the model's
own ceiling when the request set none, even when the client left: a stream
is billed for what was generated before it was closed, a whole answer in
full. Its tokenizer works on bytes, so a token is never more than one
UTF-8 byte of text; the fake bills text at that worst case (one token per
byte), the hardest prompt a hostile client can send.

Images are billed by OpenAI's vision guide, per model, at the worst an image
can be (the fake does not look at its pixels): `detail: "low"` at the base
figure, otherwise the base and 8 tiles of 512 px (what fits in 2048 x 2048
with the shortest side at 768 px); patch-based models at 1,536 patches
times their multiplier, whatever the detail. A PDF sent inline is its bytes
of text plus an image of each page, as OpenAI documents. gpt-4o-mini bills
an image at 33 times gpt-4o's tokens (the same price), but those tokens are
not what fills its context window: `prompt_tokens` counts its images at
gpt-4o's rate, and the bill (`billed_tokens`) at its own, so image tokens are
billed beyond the context window.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

MILLION = Decimal(1_000_000)
# Image tokens by OpenAI's vision guide: (base, per 512 px tile) for tile-based models,
# a multiplier of 1,536 patches at most for patch-based ones; others bill like gpt-4o.
TILES = {
    "gpt-4o": (85, 170),
    "gpt-4o-mini": (2_833, 5_667),
    "gpt-4.1": (85, 170),
    "gpt-4": (85, 170),
    "gpt-4-turbo": (85, 170),
    "o1": (75, 150),
    "o3": (75, 150),
    "gpt-5": (70, 140),
    "computer-use-preview": (65, 129),
}
PATCH_MULTIPLIERS = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72}
MAX_TILES = 8  # 2048 x 768 px once scaled: 4 x 2 tiles of 512 px
MAX_PATCHES = 1_536
# Whitespace and comments may stand between `/Type` and `/Page` in a PDF.
PDF_PAGE = re.compile(rb"/Type(?:\s|%[^\r\n]*[\r\n])*/Page(?![A-Za-z0-9#])")
# Output ceilings of the models the money tests use (OpenAI's model pages).
OUTPUT_CEILING = {
    "gpt-4o": 16_384,
    "gpt-4o-mini": 16_384,
    "gpt-4": 8_192,
    "gpt-4-turbo": 4_096,
    "gpt-3.5-turbo": 4_096,
    "o1-mini": 65_536,
    "o1-preview": 32_768,
    "gpt-4.1": 32_768,
    "gpt-5": 128_000,
}
# USD per million tokens (input, output): OpenAI's list prices.
PRICES = {
    "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "gpt-4": (Decimal("30.00"), Decimal("60.00")),
    "gpt-4-turbo": (Decimal("10.00"), Decimal("30.00")),
    "gpt-3.5-turbo": (Decimal("0.50"), Decimal("1.50")),
    "o1-mini": (Decimal("3.00"), Decimal("12.00")),
    "o1-preview": (Decimal("15.00"), Decimal("60.00")),
    "gpt-4.1": (Decimal("2.00"), Decimal("8.00")),
    "gpt-5": (Decimal("1.25"), Decimal("10.00")),
}
# Request fields the model does not read.
NOT_PROMPT = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "user",
        "store",
        "metadata",
        "background",
        "service_tier",
        "parallel_tool_calls",
        "previous_response_id",
        "conversation",
        "include",
        "truncation",
        "reasoning",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    }
)


def image_tokens(model: str, detail: Any = None) -> int:
    """What OpenAI bills for one image sent to `model`, at its largest."""
    multiplier = PATCH_MULTIPLIERS.get(model)
    if multiplier is not None:
        return math.ceil(MAX_PATCHES * multiplier)
    base, tile = TILES.get(model, TILES["gpt-4o"])
    return base if detail == "low" else base + MAX_TILES * tile


def pdf_pages(raw: bytes) -> int:
    return len(PDF_PAGE.findall(raw))


def _tokens(value: Any, image: Callable[[Any], int]) -> int:
    """One token per UTF-8 byte of every string; images and PDF pages by `image(detail)`."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image_url", "input_image"):
            inner = value.get("image_url")
            detail = inner.get("detail") if isinstance(inner, dict) else value.get("detail")
            return image(detail)
        if kind in ("file", "input_file"):
            file = value.get("file", value)
            data = file.get("file_data") if isinstance(file, dict) else None
            if isinstance(data, str):
                try:
                    raw = base64.b64decode(data.partition("base64,")[2] or data)
                except (binascii.Error, ValueError):
                    raw = data.encode()
                return len(raw) + pdf_pages(raw) * image("high")
        return sum(_tokens(v, image) for v in value.values())
    if isinstance(value, list):
        return sum(_tokens(v, image) for v in value)
    return 0


def _prompt(body: dict[str, Any], image: Callable[[Any], int]) -> int:
    messages = body.get("messages")
    overhead = 3 + 4 * len(messages) if isinstance(messages, list) else 3
    return overhead + sum(_tokens(v, image) for k, v in body.items() if k not in NOT_PROMPT)


def prompt_tokens(body: dict[str, Any]) -> int:
    """What this request fills of the model's context window, at the hostile worst case."""
    model = str(body.get("model"))
    rate = "gpt-4o" if model == "gpt-4o-mini" else model  # its images fill it as gpt-4o's do
    return _prompt(body, lambda detail: image_tokens(rate, detail))


def billed_tokens(body: dict[str, Any]) -> int:
    """What OpenAI bills for reading this request, at the hostile worst case."""
    model = str(body.get("model"))
    return _prompt(body, lambda detail: image_tokens(model, detail))


def output_limit(body: dict[str, Any]) -> int:
    """The most the model may write for this request, per choice."""
    model = str(body.get("model"))
    ceiling = OUTPUT_CEILING.get(model, 16_384)
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int):
            return min(value, ceiling)
    return ceiling


def cost(model: str, prompt: int, completion: int) -> Decimal:
    price_in, price_out = PRICES.get(model, (Decimal(0), Decimal(0)))
    return (prompt * price_in + completion * price_out) / MILLION


@dataclass
class Bill:
    model: str
    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def cost(self) -> Decimal:
        return cost(self.model, self.prompt_tokens, self.completion_tokens)


@dataclass
class Biller:
    """Every call the fake upstream billed, as OpenAI's invoice would list it."""

    bills: list[Bill] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, body: dict[str, Any]) -> Bill:
        """A call starts: its whole prompt is billed at once."""
        bill = Bill(str(body.get("model")), billed_tokens(body))
        with self.lock:
            self.bills.append(bill)
        return bill

    @property
    def total(self) -> Decimal:
        with self.lock:
            return sum((bill.cost for bill in self.bills), Decimal(0))

    def clear(self) -> None:
        with self.lock:
            self.bills.clear()
