"""Operations: `/ready` for load balancers and `/metrics` for Prometheus.

`/health`, the liveness probe, belongs to the simple API (routes/simple.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.responses import Response

from chat_api.responses import JSONResponse
from chat_api.services import Services

router = APIRouter(tags=["operations"])

CHECK_SECONDS = 2.0


async def _check(work: Any) -> str:
    try:
        await asyncio.wait_for(work, CHECK_SECONDS)
    except Exception as exc:
        return f"failing: {type(exc).__name__}"
    return "ok"


async def _database(services: Services) -> None:
    async with services.database.connect() as connection:
        await connection.execute(text("SELECT 1"))


@router.get("/ready")
async def ready(request: Request) -> Response:
    """200 when the database, Redis (if set) and the upstream settings are usable; else 503."""
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    checks = {"database": await _check(_database(services))}
    if services.redis is not None:
        checks["redis"] = await _check(services.redis.ping())
    checks["upstream"] = "ok" if services.has_provider else "failing: no OpenAI key and no demo"
    ok = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks},
        status_code=200 if ok else 503,
        headers={"Retry-After": "5"} if not ok else None,
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests, latency, tokens, cost, streams, errors, rejections."""
    ledger = getattr(request.app.state, "ledger", None)
    if ledger is not None:
        request.app.state.metrics.ledger_backlog.set(ledger.backlog)
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
