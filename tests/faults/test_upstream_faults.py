"""Upstream faults: what a client sees when OpenAI (or whatever stands in for it) misbehaves."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.faults.conftest import GatewayMaker, ledger_rows, proc_stats, wait_until
from tests.faults.raw_upstream import RawUpstream
from tests.ops.conftest import Spawn
from tests.sse import events

pytestmark = pytest.mark.faults

CLIENTS = ["aiohttp", "sdk"]  # CHAT_API_UPSTREAM_CLIENT: the default, and the OpenAI SDK


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def gw(gw: GatewayMaker, client: str) -> GatewayMaker:
    """Every upstream fault, through each upstream client the gateway can use."""

    def start(**overrides: Any) -> Any:
        return gw(upstream_client=client, **overrides)

    return start


FAST_RETRY = {"retry-after-ms": "5"}
V1 = "/v1/chat/completions"
SIMPLE_STREAM = "/chat/stream"


def body_for(path: str, *, stream: bool) -> dict[str, Any]:
    if path.startswith("/v1/"):
        return {"messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return {"message": "hi"}


STREAM_PATHS = [pytest.param(SIMPLE_STREAM, id="simple"), pytest.param(V1, id="v1")]
ALL_CALLS = [
    pytest.param("/chat", False, id="simple"),
    pytest.param(SIMPLE_STREAM, True, id="simple-stream"),
    pytest.param(V1, False, id="v1"),
    pytest.param(V1, True, id="v1-stream"),
]


def stream(url: str, path: str, timeout: float = 15) -> tuple[int, list[str], float]:
    """(status, events, seconds) of one streamed call."""
    started = time.monotonic()
    with httpx.stream("POST", url + path, json=body_for(path, stream=True), timeout=timeout) as r:
        found = events(r) if r.status_code == 200 else [r.read().decode()]
        return r.status_code, found, time.monotonic() - started


def last_error(path: str, found: list[str]) -> str:
    """The message of the error event that ends a stream (nothing after it, no [DONE])."""
    assert found and "[DONE]" not in found
    last = json.loads(found[-1])
    assert set(last) == {"error"}, last
    error = last["error"]
    return str(error["message"] if path.startswith("/v1/") else error)


def message_of(path: str, response: httpx.Response) -> str:
    error = response.json()["error"]
    return str(error["message"] if path.startswith("/v1/") else error)


def contents(path: str, found: list[str]) -> str:
    text = ""
    for data in found:
        if data == "[DONE]":
            continue
        event = json.loads(data)
        if path.startswith("/v1/"):
            for choice in event.get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += event.get("content", "")
    return text


# --- before the first byte: a status code ------------------------------------------------


@pytest.mark.parametrize(("path", "streamed"), ALL_CALLS)
def test_upstream_429_is_retried_then_429_with_its_retry_after(
    gw: GatewayMaker, fake: FakeOpenAI, path: str, streamed: bool
) -> None:
    server = gw(upstream_retries=2)
    fake.queue(*[Plan(status=429, headers={"Retry-After": "7", **FAST_RETRY}) for _ in range(3)])
    response = httpx.post(server.url + path, json=body_for(path, stream=streamed), timeout=15)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert "rate-limiting" in message_of(path, response)
    assert fake.hits == 3  # one call and two retries, then the client is told


@pytest.mark.parametrize(("path", "streamed"), ALL_CALLS)
def test_upstream_5xx_before_headers_is_502(
    gw: GatewayMaker, fake: FakeOpenAI, path: str, streamed: bool
) -> None:
    server = gw(upstream_retries=1)
    fake.queue(Plan(status=503, headers=FAST_RETRY), Plan(status=500, headers=FAST_RETRY))
    response = httpx.post(server.url + path, json=body_for(path, stream=streamed), timeout=15)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert "status 500" in message_of(path, response)
    assert fake.hits == 2


@pytest.mark.parametrize(("path", "streamed"), ALL_CALLS)
def test_upstream_closing_before_any_header_is_502(
    gw: GatewayMaker, path: str, streamed: bool
) -> None:
    with RawUpstream("close") as raw:
        server = gw(openai_base_url=raw.url, upstream_retries=1)
        response = httpx.post(server.url + path, json=body_for(path, stream=streamed), timeout=15)
        assert response.status_code == 502
        assert "connection" in message_of(path, response)
        assert len(raw.connections) == 2  # retried once, before any byte reached the client


@pytest.mark.parametrize(("path", "streamed"), ALL_CALLS)
def test_upstream_sending_no_headers_at_all_is_504_at_the_deadline(
    gw: GatewayMaker, tmp_path: Path, path: str, streamed: bool
) -> None:
    with RawUpstream("silent") as raw:
        server = gw(openai_base_url=raw.url, upstream_timeout=1.0)
        started = time.monotonic()
        response = httpx.post(server.url + path, json=body_for(path, stream=streamed), timeout=15)
        took = time.monotonic() - started
        assert response.status_code == 504
        assert "in time" in message_of(path, response)
        assert 0.9 <= took < 3.0
        # the gateway let go of the upstream socket
        assert raw.connections[0].closed_by_peer.wait(2)
    assert wait_until(lambda: len(ledger_rows(tmp_path / "gateway.db")) == 1, 5)
    assert ledger_rows(tmp_path / "gateway.db")[0]["outcome"] == "timeout"


# --- after the first byte: an error event ------------------------------------------------


@pytest.mark.parametrize("path", STREAM_PATHS)
def test_error_event_after_200_ends_the_stream_with_an_error_event(
    gw: GatewayMaker, fake: FakeOpenAI, tmp_path: Path, path: str
) -> None:
    server = gw()
    fake.queue(Plan(error_event_after_chunks=3))
    status, found, _ = stream(server.url, path)
    assert status == 200
    assert contents(path, found) == "Hello from"
    assert "OpenAI stopped the answer" in last_error(path, found)
    assert wait_until(lambda: len(ledger_rows(tmp_path / "gateway.db")) == 1, 5)
    assert ledger_rows(tmp_path / "gateway.db")[0]["outcome"] == "upstream_error"


@pytest.mark.parametrize("path", STREAM_PATHS)
def test_connection_reset_after_n_chunks_ends_with_an_error_event(
    gw: GatewayMaker, tmp_path: Path, path: str
) -> None:
    with RawUpstream("reset", chunks=3) as raw:
        server = gw(openai_base_url=raw.url)
        status, found, _ = stream(server.url, path)
    assert status == 200
    assert contents(path, found) == "w0 w1 w2 "
    assert "connection" in last_error(path, found).lower()
    assert wait_until(lambda: len(ledger_rows(tmp_path / "gateway.db")) == 1, 5)
    row = ledger_rows(tmp_path / "gateway.db")[0]
    assert row["outcome"] == "upstream_error"
    assert row["estimated"] and row["completion_tokens"] > 0  # what was relayed is billed


@pytest.mark.parametrize("path", STREAM_PATHS)
def test_stall_after_headers_fires_the_idle_timeout_and_closes_the_upstream(
    gw: GatewayMaker, fake: FakeOpenAI, path: str
) -> None:
    server = gw(upstream_timeout=1.0, keepalive_interval=0.3)
    fake.queue(Plan(stall_after_chunks=2))
    started = time.monotonic()
    with httpx.stream("POST", server.url + path, json=body_for(path, stream=True)) as response:
        raw = response.read().decode()
    took = time.monotonic() - started
    assert response.status_code == 200
    assert ": ping" in raw  # the client was kept alive while the upstream stalled
    found = [line[5:].strip() for line in raw.split("\n") if line.startswith("data:")]
    message = last_error(path, found)
    assert "in time" in message or "went silent" in message
    assert 0.9 <= took < 3.0
    assert fake.last().closed_early.wait(1), "the stalled upstream socket was left open"


@pytest.mark.parametrize("path", STREAM_PATHS)
def test_keepalive_comments_forever_still_hit_the_overall_deadline(
    gw: GatewayMaker, fake: FakeOpenAI, path: str
) -> None:
    server = gw(upstream_timeout=10.0, stream_deadline=1.5)
    fake.queue(Plan(comments_forever=True))
    status, found, took = stream(server.url, path)
    assert status == 200
    assert "took longer than the server allows" in last_error(path, found)
    assert 1.5 <= took < 4.0
    assert fake.last().closed_early.wait(1)


@pytest.mark.parametrize("path", STREAM_PATHS)
def test_malformed_sse_relays_what_came_before_then_an_error_event(
    gw: GatewayMaker, fake: FakeOpenAI, path: str
) -> None:
    server = gw()
    fake.queue(Plan(malformed_after_chunks=4))
    status, found, _ = stream(server.url, path)
    assert status == 200
    assert contents(path, found) == "Hello from the"
    assert "broken event" in last_error(path, found)


def _chunk(content: str) -> bytes:
    event = {
        "id": "chatcmpl-utf8",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\r\n\r\n"


UTF8_PIECES = ["héllo", " wörld", " 日本語", " 🎉🎉", " ça va?", " Ωμέγα"]


@pytest.mark.parametrize("path", STREAM_PATHS)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_utf8_split_across_network_reads_is_reassembled(
    gw: GatewayMaker, fake: FakeOpenAI, path: str, step: int
) -> None:
    server = gw()
    body = b"".join(_chunk(p) for p in UTF8_PIECES)
    finish = {
        "id": "chatcmpl-utf8",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    body += b"data: " + json.dumps(finish).encode() + b"\n\ndata: [DONE]\n\n"
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    fake.queue(Plan(raw_chunks=pieces, chunk_interval=0.0005))
    status, found, _ = stream(server.url, path, timeout=30)
    assert status == 200
    assert contents(path, found) == "".join(UTF8_PIECES)
    assert "error" not in found[-1]


# --- a 50 MB upstream body -----------------------------------------------------------------

FIFTY_MB = 50 * 1024 * 1024


@pytest.mark.parametrize(
    ("mode", "path", "streamed", "expected", "upstream_client"),
    [
        pytest.param(
            "huge_event", V1, True, "event that is too large", c, id=f"stream-one-event-{c}"
        )
        for c in CLIENTS
    ]
    + [
        pytest.param("huge_json", V1, False, "too large", "aiohttp", id="whole-answer-aiohttp"),
        pytest.param(
            "huge_json_unsized", V1, False, "too large", "aiohttp", id="unsized-answer-aiohttp"
        ),
        pytest.param(
            "huge_json",
            V1,
            False,
            "too large",
            "sdk",
            id="whole-answer-sdk",
        ),
    ],
)
def test_a_50_mb_upstream_body_is_capped_and_memory_stays_flat(
    spawn: Spawn,
    fake: FakeOpenAI,
    tmp_path: Path,
    mode: str,
    path: str,
    streamed: bool,
    expected: str,
    upstream_client: str,
) -> None:
    with RawUpstream(mode, total=FIFTY_MB) as raw:
        gateway = spawn(
            {
                "OPENAI_API_KEY": fake.api_key,
                "OPENAI_BASE_URL": raw.url,
                "CHAT_API_UPSTREAM_RETRIES": "0",
                "CHAT_API_UPSTREAM_CLIENT": upstream_client,
                "CHAT_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
            }
        )
        pid = gateway.process.pid
        for _ in range(3):  # warm up the request path (the upstream only ever misbehaves)
            httpx.post(gateway.url + "/chat", json={"message": ""}, timeout=10)
        before = proc_stats(pid)
        body = body_for(path, stream=streamed)
        with httpx.stream("POST", gateway.url + path, json=body, timeout=60) as response:
            text = response.read().decode()
        after = proc_stats(pid)
        gateway.stop()
        sent = raw.connections[-1].sent
    if streamed:
        assert response.status_code == 200
        found = [line[5:].strip() for line in text.split("\n") if line.startswith("data:")]
        assert expected in last_error(path, found)
        # The gateway stopped reading soon after its 8 MiB cap, and closed the socket.
        assert sent < FIFTY_MB
    else:
        assert response.status_code == 502
        assert expected in json.loads(text)["error"]["message"]
    peak_growth_mb = (after.peak_kb - before.rss_kb) / 1024
    print(f"{mode}: upstream sent {sent / 2**20:.1f} MiB, peak RSS growth {peak_growth_mb:.1f} MiB")
    # Bounded by the caps (8 MiB an event, 32 MiB a whole answer), not by what was sent.
    assert peak_growth_mb < 48, f"memory grew by {peak_growth_mb:.0f} MiB for one answer"
    assert "sk-test" not in gateway.logs()


# --- the upstream rejects our key ------------------------------------------------------------


@pytest.mark.parametrize(("path", "streamed"), ALL_CALLS)
def test_upstream_401_is_502_and_the_key_is_in_no_log_line(
    gw: GatewayMaker,
    fake: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    path: str,
    streamed: bool,
) -> None:
    wrong = "sk-proj-wrong-key-that-the-fake-rejects-abcdef0123"
    server = gw(openai_api_key=wrong, log_level="debug")
    response = httpx.post(server.url + path, json=body_for(path, stream=streamed), timeout=15)
    assert response.status_code == 502
    assert "rejected the server's key" in message_of(path, response)
    assert wrong not in response.text
    assert fake.hits == 1
    assert fake.last().headers["authorization"] == f"Bearer {wrong}"  # it was really sent
    assert caplog.records, "nothing was logged at all: the check below would prove nothing"
    assert wrong not in caplog.text
