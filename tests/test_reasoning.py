"""Reasoning models just work: the gateway adapts what it sends; clients never notice."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, GatewayPool
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.servers import ServerThread
from tests.sse import events, json_events

REASONING = ("gpt-4o-mini", "o1-mini", "o1-preview")


@pytest.fixture
def server(shared_gateways: GatewayPool[ServerThread]) -> ServerThread:
    return shared_gateways.get(models=REASONING)


def assert_adapted(sent: dict[str, object], *, system: str, user: str, limit: int) -> None:
    messages = sent["messages"]
    assert isinstance(messages, list)
    assert all(m["role"] not in ("system", "developer") for m in messages)
    first_user = next(m for m in messages if m["role"] == "user")
    assert system in first_user["content"] and user in first_user["content"]
    assert first_user["content"].index(system) < first_user["content"].index(user)
    assert sent["max_completion_tokens"] == limit
    assert "max_tokens" not in sent
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        assert name not in sent


@pytest.mark.parametrize("model", ["o1-mini", "o1-preview"])
def test_simple_chat_to_a_reasoning_model_is_adapted(
    server: ServerThread, fake: FakeOpenAI, model: str
) -> None:
    response = httpx.post(
        server.url + "/chat",
        json={
            "message": "What is 2+2?",
            "model": model,
            "system": "Answer in French.",
            "messages": [
                {"role": "user", "content": "Earlier"},
                {"role": "assistant", "content": "Before"},
            ],
            "temperature": 0.5,
            "max_tokens": 300,
        },
        timeout=10,
    )
    assert response.status_code == 200
    assert response.json()["response"] == DEFAULT_TEXT
    assert response.json()["model"] == model
    sent = fake.last().body
    assert sent["model"] == model
    assert_adapted(sent, system="Answer in French.", user="Earlier", limit=300)
    # The conversation is otherwise unchanged, in order.
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][-1] == {"role": "user", "content": "What is 2+2?"}


def test_v1_request_to_a_reasoning_model_is_adapted(server: ServerThread, fake: FakeOpenAI) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        completion = sdk.chat.completions.create(
            model="o1-mini",
            messages=[
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Why is the sky blue?"},
            ],
            temperature=0.2,
            top_p=0.5,
            presence_penalty=0.1,
            max_tokens=120,
            seed=7,
        )
    assert completion.choices[0].message.content == DEFAULT_TEXT
    sent = fake.last().body
    assert_adapted(sent, system="Be terse.", user="Why is the sky blue?", limit=120)
    assert sent["seed"] == 7  # fields the model takes still pass through


def test_ordinary_models_are_left_alone(server: ServerThread, fake: FakeOpenAI) -> None:
    httpx.post(
        server.url + "/chat",
        json={"message": "hi", "system": "Sys.", "temperature": 0.5, "max_tokens": 30},
        timeout=10,
    )
    sent = fake.last().body
    assert sent["messages"][0] == {"role": "system", "content": "Sys."}
    assert sent["max_tokens"] == 30 and "max_completion_tokens" not in sent
    assert sent["temperature"] == 0.5


def test_simple_stream_from_a_model_that_cannot_stream(
    server: ServerThread, fake: FakeOpenAI
) -> None:
    with httpx.stream(
        "POST",
        server.url + "/chat/stream",
        json={"message": "hi", "model": "o1-mini", "system": "Sys."},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        received = json_events(response)
    sent = fake.last().body
    assert not sent.get("stream")
    assert "stream_options" not in sent
    assert all(m["role"] != "system" for m in sent["messages"])
    assert "".join(e.get("content", "") for e in received[:-1]) == DEFAULT_TEXT
    done = received[-1]
    assert done["done"] is True and done["model"] == "o1-mini"
    words = len(DEFAULT_TEXT.split(" "))
    assert done["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": words,
        "total_tokens": 7 + words,
    }


@pytest.mark.parametrize("include_usage", [False, True])
def test_sdk_stream_from_a_model_that_cannot_stream(
    server: ServerThread, fake: FakeOpenAI, include_usage: bool
) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="o1-preview",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": include_usage},
        )
        chunks = list(stream)
    assert not fake.last().body.get("stream")
    assert "stream_options" not in fake.last().body
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.id for c in chunks} == {"chatcmpl-fake123"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if include_usage else 0)


def test_v1_stream_from_a_model_that_cannot_stream_ends_with_done(
    server: ServerThread, fake: FakeOpenAI
) -> None:
    body = {"model": "o1-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        received = events(r)
    assert received[-1] == "[DONE]"
    chunk = json.loads(received[0])
    assert chunk["choices"][0]["delta"]["content"] == DEFAULT_TEXT


def test_a_long_think_is_kept_alive_with_pings(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    server = shared_gateways.get(models=REASONING, keepalive_interval=0.2)
    fake.queue(Plan(delay_before_headers=0.7))
    with httpx.stream(
        "POST", server.url + "/chat/stream", json={"message": "hi", "model": "o1-mini"}, timeout=10
    ) as response:
        raw = response.read().decode()
    assert raw.startswith(": ping\n\n")
    assert '"done":true' in raw.replace(" ", "")


def test_capabilities_from_settings_adapt_a_newer_model(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    server = shared_gateways.get(
        models=("gpt-5",),
        default_model="gpt-5",
        model_capabilities={"gpt-5": {"sampling": False, "token_field": "max_completion_tokens"}},
    )
    response = httpx.post(
        server.url + "/chat",
        json={"message": "hi", "system": "Sys.", "temperature": 0.4, "max_tokens": 64},
        timeout=10,
    )
    assert response.status_code == 200
    sent = fake.last().body
    assert sent["model"] == "gpt-5"
    assert sent["max_completion_tokens"] == 64 and "max_tokens" not in sent
    assert "temperature" not in sent
    assert sent["messages"][0] == {"role": "system", "content": "Sys."}  # system role kept


def test_capabilities_from_the_environment_change_an_ordinary_model(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpt-4.1` is an ordinary chat model until the operator says otherwise."""
    plain = gateway_factory(models=("gpt-4.1",), default_model="gpt-4.1")
    body = {"message": "hi", "system": "Sys.", "temperature": 0.4, "max_tokens": 64}
    httpx.post(plain.url + "/chat", json=body, timeout=10)
    assert fake.last().body["temperature"] == 0.4
    assert fake.last().body["max_tokens"] == 64

    monkeypatch.setenv(
        "CHAT_API_MODEL_CAPABILITIES",
        json.dumps(
            {
                "gpt-4.1": {
                    "system_role": False,
                    "streaming": False,
                    "sampling": False,
                    "token_field": "max_completion_tokens",
                }
            }
        ),
    )
    adapted = gateway_factory(models=("gpt-4.1",), default_model="gpt-4.1")
    httpx.post(adapted.url + "/chat", json=body, timeout=10)
    assert_adapted(fake.last().body, system="Sys.", user="hi", limit=64)
    with httpx.stream("POST", adapted.url + "/chat/stream", json=body, timeout=10) as response:
        received = json_events(response)
    assert not fake.last().body.get("stream")
    assert "".join(e.get("content", "") for e in received[:-1]) == DEFAULT_TEXT
    assert received[-1]["done"] is True
