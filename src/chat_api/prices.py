"""What models cost: OpenAI's list prices, and how a model name finds its price.

Every allowed model must have a price (settings refuse to start otherwise),
so a model the operator adds is never free by accident.
"""

from __future__ import annotations

import re
from decimal import Decimal

# USD per million tokens (input, output): OpenAI's list prices, taken on 2026-11-30
# from openai.com/api/pricing (standard tier). A dated snapshot of a model
# (`gpt-4o-2024-08-06`) takes its model's price; `CHAT_API_PRICES` overrides any.
PRICES_TAKEN_ON = "2026-11-30"
DEFAULT_PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "gpt-4-turbo": (Decimal("10.00"), Decimal("30.00")),
    "gpt-4": (Decimal("30.00"), Decimal("60.00")),
    "gpt-3.5-turbo": (Decimal("0.50"), Decimal("1.50")),
    "o1-preview": (Decimal("15.00"), Decimal("60.00")),
    "o1-mini": (Decimal("3.00"), Decimal("12.00")),
    "o1": (Decimal("15.00"), Decimal("60.00")),
    "o3": (Decimal("2.00"), Decimal("8.00")),
    "o3-mini": (Decimal("1.10"), Decimal("4.40")),
    "o3-pro": (Decimal("20.00"), Decimal("80.00")),
    "o4-mini": (Decimal("1.10"), Decimal("4.40")),
    "gpt-4.1": (Decimal("2.00"), Decimal("8.00")),
    "gpt-4.1-mini": (Decimal("0.40"), Decimal("1.60")),
    "gpt-4.1-nano": (Decimal("0.10"), Decimal("0.40")),
    "gpt-5": (Decimal("1.25"), Decimal("10.00")),
    "gpt-5-mini": (Decimal("0.25"), Decimal("2.00")),
    "gpt-5-nano": (Decimal("0.05"), Decimal("0.40")),
    "gpt-5-pro": (Decimal("15.00"), Decimal("120.00")),
    "gpt-5-codex": (Decimal("1.25"), Decimal("10.00")),
    "text-embedding-3-small": (Decimal("0.02"), Decimal(0)),
    "text-embedding-3-large": (Decimal("0.13"), Decimal(0)),
    "text-embedding-ada-002": (Decimal("0.10"), Decimal(0)),
}
# `gpt-4o-2024-08-06`, `o3-mini-2025-01-31`: a snapshot of the model before the date.
_SNAPSHOT = re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


def list_price(
    name: str, prices: dict[str, tuple[Decimal, Decimal]]
) -> tuple[Decimal, Decimal] | None:
    """The price of `name`, or of the model it is a dated snapshot of; None when unknown.

    Never by a looser prefix: `gpt-4.5-preview` costs far more than `gpt-4`.
    """
    if name in prices:
        return prices[name]
    snapshot = _SNAPSHOT.match(name)
    if snapshot is not None and snapshot.group("base") in prices:
        return prices[snapshot.group("base")]
    return None
