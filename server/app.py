"""The FastAPI app: bundle -> engines -> batchers -> pipelines -> routes, with errors in one format,
a gate for body size / API keys / draining / metrics, and a warm-up before /health/ready turns true."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import Request

from export.bundle import read_bundle
from server.batcher import DeadlineExceeded, DynamicBatcher, EngineFailure, QueueFull
from server.engines import build_engines
from server.metrics import Metrics
from server.pipelines import Pipelines
from server.routes import ROUTES, router
from server.service import ApiError, ClientDisconnected, Service
from server.settings import Settings

KNOWN_ROUTES = {"/v1/images/generations", "/v1/generate", "/v1/search", "/v1/models", "/health/live",
                "/health/ready", "/metrics", "/docs", "/openapi.json"}


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def error_for(err: Exception, path: str, service: Service) -> JSONResponse:
    """The one mapping from an exception to its HTTP answer, used by FastAPI's handlers and the fast path."""
    if isinstance(err, ApiError):
        return error_response(err.status, err.message, err.param, err.kind, err.headers)
    if isinstance(err, RequestValidationError | ValidationError):
        fields = ROUTES[path][0].model_fields if path in ROUTES else {}
        described = [describe_validation_error(e, fields) for e in err.errors()]
        return error_response(422, "; ".join(message for _, message in described), described[0][0])
    if isinstance(err, QueueFull):
        return error_response(429, str(err), kind="rate_limit_exceeded",
                              headers={"Retry-After": str(err.retry_after_s)})
    if isinstance(err, DeadlineExceeded | TimeoutError):
        return error_response(504, f"the request did not finish within {service.settings.request_timeout_s:g} s "
                                   "(FLOWMAP_REQUEST_TIMEOUT_S)", kind="timeout")
    if isinstance(err, EngineFailure):
        return error_response(500, str(err), kind="engine_error")
    if isinstance(err, ClientDisconnected):
        service.metrics.rejected.labels(reason="disconnected").inc()
        return error_response(499, "the client closed the connection", kind="client_closed")
    raise err


def describe_validation_error(error: dict, schema_fields: dict) -> tuple[str, str]:
    """('n', 'n must lie in 1..64, got 100') from one pydantic error."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(loc) or "body"
    field = schema_fields.get(loc[0]) if loc else None
    bounds = {}
    for item in getattr(field, "metadata", []) if field is not None else []:
        for name in ("ge", "le", "gt", "lt", "min_length", "max_length"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    got = error.get("input")
    shown = error.get("type") not in ("missing", "json_invalid") and got is not None
    got_text = f", got {json.dumps(got, default=str)[:60]}" if shown else ""
    if "ge" in bounds and "le" in bounds and error.get("type", "").startswith(("greater", "less")):
        return param, f"{param} must lie in {bounds['ge']}..{bounds['le']}{got_text}"
    if error.get("type", "").startswith(("too_short", "too_long")) and "max_length" in bounds:
        return param, f"{param} must have {bounds.get('min_length', 0)}..{bounds['max_length']} items{got_text}"
    return param, f"{param}: {error.get('msg', 'invalid value')}{got_text}"


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
        if path.startswith("/v1/"):
            if settings.api_keys:
                token = headers.get("authorization", "")
                if not token.startswith("Bearer ") or token[7:].strip() not in settings.api_keys:
                    return error_response(401, "a valid API key is required: Authorization: Bearer <key>",
                                          kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
            if self.service.draining:
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


async def warm_up(service: Service) -> None:
    """Run every engine once at batch 1 and at the largest batch, then turn ready."""
    bundle, far = service.bundle, time.monotonic() + 600
    for rows in (1, service.settings.max_batch_size):
        noise = np.zeros((rows, *bundle.image_shape), np.float32)
        labels = np.zeros(rows, np.int64)
        for cfg_scale in bundle.cfg_scales:
            await service.pipelines.student(noise, labels, 1, cfg_scale, far)
        await service.pipelines.teacher(noise, labels, 1, far)
        await service.pipelines.scores(noise, labels, far)
    service.ready = True


def create_app(settings: Settings | None = None, mount_ui: bool | None = None) -> FastAPI:
    """Build the app. The bundle is read (and every sha256 checked) here, so a tampered bundle stops
    the server before it listens."""
    settings = settings or Settings()
    bundle = read_bundle(settings.bundle, verify=settings.verify_bundle)
    service = Service(settings, bundle, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engines = build_engines(bundle, settings)
        service.batchers = {name: DynamicBatcher(engine, settings.max_batch_size, settings.max_queue_delay_ms,
                                                 settings.max_queue_size, service.metrics)
                            for name, engine in engines.items()}
        for batcher in service.batchers.values():
            batcher.start()
        service.pipelines = Pipelines(service.batchers, service.metrics)
        warming = asyncio.create_task(warm_up(service))
        try:
            yield
        finally:
            service.draining = True
            warming.cancel()
            await asyncio.gather(*(b.stop() for b in service.batchers.values()))

    app = FastAPI(title="flowmap-serve", version="0.1.0", lifespan=lifespan,
                  description=f"One-step flow-map generation for the {bundle.name!r} bundle: OpenAI-style images, "
                              "native batches and Best-of-N noise search.")
    app.state.service = service
    app.include_router(router)

    async def _handle(request, err):
        return error_for(err, request.url.path, service)

    for kind in (ApiError, RequestValidationError, ValidationError, QueueFull, DeadlineExceeded, TimeoutError,
                 EngineFailure, ClientDisconnected):
        app.add_exception_handler(kind, _handle)

    app.add_middleware(Gate, service=service, fastapi_app=app)
    if settings.ui if mount_ui is None else mount_ui:
        from ui.demo import mount_demo

        mount_demo(app, settings, service.model_cards())
    return app
