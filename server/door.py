"""The door every HTTP request passes before any route runs: the body limit (413), API keys (401 on
/v1 and /metrics when keys are set), draining (503 on /v1 during a shutdown), and the body read whole within the
request timeout (408), in that order."""

from __future__ import annotations

import asyncio

from server.errors import error_for, error_response
from server.keys import DEMO_PATH, authorized, guarded
from server.limits import declared_too_large, has_a_body, read_within
from server.service import Service


def route_path(path: str, root_path: str = "") -> str:
    """The path below a proxy's `root_path` (uvicorn's path includes it), as the router matches it."""
    return path[len(root_path):] if root_path and path.startswith(root_path) else path


def without_trailing_slash(path: str, root_path: str = "") -> str:
    """`/v1/generate/` is `/v1/generate`: a trailing slash reaches its route (the router would answer 307, which
    most clients do not follow for a POST, and curl not at all); the demo's paths (`/ui/`) keep theirs, under a
    proxy's `root_path` too (uvicorn's path includes it)."""
    route = route_path(path, root_path)
    if len(route) > 1 and route.endswith("/") and not route.startswith(DEMO_PATH):
        return path.rstrip("/") or "/"
    return path


class Door:
    """Pure ASGI middleware (it must not break client-disconnect detection)."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = without_trailing_slash(scope["path"], scope.get("root_path", ""))
        if path != scope["path"]:
            scope = {**scope, "path": path, "raw_path": path.encode()}
        settings, refusal = self.service.settings, None
        if declared_too_large(scope, settings.max_body_bytes):
            refusal = self._too_large()
        elif settings.api_keys and guarded(path, self._header(scope, b"content-type")) and not authorized(
                self._header(scope, b"authorization"), settings.api_keys):
            refusal = error_response(401, "a valid API key is required: Authorization: Bearer <key>",
                                     kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        elif path.startswith("/v1/") and self.service.draining:
            refusal = error_for(self.service.unavailable(), path, self.service)
        elif has_a_body(scope):
            try:  # read whole before any route runs: a client that sends less than it declared waits no longer
                async with asyncio.timeout(settings.request_timeout_s):
                    receive = await read_within(receive, settings.max_body_bytes)
            except TimeoutError:
                refusal = error_response(408, f"the request body did not arrive within {settings.request_timeout_s:g} "
                                              "s (FLOWMAP_REQUEST_TIMEOUT_S): was its Content-Length right?",
                                         kind="request_timeout")
            else:
                refusal = self._too_large() if receive is None else None
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _too_large(self):
        return error_response(413, f"the request body exceeds {self.service.settings.max_body_bytes} bytes "
                                   "(FLOWMAP_MAX_BODY_BYTES)", kind="request_too_large")

    @staticmethod
    def _header(scope, name: bytes) -> str:
        # latin-1, as HTTP defines header bytes: a key of other bytes is a wrong key (401), not a decoding error
        return next((value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name), "")
