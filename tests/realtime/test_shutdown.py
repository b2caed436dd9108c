"""Graceful shutdown of `helpline serve` on SIGTERM (SPEC.md: WebSocket, Operations).

Readiness turns 503 at once, new answers are refused with `SHUTTING_DOWN`, answers in flight
finish within `SHUTDOWN_GRACE_S` or are stored `failed` with their partial text, sockets close
with 1001, and SSE streams end with their answer's last event.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from helpline.core.config import Settings
from tests.conftest import make_settings
from tests.factories import bearer, create_user, login, open_session
from tests.realtime.test_cluster import server_env
from tests.servers import ProcessServer

pytestmark = pytest.mark.slow


@pytest.fixture
def embedded_settings(sqlite_url: str, tmp_path: Path) -> Settings:
    return make_settings(sqlite_url, tmp_path)


async def _customer(settings: Settings, http: httpx.AsyncClient) -> tuple[str, str]:
    async with open_session(settings) as session:
        user = await create_user(session)
    token = str((await login(http, user.username))["access_token"])
    conversation = await http.post("/conversations", json={}, headers=bearer(token))
    return token, str(conversation.json()["id"])


async def _first_token(socket: websockets.ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(15):
        while True:
            frame: dict[str, Any] = json.loads(await socket.recv())
            if frame["type"] == "token":
                return frame


async def _drain_socket(socket: websockets.ClientConnection) -> list[dict[str, Any]]:
    """Every frame until the server closes the socket."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        try:
            while True:
                frames.append(json.loads(await socket.recv()))
        except ConnectionClosed:
            return frames


async def test_sigterm_lets_the_answer_finish_then_closes_with_1001(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    server = ProcessServer.start(server_env(embedded_settings, SHUTDOWN_GRACE_S="10"), tmp_path)
    try:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            token, conversation_id = await _customer(embedded_settings, http)
            url = f"{server.ws_url}/chat/ws/{conversation_id}?token={token}"
            async with websockets.connect(url) as socket:
                await socket.send(
                    json.dumps({"type": "chat", "content": "x [[tokens=40 delay_ms=50]]"})
                )
                await _first_token(socket)
                server.signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                ready = await http.get("/health/ready")
                assert ready.status_code == 503
                assert ready.json()["error"]["code"] == "SHUTTING_DOWN"
                refused = await http.post(
                    f"/conversations/{conversation_id}/messages",
                    json={"content": "another"},
                    headers=bearer(token),
                )
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "SHUTTING_DOWN"
                frames = await _drain_socket(socket)
                assert socket.close_code == 1001
        complete = [frame for frame in frames if frame["type"] == "complete"]
        assert len(complete) == 1
        assert complete[0]["message"]["status"] == "complete"
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        server.kill()


async def test_sigterm_stores_an_unfinished_answer_as_failed(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    server = ProcessServer.start(server_env(embedded_settings, SHUTDOWN_GRACE_S="1"), tmp_path)
    try:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            token, conversation_id = await _customer(embedded_settings, http)
            url = f"{server.ws_url}/chat/ws/{conversation_id}?token={token}"
            async with websockets.connect(url) as socket:
                await socket.send(
                    json.dumps({"type": "chat", "content": "x [[tokens=5000 delay_ms=20]]"})
                )
                await _first_token(socket)
                server.signal(signal.SIGTERM)
                frames = await _drain_socket(socket)
                assert socket.close_code == 1001
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        server.kill()
    failed = [frame for frame in frames if frame["type"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["code"] == "SHUTTING_DOWN"
    stored = failed[0]["message"]
    assert stored["status"] == "failed"
    assert stored["content"]
    assert stored["content"].endswith("".join(f["content"] for f in frames if f["type"] == "token"))


async def test_new_answers_during_drain_are_refused_with_shutting_down(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    server = ProcessServer.start(server_env(embedded_settings, SHUTDOWN_GRACE_S="5"), tmp_path)
    try:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            token, conversation_id = await _customer(embedded_settings, http)
            fresh = (await http.post("/conversations", json={}, headers=bearer(token))).json()
            url = f"{server.ws_url}/chat/ws/{conversation_id}?token={token}"
            async with websockets.connect(url) as busy:
                await busy.send(
                    json.dumps({"type": "chat", "content": "x [[tokens=60 delay_ms=50]]"})
                )
                await _first_token(busy)
                server.signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                for path in ("messages", "stream"):
                    refused = await http.post(
                        f"/conversations/{fresh['id']}/{path}",
                        json={"content": "hello"},
                        headers=bearer(token),
                    )
                    assert refused.status_code == 503
                    assert refused.json()["error"]["code"] == "SHUTTING_DOWN"
                await busy.send(json.dumps({"type": "chat", "content": "and this?"}))
                frames = await _drain_socket(busy)
        errors = [frame for frame in frames if frame["type"] == "error"]
        assert [error["code"] for error in errors] == ["SHUTTING_DOWN"]
    finally:
        server.kill()
