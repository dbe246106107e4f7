"""What each finished request leaves behind: a metrics update and one log line.

The log line carries ids, never keys: request id, key id, route, model,
status, tokens, latency and outcome. Probes and static files log at debug
level so they do not drown the lines that matter.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram
from starlette.types import Scope

from chat_api.metrics import Metrics

log = logging.getLogger("chat_api.access")

QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics", "/static", "/"})


class RequestObserver:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # The labelled series, looked up once each: routes, statuses and models are few.
        self._series: dict[tuple[str, int, str], tuple[Counter, Histogram]] = {}

    def __call__(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        ctx = scope.get("state", {}).get("call")
        result = ctx.result if ctx is not None else None
        model = result.model if result is not None else ""
        series = self._series.get((route, status, model))
        if series is None:
            series = self._series[route, status, model] = (
                self._metrics.requests.labels(route, str(status), model),
                self._metrics.latency.labels(route),
            )
        series[0].inc()
        series[1].observe(seconds)
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        if not log.isEnabledFor(level):
            return
        fields: dict[str, object] = {
            "_ids_only": True,
            "request_id": scope.get("state", {}).get("request_id"),
            "method": scope.get("method"),
            "route": route,
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
        }
        if result is not None:
            fields |= {
                "key_id": result.key_id,
                "model": result.model,
                "outcome": result.outcome,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "estimated": result.estimated,
            }
        elif ctx is not None and ctx.caller is not None:
            fields["key_id"] = ctx.caller.key_id
        log.log(level, "request", extra=fields)
