"""Upstream faults, as one matrix: every endpoint × both upstream clients × each fault.

Endpoints are the four ways in (tests/endpoints.py); the upstream clients are
aiohttp (the default) and the official SDK (`CHAT_API_UPSTREAM_CLIENT=sdk`).
A fault is what the upstream (or the client) does; each says what a user
must see:

- before the first byte of an answer, a status: the contract's table (502,
  504, 429 with the upstream's own `Retry-After`, a 4xx passed on), after the
  retries it allows, with the upstream socket let go;
- after it, the text that arrived before the fault, then one error event in
  the dialect's shape, never a silent, truncated success, and the upstream
  call closed;
- when the client leaves, the spend stops: a stream's upstream call is
  closed at once and billed at an estimate; a whole answer is read to its
  end (OpenAI bills it anyway).

Every call's ledger row is found by its request id. Gateways with the same
settings are shared by the module's cases (`pooled`), and every case checks
that no key appears in any answer or captured log line.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayPool
from tests.endpoints import (
    ENDPOINTS,
    SIMPLE_STREAM,
    STREAMS,
    V1,
    V1_STREAM,
    Endpoint,
    error_message,
    final_error,
    finished_well,
    stream_text,
)
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.fakes.raw_upstream import RawUpstream, sse_event
from tests.faults.conftest import Gateway, ledger_rows, proc_stats, wait_until
from tests.ops.conftest import GatewayProcess
from tests.sse import events

pytestmark = pytest.mark.faults

CLIENTS = ["aiohttp", "sdk"]
FAST_RETRY = {"retry-after-ms": "5"}  # the retries' own wait, kept short
WRONG_KEY = "sk-proj-wrong-key-that-the-fake-rejects-abcdef0123"
CUT_OFF = [  # three words, and then the stream just ends: no finish_reason, no [DONE]
    sse_event(word) for word in ("Half", " an", " answer")
]


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    """An upstream below HTTP, for faults no ASGI app can make (resets, silence, a close)."""
    with RawUpstream("silent") as upstream:
        yield upstream


@dataclass(frozen=True)
class Fault:
    """What the upstream does, the gateway settings it needs, and what the client must see."""

    name: str
    endpoints: list[Endpoint]
    plans: list[Plan] = field(default_factory=list)  # queued on the fake upstream
    raw: str | None = None  # a RawUpstream mode instead of the fake
    settings: dict[str, Any] = field(default_factory=dict)
    # before the first byte: the status, and the headers it carries (None: absent)
    status: int = 200
    headers: dict[str, str | None] = field(default_factory=dict)
    # after it: the text relayed before the fault
    text_before: str | None = None
    says: tuple[str, ...] = ()  # words of the error's sentence ("a|b": either)
    upstream_calls: int = 1  # requests the upstream got, retries included
    outcome: str | None = None  # the call's ledger row
    upstream_closed: bool = False  # the gateway let go of the upstream socket early

    def __str__(self) -> str:
        return self.name

    def said_in(self, message: str) -> bool:
        return all(any(w in message for w in words.split("|")) for words in self.says)


PATIENT = {"upstream_retries": 2}
IMPATIENT = {"upstream_timeout": 0.3, "keepalive_interval": 0.1}

FAULTS = [
    # --- before the first byte: a status code ----------------------------------------------
    Fault(
        "key-rejected",
        ENDPOINTS,
        settings={"openai_api_key": WRONG_KEY, "log_level": "debug"},
        status=502,
        says=("rejected the server's key",),
    ),
    Fault(
        "5xx-every-try",
        ENDPOINTS,
        [Plan(status=503, headers=FAST_RETRY), *[Plan(status=500, headers=FAST_RETRY)] * 2],
        settings=PATIENT,
        status=502,
        says=("status 500",),
        upstream_calls=3,
        headers={"x-should-retry": "false"},
    ),
    Fault(
        "429-then-5xx-then-an-answer",  # retried before any byte: the client sees an answer
        ENDPOINTS,
        [Plan(status=429, headers={"Retry-After": "0"}), Plan(status=500, headers=FAST_RETRY)],
        settings=PATIENT,
        upstream_calls=3,
        outcome="ok",
    ),
    Fault(
        "429-every-try",
        ENDPOINTS,
        [Plan(status=429, headers={"Retry-After": "7", **FAST_RETRY})] * 3,
        settings=PATIENT,
        status=429,
        headers={"retry-after": "7", "x-should-retry": "false"},  # the upstream's own wait
        says=("rate-limiting",),
        upstream_calls=3,
    ),
    Fault(
        "429-every-try-in-milliseconds",
        ENDPOINTS,
        [Plan(status=429, headers=FAST_RETRY)] * 3,
        settings=PATIENT,
        status=429,
        headers={"retry-after": "1", "x-should-retry": "false"},  # 5 ms, rounded up
        says=("rate-limiting",),
        upstream_calls=3,
    ),
    Fault(
        "429-every-try-naming-no-wait",
        ENDPOINTS,
        [Plan(status=429)] * 2,
        settings={"upstream_retries": 1},  # the gateway backs off by itself
        status=429,
        headers={"retry-after": None, "x-should-retry": "false"},  # invents none
        says=("rate-limiting",),
        upstream_calls=2,
    ),
    Fault(
        "400-with-openais-error",
        [V1, V1_STREAM],
        [
            Plan(
                status=400,
                error_body={
                    "error": {"message": "bad tool", "type": "x", "param": "tools", "code": "bad"}
                },
            )
        ],
        status=400,
        says=("bad tool",),
    ),
    Fault(
        "no-headers-in-time",
        ENDPOINTS,
        raw="silent",
        settings=IMPATIENT,
        status=504,
        says=("in time",),
        outcome="timeout",
        upstream_closed=True,
    ),
    Fault(
        "closed-before-any-header",
        ENDPOINTS,
        raw="close",
        settings={"upstream_retries": 1},
        status=502,
        says=("connection",),
        upstream_calls=2,  # retried once: no byte had reached the client
    ),
    # --- after the first byte: an error event ------------------------------------------------
    Fault(
        "connection-dropped",
        STREAMS,
        [Plan(drop_after_chunks=3)],
        text_before="Hello from",
        says=("connection",),
        outcome="upstream_error",
    ),
    Fault(
        "connection-reset",
        STREAMS,
        raw="reset",
        text_before="w0 w1 w2 ",
        says=("connection",),
        outcome="upstream_error",
    ),
    Fault(
        "stream-ends-unfinished",
        STREAMS,
        [Plan(raw_chunks=CUT_OFF)],
        text_before="Half an answer",
        says=("cut off",),
    ),
    Fault(
        "malformed-event",
        STREAMS,
        [Plan(malformed_after_chunks=4)],
        text_before="Hello from the",
        says=("broken event",),
    ),
    Fault(
        "error-event",
        STREAMS,
        [Plan(error_event_after_chunks=3)],
        text_before="Hello from",
        says=("OpenAI stopped the answer", "error while processing"),
        outcome="upstream_error",
    ),
    Fault(
        "stall",
        STREAMS,
        [Plan(stall_after_chunks=2)],
        settings=IMPATIENT,
        text_before="Hello",
        says=("in time|went silent",),
        upstream_closed=True,
    ),
    Fault(
        "keep-alive-comments-forever",
        STREAMS,
        [Plan(comments_forever=True)],
        settings={"stream_deadline": 0.5},
        text_before="",
        says=("took longer than the server allows",),
        upstream_closed=True,
    ),
]


def cases() -> list[Any]:
    return [
        pytest.param(fault, endpoint, client, id=f"{fault}-{endpoint}-{client}")
        for fault in FAULTS
        for endpoint in fault.endpoints
        for client in CLIENTS
    ]


def database(gateway: Gateway) -> Path:
    return Path(gateway.settings.database_url.removeprefix("sqlite+aiosqlite:///"))


def ledger_row(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """The one ledger row of a call, once the gateway has written it."""

    def rows() -> list[dict[str, Any]]:
        return [r for r in ledger_rows(database(gateway)) if r["request_id"] == request_id]

    assert wait_until(lambda: len(rows()) == 1, 5), rows()
    return rows()[0]


def answer_text(endpoint: Endpoint, response: httpx.Response) -> str:
    if endpoint.stream:
        received = events(response)
        assert finished_well(endpoint, received), received[-3:]
        return stream_text(endpoint, received)
    body = response.json()
    return str(
        body["choices"][0]["message"]["content"] if endpoint.openai_dialect else body["response"]
    )


@pytest.mark.parametrize(("fault", "endpoint", "client"), cases())
def test_upstream_fault(
    pooled: GatewayPool[Gateway],
    fake: FakeOpenAI,
    raw: RawUpstream,
    caplog: pytest.LogCaptureFixture,
    fault: Fault,
    endpoint: Endpoint,
    client: str,
) -> None:
    settings: dict[str, Any] = {"upstream_client": client, **fault.settings}
    if fault.raw is not None:
        settings["openai_base_url"] = raw.url
        raw.misbehave(fault.raw)
    gateway = pooled.get(**settings)
    fake.queue(*fault.plans)
    request_id = f"req-{uuid.uuid4().hex}"
    response = httpx.post(
        gateway.url + endpoint.path,
        json=endpoint.body(),
        headers={"X-Request-ID": request_id},
        timeout=15,
    )

    assert response.status_code == fault.status, response.text[:500]
    for name, value in fault.headers.items():
        assert response.headers.get(name) == value, (name, response.headers)
    if fault.status != 200:  # refused before any byte: a plain JSON error
        assert response.headers["content-type"] == "application/json"
        message = error_message(endpoint, response.json())
        assert fault.said_in(message), message
    elif fault.text_before is None:  # no fault the client can see
        assert answer_text(endpoint, response) == DEFAULT_TEXT
        assert fake.last().finished.wait(2) and not fake.last().closed_early.is_set()
    else:  # broken after the first byte
        received = events(response)
        message = final_error(endpoint, received)
        assert fault.said_in(message), message
        assert stream_text(endpoint, received) == fault.text_before

    calls = len(raw.connections) if fault.raw is not None else fake.hits
    assert calls == fault.upstream_calls
    if fault.upstream_closed:
        if fault.raw is not None:
            assert raw.connections[0].closed_by_peer.wait(2), "the upstream socket was left open"
        else:
            assert fake.last().closed_early.wait(2), "the upstream call was left running"
    if fault.outcome is not None:
        row = ledger_row(gateway, request_id)
        assert row["outcome"] == fault.outcome
        if fault.text_before:  # what was relayed is billed
            assert row["estimated"] and row["completion_tokens"] > 0
    if fault.name == "key-rejected":
        assert WRONG_KEY not in response.text
        assert fake.last().headers["authorization"] == f"Bearer {WRONG_KEY}"  # really sent
        assert caplog.records, "nothing was logged at all: the check after it would prove nothing"
        assert WRONG_KEY not in caplog.text
    if fault.name == "400-with-openais-error" and endpoint == V1:
        assert response.json()["error"] == {
            "message": "bad tool",
            "type": "invalid_request_error",
            "param": "tools",
            "code": "bad",
        }
    if fault.name == "stall":  # the client was kept alive while the upstream stalled
        assert ": ping" in response.text


# --- the client leaves --------------------------------------------------------------------

LONG_TEXT = " ".join(f"word{i}" for i in range(300))  # 15 s at 0.05 s a chunk


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("endpoint", STREAMS, ids=str)
def test_a_client_that_leaves_a_stream_closes_the_upstream_and_is_billed_an_estimate(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI, endpoint: Endpoint, client: str
) -> None:
    gateway = pooled.get(upstream_client=client)
    fake.queue(Plan(text=LONG_TEXT, chunk_interval=0.05))
    request_id = f"req-{uuid.uuid4().hex}"
    seen = 0
    with httpx.stream(
        "POST",
        gateway.url + endpoint.path,
        json=endpoint.body(),
        headers={"X-Request-ID": request_id},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:") and "word" in line:
                seen += 1
            if seen == 3:
                break
        upstream = fake.last()
        assert not upstream.finished.is_set()
    assert upstream.closed_early.wait(2), "the upstream kept streaming after the client left"
    assert not upstream.finished.is_set()
    row = ledger_row(gateway, request_id)
    assert row["outcome"] == "client_closed"
    assert row["estimated"] == 1
    # Roughly what was relayed, not the whole answer.
    assert 3 <= row["completion_tokens"] <= 60 and row["prompt_tokens"] > 0
    assert row["cost_usd"] > 0


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("endpoint", STREAMS, ids=str)
def test_a_client_that_leaves_before_the_headers_closes_the_upstream(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI, endpoint: Endpoint, client: str
) -> None:
    gateway = pooled.get(upstream_client=client)
    fake.queue(Plan(delay_before_headers=3))
    sent = len(fake.received)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + endpoint.path, json=endpoint.body(), timeout=0.5)
    # A slow moment may take the call to the upstream only after the client left (the
    # CI once took longer than 0.5 s): wait for it there; never sent is never running.
    deadline = time.monotonic() + 5
    while len(fake.received) == sent and time.monotonic() < deadline:
        time.sleep(0.01)
    if len(fake.received) > sent:
        assert fake.last().closed_early.wait(2), "the upstream call was left running"


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if not e.stream], ids=str)
def test_a_client_that_gives_up_on_a_whole_answer_still_has_it_read_to_the_end(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI, endpoint: Endpoint, client: str
) -> None:
    """OpenAI goes on writing a whole answer (and bills it) when its caller leaves, so the
    gateway reads it to its end and records its exact usage (tests/limits has the money)."""
    gateway = pooled.get(upstream_client=client)
    fake.queue(Plan(delay_before_headers=0.6))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + endpoint.path, json=endpoint.body(), timeout=0.2)
    assert fake.hits == 1
    upstream = fake.last()
    assert upstream.finished.wait(5), "the upstream answer was not read to its end"
    assert not upstream.closed_early.is_set()


# --- what goes up, what comes back ----------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_the_operator_key_and_request_ids_go_upstream_and_the_upstream_id_comes_back(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI, endpoint: Endpoint, client: str
) -> None:
    gateway = pooled.get(upstream_client=client)
    url = gateway.url + endpoint.path
    body = endpoint.body()
    if endpoint == V1_STREAM:
        body["stream_options"] = {"include_usage": True}
    response = httpx.post(url, json=body, headers={"X-Request-ID": "client-req-42"}, timeout=10)
    assert response.status_code == 200
    assert answer_text(endpoint, response) == DEFAULT_TEXT
    assert response.headers["x-request-id"] == "client-req-42"
    assert response.headers.get("x-upstream-request-id") == "req_fake_upstream"
    sent = fake.last()
    assert sent.headers["x-request-id"] == "client-req-42"
    assert sent.headers["authorization"] == f"Bearer {fake.api_key}"
    assert sent.headers["content-type"] == "application/json"
    if endpoint == V1_STREAM:  # usage asked for, passed on, and relayed at the end
        assert sent.body["stream_options"] == {"include_usage": True}
        last_chunk = json.loads(events(response)[-2])
        assert last_chunk["choices"] == [] and last_chunk["usage"]["prompt_tokens"] == 7

    generated = httpx.post(url, json=endpoint.body(), timeout=10).headers["x-request-id"]
    assert generated and fake.last().headers["x-request-id"] == generated


@pytest.mark.parametrize("client", CLIENTS)
def test_the_openai_sdk_raises_on_a_broken_stream(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI, client: str
) -> None:
    gateway = pooled.get(upstream_client=client)
    fake.queue(Plan(drop_after_chunks=3))
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass


# --- keep-alives --------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("endpoint", STREAMS, ids=str)
def test_pings_keep_a_silent_stream_alive_and_the_answer_whole(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI, endpoint: Endpoint, client: str
) -> None:
    gateway = pooled.get(upstream_client=client, keepalive_interval=0.2)
    fake.queue(Plan(first_chunk_delay=0.7))
    response = httpx.post(gateway.url + endpoint.path, json=endpoint.body(), timeout=15)
    raw = response.text
    assert ": ping\n\n" in raw
    # The pings are comments between events, and the answer is still whole.
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    assert all(b.startswith(("data: ", ": ping")) for b in blocks)
    assert answer_text(endpoint, response) == DEFAULT_TEXT


def test_each_quiet_stream_is_pinged_and_a_busy_one_is_not(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI
) -> None:
    """One keep-alive clock serves every open stream, each by its own silence."""
    gateway = pooled.get(keepalive_interval=0.5)
    raw: dict[str, str] = {}

    def read(name: str) -> None:
        with httpx.stream(
            "POST", gateway.url + SIMPLE_STREAM.path, json={"message": name}, timeout=15
        ) as response:
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


# --- bytes split anywhere -------------------------------------------------------------------

UTF8_PIECES = ["Grüße,", " 日本語", " and 😀", " — déjà vu", " ça va?", " Ωμέγα"]


def _utf8_stream(end: bytes) -> bytes:
    body = b"".join(sse_event(piece, end=end) for piece in UTF8_PIECES)
    return body + sse_event(None, "stop", end=end) + b"data: [DONE]" + end


def _inside_every_character(body: bytes) -> list[bytes]:
    """Cut before every UTF-8 continuation byte: each multi-byte character in pieces."""
    cuts, start = [], 0
    for index in range(1, len(body)):
        if body[index] & 0xC0 == 0x80:
            cuts.append(body[start:index])
            start = index
    return [*cuts, body[start:]]


def _every(step: int) -> list[bytes]:
    """Pieces of `step` bytes, of a stream whose lines end in CRLF."""
    body = _utf8_stream(b"\r\n\r\n")
    return [body[i : i + step] for i in range(0, len(body), step)]


SPLITS: dict[str, Callable[[], list[bytes]]] = {
    "inside-every-character": lambda: _inside_every_character(_utf8_stream(b"\n\n")),
    "every-byte-crlf": lambda: _every(1),
    "every-3-bytes-crlf": lambda: _every(3),
    "every-7-bytes-crlf": lambda: _every(7),
}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("endpoint", STREAMS, ids=str)
def test_utf8_split_across_network_reads_is_put_back_together(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI, endpoint: Endpoint, split: str, client: str
) -> None:
    gateway = pooled.get(upstream_client=client)
    fake.queue(Plan(raw_chunks=SPLITS[split](), chunk_interval=0.0005))
    response = httpx.post(gateway.url + endpoint.path, json=endpoint.body(), timeout=30)
    assert answer_text(endpoint, response) == "".join(UTF8_PIECES)
    assert "\ufffd" not in response.text


@pytest.mark.parametrize("client", CLIENTS)
def test_utf8_split_through_the_openai_sdk(
    pooled: GatewayPool[Gateway], fake: FakeOpenAI, client: str
) -> None:
    gateway = pooled.get(upstream_client=client)
    fake.queue(Plan(raw_chunks=SPLITS["inside-every-character"](), chunk_interval=0.001))
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "".join(UTF8_PIECES)


# --- a 50 MB upstream body -----------------------------------------------------------------

FIFTY_MB = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def served(
    fake_server: tuple[FakeOpenAI, Any], raw: RawUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], GatewayProcess]]:
    """`chat-api serve` processes in front of the raw upstream, one per upstream client."""
    folder = tmp_path_factory.mktemp("served")
    running: dict[str, GatewayProcess] = {}

    def get(client: str) -> GatewayProcess:
        if client not in running:
            env = {
                "OPENAI_API_KEY": fake_server[0].api_key,
                "OPENAI_BASE_URL": raw.url,
                "CHAT_API_UPSTREAM_RETRIES": "0",
                "CHAT_API_UPSTREAM_CLIENT": client,
                "CHAT_API_SHUTDOWN_GRACE": "1",
                "CHAT_API_DATABASE_URL": f"sqlite+aiosqlite:///{folder}/{client}.db",
            }
            running[client] = gateway = GatewayProcess(env, folder / f"{client}.log")
            for _ in range(3):  # warm up the request path (the upstream only ever misbehaves)
                httpx.post(gateway.url + "/chat", json={"message": ""}, timeout=10)
        return running[client]

    yield get
    for gateway in running.values():  # stop them together: each takes a moment
        gateway.signal(signal.SIGTERM)
    for gateway in running.values():
        gateway.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "endpoint", "expected", "upstream_client"),
    [
        pytest.param("huge_event", V1_STREAM, "event that is too large", c, id=f"one-event-{c}")
        for c in CLIENTS
    ]
    + [pytest.param("huge_json", V1, "too large", c, id=f"whole-answer-{c}") for c in CLIENTS]
    + [pytest.param("huge_json_unsized", V1, "too large", "aiohttp", id="unsized-answer-aiohttp")],
)
def test_a_50_mb_upstream_body_is_capped_and_memory_stays_flat(
    served: Callable[[str], GatewayProcess],
    raw: RawUpstream,
    mode: str,
    endpoint: Endpoint,
    expected: str,
    upstream_client: str,
) -> None:
    gateway = served(upstream_client)
    pid = gateway.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS from now on (Linux)
    raw.misbehave(mode)
    before = proc_stats(pid)
    with httpx.stream(
        "POST", gateway.url + endpoint.path, json=endpoint.body(), timeout=60
    ) as response:
        response.read()
    after = proc_stats(pid)
    upstream = raw.connections[-1]
    if endpoint.stream:
        assert response.status_code == 200
        assert expected in final_error(endpoint, events(response))
        # The gateway stopped reading soon after its 8 MiB cap, and closed the socket.
        assert upstream.closed_by_peer.wait(5)
        assert upstream.sent < FIFTY_MB
    else:
        assert response.status_code == 502
        assert expected in error_message(endpoint, response.json())
    peak_growth_mb = (after.peak_kb - before.rss_kb) / 1024
    sent_mb = upstream.sent / 2**20
    print(f"{mode}: upstream sent {sent_mb:.1f} MiB, peak RSS growth {peak_growth_mb:.1f} MiB")
    # Bounded by the caps (8 MiB an event, 32 MiB a whole answer), not by what was sent.
    assert peak_growth_mb < 48, f"memory grew by {peak_growth_mb:.0f} MiB for one answer"
    assert "sk-test" not in gateway.logs()
