"""What an answer records: LLM metrics and the generation span (SPEC.md: Operations)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helpline.core import metrics, telemetry
from helpline.core.config import Settings
from helpline.main import create_app
from tests.conftest import _empty_tables
from tests.factories import bearer, create_user, login

MODEL = "fake-1"


@pytest.fixture
async def traced(
    settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    application = create_app(settings)
    assert telemetry.setup_tracing(application, settings, exporter=exporter)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                async with application.state.sessionmaker() as session:
                    user = await create_user(session)
                http.headers.update(bearer((await login(http, user.username))["access_token"]))
                yield http, exporter
        finally:
            await _empty_tables(application)


async def _ask(http: httpx.AsyncClient, content: str) -> httpx.Response:
    conversation_id = (await http.post("/conversations", json={})).json()["id"]
    return await http.post(f"/conversations/{conversation_id}/messages", json={"content": content})


def _value(name: str, **labels: str) -> float:
    return metrics.sample_value(name, labels)


async def test_a_complete_answer_moves_the_llm_metrics(
    traced: tuple[httpx.AsyncClient, InMemorySpanExporter],
) -> None:
    http, _ = traced
    completion_before = _value("helpline_llm_tokens_total", model=MODEL, kind="completion")
    ttft_before = _value("helpline_llm_time_to_first_token_seconds_count", model=MODEL)
    duration_before = _value(
        "helpline_llm_request_duration_seconds_count", model=MODEL, outcome="complete"
    )
    response = await _ask(http, "hello [[tokens=7]]")
    assert response.status_code == 201
    assert _value("helpline_llm_tokens_total", model=MODEL, kind="completion") == (
        completion_before + 7
    )
    assert _value("helpline_llm_time_to_first_token_seconds_count", model=MODEL) == ttft_before + 1
    assert (
        _value("helpline_llm_request_duration_seconds_count", model=MODEL, outcome="complete")
        == duration_before + 1
    )


async def test_a_failed_answer_counts_an_error_by_type(
    traced: tuple[httpx.AsyncClient, InMemorySpanExporter],
) -> None:
    http, _ = traced
    before = _value("helpline_llm_errors_total", model=MODEL, type="LLM_SERVICE_ERROR")
    response = await _ask(http, "hello [[tokens=5 fail_after=2]]")
    assert response.status_code == 503
    assert _value("helpline_llm_errors_total", model=MODEL, type="LLM_SERVICE_ERROR") == before + 1


async def test_a_cancelled_answer_counts_a_cancellation(
    traced: tuple[httpx.AsyncClient, InMemorySpanExporter],
) -> None:
    http, _ = traced
    before = _value("helpline_llm_cancellations_total", model=MODEL)
    conversation_id = (await http.post("/conversations", json={})).json()["id"]
    send = asyncio.create_task(
        http.post(
            f"/conversations/{conversation_id}/messages",
            json={"content": "long [[tokens=400 delay_ms=10]]"},
        )
    )
    for _ in range(200):
        if (await http.post(f"/conversations/{conversation_id}/cancel")).status_code == 202:
            break
        await asyncio.sleep(0.02)
    sent = await send
    assert sent.json()["assistant_message"]["status"] == "cancelled", sent.text
    assert _value("helpline_llm_cancellations_total", model=MODEL) == before + 1


async def test_the_generation_span_records_model_usage_and_outcome(
    traced: tuple[httpx.AsyncClient, InMemorySpanExporter],
) -> None:
    http, exporter = traced
    response = await _ask(http, "hello [[tokens=4]]")
    answer = response.json()["assistant_message"]
    spans = [span for span in exporter.get_finished_spans() if span.name == f"chat {MODEL}"]
    assert len(spans) == 1
    attributes = dict(spans[0].attributes or {})
    assert attributes["gen_ai.system"] == "fake"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["helpline.message_id"] == answer["id"]
    assert attributes["gen_ai.usage.output_tokens"] == 4
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["helpline.outcome"] == "complete"
    assert attributes["helpline.ttft_ms"] >= 0
