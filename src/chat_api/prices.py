"""What models cost: OpenAI's list prices, and how a model name finds its price.

Every allowed model must have a price (settings refuse to start otherwise),
so a model the operator adds is never free by accident.
"""

from __future__ import annotations

import re
from decimal import Decimal

# USD per million tokens (input, output): OpenAI's list prices, taken on 2026-11-30
# from openai.com/api/pricing (standard tier), legacy snapshots included. A dated
# snapshot not listed (`gpt-4o-2025-01-01`) takes the highest price of its model and
# its listed snapshots (for gpt-4o, 2024-05-13's); `CHAT_API_PRICES` overrides any.
PRICES_TAKEN_ON = "2026-11-30"
DEFAULT_PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4o-2024-05-13": (Decimal("5.00"), Decimal("15.00")),
    "gpt-4o-2024-08-06": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4o-2024-11-20": (Decimal("2.50"), Decimal("10.00")),
    "chatgpt-4o-latest": (Decimal("5.00"), Decimal("15.00")),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "gpt-4-turbo": (Decimal("10.00"), Decimal("30.00")),
    "gpt-4-0125-preview": (Decimal("10.00"), Decimal("30.00")),
    "gpt-4-1106-preview": (Decimal("10.00"), Decimal("30.00")),
    "gpt-4-1106-vision-preview": (Decimal("10.00"), Decimal("30.00")),
    "gpt-4": (Decimal("30.00"), Decimal("60.00")),
    "gpt-4-32k": (Decimal("60.00"), Decimal("120.00")),
    "gpt-4.5-preview": (Decimal("75.00"), Decimal("150.00")),
    "gpt-3.5-turbo": (Decimal("0.50"), Decimal("1.50")),
    "gpt-3.5-turbo-0125": (Decimal("0.50"), Decimal("1.50")),
    "gpt-3.5-turbo-1106": (Decimal("1.00"), Decimal("2.00")),
    "gpt-3.5-turbo-0613": (Decimal("1.50"), Decimal("2.00")),
    "gpt-3.5-turbo-0301": (Decimal("1.50"), Decimal("2.00")),
    "gpt-3.5-turbo-16k-0613": (Decimal("3.00"), Decimal("4.00")),
    "computer-use-preview": (Decimal("3.00"), Decimal("12.00")),
    "o1-preview": (Decimal("15.00"), Decimal("60.00")),
    "o1-mini": (Decimal("3.00"), Decimal("12.00")),
    "o1": (Decimal("15.00"), Decimal("60.00")),
    "o1-pro": (Decimal("150.00"), Decimal("600.00")),
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
# `gpt-4o-2024-08-06`, `o3-mini-2025-01-31`, `gpt-4-0613`: a dated snapshot of a model.
_SNAPSHOT = re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


def snapshot_of(name: str) -> str | None:
    """The model `name` is a dated snapshot of, or None."""
    snapshot = _SNAPSHOT.match(name)
    return snapshot.group("base") if snapshot is not None else None


def list_price(
    name: str, prices: dict[str, tuple[Decimal, Decimal]]
) -> tuple[Decimal, Decimal] | None:
    """The price of `name`; for a dated snapshot not listed, its model's highest; None when unknown.

    Snapshots can cost more than their model (`gpt-4o-2024-05-13` is twice `gpt-4o`),
    so an unlisted one is priced at the most of its model and its listed snapshots.
    Never by a looser prefix: `gpt-4.5-preview` costs far more than `gpt-4`.
    """
    if name in prices:
        return prices[name]
    base = snapshot_of(name)
    if base is None or base not in prices:
        return None
    family = [
        price for other, price in prices.items() if other == base or snapshot_of(other) == base
    ]
    return max(price[0] for price in family), max(price[1] for price in family)
