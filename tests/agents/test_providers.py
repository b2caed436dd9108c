"""The `openai` and `anthropic` providers against a real HTTP model server on 127.0.0.1.

Every behaviour runs for both providers (the `provider` fixture): streamed text, usage,
retries only before the first token, every failure mapped to `LLMServiceError`,
cancellation closing the upstream connection, observed from the server's side, and tool
calling (tools offered, calls streamed back, calls and results sent again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from helpline.agents.exceptions import LLMServiceError
from helpline.agents.providers.anthropic import AnthropicChatModel
from helpline.agents.providers.openai import OpenAIChatModel
from helpline.agents.schemas import ChatMessage, TextDelta, ToolCall, ToolSpec, Usage
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens
from tests.agents.conftest import ModelFactory
from tests.llm_server import LLMTestServer, Script, ScriptedToolCall
from tests.realtime.helpers import eventually
from tests.servers import free_port

MESSAGES = (
    ChatMessage(role="system", content="You are a helpful support assistant."),
    ChatMessage(role="user", content="How do I reset my password?"),
)
LONG = Script(chunks=[f" word{i}" for i in range(500)], delay_s=0.02)  # 10 s or more


async def collect(stream: AsyncIterator[TextDelta | Usage]) -> tuple[list[str], list[Usage]]:
    texts: list[str] = []
    usages: list[Usage] = []
    async for event in stream:
        if isinstance(event, TextDelta):
            texts.append(event.text)
        else:
            usages.append(event)
    return texts, usages


async def collect_events(
    stream: AsyncIterator[TextDelta | ToolCall | Usage],
) -> list[TextDelta | ToolCall | Usage]:
    return [event async for event in stream]


async def collect_until_failure(
    stream: AsyncIterator[TextDelta | Usage],
) -> tuple[list[str], LLMServiceError]:
    texts: list[str] = []

    async def read() -> None:
        async for event in stream:
            if isinstance(event, TextDelta):
                texts.append(event.text)

    with pytest.raises(LLMServiceError) as caught:
        await read()
    return texts, caught.value


async def test_streamed_text_equals_the_chunks(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    script = Script(chunks=["To reset", " it, open", " Settings", " → Security."])
    llm_server.enqueue(script)

    texts, usages = await collect(make_model().stream(MESSAGES))

    assert texts == list(script.chunks)
    assert "".join(texts) == script.text
    assert len(usages) == 1


async def test_usage_comes_from_the_provider(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(Script(chunks=["Yes", "."], prompt_tokens=321, completion_tokens=12))

    _, usages = await collect(make_model().stream(MESSAGES))

    assert usages == [Usage(prompt_tokens=321, completion_tokens=12, estimated=False)]


async def test_usage_is_estimated_when_the_provider_reports_none(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    script = Script(chunks=["Open", " Settings", " and", " choose", " Reset."], usage=False)
    llm_server.enqueue(script)

    _, usages = await collect(make_model().stream(MESSAGES))

    assert usages == [
        Usage(
            prompt_tokens=estimate_prompt_tokens(MESSAGES),
            completion_tokens=estimate_tokens(script.text),
            estimated=True,
        )
    ]


async def test_retries_before_the_first_token_then_succeeds(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(
        Script(status=500),  # a server error
        Script(drop_after=0),  # the connection dropped before any text
        Script(chunks=["Third", " time", " lucky"]),
    )

    texts, usages = await collect(make_model(max_retries=2).stream(MESSAGES))

    assert "".join(texts) == "Third time lucky"
    assert len(usages) == 1
    assert len(llm_server.completion_requests) == 3


async def test_a_hang_before_the_headers_is_retried(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(Script(hang_before_headers=True), Script(chunks=["Back", " again"]))

    texts, _ = await collect(make_model(max_retries=1, timeout_s=1.0).stream(MESSAGES))

    assert "".join(texts) == "Back again"
    # The server notes a request complete just after its last chunk went out.
    await eventually(
        lambda: [r.outcome for r in llm_server.completion_requests] == ["closed_early", "complete"]
    )


async def test_retries_are_bounded(make_model: ModelFactory, llm_server: LLMTestServer) -> None:
    llm_server.enqueue(*[Script(status=503)] * 5)

    _, error = await collect_until_failure(make_model(max_retries=2).stream(MESSAGES))

    assert error.message == "The AI model failed (HTTP 503)"
    assert len(llm_server.completion_requests) == 3  # the first attempt and two retries


async def test_no_retry_after_the_first_token(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(
        Script(chunks=["Half", " an", " answer", " and", " more"], drop_after=3),
        Script(chunks=["A", " different", " answer"]),
    )

    texts, error = await collect_until_failure(make_model(max_retries=3).stream(MESSAGES))

    assert texts == ["Half", " an", " answer"]
    assert error.code == "LLM_SERVICE_ERROR"
    assert len(llm_server.completion_requests) == 1


async def test_http_500_is_an_llm_service_error(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(Script(status=500, error_message="internal: stack trace here"))

    texts, error = await collect_until_failure(make_model().stream(MESSAGES))

    assert texts == []
    assert error.status_code == 503
    assert error.code == "LLM_SERVICE_ERROR"
    assert error.message == "The AI model failed (HTTP 500)"
    assert "stack trace" not in error.message


async def test_refused_credentials_are_not_retried_and_not_echoed(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(
        Script(status=401, error_message="Incorrect API key provided: sk-test-secret-key")
    )

    _, error = await collect_until_failure(make_model(max_retries=2).stream(MESSAGES))

    assert error.message == "The AI model refused the credentials (HTTP 401)"
    assert "sk-test" not in str(error)
    assert len(llm_server.completion_requests) == 1


async def test_a_hang_mid_stream_fails_after_the_read_timeout(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(Script(chunks=["One", " two", " three"], hang_after=2))
    started = time.monotonic()

    texts, error = await collect_until_failure(
        make_model(timeout_s=1.0, max_retries=2).stream(MESSAGES)
    )

    elapsed = time.monotonic() - started
    assert texts == ["One", " two"]
    assert error.message == "The AI model did not respond within 1 s"
    assert 0.9 < elapsed < 6.0
    assert len(llm_server.completion_requests) == 1  # text was out: no retry


async def test_a_connection_dropped_mid_stream_fails(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(Script(chunks=["One", " two", " three", " four"], drop_after=2))

    texts, error = await collect_until_failure(make_model().stream(MESSAGES))

    assert texts == ["One", " two"]
    assert error.message == "The connection to the AI model broke off mid-answer"


async def test_a_stream_that_ends_unfinished_fails(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(Script(chunks=["One", " two", " three"], truncate_after=2))

    texts, error = await collect_until_failure(make_model().stream(MESSAGES))

    assert texts == ["One", " two"]
    assert error.message == "The AI model's answer broke off before it finished"


async def test_an_error_event_mid_stream_fails(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(Script(chunks=["One", " two", " three"], error_after=1))

    texts, error = await collect_until_failure(make_model().stream(MESSAGES))

    assert texts == ["One"]
    assert error.message == "The AI model reported an error mid-answer"


async def test_an_unreachable_server_fails_after_the_retries(make_model: ModelFactory) -> None:
    model = make_model(base_url=f"http://127.0.0.1:{free_port()}", max_retries=1)

    texts, error = await collect_until_failure(model.stream(MESSAGES))

    assert texts == []
    assert error.message == "The AI model could not be reached"


async def test_cancellation_closes_the_upstream_connection(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(LONG)
    model = make_model()
    received: list[str] = []
    two_pieces = asyncio.Event()

    async def consume() -> None:
        async for event in model.stream(MESSAGES):
            if isinstance(event, TextDelta):
                received.append(event.text)
                if len(received) == 2:
                    two_pieces.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two_pieces.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # The script would stream for 10 s more; the server sees the client leave at once.
    assert await llm_server.async_wait_for_closed_early(1, within_s=3.0)
    [request] = llm_server.completion_requests
    assert request.outcome == "closed_early"


async def test_cancellation_before_the_headers_closes_the_connection(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(Script(hang_before_headers=True))
    task = asyncio.create_task(collect(make_model(timeout_s=30).stream(MESSAGES)))
    assert await llm_server.async_wait_for_requests(1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await llm_server.async_wait_for_closed_early(1, within_s=3.0)


async def test_closing_the_stream_early_closes_the_upstream_connection(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(LONG)
    stream = make_model().stream(MESSAGES)

    first = await anext(stream)
    await stream.aclose()

    assert first == TextDelta(" word0")
    assert await llm_server.async_wait_for_closed_early(1, within_s=3.0)


async def test_a_completed_stream_leaves_the_connection_for_reuse(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    model = make_model()

    await collect(model.stream(MESSAGES))
    await collect(model.stream(MESSAGES))

    # The server notes a request complete just after its last chunk went out.
    await eventually(
        lambda: [r.outcome for r in llm_server.completion_requests] == ["complete", "complete"]
    )
    assert llm_server.closed_early == []


async def test_check_lists_the_models(make_model: ModelFactory, llm_server: LLMTestServer) -> None:
    await make_model().check()

    [request] = llm_server.requests
    assert (request.method, request.path) == ("GET", "/v1/models")


async def test_check_fails_when_the_server_errs(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.models_status = 500

    with pytest.raises(LLMServiceError, match=r"HTTP 500"):
        await make_model().check()


async def test_check_fails_when_the_server_hangs(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.models_delay_s = 5.0
    started = time.monotonic()

    with pytest.raises(LLMServiceError, match=r"did not respond within 0\.5 s"):
        await make_model(check_timeout_s=0.5).check()

    assert time.monotonic() - started < 4.0


async def test_openai_request_carries_the_settings(llm_server: LLMTestServer) -> None:
    model = OpenAIChatModel(
        model="llama3.1:8b",
        base_url=llm_server.openai_base_url,
        api_key="sk-local",
        max_tokens=300,
        temperature=0.4,
    )
    try:
        await collect(model.stream(MESSAGES))
    finally:
        await model.aclose()

    [request] = llm_server.completion_requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-local"
    assert request.body["model"] == "llama3.1:8b"
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert (request.body["max_tokens"], request.body["temperature"]) == (300, 0.4)
    assert request.body["messages"] == [
        {"role": "system", "content": "You are a helpful support assistant."},
        {"role": "user", "content": "How do I reset my password?"},
    ]


def test_openai_itself_gets_max_completion_tokens() -> None:
    assert OpenAIChatModel().uses_max_completion_tokens
    assert OpenAIChatModel(base_url="https://api.openai.com/v1").uses_max_completion_tokens
    assert not OpenAIChatModel(base_url="http://127.0.0.1:11434/v1").uses_max_completion_tokens


async def test_anthropic_request_separates_the_system_prompt(llm_server: LLMTestServer) -> None:
    model = AnthropicChatModel(
        model="claude-sonnet-4-6", base_url=llm_server.anthropic_base_url, max_tokens=300
    )
    messages = [
        ChatMessage(role="system", content="Be kind."),
        ChatMessage(role="user", content="First."),
        ChatMessage(role="user", content="Second."),
        ChatMessage(role="assistant", content="Hello."),
        ChatMessage(role="user", content="Question?"),
    ]
    try:
        await collect(model.stream(messages))
    finally:
        await model.aclose()

    [request] = llm_server.completion_requests
    assert request.path == "/v1/messages"
    assert request.body["system"] == "Be kind."
    assert request.body["messages"] == [
        {"role": "user", "content": "First.\n\nSecond."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Question?"},
    ]
    assert (request.body["model"], request.body["max_tokens"]) == ("claude-sonnet-4-6", 300)
    assert request.body["stream"] is True
    assert "temperature" not in request.body  # refused by the API version the SDK speaks


# -- tool calling ------------------------------------------------------------------------------

SEARCH = ToolSpec(
    name="search_knowledge_base",
    description="Search the help centre.",
    parameters={
        "type": "object",
        "properties": {"query": {"type": "string"}},
        "required": ["query"],
    },
)
ESCALATE = ToolSpec(
    name="escalate_to_human",
    description="Hand the conversation to a person.",
    parameters={
        "type": "object",
        "properties": {"reason": {"type": "string"}},
        "required": ["reason"],
    },
)
TOOL_SCRIPT = Script(
    chunks=["Let me", " check."],
    tool_calls=[
        ScriptedToolCall("call_a", "search_knowledge_base", ['{"que', 'ry": "refund', ' window"}']),
        ScriptedToolCall("call_b", "escalate_to_human", ['{"reason": "asks for a person"}']),
    ],
    prompt_tokens=40,
    completion_tokens=9,
)


async def test_tool_calls_come_whole_after_the_text(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(TOOL_SCRIPT)

    events = [event async for event in make_model().stream(MESSAGES, tools=[SEARCH, ESCALATE])]

    assert events == [
        TextDelta("Let me"),
        TextDelta(" check."),
        ToolCall("call_a", "search_knowledge_base", '{"query": "refund window"}'),
        ToolCall("call_b", "escalate_to_human", '{"reason": "asks for a person"}'),
        Usage(prompt_tokens=40, completion_tokens=9),
    ]


async def test_estimated_usage_counts_the_tool_calls(
    make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    llm_server.enqueue(replace(TOOL_SCRIPT, usage=False))

    events = [event async for event in make_model().stream(MESSAGES, tools=[SEARCH, ESCALATE])]

    calls = [event for event in events if isinstance(event, ToolCall)]
    assert events[-1] == Usage(
        prompt_tokens=estimate_prompt_tokens(MESSAGES),
        completion_tokens=estimate_tokens("Let me check.")
        + sum(estimate_tokens(call.name + call.arguments) for call in calls),
        estimated=True,
    )


async def test_tools_are_offered_in_the_provider_format(
    provider: str, make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    await collect_events(make_model().stream(MESSAGES, tools=[SEARCH]))
    await collect_events(make_model().stream(MESSAGES))

    offered, plain = llm_server.completion_requests
    if provider == "openai":
        assert offered.body["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "search_knowledge_base",
                    "description": "Search the help centre.",
                    "parameters": dict(SEARCH.parameters),
                },
            }
        ]
    else:
        assert offered.body["tools"] == [
            {
                "name": "search_knowledge_base",
                "description": "Search the help centre.",
                "input_schema": dict(SEARCH.parameters),
            }
        ]
    assert "tools" not in plain.body


async def test_tool_calls_and_results_go_back_in_the_provider_format(
    provider: str, make_model: ModelFactory, llm_server: LLMTestServer
) -> None:
    messages = [
        *MESSAGES,
        ChatMessage(
            role="assistant",
            content="Let me check.",
            tool_calls=(ToolCall("call_a", "search_knowledge_base", '{"query": "reset"}'),),
        ),
        ChatMessage(role="tool", content="[1] Reset your password ...", tool_call_id="call_a"),
    ]

    await collect_events(make_model().stream(messages, tools=[SEARCH]))

    [request] = llm_server.completion_requests
    if provider == "openai":
        assert request.body["messages"][2:] == [
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {
                            "name": "search_knowledge_base",
                            "arguments": '{"query": "reset"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "[1] Reset your password ..."},
        ]
    else:
        assert request.body["messages"][1:] == [
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "call_a",
                        "name": "search_knowledge_base",
                        "input": {"query": "reset"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_a",
                        "content": "[1] Reset your password ...",
                    }
                ],
            },
        ]
