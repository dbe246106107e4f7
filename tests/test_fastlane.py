"""The fast lane serves the chat routes; FastAPI still documents them, and both agree."""

from __future__ import annotations

import httpx

from chat_api.app import create_app
from chat_api.config import Settings


def _fast_routes() -> dict[tuple[str, str], object]:
    app = create_app(Settings(demo=True))
    assert app.fast_lane is not None
    return {key: route.endpoint for key, route in app.fast_lane.routes.items()}


def test_every_fast_route_is_documented_with_its_own_endpoint(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    routes = _fast_routes()
    assert {path for _, path in routes} == {"/chat", "/chat/stream", "/v1/chat/completions"}
    for (method, path), endpoint in routes.items():
        operation = document["paths"][path][method.lower()]
        assert operation["operationId"].startswith(endpoint.__name__)  # type: ignore[attr-defined]


def test_other_methods_on_a_fast_route_still_get_a_405(client: httpx.Client) -> None:
    for path in ("/chat", "/chat/stream", "/v1/chat/completions"):
        response = client.get(path)
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"


def test_a_405_lists_every_method_the_path_takes(client: httpx.Client) -> None:
    response = client.put("/admin/keys")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
