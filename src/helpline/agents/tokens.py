"""Offline token estimates, for when a provider reports no usage.

OpenAI sends no usage for a stream that was interrupted, some OpenAI-compatible servers never
send it, and a cancelled answer has none either; accounting still needs a figure. A real
tokenizer would need its vocabulary files (`tiktoken` downloads them on first use, which a
self-hosted install without internet cannot do), and each provider tokenizes differently anyway.
So this is a small heuristic, good to roughly ±20 % on English prose with the BPE tokenizers of
GPT, Claude and Llama models:

- about 4 characters per token for running text, and
- about 0.75 words per token (1.33 tokens per word, punctuation included),

averaged, since the character rule under-counts text full of short words, numbers and
punctuation while the word rule under-counts long words, identifiers and URLs. Text that is not
split by spaces (Chinese, Japanese, Thai) is counted per character instead, where BPE
tokenizers spend roughly one token per character.

A chat prompt adds a few tokens per message for the role and the separators, and a few to
prime the reply (OpenAI's published counting recipe: 3 per message, 1 for the role, 3 for the
reply).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable

from helpline.agents.schemas import ChatMessage

CHARS_PER_TOKEN = 4.0
TOKENS_PER_WORD = 4.0 / 3.0
TOKENS_PER_MESSAGE = 4  # separators around a message, and its role
TOKENS_PER_REPLY = 3  # the reply's priming (`<|start|>assistant<|message|>`)

_WORD = re.compile(r"\w+")
# Scripts written without spaces between words; a tokenizer spends about one token per character.
_UNSPACED = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\u0e00-\u0e7f\uf900-\ufaff]"
)


def estimate_tokens(text: str) -> int:
    """Estimate how many tokens `text` is (0 for an empty string, at least 1 otherwise)."""
    if not text:
        return 0
    unspaced = len(_UNSPACED.findall(text))
    rest = _UNSPACED.sub(" ", text) if unspaced else text
    # Punctuation is not counted: the 0.75 words-per-token rate already includes it.
    words = len(_WORD.findall(rest))
    by_chars = len(rest.strip()) / CHARS_PER_TOKEN
    by_words = words * TOKENS_PER_WORD
    estimate = (by_chars + by_words) / 2 + unspaced
    return max(1, math.ceil(estimate))


@functools.lru_cache(maxsize=16)
def estimate_fixed_tokens(text: str) -> int:
    """`estimate_tokens` of a text sent unchanged with every request (a system prompt)."""
    return estimate_tokens(text)


def estimate_message_tokens(message: ChatMessage) -> int:
    """Estimate the tokens one chat message takes in a prompt, its role and separators included.

    The tool calls an assistant message carries count as well: their names and arguments are
    sent back to the model with the conversation.
    """
    counted = message.token_count
    tokens = TOKENS_PER_MESSAGE + (
        counted if counted is not None else estimate_tokens(message.content)
    )
    for call in message.tool_calls:
        tokens += TOKENS_PER_MESSAGE + estimate_tokens(call.name) + estimate_tokens(call.arguments)
    return tokens


def estimate_prompt_tokens(messages: Iterable[ChatMessage]) -> int:
    """Estimate the prompt tokens of a chat request made of `messages`."""
    return TOKENS_PER_REPLY + sum(estimate_message_tokens(message) for message in messages)
