"""The plain chat answerer: prompt, events, usage, failure and cancellation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from helpline.agents.chat import (
    ChatAnswerer,
    build_messages,
    default_system_prompt,
    estimate_request_tokens,
)
from helpline.agents.exceptions import LLMServiceError
from helpline.agents.providers.fake import FakeChatModel
from helpline.agents.providers.openai import OpenAIChatModel
from helpline.agents.schemas import (
    AnswerEvent,
    AnswerRequest,
    ChatMessage,
    TextDelta,
    Usage,
)
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens
from tests.llm_server import LLMTestServer, Script

HISTORY = (
    ChatMessage(role="user", content="Hi, I have a billing question."),
    ChatMessage(role="assistant", content="Of course, what would you like to know?"),
)


def make_request(question: str, history: Sequence[ChatMessage] = HISTORY) -> AnswerRequest:
    return AnswerRequest(
        conversation_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        assistant_message_id=uuid.uuid4(),
        question=question,
        history=tuple(history),
    )


async def collect(answerer: ChatAnswerer, request: AnswerRequest) -> list[AnswerEvent]:
    return [event async for event in answerer.answer(request)]


class NoUsageModel:
    """A provider that never reports usage (as some OpenAI-compatible servers do)."""

    provider = "test"
    model = "no-usage"

    def __init__(self) -> None:
        self.requests: list[Sequence[ChatMessage]] = []

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[TextDelta | Usage]:
        self.requests.append(messages)
        for piece in ("Plain", " text", " only"):
            yield TextDelta(piece)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def test_the_default_system_prompt_is_a_support_assistant() -> None:
    prompt = default_system_prompt()

    assert "support" in prompt
    assert "human" in prompt
    assert "do not know" in prompt


async def test_sends_system_prompt_history_and_question() -> None:
    model = FakeChatModel()
    answerer = ChatAnswerer(model, "You help customers of Acme.")

    await collect(answerer, make_request("Can I get a refund?"))

    assert list(model.requests[-1]) == [
        ChatMessage(role="system", content="You help customers of Acme."),
        *HISTORY,
        ChatMessage(role="user", content="Can I get a refund?"),
    ]


async def test_uses_the_bundled_prompt_by_default() -> None:
    model = FakeChatModel()

    await collect(ChatAnswerer(model), make_request("Hello?"))

    assert model.requests[-1][0] == ChatMessage(role="system", content=default_system_prompt())


async def test_yields_the_text_then_exactly_one_usage_last() -> None:
    model = FakeChatModel()
    answerer = ChatAnswerer(model, "Be brief.")
    request = make_request('Refund? [[reply="Yes, within 30 days."]]')

    events = await collect(answerer, request)

    texts = [event.text for event in events if isinstance(event, TextDelta)]
    usages = [event for event in events if isinstance(event, Usage)]
    assert "".join(texts) == "Yes, within 30 days."
    assert usages == [events[-1]]
    assert usages[0] == Usage(
        prompt_tokens=answerer.estimate_prompt_tokens(request), completion_tokens=4
    )
    assert answerer.name == "chat"
    assert answerer.model == model.model


async def test_usage_is_estimated_when_the_model_reports_none() -> None:
    model = NoUsageModel()
    answerer = ChatAnswerer(model, "Be brief.")
    request = make_request("Anything?")

    events = await collect(answerer, request)

    assert model.requests == [answerer.build_messages(request)]
    assert events[-1] == Usage(
        prompt_tokens=estimate_prompt_tokens(answerer.build_messages(request)),
        completion_tokens=estimate_tokens("Plain text only"),
        estimated=True,
    )


async def test_a_model_failure_propagates_without_usage() -> None:
    answerer = ChatAnswerer(FakeChatModel(), "Be brief.")
    events: list[AnswerEvent] = []

    async def read() -> None:
        async for event in answerer.answer(make_request("[[tokens=8 fail_after=3]]")):
            events.append(event)

    with pytest.raises(LLMServiceError):
        await read()
    assert len(events) == 3
    assert not any(isinstance(event, Usage) for event in events)


async def test_cancelling_the_answer_stops_the_model_stream() -> None:
    model = FakeChatModel()
    answerer = ChatAnswerer(model, "Be brief.")
    started = asyncio.Event()

    async def read() -> None:
        async for _event in answerer.answer(make_request("[[tokens=100 delay_ms=50]]")):
            started.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(started.wait(), timeout=2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert (model.active_streams, model.cancelled_streams) == (0, 1)


async def test_closing_the_answer_early_closes_the_model_stream() -> None:
    model = FakeChatModel()
    answer = ChatAnswerer(model, "Be brief.").answer(make_request("[[tokens=100]]"))

    await anext(answer)
    await answer.aclose()

    assert (model.active_streams, model.cancelled_streams) == (0, 1)


async def test_cancelling_an_answer_closes_the_provider_connection() -> None:
    with LLMTestServer() as server:
        server.enqueue(Script(chunks=[f" piece{i}" for i in range(500)], delay_s=0.02))
        model = OpenAIChatModel(base_url=server.openai_base_url, max_retries=0)
        answerer = ChatAnswerer(model, "Be brief.")
        started = asyncio.Event()

        async def read() -> None:
            async for _event in answerer.answer(make_request("Tell me everything")):
                started.set()

        task = asyncio.create_task(read())
        try:
            await asyncio.wait_for(started.wait(), timeout=5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await server.async_wait_for_closed_early(1, within_s=3.0)
        finally:
            await model.aclose()


def test_history_is_trimmed_to_the_newest_messages_that_fit() -> None:
    history = [
        ChatMessage(role="user" if i % 2 == 0 else "assistant", content=f"message {i} " * 20)
        for i in range(40)
    ]
    request = make_request("Latest question", history)

    messages = build_messages(request, "System.", history_token_budget=200)

    kept = messages[1:-1]
    assert messages[0] == ChatMessage(role="system", content="System.")
    assert messages[-1] == ChatMessage(role="user", content="Latest question")
    assert 0 < len(kept) < len(history)
    assert kept == history[-len(kept) :]
    assert sum(4 + estimate_tokens(m.content) for m in kept) <= 200


def test_request_estimate_matches_what_the_answerer_sends() -> None:
    answerer = ChatAnswerer(FakeChatModel(), "You help customers of Acme.")
    request = make_request("How do I export my data?")

    expected = estimate_prompt_tokens(answerer.build_messages(request))
    assert answerer.estimate_prompt_tokens(request) == expected
    assert estimate_request_tokens(request, "You help customers of Acme.") == expected
    assert expected > estimate_tokens("How do I export my data?")
