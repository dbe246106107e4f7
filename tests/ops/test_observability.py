"""Metrics, readiness and the per-request log line."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from chat_api.providers.probe import UpstreamProbe
from tests.conftest import GatewayFactory
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.keys.conftest import MASTER, PrivateRedis, auth, make_key
from tests.ops.conftest import Spawn, free_port

WORDS = len(DEFAULT_TEXT.split(" "))


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_what_happened(gateway_factory: GatewayFactory, fake: FakeOpenAI) -> None:
    server = gateway_factory(master_key=MASTER)
    secret, _ = make_key(server.url, rpm=2)
    for _ in range(3):
        httpx.post(server.url + "/chat", json={"message": "hi"}, headers=auth(secret))
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers=auth(MASTER),
        json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        response.read()
    fake.queue(Plan(status=500))
    httpx.post(server.url + "/chat", json={"message": "hi"}, headers=auth(MASTER))
    text = httpx.get(server.url + "/metrics").text

    assert (
        _metric(text, "chatapi_requests_total", route="/chat", status="200", model="gpt-4o-mini")
        == 2
    )
    assert _metric(text, "chatapi_requests_total", route="/chat", status="429") == 1
    assert _metric(text, "chatapi_requests_total", route="/chat", status="502") == 1
    assert _metric(text, "chatapi_limit_rejections_total", reason="rate_limit_exceeded") == 1
    assert _metric(text, "chatapi_tokens_total", model="gpt-4o", kind="completion") == WORDS
    assert _metric(text, "chatapi_tokens_total", model="gpt-4o-mini", kind="prompt") == 14
    assert _metric(text, "chatapi_cost_usd_total", model="gpt-4o") > 0
    assert _metric(text, "chatapi_upstream_calls_total", outcome="ok") == 3
    assert _metric(text, "chatapi_upstream_calls_total", outcome="upstream_error") == 1
    assert _metric(text, "chatapi_time_to_first_token_seconds_count", model="gpt-4o") == 1
    assert _metric(text, "chatapi_open_streams") == 0
    assert "chatapi_ledger_backlog" in text
    assert secret not in text and secret[:12] not in text and MASTER not in text


def test_ready_follows_the_database_redis_and_key(
    gateway_factory: GatewayFactory, private_redis: PrivateRedis
) -> None:
    server = gateway_factory(redis_url=private_redis.url)
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "redis": "ok", "upstream": "ok"},
    }
    private_redis.stop()
    down = httpx.get(server.url + "/ready")
    assert down.status_code == 503 and down.json()["checks"]["redis"].startswith("failing")
    assert httpx.get(server.url + "/health").status_code == 200  # alive, just not ready
    no_key = gateway_factory(openai_api_key=None)
    assert httpx.get(no_key.url + "/ready").status_code == 503


def test_one_json_line_per_request_with_ids_and_no_keys(
    spawn: Spawn, fake: FakeOpenAI, upstream_url: str, tmp_path: Path
) -> None:
    gateway = spawn(
        {
            "OPENAI_API_KEY": fake.api_key,
            "OPENAI_BASE_URL": upstream_url,
            "CHAT_API_MASTER_KEY": MASTER,
            "CHAT_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/g.db",
        }
    )
    secret, key_id = make_key(gateway.url)
    httpx.post(
        gateway.url + "/chat",
        json={"message": "hi"},
        headers={**auth(secret), "X-Request-ID": "trace-me-1"},
    )
    httpx.post(gateway.url + "/chat", json={"message": "hi"}, headers=auth("cak_wrong"))
    gateway.stop()
    lines = [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    chat = [entry for entry in lines if entry.get("request_id") == "trace-me-1"]
    assert len(chat) == 1
    entry = chat[0]
    assert entry["message"] == "request" and entry["route"] == "/chat"
    assert entry["status"] == 200 and entry["key_id"] == key_id and entry["model"] == "gpt-4o-mini"
    assert entry["outcome"] == "ok"
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (7, WORDS)
    assert entry["latency_ms"] > 0
    assert any(e.get("status") == 401 for e in lines)
    everything = gateway.logs()
    for secret_text in (secret, MASTER, fake.api_key, "cak_wrong"):
        assert secret_text not in everything
    assert not re.search(r"Traceback", everything)


def test_ready_says_when_the_upstream_cannot_be_reached(gateway_factory: GatewayFactory) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    nobody = f"http://{address}/v1"
    server = gateway_factory(openai_base_url=nobody)
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["upstream"].startswith("failing") and address in checks["upstream"]
    demo = gateway_factory(openai_base_url=nobody, demo=True)  # the demo calls nobody
    assert httpx.get(demo.url + "/ready").status_code == 200


def test_the_upstream_probe_is_cached_for_ten_seconds() -> None:
    async def scenario() -> list[str]:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        upstream = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        now = 100.0
        probe = UpstreamProbe(f"http://127.0.0.1:{port}/v1", clock=lambda: now)
        seen = [await probe.status()]
        upstream.close()
        await upstream.wait_closed()
        now += 9.9
        seen.append(await probe.status())  # still the answer of 9.9 s ago: no new connection
        now += 0.1
        seen.append(await probe.status())  # ten seconds on: asked again, and nobody answers
        return seen

    ok, cached, failing = asyncio.run(scenario())
    assert ok == cached == "ok"
    assert failing.startswith("failing") and "cannot connect to 127.0.0.1" in failing


def test_the_upstream_probe_asks_the_proxy_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    direct = UpstreamProbe("https://api.openai.com/v1")
    assert (direct.host, direct.port) == ("api.openai.com", 443)
    monkeypatch.setenv("HTTPS_PROXY", "http://10.1.2.3:3128")
    proxied = UpstreamProbe("https://api.openai.com/v1")
    assert (proxied.host, proxied.port) == ("10.1.2.3", 3128)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2])
def test_workers_add_up_their_metrics_and_log_like_one(
    spawn: Spawn, fake: FakeOpenAI, upstream_url: str, tmp_path: Path, workers: int
) -> None:
    gateway = spawn(
        {
            "OPENAI_API_KEY": fake.api_key,
            "OPENAI_BASE_URL": upstream_url,
            "CHAT_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/g.db",
        },
        "--workers",
        str(workers),
    )
    for _ in range(20):  # new connections, spread by the kernel over the workers
        assert httpx.post(gateway.url + "/chat", json={"message": "hi"}).status_code == 200
    text = httpx.get(gateway.url + "/metrics").text
    assert _metric(text, "chatapi_requests_total", route="/chat", status="200") == 20
    assert _metric(text, "chatapi_upstream_calls_total", outcome="ok") == 20
    gateway.stop()
    lines = [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert messages.count("started") == workers  # each worker's start, as one process logs it
    chat = [e for e in lines if e["message"] == "request" and e.get("route") == "/chat"]
    assert len(chat) == 20 and all(e["status"] == 200 for e in chat)
    assert messages.count("Application shutdown complete.") == workers
    assert "Traceback" not in gateway.logs()
