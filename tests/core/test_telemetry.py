"""Tracing: request, SQL, Redis and httpx spans, GenAI spans, job links, trace ids in logs."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import structlog
from fastapi import FastAPI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text
from websockets.asyncio.client import connect as websocket_connect

from helpline.core import metrics, telemetry
from helpline.core.config import Settings
from helpline.core.database import DbSession
from helpline.main import create_app
from tests.log_events import captured_log_events
from tests.realtime.helpers import eventually
from tests.servers import LiveServer, free_port

PROBE_TEMPLATE = "/trace-probes/{item_id}"


@dataclass
class Traced:
    app: FastAPI
    client: httpx.AsyncClient
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> ReadableSpan:
        found = [span for span in self.spans() if span.name == name]
        assert len(found) == 1, [span.name for span in self.spans()]
        return found[0]

    def server_span(self, route: str) -> ReadableSpan:
        found = [
            span
            for span in self.spans()
            if span.kind == SpanKind.SERVER and (span.attributes or {}).get("http.route") == route
        ]
        assert len(found) == 1, [span.name for span in self.spans()]
        return found[0]


def add_probe_route(app: FastAPI) -> None:
    @app.get(PROBE_TEMPLATE)
    async def get_trace_probe(item_id: str, session: DbSession) -> dict[str, object]:
        """Runs one SQL statement, so the request has a database span."""
        result = await session.execute(text("SELECT 1"))
        return {"id": item_id, "one": result.scalar_one()}


@asynccontextmanager
async def traced_app(settings: Settings) -> AsyncIterator[Traced]:
    """An app with tracing on, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    app = create_app(settings)
    assert telemetry.setup_tracing(app, settings, exporter=exporter)
    add_probe_route(app)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield Traced(app, http, exporter)


@pytest.fixture
async def traced(settings: Settings) -> AsyncIterator[Traced]:
    async with traced_app(settings.model_copy(update={"log_level": "INFO"})) as value:
        yield value


def ancestors(span: ReadableSpan, spans: list[ReadableSpan]) -> list[int]:
    by_id = {item.context.span_id: item for item in spans}
    chain = []
    parent = span.parent
    while parent is not None:
        chain.append(parent.span_id)
        parent = by_id[parent.span_id].parent if parent.span_id in by_id else None
    return chain


def all_attribute_values(spans: list[ReadableSpan]) -> list[str]:
    return [str(value) for span in spans for value in (span.attributes or {}).values()]


async def test_request_span_has_the_http_attributes(traced: Traced) -> None:
    response = await traced.client.get("/trace-probes/42")
    assert response.status_code == 200

    span = traced.server_span(PROBE_TEMPLATE)
    attributes = span.attributes or {}
    assert span.name == f"GET {PROBE_TEMPLATE}"
    assert attributes["http.method"] == "GET"
    assert attributes["http.status_code"] == 200
    assert attributes["http.target"] == "/trace-probes/42"
    assert span.status.status_code != StatusCode.ERROR


async def test_token_is_redacted_from_recorded_urls(traced: Traced) -> None:
    secret = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.c2ln"
    response = await traced.client.get(f"/trace-probes/7?token={secret}&lang=en")
    assert response.status_code == 200

    spans = traced.spans()
    assert not [value for value in all_attribute_values(spans) if secret in value]
    attributes = traced.server_span(PROBE_TEMPLATE).attributes or {}
    assert attributes["http.target"] == "/trace-probes/7"
    assert attributes["http.url"] == "http://testserver/trace-probes/7?token=[redacted]&lang=en"


async def test_no_per_message_send_or_receive_spans(traced: Traced) -> None:
    await traced.client.get("/trace-probes/1")
    names = [span.name for span in traced.spans()]
    assert not [name for name in names if name.endswith(("http send", "http receive"))], names


async def test_sql_spans_are_children_of_the_request_span(traced: Traced) -> None:
    await traced.client.get("/trace-probes/9")

    spans = traced.spans()
    request = traced.server_span(PROBE_TEMPLATE)
    statements = [
        span for span in spans if "SELECT 1" in str((span.attributes or {}).get("db.statement", ""))
    ]
    assert len(statements) == 1
    sql = statements[0]
    assert sql.kind == SpanKind.CLIENT
    assert sql.context.trace_id == request.context.trace_id
    assert request.context.span_id in ancestors(sql, spans)


async def test_probes_and_scrapes_are_not_traced(traced: Traced) -> None:
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert (await traced.client.get(path)).status_code == 200
    assert [span for span in traced.spans() if span.kind == SpanKind.SERVER] == []


async def test_log_lines_carry_the_trace_id(traced: Traced) -> None:
    with captured_log_events() as events:
        await traced.client.get("/trace-probes/3")

    request = traced.server_span(PROBE_TEMPLATE)
    lines = [event for event in events if event.get("event") == "http.request"]
    assert len(lines) == 1
    assert lines[0]["trace_id"] == format(request.context.trace_id, "032x")
    assert len(lines[0]["span_id"]) == 16


async def test_log_lines_outside_a_span_have_no_trace_id(traced: Traced) -> None:
    del traced  # tracing is on, but no span is current here
    with captured_log_events() as events:
        structlog.get_logger("helpline.test").warning("telemetry.test_line")
    lines = [event for event in events if event.get("event") == "telemetry.test_line"]
    assert len(lines) == 1
    assert "trace_id" not in lines[0]


async def test_generation_span_records_the_genai_attributes(traced: Traced) -> None:
    with telemetry.generation_span(
        provider="fake", model="fake-1", conversation_id="c-1", message_id="m-1"
    ) as generation:
        with telemetry.retrieval_span("how do I reset my password?") as retrieval:
            retrieval.results = 3
        generation.prompt_tokens = 120
        generation.completion_tokens = 48
        generation.time_to_first_token_s = 0.2345

    span = traced.named("chat fake-1")
    assert span.kind == SpanKind.CLIENT
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "fake",
        "gen_ai.request.model": "fake-1",
        "helpline.conversation_id": "c-1",
        "helpline.message_id": "m-1",
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 48,
        "helpline.ttft_ms": 234.5,
        "helpline.outcome": "complete",
    }
    retrieval_span = traced.named("retrieval")
    assert retrieval_span.parent is not None
    assert retrieval_span.parent.span_id == span.context.span_id
    assert (retrieval_span.attributes or {})["helpline.retrieval.results"] == 3
    assert (retrieval_span.attributes or {})["helpline.retrieval.query_chars"] == 27
    assert "password" not in " ".join(all_attribute_values([retrieval_span]))


async def test_generation_span_marks_a_cancellation(traced: Traced) -> None:
    streaming = asyncio.Event()

    async def stream_then_get_cancelled() -> None:
        with telemetry.generation_span(
            provider="openai", model="gpt-x", conversation_id="c", message_id="m"
        ) as generation:
            generation.completion_tokens = 5
            streaming.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(stream_then_get_cancelled())
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    span = traced.named("chat gpt-x")
    assert (span.attributes or {})["helpline.outcome"] == "cancelled"
    assert (span.attributes or {})["gen_ai.usage.output_tokens"] == 5
    assert span.status.status_code != StatusCode.ERROR


def _fail_a_generation() -> None:
    with telemetry.generation_span(
        provider="anthropic", model="claude-x", conversation_id="c", message_id="m"
    ):
        raise RuntimeError("upstream refused")


async def test_generation_span_marks_a_failure(traced: Traced) -> None:
    with pytest.raises(RuntimeError):
        _fail_a_generation()

    span = traced.named("chat claude-x")
    assert (span.attributes or {})["helpline.outcome"] == "failed"
    assert span.status.status_code == StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


async def test_generation_span_keeps_an_outcome_set_by_the_engine(traced: Traced) -> None:
    with telemetry.generation_span(
        provider="openai", model="gpt-x", conversation_id="c", message_id="m"
    ) as generation:
        generation.outcome = "failed"

    span = traced.named("chat gpt-x")
    assert (span.attributes or {})["helpline.outcome"] == "failed"
    assert span.status.status_code == StatusCode.ERROR


async def test_job_span_is_linked_to_the_request_that_enqueued_it(traced: Traced) -> None:
    with telemetry.get_tracer().start_as_current_span("enqueueing request") as request:
        carrier = telemetry.inject_trace_context()
    assert "traceparent" in carrier

    with telemetry.linked_span("job.reindex", carrier, attributes={"job.id": "j-1"}):
        pass

    job = traced.named("job.reindex")
    origin = request.get_span_context()
    assert job.parent is None
    assert job.kind == SpanKind.CONSUMER
    assert job.context.trace_id != origin.trace_id
    assert [(link.context.trace_id, link.context.span_id) for link in job.links] == [
        (origin.trace_id, origin.span_id)
    ]
    assert (job.attributes or {})["job.id"] == "j-1"


async def test_job_span_without_a_carrier_has_no_link(traced: Traced) -> None:
    with telemetry.linked_span("job.cleanup", {}):
        pass
    job = traced.named("job.cleanup")
    assert job.links == ()
    assert job.parent is None


async def test_redis_commands_are_traced_under_the_request(redis_settings: Settings) -> None:
    async with traced_app(redis_settings) as traced:
        assert (await traced.client.get("/health")).status_code == 200
        spans = traced.spans()
    request = traced.server_span("/health")
    redis_spans = [
        span
        for span in spans
        if (span.attributes or {}).get("db.system") == "redis"
        and span.context.trace_id == request.context.trace_id
    ]
    assert redis_spans
    assert all(request.context.span_id in ancestors(span, spans) for span in redis_spans)


async def test_outgoing_httpx_calls_are_traced_with_redacted_urls(traced: Traced) -> None:
    port = free_port()
    server, thread = metrics.start_worker_metrics_server(port, addr="127.0.0.1")
    try:
        with telemetry.get_tracer().start_as_current_span("caller") as caller:
            async with httpx.AsyncClient() as http:
                response = await http.get(f"http://127.0.0.1:{port}/metrics?token=abc123")
        assert response.status_code == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    spans = traced.spans()
    clients = [span for span in spans if "http.url" in (span.attributes or {})]
    assert len(clients) == 1
    assert clients[0].parent is not None
    assert clients[0].parent.span_id == caller.get_span_context().span_id
    assert not [value for value in all_attribute_values(spans) if "abc123" in value]
    assert "token=[redacted]" in str((clients[0].attributes or {}).get("http.url"))


async def test_setting_up_tracing_again_keeps_one_server_span(traced: Traced) -> None:
    settings: Settings = traced.app.state.settings
    assert telemetry.setup_tracing(traced.app, settings)
    await traced.client.get("/trace-probes/5")
    assert traced.server_span(PROBE_TEMPLATE)


async def test_a_second_app_sends_its_spans_to_its_own_exporter(settings: Settings) -> None:
    async with traced_app(settings) as first:
        await first.client.get("/trace-probes/1")
    async with traced_app(settings) as second:
        await second.client.get("/trace-probes/2")

    assert (first.server_span(PROBE_TEMPLATE).attributes or {})["http.target"] == (
        "/trace-probes/1"
    )
    assert (second.server_span(PROBE_TEMPLATE).attributes or {})["http.target"] == (
        "/trace-probes/2"
    )


def test_tracing_stays_off_without_an_endpoint(settings: Settings) -> None:
    assert settings.otel_exporter_otlp_endpoint is None
    app = create_app(settings)
    assert telemetry.setup_tracing(app, settings) is False
    assert not telemetry.tracing_enabled(app)
    assert not hasattr(app, "_original_build_middleware_stack")


class _OtlpReceiver(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.received.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        del args


async def test_spans_are_exported_over_otlp_when_an_endpoint_is_set(settings: Settings) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpReceiver)
    _OtlpReceiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        otlp_settings = settings.model_copy(update={"otel_exporter_otlp_endpoint": endpoint})
        app = create_app(otlp_settings)
        assert telemetry.tracing_enabled(app)
        add_probe_route(app)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                assert (await http.get("/trace-probes/77?token=hush")).status_code == 200
        assert await asyncio.to_thread(telemetry.force_flush, 10_000)
    finally:
        # Hand the exporter slot back before the receiver goes, so nothing waits on it later.
        telemetry.setup_tracing(create_app(settings), settings, exporter=InMemorySpanExporter())
        server.shutdown()
        server.server_close()

    paths = {path for path, _, _ in _OtlpReceiver.received}
    assert paths == {"/v1/traces"}
    assert {kind for _, kind, _ in _OtlpReceiver.received} == {"application/x-protobuf"}
    names: set[str] = set()
    for _, _, body in _OtlpReceiver.received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = {
                attribute.key: attribute.value.string_value
                for attribute in resource_spans.resource.attributes
            }
            assert service["service.name"] == "helpline"
            for scope_spans in resource_spans.scope_spans:
                names.update(span.name for span in scope_spans.spans)
        assert b"hush" not in body
    assert f"GET {PROBE_TEMPLATE}" in names


async def test_a_chat_socket_has_a_session_span_over_its_handshake(settings: Settings) -> None:
    exporter = InMemorySpanExporter()
    app = create_app(settings)
    assert telemetry.setup_tracing(app, settings, exporter=exporter)
    with LiveServer.serve(app) as live:
        async with httpx.AsyncClient(base_url=live.http_url, timeout=10) as http:
            login = {"username": "tracy", "password": "correct-horse-battery"}
            assert (await http.post("/auth/register", json=login)).status_code == 201
            token = (await http.post("/auth/token", data=login)).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            conversation = (await http.post("/conversations", json={}, headers=headers)).json()
        url = f"{live.ws_url}/chat/ws/{conversation['id']}?token={token}"
        async with websocket_connect(url, additional_headers={"X-Request-ID": "trace-me"}) as ws:
            assert ws.response is not None
            assert ws.response.headers.get_all("X-Request-ID") == ["trace-me"]
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await ws.recv()) == {"type": "pong"}

        def session_span() -> ReadableSpan | None:
            for span in exporter.get_finished_spans():
                route = (span.attributes or {}).get("http.route")
                if span.kind == SpanKind.SERVER and route == "/chat/ws/{conversation_id}":
                    return span
            return None

        session = await eventually(session_span)
    spans = list(exporter.get_finished_spans())
    handshake_sql = [
        span
        for span in spans
        if span.kind == SpanKind.CLIENT and session.context.span_id in ancestors(span, spans)
    ]
    assert handshake_sql, [span.name for span in spans]


async def test_a_send_and_its_answers_store_have_database_spans(traced: Traced) -> None:
    """The statements run on the driver itself (`DriverStatement`) are traced as SQLAlchemy's
    are: the send under the request, the store in the same trace."""
    login = {"username": "traced-sender", "password": "correct-horse-battery"}
    assert (await traced.client.post("/auth/register", json=login)).status_code == 201
    token = (await traced.client.post("/auth/token", data=login)).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    conversation = (await traced.client.post("/conversations", json={}, headers=headers)).json()
    response = await traced.client.post(
        f"/conversations/{conversation['id']}/messages",
        json={"content": "Where is my parcel? [[tokens=3]]"},
        headers=headers,
    )
    assert response.status_code == 201, response.text

    spans = traced.spans()
    request = next(
        span
        for span in spans
        if span.kind == SpanKind.SERVER and span.name.startswith("POST /conversations/")
    )

    def statement(span: ReadableSpan) -> str:
        return str((span.attributes or {}).get("db.statement", ""))

    sends = [span for span in spans if "INSERT INTO messages" in statement(span)]
    stores = [span for span in spans if "INSERT INTO token_usage" in statement(span)]
    assert len(sends) == 1, [span.name for span in spans]
    assert sends[0].kind == SpanKind.CLIENT
    assert request.context.span_id in ancestors(sends[0], spans)
    assert len(stores) == 1, [span.name for span in spans]
    assert stores[0].kind == SpanKind.CLIENT
    assert stores[0].context.trace_id == request.context.trace_id
