"""Health endpoints (SPEC.md: Operations).

`/health` reports each component; `/health/live` only says the process runs; `/health/ready`
is 503 while draining for shutdown or when the database is unreachable. Other domains add
components (e.g. the LLM) with `register_health_check`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from helpline.core import database
from helpline.core import redis as redis_core
from helpline.core.errors import error_payload

ComponentState = Literal["healthy", "degraded", "unhealthy", "disabled"]
CHECK_TIMEOUT_S = 2.0


class ComponentHealth(BaseModel):
    status: ComponentState
    latency_ms: float | None = None
    error: str | None = None


class HealthReport(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    components: dict[str, ComponentHealth]


HealthCheck = Callable[[Request], Awaitable[ComponentHealth]]

router = APIRouter(tags=["operations"])


async def check_database(request: Request) -> ComponentHealth:
    try:
        latency = await asyncio.wait_for(
            database.ping(request.app.state.engine), timeout=CHECK_TIMEOUT_S
        )
    except Exception as exc:
        return ComponentHealth(status="unhealthy", error=type(exc).__name__)
    return ComponentHealth(status="healthy", latency_ms=round(latency, 2))


async def check_redis(request: Request) -> ComponentHealth:
    redis = request.app.state.redis
    if redis is None:
        return ComponentHealth(status="disabled")
    try:
        latency = await asyncio.wait_for(redis_core.ping(redis), timeout=CHECK_TIMEOUT_S)
    except Exception as exc:
        # Redis carries fan-out and limits; without it the service still answers, degraded.
        return ComponentHealth(status="degraded", error=type(exc).__name__)
    return ComponentHealth(status="healthy", latency_ms=round(latency, 2))


def register_health_check(app: FastAPI, name: str, check: HealthCheck) -> None:
    """Add a component to `/health` (kept on `app.state.health_checks`)."""
    checks: dict[str, HealthCheck] = app.state.health_checks
    checks[name] = check


def overall(components: dict[str, ComponentHealth]) -> Literal["healthy", "degraded", "unhealthy"]:
    states = {component.status for component in components.values()}
    if "unhealthy" in states:
        return "unhealthy"
    if "degraded" in states:
        return "degraded"
    return "healthy"


@router.get("/health", response_model=HealthReport, summary="Component health")
async def get_health(request: Request) -> JSONResponse:
    """Report the health of the database, Redis and the LLM provider."""
    checks: dict[str, HealthCheck] = request.app.state.health_checks
    results = await asyncio.gather(*(check(request) for check in checks.values()))
    components = dict(zip(checks.keys(), results, strict=True))
    report = HealthReport(status=overall(components), components=components)
    status_code = 503 if report.status == "unhealthy" else 200
    return JSONResponse(report.model_dump(exclude_none=True), status_code=status_code)


@router.get("/health/live", summary="Liveness")
async def get_liveness() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "alive"}


@router.get("/health/ready", summary="Readiness")
async def get_readiness(request: Request) -> JSONResponse:
    """200 when this instance should get traffic; 503 while draining or without a database."""
    if request.app.state.lifecycle.draining:
        return JSONResponse(
            error_payload("SHUTTING_DOWN", "The server is shutting down"), status_code=503
        )
    database_health = await check_database(request)
    if database_health.status != "healthy":
        return JSONResponse(
            error_payload("SERVICE_UNAVAILABLE", "The database is unreachable"), status_code=503
        )
    return JSONResponse({"status": "ready"})
