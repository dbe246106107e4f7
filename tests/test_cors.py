"""CORS follows CHAT_API_CORS_ORIGINS, preflight included; never `*` with credentials."""

from __future__ import annotations

import socket

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


V1_BODY = '{"messages": [{"role": "user", "content": "hi"}]}'


def test_with_keys_off_a_name_rebound_to_the_gateway_is_refused(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1, so its page is "same-origin"."""
    server = shared_gateways.get()
    rebound = f"evil.example:{server.port}"
    cases = [
        ("POST", "/v1/chat/completions", {"Origin": f"http://{rebound}"}),
        ("POST", "/chat", {"Origin": f"http://{rebound}", "Sec-Fetch-Site": "same-origin"}),
        ("POST", "/chat", {"Origin": "null", "Sec-Fetch-Site": "same-origin"}),
        # A same-origin GET carries no Origin, but reads what a keys-off gateway shows.
        ("GET", "/usage", {"Sec-Fetch-Site": "same-origin"}),
        ("GET", "/", {"Sec-Fetch-Site": "none"}),
    ]
    for method, path, headers in cases:
        response = httpx.request(
            method,
            server.url + path,
            content=V1_BODY if path.startswith("/v1") else '{"message": "hi"}',
            headers={**headers, "Host": rebound, "Content-Type": "text/plain"},
        )
        assert response.status_code == 403, (path, headers)
        error = response.json()["error"]
        if path.startswith("/v1"):
            assert error["code"] == "cross_origin_not_allowed"
        else:
            assert "other websites" in error
        assert "access-control-allow-origin" not in response.headers
    assert fake.hits == 0


def test_with_keys_off_the_page_works_on_loopback_names_and_addresses(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    server = shared_gateways.get()
    port = server.port
    for host in ("127.0.0.1", "localhost", "[::1]", "chat.localhost", "LocalHost"):
        own = f"{host}:{port}"
        page = httpx.get(server.url + "/", headers={"Host": own, "Sec-Fetch-Site": "none"})
        assert page.status_code == 200, host
        assert page.headers["content-type"].startswith("text/html")
        script = httpx.get(
            server.url + "/static/app.js",
            headers={"Host": own, "Origin": f"http://{own}", "Sec-Fetch-Site": "same-origin"},
        )
        assert script.status_code == 200, host
        chat = httpx.post(
            server.url + "/chat",
            json={"message": "hi"},
            headers={"Host": own, "Origin": f"http://{own}", "Sec-Fetch-Site": "same-origin"},
        )
        assert chat.status_code == 200, host
    assert fake.hits == 5


def test_with_keys_off_callers_without_a_browser_may_use_any_host(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    """curl and the SDKs send neither Origin nor Sec-Fetch-Site: the Host is theirs to pick."""
    server = shared_gateways.get()
    response = httpx.post(
        server.url + "/v1/chat/completions",
        content=V1_BODY,
        headers={"Host": "gateway.internal:8080", "Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert fake.hits == 1


def test_with_keys_off_the_page_works_on_names_the_operator_gave(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    """A host named in CHAT_API_CORS_ORIGINS (any port), CHAT_API_HOST, or the machine's
    own name (how a LAN reaches it) is the gateway's."""
    server = shared_gateways.get(cors_origins=("http://chat.lan:8080",), host="gateway.lan")
    machine = socket.gethostname().lower()
    names = ("chat.lan", "gateway.lan", machine, machine.partition(".")[0] + ".local")
    for name in names:
        own = f"{name}:{server.port}"
        response = httpx.post(
            server.url + "/chat",
            json={"message": "hi"},
            headers={"Host": own, "Origin": f"http://{own}"},
        )
        assert response.status_code == 200, name
    other = f"other.lan:{server.port}"
    refused = httpx.post(
        server.url + "/chat",
        json={"message": "hi"},
        headers={"Host": other, "Origin": f"http://{other}"},
    )
    assert refused.status_code == 403
    assert fake.hits == len(names)


def test_with_keys_on_the_page_may_be_served_on_any_name(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI
) -> None:
    """A page without a key cannot spend anything: its own origin is not refused."""
    server = shared_gateways.get(
        master_key="cors-test-master-key-0123456789", cors_origins=(ALLOWED,)
    )
    own = f"chat.example.org:{server.port}"
    response = httpx.post(
        server.url + "/chat",
        json={"message": "hi"},
        headers={"Host": own, "Origin": f"http://{own}"},
    )
    assert response.status_code == 401
    assert fake.hits == 0
