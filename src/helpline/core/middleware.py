"""Pure-ASGI middleware (works for `http` and `websocket` scopes alike).

- `RequestContextMiddleware`: binds `request_id` into every log line, echoes/sets
  `X-Request-ID`, logs one redacted line per request, and turns an unhandled exception into
  `500 INTERNAL_ERROR` (logged with its traceback; nothing internal reaches the client).
- `BodySizeLimitMiddleware`: `413 PAYLOAD_TOO_LARGE` for bodies over the limit, whether announced
  by `Content-Length` or streamed.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable

import orjson
import structlog
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helpline.core.errors import error_payload, request_path
from helpline.core.logging import redact_url

log = structlog.get_logger("helpline.request")

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def incoming_request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


async def _send_json(send: Send, status: int, body: dict[str, object], request_id: str) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (REQUEST_ID_HEADER.encode(), request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        path_token = request_path.set(scope.get("path", ""))
        started = time.perf_counter()
        status_code = 500
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal status_code, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status_code = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            elif message["type"] == "websocket.accept":
                headers = list(message.get("headers", []))
                if all(name.lower() != REQUEST_ID_HEADER.encode() for name, _ in headers):
                    headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            log.exception("request.unhandled_error", path=redact_url(scope.get("path", "")))
            if scope["type"] == "http" and not response_started:
                status_code = 500
                await _send_json(
                    send,
                    500,
                    error_payload("INTERNAL_ERROR", "An internal error occurred"),
                    request_id,
                )
        finally:
            if scope["type"] == "http":
                path = scope.get("path", "")
                query = scope.get("query_string", b"").decode("latin-1")
                log.info(
                    "http.request",
                    method=scope.get("method"),
                    path=redact_url(f"{path}?{query}" if query else path),
                    status=status_code,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )
            structlog.contextvars.unbind_contextvars("request_id")
            request_path.reset(path_token)


class BodySizeLimitMiddleware:
    """Refuses request bodies larger than `limit_for(path)` bytes.

    Hand-written rather than FastAPI's `max_body_size` because the limits come from settings
    when the app is built (uploads get `MAX_UPLOAD_BYTES`, everything else `MAX_REQUEST_BYTES`).
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        request_id = scope.get("state", {}).get("request_id", "")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._refuse(send, limit, request_id)
                    return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises HTTPException from body parsing (other errors become
                    # 400), so the app's handler renders the 413 envelope.
                    raise StarletteHTTPException(413, f"Request body is larger than {limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except StarletteHTTPException as exc:
            if exc.status_code != 413 or response_started:
                raise
            await self._refuse(send, limit, request_id)

    @staticmethod
    async def _refuse(send: Send, limit: int, request_id: str) -> None:
        await _send_json(
            send,
            413,
            error_payload(
                "PAYLOAD_TOO_LARGE",
                f"Request body is larger than {limit} bytes",
                {"max_bytes": limit},
            ),
            request_id,
        )


def request_id_header(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The `X-Request-ID` header for a WebSocket's accept (the request id of its scope)."""
    request_id: str | None = scope.get("state", {}).get("request_id")
    return [] if request_id is None else [(REQUEST_ID_HEADER.encode(), request_id.encode())]
