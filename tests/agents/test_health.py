"""The `llm` component of `/health`."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.requests import Request

from helpline.agents.health import check_llm
from helpline.agents.providers.fake import FakeChatModel
from helpline.agents.providers.openai import OpenAIChatModel
from helpline.agents.schemas import ChatModel
from tests.llm_server import LLMTestServer
from tests.servers import free_port


def request_for(chat_model: ChatModel | None) -> Request:
    app = FastAPI()
    app.state.chat_model = chat_model
    return Request({"type": "http", "app": app, "method": "GET", "path": "/health"})


async def test_disabled_without_a_chat_model() -> None:
    health = await check_llm(request_for(None))

    assert health.status == "disabled"


async def test_healthy_with_latency_when_the_provider_answers() -> None:
    health = await check_llm(request_for(FakeChatModel()))

    assert health.status == "healthy"
    assert health.latency_ms is not None
    assert health.latency_ms >= 0


async def test_healthy_when_the_server_lists_its_models(llm_server: LLMTestServer) -> None:
    model = OpenAIChatModel(base_url=llm_server.openai_base_url)
    try:
        health = await check_llm(request_for(model))
    finally:
        await model.aclose()

    assert health.status == "healthy"
    assert [r.path for r in llm_server.requests] == ["/v1/models"]


async def test_degraded_when_the_server_fails(llm_server: LLMTestServer) -> None:
    llm_server.models_status = 500
    model = OpenAIChatModel(base_url=llm_server.openai_base_url)
    try:
        health = await check_llm(request_for(model))
    finally:
        await model.aclose()

    assert (health.status, health.error) == ("degraded", "The AI model failed (HTTP 500)")


async def test_degraded_when_the_server_is_unreachable() -> None:
    model = OpenAIChatModel(base_url=f"http://127.0.0.1:{free_port()}/v1")
    try:
        health = await check_llm(request_for(model))
    finally:
        await model.aclose()

    assert (health.status, health.error) == ("degraded", "The AI model could not be reached")
