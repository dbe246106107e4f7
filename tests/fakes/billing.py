"""How the fake upstream bills, the way OpenAI does: the ground truth of every money test.

OpenAI bills the whole prompt as soon as a call starts (messages, tools,
schemas, images), and every output token it generated, up to the model's
own ceiling when the request set none, even when the client left: a stream
is billed for what was generated before it was closed, a whole answer in
full. Its tokenizer works on bytes, so a token is never more than one
UTF-8 byte of text; the fake bills text at that worst case (one token per
byte), the hardest prompt a hostile client can send.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

MILLION = Decimal(1_000_000)
# What one image costs at its worst (OpenAI: 85 + 170 per 512 px tile, at most 8 tiles
# after scaling to fit 2048 x 768 for gpt-4o; patch-based models cap at 1,536 patches).
IMAGE_TOKENS = 1_536
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


def _text_tokens(value: Any) -> int:
    """One token per UTF-8 byte of every string, images at their worst."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image_url", "input_image"):
            return IMAGE_TOKENS
        return sum(_text_tokens(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_tokens(v) for v in value)
    return 0


def prompt_tokens(body: dict[str, Any]) -> int:
    """What OpenAI bills for reading this request, at the hostile worst case."""
    messages = body.get("messages")
    overhead = 3 + 4 * len(messages) if isinstance(messages, list) else 3
    return overhead + sum(_text_tokens(v) for k, v in body.items() if k not in NOT_PROMPT)


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
        bill = Bill(str(body.get("model")), prompt_tokens(body))
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
