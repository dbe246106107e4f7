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
