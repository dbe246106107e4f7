"""What each finished request leaves behind: a metrics update and one log line.

The log line carries ids, never keys: request id, key id, route, model,
status, tokens, latency and outcome. Probes and static files log at debug
level so they do not drown the lines that matter.
"""

from __future__ import annotations

import logging

from starlette.types import Scope

from chat_api import logs
from chat_api.metrics import Metrics

log = logging.getLogger("chat_api.access")

QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics", "/static", "/"})


class RequestObserver:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        ctx = scope.get("state", {}).get("call")
        result = ctx.result if ctx is not None else None
        model = result.model if result is not None else ""
        metrics = self._metrics
        metrics.series(metrics.requests, route, str(status), model).inc()
        metrics.series(metrics.latency, route).observe(seconds)
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        if not log.isEnabledFor(level):
            return
        fields: dict[str, object] = {
            "request_id": scope.get("state", {}).get("request_id"),
            "client": (scope.get("client") or ("?",))[0],  # behind trusted proxies: the real one
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
        handler = logs.sole_handler(log)
        if handler is not None:  # ids and numbers only: no record, nothing to scrub
            handler.add_fields(level, log.name, "request", fields)
        else:
            log.log(level, "request", extra={"_ids_only": True, **fields})
