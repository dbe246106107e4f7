"""Take the README's screenshots of the chat page: docs/page-desktop.png and docs/page-phone.png.

Starts a demo-mode gateway on a free loopback port, chats with it in headless
Chromium (Playwright), and saves one desktop and one phone screenshot.

    .venv/bin/python scripts/screenshots.py [--chromium /usr/bin/chromium] [--dark]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import Browser, Page, sync_playwright

from chat_api.app import create_app
from chat_api.config import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
QUESTIONS = (
    "How do I read a file line by line in Python?",
    "Give me three tips for naming variables.",
)
FOLLOW_UP = "Can you show it with a context manager?"


class Gateway:
    """A demo gateway on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, data_dir: str) -> None:
        settings = Settings(
            demo=True,
            demo_delay=0.002,
            database_url=f"sqlite+aiosqlite:///{data_dir}/screenshots.db",
        )
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=0, log_config=None, access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise SystemExit("the demo gateway did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def ask(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.keyboard.press("Enter")
    page.locator("#send[aria-label='Send']").wait_for()
    page.locator(".message.assistant .meta").last.wait_for()


def shoot(browser: Browser, url: str, scheme: str) -> None:
    """Chat a little on a desktop-sized page, then show the same chats on a phone."""
    desktop = browser.new_page(viewport={"width": 1280, "height": 800}, color_scheme=scheme)
    desktop.goto(url)
    for question in QUESTIONS:
        desktop.get_by_role("button", name="New chat").click()
        ask(desktop, question)
    desktop.locator(".open-conversation").last.click()
    desktop.get_by_label("Message", exact=True).fill(FOLLOW_UP)
    desktop.wait_for_timeout(400)  # let the send button's fade-in finish
    desktop.screenshot(path=DOCS / "page-desktop.png")

    phone = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        color_scheme=scheme,
        storage_state=desktop.context.storage_state(),  # the same conversations
    ).new_page()
    phone.goto(url)
    phone.locator(".message.assistant .meta").last.wait_for()
    phone.wait_for_timeout(400)
    phone.screenshot(path=DOCS / "page-phone.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium to drive")
    parser.add_argument("--dark", action="store_true", help="use the dark theme")
    options = parser.parse_args()
    DOCS.mkdir(exist_ok=True)

    with (
        tempfile.TemporaryDirectory() as data_dir,
        Gateway(data_dir) as url,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=options.chromium, args=ARGS, headless=True
        )
        try:
            shoot(browser, url, "dark" if options.dark else "light")
        finally:
            browser.close()
    print(f"wrote {DOCS / 'page-desktop.png'} and {DOCS / 'page-phone.png'}")


if __name__ == "__main__":
    main()
