"""Errors in one format, OpenAI style: {"error": {"message", "type", "param"}}, from one mapping of
exceptions to answers that FastAPI's handlers and the fast path share."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.admission import Overloaded, RequestTooLarge, retry_after_headers
from server.batcher import DeadlineExceeded, EngineFailure
from server.routes import ROUTES
from server.schemas import bounds_of
from server.service import ApiError, ClientDisconnected, Service, shown


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
        param, message = describe_validation_errors(err.errors(), fields)
        return error_response(422, message, param)
    if isinstance(err, Overloaded):
        return error_response(429, str(err), kind="rate_limit_exceeded", headers=retry_after_headers(err.retry_after_s))
    if isinstance(err, RequestTooLarge):
        return error_response(err.status, str(err), err.param, kind="request_too_large")
    if isinstance(err, DeadlineExceeded | TimeoutError):
        return error_response(504, f"the request did not finish within {service.settings.request_timeout_s:g} s "
                                   "(FLOWMAP_REQUEST_TIMEOUT_S)", kind="timeout")
    if isinstance(err, EngineFailure):
        return error_response(500, str(err), kind="engine_error")
    if isinstance(err, StarletteHTTPException) and err.status_code == 400 and path in ROUTES:
        # FastAPI's answer to a body it cannot decode (not UTF-8, nested too deep): the fast path's 422
        return error_response(422, "body: Invalid JSON: the body could not be parsed", "body")
    if isinstance(err, StarletteHTTPException):  # routing: 404 for an unknown path, 405 for a wrong method
        message = {404: f"no such route: {path}; the API is under /v1, the probes are /health/live and "
                        "/health/ready (see /docs)",
                   405: f"{path} does not take this method (see /docs)"}.get(err.status_code, str(err.detail))
        return error_response(err.status_code, message, kind="not_found" if err.status_code == 404 else
                              "invalid_request_error", headers=getattr(err, "headers", None))
    if isinstance(err, ClientDisconnected):
        service.metrics.rejected.labels(reason="disconnected").inc()
        return error_response(499, "the client closed the connection", kind="client_closed")
    raise err


MAX_NAME_SHOWN = 60  # characters of a field's name a message and `param` echo


def field_name(loc: tuple) -> tuple[str, list[str]]:
    """('body', 'labels', 0, 'int') -> ('labels[0]', ['int']): the field as the client wrote it, and the
    union members pydantic tried (our request bodies are flat, so any name after the first is one)."""
    name, tried = "", []
    if loc[:1] == ("body",) and all(isinstance(part, int) for part in loc[1:]):  # a JSON error's position
        return "body", tried
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        elif not name:  # an unknown field's name is the client's own: cut short as its values are
            name = part if len(part) <= MAX_NAME_SHOWN else f"{part[:MAX_NAME_SHOWN]}... ({len(part)} characters)"
        else:
            tried.append(str(part))
    return name or "body", tried


MAX_FIELDS_DESCRIBED = 10  # a body of thousands of wrong fields gets a message of ten, not one of megabytes


def describe_validation_errors(errors: list[dict], schema_fields: dict) -> tuple[str, str]:
    """(the first field, one sentence per field, the first MAX_FIELDS_DESCRIBED of them) for pydantic's errors,
    e.g. 'n must lie in 1..64, got 100'."""
    by_field: dict[str, list[tuple[dict, list[str]]]] = {}
    for error in errors:
        name, tried = field_name(error.get("loc", ()))
        by_field.setdefault(name, []).append((error, tried))
    sentences = []
    for name, found in list(by_field.items())[:MAX_FIELDS_DESCRIBED]:
        error, tried = found[0]
        got = error.get("input")
        shown_got = f", got {shown(got)}" if error.get("type") not in ("missing", "json_invalid") else ""
        members = [member for _, tried in found for member in tried]
        if len(members) > 1:  # every member of a union refused the value
            sentences.append(f"{name}: expected {' or '.join(members)}{shown_got}")
            continue
        field = schema_fields.get(name.split("[")[0])
        bounds = bounds_of(field)
        kind = error.get("type", "")
        if "ge" in bounds and "le" in bounds and kind.startswith(("greater", "less")):
            sentences.append(f"{name} must lie in {bounds['ge']}..{bounds['le']}{shown_got}")
        elif kind in ("too_short", "too_long") and "max_length" in bounds:
            sentences.append(f"{name} must have {bounds.get('min_length', 0)}..{bounds['max_length']} items"
                             f"{shown_got}")
        else:
            message = error.get("msg", "invalid value").removeprefix("Value error, ")
            if kind == "json_invalid" and "error" in error.get("ctx", {}):  # FastAPI's says only "JSON decode error"
                message = f"Invalid JSON: {error['ctx']['error']}"
            sentences.append(f"{name}: {message}{shown_got}")
    if len(by_field) > MAX_FIELDS_DESCRIBED:
        more = len(by_field) - MAX_FIELDS_DESCRIBED
        sentences.append(f"and {more} more field{'s' if more > 1 else ''}")
    return next(iter(by_field)), "; ".join(sentences)
