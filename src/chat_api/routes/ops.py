"""Operations: `/ready` for load balancers and `/metrics` for Prometheus.

`/health`, the liveness probe, belongs to the simple API (routes/simple.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import Response

from chat_api.http_responses import JSONResponse
from chat_api.providers.probe import check
from chat_api.routes.deps import runtime_of

router = APIRouter(tags=["operations"])


async def _database(database: AsyncEngine) -> None:
    async with database.connect() as connection:
        await connection.execute(text("SELECT 1"))


@router.get("/ready")
async def ready(request: Request) -> Response:
    """200 when the database, Redis (if set) and the upstream are usable; else 503."""
    runtime = runtime_of(request)
    checks = {"database": await check(_database(runtime.database))}
    if runtime.redis is not None:
        checks["redis"] = await check(runtime.redis.ping())
    if runtime.engine.provider is None:
        checks["upstream"] = "failing: no OpenAI key and no demo"
    elif runtime.settings.demo:
        checks["upstream"] = "ok"  # the demo model answers from this process
    else:
        checks["upstream"] = await runtime.upstream_probe.status()
    ok = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks},
        status_code=200 if ok else 503,
        headers={"Retry-After": "5"} if not ok else None,
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests, latency, tokens, cost, streams, errors, rejections."""
    runtime = runtime_of(request)
    runtime.metrics.ledger_backlog.set(runtime.ledger.backlog)
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
