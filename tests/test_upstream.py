"""What clients see when the upstream misbehaves: the contract's status table, on both dialects."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.faults.conftest import wait_until
from tests.servers import ServerThread
from tests.sse import events

FAST_RETRY = {"retry-after-ms": "1"}  # the SDK's backoff honours it: keeps retries quick


@dataclass(frozen=True)
class Endpoint:
    """One way in: a dialect, streamed or not."""

    path: str
    stream: bool

    @property
    def openai_dialect(self) -> bool:
        return self.path.startswith("/v1/")

    def body(self, **extra: Any) -> dict[str, Any]:
        if self.openai_dialect:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **extra}
            if self.stream:
                body["stream"] = True
            return body
        return {"message": "hi", **extra}

    def __str__(self) -> str:
        return f"{self.path}{' stream' if self.stream and self.openai_dialect else ''}"


ENDPOINTS = [
    Endpoint("/chat", stream=False),
    Endpoint("/chat/stream", stream=True),
    Endpoint("/v1/chat/completions", stream=False),
    Endpoint("/v1/chat/completions", stream=True),
]
STREAMS = [e for e in ENDPOINTS if e.stream]
ids = str


def error_message(endpoint: Endpoint, payload: dict[str, Any]) -> str:
    """The human sentence of an error, in either dialect's shape."""
    error = payload["error"]
    if endpoint.openai_dialect:
        assert set(error) == {"message", "type", "param", "code"}
        message = error["message"]
    else:
        message = error
    assert isinstance(message, str) and message
    return message


def call(server: ServerThread, endpoint: Endpoint, **kwargs: Any) -> httpx.Response:
    """POST and read the whole answer (streams included)."""
    return httpx.post(server.url + endpoint.path, json=endpoint.body(), timeout=15, **kwargs)


def stream_events(server: ServerThread, endpoint: Endpoint) -> list[str]:
    with httpx.stream(
        "POST", server.url + endpoint.path, json=endpoint.body(), timeout=15
    ) as response:
        assert response.status_code == 200
        return events(response)


def assert_ends_with_error_event(endpoint: Endpoint, received: list[str]) -> str:
    """The stream's last event is an error in the dialect's shape, and nothing claims success."""
    assert received, "the stream had no events at all"
    assert "[DONE]" not in received
    last = json.loads(received[-1])
    assert set(last) == {"error"}, f"the stream ended without an error event: {last}"
    for data in received[:-1]:
        earlier = json.loads(data)
        assert "error" not in earlier and "done" not in earlier
    if endpoint.openai_dialect:
        assert isinstance(last["error"], dict)
        assert isinstance(last["error"]["message"], str) and last["error"]["message"]
        return str(last["error"]["message"])
    assert isinstance(last["error"], str) and last["error"]
    return str(last["error"])


# --- before the first byte: a status code ------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_upstream_rejecting_our_key_is_502(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    server = gateway_factory(openai_api_key="sk-wrong-key-that-the-fake-rejects-000")
    response = call(server, endpoint)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    message = error_message(endpoint, response.json())
    assert "rejected the server's key" in message
    assert fake.hits == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_upstream_5xx_is_retried_then_502(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    server = gateway_factory(upstream_retries=2)
    fake.queue(*[Plan(status=500, headers=FAST_RETRY) for _ in range(3)])
    response = call(server, endpoint)
    assert response.status_code == 502
    assert "status 500" in error_message(endpoint, response.json())
    assert fake.hits == 3


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_upstream_5xx_then_success_is_a_normal_answer(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    server = gateway_factory(upstream_retries=2)
    fake.queue(Plan(status=503, headers=FAST_RETRY))
    response = call(server, endpoint)
    assert response.status_code == 200
    assert DEFAULT_TEXT.split(" ")[-1] in response.text
    assert fake.hits == 2


@pytest.mark.parametrize("endpoint", [ENDPOINTS[0], ENDPOINTS[3]], ids=ids)
def test_upstream_429_with_retry_after_zero_is_retried(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    server = gateway_factory(upstream_retries=2)
    fake.queue(Plan(status=429, headers={"Retry-After": "0"}))
    response = call(server, endpoint)
    assert response.status_code == 200
    assert fake.hits == 2


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_upstream_still_rate_limiting_after_retries_is_429_with_retry_after(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    server = gateway_factory(upstream_retries=2)
    limited = Plan(status=429, headers={**FAST_RETRY, "Retry-After": "7"})
    fake.queue(limited, limited, limited)
    response = call(server, endpoint)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert error_message(endpoint, response.json())
    assert fake.hits == 3


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_upstream_that_never_answers_is_504(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    server = gateway_factory(upstream_timeout=0.5)
    fake.queue(Plan(delay_before_headers=3))
    response = call(server, endpoint)
    assert response.status_code == 504
    assert "in time" in error_message(endpoint, response.json())


# --- after the first byte: an error event, never a silent success -------------------


@pytest.mark.parametrize("endpoint", STREAMS, ids=ids)
def test_connection_dropped_mid_stream_ends_with_an_error_event(
    gateway: ServerThread, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    fake.queue(Plan(drop_after_chunks=3))
    received = stream_events(gateway, endpoint)
    assert len(received) >= 2, "the chunks before the drop should have arrived"
    assert_ends_with_error_event(endpoint, received)


@pytest.mark.parametrize("endpoint", STREAMS, ids=ids)
def test_stream_that_stops_without_done_or_finish_reason_is_an_error(
    gateway: ServerThread, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    head = {"id": "chatcmpl-cut", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    pieces = [
        {**head, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
        for word in ("Half", " an", " answer")
    ]
    fake.queue(Plan(raw_chunks=[b"data: " + json.dumps(p).encode() + b"\n\n" for p in pieces]))
    received = stream_events(gateway, endpoint)
    message = assert_ends_with_error_event(endpoint, received)
    assert "cut off" in message


@pytest.mark.parametrize("endpoint", STREAMS, ids=ids)
def test_malformed_upstream_event_ends_with_an_error_event(
    gateway: ServerThread, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    fake.queue(Plan(malformed_after_chunks=3))
    received = stream_events(gateway, endpoint)
    assert len(received) >= 2
    assert_ends_with_error_event(endpoint, received)


@pytest.mark.parametrize("endpoint", STREAMS, ids=ids)
def test_upstream_error_event_mid_stream_is_relayed_as_an_error_event(
    gateway: ServerThread, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    fake.queue(Plan(error_event_after_chunks=3))
    received = stream_events(gateway, endpoint)
    message = assert_ends_with_error_event(endpoint, received)
    assert "error while processing" in message


@pytest.mark.parametrize("endpoint", STREAMS, ids=ids)
def test_stall_mid_stream_ends_with_an_error_event(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    server = gateway_factory(upstream_timeout=0.5)
    fake.queue(Plan(stall_after_chunks=3))
    received = stream_events(server, endpoint)
    assert_ends_with_error_event(endpoint, received)
    assert fake.last().closed_early.wait(2), "the stalled upstream call was not closed"


def test_sdk_raises_on_a_broken_v1_stream(gateway: ServerThread, fake: FakeOpenAI) -> None:
    fake.queue(Plan(drop_after_chunks=3))
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass


# --- keep-alives, bytes, ids ------------------------------------------------------------


@pytest.mark.parametrize("endpoint", STREAMS, ids=ids)
def test_pings_keep_a_silent_stream_alive(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    server = gateway_factory(keepalive_interval=0.2)
    fake.queue(Plan(first_chunk_delay=0.7))
    with httpx.stream(
        "POST", server.url + endpoint.path, json=endpoint.body(), timeout=15
    ) as response:
        raw = response.read().decode()
    assert ": ping\n\n" in raw
    # The pings are comments between events, and the answer is still whole.
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    assert all(b.startswith(("data: ", ": ping")) for b in blocks)
    text = ""
    for block in blocks:
        if block.startswith("data: ") and block != "data: [DONE]":
            data = json.loads(block[6:])
            if endpoint.openai_dialect:
                text += "".join(c["delta"].get("content") or "" for c in data["choices"])
            else:
                text += data.get("content", "")
    assert text == DEFAULT_TEXT


def test_each_quiet_stream_is_pinged_and_a_busy_one_is_not(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    """One keep-alive clock serves every open stream, each by its own silence."""
    server = gateway_factory(keepalive_interval=0.5)
    raw: dict[str, str] = {}

    def read(name: str) -> None:
        with httpx.stream("POST", server.url + "/chat/stream", json={"message": name}) as response:
            raw[name] = response.read().decode()

    fake.queue(Plan(text=" ".join(["busy"] * 40), chunk_interval=0.05))
    busy = threading.Thread(target=read, args=("busy",))
    busy.start()
    assert wait_until(lambda: fake.hits == 1, 5)
    fake.queue(Plan(first_chunk_delay=2.0), Plan(first_chunk_delay=2.0))
    quiet = [threading.Thread(target=read, args=(name,)) for name in ("quiet-1", "quiet-2")]
    for thread in quiet:
        thread.start()
    for thread in (busy, *quiet):
        thread.join(15)
    assert raw["quiet-1"].count(": ping") >= 2 and raw["quiet-2"].count(": ping") >= 2
    assert ": ping" not in raw["busy"] and raw["busy"].count('"content"') == 40
    for answer in raw.values():
        assert json.loads(answer.strip().rsplit("data: ", 1)[1])["done"] is True


MULTIBYTE = "Grüße, 日本語 and 😀 — déjà vu"


def _split_raw_stream() -> list[bytes]:
    head = {"id": "chatcmpl-utf8", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    body = b"".join(
        b"data: " + json.dumps({**head, "choices": [choice]}, ensure_ascii=False).encode() + b"\n\n"
        for choice in (
            {
                "index": 0,
                "delta": {"role": "assistant", "content": MULTIBYTE},
                "finish_reason": None,
            },
            {"index": 0, "delta": {}, "finish_reason": "stop"},
        )
    )
    body += b"data: [DONE]\n\n"
    # Cut inside every multi-byte character: one byte per network chunk around them.
    cuts: list[bytes] = []
    start = 0
    for index in range(1, len(body)):
        if body[index] & 0xC0 == 0x80:  # a UTF-8 continuation byte
            cuts.append(body[start:index])
            start = index
    cuts.append(body[start:])
    assert len(cuts) > 10
    return cuts


@pytest.mark.parametrize("endpoint", STREAMS, ids=ids)
def test_utf8_split_across_network_chunks_is_reassembled(
    gateway: ServerThread, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    fake.queue(Plan(raw_chunks=_split_raw_stream(), chunk_interval=0.001))
    received = stream_events(gateway, endpoint)
    if endpoint.openai_dialect:
        assert received[-1] == "[DONE]"
        chunks = [json.loads(d) for d in received[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        chunks = [json.loads(d) for d in received]
        assert chunks[-1].get("done") is True
        text = "".join(c.get("content", "") for c in chunks[:-1])
    assert text == MULTIBYTE
    assert "\ufffd" not in "".join(received)


def test_utf8_split_through_the_sdk(gateway: ServerThread, fake: FakeOpenAI) -> None:
    fake.queue(Plan(raw_chunks=_split_raw_stream(), chunk_interval=0.001))
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == MULTIBYTE


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_request_ids_go_upstream_and_the_upstream_id_comes_back(
    gateway: ServerThread, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    response = call(gateway, endpoint, headers={"X-Request-ID": "client-req-42"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "client-req-42"
    assert fake.last().headers["x-request-id"] == "client-req-42"
    assert response.headers.get("x-upstream-request-id") == "req_fake_upstream"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_a_generated_request_id_is_the_one_sent_upstream(
    gateway: ServerThread, fake: FakeOpenAI, endpoint: Endpoint
) -> None:
    response = call(gateway, endpoint)
    ours = response.headers["x-request-id"]
    assert ours and fake.last().headers["x-request-id"] == ours
