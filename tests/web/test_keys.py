"""The chat page in front of a gateway that uses access keys (a master key and client keys)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI
from tests.keys.conftest import MASTER, auth, make_key
from tests.web.chat_page import Browser, ask, last_answer, reload, send

pytestmark = pytest.mark.browser


def test_the_page_asks_for_a_key_checks_it_and_explains_a_wrong_one(
    pages: Browser, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    gateway = gateway_factory(master_key=MASTER)
    key, key_id = make_key(gateway.url, name="page")
    page = pages.open(gateway.url)
    sent_keys: list[str | None] = []
    page.on(
        "request",
        lambda request: (
            sent_keys.append(request.headers.get("authorization"))
            if request.url.endswith("/chat/stream")
            else None
        ),
    )

    # Asked on load, before any message failed.
    dialog = page.get_by_role("dialog", name="Access key")
    dialog.wait_for()
    assert "asks for an access key" in dialog.inner_text()
    assert page.get_by_role("button", name="Access key").is_visible()

    # A wrong key is explained in plain words and not kept.
    dialog.get_by_label("Access key").fill("cak_not-the-right-key-at-all")
    dialog.get_by_role("button", name="Save").click()
    problem = dialog.get_by_role("alert")
    problem.get_by_text("That key was not accepted").wait_for()
    assert "Authorization" not in problem.inner_text()
    assert dialog.is_visible()
    reload(page)
    dialog.wait_for()
    assert "A key is saved" not in dialog.inner_text()

    # Without a key, a message gets a plain explanation, and the dialog sends it once a key is in.
    dialog.get_by_role("button", name="Cancel").click()
    send(page, "Hello behind a key")
    dialog.wait_for()
    notice = last_answer(page).locator(".notice").inner_text()
    assert "needs an access key" in notice
    assert "Authorization" not in notice
    assert fake.hits == 0
    dialog.get_by_label("Access key").fill(key)
    dialog.get_by_role("button", name="Save and send").click()
    last_answer(page).get_by_text("Hello from the fake upstream").wait_for()
    last_answer(page).locator(".meta").wait_for()
    assert dialog.is_hidden()
    assert page.locator(".message.user").count() == 1  # the retry replaced the failed turn
    assert page.get_by_role("button", name="Access key saved").is_visible()
    assert sent_keys == [None, f"Bearer {key}"]

    # Kept across a reload: no question asked, the key is sent.
    reload(page)
    page.wait_for_timeout(300)  # time for the saved key's check on load
    assert dialog.is_hidden()
    ask(page, "Still there?")
    assert fake.hits == 2

    # Revoked while in use: the page says so, forgets it, and asks for another.
    revoked = httpx.delete(gateway.url + f"/admin/keys/{key_id}", headers=auth(MASTER))
    assert revoked.status_code == 200
    send(page, "And now?")
    dialog.wait_for()
    assert "That key was not accepted" in last_answer(page).locator(".notice").inner_text()
    assert "That key was not accepted" in dialog.get_by_role("alert").inner_text()
    assert page.get_by_role("button", name="Access key", exact=True).is_visible()
    second, second_id = make_key(gateway.url, name="page, again")
    dialog.get_by_label("Access key").fill(second)
    dialog.get_by_role("button", name="Save and send").click()
    last_answer(page).get_by_text("Hello from the fake upstream").wait_for()
    assert page.locator(".message.user").count() == 3
    assert fake.hits == 3

    # Revoked while the page was closed: said on load.
    httpx.delete(gateway.url + f"/admin/keys/{second_id}", headers=auth(MASTER))
    reload(page)
    dialog.wait_for()
    assert "no longer accepted" in dialog.get_by_role("alert").inner_text()
