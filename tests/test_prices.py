"""Every allowed model has a price; names find their price only by exact name or snapshot."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from chat_api.catalog import UNKNOWN_IMAGE_TOKENS, Catalog, model_info
from chat_api.config import Settings, settings_error_line
from chat_api.prices import DEFAULT_PRICES, list_price, snapshot_of


def test_a_model_without_a_price_stops_startup_with_one_line() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(models=("gpt-4o", "gpt-5-preview"), default_model="gpt-4o")
    line = settings_error_line(caught.value)
    assert line.startswith("CHAT_API_PRICES: no price for the model gpt-5-preview")
    assert "[0, 0]" in line


def test_priced_on_purpose_free_and_demo_mode_start() -> None:
    Settings(models=("my-model",), default_model="my-model", prices={"my-model": (0, 0)})
    Settings(models=("anything",), default_model="anything", demo=True)


def test_negative_prices_stop_startup() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(prices={"gpt-4o": (Decimal(-1), Decimal(10))})
    assert "must not be negative" in settings_error_line(caught.value)


def test_dated_snapshots_take_their_models_price_and_nothing_looser_does() -> None:
    assert list_price("gpt-4o-2024-08-06", DEFAULT_PRICES) == DEFAULT_PRICES["gpt-4o"]
    assert list_price("gpt-4-0613", DEFAULT_PRICES) == DEFAULT_PRICES["gpt-4"]
    assert list_price("o3-mini-2025-01-31", DEFAULT_PRICES) == DEFAULT_PRICES["o3-mini"]
    assert list_price("gpt-4.5-preview", DEFAULT_PRICES) == (Decimal(75), Decimal(150))
    assert list_price("gpt-4o-audio-preview", DEFAULT_PRICES) is None
    assert list_price("gpt-5.2", DEFAULT_PRICES) is None


def test_snapshots_priced_above_their_model_are_priced_at_what_openai_charges() -> None:
    """gpt-4o-2024-05-13 costs $5 / $15 a million, twice gpt-4o's $2.50 / $10."""
    assert list_price("gpt-4o-2024-05-13", DEFAULT_PRICES) == (Decimal(5), Decimal(15))
    assert list_price("gpt-3.5-turbo-1106", DEFAULT_PRICES) == (Decimal(1), Decimal(2))
    assert list_price("gpt-3.5-turbo-0613", DEFAULT_PRICES) == (Decimal("1.5"), Decimal(2))
    assert list_price("gpt-4-32k-0613", DEFAULT_PRICES) == (Decimal(60), Decimal(120))
    assert list_price("gpt-4-1106-preview", DEFAULT_PRICES) == (Decimal(10), Decimal(30))
    # A snapshot not listed costs the most of its model and its listed snapshots.
    assert list_price("gpt-4o-2025-06-01", DEFAULT_PRICES) == (Decimal(5), Decimal(15))
    assert list_price("gpt-3.5-turbo-0999", DEFAULT_PRICES) == (Decimal("1.5"), Decimal(2))


def test_no_snapshot_is_priced_below_its_model() -> None:
    for name, price in DEFAULT_PRICES.items():
        base = snapshot_of(name)
        if base is not None and base in DEFAULT_PRICES:
            assert price >= DEFAULT_PRICES[base], name


def test_a_model_not_listed_gets_the_largest_context_and_output_never_its_familys_smaller() -> None:
    """gpt-4-1106-preview reads 128,000 tokens: as gpt-4 (8,192) its prompt was reserved short."""
    largest = max(model_info(name).context_window for name in DEFAULT_PRICES)
    for name in ("gpt-4-1106-preview", "gpt-4-0125-preview", "gpt-4-32k", "gpt-4.5-preview-x"):
        info = model_info(name)
        assert info.context_window == largest >= 1_047_576, name
        assert info.output_ceiling >= 128_000
        assert info.image_tokens == UNKNOWN_IMAGE_TOKENS
    assert model_info("gpt-4-0613").context_window == 8_192  # a dated snapshot of gpt-4
    assert model_info("gpt-4o-mini-2024-07-18").image_tokens == 48_169
    assert model_info("gpt-5-pro").output_ceiling == 272_000
    assert not model_info("o3-deep-research").sampling  # quirks still follow the name
    assert model_info("gpt-5.2").context_window == largest


def test_the_catalog_gives_a_not_listed_model_the_largest_context() -> None:
    settings = Settings(
        models=("gpt-4o", "gpt-4-1106-preview"),
        default_model="gpt-4o",
        prices={"gpt-4-1106-preview": (10, 30)},
    )
    info = Catalog(settings).resolve("gpt-4-1106-preview")
    assert info.context_window > 128_000 and info.input_price == Decimal(10)
