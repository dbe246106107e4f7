"""A client that goes away stops the spend: the upstream request is closed at once."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.servers import ServerThread

LONG_TEXT = " ".join(f"word{i}" for i in range(300))  # 30 s at 0.1 s a chunk
CLOSE_WAIT = 2.0

STREAMS = [
    pytest.param("/chat/stream", {"message": "tell me a long story"}, id="simple"),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "tell me a long story"}], "stream": True},
        id="v1",
    ),
]
WHOLE = [
    pytest.param("/chat", {"message": "think hard"}, id="simple"),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "think hard"}]},
        id="v1",
    ),
]


@pytest.mark.parametrize(("path", "body"), STREAMS)
def test_closing_a_stream_closes_the_upstream(
    gateway: ServerThread, fake: FakeOpenAI, path: str, body: dict[str, object]
) -> None:
    fake.queue(Plan(text=LONG_TEXT, chunk_interval=0.1))
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            seen = 0
            for line in response.iter_lines():
                if line.startswith("data:"):
                    seen += 1
                if seen == 3:
                    break
        assert seen == 3
        upstream = fake.last()
        assert not upstream.finished.is_set()
    assert upstream.closed_early.wait(CLOSE_WAIT), "the upstream stream was left running"
    assert not upstream.finished.is_set()


@pytest.mark.parametrize(("path", "body"), WHOLE)
def test_giving_up_on_a_whole_answer_still_reads_it_to_the_end(
    gateway: ServerThread, fake: FakeOpenAI, path: str, body: dict[str, object]
) -> None:
    """OpenAI goes on writing a whole answer (and bills it) when its caller leaves, so the
    gateway reads it to its end and records its exact usage (tests/limits has the money)."""
    fake.queue(Plan(delay_before_headers=1))
    with httpx.Client(base_url=gateway.url, timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post(path, json=body)
    assert fake.hits == 1
    upstream = fake.last()
    assert upstream.finished.wait(5), "the upstream answer was not read to its end"
    assert not upstream.closed_early.is_set()


def test_a_client_that_stays_gets_the_whole_answer(gateway: ServerThread, fake: FakeOpenAI) -> None:
    """The control case: with nobody leaving, the upstream is not closed early."""
    text = " ".join(f"w{i}" for i in range(10))
    fake.queue(Plan(text=text, chunk_interval=0.02))
    with httpx.stream(
        "POST", gateway.url + "/chat/stream", json={"message": "hi"}, timeout=10
    ) as response:
        body = response.read().decode()
    assert '"done"' in body
    upstream = fake.last()
    assert upstream.finished.wait(2)
    assert not upstream.closed_early.is_set()
