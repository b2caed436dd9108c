"""Prometheus metrics: the metric objects, `GET /metrics` and the HTTP metrics middleware.

Other modules import the metric objects and update them where the work happens, e.g.
`metrics.LLM_TOKENS.labels(model=model, kind="completion").inc(n)`. Label values must come from
small, closed sets (route templates, model names, outcomes), never from IDs or user input.

`helpline serve --workers N` runs N processes; each keeps its own values, so the server runs in
prometheus-client's multiprocess mode: `prepare_multiprocess_dir()` points
`PROMETHEUS_MULTIPROC_DIR` at an empty folder before the workers start, every worker writes its
values to files there, and `/metrics` (answered by whichever worker gets the scrape) sums them.
uvicorn has no worker-exit hook, so each worker removes its live gauges itself at shutdown
(`mark_worker_dead()`), and gauges use `livesum` so only running workers count.

WebSocket and SSE metrics (`WEBSOCKET_*`, `SSE_STREAMS`) are updated by the realtime code, which
knows when a socket is really accepted and why it closes; the middleware only measures HTTP.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Final
from wsgiref.simple_server import WSGIServer

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.routing import iter_route_contexts
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helpline.core.config import Settings
from helpline.core.errors import NotAuthenticated

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE: Final = "<unmatched>"
METRICS_PATH: Final = "/metrics"
# Anything else a client sends as a method is counted as OTHER: labels stay a closed set.
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Token streams and model calls take seconds, not milliseconds: buckets sized for that.
_LLM_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0)
_LLM_DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# HTTP
HTTP_REQUESTS = Counter(
    "helpline_http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "helpline_http_request_duration_seconds",
    "Time from receiving an HTTP request to the end of its response, by route template.",
    ["method", "route"],
    buckets=_HTTP_BUCKETS,
)

# Realtime
WEBSOCKET_CONNECTIONS = Gauge(
    "helpline_websocket_connections",
    "WebSocket connections currently open.",
    multiprocess_mode="livesum",
)
WEBSOCKET_FRAMES = Counter(
    "helpline_websocket_frames_total",
    "WebSocket frames, by direction (in/out) and frame type.",
    ["direction", "type"],
)
WEBSOCKET_SLOW_CONSUMERS = Counter(
    "helpline_websocket_slow_consumer_disconnects_total",
    "WebSocket connections closed because the client did not keep up with its frames.",
)
SSE_STREAMS = Gauge(
    "helpline_sse_streams",
    "Server-sent event streams currently open.",
    multiprocess_mode="livesum",
)
EVENT_DELIVERY_LAG = Histogram(
    "helpline_event_delivery_lag_seconds",
    "Time from an event's creation to its send on a socket or stream.",
    buckets=_LAG_BUCKETS,
)
EVENT_LOOP_LAG = Gauge(
    "helpline_event_loop_lag_seconds",
    "How late the event loop last ran a timer: above a few milliseconds the process is busy, and "
    "answers' text goes out in fewer, larger frames.",
    multiprocess_mode="max",
)

# LLM
LLM_TOKENS = Counter(
    "helpline_llm_tokens_total",
    "LLM tokens, by model and kind (prompt/completion).",
    ["model", "kind"],
)
LLM_TIME_TO_FIRST_TOKEN = Histogram(
    "helpline_llm_time_to_first_token_seconds",
    "Time from starting a generation to its first token, by model.",
    ["model"],
    buckets=_LLM_TTFT_BUCKETS,
)
LLM_REQUEST_DURATION = Histogram(
    "helpline_llm_request_duration_seconds",
    "Total duration of a generation, by model and outcome (complete/cancelled/failed).",
    ["model", "outcome"],
    buckets=_LLM_DURATION_BUCKETS,
)
LLM_ERRORS = Counter(
    "helpline_llm_errors_total",
    "Failed LLM calls, by model and error type.",
    ["model", "type"],
)
LLM_CANCELLATIONS = Counter(
    "helpline_llm_cancellations_total",
    "Generations cancelled before completion, by model.",
    ["model"],
)
ANSWERS_IN_FLIGHT = Gauge(
    "helpline_answers_in_flight",
    "Answers currently being generated.",
    multiprocess_mode="livesum",
)

# Limits, jobs, conversations
RATE_LIMITED = Counter(
    "helpline_rate_limited_total",
    "Requests refused by a rate limit or token budget, by scope (api/llm/websocket/login/budget).",
    ["scope"],
)
JOBS = Counter(
    "helpline_jobs_total",
    "Background jobs run, by job name and outcome.",
    ["name", "outcome"],
)
JOB_DURATION = Histogram(
    "helpline_job_duration_seconds",
    "Background job duration, by job name.",
    ["name"],
    buckets=_JOB_BUCKETS,
)
CONVERSATIONS_COMPLETED = Counter(
    "helpline_conversations_completed_total",
    "Conversations closed, by outcome (ai_only/handed_over).",
    ["outcome"],
)

ALL_METRICS: Final[tuple[MetricWrapperBase, ...]] = (
    HTTP_REQUESTS,
    HTTP_REQUEST_DURATION,
    WEBSOCKET_CONNECTIONS,
    WEBSOCKET_FRAMES,
    WEBSOCKET_SLOW_CONSUMERS,
    SSE_STREAMS,
    EVENT_DELIVERY_LAG,
    EVENT_LOOP_LAG,
    LLM_TOKENS,
    LLM_TIME_TO_FIRST_TOKEN,
    LLM_REQUEST_DURATION,
    LLM_ERRORS,
    LLM_CANCELLATIONS,
    ANSWERS_IN_FLIGHT,
    RATE_LIMITED,
    JOBS,
    JOB_DURATION,
    CONVERSATIONS_COMPLETED,
)


# --- multiprocess mode -------------------------------------------------------------------------


def is_multiprocess() -> bool:
    """Whether this process's metric values live in `PROMETHEUS_MULTIPROC_DIR` files.

    prometheus-client decides once, when it is first imported, from the environment; a folder
    set later (e.g. by `helpline serve` in its own process) applies only to processes started
    afterwards, so the value class, not the variable, tells how to collect.
    """
    return values.ValueClass is not values.MutexValue


def prepare_multiprocess_dir(settings: Settings) -> Path:
    """Point `PROMETHEUS_MULTIPROC_DIR` at an empty folder; call before the workers start.

    Uses the variable when it is already set, else `<DATA_DIR>/prometheus`. Files left by an
    earlier run would be summed into this one's values, so they are removed; only files of this
    very process are kept (they were opened when the metrics above were defined).
    """
    configured = os.environ.get(MULTIPROC_ENV)
    folder = Path(configured) if configured else settings.data_dir / "prometheus"
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    own_suffix = f"_{os.getpid()}.db"
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif not (is_multiprocess() and entry.name.endswith(own_suffix)):
            entry.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def mark_worker_dead(pid: int | None = None) -> None:
    """Drop this worker's live gauges from the shared folder (call at lifespan shutdown)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not is_multiprocess() or not folder:
        return
    multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
        os.getpid() if pid is None else pid, folder
    )


class _DeclaredMetrics(Collector):
    """Every metric of this module, with the samples the multiprocess files hold.

    The multiprocess collector only knows metrics some worker has written a value for; this
    adds the others (HELP and TYPE, no samples) so `/metrics` lists the same names in both modes.
    """

    def __init__(self, folder: str) -> None:
        self._collector = multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            None, path=folder
        )

    def collect(self) -> Iterable[Metric]:
        seen: set[str] = set()
        collected: Iterable[Metric] = self._collector.collect()  # type: ignore[no-untyped-call]
        for family in collected:
            seen.add(family.name)
            yield family
        for metric in ALL_METRICS:
            for family in metric.describe():
                if family.name not in seen:
                    seen.add(family.name)
                    yield family


def _registry() -> Collector:
    folder = os.environ.get(MULTIPROC_ENV)
    if is_multiprocess() and folder:
        registry = CollectorRegistry()
        registry.register(_DeclaredMetrics(folder))
        return registry
    return REGISTRY


def render_metrics(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition for a scrape: (body, content type), negotiated from `Accept`."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(_registry()), content_type


def sample_value(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample as `/metrics` would report it (0 when absent)."""
    for family in _registry().collect():
        for sample in family.samples:
            if _matches(sample, name, labels or {}):
                return float(sample.value)
    return 0.0


def _matches(sample: Sample, name: str, labels: dict[str, str]) -> bool:
    return sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())


def start_worker_metrics_server(
    port: int, addr: str = "0.0.0.0"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve this process's metrics on `addr:port` from a daemon thread (the job worker).

    Stop it with `server.shutdown(); server.server_close()`.
    """
    return start_http_server(port, addr=addr, registry=_registry())


# --- GET /metrics ------------------------------------------------------------------------------


def _require_metrics_token(request: Request) -> None:
    expected = request.app.state.settings.metrics_token
    if not expected:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        presented.strip().encode(), expected.encode()
    ):
        raise NotAuthenticated("A valid metrics token is required")


router = APIRouter(tags=["operations"])


@router.get(METRICS_PATH, include_in_schema=False)
async def get_metrics(
    request: Request, _: Annotated[None, Depends(_require_metrics_token)]
) -> Response:
    """Prometheus exposition of this service's metrics (all workers together)."""
    accept = request.headers.get("accept")
    if is_multiprocess():
        # Reads one file per worker and metric type: keep that off the event loop.
        body, content_type = await anyio.to_thread.run_sync(render_metrics, accept)
    else:
        body, content_type = render_metrics(accept)
    return Response(content=body, media_type=content_type)


# --- middleware --------------------------------------------------------------------------------


def route_template(scope: Scope) -> str:
    """The path template of the route for `scope`, or `UNMATCHED_ROUTE`.

    Call it once the app has answered. When the router ran, it left the route in the scope:
    FastAPI keeps routes of included routers as they were declared and records the full
    template in its effective route context, so that is read first; a route declared on the
    app itself is on `scope["route"]`. A request answered before routing (a 429 from the rate
    limiter, a 413) is matched against the app's routes here, as the router would have.
    """
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    template = getattr(context, "path", None)
    if isinstance(template, str) and template:
        return template
    template = getattr(scope.get("route"), "path", None)
    if isinstance(template, str) and template:
        return template
    if "endpoint" not in scope:  # the router did not run (it sets the endpoint on a match)
        template = _match_route(scope)
        if template:
            return template
    return UNMATCHED_ROUTE


def _match_route(scope: Scope) -> str | None:
    routes = getattr(scope.get("app"), "routes", None)
    if not routes:
        return None
    partial: str | None = None
    for route in iter_route_contexts(routes):
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route type that cannot match this scope
            continue
        path = route.path
        if match == Match.FULL and path:
            return str(path)
        if match == Match.PARTIAL and partial is None and path:
            partial = str(path)  # right path, other method: what the router answers 405 for
    return partial


class MetricsMiddleware:
    """Counts HTTP requests and their duration by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = route_template(scope)
            method = str(scope.get("method", ""))
            method = method if method in _METHODS else "OTHER"
            if route != METRICS_PATH:
                HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
                HTTP_REQUEST_DURATION.labels(method=method, route=route).observe(
                    time.perf_counter() - started
                )
