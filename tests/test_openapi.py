"""The OpenAPI document and the docs page describe the contract."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.servers import ServerThread

CONTRACT = {
    "/health": "get",
    "/models": "get",
    "/chat": "post",
    "/chat/stream": "post",
    "/api": "get",
    "/v1/models": "get",
    "/v1/chat/completions": "post",
}


@pytest.fixture
def gateway(shared_gateway: ServerThread) -> ServerThread:
    """These tests only read the documents: they share the module's gateway."""
    return shared_gateway


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"external reference {ref}"
    node: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolvable reference {ref}"
        node = node[part]
    return node


def test_openapi_lists_every_contract_path(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["openapi"].startswith("3.")
    for path, method in CONTRACT.items():
        assert path in document["paths"], f"{path} is missing"
        assert method in document["paths"][path], f"{method.upper()} {path} is missing"


def test_every_reference_resolves(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    refs = _refs(document)
    assert refs
    for ref in refs:
        _resolve(document, ref)


def test_chat_request_schema_is_present_and_used(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    schema = document["components"]["schemas"]["ChatRequest"]
    assert "message" in schema["properties"]
    assert "message" in schema.get("required", [])
    for name in ("model", "messages", "system", "temperature", "max_tokens"):
        assert name in schema["properties"], f"ChatRequest lacks {name}"
    for path in ("/chat", "/chat/stream"):
        body = document["paths"][path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert _resolve(document, ref) == schema
    stream = document["paths"]["/chat/stream"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream


def test_error_statuses_are_documented(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/chat", "/chat/stream", "/v1/chat/completions"):
        documented = set(paths[path]["post"]["responses"])
        assert {"400", "429", "502", "503", "504"} <= documented, path
    assert "404" in paths["/v1/chat/completions"]["post"]["responses"]


def test_docs_pages_are_html_that_load_only_this_servers_scripts(client: httpx.Client) -> None:
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "script-src 'self';" in response.headers["content-security-policy"]
        sources = re.findall(r'<script src="([^"]+)"', response.text)
        assert sources and all(src.startswith("/static/") for src in sources)
        assert "<script>" not in response.text  # nothing inline, which the CSP would block
        for src in sources:
            assert client.get(src).status_code == 200, src
    assert "/openapi.json" in client.get("/static/docs/swagger.js").text
    assert 'spec-url="/openapi.json"' in client.get("/redoc").text
