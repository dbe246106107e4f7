"""Driving the chat page in Chromium: fresh browser contexts, and what a user does on the page."""

from __future__ import annotations

from typing import Any

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


class Browser:
    """Opens pages in fresh contexts and fails the test on any script error in them."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.contexts: list[Any] = []
        self.errors: list[str] = []

    def open(self, url: str, *, width: int = 1280, height: int = 800, **context: Any) -> Any:
        """A page at `url` in a new context (its own empty localStorage), once the page is ready."""
        browser_context = self.browser.new_context(
            viewport={"width": width, "height": height}, **context
        )
        browser_context.set_default_timeout(10_000)
        self.contexts.append(browser_context)
        page = browser_context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._on_console)
        page.goto(url)
        ready(page)
        return page

    def _on_console(self, message: Any) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def close(self) -> None:
        for context in self.contexts:
            context.close()


def ready(page: Any) -> None:
    """The model list has arrived: the page is ready to chat."""
    page.wait_for_selector("#model:not([disabled])")


def reload(page: Any) -> None:
    page.reload()
    ready(page)


def message_box(page: Any) -> Any:
    return page.get_by_role("textbox", name="Message", exact=True)


def send(page: Any, text: str) -> None:
    message_box(page).fill(text)
    message_box(page).press("Enter")


def last_answer(page: Any) -> Any:
    return page.locator(".message.assistant").last


def wait_answer_done(page: Any) -> Any:
    answer = last_answer(page)
    answer.locator(".meta").wait_for()
    return answer


def ask(page: Any, text: str) -> Any:
    """Send `text` and wait for the whole answer."""
    count = page.locator(".message.assistant .meta").count()
    send(page, text)
    page.locator(".message.assistant .meta").nth(count).wait_for()
    return last_answer(page)
