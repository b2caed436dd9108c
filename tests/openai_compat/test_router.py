"""`/v1` through an unmodified OpenAI SDK (SPEC.md: OpenAI-compatible API)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from helpline.core.config import Settings
from tests.factories import bearer, create_user, login, open_session
from tests.servers import LiveServer


@pytest.fixture
async def sdk(live_server: LiveServer, settings: Settings) -> AsyncIterator[openai.AsyncOpenAI]:
    async with open_session(settings) as session:
        user = await create_user(session)
    async with httpx.AsyncClient(base_url=live_server.http_url) as http:
        token = str((await login(http, user.username))["access_token"])
    client = openai.AsyncOpenAI(base_url=f"{live_server.http_url}/v1", api_key=token, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


async def test_models_lists_the_support_agent(sdk: openai.AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert [model.id for model in models.data] == ["helpline"]


async def test_completion_answers_the_last_user_message(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="helpline",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": 'Hi [[reply="Hello from Helpline."]]'},
        ],
    )
    assert completion.choices[0].message.content == "Hello from Helpline."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_the_exchange_is_kept_as_a_conversation(
    sdk: openai.AsyncOpenAI, live_server: LiveServer
) -> None:
    await sdk.chat.completions.create(
        model="helpline",
        messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "second"},
            {"role": "user", "content": "third [[tokens=3]]"},
        ],
    )
    async with httpx.AsyncClient(base_url=live_server.http_url) as http:
        headers = bearer(sdk.api_key)
        conversation = (await http.get("/conversations", headers=headers)).json()["items"][0]
        messages = (
            await http.get(f"/conversations/{conversation['id']}/messages", headers=headers)
        ).json()["items"]
    assert [(m["role"], m["content"]) for m in messages[:3]] == [
        ("user", "first"),
        ("assistant", "second"),
        ("user", "third [[tokens=3]]"),
    ]
    assert messages[3]["role"] == "assistant"
    assert messages[3]["status"] == "complete"


async def test_streaming_sends_chunks_then_finish_reason(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="helpline",
        messages=[{"role": "user", "content": 'Hi [[reply="One two three."]]'}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish_reasons: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert "".join(pieces) == "One two three."
    assert finish_reasons == ["stop"]
    assert usage is not None
    assert usage.completion_tokens == 3


async def test_unknown_model_is_not_found_with_openai_fields(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(
            model="gpt-nonexistent", messages=[{"role": "user", "content": "hi"}]
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"


async def test_bad_key_is_an_authentication_error(live_server: LiveServer) -> None:
    client = openai.AsyncOpenAI(
        base_url=f"{live_server.http_url}/v1", api_key="hl_not-a-key", max_retries=0
    )
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
    finally:
        await client.close()
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "authentication_error"


async def test_a_request_without_a_user_message_is_refused(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model="helpline", messages=[{"role": "assistant", "content": "hello"}]
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "messages"


async def test_malformed_request_names_the_field(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await sdk.chat.completions.create(model="helpline", messages=[])
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "VALIDATION_ERROR"
    assert error["param"] == "messages"


async def test_a_message_with_a_nul_character_is_refused(sdk: openai.AsyncOpenAI) -> None:
    """Refused with the field named, rather than failing at the database (PostgreSQL's text
    cannot hold U+0000)."""
    for content in ("a NUL \u0000 in it", [{"type": "text", "text": "a NUL \u0000 in it"}]):
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            await sdk.chat.completions.create(
                model="helpline",
                messages=[{"role": "user", "content": content}],  # type: ignore[misc,list-item]
            )
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["code"] == "VALIDATION_ERROR"
        assert str(error["param"]).startswith("messages")


async def test_a_model_failure_mid_stream_raises_in_the_sdk(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="helpline",
        messages=[{"role": "user", "content": "x [[tokens=5 fail_after=2]]"}],
        stream=True,
    )
    pieces: list[str] = []

    async def read_all() -> None:
        async for chunk in stream:
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)

    with pytest.raises(openai.APIError):
        await read_all()
    assert "".join(pieces)
