"""Operations: `/ready` for load balancers and `/metrics` for Prometheus.

`/health`, the liveness probe, belongs to the simple API (routes/simple.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp.helpers import get_env_proxy_for_url
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.responses import Response
from yarl import URL

from chat_api.config import OPENAI_V1, Settings
from chat_api.http_responses import JSONResponse
from chat_api.runtime import Services

router = APIRouter(tags=["operations"])

CHECK_SECONDS = 2.0
PROBE_EVERY = 10.0  # seconds a probe of the upstream's address is trusted


class UpstreamProbe:
    """Whether the upstream's address takes a TCP connection, asked at most every `every` seconds.

    Cheap (no request is sent, so no key and no bill) and asked by `/ready`
    alone, never on a chat call's path. Through a proxy (`HTTPS_PROXY` and
    friends, as the upstream client uses them) it is the proxy that is asked.
    """

    def __init__(
        self, url: str, *, every: float = PROBE_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        try:
            proxy, _ = get_env_proxy_for_url(URL(url))
        except LookupError:
            proxy = None
        target = urlsplit(str(proxy) if proxy is not None else url)
        self.host = target.hostname or ""
        self.port = target.port or (443 if target.scheme == "https" else 80)
        self._every = every
        self._clock = clock
        self._checked_at: float | None = None
        self._status = ""
        self._lock = asyncio.Lock()

    @classmethod
    def of(cls, settings: Settings) -> UpstreamProbe:
        return cls(settings.openai_base_url or OPENAI_V1)

    async def status(self) -> str:
        async with self._lock:  # callers at the same moment share one probe
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self._every:
                self._status = await _check(self._connect())
                if self._status != "ok":
                    self._status += f" (cannot connect to {self.host}:{self.port})"
                self._checked_at = now
            return self._status

    async def _connect(self) -> None:
        _, writer = await asyncio.open_connection(self.host, self.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


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
    """200 when the database, Redis (if set) and the upstream are usable; else 503."""
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    checks = {"database": await _check(_database(services))}
    if services.redis is not None:
        checks["redis"] = await _check(services.redis.ping())
    settings: Settings = request.app.state.settings
    if not services.has_provider:
        checks["upstream"] = "failing: no OpenAI key and no demo"
    elif settings.demo:
        checks["upstream"] = "ok"  # the demo model answers from this process
    else:
        probe: UpstreamProbe | None = getattr(request.app.state, "upstream_probe", None)
        if probe is None:
            probe = request.app.state.upstream_probe = UpstreamProbe.of(settings)
        checks["upstream"] = await probe.status()
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
