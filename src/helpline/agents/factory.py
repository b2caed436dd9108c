"""The one place that turns `Settings` into the chat model and the answerer the engine runs.

`create_chat_model` builds the provider client (`None` for providers that need no model);
`create_answerer` looks `LLM_PROVIDER` up in `ANSWERER_BUILDERS`: the LangGraph support agent
(`helpline.agents.graph`) for the model providers — or, with `AGENT_ENABLED=false`, the plain
`ChatAnswerer` (the model alone) — and the model-free `extractive` answerer by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from helpline.agents.chat import DEFAULT_HISTORY_TOKEN_BUDGET, ChatAnswerer
from helpline.agents.exceptions import ConfigurationError
from helpline.agents.providers import (
    ANTHROPIC_DEFAULT_MODEL,
    OPENAI_DEFAULT_MODEL,
)
from helpline.agents.providers import fake as fake_provider
from helpline.agents.schemas import Answerer, ChatModel, Escalate, ToolCallingChatModel
from helpline.core.config import Settings

if TYPE_CHECKING:
    from helpline.knowledge.search import KnowledgeBase

AnswererBuilder = Callable[[Settings, ChatModel | None], Answerer]


@dataclass(frozen=True, slots=True)
class AnswererServices:
    """What the application gives answerers beyond the model, built in its lifespan."""

    knowledge: KnowledgeBase
    # Hands a conversation to a person (the conversations service); None where there is none.
    escalate: Escalate | None = None


@dataclass(frozen=True, slots=True)
class WithKnowledge:
    """A builder that also needs the knowledge base: `build(settings, chat_model, services)`.

    Register it in `ANSWERER_BUILDERS` wrapped in this, e.g.
    `ANSWERER_BUILDERS["openai"] = WithKnowledge(build_agent)`.
    """

    build: Callable[[Settings, ChatModel | None, AnswererServices], Answerer]


# The SDKs take seconds to import: a provider's module is loaded only when it is chosen.
DEFAULT_MODELS: dict[str, str] = {
    "openai": OPENAI_DEFAULT_MODEL,
    "anthropic": ANTHROPIC_DEFAULT_MODEL,
    "fake": fake_provider.DEFAULT_MODEL,
}


def model_name(settings: Settings) -> str:
    """`LLM_MODEL`, or the provider's default model when it is empty."""
    return settings.llm_model or DEFAULT_MODELS.get(settings.llm_provider, "")


def create_chat_model(settings: Settings) -> ChatModel | None:
    """The model provider client for `LLM_PROVIDER`, or `None` when it uses no model."""
    provider = settings.llm_provider
    if provider == "openai":
        from helpline.agents.providers import openai as openai_provider

        return openai_provider.OpenAIChatModel(
            model=model_name(settings),
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key,
            timeout_s=settings.llm_timeout_s,
            connect_timeout_s=settings.llm_connect_timeout_s,
            max_retries=settings.llm_max_retries,
            max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature,
        )
    if provider == "anthropic":
        from helpline.agents.providers import anthropic as anthropic_provider

        return anthropic_provider.AnthropicChatModel(
            model=model_name(settings),
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key,
            timeout_s=settings.llm_timeout_s,
            connect_timeout_s=settings.llm_connect_timeout_s,
            max_retries=settings.llm_max_retries,
            max_tokens=settings.llm_max_tokens,
        )
    if provider == "fake":
        return fake_provider.FakeChatModel(model=model_name(settings))
    return None


def build_chat_answerer(settings: Settings, chat_model: ChatModel | None) -> Answerer:
    """The plain chat answerer over the configured model."""
    if chat_model is None:
        raise ConfigurationError(
            f"LLM_PROVIDER={settings.llm_provider} needs a chat model, but none was built"
        )
    return ChatAnswerer(chat_model)


def build_extractive_answerer(
    settings: Settings, chat_model: ChatModel | None, services: AnswererServices
) -> Answerer:
    """The model-free answerer that quotes the knowledge base."""
    del settings, chat_model
    from helpline.agents.extractive import ExtractiveAnswerer

    return ExtractiveAnswerer(services.knowledge)


def build_agent(
    settings: Settings, chat_model: ChatModel | None, services: AnswererServices
) -> Answerer:
    """The LangGraph support agent over the configured model, with its tools.

    With `AGENT_ENABLED=false`, the plain chat answerer instead.
    """
    if chat_model is None:
        raise ConfigurationError(
            f"LLM_PROVIDER={settings.llm_provider} needs a chat model, but none was built"
        )
    if not settings.agent_enabled:
        return build_chat_answerer(settings, chat_model)
    # LangGraph takes seconds to import: only installs that answer with a model pay for it.
    from helpline.agents.graph import SupportAgent, load_agent_prompt

    history_budget = max(DEFAULT_HISTORY_TOKEN_BUDGET, 2 * settings.memory_token_budget)
    # Every provider of `create_chat_model` takes tools; a `ChatModel` is a structural type.
    model = cast(ToolCallingChatModel, chat_model)
    return SupportAgent(
        model,
        services.knowledge,
        escalate=services.escalate,
        prompt_template=load_agent_prompt(settings.agent_prompt_file),
        assistant_name=settings.assistant_name,
        company_name=settings.company_name,
        history_token_budget=history_budget,
    )


ANSWERER_BUILDERS: dict[str, AnswererBuilder | WithKnowledge] = {
    "openai": WithKnowledge(build_agent),
    "anthropic": WithKnowledge(build_agent),
    "fake": WithKnowledge(build_agent),
    "extractive": WithKnowledge(build_extractive_answerer),
}


def create_answerer(
    settings: Settings,
    chat_model: ChatModel | None,
    *,
    knowledge: KnowledgeBase | None = None,
    escalate: Escalate | None = None,
) -> Answerer:
    """The answerer for `LLM_PROVIDER`; `ConfigurationError` when none is registered for it."""
    builder = ANSWERER_BUILDERS.get(settings.llm_provider)
    if builder is None:
        available = ", ".join(sorted(ANSWERER_BUILDERS))
        raise ConfigurationError(
            f"LLM_PROVIDER={settings.llm_provider} is not available in this install; "
            f"available: {available}"
        )
    if isinstance(builder, WithKnowledge):
        if knowledge is None:
            raise ConfigurationError(
                f"LLM_PROVIDER={settings.llm_provider} answers from the knowledge base, "
                "but none was started"
            )
        return builder.build(
            settings, chat_model, AnswererServices(knowledge=knowledge, escalate=escalate)
        )
    return builder(settings, chat_model)
