"""`/health`, `/health/live` and `/health/ready` (SPEC.md: Operations)."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from helpline.core.config import Settings
from helpline.main import create_app


async def test_liveness(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


async def test_health_reports_database_and_disabled_redis(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["components"]["database"]["status"] == "healthy"
    assert body["components"]["database"]["latency_ms"] >= 0
    assert body["components"]["redis"] == {"status": "disabled"}


async def test_health_reports_redis_when_configured(redis_settings: Settings) -> None:
    application = create_app(redis_settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = (await http.get("/health")).json()
    assert body["components"]["redis"]["status"] == "healthy"


async def test_unreachable_redis_degrades_health(settings: Settings) -> None:
    application = create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["components"]["redis"]["status"] == "degraded"


async def test_readiness(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_readiness_is_503_while_draining(app: FastAPI, client: httpx.AsyncClient) -> None:
    app.state.lifecycle.draining = True
    response = await client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "SHUTTING_DOWN"


async def test_unreachable_database_is_unhealthy_and_not_ready(settings: Settings) -> None:
    broken = settings.model_copy(
        update={"database_url": "postgresql+asyncpg://nobody@127.0.0.1:1/none"}
    )
    application = create_app(broken)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            health = await http.get("/health")
            ready = await http.get("/health/ready")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert health.json()["components"]["database"]["status"] == "unhealthy"
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
