"""Prometheus metrics at `/metrics`, correct with several worker processes.

With more than one worker, `chat-api serve` (and gunicorn.conf.py) point
`PROMETHEUS_MULTIPROC_DIR` at a shared folder before any worker starts, and
`/metrics` adds up every worker's numbers. Labels carry routes, models and
outcomes, never key material.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from chat_api.calls import CallResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric of one app; `render` gives the text Prometheus scrapes."""

    def __init__(self, multiprocess_dir: str | None) -> None:
        self._multiprocess = multiprocess_dir is not None
        self._cache: dict[tuple[object, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chatapi_requests", "HTTP requests answered.", ["route", "status", "model"], registry=r
        )
        self.latency = Histogram(
            "chatapi_request_seconds",
            "Time from request to the end of the answer.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "chatapi_time_to_first_token_seconds",
            "Time from request to the first piece of the answer.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "chatapi_tokens", "Tokens used, as billed.", ["model", "kind"], registry=r
        )
        self.cost = Counter(
            "chatapi_cost_usd", "Money spent, in US dollars.", ["model"], registry=r
        )
        self.calls = Counter(
            "chatapi_upstream_calls", "Calls to the upstream, by outcome.", ["outcome"], registry=r
        )
        self.rejections = Counter(
            "chatapi_limit_rejections",
            "Requests refused by a rate limit, budget or failed sign-in.",
            ["reason"],
            registry=r,
        )
        self.open_streams = Gauge(
            "chatapi_open_streams",
            "Answers being streamed right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ledger_backlog = Gauge(
            "chatapi_ledger_backlog",
            "Usage rows waiting to be written.",
            registry=r,
            multiprocess_mode="livesum",
        )

    def call_done(self, result: CallResult, cost: Decimal) -> None:
        """Count a finished call; `cost` is `result.cost`, worked out once by the caller."""
        self.series(self.calls, result.outcome).inc()
        if result.prompt_tokens:
            self.series(self.tokens, result.model, "prompt").inc(result.prompt_tokens)
        if result.completion_tokens:
            self.series(self.tokens, result.model, "completion").inc(result.completion_tokens)
        if cost:
            self.series(self.cost, result.model).inc(float(cost))
        if result.first_token is not None:
            self.series(self.first_token, result.model).observe(result.first_token)

    def series(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: outcomes and models are few."""
        key = (metric, labels)
        series = self._cache.get(key)
        if series is None:
            series = self._cache[key] = metric.labels(*labels)
        return series

    def render(self) -> bytes:
        if self._multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
