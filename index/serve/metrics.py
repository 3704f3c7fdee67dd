"""The served memory's own Prometheus metrics, at ``GET /metrics`` of the Router.

Ray Serve exports its metrics (replica queues, proxy latencies) through Ray's metrics agent;
these are the memory's: requests by route and status, their latency, query vectors searched,
partial answers, edits, and the version answered from. The Router is one replica, so its
registry counts every request the app answered.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REGISTRY = CollectorRegistry()
REQUESTS = Counter("vismem_requests", "HTTP requests answered, by route and status", ["route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("vismem_request_seconds", "time from a request's arrival at the Router to its answer, by route",
                    ["route"], registry=REGISTRY,
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
QUERIES = Counter("vismem_query_vectors", "query vectors searched (images embedded or vectors given)",
                  registry=REGISTRY)
PARTIAL = Counter("vismem_partial_answers", "answers missing some shard, by the missing shard", ["shard"],
                  registry=REGISTRY)
EDITS = Counter("vismem_edits", "edits committed, by operation", ["operation"], registry=REGISTRY)
VERSION = Gauge("vismem_served_version", "the memory version the Router answers from", registry=REGISTRY)

ROUTES = ("/v1/search", "/search", "/v1/classify", "/classify", "/v1/info", "/info", "/v1/memory/add",
          "/v1/memory/remove", "/v1/memory/rollback", "/v1/memory/versions", "/v1/memory/log", "/healthz",
          "/metrics", "/openapi.json", "/docs", "/")


def route_of(path: str) -> str:
    """The route a path belongs to, so that labels stay few (every thumbnail id is one route)."""
    if path.startswith("/v1/thumbnail/"):
        return "/v1/thumbnail/{item_id}"
    return path if path in ROUTES else "other"


class RequestMetrics:
    """ASGI middleware: counts every answer by route and status and times it, 413s and 422s included."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path, prefix = scope["path"], scope.get("root_path", "")
            route = route_of((path[len(prefix):] if prefix and path.startswith(prefix) else path) or "/")
            REQUESTS.labels(route, str(status[0])).inc()
            LATENCY.labels(route).observe(time.perf_counter() - start)
