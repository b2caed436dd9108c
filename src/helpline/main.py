"""The FastAPI application: `create_app()` builds it, `lifespan` owns engines and clients."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.routing import Match, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from helpline.agents.factory import create_answerer, create_chat_model
from helpline.agents.health import check_llm
from helpline.auth.dependencies import rate_limit_key
from helpline.auth.revocation import create_revocations
from helpline.conversations import service as conversations_service
from helpline.conversations.service import ConversationAnswerStore
from helpline.core import health, lifecycle, metrics, telemetry
from helpline.core.cache import create_cache
from helpline.core.config import Settings, get_settings
from helpline.core.database import (
    create_engine,
    create_sessionmaker,
    unavailable_error,
    unit_of_work,
)
from helpline.core.errors import (
    app_error_response,
    register_error_decorator,
    register_exception_handlers,
)
from helpline.core.limiter import RateLimiter, RateLimitMiddleware, create_storage
from helpline.core.logging import configure_logging, redact_url
from helpline.core.middleware import (
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
    incoming_request_id,
)
from helpline.core.redis import create_redis
from helpline.jobs.queues import create_queue
from helpline.jobs.registry import JobRuntime
from helpline.knowledge import service as knowledge_service
from helpline.realtime.backends import create_backends
from helpline.realtime.connection import CLOSE_GOING_AWAY
from helpline.realtime.engine import GenerationEngine
from helpline.realtime.service import close_revoked_sockets, model_call_guard
from helpline.realtime.websocket import ConnectionRegistry, FrameRateLimiter, handshake_slots

log = structlog.get_logger(__name__)

UPLOAD_PATHS = ("/knowledge/documents",)


# Allocations between two young collections (CPython's default: 700). Streaming allocates a
# few objects per token; at the default, a process streaming 50,000 tokens/s spent about a
# tenth of its CPU collecting (`bench/realtime.py paced`).
GC_YOUNG_THRESHOLD = 7000


@contextlib.contextmanager
def _collector_settled() -> Iterator[None]:
    """Keep the cyclic garbage collector's pauses short while the app serves.

    What start-up built lives as long as the app: frozen, it is out of the collector's way,
    and a full collection scans only what serving made (one took ~120 ms before, with 1,000
    sockets streaming). Unfrozen at shutdown, so that an embedding process (the tests) can
    collect it again; start-up's garbage, frozen with it, is collected then too.
    """
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = create_engine(settings)
    app.state.engine = engine
    app.state.sessionmaker = create_sessionmaker(engine)
    telemetry.setup_tracing(app, settings, engine)
    app.state.redis = create_redis(settings)
    app.state.limiter = RateLimiter(
        create_storage(settings), fail_open=settings.rate_limit_fail_open
    )
    app.state.jwt_secret = settings.resolve_jwt_secret()
    app.state.cache = create_cache(app.state.redis, settings.redis_key_prefix)
    app.state.revocations = create_revocations(settings, redis=app.state.redis, database=engine)
    app.state.lifecycle = lifecycle.Lifecycle(settings.shutdown_grace_s)
    lifecycle.set_current(app.state.lifecycle)
    lifecycle.install_signal_handlers(app.state.lifecycle)
    await _start_jobs(app, settings)
    await _start_generation(app, settings)
    log.info(
        "app.started",
        environment=settings.environment.value,
        database="sqlite" if settings.is_sqlite else "postgresql",
        redis=bool(settings.redis_url),
        llm_provider=settings.llm_provider,
    )
    try:
        with _collector_settled():
            yield
    finally:
        await app.state.lifecycle.drain()
        lifecycle.set_current(None)
        await app.state.generation_engine.close()
        await app.state.job_queue.close()
        await knowledge_service.stop_knowledge_base(app.state.knowledge)
        if app.state.chat_model is not None:
            await app.state.chat_model.aclose()
        if app.state.redis is not None:
            await app.state.redis.aclose()
        await engine.dispose()
        metrics.mark_worker_dead()
        log.info("app.stopped")


async def _start_jobs(app: FastAPI, settings: Settings) -> None:
    """Knowledge-base retrieval and the job queue (in-process, or ARQ with `REDIS_URL`)."""
    knowledge = await knowledge_service.start_knowledge_base(settings, app.state.sessionmaker)
    app.state.knowledge = knowledge
    runtime = JobRuntime(
        settings=settings, sessionmaker=app.state.sessionmaker, knowledge=knowledge
    )
    queue = create_queue(settings, runtime)
    await queue.start()
    app.state.job_queue = queue
    # The in-process queue stops taking jobs and lets running ones finish within the grace.
    app.state.lifecycle.on_drain("jobs", queue.drain)


async def _start_generation(app: FastAPI, settings: Settings) -> None:
    """The generation engine, its answerer and store, sockets, limits and drain."""
    chat_model = create_chat_model(settings)
    sessionmaker = app.state.sessionmaker
    engine: GenerationEngine | None = None

    async def escalate(conversation_id: uuid.UUID, user_id: uuid.UUID, reason: str) -> None:
        # The agent's `escalate_to_human` tool; the engine exists before any answer runs.
        assert engine is not None
        async with unit_of_work(sessionmaker) as session:
            await conversations_service.escalate_to_human(
                session,
                engine=engine,
                conversation_id=conversation_id,
                user_id=user_id,
                reason=reason,
            )

    answerer = create_answerer(
        settings, chat_model, knowledge=app.state.knowledge, escalate=escalate
    )
    app.state.chat_model = chat_model
    store = ConversationAnswerStore(
        sessionmaker,
        queue_when_busy=settings.generation_policy == "queue",
        model=answerer.model,
        job_queue=app.state.job_queue,
        # Only the agent keeps a running summary: other answerers have no model to write it.
        memory_token_budget=settings.memory_token_budget if chat_model is not None else None,
    )
    engine = GenerationEngine(
        backends=create_backends(settings, app.state.redis),
        answerer=answerer,
        store=store,
        lease_s=settings.generation_lease_s,
        provider=settings.llm_provider,
    )
    await engine.start()
    app.state.generation_engine = engine
    registry = ConnectionRegistry()
    app.state.ws_connections = registry
    app.state.ws_frame_limiter = FrameRateLimiter(settings.ws_rate_limit)
    app.state.ws_handshakes = asyncio.Semaphore(handshake_slots(settings))
    app.state.before_model_call = model_call_guard(app.state.limiter, settings, app.state.engine)
    close_revoked_sockets(app.state.revocations, engine, registry)
    app.state.health_checks["llm"] = check_llm

    async def drain(deadline: float) -> None:
        await engine.drain(deadline)
        await registry.close_all(CLOSE_GOING_AWAY, "server shutting down")

    app.state.lifecycle.on_drain("generation", drain)


async def _handle_database_error(_: Request, exc: Exception) -> JSONResponse:
    unavailable = unavailable_error(exc)
    if unavailable is None:
        raise exc
    log.warning("http.database_unavailable", error=str(exc))
    return app_error_response(unavailable)


class Helpline(FastAPI):
    """The app: FastAPI, with its WebSocket routes served ahead of the middleware stack.

    The HTTP middleware (metrics, rate limits, body size, exception handlers, FastAPI's own
    layers) passes WebSocket scopes on, but each layer's suspended frame lives as long as the
    socket does (measured: over a quarter of an idle chat socket's memory) and each wraps every
    frame sent. These routes get what applies to a socket: the request id (log context, and
    `scope["state"]` for the endpoint to echo on its accept) and a logged traceback for an
    exception the endpoint did not handle. With tracing on, sockets take the whole stack, whose
    outermost layer opens their session span.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.websocket_routes: list[WebSocketRoute] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        direct = scope["type"] == "websocket" and not telemetry.tracing_enabled(self)
        route = self._websocket_route(scope) if direct else None
        if route is None:
            await super().__call__(scope, receive, send)
            return
        # Inline rather than in helpers: each frame here lives as long as the socket.
        scope["app"] = self
        request_id = incoming_request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        websocket = WebSocket(scope, receive, send)
        try:
            await route.endpoint(websocket)
        except Exception:
            log.exception("request.unhandled_error", path=redact_url(scope.get("path", "")))
            with contextlib.suppress(Exception):
                await websocket.close(code=1011)  # "internal error" (refused, if not accepted)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")

    def _websocket_route(self, scope: Scope) -> WebSocketRoute | None:
        for route in self.websocket_routes:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                return route
        return None


def include_routers(app: Helpline) -> None:
    from helpline.auth.router import admin_router as auth_admin_router
    from helpline.auth.router import router as auth_router
    from helpline.conversations.router import router as conversations_router
    from helpline.core.health import router as health_router
    from helpline.jobs.router import router as jobs_router
    from helpline.knowledge.router import router as knowledge_router
    from helpline.openai_compat.exceptions import add_openai_fields
    from helpline.openai_compat.router import router as openai_router
    from helpline.realtime.router import router as realtime_router
    from helpline.realtime.router import websocket_routes

    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(auth_admin_router)
    app.include_router(conversations_router)
    app.include_router(realtime_router)
    app.websocket_routes.extend(websocket_routes)
    app.router.routes.extend(websocket_routes)  # the way in through the middleware stack
    app.include_router(openai_router)
    register_error_decorator("/v1/", add_openai_fields)
    app.include_router(knowledge_router)
    app.include_router(jobs_router)
    app.include_router(metrics.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; tests pass their own settings."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    docs = not settings.is_production
    app = Helpline(
        title=settings.app_name,
        version="0.1.0",
        summary="Self-hostable customer-support AI backend",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    app.state.health_checks = {
        "database": health.check_database,
        "redis": health.check_redis,
    }
    register_exception_handlers(app)
    app.add_exception_handler(DBAPIError, _handle_database_error)
    app.add_exception_handler(PoolTimeout, _handle_database_error)
    app.add_exception_handler(OSError, _handle_database_error)

    def body_limit_for(path: str) -> int:
        if path.startswith(UPLOAD_PATHS):
            return settings.max_upload_bytes
        return settings.max_request_bytes

    # Added innermost first: the request context wraps everything, CORS answers pre-flights.
    app.add_middleware(RateLimitMiddleware, key_func=rate_limit_key)
    app.add_middleware(BodySizeLimitMiddleware, limit_for=body_limit_for)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ],
        )
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(metrics.MetricsMiddleware)
    telemetry.setup_tracing(app, settings)
    include_routers(app)
    return app
