"""The generation routes dispatched straight from ASGI: the same handlers and the same error mapping
FastAPI uses, without the per-request cost of FastAPI's middleware and dependency machinery (about a
third of a request's CPU on the hot routes). With `fast_path` off, FastAPI serves them itself."""

from __future__ import annotations

from starlette.requests import Request

from server.errors import error_for
from server.routes import ROUTES
from server.service import Service


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
            # past a UTF-8 byte-order mark, as FastAPI's json.loads reads one
            body = (await request.body()).removeprefix(b"\xef\xbb\xbf")
            response = await handler(model.model_validate_json(body), request)
        except Exception as err:  # the same answers FastAPI's exception handlers give
            response = error_for(err, path, self.service)
        await response(scope, receive, send)
