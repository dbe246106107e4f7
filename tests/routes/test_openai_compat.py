"""The OpenAI-compatible API under /v1, driven by the real `openai` Python SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.servers import ServerThread
from tests.sse import events

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_CALL: dict[str, Any] = {
    "id": "call_abc123",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
}
HELLO = [{"role": "user", "content": "Hello?"}]


@pytest.fixture
def gateway(shared_gateway: ServerThread) -> ServerThread:
    """These tests only read (a call and its answer): they share the module's gateway."""
    return shared_gateway


@pytest.fixture
def sdk(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key="anything", max_retries=0, timeout=10
    ) as client:
        yield client


# --- whole answers --------------------------------------------------------------


def test_sdk_gets_a_whole_completion(sdk: openai.OpenAI, fake: FakeOpenAI) -> None:
    completion = sdk.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert completion.object == "chat.completion"
    assert completion.id == "chatcmpl-fake123"
    assert completion.created == 1700000000
    assert completion.model == "gpt-4o"
    assert completion.system_fingerprint == "fp_fake"
    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens == 7
    sent = fake.last().body
    assert sent["model"] == "gpt-4o" and sent["messages"] == HELLO
    assert "stream" not in sent or sent["stream"] is False
    # The operator's key went upstream, not the client's.
    assert fake.last().headers["authorization"] == f"Bearer {fake.api_key}"


def test_default_model_is_used_when_none_is_named(client: httpx.Client, fake: FakeOpenAI) -> None:
    response = client.post("/v1/chat/completions", json={"messages": HELLO})
    assert response.status_code == 200
    assert response.json()["model"] == "gpt-4o-mini"
    assert fake.last().body["model"] == "gpt-4o-mini"


def test_tool_call_in_a_whole_answer(sdk: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]))
    completion = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, tools=[WEATHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id == "call_abc123"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_every_extra_field_is_passed_through_unchanged(
    sdk: openai.OpenAI, fake: FakeOpenAI
) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": False},
    }
    completion = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        response_format=response_format,
        n=2,
        stop=["\n\n", "END"],
        seed=42,
        logprobs=True,
        top_logprobs=3,
        user="user-1234",
        temperature=0.3,
        top_p=0.9,
        max_tokens=77,
        extra_body={"some_future_field": {"nested": [1, 2, 3]}},
    )
    assert len(completion.choices) == 2
    sent = fake.last().body
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["tool_choice"] == "auto"
    assert sent["response_format"] == response_format
    assert sent["n"] == 2
    assert sent["stop"] == ["\n\n", "END"]
    assert sent["seed"] == 42
    assert sent["logprobs"] is True and sent["top_logprobs"] == 3
    assert sent["user"] == "user-1234"
    assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9
    assert sent["max_tokens"] == 77
    assert sent["some_future_field"] == {"nested": [1, 2, 3]}


# --- streams ---------------------------------------------------------------------


def test_sdk_stream_is_relayed_faithfully(sdk: openai.OpenAI, fake: FakeOpenAI) -> None:
    stream = sdk.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    chunks = list(stream)
    assert chunks, "the stream was empty"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert {c.id for c in chunks} == {"chatcmpl-fake123"}
    assert {c.created for c in chunks} == {1700000000}
    assert {c.model for c in chunks} == {"gpt-4o"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    # The client did not ask for usage, so it gets no usage chunk ...
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # ... but the gateway always asked upstream for it.
    sent = fake.last().body
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


def test_stream_ends_with_done_on_the_wire(client: httpx.Client) -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        received = events(response)
    assert received[-1] == "[DONE]"
    assert received.count("[DONE]") == 1
    chunks = [json.loads(data) for data in received[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == DEFAULT_TEXT


def test_usage_chunk_is_forwarded_when_the_client_asks(
    sdk: openai.OpenAI, fake: FakeOpenAI
) -> None:
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    words = len(DEFAULT_TEXT.split(" "))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, words)
    assert last.usage.total_tokens == 7 + words
    assert sum(1 for c in chunks if c.usage is not None) == 1
    assert fake.last().body["stream_options"] == {"include_usage": True}


def test_tool_call_deltas_are_relayed_and_accumulate(sdk: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]))
    with sdk.chat.completions.stream(
        model="gpt-4o-mini", messages=HELLO, tools=[WEATHER_TOOL]
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id == "call_abc123"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert fake.last().body["tools"] == [WEATHER_TOOL]


# --- models ----------------------------------------------------------------------


def test_models_list_and_retrieve(gateway_factory: GatewayFactory) -> None:
    server = gateway_factory(models=("gpt-4o", "o1-mini", "gpt-4o-mini"))
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        listed = sdk.models.list()
        assert [m.id for m in listed.data] == [
            "gpt-4o",
            "o1-mini",
            "gpt-4o-mini",
            "text-embedding-3-small",  # the embedding models follow the chat models
            "text-embedding-3-large",
        ]
        assert {m.object for m in listed.data} == {"model"}
        one = sdk.models.retrieve("o1-mini")
        assert one.id == "o1-mini" and one.object == "model"
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.models.retrieve("gpt-4")
        assert missing.value.code == "model_not_found"


def test_model_outside_the_allow_list_is_not_found(sdk: openai.OpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-99-ultra", messages=HELLO)
    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"
    assert raised.value.param == "model"
    assert "gpt-99-ultra" in raised.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-99-ultra", messages=HELLO, stream=True)
    assert fake.hits == 0


# --- errors ------------------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param("{not json", None, "not valid JSON", id="bad-json"),
    pytest.param('{"model": "gpt-4o-mini"}', "messages", "messages", id="messages-missing"),
    pytest.param('{"messages": []}', "messages", "messages", id="messages-empty"),
    pytest.param(
        '{"messages": [{"role": "wizard", "content": "hi"}]}',
        "messages[0].role",
        "role",
        id="bad-role",
    ),
    pytest.param(
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}',
        "max_tokens",
        "too large",
        id="max-tokens-too-big",
    ),
    pytest.param(
        '{"messages": [{"role": "user", "content": "hi"}], "n": 1000}',
        "n",
        "too large",
        id="n-too-big",
    ),
    pytest.param(
        '{"messages": [{"role": "user", "content": "hi"}], "api_key": "sk-mine"}',
        "api_key",
        "api_key",
        id="api-key",
    ),
    pytest.param(
        '{"messages": [{"role": "user", "content": "hi"}], "base_url": "http://evil.example"}',
        "base_url",
        "base_url",
        id="base-url",
    ),
    pytest.param(
        '{"messages": [{"role": "user", "content": "hi"}], '
        '"stream_options": {"include_usage": "yes"}}',
        "stream_options.include_usage",
        "true or false",
        id="include-usage-not-bool",
    ),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("body", "param", "says"), BAD_REQUESTS)
def test_bad_requests_get_openai_shaped_errors_and_never_reach_openai(
    client: httpx.Client,
    fake: FakeOpenAI,
    body: str,
    param: str | None,
    says: str,
    stream: bool,
) -> None:
    if stream and body.startswith("{") and body != "{not json":
        body = body[:-1] + ', "stream": true}'
    response = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and says in error["message"]
    assert fake.hits == 0


def test_sdk_sees_a_bad_request_error(sdk: openai.OpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert raised.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as forbidden:
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, extra_body={"base_url": "http://evil.example"}
        )
    assert forbidden.value.param == "base_url"
    assert fake.hits == 0


def test_fields_that_change_who_pays_pass_through_by_default(
    gateway: ServerThread, fake: FakeOpenAI
) -> None:
    fields = {
        "store": True,
        "metadata": {"team": "a"},
        "user": "u-1",
        "service_tier": "priority",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
    }
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], **fields
        )
    sent = fake.last().body
    assert {name: sent[name] for name in fields} == fields


def test_the_operator_can_drop_or_refuse_each_field(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    server = gateway_factory(field_policy={"store": "drop", "service_tier": "refuse"})
    messages = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, store=True, metadata={"a": "b"}
        )
        assert "store" not in fake.last().body
        assert fake.last().body["metadata"] == {"a": "b"}  # not named: passed on
        hits = fake.hits
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=messages,
                    service_tier="flex",
                    stream=stream,  # type: ignore[call-overload]
                )
            error = refused.value.body
            assert isinstance(error, dict)
            assert (error["code"], error["param"]) == ("unsupported_parameter", "service_tier")
            assert "'service_tier'" in error["message"]
        assert fake.hits == hits
