"""One error body for the whole API, mapped from typed service errors.

Every error a client sees has the shape ``{"error": {"code", "message", ...details}}``.
Service errors are mapped here by class, never by message text. Under ``/v1/`` (the
OpenAI-compatible routes) the body also carries OpenAI's ``type`` and ``param``, so
OpenAI clients read it as OpenAI's own ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import errors as e

log = logging.getLogger("edison.api")
OPENAI_PREFIX = "/v1/"


class OpenAIInvalidRequest(e.InvalidRequest):
    """An invalid parameter of an OpenAI-compatible request, named as OpenAI names it:
    400, as OpenAI answers (Edison's own routes answer InvalidRequest with 422)."""

    def __init__(self, param: str, message: str, **extra: Any) -> None:
        self.field = param
        e.EdisonError.__init__(
            self,
            f"Invalid request: {param}: {message}",
            fields=[{"field": param, "message": message, **extra}],
        )


STATUS: dict[type[e.EdisonError], int] = {
    e.ConfigError: 500,
    e.NotReady: 503,
    e.InvalidRequest: 422,
    OpenAIInvalidRequest: 400,
    e.InsufficientMemory: 503,
    e.QueueFull: 503,
    e.ResidencyHold: 503,
    e.ModelUnavailable: 503,
    e.UnknownTier: 404,
    e.NotFound: 404,
    e.ModelLoadFailed: 503,
    e.ContextLengthExceeded: 400,
    e.UpstreamError: 502,
    e.Cancelled: 409,
    e.JobNotFinished: 409,
    e.UpstreamRejected: 400,
}

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def status_for(exc: e.EdisonError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **details}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: Any
) -> JSONResponse:
    return JSONResponse(error_body(code, message, **details), status_code=status, headers=headers)


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for a status."""
    named = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
    return named.get(status, "invalid_request_error" if status < 500 else "server_error")


def with_openai_fields(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """On an OpenAI-compatible path, add OpenAI's ``type`` and ``param`` (the field at
    fault: a ``param`` detail, else the first of ``fields``, else null) to an error body."""
    if not path.startswith(OPENAI_PREFIX):
        return body
    error = body["error"]
    fields = error.get("fields") or [{}]
    error.setdefault("type", openai_type(status))
    error.setdefault("param", fields[0].get("field"))
    return body


def _respond(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    **details: Any,
) -> JSONResponse:
    body = with_openai_fields(request.url.path, status, error_body(code, message, **details))
    return JSONResponse(body, status_code=status, headers=headers)


def _retry_after(exc: e.EdisonError) -> dict[str, str] | None:
    seconds = getattr(exc, "retry_after_s", None)
    if seconds is None:
        return None
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


async def _edison_error(request: Request, exc: e.EdisonError) -> JSONResponse:
    status = status_for(exc)
    if status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    return _respond(request, status, exc.code, exc.message, _retry_after(exc), **exc.details)


def is_invalid_json(exc: RequestValidationError) -> bool:
    return any(err.get("type") == "json_invalid" for err in exc.errors())


def validation_fields(exc: RequestValidationError) -> list[dict[str, str]]:
    """Each field a request model refused, with why: ``[{"field", "message"}]``."""
    fields = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        fields.append({"field": _field_name(tuple(err.get("loc", ()))), "message": msg})
    return fields


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    broken = [err for err in exc.errors() if err.get("type") == "json_invalid"]
    if broken:  # not JSON at all: 400, as for any body the server cannot parse
        ctx = broken[0].get("ctx") or {}
        why = ctx.get("error") or broken[0].get("msg", "invalid JSON")
        return _respond(request, 400, "invalid_json", f"The body is not valid JSON: {why}")
    fields = validation_fields(exc)
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return _respond(request, 422, "invalid_request", f"Invalid request: {summary}", fields=fields)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    return _respond(request, exc.status_code, code, detail, getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error: %s", exc)
    return _respond(request, 500, "internal_error", f"Internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.EdisonError, _edison_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
