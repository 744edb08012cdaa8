"""Every HTTP request counted by route and status, timed, and tagged with the replica that answered."""

from __future__ import annotations

import os
import socket
import time

from server.door import route_path, without_trailing_slash
from server.keys import DEMO_PATH
from server.routes import router
from server.service import Service


class HttpMetrics:
    """Pure ASGI middleware, outermost, so refusals are counted too. The route label is the router's
    own path for known routes ("/ui" for the demo, "other" for the rest, so scanners cannot blow up
    the label set)."""

    def __init__(self, app, service: Service, fastapi_app):
        self.app, self.service, self.fastapi_app = app, service, fastapi_app
        self._routes: set[str] | None = None
        # which process answered: replicas behind a proxy (Ray Serve, a load balancer) tell themselves apart
        self.replica_header = (b"x-flowmap-replica", f"{socket.gethostname()}:{os.getpid()}".encode())

    def route_of(self, path: str) -> str:
        if self._routes is None:  # the API router's own routes and the app's documentation pages
            app = self.fastapi_app
            self._routes = {route.path for route in router.routes} | {app.docs_url, app.openapi_url, "/"}
        if path in self._routes:
            return path
        return DEMO_PATH if path.startswith(DEMO_PATH) else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics, status, started = self.service.metrics, {"code": 500}, time.perf_counter()
        metrics.inflight.inc()
        self.service.inflight += 1

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), self.replica_header]}
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            self.service.inflight -= 1
            metrics.inflight.dec()
            root = scope.get("root_path", "")
            route = self.route_of(route_path(without_trailing_slash(scope["path"], root), root))
            metrics.http_requests.labels(route=route, status=str(status["code"])).inc()
            metrics.http_duration.labels(route=route).observe(time.perf_counter() - started)
