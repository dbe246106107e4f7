"""What a reader does with a conversation: regenerate, edit and resend, copy, search, export;
and the page around it: the sidebar's empty state, the demo banner, the end kept in view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.web.chat_page import Browser, ask, last_answer, reload

pytestmark = pytest.mark.browser

FIRST = "Hello from the fake upstream. It has several words to stream."


def sent_messages(fake: FakeOpenAI) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in fake.received[-1].body["messages"]]


def bubbles(page: Any) -> list[str]:
    return [text.strip() for text in page.locator(".message.user .bubble").all_inner_texts()]


def test_regenerate_edit_and_copy(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    page = pages.open(gateway_factory().url, permissions=["clipboard-read", "clipboard-write"])
    answer = ask(page, "First question")
    assert FIRST in answer.inner_text()

    # Copy: the whole answer, as written, on the clipboard.
    copy = answer.get_by_role("button", name="Copy answer")
    copy.click()
    copy.filter(has_text="Copied").wait_for()  # it says so once the clipboard write is done
    assert page.evaluate("navigator.clipboard.readText()") == FIRST

    # Regenerate: the same question again; the new answer replaces the old one.
    fake.queue(Plan(text="A second try."))
    answer.get_by_role("button", name="Regenerate answer").click()
    last_answer(page).get_by_text("A second try.").wait_for()
    last_answer(page).locator(".meta").wait_for()
    assert page.locator(".message.assistant").count() == 1
    assert bubbles(page) == ["First question"]
    assert sent_messages(fake) == [("user", "First question")]

    fake.queue(Plan(text="Second answer."))
    ask(page, "Second question")
    answers = page.locator(".message.assistant")
    assert answers.nth(0).get_by_role("button", name="Regenerate answer").is_hidden()
    assert answers.nth(1).get_by_role("button", name="Regenerate answer").is_visible()

    # Edit the first message and send it again: everything after it is replaced.
    first = page.locator(".message.user").first
    first.hover()
    first.get_by_role("button", name="Edit message").click()
    field = page.get_by_role("textbox", name="Edit your message")
    assert field.input_value() == "First question"
    field.fill("First question, put better")
    fake.queue(Plan(text="The answer to the better question."))
    field.press("Enter")
    last_answer(page).get_by_text("The answer to the better question.").wait_for()
    last_answer(page).locator(".meta").wait_for()
    assert bubbles(page) == ["First question, put better"]
    assert page.locator(".message.assistant").count() == 1
    assert sent_messages(fake) == [("user", "First question, put better")]

    # Edit, then change one's mind: nothing is sent.
    hits = fake.hits
    page.locator(".message.user").first.get_by_role("button", name="Edit message").click()
    page.get_by_role("textbox", name="Edit your message").fill("Never mind")
    page.get_by_role("button", name="Cancel").click()
    assert bubbles(page) == ["First question, put better"]
    assert fake.hits == hits

    # What a reload shows is what was there.
    reload(page)
    assert bubbles(page) == ["First question, put better"]
    assert "The answer to the better question." in last_answer(page).inner_text()


def test_search_and_export(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    page = pages.open(gateway_factory().url)
    sidebar = page.get_by_role("complementary", name="Conversations")
    assert sidebar.get_by_text("No conversations yet").is_visible()
    assert page.get_by_role("searchbox", name="Search conversations").is_hidden()
    assert page.get_by_role("button", name="Export").is_hidden()  # nothing to export yet

    fake.queue(Plan(text="Penguins live in the **south**."), Plan(text="Use a `with` block."))
    ask(page, "Tell me about birds that swim")
    page.get_by_role("button", name="New chat").click()
    page.locator("#instructions summary").click()
    page.get_by_role("textbox", name="Instructions for the assistant").fill("Answer briefly.")
    ask(page, "How do I open a file in Python?")
    assert sidebar.get_by_text("No conversations yet").is_hidden()

    search = page.get_by_role("searchbox", name="Search conversations")
    titles = page.locator(".open-conversation")
    search.fill("PENGUIN")  # found in an answer, whatever the case
    assert titles.all_inner_texts() == ["Tell me about birds that swim"]
    search.fill("python")
    assert titles.all_inner_texts() == ["How do I open a file in Python?"]
    search.fill("zebra")
    assert titles.count() == 0
    assert sidebar.get_by_text("No conversation mentions “zebra”.").is_visible()
    search.fill("")
    assert titles.count() == 2

    def export(kind: str) -> tuple[str, str]:
        page.get_by_role("button", name="Export").click()
        with page.expect_download() as download:
            page.get_by_role("button", name=kind).click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        return download.value.suggested_filename, path.read_text()

    name, markdown = export("Markdown (.md)")
    assert name == "how-do-i-open-a-file-in-python.md"
    assert markdown.startswith("# How do I open a file in Python?\n")
    assert "> **Instructions:** Answer briefly." in markdown
    assert "## You\n\nHow do I open a file in Python?\n" in markdown
    assert "## Assistant (gpt-4o-mini)\n\nUse a `with` block.\n" in markdown

    name, raw = export("JSON (.json)")
    assert name == "how-do-i-open-a-file-in-python.json"
    data = json.loads(raw)
    assert data["title"] == "How do I open a file in Python?"
    assert data["model"] == "gpt-4o-mini"
    assert data["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How do I open a file in Python?"},
        {"role": "assistant", "content": "Use a `with` block."},
    ]


def test_demo_banner_fits_a_phone_and_stays_dismissed_and_the_end_stays_in_view(
    pages: Browser, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory(demo=True, openai_api_key=None, demo_delay=0.0005)
    page = pages.open(gateway.url, width=375, height=560)
    banner = page.locator("#demo-banner")
    text = banner.locator("p")
    assert "Demo mode" in text.inner_text()
    # One line, and none of it cut off.
    fits = """(p) => p.scrollWidth <= p.clientWidth
      && p.clientHeight < 2 * parseFloat(getComputedStyle(p).lineHeight)"""
    assert text.evaluate(fits), "the demo banner does not fit one line on a phone"

    assert "demo model" in ask(page, "Hello demo").inner_text()
    ask(page, "Tell me more")

    # After a reload the last message ends above the message box, not under it
    # (the banner appears after the page drew the conversation).
    reload(page)
    banner.wait_for()
    page.wait_for_timeout(200)
    last = last_answer(page).bounding_box()
    box = page.locator("#composer").bounding_box()
    assert last is not None and box is not None
    assert last["y"] + last["height"] <= box["y"] + 1

    page.get_by_role("button", name="Dismiss the demo notice").click()
    assert banner.is_hidden()
    reload(page)
    page.wait_for_timeout(200)
    assert banner.is_hidden(), "the dismissed demo banner came back"
    assert "demo model" in ask(page, "Still a demo?").inner_text()
