"""The usage ledger: a row for every call that reached the upstream, exact or marked estimated."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from uvicorn.protocols.http import httptools_impl

from chat_api.limits import admission
from tests.conftest import GatewayFactory
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.keys.conftest import MASTER, auth, make_key

WORDS = len(DEFAULT_TEXT.split(" "))


def _rows(tmp_path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(tmp_path / "gateway.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM usage ORDER BY id")]


def test_every_call_leaves_a_row_matching_the_upstreams_usage(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    server = gateway_factory(master_key=MASTER)
    secret, key_id = make_key(server.url)
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=secret)
    httpx.post(server.url + "/chat", json={"message": "a"}, headers=auth(secret))
    with httpx.stream(
        "POST", server.url + "/chat/stream", json={"message": "b"}, headers=auth(secret)
    ) as response:
        response.read()
    sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "c"}])
    list(
        sdk.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "d"}]
        )
    )
    fake.queue(Plan(status=500))
    httpx.post(server.url + "/chat", json={"message": "e"}, headers=auth(secret))
    # refused before the upstream: no row
    httpx.post(server.url + "/chat", json={"message": " "}, headers=auth(secret))
    server.stop()  # a normal stop writes whatever is queued

    rows = _rows(tmp_path)
    assert len(rows) == fake.hits == 5
    assert [r["endpoint"] for r in rows] == [
        "/chat",
        "/chat/stream",
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/chat",
    ]
    assert [bool(r["streamed"]) for r in rows] == [False, True, False, True, False]
    assert [r["model"] for r in rows] == [
        "gpt-4o-mini",
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4o",
        "gpt-4o-mini",
    ]
    for row in rows[:4]:
        assert row["outcome"] == "ok"
        assert (row["prompt_tokens"], row["completion_tokens"]) == (7, WORDS)
        assert not row["estimated"]
        assert row["key_id"] == key_id
        assert row["cost_usd"] > 0
        assert row["latency_ms"] > 0 and row["ttft_ms"] is not None
        assert row["upstream_request_id"] == "req_fake_upstream"
    assert rows[4]["outcome"] == "upstream_error"
    assert rows[4]["completion_tokens"] == 0
    assert len({r["request_id"] for r in rows}) == 5
    expected_cost = (7 * 0.15 + WORDS * 0.60) / 1_000_000  # gpt-4o-mini list prices
    assert rows[0]["cost_usd"] == pytest.approx(expected_cost)


def test_rows_queued_at_shutdown_are_written(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    server = gateway_factory(ledger_flush_interval=3600, ledger_batch_size=1000)
    for _ in range(7):
        assert httpx.post(server.url + "/chat", json={"message": "hi"}).status_code == 200
    assert _rows(tmp_path) == []  # nothing written yet: batched
    server.stop()
    assert len(_rows(tmp_path)) == 7


def test_a_key_sees_only_its_own_usage(postgres_url: str, gateway_factory: GatewayFactory) -> None:
    server = gateway_factory(master_key=MASTER, database_url=postgres_url)
    alice, alice_id = make_key(server.url, name="alice")
    bob, bob_id = make_key(server.url, name="bob")
    for _ in range(3):
        httpx.post(server.url + "/chat", json={"message": "hi"}, headers=auth(alice))
    httpx.post(server.url + "/chat", json={"message": "hi", "model": "gpt-4o"}, headers=auth(bob))

    mine = httpx.get(server.url + "/usage", headers=auth(alice)).json()
    assert mine["key"]["id"] == alice_id
    assert mine["totals"]["requests"] == 3
    assert [m["model"] for m in mine["by_model"]] == ["gpt-4o-mini"]
    bobs = httpx.get(server.url + "/usage", headers=auth(bob)).json()
    assert bobs["totals"]["requests"] == 1 and bobs["by_model"][0]["model"] == "gpt-4o"
    # no way for alice to ask for bob's: query parameters are ignored, admin is refused
    sneaky = httpx.get(server.url + "/usage", params={"key_id": bob_id}, headers=auth(alice))
    assert sneaky.json()["totals"]["requests"] == 3
    assert (
        httpx.get(
            server.url + "/admin/usage", params={"key_id": bob_id}, headers=auth(alice)
        ).status_code
        == 403
    )
    everyone = httpx.get(server.url + "/admin/usage", headers=auth(MASTER)).json()
    assert everyone["totals"]["requests"] == 4
    assert {k["key_id"]: k["requests"] for k in everyone["by_key"]} == {alice_id: 3, bob_id: 1}
    by_day = everyone["by_day"]
    assert len(by_day) == 1 and by_day[0]["requests"] == 4
    assert (
        httpx.get(
            server.url + "/admin/usage", params={"since": "yesterday"}, headers=auth(MASTER)
        ).status_code
        == 400
    )


def test_a_whole_answer_is_written_before_its_call_is_settled(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The settlement (the ledger row, the corrections) comes after the answer, not in its way,
    and still once a call: /v1 and /chat, one after the other."""
    server = gateway_factory()
    port = httpx.URL(server.url).port
    events: list[str] = []
    settle, send = admission._Recorded.settle, httptools_impl.RequestResponseCycle.send

    def settling(self: Any, result: Any) -> None:
        events.append("settled")
        settle(self, result)

    async def sending(self: Any, message: Any) -> None:
        last = message["type"] == "http.response.body" and not message.get("more_body")
        if last and self.scope["server"][1] == port:  # the gateway's, not the fake upstream's
            events.append("answered")
        await send(self, message)

    monkeypatch.setattr(admission._Recorded, "settle", settling)
    monkeypatch.setattr(httptools_impl.RequestResponseCycle, "send", sending)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200
        assert httpx.post(server.url + "/chat", json={"message": "hi"}).status_code == 200
    server.stop()
    assert events == ["answered", "settled"] * 6
    assert len(_rows(tmp_path)) == 6
