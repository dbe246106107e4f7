"""One headless Chromium for the browser tests; each test opens pages in fresh contexts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.web.chat_page import CHROMIUM_ARGS, Browser

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Closed once the browser tests are done: Playwright's sync API keeps an event loop
    running in this thread meanwhile, and the next test's `asyncio.run` would refuse."""
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def pages(browser: Any, gateway_factory: GatewayFactory) -> Iterator[Browser]:
    # Depends on gateway_factory so that pages close before their gateways stop.
    opened = Browser(browser)
    yield opened
    opened.close()
    assert opened.errors == [], "the page raised script errors or broke its CSP"
