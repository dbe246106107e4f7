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
    sneaky_ids = [MASTER, fake.api_key, client_key, base64.b64encode(MASTER.encode()).decode()]
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
