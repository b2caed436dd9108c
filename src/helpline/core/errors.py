"""The error envelope of SPEC.md and the exception handlers that render it.

Every non-2xx response is `{"error": {"code", "message", "request_id", "details"}}`.
Domain errors subclass `AppError` in `<domain>/exceptions.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from helpline.core.logging import current_request_id

log = structlog.get_logger(__name__)


class AppError(Exception):
    """An expected failure with a stable code, rendered as the SPEC envelope."""

    status_code: int = 400
    code: str = "BAD_REQUEST"
    message: str = "Bad request"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status_code: int | None = None,
        headers: Mapping[str, str] | None = None,
        details: Any = None,
    ) -> None:
        self.message = message or self.message
        self.code = code or self.code
        self.status_code = status_code or self.status_code
        self.headers = dict(headers or {})
        self.details = details
        super().__init__(self.message)


class BadRequest(AppError):
    status_code = 400
    code = "BAD_REQUEST"
    message = "Bad request"


class NotAuthenticated(AppError):
    status_code = 401
    code = "NOT_AUTHENTICATED"
    message = "Not authenticated"

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class Forbidden(AppError):
    status_code = 403
    code = "FORBIDDEN"
    message = "You are not allowed to do this"


class NotFound(AppError):
    status_code = 404
    code = "NOT_FOUND"
    message = "Not found"


class Conflict(AppError):
    status_code = 409
    code = "CONFLICT"
    message = "Conflict"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "PAYLOAD_TOO_LARGE"
    message = "Request body is too large"


class RateLimited(AppError):
    status_code = 429
    code = "RATE_LIMITED"
    message = "Too many requests"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "SERVICE_UNAVAILABLE"
    message = "The service is temporarily unavailable"


class ShuttingDown(ServiceUnavailable):
    code = "SHUTTING_DOWN"
    message = "The server is shutting down; retry on another instance"


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None
    details: Any = None


class ErrorResponse(BaseModel):
    """The SPEC error envelope, for OpenAPI `responses=` declarations."""

    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the envelope model under each status it can return."""
    return {status: {"model": ErrorResponse} for status in statuses}


ErrorDecorator = Callable[[dict[str, Any]], None]
# The path of the request being handled: some APIs (`/v1`, OpenAI's format) add fields.
request_path: ContextVar[str] = ContextVar("request_path", default="")
_decorators: list[tuple[str, ErrorDecorator]] = []


def register_error_decorator(prefix: str, decorate: ErrorDecorator) -> None:
    """Let the errors of paths under `prefix` carry extra fields (set by `decorate`)."""
    if (prefix, decorate) not in _decorators:
        _decorators.append((prefix, decorate))


def error_payload(code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": code,
        "message": message,
        "request_id": current_request_id(),
        "details": details,
    }
    path = request_path.get()
    for prefix, decorate in _decorators:
        if path.startswith(prefix):
            decorate(error)
    return {"error": error}


def error_response(
    status_code: int,
    code: str,
    message: str,
    *,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_payload(code, message, details), status_code=status_code, headers=headers
    )


_STATUS_CODES: dict[int, str] = {
    400: "BAD_REQUEST",
    401: "NOT_AUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
    503: "SERVICE_UNAVAILABLE",
}


def code_for_status(status_code: int) -> str:
    if status_code in _STATUS_CODES:
        return _STATUS_CODES[status_code]
    try:
        return HTTPStatus(status_code).name
    except ValueError:
        return "ERROR"


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for error in exc.errors():
        item: dict[str, Any] = {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        ctx = error.get("ctx")
        if ctx:
            item["ctx"] = {key: str(value) for key, value in ctx.items()}
        details.append(item)
    return details


def app_error_response(exc: AppError) -> JSONResponse:
    """`exc` in the SPEC envelope, with its status and headers."""
    return error_response(
        exc.status_code, exc.code, exc.message, details=exc.details, headers=exc.headers
    )


async def _handle_app_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return app_error_response(exc)


async def _handle_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = _validation_details(exc)
    if any(item["type"] == "json_invalid" for item in details):
        message = "Request body is not valid JSON"
    else:
        message = "Request validation failed"
    return error_response(422, "VALIDATION_ERROR", message, details=details)


async def _handle_http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return error_response(
        exc.status_code, code_for_status(exc.status_code), message, headers=exc.headers
    )


def register_exception_handlers(app: FastAPI) -> None:
    """Install the handlers; unhandled exceptions are caught by `RequestContextMiddleware`."""
    app.add_exception_handler(AppError, _handle_app_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
