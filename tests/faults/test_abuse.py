"""Abuse: each hostile request is a clear 4xx before any upstream call (the fake's hit count)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.clock import Clock
from tests.conftest import GatewayPool
from tests.endpoints import Endpoint, error_message
from tests.fakes.openai_server import FakeOpenAI
from tests.faults.conftest import Gateway, GatewayMaker, size
from tests.keys.conftest import MASTER, auth, make_key

pytestmark = pytest.mark.faults

V1 = "/v1/chat/completions"
USER = {"role": "user", "content": "hi"}


def _raw_post(url: str, content: bytes, **kwargs: Any) -> httpx.Response:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(url, content=content, headers=headers, timeout=30, **kwargs)


def _nested(depth: int) -> bytes:
    return b'{"messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth + b"}]}"


def _v1(**fields: Any) -> bytes:
    return json.dumps({"messages": [USER], **fields}).encode()


CASES = [
    # (id, path, body, status, words in the message)
    # Past the 32 MiB default (which fits OpenAI's own limits for inline images and files).
    ("34MB-body", V1, _v1(pad="x" * 34_000_000), 413, "larger than"),
    ("34MB-body-simple", "/chat", json.dumps({"message": "x" * 34_000_000}).encode(), 413, "limit"),
    (
        "10000-messages",
        V1,
        json.dumps({"messages": [USER] * 10_000}).encode(),
        400,
        "Too many messages",
    ),
    (
        "10000-messages-simple",
        "/chat",
        json.dumps({"message": "hi", "messages": [USER] * 10_000}).encode(),
        400,
        "Too many messages",
    ),
    ("max_tokens-1e9", V1, _v1(max_tokens=10**9), 400, "max_tokens' is too large"),
    (
        "max_completion_tokens-1e9",
        V1,
        _v1(max_completion_tokens=10**9),
        400,
        "too large",
    ),
    (
        "max_tokens-1e9-simple",
        "/chat",
        json.dumps({"message": "hi", "max_tokens": 10**9}).encode(),
        400,
        "max_tokens",
    ),
    ("n-128", V1, _v1(n=128), 400, "'n' is too large"),
    ("nested-10000", V1, _nested(10_000), 400, "not valid JSON"),
    (
        "nested-10000-simple",
        "/chat",
        b'{"message": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        400,
        "JSON",
    ),
    (
        "invalid-utf8",
        V1,
        b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3("}]}',
        400,
        "JSON",
    ),
    ("invalid-utf8-simple", "/chat", b'{"message": "caf\xe9 \xc0\xaf"}', 400, "JSON"),
    ("base_url", V1, _v1(base_url="http://evil.example/v1"), 400, "'base_url' cannot be set"),
    ("api_key", V1, _v1(api_key="sk-attacker-key-00000000"), 400, "'api_key' cannot be set"),
    ("organization", V1, _v1(organization="org-evil"), 400, "'organization' cannot be set"),
    ("api_base", V1, _v1(api_base="http://evil.example"), 400, "cannot be set"),
    ("extra_headers", V1, _v1(extra_headers={"Authorization": "x"}), 400, "cannot be set"),
    (
        "base_url-simple",
        "/chat",
        json.dumps({"message": "hi", "base_url": "http://evil.example"}).encode(),
        400,
        "Unknown field 'base_url'",
    ),
    (
        "api_key-simple",
        "/chat/stream",
        json.dumps({"message": "hi", "api_key": "sk-attacker-key-00000000"}).encode(),
        400,
        "Unknown field 'api_key'",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_hostile_bodies_are_refused_before_the_upstream(
    pooled: GatewayPool[Gateway],
    fake: FakeOpenAI,
    path: str,
    body: bytes,
    status: int,
    words: str,
    stream: bool,
) -> None:
    if stream:
        if path == V1 and body.startswith(b'{"messages": [{"role": "user", "content": "hi"}]'):
            body = body[:-1] + b', "stream": true}'
        elif path == "/chat":
            path = "/chat/stream"
    server = pooled.get()  # the requests only read: one gateway for every case
    response = _raw_post(server.url + path, body)
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    assert words in error_message(Endpoint(path, stream), response.json())
    assert fake.hits == 0, "the hostile request reached the upstream"


def test_a_40mb_body_without_content_length_is_cut_off_at_the_limit(
    gw: GatewayMaker, fake: FakeOpenAI
) -> None:
    server = gw()

    def chunks() -> Any:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(640):
            yield b"x" * 65536
        yield b'"}]}'

    response = httpx.post(
        server.url + V1,
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert fake.hits == 0


def test_1000_bad_keys_a_minute_from_one_address_are_throttled(
    gw: GatewayMaker, fake: FakeOpenAI, moved_clock: Clock
) -> None:
    server = gw(master_key=MASTER, auth_failures_per_minute=30)
    good, _ = make_key(server.url)
    moved_clock.to_minute_start()  # failures are counted per clock minute: all in this one
    statuses: list[int] = []
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for i in range(size(1000, 200)):
            guess = f"cak_guess{i:06d}" + "A" * 33
            response = http.post("/chat", json={"message": "hi"}, headers=auth(guess))
            statuses.append(response.status_code)
            assert guess not in response.text
        took = time.monotonic() - started
        refused = http.post("/chat", json={"message": "hi"}, headers=auth("cak_one-more-guess"))
        served = http.post("/chat", json={"message": "hi"}, headers=auth(good))
    print(
        f"{len(statuses)} wrong keys in {took:.1f} s: {statuses.count(401)} x 401, "
        f"{statuses.count(429)} x 429"
    )
    assert statuses[:30] == [401] * 30
    assert set(statuses[30:]) == {429}
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "failed attempts" in refused.json()["error"]
    # The guesser is slowed down, never the people with a valid key at that address.
    assert served.status_code == 200
    assert fake.hits == 1


def test_a_key_never_reads_another_keys_usage(gw: GatewayMaker, fake: FakeOpenAI) -> None:
    server = gw(master_key=MASTER)
    key_a, id_a = make_key(server.url, name="a")
    key_b, id_b = make_key(server.url, name="b")
    for _ in range(3):
        assert httpx.post(
            server.url + "/chat", json={"message": "b spends"}, headers=auth(key_b)
        ).is_success
    hits = fake.hits
    mine = httpx.get(server.url + "/usage", headers=auth(key_a)).json()
    assert mine["key"]["id"] == id_a and mine["totals"]["requests"] == 0
    # Every way of asking for B's numbers with A's key:
    for url in (
        f"/usage?key_id={id_b}",
        f"/usage?key={id_b}",
        f"/admin/usage?key_id={id_b}",
        "/admin/usage",
        f"/admin/keys/{id_b}",
        "/admin/keys",
    ):
        response = httpx.get(server.url + url, headers=auth(key_a))
        if url.startswith("/usage"):
            assert response.status_code == 200
            assert response.json()["key"]["id"] == id_a
            assert response.json()["totals"]["requests"] == 0
        else:
            assert response.status_code == 403, url
        assert id_b not in response.text
    revoke = httpx.delete(server.url + f"/admin/keys/{id_b}", headers=auth(key_a))
    assert revoke.status_code == 403
    theirs = httpx.get(server.url + "/usage", headers=auth(key_b)).json()
    assert theirs["totals"]["requests"] == 3  # B's own view is intact
    assert fake.hits == hits
