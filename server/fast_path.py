"""The generation routes dispatched straight from ASGI: the same handlers and the same error mapping
FastAPI uses, without the per-request cost of FastAPI's middleware and dependency machinery (about a
third of a request's CPU on the hot routes). With `fast_path` off, FastAPI serves them itself."""

from __future__ import annotations

import json

from starlette.requests import Request

from server.errors import error_for
from server.routes import ROUTES
from server.service import Service


def as_utf8(body: bytes) -> bytes:
    """The JSON body as UTF-8 without a byte-order mark: FastAPI's json.loads reads UTF-16 and UTF-32 too, and past
    a mark; the common body, UTF-8 already, is handed on as it is."""
    encoding = json.detect_encoding(body)
    return body if encoding == "utf-8" else body.decode(encoding, errors="replace").encode()


class FastPath:
    def __init__(self, app, service: Service, fastapi_app):
        self.app, self.service, self.fastapi_app = app, service, fastapi_app

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if scope["type"] != "http" or path not in ROUTES or scope["method"] != "POST" \
                or not self.service.settings.fast_path:
            return await self.app(scope, receive, send)
        model, handler = ROUTES[path]
        request = Request({**scope, "app": self.fastapi_app}, receive)
        try:
            response = await handler(model.model_validate_json(as_utf8(await request.body())), request)
        except Exception as err:  # the same answers FastAPI's exception handlers give
            response = error_for(err, path, self.service)
        await response(scope, receive, send)
