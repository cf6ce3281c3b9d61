"""Prometheus metrics of the facade (Triton's own are on its metrics port)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.worker_pool import METRICS_DIR_ENV


class ApiMetrics:
    def __init__(self) -> None:
        # A registry per app, so several apps in one process (tests) do not collide.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fluxserve_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "fluxserve_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.items = Counter(
            "fluxserve_items_total", "texts classified / images generated", ["kind"], registry=self.registry
        )
        self.classify_call_texts = Histogram(
            "fluxserve_classify_call_texts",
            "texts per Triton classify call: concurrent /classify requests share calls (api/classify_batcher.py)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The text /metrics serves. Under several facade processes (api.worker_pool sets
        METRICS_DIR_ENV, so every process writes its values to files there) the sum of all
        of them, whichever process answers; else this app's registry."""
        folder = os.environ.get(METRICS_DIR_ENV)
        if not folder:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, folder)
        return generate_latest(merged)

    def counter(self, route: str, method: str, status: int) -> Callable[[], None]:
        """The `inc` of one request counter child, bound once (for a path that must stay cheap)."""
        return self.requests.labels(route, method, str(status)).inc

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (not raw path: bounded labels).

    A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware: that one re-wraps every
    response in a stream and cost about a quarter of the facade's CPU per /classify request.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app dies before starting a response

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The router writes the matched route into the shared scope dict.
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(path, scope["method"], status, time.perf_counter() - started)
