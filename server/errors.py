"""Errors in one format, OpenAI style: {"error": {"message", "type", "param"}}, from one mapping of
exceptions to answers that FastAPI's handlers and the gate's fast path share."""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.admission import Overloaded, RequestTooLarge, retry_after_headers
from server.batcher import DeadlineExceeded, EngineFailure
from server.routes import ROUTES
from server.service import ApiError, ClientDisconnected, Service


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
    if isinstance(err, Overloaded):
        return error_response(429, str(err), kind="rate_limit_exceeded", headers=retry_after_headers(err.retry_after_s))
    if isinstance(err, RequestTooLarge):
        return error_response(err.status, str(err), err.param, kind="request_too_large")
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
