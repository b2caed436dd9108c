"""Fixtures of the agents tests: the scriptable model server and provider clients on it.

These tests need no database, so they use none of the database-parametrized fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from helpline.agents.providers.anthropic import AnthropicChatModel
from helpline.agents.providers.openai import OpenAIChatModel
from tests.llm_server import LLMTestServer

NetworkModel = OpenAIChatModel | AnthropicChatModel
ModelFactory = Callable[..., NetworkModel]


@pytest.fixture
def llm_server() -> Iterator[LLMTestServer]:
    with LLMTestServer() as server:
        yield server


@pytest.fixture(params=["openai", "anthropic"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_model(provider: str, llm_server: LLMTestServer) -> AsyncIterator[ModelFactory]:
    """Builds the `provider`'s model against `llm_server`, short timeouts, tiny backoff."""
    built: list[NetworkModel] = []

    def make(**overrides: Any) -> NetworkModel:
        base_url = (
            llm_server.openai_base_url if provider == "openai" else llm_server.anthropic_base_url
        )
        options: dict[str, Any] = {
            "base_url": base_url,
            "api_key": "sk-test-secret-key",
            # Generous: the machine running the tests may be busy; tests of timeouts set theirs.
            "timeout_s": 5.0,
            "connect_timeout_s": 5.0,
            "max_retries": 0,
            "retry_backoff_s": 0.01,
        }
        options.update(overrides)
        model: NetworkModel
        if provider == "openai":
            model = OpenAIChatModel(**options)
        else:
            model = AnthropicChatModel(**options)
        built.append(model)
        return model

    yield make
    for model in built:
        await model.aclose()
