"""Upstream headers the gateway passes on: only what is safe to relay, log and store.

An upstream `x-request-id` outside latin-1 (or carrying a key) used to be a
500 after a billed call, and a streamed call was then never settled. Now it
is dropped, the answer goes through, and the ledger has its one row.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI, Plan

CALLS = [
    pytest.param("/chat", {"message": "hi"}, id="simple"),
    pytest.param("/chat/stream", {"message": "hi"}, id="simple-stream"),
    pytest.param(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, id="v1"
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        id="v1-stream",
    ),
]
ODD_IDS = [
    "req_日本語".encode(),  # UTF-8, far outside latin-1
    b"req_\xff\xfe",  # not UTF-8 at all
    "req_café".encode(),
]


def _rows(db: Path, count: int) -> list[tuple[object, ...]]:
    deadline = time.monotonic() + 5
    rows: list[tuple[object, ...]] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as connection:
            rows = connection.execute("SELECT outcome, upstream_request_id FROM usage").fetchall()
        if len(rows) >= count:
            break
        time.sleep(0.1)
    return rows


@pytest.mark.parametrize("upstream_client", ["aiohttp", "sdk"])
@pytest.mark.parametrize(("path", "body"), CALLS)
def test_an_upstream_request_id_outside_latin1_is_dropped_and_the_call_settled(
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
    tmp_path: Path,
    upstream_client: str,
    path: str,
    body: dict[str, object],
) -> None:
    server = gateway_factory(upstream_client=upstream_client)
    for odd in ODD_IDS:
        fake.queue(Plan(raw_headers=[(b"x-request-id", odd), (b"x-odd-" + odd[:3], odd)]))
        response = httpx.post(server.url + path, json=body, timeout=10)
        assert response.status_code == 200
        assert "x-upstream-request-id" not in response.headers
        assert "Hello" in response.text
    rows = _rows(tmp_path / "gateway.db", len(ODD_IDS))
    assert rows == [("ok", None)] * len(ODD_IDS)  # one row per call, each settled
