"""The fast lane serves the chat routes; FastAPI still documents them, and both agree."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, Depends, Request
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import Response
from starlette.testclient import TestClient

from chat_api.app import create_app
from chat_api.config import Settings
from chat_api.fastlane import hot
from chat_api.routes.deps import CallerDep
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread


@pytest.fixture
def demo_settings() -> Settings:
    return Settings(demo=True)


def _fast_routes() -> dict[tuple[str, str], object]:
    app = create_app(Settings(demo=True))
    app.build_middleware_stack()  # what starting the app does
    assert app.fast_lane is not None
    return {key: route.endpoint for key, route in app.fast_lane.routes.items()}


def test_every_fast_route_is_documented_with_its_own_endpoint(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    routes = _fast_routes()
    assert {path for _, path in routes} == {
        "/chat",
        "/chat/stream",
        "/v1/chat/completions",
        "/v1/responses",
    }
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


def _dependency() -> None:
    return None


def test_a_dependency_on_a_hot_route_stops_startup_rather_than_being_skipped() -> None:
    app = create_app(Settings(demo=True))
    extra = APIRouter()

    @extra.post("/v1/checked", dependencies=[Depends(_dependency)])
    @hot
    async def checked(request: Request, caller: CallerDep) -> Response:
        return Response()

    app.include_router(extra)
    with pytest.raises(RuntimeError, match="would skip its dependencies"):
        app.build_middleware_stack()


def test_a_router_dependency_applies_to_cold_routes_and_stops_startup_for_hot_ones() -> None:
    app = create_app(Settings(demo=True))
    extra = APIRouter(dependencies=[Depends(_dependency)])

    @extra.post("/v1/extra")
    @hot
    async def extra_route(request: Request, caller: CallerDep) -> Response:
        return Response()

    app.include_router(extra)
    with pytest.raises(RuntimeError, match="/v1/extra"):
        app.build_middleware_stack()


def test_middleware_added_to_the_app_stops_startup(demo_settings: Settings) -> None:
    app = create_app(demo_settings)
    app.add_middleware(GZipMiddleware)
    with pytest.raises(RuntimeError, match="GZipMiddleware"):
        app.build_middleware_stack()
    with pytest.raises(RuntimeError), TestClient(app):
        pass  # starting it fails the same way


def test_a_trailing_slash_is_a_404_in_the_paths_dialect_not_a_redirect(
    shared_gateway: ServerThread, fake: FakeOpenAI
) -> None:
    """No 307 with a Location built from the Host header: the contract's 404, as for any path."""
    cases = [
        ("POST", "/v1/chat/completions/"),
        ("POST", "/v1/responses/"),
        ("GET", "/v1/models/"),
        ("POST", "/chat/"),
        ("POST", "/chat/stream/"),
        ("GET", "/health/"),
        ("GET", "/admin/keys/"),
        ("GET", "/static"),
    ]
    for method, path in cases:
        body = {"message": "hi", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.request(
            method,
            shared_gateway.url + path,
            json=body if method == "POST" else None,
            headers={"Host": "evil.example"},
            follow_redirects=False,
        )
        assert response.status_code == 404, path
        assert "location" not in response.headers, path
        error = response.json()["error"]
        if path.startswith("/v1/"):
            assert error["code"] == "unknown_url", path
            assert "/v1/chat/completions, /v1/responses" in error["message"]
        else:
            assert error == f"There is nothing at {path}.", path
    assert fake.hits == 0
