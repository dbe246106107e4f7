"""CORS follows CHAT_API_CORS_ORIGINS, preflight included; never `*` with credentials."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import GatewayPool
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread

ALLOWED = "https://app.example.com"
OTHER = "https://evil.example.net"


def preflight(url: str, origin: str, path: str = "/chat") -> httpx.Response:
    return httpx.options(
        url + path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
        timeout=10,
    )


@pytest.mark.parametrize("path", ["/chat", "/chat/stream", "/v1/chat/completions"])
def test_preflight_from_a_configured_origin_is_allowed(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI, path: str
) -> None:
    server = shared_gateways.get(cors_origins=(ALLOWED, "http://localhost:3000"))
    response = preflight(server.url, ALLOWED, path)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed_headers = response.headers["access-control-allow-headers"].lower()
    assert "content-type" in allowed_headers and "authorization" in allowed_headers
    assert response.headers.get("access-control-allow-credentials") != "true"
    assert fake.hits == 0


def test_preflight_from_another_origin_is_refused(
    shared_gateways: GatewayPool[ServerThread],
) -> None:
    server = shared_gateways.get(cors_origins=(ALLOWED,))
    response = preflight(server.url, OTHER)
    assert "access-control-allow-origin" not in response.headers
    assert response.status_code >= 400


def test_actual_requests_carry_the_origin_only_when_allowed(
    shared_gateways: GatewayPool[ServerThread],
) -> None:
    server = shared_gateways.get(cors_origins=(ALLOWED,))
    allowed = httpx.get(server.url + "/models", headers={"Origin": ALLOWED})
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    # The browser needs to read these headers from scripts.
    exposed = allowed.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "retry-after" in exposed
    other = httpx.get(server.url + "/models", headers={"Origin": OTHER})
    assert "access-control-allow-origin" not in other.headers


def test_wildcard_answers_star_and_never_allows_credentials(
    shared_gateways: GatewayPool[ServerThread],
) -> None:
    server = shared_gateways.get(cors_origins=("*",))
    for origin in (ALLOWED, OTHER, "null"):
        response = preflight(server.url, origin, "/v1/chat/completions")
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers.get("access-control-allow-credentials") != "true"
    plain = httpx.get(server.url + "/health", headers={"Origin": OTHER})
    assert plain.headers["access-control-allow-origin"] == "*"
    # Even a request that carries cookies or a key gets no credentialed CORS.
    credentialed = httpx.get(
        server.url + "/health",
        headers={"Origin": OTHER, "Cookie": "session=1", "Authorization": "Bearer x"},
    )
    assert credentialed.headers.get("access-control-allow-credentials") != "true"
    assert "access-control-allow-origin" in credentialed.headers


def test_the_default_with_keys_on_is_wildcard(shared_gateways: GatewayPool[ServerThread]) -> None:
    server = shared_gateways.get(master_key="cors-test-master-key-0123456789")
    response = preflight(server.url, OTHER)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("path", ["/chat", "/chat/stream", "/v1/chat/completions"])
def test_with_keys_off_other_websites_are_refused_by_default(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI, path: str
) -> None:
    """A page elsewhere must not spend the operator's key through a local gateway."""
    server = shared_gateways.get()
    refused = preflight(server.url, OTHER, path)
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    # A "simple" request needs no preflight: a browser sends it and hides only the answer.
    body = (
        '{"message": "hi"}'
        if not path.startswith("/v1")
        else ('{"messages": [{"role": "user", "content": "hi"}]}')
    )
    for origin in (OTHER, "null", "http://127.0.0.1:1"):
        simple = httpx.post(
            server.url + path,
            content=body,
            headers={"Origin": origin, "Content-Type": "text/plain"},
        )
        assert simple.status_code == 403, origin
        assert "other websites" in simple.text
        assert "access-control-allow-origin" not in simple.headers
        assert simple.headers["vary"] == "Origin"
    assert fake.hits == 0


def test_with_keys_off_the_gateways_own_page_still_works(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    server = shared_gateways.get()
    own = server.url  # http://127.0.0.1:<port>: what a browser on the page sends as Origin
    for headers in ({"Origin": own}, {"Origin": "null", "Sec-Fetch-Site": "same-origin"}):
        response = httpx.post(server.url + "/chat", json={"message": "hi"}, headers=headers)
        assert response.status_code == 200, headers
    assert fake.hits == 2


def test_origins_set_on_purpose_are_allowed_with_keys_off(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    server = shared_gateways.get(cors_origins=("*",))
    response = httpx.post(server.url + "/chat", json={"message": "hi"}, headers={"Origin": OTHER})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("origin", [None, ALLOWED, OTHER])
def test_every_answer_varies_by_origin_once(
    shared_gateways: GatewayPool[ServerThread], origin: str | None
) -> None:
    """Caches must not hand an answer made for one origin (or none) to another."""
    server = shared_gateways.get(cors_origins=(ALLOWED,))
    headers = {"Origin": origin} if origin else {}
    calls = [("GET", "/models", None), ("POST", "/chat", {"message": "hi"})]
    calls += [("POST", "/chat/stream", {"message": "hi"}), ("GET", "/nowhere", None)]
    for method, path, body in calls:
        response = httpx.request(method, server.url + path, json=body, headers=headers)
        assert [v.lower() for v in response.headers.get_list("vary")] == ["origin"], path
        allowed = response.headers.get("access-control-allow-origin")
        assert allowed == (ALLOWED if origin == ALLOWED else None), path
