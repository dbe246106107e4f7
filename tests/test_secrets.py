"""The operator's OpenAI key never shows up in a response or a log line, whatever happens."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from chat_api import logs
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.servers import ServerThread

LOGGERS = (
    "chat_api",
    "uvicorn",
    "uvicorn.error",
    "gunicorn.error",
    "openai",
    "httpx2",
    "httpx",
    "httpcore",
)


class Collect(logging.Handler):
    """Every record that reaches the root logger, fully formatted; and the service's own output."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.service_output = io.StringIO()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter().format(record) + repr(record.__dict__))


@pytest.fixture
def json_logs() -> Iterator[Collect]:
    """The service's own logging (debug, JSON, to stderr), restored afterwards."""
    saved = {
        name: (
            list(logging.getLogger(name).handlers),
            logging.getLogger(name).propagate,
            logging.getLogger(name).level,
        )
        for name in LOGGERS
    }
    root = logging.getLogger()
    collect = Collect()
    root_level = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    logs.configure("debug", "json")
    # The service's handler (JSON formatter and redacting filter) writes here instead of stderr.
    service_handler = logging.getLogger("chat_api").handlers[0]
    assert isinstance(service_handler, logging.StreamHandler)
    service_handler.setStream(collect.service_output)
    try:
        yield collect
    finally:
        root.removeHandler(collect)
        root.setLevel(root_level)
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)


def _error_body(message: str, status: int) -> dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key" if status == 401 else None,
        }
    }


def _error_event(message: str) -> bytes:
    head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    first = {**head, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    error = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (first, error))


SIMPLE = {"message": "hello"}
V1 = {"messages": [{"role": "user", "content": "hello"}]}
V1_STREAM = {**V1, "stream": True, "stream_options": {"include_usage": True}}


def leaky_message(key: str) -> str:
    """What OpenAI's error text could look like if it quoted the key back."""
    return f"Incorrect API key provided: {key}. Find your key at platform.openai.com."


def assert_never_shown(key: str, seen: list[str], collected: Collect) -> None:
    secret_part = key[8:]  # what is left after any harmless prefix
    for text in seen:
        assert secret_part not in text, f"the key leaked to a client: {text[:600]}"
    request_ids = re.findall(r"'x-request-id': '([^']+)'", " ".join(seen))
    # A request's log line is written as it ends, which may be just after the client's read.
    deadline = time.monotonic() + 3
    while True:
        stderr = collected.service_output.getvalue()
        if any(rid in stderr for rid in request_ids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert any(rid in stderr for rid in request_ids), (
        "no request was logged with its id: the log capture is not working"
    )
    for line in stderr.splitlines() + collected.lines:
        assert secret_part not in line, f"the key leaked to the log: {line[:600]}"


def shown(response: httpx.Response) -> str:
    return f"{response.status_code} {response.headers} {response.text}"


def test_the_key_never_leaks_from_answers_errors_or_logs(
    gateway: ServerThread,
    fake: FakeOpenAI,
    json_logs: Collect,
) -> None:
    key = fake.api_key
    leaky = leaky_message(key)
    seen: list[str] = []
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        # Answers that work.
        for path in ("/health", "/models", "/api", "/v1/models", "/openapi.json", "/"):
            seen.append(shown(http.get(path)))
        for path, body in (
            ("/chat", SIMPLE),
            ("/chat/stream", SIMPLE),
            ("/v1/chat/completions", V1),
            ("/v1/chat/completions", V1_STREAM),
        ):
            response = http.post(path, json=body)
            assert response.status_code == 200
            seen.append(shown(response))

        # The upstream rejects the key and quotes it back in full.
        for path, body in (
            ("/chat", SIMPLE),
            ("/chat/stream", SIMPLE),
            ("/v1/chat/completions", V1),
            ("/v1/chat/completions", V1_STREAM),
        ):
            fake.queue(Plan(status=401, error_body=_error_body(leaky, 401)))
            response = http.post(path, json=body)
            assert response.status_code == 502
            seen.append(shown(response))

        # Other upstream errors whose text carries the key.
        for status in (400, 403, 404, 422, 500):
            for path, body in (("/chat", SIMPLE), ("/v1/chat/completions", V1)):
                fake.queue(Plan(status=status, error_body=_error_body(leaky, status)))
                response = http.post(path, json=body)
                assert response.status_code >= 400
                seen.append(shown(response))

        # Broken streams and bad requests.
        fake.queue(Plan(drop_after_chunks=2), Plan(malformed_after_chunks=2))
        seen.append(shown(http.post("/chat/stream", json=SIMPLE)))
        seen.append(shown(http.post("/v1/chat/completions", json=V1_STREAM)))
        seen.append(shown(http.post("/chat", content=b"{broken")))
        seen.append(shown(http.post("/v1/chat/completions", json={"messages": [], "api_key": key})))

    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="client-side", max_retries=0) as sdk:
        fake.queue(Plan(status=401, error_body=_error_body(leaky, 401)))
        with pytest.raises(openai.APIStatusError) as raised:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=V1["messages"])
        seen.append(str(raised.value) + repr(raised.value.body))

    # The key was really in use: the fake received it on every call.
    assert fake.hits >= 20
    assert {r.headers["authorization"] for r in fake.received} == {f"Bearer {key}"}
    assert_never_shown(key, seen, json_logs)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/chat/stream", SIMPLE), ("/v1/chat/completions", V1_STREAM)],
    ids=["simple", "v1"],
)
def test_the_key_never_leaks_from_a_mid_stream_error_event(
    gateway: ServerThread,
    fake: FakeOpenAI,
    json_logs: Collect,
    path: str,
    body: dict[str, object],
) -> None:
    fake.queue(Plan(raw_chunks=[_error_event(leaky_message(fake.api_key))]))
    response = httpx.post(gateway.url + path, json=body, timeout=10)
    assert response.status_code == 200
    assert "error" in response.text and "Incorrect API key provided" in response.text
    assert_never_shown(fake.api_key, [shown(response)], json_logs)


def test_a_key_sent_as_the_request_id_is_not_echoed_or_logged(
    gateway_factory: Callable[..., ServerThread], fake: FakeOpenAI
) -> None:
    server = gateway_factory()
    sneaky = "cak_" + "A" * 43
    response = httpx.post(
        server.url + "/chat", json={"message": "hi"}, headers={"X-Request-ID": sneaky}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] != sneaky
    assert fake.last().headers["x-request-id"] != sneaky
