"""The intake's own metrics, served at ``/metrics`` beside payq's others in the
process's registry: requests by route, method and status, and their latency.

Routes are labelled by their template (``/v1/charges/{charge_id}``), and requests that
reached no route (refused before routing, or an unknown path) by ``unrouted``: the
label set stays small whatever paths callers send.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HTTP_LATENCY", "HTTP_REQUESTS", "RequestMetrics"]

HTTP_REQUESTS = Counter(
    "payq_http_requests",
    "Intake requests, by route, method and status",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "payq_http_request_duration_seconds",
    "Intake request latency, by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware, outermost: counts every request, refused ones included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # unless the app answers

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unrouted"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            HTTP_REQUESTS.labels(route, method, str(status)).inc()
            HTTP_LATENCY.labels(route).observe(time.monotonic() - started)
