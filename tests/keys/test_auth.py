"""Client keys: who may call, and how every failure looks the same."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import event

from tests.clock import Clock
from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI
from tests.keys.conftest import MASTER, RedisPlace, auth, make_key
from tests.servers import ServerThread

UNAUTHORIZED = "A valid API key is required. Send it as 'Authorization: Bearer <key>'."


@pytest.fixture
def keyed(gateway_factory: GatewayFactory) -> ServerThread:
    return gateway_factory(master_key=MASTER)


def test_public_paths_stay_open_and_chat_needs_a_key(keyed: ServerThread, fake: FakeOpenAI) -> None:
    for path in ("/health", "/models", "/api", "/"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    bodies = []
    for headers in ({}, auth("wrong"), auth("cak_" + "x" * 43), {"Authorization": "Basic abc"}):
        for method, path in (
            ("POST", "/chat"),
            ("POST", "/chat/stream"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("GET", "/usage"),
        ):
            response = httpx.request(
                method, keyed.url + path, json={"message": "hi"}, headers=headers
            )
            assert response.status_code == 401, (path, headers)
            bodies.append(response.json())
    simple = [b for b in bodies if isinstance(b["error"], str)]
    assert {b["error"] for b in simple} == {UNAUTHORIZED}
    assert fake.hits == 0


def test_master_and_client_keys_work_on_both_dialects(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    assert (
        httpx.post(keyed.url + "/chat", json={"message": "hi"}, headers=auth(MASTER)).status_code
        == 200
    )
    secret, _ = make_key(keyed.url)
    assert secret.startswith("cak_") and len(secret) >= 40
    response = httpx.post(keyed.url + "/chat", json={"message": "hi"}, headers=auth(secret))
    assert response.status_code == 200
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=secret)
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # the operator's key went upstream, never the client's
    assert all(r.headers["authorization"] == f"Bearer {fake.api_key}" for r in fake.received)


def test_expired_and_revoked_keys_get_the_same_401(keyed: ServerThread, moved_clock: Clock) -> None:
    secret, key_id = make_key(keyed.url, expires_in_days=1)
    assert (
        httpx.post(keyed.url + "/chat", json={"message": "hi"}, headers=auth(secret)).status_code
        == 200
    )
    moved_clock.advance(86_400 - 60)
    assert (  # a minute before it expires: still good
        httpx.post(keyed.url + "/chat", json={"message": "hi"}, headers=auth(secret)).status_code
        == 200
    )
    moved_clock.advance(61)
    expired = httpx.post(keyed.url + "/chat", json={"message": "hi"}, headers=auth(secret))
    assert expired.status_code == 401 and expired.json()["error"] == UNAUTHORIZED

    secret, key_id = make_key(keyed.url)
    assert (
        httpx.delete(keyed.url + f"/admin/keys/{key_id}", headers=auth(MASTER)).json()["status"]
        == "revoked"
    )
    revoked = httpx.post(keyed.url + "/chat", json={"message": "hi"}, headers=auth(secret))
    assert revoked.status_code == 401 and revoked.json()["error"] == UNAUTHORIZED


def _chat(server: ServerThread, secret: str) -> int:
    response = httpx.post(server.url + "/chat", json={"message": "hi"}, headers=auth(secret))
    return response.status_code


def test_revocation_is_seen_by_another_replica_at_once(
    postgres_url: str, shared_redis: RedisPlace, gateway_factory: GatewayFactory
) -> None:
    shared = {"redis_url": shared_redis.url, "redis_prefix": shared_redis.prefix}
    one = gateway_factory(master_key=MASTER, database_url=postgres_url, **shared)
    two = gateway_factory(master_key=MASTER, database_url=postgres_url, **shared)
    secret, key_id = make_key(one.url)
    assert [_chat(two, secret) for _ in range(3)] == [200] * 3  # cached on two by now
    assert httpx.delete(one.url + f"/admin/keys/{key_id}", headers=auth(MASTER)).status_code == 200
    assert _chat(two, secret) == 401


def test_without_redis_another_process_refuses_a_revoked_key_within_a_second(
    postgres_url: str, gateway_factory: GatewayFactory
) -> None:
    one = gateway_factory(master_key=MASTER, database_url=postgres_url)
    two = gateway_factory(master_key=MASTER, database_url=postgres_url)
    secret, key_id = make_key(one.url)
    assert _chat(one, secret) == 200 and _chat(two, secret) == 200
    assert httpx.delete(one.url + f"/admin/keys/{key_id}", headers=auth(MASTER)).status_code == 200
    assert _chat(one, secret) == 401  # the process that revoked it: at once
    refused_at = None
    deadline = time.monotonic() + 5
    while refused_at is None and time.monotonic() < deadline:
        if _chat(two, secret) == 401:
            refused_at = time.monotonic()
        else:
            time.sleep(0.05)
    assert refused_at is not None  # within SHORT_TTL (1 s) of its last read, in fact


def _key_queries(server: ServerThread) -> list[str]:
    """Every query the server's database is sent for client keys, from now on."""
    seen: list[str] = []
    engine = server.server.config.app.state.runtime.database.sync_engine

    @event.listens_for(engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "client_keys" in statement:
            seen.append(statement)

    return seen


def test_client_keys_are_checked_without_a_query_per_request(
    gateway_factory: GatewayFactory, shared_redis: RedisPlace
) -> None:
    keyed = gateway_factory(
        master_key=MASTER, redis_url=shared_redis.url, redis_prefix=shared_redis.prefix
    )
    secret, _ = make_key(keyed.url)
    queries = _key_queries(keyed)
    statuses = [_chat(keyed, secret) for _ in range(30)]
    assert statuses == [200] * 30
    assert len(queries) == 1  # read once; Redis says when to read it again
    unknown = ["cak_" + secrets.token_urlsafe(32) for _ in range(5)]
    for token in unknown * 2:
        assert _chat(keyed, token) == 401
    # Unknown keys are never remembered: each attempt asks the database again.
    assert len(queries) >= 10


def test_a_key_limited_to_some_models(keyed: ServerThread, fake: FakeOpenAI) -> None:
    secret, _ = make_key(keyed.url, models=["gpt-4o"])
    refused = httpx.post(keyed.url + "/chat", json={"message": "hi"}, headers=auth(secret))
    assert (
        refused.status_code == 403
        and "may not use the model 'gpt-4o-mini'" in refused.json()["error"]
    )
    ok = httpx.post(
        keyed.url + "/chat", json={"message": "hi", "model": "gpt-4o"}, headers=auth(secret)
    )
    assert ok.status_code == 200
    listed = httpx.get(keyed.url + "/v1/models", headers=auth(secret)).json()
    assert [m["id"] for m in listed["data"]] == ["gpt-4o"]
    assert fake.hits == 1


def test_admin_api_is_for_the_master_key_only(
    keyed: ServerThread, gateway_factory: GatewayFactory
) -> None:
    secret, key_id = make_key(keyed.url, name="client")
    for method, path in (
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("GET", f"/admin/keys/{key_id}"),
        ("DELETE", f"/admin/keys/{key_id}"),
        ("GET", "/admin/usage"),
    ):
        response = httpx.request(method, keyed.url + path, headers=auth(secret), json={"name": "x"})
        assert response.status_code == 403, path
    open_server = gateway_factory()
    response = httpx.get(open_server.url + "/admin/keys")
    assert response.status_code == 403 and "CHAT_API_MASTER_KEY" in response.json()["error"]


def test_secrets_are_shown_once_and_stored_only_as_a_hash(
    keyed: ServerThread, tmp_path: Path
) -> None:
    secret, key_id = make_key(keyed.url, name="shown once")
    listing = httpx.get(keyed.url + "/admin/keys", headers=auth(MASTER)).text
    one = httpx.get(keyed.url + f"/admin/keys/{key_id}", headers=auth(MASTER)).json()
    assert secret not in listing and secret not in str(one)
    assert one["prefix"] == secret[:12]
    database = (tmp_path / "gateway.db").read_bytes()
    wal = tmp_path / "gateway.db-wal"
    stored = database + (wal.read_bytes() if wal.exists() else b"")
    assert secret.encode() not in stored


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({}, "'name' is required"),
        ({"name": "x", "rpm": 0}, "'rpm' is out of range"),
        ({"name": "x", "max_in_flight": True}, "'max_in_flight'"),  # not a cap of 1
        ({"name": "x", "rpm": "60"}, "'rpm'"),
        ({"name": "x", "expires_in_days": True}, "'expires_in_days'"),  # not 1 day (fuzz: ST201)
        ({"name": "x", "expires_in_days": "3"}, "'expires_in_days'"),
        ({"name": "x", "models": ["gpt-99"]}, "not in CHAT_API_MODELS"),
        ({"name": "x", "budget_period": "weekly"}, "budget_period"),
        ({"name": "x", "colour": "red"}, "Unknown field 'colour'"),
        # Blank to Python or to JSON Schema's pattern: blank to both (OpenAPI says so too).
        ({"name": "\x1e\x1e"}, "'name' is not valid: Value error, must not be blank"),
        ({"name": " \ufeff\x85\t"}, "must not be blank"),
    ],
)
def test_bad_key_specs_are_refused_plainly(
    keyed: ServerThread, spec: dict[str, object], says: str
) -> None:
    response = httpx.post(keyed.url + "/admin/keys", json=spec, headers=auth(MASTER))
    assert response.status_code == 400
    assert says in response.json()["error"]


def _guess(url: str, key: str, forwarded_for: str | None = None) -> httpx.Response:
    headers = auth(key)
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    return httpx.post(url + "/chat", json={"message": "hi"}, headers=headers)


def test_wrong_keys_are_slowed_down_but_a_valid_key_from_that_address_never_is(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, moved_clock: Clock
) -> None:
    server = gateway_factory(master_key=MASTER, auth_failures_per_minute=5)
    good, _ = make_key(server.url)
    moved_clock.to_minute_start()  # failures are counted per clock minute
    statuses = [_guess(server.url, f"cak_bad{i}").status_code for i in range(8)]
    assert statuses == [401] * 5 + [429] * 3
    refused = _guess(server.url, "cak_bad-again")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"].startswith("Too many failed attempts")
    v1 = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers=auth("cak_bad-v1"),
    )
    assert v1.status_code == 429
    assert (v1.json()["error"]["type"], v1.json()["error"]["code"]) == (
        "requests",
        "rate_limit_exceeded",
    )
    # Behind a proxy or a NAT, everyone else at that address keeps working.
    hits = fake.hits
    assert _guess(server.url, good).status_code == 200
    assert _guess(server.url, MASTER).status_code == 200
    assert fake.hits == hits + 2


def test_rotating_x_forwarded_for_from_an_untrusted_address_does_not_dodge_the_throttle(
    gateway_factory: GatewayFactory, moved_clock: Clock
) -> None:
    server = gateway_factory(master_key=MASTER, auth_failures_per_minute=5)
    moved_clock.to_minute_start()  # failures are counted per clock minute
    statuses = [
        _guess(server.url, f"cak_bad{i}", forwarded_for=f"198.51.100.{i}").status_code
        for i in range(8)
    ]
    assert statuses == [401] * 5 + [429] * 3


def test_behind_a_trusted_proxy_each_client_has_its_own_throttle(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture, moved_clock: Clock
) -> None:
    caplog.set_level(logging.INFO, "chat_api.access")
    # 127.0.0.1 plays the proxy (nginx appends the address it saw to X-Forwarded-For).
    server = gateway_factory(
        master_key=MASTER, auth_failures_per_minute=5, trusted_proxies=("127.0.0.0/8",)
    )
    moved_clock.to_minute_start()  # failures are counted per clock minute
    guesser = [
        _guess(server.url, f"cak_bad{i}", forwarded_for=f"10.9.9.{i}, 203.0.113.7").status_code
        for i in range(7)
    ]
    # Whatever the guesser writes on the left, the proxy's entry names it.
    assert guesser == [401] * 5 + [429] * 2
    neighbour = _guess(server.url, "cak_typo", forwarded_for="203.0.113.8")
    assert neighbour.status_code == 401  # another client behind the same proxy

    def clients() -> set[str]:
        return {getattr(r, "client", "") for r in caplog.records if r.name == "chat_api.access"}

    deadline = time.monotonic() + 3  # a request's log line is written just after its answer
    while not {"203.0.113.7", "203.0.113.8"} <= clients() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {"203.0.113.7", "203.0.113.8"} <= clients()
    assert not clients() & {f"10.9.9.{i}" for i in range(7)}


def test_the_documented_name_pattern_and_the_check_agree_on_blank() -> None:
    """The OpenAPI pattern refuses what the server refuses as blank, and no more."""
    import re

    from chat_api.blank import BLANKS, NOT_BLANK

    pattern = re.compile(NOT_BLANK)
    assert all(pattern.search(c) is None for c in BLANKS)
    assert pattern.search("\x1e a") and pattern.search("é")
    # JSON Schema's own `\s` (ECMA-262) is inside BLANKS, so the pattern can be read either way.
    ecma_spaces = "\t\n\v\f\r \xa0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(
        map(chr, range(0x2000, 0x200B))
    )
    assert set(ecma_spaces) <= set(BLANKS)
    assert {c for c in map(chr, range(0x110000)) if c.isspace()} <= set(BLANKS)  # and Python's
