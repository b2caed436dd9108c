"""The SPEC error envelope for every kind of failure."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect as websocket_connect
from websockets.exceptions import ConnectionClosed

from helpline.core.config import Settings
from helpline.core.errors import Conflict
from helpline.main import Helpline, create_app
from tests.log_events import captured_log_events
from tests.servers import LiveServer


class Item(BaseModel):
    name: str = Field(max_length=10)
    count: int


@pytest.fixture
async def error_app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)

    @application.post("/_test/items")
    async def create_item(item: Item) -> Item:
        return item

    @application.get("/_test/conflict")
    async def conflict() -> None:
        raise Conflict("Already there", code="USERNAME_TAKEN", details={"field": "username"})

    @application.get("/_test/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal text /etc/passwd")

    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def error_client(error_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=error_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return dict(error)


async def test_unknown_path_is_not_found_envelope(error_client: httpx.AsyncClient) -> None:
    response = await error_client.get("/nowhere")
    assert_envelope(response, 404, "NOT_FOUND")


async def test_wrong_method_is_method_not_allowed(error_client: httpx.AsyncClient) -> None:
    response = await error_client.delete("/health/live")
    assert_envelope(response, 405, "METHOD_NOT_ALLOWED")


async def test_validation_error_lists_fields(error_client: httpx.AsyncClient) -> None:
    response = await error_client.post("/_test/items", json={"name": "x" * 11, "count": "many"})
    error = assert_envelope(response, 422, "VALIDATION_ERROR")
    details = error["details"]
    assert isinstance(details, list)
    fields = {tuple(item["loc"]) for item in details}
    assert ("body", "name") in fields
    assert ("body", "count") in fields


async def test_malformed_json_is_validation_error(error_client: httpx.AsyncClient) -> None:
    response = await error_client.post(
        "/_test/items", content=b"{not json", headers={"content-type": "application/json"}
    )
    error = assert_envelope(response, 422, "VALIDATION_ERROR")
    assert "JSON" in str(error["message"])


async def test_app_error_keeps_code_and_details(error_client: httpx.AsyncClient) -> None:
    response = await error_client.get("/_test/conflict")
    error = assert_envelope(response, 409, "USERNAME_TAKEN")
    assert error["details"] == {"field": "username"}


async def test_unhandled_error_leaks_nothing(error_client: httpx.AsyncClient) -> None:
    response = await error_client.get("/_test/boom")
    error = assert_envelope(response, 500, "INTERNAL_ERROR")
    assert "secret" not in response.text
    assert "passwd" not in response.text
    assert "Traceback" not in response.text
    assert error["details"] is None


async def test_request_id_is_echoed(error_client: httpx.AsyncClient) -> None:
    response = await error_client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


async def test_invalid_request_id_is_replaced(error_client: httpx.AsyncClient) -> None:
    response = await error_client.get("/health/live", headers={"X-Request-ID": "bad id\t!"})
    assert response.headers["x-request-id"] != "bad id\t!"
    assert len(response.headers["x-request-id"]) == 32


async def test_declared_oversized_body_is_413(error_client: httpx.AsyncClient) -> None:
    body = b'{"name": "a", "count": 1, "pad": "' + b"x" * 2_000_000 + b'"}'
    response = await error_client.post(
        "/_test/items", content=body, headers={"content-type": "application/json"}
    )
    error = assert_envelope(response, 413, "PAYLOAD_TOO_LARGE")
    assert error["details"] == {"max_bytes": 1_048_576}


async def test_streamed_oversized_body_is_413(error_client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "a", "count": 1, "pad": "'
        for _ in range(40):
            yield b"x" * 65_536
        yield b'"}'

    response = await error_client.post(
        "/_test/items", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_envelope(response, 413, "PAYLOAD_TOO_LARGE")


async def test_docs_served_outside_production(error_client: httpx.AsyncClient) -> None:
    assert (await error_client.get("/docs")).status_code == 200
    assert (await error_client.get("/openapi.json")).status_code == 200


async def test_docs_off_in_production(settings: Settings) -> None:
    production = settings.model_copy(
        update={"environment": "production", "auth_jwt_secret": "p" * 48}
    )
    application = create_app(production)
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            response = await http.get(path)
            assert_envelope(response, 404, "NOT_FOUND")


async def test_cors_preflight_allows_configured_origin(settings: Settings) -> None:
    application = create_app(settings.model_copy(update={"cors_origins": ["https://shop.test"]}))
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        allowed = await http.options(
            "/health",
            headers={"Origin": "https://shop.test", "Access-Control-Request-Method": "GET"},
        )
        refused = await http.options(
            "/health",
            headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "GET"},
        )
    assert allowed.headers["access-control-allow-origin"] == "https://shop.test"
    assert "access-control-allow-origin" not in refused.headers


async def test_an_unhandled_error_in_a_socket_closes_it_with_1011_and_is_logged(
    settings: Settings,
) -> None:
    async def broken(websocket: WebSocket) -> None:
        await websocket.accept()
        raise RuntimeError("secret internals")

    app = create_app(settings)
    assert isinstance(app, Helpline)
    app.websocket_routes.append(WebSocketRoute("/broken", broken))
    with captured_log_events() as logs, LiveServer.serve(app) as live:
        headers = {"X-Request-ID": "socket-42"}
        async with websocket_connect(f"{live.ws_url}/broken", additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011
    assert "secret" not in closed.value.rcvd.reason
    logged = [entry for entry in logs if entry.get("event") == "request.unhandled_error"]
    assert len(logged) == 1
    assert logged[0]["path"] == "/broken"
    assert logged[0]["request_id"] == "socket-42"
