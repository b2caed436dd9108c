"""Building the chat model and the answerer from `Settings`."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from helpline.agents import factory
from helpline.agents.chat import ChatAnswerer
from helpline.agents.exceptions import ConfigurationError
from helpline.agents.graph import SupportAgent
from helpline.agents.providers.anthropic import AnthropicChatModel
from helpline.agents.providers.fake import FakeChatModel
from helpline.agents.providers.openai import OpenAIChatModel
from helpline.agents.schemas import Answerer, AnswerRequest, ChatModel, TextDelta, Usage
from helpline.core.config import Settings
from helpline.knowledge.embeddings import NoEmbeddings
from helpline.knowledge.search import KnowledgeBase


def make_settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("provider", "model_class", "default_model"),
    [
        ("openai", OpenAIChatModel, "gpt-4.1-mini"),
        ("anthropic", AnthropicChatModel, "claude-haiku-4-5"),
        ("fake", FakeChatModel, "fake-1"),
    ],
)
async def test_builds_the_provider_with_its_default_model(
    provider: str, model_class: type, default_model: str
) -> None:
    model = factory.create_chat_model(make_settings(llm_provider=provider))

    assert model is not None
    assert isinstance(model, model_class)
    assert (model.provider, model.model) == (provider, default_model)
    await model.aclose()


async def test_passes_the_llm_settings_to_the_provider() -> None:
    settings = make_settings(
        llm_provider="openai",
        llm_model="llama3.1:8b",
        llm_base_url="http://127.0.0.1:11434/v1",
        llm_max_tokens=256,
        llm_temperature=0.7,
    )

    model = factory.create_chat_model(settings)

    assert isinstance(model, OpenAIChatModel)
    assert (model.model, model.max_tokens, model.temperature) == ("llama3.1:8b", 256, 0.7)
    await model.aclose()


def test_extractive_uses_no_chat_model() -> None:
    assert factory.create_chat_model(make_settings(llm_provider="extractive")) is None


def knowledge_base() -> KnowledgeBase:
    """A knowledge base nobody searches: building an answerer touches no database."""
    return KnowledgeBase(async_sessionmaker(), NoEmbeddings())


async def escalate(conversation_id: uuid.UUID, user_id: uuid.UUID, reason: str) -> None:
    del conversation_id, user_id, reason


@pytest.mark.parametrize("provider", ["openai", "anthropic", "fake"])
async def test_model_providers_answer_with_the_support_agent(provider: str) -> None:
    settings = make_settings(llm_provider=provider)
    model = factory.create_chat_model(settings)
    knowledge = knowledge_base()

    answerer = factory.create_answerer(settings, model, knowledge=knowledge, escalate=escalate)

    assert isinstance(answerer, SupportAgent)
    assert answerer.chat_model is model
    assert answerer.knowledge is knowledge
    assert answerer.model == factory.model_name(settings)
    assert [tool.spec.name for tool in answerer.tools] == [
        "search_knowledge_base",
        "escalate_to_human",
    ]
    assert model is not None
    await model.aclose()


async def test_the_agent_offers_no_escalation_without_a_way_to_hand_over() -> None:
    settings = make_settings(llm_provider="fake")

    answerer = factory.create_answerer(
        settings, factory.create_chat_model(settings), knowledge=knowledge_base()
    )

    assert isinstance(answerer, SupportAgent)
    assert [tool.spec.name for tool in answerer.tools] == ["search_knowledge_base"]


def test_the_agent_needs_the_knowledge_base() -> None:
    settings = make_settings(llm_provider="fake")

    with pytest.raises(ConfigurationError, match="knowledge base"):
        factory.create_answerer(settings, factory.create_chat_model(settings))


@pytest.mark.parametrize("provider", ["openai", "fake"])
async def test_without_the_agent_the_model_answers_alone(provider: str) -> None:
    settings = make_settings(llm_provider=provider, agent_enabled=False)
    model = factory.create_chat_model(settings)

    answerer = factory.create_answerer(settings, model, knowledge=knowledge_base())

    assert isinstance(answerer, ChatAnswerer)
    assert answerer.chat_model is model
    assert answerer.model == factory.model_name(settings)
    assert model is not None
    await model.aclose()


async def test_the_plain_answerer_streams_the_model_text() -> None:
    settings = make_settings(llm_provider="fake", agent_enabled=False)
    answerer = factory.create_answerer(
        settings, factory.create_chat_model(settings), knowledge=knowledge_base()
    )
    request = AnswerRequest(
        conversation_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        assistant_message_id=uuid.uuid4(),
        question="Hello there [[tokens=3]]",
    )

    events = [event async for event in answerer.answer(request)]

    texts = [event.text for event in events if isinstance(event, TextDelta)]
    assert len(texts) == 3
    assert isinstance(events[-1], Usage)


def test_the_chat_answerer_stays_available() -> None:
    model = FakeChatModel()

    answerer = factory.build_chat_answerer(make_settings(llm_provider="fake"), model)

    assert isinstance(answerer, ChatAnswerer)
    assert answerer.chat_model is model


def test_an_unregistered_provider_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(factory.ANSWERER_BUILDERS, "extractive")
    settings = make_settings(llm_provider="extractive")

    with pytest.raises(ConfigurationError, match="extractive") as caught:
        factory.create_answerer(settings, None)

    assert "anthropic, fake, openai" in str(caught.value)


def test_an_answerer_over_a_model_needs_one() -> None:
    with pytest.raises(ConfigurationError, match="needs a chat model"):
        factory.create_answerer(
            make_settings(llm_provider="fake"), None, knowledge=knowledge_base()
        )
    with pytest.raises(ConfigurationError, match="needs a chat model"):
        factory.build_chat_answerer(make_settings(llm_provider="fake"), None)


def test_a_registered_builder_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[Settings, ChatModel | None]] = []
    answerer = ChatAnswerer(FakeChatModel(), "Registered.")

    def build(settings: Settings, chat_model: ChatModel | None) -> Answerer:
        built.append((settings, chat_model))
        return answerer

    monkeypatch.setitem(factory.ANSWERER_BUILDERS, "extractive", build)
    settings = make_settings(llm_provider="extractive")

    assert factory.create_answerer(settings, None) is answerer
    assert built == [(settings, None)]
