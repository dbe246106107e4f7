"""The simple API, exactly as the contract describes it."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.servers import ServerThread
from tests.sse import json_events


@pytest.fixture
def gateway(shared_gateway: ServerThread) -> ServerThread:
    """These tests only read (a call and its answer): they share the module's gateway."""
    return shared_gateway


def test_health_reports_the_provider(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "healthy",
        "service": "OpenAI Chat API",
        "provider": "OpenAI",
        "integration": "openai-direct",
    }


def test_health_in_demo_mode(gateway_factory: GatewayFactory) -> None:
    server = gateway_factory(demo=True, openai_api_key=None)
    body = httpx.get(server.url + "/health").json()
    assert (body["status"], body["provider"], body["integration"]) == ("healthy", "demo", "demo")


def test_without_a_key_health_is_degraded_and_chat_says_how_to_fix(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    server = gateway_factory(openai_api_key=None)
    assert httpx.get(server.url + "/health").json()["status"] == "degraded"
    for path in ("/chat", "/chat/stream"):
        response = httpx.post(server.url + path, json={"message": "hi"})
        assert response.status_code == 503
        assert "OPENAI_API_KEY_CYB_SEC" in response.json()["error"]
        assert "CHAT_API_DEMO" in response.json()["error"]
    assert fake.hits == 0


def test_models_lists_the_allow_list_in_order(gateway_factory: GatewayFactory) -> None:
    server = gateway_factory(models=("gpt-4o", "o1-mini"), default_model="o1-mini")
    assert httpx.get(server.url + "/models").json() == {
        "models": ["gpt-4o", "o1-mini"],
        "default": "o1-mini",
    }


def test_api_describes_the_endpoints(client: httpx.Client) -> None:
    body = client.get("/api").json()
    assert body["name"] == "OpenAI Chat API"
    assert body["version"]
    assert "POST /chat" in body["endpoints"] and "GET /health" in body["endpoints"]


def test_chat_answers_with_conversation_and_usage(client: httpx.Client, fake: FakeOpenAI) -> None:
    history = [
        {"role": "user", "content": "Earlier question"},
        {"role": "assistant", "content": "Earlier answer"},
    ]
    response = client.post(
        "/chat",
        json={
            "message": "Hello?",
            "messages": history,
            "system": "Be brief.",
            "temperature": 0.2,
            "max_tokens": 50,
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert body["response"] == DEFAULT_TEXT
    assert body["model"] == "gpt-4o-mini"
    assert body["conversation"] == [
        *history,
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": DEFAULT_TEXT},
    ]
    words = len(DEFAULT_TEXT.split(" "))
    assert body["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": words,
        "total_tokens": 7 + words,
    }
    sent = fake.last().body
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][1:] == [*history, {"role": "user", "content": "Hello?"}]
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 50
    assert sent["model"] == "gpt-4o-mini"
    assert "stream" not in sent


def test_chat_echoes_the_model_asked_for(client: httpx.Client, fake: FakeOpenAI) -> None:
    assert (
        client.post("/chat", json={"message": "hi", "model": "gpt-4o"}).json()["model"] == "gpt-4o"
    )
    assert fake.last().body["model"] == "gpt-4o"


def test_chat_stream_sends_pieces_then_done(client: httpx.Client, fake: FakeOpenAI) -> None:
    with client.stream("POST", "/chat/stream", json={"message": "Hello?"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        received = json_events(response)
    pieces = [event["content"] for event in received[:-1]]
    assert "".join(pieces) == DEFAULT_TEXT
    assert len(pieces) == len(DEFAULT_TEXT.split(" "))
    done = received[-1]
    assert done["done"] is True and done["model"] == "gpt-4o-mini"
    assert done["usage"]["completion_tokens"] == len(pieces)
    assert fake.last().body["stream"] is True


def test_stream_error_after_start_is_an_error_event(client: httpx.Client, fake: FakeOpenAI) -> None:
    fake.queue(Plan(error_event_after_chunks=3))
    with client.stream("POST", "/chat/stream", json={"message": "hi"}) as response:
        assert response.status_code == 200
        received = json_events(response)
    assert [e["content"] for e in received[:-1]] == ["Hello", " from"]
    assert "error" in received[-1] and "done" not in received[-1]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ("{not json", 400, "not valid JSON"),
        ("", 400, "empty"),
        ("[1, 2]", 400, "JSON object"),
        ('{"model": "gpt-4o"}', 400, "'message' is required"),
        ('{"message": "   "}', 400, "'message' must not be blank"),
        ('{"message": "\\u001e\\ufeff"}', 400, "'message' must not be blank"),
        ('{"message": 5}', 400, "'message' must be text"),
        ('{"message": "hi", "max_tokens": "10"}', 400, "'max_tokens' must be a whole number"),
        ('{"message": "hi", "temperature": 7}', 400, "'temperature' is out of range"),
        (
            '{"message": "hi", "messages": [{"role": "wizard", "content": "x"}]}',
            400,
            "'messages[0].role' must be one of",
        ),
        ('{"message": "hi", "messages": "nope"}', 400, "'messages' must be a list"),
        ('{"message": "hi", "surprise": 1}', 400, "Unknown field 'surprise'"),
        ('{"message": "hi", "model": "gpt-99"}', 400, "not available here"),
        ('{"message": "hi", "max_tokens": 100000000}', 400, "'max_tokens' is too large"),
    ],
)
@pytest.mark.parametrize("path", ["/chat", "/chat/stream"])
def test_bad_requests_get_a_plain_sentence_and_never_reach_openai(
    client: httpx.Client, fake: FakeOpenAI, path: str, body: str, status: int, says: str
) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str) and says in error
    assert fake.hits == 0


def test_body_over_the_limit_is_413_with_or_without_length(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    server = gateway_factory(max_body_bytes=2048)
    big = '{"message": "' + "x" * 5000 + '"}'
    response = httpx.post(server.url + "/chat", content=big)
    assert response.status_code == 413
    assert "2048-byte limit" in response.json()["error"]

    def chunks():  # no Content-Length: chunked transfer
        for start in range(0, len(big), 500):
            yield big[start : start + 500].encode()

    response = httpx.post(server.url + "/chat", content=chunks())
    assert response.status_code == 413
    assert fake.hits == 0


def test_request_ids_travel_both_ways(client: httpx.Client, fake: FakeOpenAI) -> None:
    response = client.post("/chat", json={"message": "hi"}, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert fake.last().headers["x-request-id"] == "abc-123"
    assert response.headers["x-upstream-request-id"] == "req_fake_upstream"
    generated = client.get("/health").headers["x-request-id"]
    assert len(generated) == 32


def test_unknown_paths_and_methods_answer_plainly(client: httpx.Client) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and "nothing at /nope" in missing.json()["error"]
    wrong = client.get("/chat")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]


def test_security_headers_on_every_answer(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
