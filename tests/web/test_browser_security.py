"""What a browser may do with the gateway, in headless Chromium.

A website the user visits must not drive a gateway with keys off (the
default of `make run`): its page, on another origin, tries every kind of
request and none reaches the upstream. The documentation pages run only the
gateway's own scripts.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread

pytestmark = pytest.mark.browser

ATTACK = """<!doctype html><html><body><script>
window.results = {};
async function attempt(name, url, init) {
  try {
    const response = await fetch(url, init);
    window.results[name] = "status " + response.status + ": " + (await response.text());
  } catch (error) {
    window.results[name] = "failed: " + error;
  }
}
window.attack = async (gateway) => {
  const v1 = JSON.stringify({messages: [{role: "user", content: "spend"}]});
  await Promise.all([
    // A "simple" request: sent without asking first, the answer hidden from the page.
    attempt("text-plain", gateway + "/chat", {method: "POST", body: '{"message": "spend"}'}),
    attempt("no-cors", gateway + "/v1/chat/completions",
            {method: "POST", mode: "no-cors", body: v1}),
    // A JSON request: the browser asks first (preflight).
    attempt("json", gateway + "/v1/chat/completions",
            {method: "POST", headers: {"Content-Type": "application/json"}, body: v1}),
    attempt("stream", gateway + "/chat/stream",
            {method: "POST", headers: {"Content-Type": "application/json"},
             body: '{"message": "spend"}'}),
  ]);
  return window.results;
};
</script></body></html>"""


async def attacker_site(scope: Scope, receive: Receive, send: Send) -> None:
    """Another website: one page, on another loopback port."""
    if scope["type"] != "http":
        return
    body = ATTACK.encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]}
    )
    await send({"type": "http.response.body", "body": body})


def _open(chromium: Any, url: str) -> tuple[Any, Any, list[tuple[str, str, bool]]]:
    """A page in a fresh context, and every request it made: (url, kind, answered)."""
    context = chromium.new_context()
    context.set_default_timeout(15_000)
    page = context.new_page()
    requests: list[tuple[str, str, bool]] = []
    page.on("requestfinished", lambda r: requests.append((r.url, r.resource_type, True)))
    page.on("requestfailed", lambda r: requests.append((r.url, r.resource_type, False)))
    page.goto(url)
    return context, page, requests


@pytest.mark.parametrize("keys", [False, True], ids=["keys-off", "keys-on"])
def test_a_page_on_another_origin_cannot_make_the_gateway_spend(
    browser: Any,
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
    keys: bool,
) -> None:
    gateway = gateway_factory(**({"master_key": "browser-test-master-key-0123"} if keys else {}))
    with ServerThread(attacker_site) as site:
        context, page, _ = _open(browser, site.url)
        try:
            results = page.evaluate("gateway => window.attack(gateway)", gateway.url)
        finally:
            context.close()
    print(json.dumps(results, indent=1))
    assert fake.hits == 0, results  # nothing was spent
    if not keys:
        for name, outcome in results.items():
            # The browser stopped it, or the gateway refused it and the page could not read it.
            assert outcome.startswith(("failed", "status 0")), (name, outcome)


def test_the_gateways_own_page_still_chats_with_keys_off(
    browser: Any,
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
) -> None:
    gateway = gateway_factory()
    context, page, _ = _open(browser, gateway.url)
    try:
        page.wait_for_selector("#model:not([disabled])")
        box = page.get_by_role("textbox", name="Message", exact=True)
        box.fill("hello")
        box.press("Enter")
        page.locator(".message.assistant .meta").last.wait_for()
    finally:
        context.close()
    assert fake.hits == 1  # the page's POST carried Origin, and was same-origin


@pytest.mark.parametrize(("path", "ready"), [("/docs", ".opblock"), ("/redoc", "h1")])
def test_the_docs_pages_load_no_third_party_script(
    browser: Any,
    gateway: ServerThread,
    path: str,
    ready: str,
) -> None:
    context, page, requests = _open(browser, gateway.url + path)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.wait_for_selector(ready)
        page.wait_for_load_state("networkidle")
    finally:
        context.close()
    own = (gateway.url, "blob:" + gateway.url)  # ReDoc's search worker is a blob it made
    others = [r for r in requests if not r[0].startswith(own)]
    # ReDoc shows its maker's logo from a CDN: an image, and the CSP blocks even that.
    assert all(kind == "image" and not answered for _, kind, answered in others), others
    scripts = [url for url, kind, _ in requests if kind == "script"]
    assert scripts and all(url.startswith(own) for url in scripts), scripts
    blocked = [e for e in errors if "Content Security Policy" in e and "image" not in e]
    assert blocked == [], blocked
