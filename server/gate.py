"""The gate in front of the app: metrics, body size, API keys, draining, and the fast path."""

from __future__ import annotations

import os
import socket
import time

from starlette.requests import Request

from server.errors import error_for, error_response
from server.keys import authorized, guarded
from server.routes import ROUTES
from server.service import Service

KNOWN_ROUTES = {"/v1/images/generations", "/v1/generate", "/v1/search", "/v1/models", "/health/live",
                "/health/ready", "/metrics", "/docs", "/openapi.json"}


class Gate:
    """Pure ASGI middleware (it must not break client-disconnect detection): request metrics, the
    body size limit (413), bearer API keys (401) and draining (503).

    It also dispatches the three generation routes straight to their handlers (`fast_path`): the
    same functions and the same error mapping that FastAPI uses, minus a third of the per-request
    CPU that FastAPI's middleware and dependency machinery cost (docs/serving.md). FastAPI still
    serves, validates and documents every route when the fast path is off.
    """

    def __init__(self, app, service: Service, fastapi_app=None):
        self.app, self.service, self.fastapi_app = app, service, fastapi_app
        # which process answered: replicas behind a proxy (Ray Serve, a load balancer) tell themselves apart
        self.replica_header = (b"x-flowmap-replica", f"{socket.gethostname()}:{os.getpid()}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else ("/ui" if path.startswith("/ui") else "other")
        metrics, status = self.service.metrics, {"code": 500}
        started = time.perf_counter()
        metrics.inflight.inc()
        self.service.inflight += 1

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), self.replica_header]}
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is None and self._chunked(scope):
                receive = await self._buffered(receive)
                if receive is None:
                    refusal = self._too_large()
            if refusal is not None:
                await refusal(scope, receive, tracked_send)
                return
            if self.service.settings.fast_path and path in ROUTES and scope["method"] == "POST":
                await self._dispatch(scope, receive, tracked_send, path)
                return
            await self.app(scope, receive, tracked_send)
        finally:
            self.service.inflight -= 1
            metrics.inflight.dec()
            metrics.http_requests.labels(route=route, status=str(status["code"])).inc()
            metrics.http_duration.labels(route=route).observe(time.perf_counter() - started)

    def _too_large(self):
        return error_response(413, f"the request body exceeds {self.service.settings.max_body_bytes} bytes",
                              kind="request_too_large")

    def _refusal(self, scope, path: str):
        settings = self.service.settings
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        if "content-length" in headers and headers["content-length"].isdigit() \
                and int(headers["content-length"]) > settings.max_body_bytes:
            return self._too_large()
        if settings.api_keys and guarded(path) and not authorized(headers.get("authorization", ""), settings.api_keys):
            return error_response(401, "a valid API key is required: Authorization: Bearer <key>",
                                  kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        if path.startswith("/v1/") and self.service.draining:
            return error_response(503, "the server is shutting down; retry on another replica",
                                  kind="unavailable", headers={"Retry-After": "1"})
        return None

    async def _dispatch(self, scope, receive, send, path: str) -> None:
        model, handler = ROUTES[path]
        request = Request({**scope, "app": self.fastapi_app}, receive)
        try:
            response = await handler(model.model_validate_json(await request.body()), request)
        except Exception as err:  # the same answers FastAPI's exception handlers give
            response = error_for(err, path, self.service)
        await response(scope, receive, send)

    @staticmethod
    def _chunked(scope) -> bool:
        names = {k.lower() for k, _ in scope.get("headers", [])}
        return scope["method"] in ("POST", "PUT", "PATCH") and b"content-length" not in names

    async def _buffered(self, receive):
        """Read a body of unknown length up to the limit; None if it is larger. The returned receive
        replays the body once, then hands over to the real one (disconnects still get through)."""
        chunks, size, limit = [], 0, self.service.settings.max_body_bytes
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-upload: pass that on
                pending = [message]
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay():
            return pending.pop() if pending else await receive()

        return replay
