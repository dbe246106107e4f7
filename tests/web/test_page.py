"""The chat page at `GET /`, driven in headless Chromium against a live gateway and the fake OpenAI.

One browser serves the whole session; each test gets a fresh browser context
(so its own empty localStorage) and its own gateway.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.web.chat_page import Browser, last_answer, message_box, reload, send, wait_answer_done

pytestmark = pytest.mark.browser

MASTER_KEY = "page-test-master-key-0123456789"
WORDS = " ".join(f"word{i}" for i in range(40))


def test_answer_appears_in_visible_steps(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    text = "one two three four five six seven eight nine ten"
    fake.queue(Plan(text=text, chunk_interval=0.15))
    page = pages.open(gateway_factory().url)
    assert page.locator("#demo-banner").is_hidden()
    assert page.get_by_role("button", name="Access key").is_hidden()  # this server uses no keys

    box = message_box(page)
    box.fill("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    box.press("Enter")

    content = last_answer(page).locator(".content")
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shown = content.inner_text().strip()
        if shown and (not seen or seen[-1] != shown):
            seen.append(shown)
        if last_answer(page).locator(".meta").count():
            break
        time.sleep(0.05)
    assert len(seen) >= 4, f"the answer did not grow step by step: {seen}"
    assert all(text.startswith(step) for step in seen), seen
    assert seen[-1] == text

    usage = wait_answer_done(page).locator(".meta .usage")
    assert re.search(r"\d+ tokens \(7 in, 10 out\)", usage.inner_text())
    sent = fake.received[-1].body["messages"]
    assert sent[-1] == {"role": "user", "content": "line one\nline two"}
    assert page.locator(".message.user .bubble").inner_text() == "line one\nline two"
    assert box.input_value() == ""


@pytest.mark.parametrize("how", ["button", "Escape"])
def test_stop_ends_the_stream_and_the_upstream_call(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI, how: str
) -> None:
    fake.queue(Plan(text=WORDS, chunk_interval=0.15))
    page = pages.open(gateway_factory().url)
    send(page, "Tell me a long story")

    content = last_answer(page).locator(".content")
    page.wait_for_function(
        "() => document.querySelector('.message.assistant .content').innerText.includes('word2')"
    )
    if how == "button":
        page.get_by_role("button", name="Stop").click()
    else:
        message_box(page).press("Escape")

    assert fake.received[-1].closed_early.wait(5), "the gateway did not close the upstream call"
    notice = last_answer(page).locator(".notice")
    notice.wait_for()
    assert "You stopped this answer." in notice.inner_text()
    partial = content.inner_text()
    assert partial.startswith("word0 word1 word2")
    assert "word39" not in partial
    time.sleep(0.5)
    assert content.inner_text() == partial, "text kept arriving after Stop"
    assert page.get_by_role("button", name="Send").is_visible()
    # The server never counted this answer: the page says what it used, as an estimate.
    used = last_answer(page).locator(".meta .usage").inner_text()
    assert re.search(r"about \d+ tokens \(\d+ in, \d+ out, estimated\)", used), used


def test_model_system_prompt_and_history_reach_the_upstream(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    page = pages.open(gateway_factory().url)
    picker = page.get_by_label("Model")
    assert picker.input_value() == "gpt-4o-mini"
    options = picker.locator("option").all_inner_texts()
    assert options[:3] == ["gpt-4o", "gpt-4o-mini", "gpt-4-turbo"]

    send(page, "First question")
    wait_answer_done(page)
    assert fake.received[-1].body["model"] == "gpt-4o-mini"

    picker.select_option("gpt-4o")
    page.locator("#instructions summary").click()
    page.get_by_role("textbox", name="Instructions for the assistant").fill("Answer like a pirate.")
    send(page, "Second question")
    answer = wait_answer_done(page)

    body = fake.received[-1].body
    assert body["model"] == "gpt-4o"
    assert "gpt-4o ·" in answer.locator(".meta").inner_text()
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == "Answer like a pirate."
    assert body["messages"][1]["content"] == "First question"
    assert body["messages"][2]["content"].startswith("Hello from the fake upstream")


def test_reload_keeps_conversations_and_the_sidebar_manages_them(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    page = pages.open(gateway_factory().url)
    send(page, "Remember the first chat")
    wait_answer_done(page)
    page.get_by_role("button", name="New chat").click()
    assert page.locator(".message").count() == 0
    page.get_by_label("Model").select_option("gpt-4")
    send(page, "And a second one")
    wait_answer_done(page)

    page.get_by_role("button", name="Rename “And a second one”").click()
    rename = page.get_by_role("textbox", name="Conversation name")
    rename.fill("Renamed chat")
    rename.press("Enter")

    reload(page)
    titles = page.locator(".open-conversation").all_inner_texts()
    assert titles == ["Renamed chat", "Remember the first chat"]
    assert page.get_by_role("heading", level=1).inner_text() == "Renamed chat"
    assert page.locator(".message.user .bubble").inner_text() == "And a second one"
    assert "Hello from the fake upstream" in last_answer(page).inner_text()
    assert page.get_by_label("Model").input_value() == "gpt-4"

    page.get_by_role("button", name="Remember the first chat", exact=True).click()
    assert page.locator(".message.user .bubble").inner_text() == "Remember the first chat"
    assert page.get_by_label("Model").input_value() == "gpt-4o-mini"

    page.locator(".conversation", has_text="Renamed chat").hover()  # shows its buttons
    page.get_by_role("button", name="Delete “Renamed chat”").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    reload(page)
    assert page.locator(".open-conversation").all_inner_texts() == ["Remember the first chat"]


def test_model_output_cannot_run_script(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    hostile = (
        'Look: <img src=x onerror="window.__pwned=1"> '
        "<script>window.__pwned=2</script> "
        '<svg onload="window.__pwned=3"></svg> '
        "[click me](javascript:window.__pwned=4) "
        "![picture](x onerror=window.__pwned=5)\n\n"
        "```python\nprint('safe')\n```"
    )
    fake.queue(Plan(text=hostile))
    gateway = gateway_factory()
    page = pages.open(gateway.url)
    csp = page.request.get(gateway.url + "/").headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp

    send(page, "Say something nasty")
    answer = wait_answer_done(page)
    link = answer.get_by_text("click me")
    assert link.get_attribute("href") is None  # the javascript: URL was removed
    link.click()
    page.wait_for_timeout(300)  # time for any image error handler to fire

    assert page.evaluate("window.__pwned") is None
    assert page.locator("#messages img, #messages script, #messages svg").count() == 0
    assert page.locator("[onerror], [onload]").count() == 0
    assert page.locator("#messages a[href^='javascript']").count() == 0
    text = answer.locator(".content").inner_text()
    assert '<img src=x onerror="window.__pwned=1">' in text  # shown as text, inert
    # The code block is highlighted and has a copy button.
    assert answer.locator(".code-block .hljs-built_in").inner_text() == "print"
    assert answer.get_by_role("button", name="Copy python").is_visible()


def test_upstream_errors_keep_the_partial_answer(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    fake.queue(
        Plan(text=WORDS, error_event_after_chunks=4),
        Plan(status=429, headers={"retry-after": "7"}),
    )
    page = pages.open(gateway_factory().url)
    send(page, "Break in the middle")
    answer = wait_answer_done(page)
    assert answer.locator(".content").inner_text().startswith("word0 word1 word2")
    notice = answer.locator(".notice").inner_text()
    assert "incomplete" in notice

    answer.get_by_role("button", name="Try again").click()
    last_answer(page).get_by_text("try again in 7 seconds").wait_for()
    assert page.get_by_role("button", name="Try again").is_disabled()
    assert page.locator(".message.user").count() == 1


def test_phone_width_has_no_horizontal_scroll(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    wide = (
        "A long line of code:\n\n```python\nvalue = '" + "a" * 300 + "'\n```\n\n"
        "and a long link https://example.com/" + "b" * 200 + "\n\n"
        "| column one | column two | column three | column four | column five |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| some wide cell text | more wide cell text | and more | and more | and more |"
    )
    fake.queue(Plan(text=wide))
    page = pages.open(gateway_factory().url, width=375, height=740)
    send(page, "x" * 400)
    wait_answer_done(page)

    def scroll_width() -> int:
        return int(page.evaluate("document.documentElement.scrollWidth"))

    assert scroll_width() <= 375
    assert page.locator("#sidebar").is_hidden()
    page.get_by_role("button", name="Show conversations").click()
    page.get_by_role("button", name="New chat").wait_for(state="visible")
    assert scroll_width() <= 375
    page.get_by_role("button", name="Hide conversations").click()
    page.locator("#sidebar").wait_for(state="hidden")
    assert message_box(page).is_visible()


def test_page_is_served_with_its_assets(gateway_factory: GatewayFactory) -> None:
    """Every file the page loads is served by the gateway itself (no CDN, no build step)."""
    gateway = gateway_factory()
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        html = http.get("/").text
        local = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
        assert "/static/app.js" in local
        for path in local:
            assert http.get(path).status_code == 200, path
        assert not re.search(r'(?:src|href)="(?:https?:)?//', html)
        assert any(path.startswith("/static/vendor/") for path in local)
        for module in ("vendor/marked/marked.esm.js", "vendor/dompurify/purify.es.js"):
            script = http.get(f"/static/{module}")
            assert script.status_code == 200
            assert "javascript" in script.headers["content-type"]


def test_page_config_tells_the_page_about_keys_and_demo(gateway_factory: GatewayFactory) -> None:
    """`GET /page/config`: open, tiny, no secret, and not part of the documented API."""
    plain = gateway_factory()
    keyed = gateway_factory(master_key=MASTER_KEY, demo=True, openai_api_key=None)
    with httpx.Client(timeout=10) as http:
        assert http.get(plain.url + "/page/config").json() == {"keys": False, "demo": False}
        answer = http.get(keyed.url + "/page/config")
        assert answer.status_code == 200
        assert answer.json() == {"keys": True, "demo": True}
        assert MASTER_KEY not in answer.text
        assert "/page/config" not in http.get(plain.url + "/openapi.json").json()["paths"]
