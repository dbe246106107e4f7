"""Both upstream clients behave the same: aiohttp (the default) and the official SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.sse import json_events

CLIENTS = ["aiohttp", "sdk"]


@pytest.mark.parametrize("upstream_client", CLIENTS)
def test_answers_streams_and_usage(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, upstream_client: str
) -> None:
    server = gateway_factory(upstream_client=upstream_client)
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    answer = sdk.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == DEFAULT_TEXT
    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7
    sent = fake.last()
    assert sent.headers["authorization"] == f"Bearer {fake.api_key}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("upstream_client", CLIENTS)
def test_retries_and_errors(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, upstream_client: str
) -> None:
    server = gateway_factory(upstream_client=upstream_client, upstream_retries=2)
    chat = server.url + "/chat"
    fake.queue(Plan(status=500), Plan(status=503))
    assert httpx.post(chat, json={"message": "hi"}, timeout=30).status_code == 200
    assert fake.hits == 3
    fake.queue(*[Plan(status=429, headers={"Retry-After": "0.1"}) for _ in range(3)])
    limited = httpx.post(chat, json={"message": "hi"}, timeout=30)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    fake.queue(Plan(status=401))
    rejected = httpx.post(chat, json={"message": "hi"}, timeout=30)
    assert rejected.status_code == 502 and "rejected the server's key" in rejected.json()["error"]
    fake.queue(
        Plan(
            status=400,
            error_body={
                "error": {"message": "bad tool", "type": "x", "param": "tools", "code": "invalid"}
            },
        )
    )
    bad = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert bad.status_code == 400
    assert bad.json()["error"] == {
        "message": "bad tool",
        "type": "invalid_request_error",
        "param": "tools",
        "code": "invalid",
    }


@pytest.mark.parametrize("upstream_client", CLIENTS)
def test_timeouts_and_broken_streams(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, upstream_client: str
) -> None:
    server = gateway_factory(upstream_client=upstream_client, upstream_timeout=0.5)
    fake.queue(Plan(delay_before_headers=2))
    assert httpx.post(server.url + "/chat", json={"message": "hi"}, timeout=30).status_code == 504
    fake.queue(Plan(drop_after_chunks=3))
    with httpx.stream("POST", server.url + "/chat/stream", json={"message": "hi"}) as response:
        events = json_events(response)
    assert "error" in events[-1] and all("done" not in e for e in events)
    fake.queue(Plan(stall_after_chunks=2))
    with httpx.stream("POST", server.url + "/chat/stream", json={"message": "hi"}) as response:
        events = json_events(response)
    assert "error" in events[-1]
    assert fake.last().closed_early.wait(3)


@pytest.mark.parametrize("upstream_client", CLIENTS)
def test_a_client_that_leaves_closes_the_upstream(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, upstream_client: str
) -> None:
    server = gateway_factory(upstream_client=upstream_client)
    fake.queue(Plan(text=" ".join(["word"] * 100), chunk_interval=0.05))
    with httpx.stream("POST", server.url + "/chat/stream", json={"message": "hi"}) as response:
        for number, _ in enumerate(response.iter_lines()):
            if number > 6:
                break
    assert fake.last().closed_early.wait(2)
    fake.queue(Plan(delay_before_headers=3))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/chat/stream", json={"message": "hi"}, timeout=0.5)
    assert fake.last().closed_early.wait(2)  # gone before the headers: closed at once too
