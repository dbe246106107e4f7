"""No key leaves the gateway, whatever form the upstream or the client sends it in.

Scrubbing is by value first (the operator's key, the master key: every form
text turns them into), then by shape (sk-, gsk_, cak_, Azure-style 32 hex).
Each HTTP case checks every byte the client got, the fake upstream's
received headers, the ledger rows and the captured log lines.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest

from chat_api import redact
from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.keys.conftest import MASTER, auth, make_key

AZURE_KEY = "3f9a1c0e5b7d4e2f8a6c9b1d0e3f5a7c"  # 32 hex digits, the shape of Azure keys
GROQ_KEY = "gsk_9Xq2LmNpRsTuVwYz01AbCdEfGh"
V1 = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def forms(secret: str) -> list[str]:
    """What an upstream (or a client) might turn a key into."""
    return [
        secret,
        urllib.parse.quote(secret, safe=""),
        json.dumps(secret)[1:-1],
        base64.b64encode(secret.encode()).decode(),
        base64.b64encode(b"user:" + secret.encode()).decode(),  # Basic auth
        base64.urlsafe_b64encode(b"xx" + secret.encode()).decode(),
        secret.encode().hex(),
    ]


def secret_part(secret: str) -> str:
    return secret[8:]  # what is left after any harmless prefix a shape marker shows


@pytest.mark.parametrize("text_of", [str, lambda t: f"prefix:{t}.", lambda t: f'"{t}"'])
def test_known_secrets_are_scrubbed_in_every_form(text_of: Any) -> None:
    redact.remember("operator-key-of-an-unknown-shape-0123456789")
    for secret in ("operator-key-of-an-unknown-shape-0123456789", MASTER):
        redact.remember(secret)
        for form in forms(secret):
            cleaned = redact.redact(text_of(form))
            assert form not in cleaned, form
            assert redact.contains_secret(text_of(form)), form


def test_key_shapes_are_scrubbed_known_or_not() -> None:
    client_key = "cak_" + "Zx9-_q" * 7 + "w"
    for key in ("sk-proj-abcdefghijklmnop1234", GROQ_KEY, AZURE_KEY, client_key):
        for text in (f"the key {key} is wrong", f"x{key}" if key.startswith("cak_") else key):
            assert secret_part(key) not in redact.redact(text), text
    encoded = base64.b64encode(f"Bearer {client_key}".encode()).decode()
    assert redact.redact(encoded) == redact.REDACTED
    # Ordinary words and OpenAI's request ids are left alone.
    for text in ("ask-questions-freely", "a skeleton key", "sk-short"):
        assert redact.redact(text) == text


def test_a_client_keys_secret_part_alone_counts_as_a_secret_in_ids() -> None:
    body = "Zx9-_q" * 7 + "w"  # 43 URL-safe characters, as store/keys.py makes them
    assert redact.contains_secret(body) and redact.contains_secret(f"trace:{body}")
    # Ids of other lengths are ids: a UUID, a W3C traceparent, OpenAI's request ids.
    for honest in (
        "0f8c1c2e-7b5a-4c1d-9e3f-2a6b8d4c0e1f",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "req_" + "a1" * 16,
        body + "x",
    ):
        assert not redact.contains_secret(honest), honest


def _sse(kind: str | None, payload: dict[str, Any]) -> bytes:
    head = f"event: {kind}\n".encode() if kind else b""
    return head + b"data: " + json.dumps(payload).encode() + b"\n\n"


def _owners_table(tmp_path: Path) -> str:
    with sqlite3.connect(tmp_path / "gateway.db") as db:
        return repr(db.execute("SELECT * FROM owners").fetchall())


def test_the_key_echoed_into_answers_ids_and_responses_events_never_reaches_the_client(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    server = gateway_factory(master_key=MASTER)
    client_key, _ = make_key(server.url)
    key = fake.api_key
    usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    leaky_response = {"id": f"resp_{key}", "object": "response", "status": "completed"}
    events = [
        _sse("response.created", {"type": "response.created", "response": leaky_response}),
        # OpenAI's error event has its message, code and param at the top.
        _sse("error", {"type": "error", "code": key, "message": f"boom {key}", "param": key}),
        _sse(
            "response.failed",
            {
                "type": "response.failed",
                "response": {
                    **leaky_response,
                    "status": "failed",
                    "usage": usage,
                    "error": {"code": "server_error", "message": f"failed {GROQ_KEY}"},
                },
            },
        ),
    ]
    chunk = {
        "id": f"chatcmpl-{key}",
        "object": "chat.completion.chunk",
        "system_fingerprint": key,
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
    }
    whole_chat = {
        **chunk,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    seen: list[str] = []
    with httpx.Client(base_url=server.url, headers=auth(client_key), timeout=10) as http:
        fake.queue(Plan(raw_chunks=events))
        streamed = http.post("/v1/responses", json={"input": "hi", "stream": True})
        fake.queue(Plan(raw_chunks=[_sse(None, chunk), b"data: [DONE]\n\n"]))
        chat_stream = http.post(V1, json={"messages": MESSAGES, "stream": True})
        fake.queue(Plan(raw_body=json.dumps(whole_chat).encode()))
        chat = http.post(V1, json={"messages": MESSAGES})
        fake.queue(Plan(raw_body=json.dumps({**leaky_response, "usage": usage}).encode()))
        response = http.post("/v1/responses", json={"input": "hi"})
        conversation = json.dumps({"id": f"conv_{key}", "object": "conversation"}).encode()
        fake.queue(Plan(endpoint="conversations.create", raw_body=conversation))
        created = http.post("/v1/conversations", json={})
        honest = http.post("/v1/responses", json={"input": "hi"})  # its owner is recorded
        for answer in (streamed, chat_stream, chat, response, created, honest):
            assert answer.status_code == 200, answer.text
            seen.append(_all_text(answer))
    # Every event is still there, whole and parseable, its key scrubbed.
    data = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data:")]
    assert [event["type"] for event in data] == ["response.created", "error", "response.failed"]
    assert data[1]["message"].startswith("boom ") and "redacted" in data[1]["code"]
    assert chat.json()["choices"][0]["message"]["content"] == "ok"
    assert "data: [DONE]" in chat_stream.text
    text, owners = "\n".join(seen), _owners_table(tmp_path)
    assert honest.json()["id"] in owners
    for secret in (key, GROQ_KEY):
        assert secret_part(secret) not in text
        assert secret_part(secret) not in owners


def test_a_failed_answers_output_is_relayed_as_it_is_only_its_error_scrubbed(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    """32 hex digits are a key's shape (Azure's) and a commit's, a hash's: in what the model
    wrote they are relayed unchanged, in the upstream's error they are scrubbed."""
    server = gateway_factory(master_key=MASTER)
    client_key, _ = make_key(server.url)
    written = f"The fix is commit {AZURE_KEY}."
    usage = {"input_tokens": 1, "output_tokens": 8, "total_tokens": 9}
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": written, "annotations": []}],
    }
    failed = {
        "id": "resp_failed_1",
        "object": "response",
        "status": "failed",
        "output": [message],
        "usage": usage,
        "error": {"code": "server_error", "message": f"failed: {AZURE_KEY} {GROQ_KEY}"},
    }
    done = {"type": "response.output_text.done", "item_id": "msg_1", "text": written}
    events = [
        _sse("response.output_text.done", done),
        _sse("error", {"type": "error", "code": GROQ_KEY, "message": f"boom {AZURE_KEY}"}),
        _sse("response.failed", {"type": "response.failed", "response": failed}),
    ]
    with httpx.Client(base_url=server.url, headers=auth(client_key), timeout=10) as http:
        fake.queue(Plan(raw_body=json.dumps(failed).encode()))
        whole = http.post("/v1/responses", json={"input": "hi"})
        fake.queue(Plan(endpoint="responses.retrieve", raw_body=json.dumps(failed).encode()))
        stored = http.get("/v1/responses/resp_failed_1")  # recorded as the key's own
        fake.queue(Plan(raw_chunks=events))
        streamed = http.post("/v1/responses", json={"input": "hi", "stream": True})
    data = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data:")]
    assert [event["type"] for event in data] == [
        "response.output_text.done",
        "error",
        "response.failed",
    ]
    assert events[0].split(b"data: ")[1].strip() in streamed.content  # byte for byte
    for answer in (whole.json(), stored.json(), data[2]["response"]):
        assert answer["output"][0]["content"][0]["text"] == written, answer
        assert answer["error"]["code"] == "server_error"
        assert answer["error"]["message"].startswith("failed: ")
        assert AZURE_KEY not in json.dumps(answer["error"])
        assert secret_part(GROQ_KEY) not in json.dumps(answer["error"])
    assert data[1]["message"].startswith("boom ") and AZURE_KEY not in data[1]["message"]
    assert secret_part(GROQ_KEY) not in data[1]["code"]


def test_only_an_events_error_parts_are_scrubbed_unless_a_remembered_secret_is_there() -> None:
    hexish = "0123456789abcdef" * 2
    delta = {"type": "response.output_text.delta", "delta": hexish}
    raw = json.dumps(delta).encode()
    assert redact.relayable(raw, delta) == (raw, delta)  # as sent, the very bytes
    error = {"type": "error", "message": f"bad {hexish}", "code": None, "param": None, "x": hexish}
    _, scrubbed = redact.relayable(json.dumps(error).encode(), error)
    assert scrubbed["x"] == hexish and hexish not in scrubbed["message"]
    redact.remember(MASTER)
    echoed = {**delta, "item_id": f"msg_{MASTER}"}
    _, scrubbed = redact.relayable(json.dumps(echoed).encode(), echoed)
    assert MASTER not in json.dumps(scrubbed) and hexish not in scrubbed["delta"]
    # A secret's probe alone (its last 16 characters, or a key split across events) is no
    # secret: relayed as it is.
    tail = {**delta, "delta": MASTER[-16:]}
    raw = json.dumps(tail).encode()
    assert redact.relayable(raw, tail) == (raw, tail)


def _error_echoing(secret: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"Incorrect API key provided: {secret}.",
            "type": "invalid_request_error",
            "param": secret,
            "code": f"bad_key_{secret}",
        }
    }


def _stream_error_echoing(secret: str) -> bytes:
    first = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    error = {"error": {"message": f"Rejected key {secret}", "type": "server_error"}}
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (first, error))


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured line, but the HTTP clients' own debug lines (the service keeps those
    loggers at WARNING: `chat_api.logs.configure`), which show the raw upstream headers."""
    quiet = ("openai", "httpx", "httpcore")
    return "\n".join(
        r.getMessage() + repr(r.__dict__) for r in caplog.records if not r.name.startswith(quiet)
    )


def _all_text(response: httpx.Response) -> str:
    return f"{response.status_code} {response.headers} {response.text}"


def _ledger(tmp_path: Path, until: str = "") -> str:
    """Every usage row, as text, once `until` is in it (rows are written in batches)."""
    deadline = time.monotonic() + 5
    rows = ""
    while time.monotonic() < deadline:
        with sqlite3.connect(tmp_path / "gateway.db") as db:
            rows = repr(db.execute("SELECT * FROM usage").fetchall())
        if until in rows and rows != "[]":
            break
        time.sleep(0.1)
    return rows


@pytest.mark.parametrize("upstream_client", ["aiohttp", "sdk"])
def test_secrets_echoed_by_the_upstream_never_reach_the_client(
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    upstream_client: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = gateway_factory(master_key=MASTER, upstream_client=upstream_client)
    client_key, _ = make_key(server.url)
    secrets = [fake.api_key, MASTER, client_key, AZURE_KEY, GROQ_KEY]
    seen: list[str] = []
    with httpx.Client(base_url=server.url, headers=auth(client_key), timeout=10) as http:
        for secret in secrets:
            for form in forms(secret)[:4]:
                # In the error's message, param and code, for each status it can come with.
                for status in (400, 404, 422):
                    fake.queue(Plan(status=status, error_body=_error_echoing(form)))
                    seen.append(_all_text(http.post(V1, json={"messages": MESSAGES})))
                # In an error event in the middle of a stream, on both APIs.
                fake.queue(Plan(raw_chunks=[_stream_error_echoing(form)]))
                seen.append(_all_text(http.post("/chat/stream", json={"message": "hi"})))
                fake.queue(Plan(raw_chunks=[_stream_error_echoing(form)]))
                seen.append(_all_text(http.post(V1, json={"messages": MESSAGES, "stream": True})))
            if secret == AZURE_KEY:
                continue  # shaped like a request id: only a known key is refused there
            # In the request id the upstream answers with.
            fake.queue(Plan(raw_headers=[(b"x-request-id", f"req_{secret}".encode())]))
            answer = http.post(V1, json={"messages": MESSAGES})
            assert answer.status_code == 200
            assert "x-upstream-request-id" not in answer.headers
            seen.append(_all_text(answer))
    text = "\n".join(seen)
    logged = _logged(caplog)
    stored = _ledger(tmp_path)
    for secret in secrets:
        for form in forms(secret)[:4]:
            where = [name for name, blob in (("answer", text), ("log", logged)) if form in blob]
            assert not where, f"{form} leaked to the {where}"
        assert secret_part(secret) not in text
        assert secret_part(secret) not in stored
    assert "Incorrect API key provided" in text  # the messages themselves did arrive


def test_a_secret_sent_as_the_request_id_is_replaced_everywhere(
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = gateway_factory(master_key=MASTER)
    client_key, _ = make_key(server.url)
    sneaky_ids = [
        MASTER,
        fake.api_key,
        client_key,
        client_key.removeprefix("cak_"),  # its secret part alone is the key all the same
        f"trace.{client_key.removeprefix('cak_')}",
        base64.b64encode(MASTER.encode()).decode(),
    ]
    for sneaky in sneaky_ids:
        for path, body in (("/chat", {"message": "hi"}), (V1, {"messages": MESSAGES})):
            response = httpx.post(
                server.url + path,
                json=body,
                headers={**auth(client_key), "X-Request-ID": sneaky},
            )
            assert response.status_code == 200
            assert response.headers["x-request-id"] != sneaky
            assert fake.last().headers["x-request-id"] == response.headers["x-request-id"]
    honest = httpx.post(
        server.url + "/chat",
        json={"message": "hi"},
        headers={**auth(client_key), "X-Request-ID": "my-trace-0001"},
    )
    assert honest.headers["x-request-id"] == "my-trace-0001"  # a sane id is kept
    stored = _ledger(tmp_path, until="my-trace-0001")
    assert "my-trace-0001" in stored
    logged = _logged(caplog)
    for sneaky in sneaky_ids:
        assert sneaky not in stored
        assert sneaky not in logged
        assert all(sneaky not in r.headers.get("x-request-id", "") for r in fake.received)


def test_a_key_the_client_sends_where_a_name_goes_is_not_echoed_in_the_error(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    server = gateway_factory(master_key=MASTER)
    client_key, _ = make_key(server.url)
    with httpx.Client(base_url=server.url, headers=auth(client_key), timeout=10) as http:
        answers = [
            http.post("/chat", json={"message": "hi", "model": MASTER}),
            http.post("/chat", json={"message": "hi", client_key: 1}),  # "Unknown field '…'"
            http.post(V1, json={"messages": MESSAGES, "model": client_key}),
            http.post("/v1/embeddings", json={"input": "a", "model": fake.api_key}),
            http.get(f"/v1/models/{client_key}"),
        ]
    for answer in answers:
        assert answer.status_code in (400, 404), answer.text
        for secret in (MASTER, client_key, fake.api_key):
            assert secret_part(secret) not in answer.text
    assert "Unknown field" in answers[1].text and "is not available" in answers[0].text
