"""OpenTelemetry tracing: set-up, instrumentation and the span helpers other code uses.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (spans go there over OTLP/HTTP in
batches) or when a test passes its own exporter. Otherwise nothing is installed: the helpers
below then run against OpenTelemetry's no-op tracer, which costs next to nothing.

What gets traced once it is on:

- every HTTP request and WebSocket session (FastAPI), without the per-message `http send` /
  `http receive` spans (a streamed answer would make one per token), health probes and scrapes
  excluded, and `?token=…` (WebSocket and SSE authentication) redacted from recorded URLs;
- SQL statements (as children of the request), Redis commands, outgoing httpx calls;
- generations and retrievals, through `generation_span()` and `retrieval_span()`;
- jobs, through `linked_span()`, linked to the request that enqueued them
  (`inject_trace_context()` when enqueueing).

Log lines written while a span is current carry its `trace_id` and `span_id`.

The global tracer provider can be set only once per process, but tests build many apps: one
SDK provider is created per process and each `setup_tracing` call swaps the exporter behind it.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.types import EventDict

from helpline.core.config import Settings
from helpline.core.database import trace_driver_statements
from helpline.core.logging import add_log_enricher, redact_url

TRACER_NAME: Final = "helpline"
# Probes and scrapes arrive every few seconds from every replica: tracing them is noise.
DEFAULT_EXCLUDED_URLS: Final = r"/health/live\b,/health/ready\b,/metrics\b"

_lock = threading.Lock()
_provider: TracerProvider | None = None
_exporting: _SwappableSpanProcessor | None = None
_instrumented_engines: weakref.WeakSet[Any] = weakref.WeakSet()
_libraries_instrumented = False


def _redact_attributes(attributes: Attributes) -> dict[str, Any] | None:
    """The attributes with secret query parameters scrubbed, or None when there were none."""
    if not attributes:
        return None
    changed = False
    scrubbed: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, str) and "=" in value:
            redacted = redact_url(value)
            changed = changed or redacted != value
            scrubbed[key] = redacted
        else:
            scrubbed[key] = value
    return scrubbed if changed else None


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """`span`, or a copy of it with `?token=…` (and other secret parameters) scrubbed.

    Done as spans leave for export rather than when they start, because instrumentations set
    URL attributes at various moments (the ASGI one sets them twice) and exception events can
    quote URLs too.
    """
    attributes = _redact_attributes(span.attributes)
    events: list[Event] = []
    events_changed = False
    for event in span.events:
        event_attributes = _redact_attributes(event.attributes)
        if event_attributes is None:
            events.append(event)
        else:
            events_changed = True
            events.append(Event(event.name, event_attributes, event.timestamp))
    if attributes is None and not events_changed:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes if attributes is not None else span.attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class _SwappableSpanProcessor(SpanProcessor):
    """Forwards to the exporting processor of the most recent `setup_tracing` call.

    Spans are redacted on their way through: nothing unredacted reaches an exporter.
    """

    def __init__(self) -> None:
        self._delegate: SpanProcessor | None = None

    def replace(self, processor: SpanProcessor) -> None:
        previous, self._delegate = self._delegate, processor
        if previous is not None and previous is not processor:
            previous.shutdown()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self._delegate is not None:
            self._delegate.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self._delegate is not None:
            self._delegate.on_end(redact_span(span))

    def shutdown(self) -> None:
        if self._delegate is not None:
            self._delegate.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._delegate is None:
            return True
        return self._delegate.force_flush(timeout_millis)


def _service_version() -> str:
    try:
        return metadata.version("helpline")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def _ensure_provider(settings: Settings) -> TracerProvider:
    global _provider, _exporting
    if _provider is None:
        resource = Resource.create(
            {
                "service.name": settings.otel_service_name,
                "service.version": _service_version(),
                "deployment.environment.name": settings.environment.value,
            }
        )
        provider = TracerProvider(resource=resource)
        _exporting = _SwappableSpanProcessor()
        provider.add_span_processor(_exporting)
        # Other libraries' spans join ours; if something else already set a global provider,
        # ours is still passed explicitly to every instrumentation below.
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider)
        _provider = provider
    return _provider


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Like the SDK's own reading of OTEL_EXPORTER_OTLP_ENDPOINT: a base URL for all signals.
    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    return OTLPSpanExporter(endpoint=url)


def _add_trace_ids(_: Any, __: str, event_dict: EventDict) -> EventDict:
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
    return event_dict


def _instrument_libraries(provider: TracerProvider) -> None:
    """Redis and httpx are patched process-wide, so only once."""
    global _libraries_instrumented
    if _libraries_instrumented:
        return
    RedisInstrumentor().instrument(tracer_provider=provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    _libraries_instrumented = True


def _instrument_engine(provider: TracerProvider, engine: AsyncEngine) -> None:
    # `SQLAlchemyInstrumentor().instrument(engine=…)` works once per process (and patches
    # `create_engine` globally); the engine tracer it builds can be attached to each engine.
    sync_engine = engine.sync_engine
    if sync_engine in _instrumented_engines:
        return
    tracer = provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    connections = (
        NoOpMeterProvider()
        .get_meter("opentelemetry.instrumentation.sqlalchemy")
        .create_up_down_counter("db.client.connections.usage")
    )
    EngineTracer(tracer, sync_engine, connections)  # type: ignore[no-untyped-call]
    trace_driver_statements(engine, tracer)
    _instrumented_engines.add(sync_engine)


def tracing_enabled(app: FastAPI) -> bool:
    """Whether `setup_tracing` turned tracing on for `app`."""
    return bool(getattr(app.state, "tracing_enabled", False))


def setup_tracing(
    app: FastAPI,
    settings: Settings,
    engine: AsyncEngine | None = None,
    *,
    exporter: SpanExporter | None = None,
) -> bool:
    """Turn tracing on for `app` when an OTLP endpoint (or, in tests, an exporter) is given.

    Call it from `create_app` (before the first request: it wraps the middleware stack) and again
    from `lifespan` with the engine; repeated calls only add what is missing. Returns whether
    tracing is on for this app.
    """
    endpoint = settings.otel_exporter_otlp_endpoint
    with _lock:
        if not tracing_enabled(app):
            if exporter is None and not endpoint:
                return False
            provider = _ensure_provider(settings)
            assert _exporting is not None
            if exporter is not None:
                # Tests read their spans as soon as a request returns: export synchronously.
                _exporting.replace(SimpleSpanProcessor(exporter))
            else:
                assert endpoint
                _exporting.replace(BatchSpanProcessor(_otlp_exporter(endpoint)))
            FastAPIInstrumentor.instrument_app(
                app,
                tracer_provider=provider,
                meter_provider=NoOpMeterProvider(),
                excluded_urls=os.environ.get(
                    "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", DEFAULT_EXCLUDED_URLS
                ),
                exclude_spans=["send", "receive"],
            )
            _instrument_libraries(provider)
            add_log_enricher(_add_trace_ids)
            app.state.tracing_enabled = True
        provider = _ensure_provider(settings)
        if engine is not None:
            _instrument_engine(provider, engine)
    return True


def force_flush(timeout_millis: int = 5000) -> bool:
    """Export the spans still buffered (e.g. before a job worker exits); True when done."""
    if _provider is None:
        return True
    return _provider.force_flush(timeout_millis)


def get_tracer() -> trace.Tracer:
    """Helpline's tracer: the SDK's once tracing is set up, a no-op one otherwise."""
    if _provider is not None:
        return _provider.get_tracer(TRACER_NAME, _service_version())
    return trace.get_tracer(TRACER_NAME)


@dataclass
class GenerationRecord:
    """What the generation engine learns while an answer streams; recorded when it ends.

    `outcome` is `complete`, `cancelled` or `failed`; left unset, it is `complete` on a normal
    exit, `cancelled` on task cancellation and `failed` on any other exception.
    """

    span: trace.Span
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token_s: float | None = None
    outcome: str | None = None


@contextmanager
def generation_span(
    *, provider: str, model: str, conversation_id: object, message_id: object
) -> Iterator[GenerationRecord]:
    """A span around one generation (`chat <model>`), with the GenAI attributes set at the end.

    Only the span: the engine updates the `LLM_*` metrics itself.
    """
    if _provider is None and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # No tracing anywhere in the process: a no-op span would still cost each answer its
        # context switching (~15 µs); the record alone does.
        yield GenerationRecord(span=trace.INVALID_SPAN)
        return
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": provider,
        "gen_ai.request.model": model,
        "helpline.conversation_id": str(conversation_id),
        "helpline.message_id": str(message_id),
    }
    with get_tracer().start_as_current_span(
        f"chat {model}" if model else "chat",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        record = GenerationRecord(span=span)
        error: BaseException | None = None
        try:
            yield record
        except BaseException as exc:
            error = exc
            if record.outcome is None:
                # CancelledError and GeneratorExit (a closed stream) are not failures.
                record.outcome = "failed" if isinstance(exc, Exception) else "cancelled"
            raise
        finally:
            _finish_generation(record, error)


def _finish_generation(record: GenerationRecord, error: BaseException | None) -> None:
    span = record.span
    if record.prompt_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", record.prompt_tokens)
    if record.completion_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", record.completion_tokens)
    if record.time_to_first_token_s is not None:
        span.set_attribute("helpline.ttft_ms", round(record.time_to_first_token_s * 1000, 1))
    outcome = record.outcome or "complete"
    span.set_attribute("helpline.outcome", outcome)
    if outcome == "failed":
        if isinstance(error, Exception):
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        else:
            span.set_status(Status(StatusCode.ERROR))


@dataclass
class RetrievalRecord:
    """What a knowledge-base search found; `results` (a count) is recorded when it ends."""

    span: trace.Span
    results: int | None = None


@contextmanager
def retrieval_span(query: str, *, method: str | None = None) -> Iterator[RetrievalRecord]:
    """A span around one knowledge-base search (`retrieval`), beneath the current generation.

    Records the query's length, not its text: questions are customer data, and traces often
    leave the installation.
    """
    attributes: dict[str, str | int] = {"helpline.retrieval.query_chars": len(query)}
    if method:
        attributes["helpline.retrieval.method"] = method
    with get_tracer().start_as_current_span("retrieval", attributes=attributes) as span:
        record = RetrievalRecord(span=span)
        try:
            yield record
        finally:
            if record.results is not None:
                span.set_attribute("helpline.retrieval.results", record.results)


def inject_trace_context() -> dict[str, str]:
    """The current trace context as a small dict to store with an enqueued job."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def linked_span(
    name: str,
    carrier: Mapping[str, str] | None,
    *,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[trace.Span]:
    """A new trace for a job (`name`), linked to the request whose context is in `carrier`.

    A link, not a parent: the job runs later and elsewhere, and may outlive the request.
    """
    links: list[Link] = []
    if carrier:
        origin = trace.get_current_span(propagate.extract(dict(carrier))).get_span_context()
        if origin.is_valid:
            links.append(Link(origin))
    with get_tracer().start_as_current_span(
        name,
        context=otel_context.Context(),
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=dict(attributes or {}),
    ) as span:
        yield span
