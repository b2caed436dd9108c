"""`authenticate_websocket`, through a real handshake against the app served by uvicorn."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from sqlalchemy import delete, select, update
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpline.auth import service as auth_service
from helpline.auth.dependencies import authenticate_websocket
from helpline.auth.models import Login, User
from helpline.core.config import Settings
from helpline.core.errors import AppError
from helpline.kit.models import utcnow
from helpline.main import create_app
from tests import servers
from tests.factories import open_session
from tests.servers import LiveServer

PROBE = "/_test/ws-identity"


def _app_with_probe(settings: Settings) -> FastAPI:
    app = create_app(settings)

    @app.websocket(PROBE)
    async def identity_probe(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            identity = await authenticate_websocket(websocket)
        except AppError as exc:
            await websocket.close(code=4001, reason=exc.code)
            return
        await websocket.send_json(
            {
                "user_id": str(identity.user.id),
                "role": identity.user.role.value,
                "login_id": str(identity.login_id) if identity.login_id else None,
                "expires_at": identity.expires_at.isoformat() if identity.expires_at else None,
            }
        )
        await websocket.close()

    return app


@pytest.fixture
def probe_server(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> LiveServer:
    """`live_server`, serving an app with the probe route (asks for `settings` so that the
    database parametrisation applies)."""
    del settings
    monkeypatch.setattr(servers, "create_app", _app_with_probe)
    server: LiveServer = request.getfixturevalue("live_server")
    return server


async def _identity(server: LiveServer, *, query: str = "", token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with connect(f"{server.ws_url}{PROBE}{query}", additional_headers=headers) as socket:
        return json.loads(await socket.recv())


async def _close_reason(server: LiveServer, *, query: str = "", token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with connect(f"{server.ws_url}{PROBE}{query}", additional_headers=headers) as socket:
        with pytest.raises(ConnectionClosed) as closed:
            await socket.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4001
    return closed.value.rcvd.reason


async def _sign_up(http: httpx.AsyncClient, username: str) -> dict[str, Any]:
    password = "correct-horse-battery"
    registered = await http.post(
        "/auth/register", json={"username": username, "password": password}
    )
    assert registered.status_code == 201, registered.text
    response = await http.post("/auth/token", data={"username": username, "password": password})
    tokens: dict[str, Any] = response.json()
    return tokens


async def test_websocket_accepts_token_in_query_or_header(probe_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=probe_server.http_url) as http:
        tokens = await _sign_up(http, "alice")
        me = (
            await http.get(
                "/auth/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
            )
        ).json()
    by_query = await _identity(probe_server, query=f"?token={tokens['access_token']}")
    by_header = await _identity(probe_server, token=tokens["access_token"])
    for identity in (by_query, by_header):
        assert identity["user_id"] == me["id"]
        assert identity["role"] == "customer"
        assert identity["login_id"] is not None
        assert identity["expires_at"] is not None


async def test_websocket_accepts_an_api_key(probe_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=probe_server.http_url) as http:
        tokens = await _sign_up(http, "bot-owner")
        created = await http.post(
            "/auth/api-keys",
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
            json={"name": "widget"},
        )
        key = created.json()["key"]
    identity = await _identity(probe_server, query=f"?token={key}")
    assert identity["login_id"] is None
    assert identity["expires_at"] is None


async def test_websocket_refuses_missing_bad_and_revoked_tokens(probe_server: LiveServer) -> None:
    assert await _close_reason(probe_server) == "NOT_AUTHENTICATED"
    assert await _close_reason(probe_server, query="?token=nonsense") == "TOKEN_INVALID"
    async with httpx.AsyncClient(base_url=probe_server.http_url) as http:
        tokens = await _sign_up(http, "carol")
        assert (
            await _close_reason(probe_server, query=f"?token={tokens['refresh_token']}")
            == "TOKEN_INVALID"
        )
        logout = await http.post(
            "/auth/logout", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
        assert logout.status_code == 204
    assert (
        await _close_reason(probe_server, query=f"?token={tokens['access_token']}")
        == "TOKEN_REVOKED"
    )


async def test_websocket_refuses_an_inactive_or_deleted_account(
    probe_server: LiveServer, settings: Settings
) -> None:
    """Deactivated without its logins revoked (an administrator's deactivation revokes them
    too), the account is refused as inactive; deleted, as revoked."""
    async with httpx.AsyncClient(base_url=probe_server.http_url) as http:
        tokens = await _sign_up(http, "dave")
    query = f"?token={tokens['access_token']}"
    user_id = uuid.UUID((await _identity(probe_server, query=query))["user_id"])
    async with open_session(settings) as session:
        await session.execute(update(User).where(User.id == user_id).values(is_active=False))
        await session.commit()
    assert await _close_reason(probe_server, query=query) == "INACTIVE_USER"
    async with open_session(settings) as session:
        await session.execute(delete(User).where(User.id == user_id))
        await session.commit()
    assert await _close_reason(probe_server, query=query) == "TOKEN_REVOKED"


async def test_a_handshake_records_the_logins_activity(
    probe_server: LiveServer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with httpx.AsyncClient(base_url=probe_server.http_url) as http:
        tokens = await _sign_up(http, "erin")
    login_id = uuid.UUID((await _identity(probe_server, token=tokens["access_token"]))["login_id"])
    long_ago = utcnow() - timedelta(hours=1)
    async with open_session(settings) as session:
        await session.execute(
            update(Login).where(Login.id == login_id).values(last_activity_at=long_ago)
        )
        await session.commit()
    # The sign-up's requests were just recorded: the process's memo would skip this one.
    monkeypatch.setattr(
        auth_service,
        "_recently_touched",
        auth_service._RecentlyTouched(auth_service.ACTIVITY_INTERVAL),
    )
    opened = utcnow()
    await _identity(probe_server, token=tokens["access_token"])
    async with open_session(settings) as session:
        seen = await session.scalar(select(Login.last_activity_at).where(Login.id == login_id))
    assert seen is not None
    assert seen >= opened
