"""Errors of the OpenAI-compatible API, and the OpenAI fields its error bodies carry."""

from __future__ import annotations

from typing import Any

from helpline.core.errors import BadRequest, NotFound

_ERROR_TYPES = {
    "NOT_AUTHENTICATED": "authentication_error",
    "INVALID_CREDENTIALS": "authentication_error",
    "TOKEN_EXPIRED": "authentication_error",
    "TOKEN_INVALID": "authentication_error",
    "TOKEN_REVOKED": "authentication_error",
    "FORBIDDEN": "permission_error",
    "INACTIVE_USER": "permission_error",
    "RATE_LIMITED": "rate_limit_error",
    "TOKEN_BUDGET_EXCEEDED": "insufficient_quota",
    "LLM_SERVICE_ERROR": "server_error",
    "SERVICE_UNAVAILABLE": "server_error",
    "SHUTTING_DOWN": "server_error",
    "INTERNAL_ERROR": "server_error",
}


def add_openai_fields(error: dict[str, Any]) -> None:
    """OpenAI's SDKs read `type` and `param` beside `code` and `message`."""
    error["type"] = _ERROR_TYPES.get(str(error.get("code")), "invalid_request_error")
    param = None
    details = error.get("details")
    if isinstance(details, list) and details and isinstance(details[0], dict):
        location = [part for part in details[0].get("loc", []) if part != "body"]
        param = ".".join(str(part) for part in location) or None
    elif isinstance(details, dict) and isinstance(details.get("param"), str):
        param = details["param"]
    error["param"] = param


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist; use `GET /v1/models`",
            details={"param": "model"},
        )


class NoQuestion(BadRequest):
    message = "The last message must be a `user` message with text"

    def __init__(self) -> None:
        super().__init__(details={"param": "messages"})
