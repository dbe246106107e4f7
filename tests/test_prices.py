"""Every allowed model has a price; names find their price only by exact name or snapshot."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from chat_api.config import Settings, settings_error_line
from chat_api.prices import DEFAULT_PRICES, list_price


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
    assert list_price("gpt-4.5-preview", DEFAULT_PRICES) is None
    assert list_price("gpt-4o-audio-preview", DEFAULT_PRICES) is None
