"""What the gateway layer adds to every exchange: body limits, CSP, timings, safe JSON."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from chat_api.app import create_app
from chat_api.serving import MAX_HEADER_BYTES, GuardedHttpToolsProtocol
from tests.conftest import gateway_settings
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread

V1 = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gateway(shared_gateway: ServerThread) -> ServerThread:
    """These tests only read (a call and its answer): they share the module's gateway."""
    return shared_gateway


def _data_url(kind: str, size: int) -> str:
    return f"data:{kind};base64," + base64.b64encode(os.urandom(size)).decode()


def test_a_3mb_image_and_a_2mb_pdf_in_one_message_are_accepted(
    gateway: ServerThread, fake: FakeOpenAI
) -> None:
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": _data_url("image/png", 3_000_000)}},
        {
            "type": "file",
            "file": {
                "filename": "report.pdf",
                "file_data": _data_url("application/pdf", 2_000_000),
            },
        },
    ]
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        )
    assert answer.choices[0].message.content
    sent = fake.last().body["messages"][0]["content"]
    assert sent[1]["image_url"]["url"] == content[1]["image_url"]["url"]  # type: ignore[index]
    assert sent[2]["file"]["file_data"] == content[2]["file"]["file_data"]  # type: ignore[index]


@pytest.mark.parametrize("path", ["/", "/static/index.html", "/docs", "/redoc"])
def test_every_html_answer_has_a_content_security_policy(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy


def test_every_v1_answer_says_how_long_it_took(client: httpx.Client, fake: FakeOpenAI) -> None:
    answers = [
        client.get("/v1/models"),
        client.post(V1, json={"messages": MESSAGES}),
        client.post(V1, json={"messages": MESSAGES, "stream": True}),
        client.post(V1, json={"messages": []}),
        client.get("/v1/nowhere"),
    ]
    for response in answers:
        assert int(response.headers["openai-processing-ms"]) >= 0, response.request.url
    assert "openai-processing-ms" not in client.get("/health").headers


@pytest.mark.parametrize("depth", [254, 600, 1023])
@pytest.mark.parametrize(
    ("path", "field"), [(V1, "response_format"), ("/chat", "message")], ids=["v1", "simple"]
)
def test_deeply_nested_json_is_a_clear_400(
    client: httpx.Client, fake: FakeOpenAI, depth: int, path: str, field: str
) -> None:
    deep = b"[" * depth + b"]" * depth
    body = b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field.encode(), deep)
    if path == "/chat":
        body = b'{"message": %s}' % deep
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "nested too deeply" in (error["message"] if path == V1 else error)
    assert fake.hits == 0


def test_stream_null_is_accepted_as_false(client: httpx.Client, fake: FakeOpenAI) -> None:
    response = client.post(V1, json={"messages": MESSAGES, "stream": None})
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"
    assert "stream" not in fake.last().body


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_unfinished_huge_headers_are_cut_off_and_cost_no_memory(tmp_path: Path) -> None:
    """100 connections x 2 MB of headers that never end (the gateway as `chat-api serve`)."""
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CHAT_API_", "OPENAI_"))},
        "CHAT_API_DEMO": "1",
        "CHAT_API_PORT": str(port),
        "CHAT_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/g.db",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "chat_api", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        before = _peak_rss_kib(process.pid)
        answers: list[bytes] = []

        def flood() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                try:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                    for _ in range(32):
                        sock.sendall(b"a" * 65536)  # 2 MiB, and never the end of the line
                except OSError:
                    pass  # cut off: what we want
                try:
                    answers.append(sock.recv(200))
                except OSError:
                    answers.append(b"")

        threads = [threading.Thread(target=flood) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        grown = (_peak_rss_kib(process.pid) - before) / 1024
        print(f"peak RSS {before / 1024:.0f} MiB, +{grown:.1f} MiB with 100 x 2 MB headers")
        assert grown < 40  # unbounded: +125 MiB here (+190 MiB measured on main)
        assert sum(a.startswith(b"HTTP/1.1 431") for a in answers) >= 50
        fine = httpx.get(f"http://127.0.0.1:{port}/health", headers={"X-Fine": "a" * 30_000})
        assert fine.status_code == 200  # large headers within the 64 KiB limit still work
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answer(port: int, *parts: bytes) -> tuple[bytes, bytes]:
    """Send `parts` (a pause between them), read until the server closes: head and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        received = b""
        try:
            for part in parts:
                sock.sendall(part)
                time.sleep(0.05)
        except OSError:
            pass  # cut off while sending: the answer is still there to read
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "request-line-first"])
def test_headers_too_large_get_a_json_431_in_the_paths_dialect(
    fake: FakeOpenAI, upstream_url: str, tmp_path: Path, split: bool
) -> None:
    settings = gateway_settings(fake, upstream_url, tmp_path)
    big = b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 1000) + b"\r\n\r\n"
    with ServerThread(create_app(settings), http=GuardedHttpToolsProtocol) as server:
        for target in (b"/v1/chat/completions?x=1", b"/chat"):
            line = b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            parts = (line, big) if split else (line + big,)
            head, body = _answer(server.port, *parts)
            assert head.startswith(b"HTTP/1.1 431 "), head
            assert b"content-type: application/json" in head.lower()
            error = json.loads(body)["error"]
            if target.startswith(b"/v1"):
                assert error["code"] == "request_headers_too_large"
                assert error["type"] == "invalid_request_error"
                assert "65536-byte limit" in error["message"]
            else:
                assert "65536-byte limit" in error
    assert fake.hits == 0


def test_a_large_body_sent_with_its_headers_is_not_taken_for_large_headers(
    fake: FakeOpenAI, upstream_url: str, tmp_path: Path
) -> None:
    """Headers and the start of a 150 KB body in one write (what HTTP clients do with images).

    Before: every byte read before the headers were parsed counted as headers, so
    such requests got 431 "Request Header Fields Too Large".
    """
    settings = gateway_settings(fake, upstream_url, tmp_path)
    text = "x" * 150_000  # far past the 64 KiB the headers may take
    body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with ServerThread(create_app(settings), http=GuardedHttpToolsProtocol) as server:
        answer, said = _answer(server.port, head + body)
    assert answer.startswith(b"HTTP/1.1 200 "), said
    assert fake.hits == 1
