"""Offline token estimates (no tokenizer download)."""

from __future__ import annotations

import pytest

from helpline.agents.schemas import ChatMessage
from helpline.agents.tokens import (
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REPLY,
    estimate_fixed_tokens,
    estimate_prompt_tokens,
    estimate_tokens,
)

# Token counts of OpenAI's cl100k_base tokenizer for these texts.
KNOWN = [
    ("Hello, world!", 4),
    ("The quick brown fox jumps over the lazy dog.", 10),
    (
        "To reset your password, open Settings, choose Security and follow the link we "
        "email you. The link expires after 30 minutes.",
        25,
    ),
]


def test_empty_text_is_no_tokens() -> None:
    assert estimate_tokens("") == 0


def test_any_text_is_at_least_one_token() -> None:
    assert estimate_tokens("a") == 1
    assert estimate_tokens(" ") == 1


@pytest.mark.parametrize(("text", "actual"), KNOWN)
def test_estimates_are_close_to_a_real_tokenizer(text: str, actual: int) -> None:
    assert actual * 0.7 <= estimate_tokens(text) <= actual * 1.4


def test_longer_text_is_more_tokens() -> None:
    sentence = "Our support team answers within one business day. "
    assert (
        estimate_tokens(sentence * 10) > estimate_tokens(sentence * 5) > estimate_tokens(sentence)
    )
    # Linear: ten times the text is about ten times the tokens.
    assert estimate_tokens(sentence * 10) == pytest.approx(10 * estimate_tokens(sentence), rel=0.1)


def test_unspaced_scripts_count_per_character() -> None:
    # 12 CJK characters: BPE tokenizers spend roughly one token on each.
    assert 10 <= estimate_tokens("我想重置我的密码请帮我一下") <= 20


def test_prompt_counts_every_message_with_its_overhead() -> None:
    messages = [
        ChatMessage(role="system", content="You are a support assistant."),
        ChatMessage(role="user", content="Where is my invoice?"),
    ]

    expected = TOKENS_PER_REPLY + sum(
        TOKENS_PER_MESSAGE + estimate_tokens(m.content) for m in messages
    )
    assert estimate_prompt_tokens(messages) == expected
    assert estimate_prompt_tokens([]) == TOKENS_PER_REPLY


def test_a_message_counted_already_is_not_estimated_again() -> None:
    text = "Where is my invoice?"
    counted = ChatMessage(role="user", content=text, token_count=42)
    assert estimate_prompt_tokens([counted]) == TOKENS_PER_REPLY + TOKENS_PER_MESSAGE + 42
    # The count is what the message knows of itself, not part of what it says.
    assert counted == ChatMessage(role="user", content=text)


def test_a_fixed_text_is_estimated_as_any_other() -> None:
    prompt = "You are the support assistant of Acme. " * 40
    assert estimate_fixed_tokens(prompt) == estimate_tokens(prompt)
    assert estimate_fixed_tokens(prompt) == estimate_fixed_tokens(prompt)
